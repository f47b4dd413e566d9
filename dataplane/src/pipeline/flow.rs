//! Which worker a flow belongs to.
//!
//! Connection tracking needs both directions of a flow to meet the same
//! state, so every frame is processed by the worker that owns its flow,
//! whatever port it arrived on. The owner is a symmetric hash of the IP
//! address pair (the same for A→B and B→A), so no state has to be shared
//! between cores. Ports are not part of the key: fragments carry none, and a
//! flow's fragments must meet the same state as its first packet. The cost
//! is that all flows between one pair of addresses share one worker.

use super::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_LEN};
use crate::tables::{Encap, PortKind};
use crate::wire::vxlan;

/// A symmetric hash of the frame's IP addresses; 0 for non-IP frames (ARP
/// is stateless and answered by whichever worker receives it).
#[inline]
pub fn symmetric_hash(data: &[u8]) -> u32 {
    if data.len() < ETH_LEN {
        return 0;
    }
    let et = u16::from_be_bytes([data[12], data[13]]);
    let (a, b): (&[u8], &[u8]) = match et {
        ETHERTYPE_IPV4 => match data.get(ETH_LEN + 12..ETH_LEN + 20) {
            Some(s) => match icmp_error_quoted(&data[ETH_LEN..]) {
                Some(q) => (&q[..4], &q[4..]),
                None => (&s[..4], &s[4..]),
            },
            None => return 0,
        },
        ETHERTYPE_IPV6 => match data.get(ETH_LEN + 8..ETH_LEN + 40) {
            Some(s) => (&s[..16], &s[16..]),
            None => return 0,
        },
        _ => return 0,
    };
    pair_hash(a, b)
}

/// The address pair an ICMP error quotes (source and destination of the
/// packet it is about): the error belongs to that flow's worker, which
/// holds its tracking and translation state, not to the pair of the
/// router that sent it and the flow's endpoint.
#[inline]
fn icmp_error_quoted(ip: &[u8]) -> Option<&[u8]> {
    if ip.len() < 20 || ip[9] != 1 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    match ip.get(hl)? {
        3 | 4 | 11 | 12 => ip.get(hl + 8 + 12..hl + 8 + 20),
        _ => None,
    }
}

/// The worker (out of `n`) owning flows between `a` and `b`.
#[inline]
pub fn pair_owner(a: std::net::Ipv4Addr, b: std::net::Ipv4Addr, n: usize) -> usize {
    if n <= 1 {
        0
    } else {
        pair_hash(&a.octets(), &b.octets()) as usize % n
    }
}

fn pair_hash(a: &[u8], b: &[u8]) -> u32 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h: u32 = 0x811c_9dc5;
    for x in lo.iter().chain(hi) {
        h ^= u32::from(*x);
        h = h.wrapping_mul(0x0100_0193);
    }
    h ^ (h >> 16)
}

/// The hash of the flow a frame received on a port of `kind` carries: for
/// a tunnel, the inner packet's (so both directions of a pod-to-pod flow
/// meet on one worker, whether they cross a tunnel or not).
#[inline]
pub fn frame_hash(data: &[u8], kind: &PortKind) -> u32 {
    encap_hash(data, kind.rx_encap(None))
}

/// The hash of the flow a frame carries that arrived in `encap` (`None`:
/// a plain frame).
#[inline]
pub fn encap_hash(data: &[u8], encap: Option<Encap>) -> u32 {
    match encap {
        Some(Encap::Vxlan) => data.get(vxlan::HEADER_LEN..).map_or(0, symmetric_hash),
        Some(Encap::Ipip) => {
            let hl = data.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
            match data.get(hl + 12..hl + 20) {
                Some(s) => pair_hash(&s[..4], &s[4..]),
                None => 0,
            }
        }
        _ => symmetric_hash(data),
    }
}

/// The worker (out of `n`) that owns the flow of a frame received on a port
/// of `kind`.
#[inline]
pub fn owner(data: &[u8], kind: &PortKind, n: usize) -> usize {
    if n <= 1 {
        0
    } else {
        frame_hash(data, kind) as usize % n
    }
}

/// [`owner`] for a received frame, whose metadata may name its
/// encapsulation (frames from the AF_XDP uplink port do).
#[inline]
pub fn owner_of(f: &crate::frame::Frame, kind: &PortKind, n: usize) -> usize {
    if n <= 1 {
        0
    } else {
        encap_hash(f.data(), kind.rx_encap(f.meta.encap)) as usize % n
    }
}
