//! Compiles the uplink's XDP program (`xdp/uplink.bpf.c`) with clang into
//! `$OUT_DIR/uplink.bpf.o`, which `port::xdp::program` embeds. Needs clang
//! and the BPF and kernel headers (Debian: `clang` and `libbpf-dev`; `dev.sh`
//! installs them). `$CLANG` names another compiler.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "xdp/uplink.bpf.c";
const PACKAGES: &str = "apt-get install clang libbpf-dev";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("uplink.bpf.o");

    // `-target bpf` does not search the multiarch directory where Debian
    // keeps <asm/types.h>; ask the host compiler which one it is.
    let multiarch = Command::new(&clang).arg("-print-multiarch").output().unwrap_or_else(|e| {
        fail(&format!("cannot run `{clang}` ({e}): the XDP program is compiled with clang"))
    });
    let mut triple = String::from_utf8_lossy(&multiarch.stdout).trim().to_string();
    if triple.is_empty() {
        let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
        triple = format!("{arch}-linux-gnu");
    }

    let result = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{triple}"))
        .args(["-c", SOURCE, "-o"])
        .arg(&out)
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run `{clang}`: {e}")));
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr);
        let hint = if stderr.contains("file not found") {
            "the BPF or kernel headers are missing"
        } else {
            "clang failed"
        };
        fail(&format!("{hint} compiling {SOURCE}:\n{stderr}"));
    }
}

fn fail(msg: &str) -> ! {
    panic!(
        "\n\nocelot-dataplane: {msg}\n\
         The uplink's XDP program is built with clang and needs the BPF headers.\n\
         On Debian/Ubuntu: {PACKAGES}   (./dev.sh does it)\n\n"
    );
}
