//! Wire formats that Ocelot owns. Ethernet, IPv4/IPv6, TCP and UDP come from
//! etherparse; ARP and ICMP from smoltcp. What neither crate has lives here,
//! one file per header, each with a checked view and tests on captured bytes.

pub mod mac;
pub mod outer;
pub mod vnet;
pub mod vxlan;

pub use mac::MacAddr;
pub use vnet::{GsoType, VnetHdr, VNET_HDR_LEN};
