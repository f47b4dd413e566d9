//! `ocelot-cni`: see the library crate (`ocelot_cni`).

fn main() {
    std::process::exit(ocelot_cni::main_with_std());
}
