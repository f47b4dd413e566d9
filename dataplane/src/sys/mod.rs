//! Everything that talks to the kernel: TAP ioctls, network namespaces,
//! netlink, CPU affinity. The only place besides `port/tap.rs` with `unsafe`.

pub mod affinity;
pub mod netlink;
pub mod netns;
pub mod signals;
pub mod tun;
