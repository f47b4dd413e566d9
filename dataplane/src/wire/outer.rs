//! The outer headers of a tunnel packet on the uplink: Ethernet, IPv4 and,
//! for VXLAN, UDP. Built in place in front of an inner packet (the AF_XDP
//! port writes them straight into a transmit buffer, the inner bytes
//! already behind them) and checked and stripped on receipt without
//! copying the inner packet.
//!
//! ```text
//!  VXLAN: Ethernet(14) | IPv4(20) | UDP(8) | VXLAN(8) | inner Ethernet frame
//!  IPIP:  Ethernet(14) | IPv4(20, protocol 4)         | inner IPv4 packet
//! ```
//! On transmit the IPv4 header has no options, and the UDP checksum is
//! zero: the kernel's VXLAN device sends none over IPv4 by default (RFC 7348
//! allows it), and the inner packet carries its own. On receipt the IPv4
//! header checksum and every length are checked, but not the UDP checksum:
//! packets from a local veth carry it unfinished (the kernel's "checksum
//! pending" state does not cross AF_XDP), and the inner checksums are
//! verified where they matter (before GRO merges, and by the pod).

use crate::csum;
use crate::tables::Encap;
use crate::wire::{vxlan, MacAddr};
use std::net::Ipv4Addr;
use std::ops::Range;

/// Ethernet header.
pub const ETH_LEN: usize = 14;
/// IPv4 header without options.
pub const IPV4_LEN: usize = 20;
/// UDP header.
pub const UDP_LEN: usize = 8;
/// What IPIP puts in front of the inner IPv4 packet: Ethernet + IPv4.
pub const IPIP_LEN: usize = ETH_LEN + IPV4_LEN;
/// What VXLAN puts in front of the inner Ethernet frame: Ethernet + IPv4 +
/// UDP + VXLAN (50 bytes).
pub const VXLAN_LEN: usize = IPIP_LEN + UDP_LEN + vxlan::HEADER_LEN;

/// IP protocol numbers carried.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_UDP: u8 = 17;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

mod field {
    use std::ops::Range;
    pub const ETH_DST: Range<usize> = 0..6;
    pub const ETH_SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    // Inside the IPv4 header.
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const TOTAL_LEN: Range<usize> = 2..4;
    pub const ID: Range<usize> = 4..6;
    pub const FLAGS_FRAG: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
    // Inside the UDP header.
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const UDP_LEN: Range<usize> = 4..6;
    pub const UDP_CHECKSUM: Range<usize> = 6..8;
}

/// Why an outer frame is not one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OuterError {
    #[error("truncated")]
    Truncated,
    #[error("not IPv4")]
    NotIpv4,
    #[error("outer IPv4 header checksum is wrong")]
    BadChecksum,
    #[error("lengths in the outer headers disagree with the frame")]
    BadLength,
    #[error("outer IPv4 packet is a fragment")]
    Fragment,
    #[error("not addressed to this node")]
    NotForUs,
    #[error("neither VXLAN to our port nor IP in IP")]
    NotTunnel,
    #[error("packet too long for IPv4")]
    TooLong,
}

/// The outer Ethernet and IPv4 headers of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Outer {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub id: u16,
    pub ttl: u8,
    pub tos: u8,
    /// Don't fragment. Clear on Ocelot's packets, as on the kernel's VXLAN
    /// device: the pipeline answers DF packets that do not fit with
    /// "fragmentation needed" before they get here.
    pub df: bool,
}

impl Ipv4Outer {
    /// Write Ethernet and IPv4 ([`IPIP_LEN`] bytes, header checksum
    /// included) for an IP payload of `payload_len` bytes at the start of
    /// `buf`.
    pub fn emit(&self, payload_len: usize, buf: &mut [u8]) -> Result<(), OuterError> {
        let total = u16::try_from(IPV4_LEN + payload_len).map_err(|_| OuterError::TooLong)?;
        let b = buf.get_mut(..IPIP_LEN).ok_or(OuterError::Truncated)?;
        b[field::ETH_DST].copy_from_slice(&self.dst_mac.0);
        b[field::ETH_SRC].copy_from_slice(&self.src_mac.0);
        b[field::ETHERTYPE].copy_from_slice(&ETHERTYPE_IPV4);
        let ip = &mut b[ETH_LEN..];
        ip[field::VER_IHL] = 0x45;
        ip[field::TOS] = self.tos;
        ip[field::TOTAL_LEN].copy_from_slice(&total.to_be_bytes());
        ip[field::ID].copy_from_slice(&self.id.to_be_bytes());
        ip[field::FLAGS_FRAG].copy_from_slice(&[if self.df { 0x40 } else { 0 }, 0]);
        ip[field::TTL] = self.ttl;
        ip[field::PROTOCOL] = self.protocol;
        ip[field::CHECKSUM].fill(0);
        ip[field::SRC].copy_from_slice(&self.src.octets());
        ip[field::DST].copy_from_slice(&self.dst.octets());
        let c = csum::checksum(&ip[..IPV4_LEN]);
        ip[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
        Ok(())
    }
}

/// Write a UDP header for `payload_len` bytes of payload at the start of
/// `buf`, with a zero checksum (see the module notes).
pub fn emit_udp(
    src_port: u16,
    dst_port: u16,
    payload_len: usize,
    buf: &mut [u8],
) -> Result<(), OuterError> {
    let len = u16::try_from(UDP_LEN + payload_len).map_err(|_| OuterError::TooLong)?;
    let b = buf.get_mut(..UDP_LEN).ok_or(OuterError::Truncated)?;
    b[field::SRC_PORT].copy_from_slice(&src_port.to_be_bytes());
    b[field::DST_PORT].copy_from_slice(&dst_port.to_be_bytes());
    b[field::UDP_LEN].copy_from_slice(&len.to_be_bytes());
    b[field::UDP_CHECKSUM].fill(0);
    Ok(())
}

/// A tunnel packet received on the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub encap: Encap,
    /// The outer source: the sending node's underlay address.
    pub peer: Ipv4Addr,
    /// What the socket ports would have delivered, as a range of the frame:
    /// for VXLAN the UDP payload (VXLAN header and inner frame), for IPIP
    /// the outer IPv4 packet (header and inner packet), without the
    /// Ethernet padding of short frames.
    pub payload: Range<usize>,
}

/// Check an outer frame addressed to `local_ip`: Ethernet, IPv4 (version,
/// header length, checksum, total length, not a fragment), then either UDP
/// to `vxlan_port` (length consistent with the IP packet) or protocol 4.
/// The payload is not looked at (the pipeline checks the tunnel header).
pub fn parse(frame: &[u8], local_ip: Ipv4Addr, vxlan_port: u16) -> Result<Received, OuterError> {
    let eth = frame.get(..ETH_LEN).ok_or(OuterError::Truncated)?;
    if eth[field::ETHERTYPE] != ETHERTYPE_IPV4 {
        return Err(OuterError::NotIpv4);
    }
    let ip = &frame[ETH_LEN..];
    let first = *ip.first().ok_or(OuterError::Truncated)?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < IPV4_LEN {
        return Err(OuterError::NotIpv4);
    }
    let hdr = ip.get(..ihl).ok_or(OuterError::Truncated)?;
    if csum::checksum(hdr) != 0 {
        return Err(OuterError::BadChecksum);
    }
    let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if total < ihl || total > ip.len() {
        return Err(OuterError::BadLength);
    }
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x3fff != 0 {
        return Err(OuterError::Fragment);
    }
    let dst = Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]);
    if dst != local_ip {
        return Err(OuterError::NotForUs);
    }
    let peer = Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]);
    let l3_end = ETH_LEN + total;
    match hdr[field::PROTOCOL] {
        PROTO_IPIP => Ok(Received { encap: Encap::Ipip, peer, payload: ETH_LEN..l3_end }),
        PROTO_UDP => {
            let udp_at = ETH_LEN + ihl;
            let udp = frame.get(udp_at..udp_at + UDP_LEN).ok_or(OuterError::Truncated)?;
            if udp_at + UDP_LEN > l3_end {
                return Err(OuterError::BadLength);
            }
            if u16::from_be_bytes([udp[2], udp[3]]) != vxlan_port {
                return Err(OuterError::NotTunnel);
            }
            let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
            if udp_len < UDP_LEN || udp_at + udp_len != l3_end {
                return Err(OuterError::BadLength);
            }
            Ok(Received { encap: Encap::Vxlan, peer, payload: udp_at + UDP_LEN..l3_end })
        }
        _ => Err(OuterError::NotTunnel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outer(protocol: u8) -> Ipv4Outer {
        Ipv4Outer {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src: Ipv4Addr::new(192, 0, 2, 11),
            dst: Ipv4Addr::new(192, 0, 2, 12),
            protocol,
            id: 7,
            ttl: 64,
            tos: 0,
            df: false,
        }
    }

    /// A VXLAN frame to 192.0.2.12:4789 with `payload` after the UDP header.
    fn vxlan_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; IPIP_LEN + UDP_LEN];
        outer(PROTO_UDP).emit(UDP_LEN + payload.len(), &mut f).unwrap();
        emit_udp(50000, 4789, payload.len(), &mut f[IPIP_LEN..]).unwrap();
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn emitted_headers_parse_back() {
        let f = vxlan_frame(&[0x08, 0, 0, 0, 0, 0x10, 0, 0, 0xaa, 0xbb]);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&f[ETH_LEN..]).unwrap();
        assert_eq!(ip.total_len() as usize, f.len() - ETH_LEN);
        assert!(!ip.dont_fragment());
        assert_eq!(csum::checksum(ip.slice()), 0);
        let r = parse(&f, Ipv4Addr::new(192, 0, 2, 12), 4789).unwrap();
        assert_eq!(r.encap, Encap::Vxlan);
        assert_eq!(r.peer, Ipv4Addr::new(192, 0, 2, 11));
        assert_eq!(&f[r.payload], &[0x08, 0, 0, 0, 0, 0x10, 0, 0, 0xaa, 0xbb]);
        // Ethernet padding after the IP packet is not payload.
        let mut padded = f.clone();
        padded.extend_from_slice(&[0; 6]);
        let r = parse(&padded, Ipv4Addr::new(192, 0, 2, 12), 4789).unwrap();
        assert_eq!(r.payload.end, f.len());

        let mut ipip = vec![0u8; IPIP_LEN];
        outer(PROTO_IPIP).emit(24, &mut ipip).unwrap();
        ipip.extend_from_slice(&[0x45; 24]);
        let r = parse(&ipip, Ipv4Addr::new(192, 0, 2, 12), 4789).unwrap();
        assert_eq!((r.encap, r.payload), (Encap::Ipip, ETH_LEN..ipip.len()));
    }

    #[test]
    fn bad_outer_headers_are_refused_never_panic() {
        let me = Ipv4Addr::new(192, 0, 2, 12);
        let f = vxlan_frame(&[0x08, 0, 0, 0, 0, 0x10, 0, 0]);
        for len in 0..f.len() {
            assert!(parse(&f[..len], me, 4789).is_err(), "truncated to {len}");
        }
        let mut bad = f.clone();
        bad[ETH_LEN + 8] ^= 1; // TTL changed, checksum not
        assert_eq!(parse(&bad, me, 4789), Err(OuterError::BadChecksum));
        assert_eq!(parse(&f, me, 4790), Err(OuterError::NotTunnel));
        assert_eq!(parse(&f, Ipv4Addr::new(192, 0, 2, 13), 4789), Err(OuterError::NotForUs));
        let fix = |mut v: Vec<u8>| {
            v[ETH_LEN + 10..ETH_LEN + 12].fill(0);
            let c = csum::checksum(&v[ETH_LEN..ETH_LEN + 20]);
            v[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
            v
        };
        let mut frag = f.clone();
        frag[ETH_LEN + 6] = 0x20; // MF
        assert_eq!(parse(&fix(frag), me, 4789), Err(OuterError::Fragment));
        let mut long = f.clone();
        long[ETH_LEN + 3] += 1; // total length one past the frame
        assert_eq!(parse(&fix(long), me, 4789), Err(OuterError::BadLength));
        let mut udp_len = f.clone();
        udp_len[IPIP_LEN + 5] -= 1;
        assert_eq!(parse(&udp_len, me, 4789), Err(OuterError::BadLength));
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(parse(&v6, me, 4789), Err(OuterError::NotIpv4));
        let mut gre = f;
        gre[ETH_LEN + 9] = 47;
        assert_eq!(parse(&fix(gre), me, 4789), Err(OuterError::NotTunnel));
        // Random bytes never panic.
        let mut x: u32 = 1;
        for _ in 0..2000 {
            let n = (x % 80) as usize;
            let v: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = parse(&v, me, 4789);
        }
    }

    #[test]
    fn too_long_is_an_error() {
        let mut b = [0u8; IPIP_LEN];
        assert_eq!(outer(PROTO_IPIP).emit(65_516, &mut b), Err(OuterError::TooLong));
        assert_eq!(outer(PROTO_IPIP).emit(1, &mut b[..10]), Err(OuterError::Truncated));
        assert_eq!(emit_udp(1, 2, 65_528, &mut [0; 8]), Err(OuterError::TooLong));
    }
}
