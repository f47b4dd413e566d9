//! Everything that talks to the kernel: TAP ioctls, network namespaces,
//! netlink, CPU affinity, AF_XDP sockets, epoll sets, ethtool. With the
//! ports that issue their own system calls (`port/tap.rs`,
//! `port/tunnel.rs`), the only place with `unsafe`.

pub mod affinity;
pub mod epoll;
pub mod ethtool;
pub mod netlink;
pub mod netns;
pub mod signals;
pub mod steer;
pub mod tun;
pub mod xsk;
