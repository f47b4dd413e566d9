//! VXLAN (RFC 7348): the 8-byte header, and encapsulation/decapsulation of
//! whole frames over IPv4 or IPv6 and UDP.
//!
//! ```text
//!  flags(8: I=0x08) | reserved(24) | VNI(24) | reserved(8)
//! ```
//! On transmit the reserved bits are zero; on receipt they are ignored, and
//! a header without the I flag is refused. The outer UDP checksum is sent as
//! zero over IPv4 and computed over IPv6; on receipt a zero checksum is
//! accepted and a non-zero one must be correct.

use crate::csum;
use crate::wire::{outer, MacAddr};
use std::net::IpAddr;
use std::ops::Range;

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;
/// Outer headers over IPv4: Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const OVERHEAD_V4: usize = 50;
/// Outer headers over IPv6: Ethernet 14 + IPv6 40 + UDP 8 + VXLAN 8.
pub const OVERHEAD_V6: usize = 70;

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const VNI: Range<usize> = 4..7;
}

/// Why a packet is not acceptable VXLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    #[error("truncated")]
    Truncated,
    #[error("the I flag is not set")]
    NoVniFlag,
    #[error("outer packet is not IPv4/IPv6 UDP")]
    NotUdp,
    #[error("outer IPv4 header checksum is wrong")]
    BadIpChecksum,
    #[error("outer UDP checksum is wrong")]
    BadUdpChecksum,
    #[error("lengths in the outer headers disagree with the frame")]
    BadLength,
    #[error("outer IP packet is a fragment")]
    Fragment,
    #[error("VNI above 24 bits")]
    BadVni,
}

/// Parse the VXLAN header at the start of `b`: the VNI.
pub fn parse_header(b: &[u8]) -> Result<u32, VxlanError> {
    let h = b.get(..HEADER_LEN).ok_or(VxlanError::Truncated)?;
    if h[field::FLAGS] & FLAG_I == 0 {
        return Err(VxlanError::NoVniFlag);
    }
    Ok(u32::from_be_bytes([
        0,
        h[field::VNI.start],
        h[field::VNI.start + 1],
        h[field::VNI.start + 2],
    ]))
}

/// Write a VXLAN header for `vni` into the first 8 bytes of `b`.
pub fn emit_header(vni: u32, b: &mut [u8]) -> Result<(), VxlanError> {
    if vni > 0x00ff_ffff {
        return Err(VxlanError::BadVni);
    }
    let h = b.get_mut(..HEADER_LEN).ok_or(VxlanError::Truncated)?;
    h.fill(0);
    h[field::FLAGS] = FLAG_I;
    h[field::VNI].copy_from_slice(&vni.to_be_bytes()[1..]);
    Ok(())
}

/// Everything the outer headers carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncapParams {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    /// IPv4 identification (ignored over IPv6).
    pub ip_id: u16,
    /// TTL / hop limit.
    pub ttl: u8,
    /// TOS / traffic class.
    pub tos: u8,
    /// IPv4 don't-fragment (RFC 7348: VTEPs must not fragment).
    pub df: bool,
    /// IPv6 flow label.
    pub flow_label: u32,
}

/// The outer UDP source port for a flow hash: in 49152..=65535, as RFC 7348
/// recommends, so ECMP spreads flows while keeping each on one path.
pub fn source_port(flow_hash: u32) -> u16 {
    49152 + (flow_hash % 16384) as u16
}

/// Build the full outer frame around `inner` (an Ethernet frame without
/// FCS) into `out` (cleared first).
pub fn encapsulate(inner: &[u8], p: &EncapParams, out: &mut Vec<u8>) -> Result<(), VxlanError> {
    emit_header(p.vni, &mut [0u8; HEADER_LEN])?;
    out.clear();
    let udp_len = 8 + HEADER_LEN + inner.len();
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (p.src_ip, p.dst_ip) {
        // The same headers the AF_XDP uplink port writes (`wire::outer`).
        let o = outer::Ipv4Outer {
            src_mac: p.src_mac,
            dst_mac: p.dst_mac,
            src: s,
            dst: d,
            protocol: outer::PROTO_UDP,
            id: p.ip_id,
            ttl: p.ttl,
            tos: p.tos,
            df: p.df,
        };
        out.resize(outer::VXLAN_LEN, 0);
        o.emit(udp_len, out).map_err(|_| VxlanError::BadLength)?;
        outer::emit_udp(
            p.src_port,
            p.dst_port,
            HEADER_LEN + inner.len(),
            &mut out[outer::IPIP_LEN..],
        )
        .map_err(|_| VxlanError::BadLength)?;
        emit_header(p.vni, &mut out[outer::IPIP_LEN + outer::UDP_LEN..])?;
        out.extend_from_slice(inner);
        return Ok(());
    }
    out.extend_from_slice(&p.dst_mac.0);
    out.extend_from_slice(&p.src_mac.0);
    match (p.src_ip, p.dst_ip) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let plen = u16::try_from(udp_len).map_err(|_| VxlanError::BadLength)?;
            out.extend_from_slice(&[0x86, 0xdd]);
            let vtf = (6u32 << 28) | (u32::from(p.tos) << 20) | (p.flow_label & 0x000f_ffff);
            out.extend_from_slice(&vtf.to_be_bytes());
            out.extend_from_slice(&plen.to_be_bytes());
            out.extend_from_slice(&[17, p.ttl]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => return Err(VxlanError::NotUdp),
    }
    let udp_at = out.len();
    out.extend_from_slice(&p.src_port.to_be_bytes());
    out.extend_from_slice(&p.dst_port.to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    let vx_at = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    emit_header(p.vni, &mut out[vx_at..])?;
    out.extend_from_slice(inner);
    if p.src_ip.is_ipv6() {
        let c = udp_checksum(out, udp_at, p.src_ip, p.dst_ip);
        out[udp_at + 6..udp_at + 8].copy_from_slice(&c.to_be_bytes());
    }
    Ok(())
}

/// One's-complement sum of the UDP pseudo-header and the UDP datagram.
fn udp_sum(udp: &[u8], src: IpAddr, dst: IpAddr) -> u32 {
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => csum::sum(&s.octets(), csum::sum(&d.octets(), 0)),
        (IpAddr::V6(s), IpAddr::V6(d)) => csum::sum(&s.octets(), csum::sum(&d.octets(), 0)),
        _ => 0,
    };
    acc = acc.wrapping_add(17).wrapping_add(udp.len() as u32);
    csum::sum(udp, acc)
}

fn udp_checksum(frame: &[u8], udp_at: usize, src: IpAddr, dst: IpAddr) -> u16 {
    match !csum::fold(udp_sum(&frame[udp_at..], src, dst)) {
        0 => 0xffff,
        c => c,
    }
}

/// A decapsulated packet: where its parts are in the frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decap {
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    /// The inner Ethernet frame.
    pub inner: Range<usize>,
}

/// Parse an outer Ethernet frame carrying VXLAN. `verify_udp` checks a
/// non-zero UDP checksum (turn it off only for frames whose checksum is
/// known to be partial, such as GSO frames before segmentation).
pub fn decapsulate(frame: &[u8], verify_udp: bool) -> Result<Decap, VxlanError> {
    let et = frame.get(12..14).ok_or(VxlanError::Truncated)?;
    let (src_ip, dst_ip, udp_at, l3_end) = match [et[0], et[1]] {
        [0x08, 0x00] => {
            let ip = frame.get(14..34).ok_or(VxlanError::Truncated)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Err(VxlanError::NotUdp);
            }
            let hdr = frame.get(14..14 + ihl).ok_or(VxlanError::Truncated)?;
            if csum::checksum(hdr) != 0 {
                return Err(VxlanError::BadIpChecksum);
            }
            if hdr[9] != 17 {
                return Err(VxlanError::NotUdp);
            }
            if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x3fff != 0 {
                return Err(VxlanError::Fragment);
            }
            let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            if total < ihl + 8 || 14 + total > frame.len() {
                return Err(VxlanError::BadLength);
            }
            let s: [u8; 4] = hdr[12..16].try_into().map_err(|_| VxlanError::Truncated)?;
            let d: [u8; 4] = hdr[16..20].try_into().map_err(|_| VxlanError::Truncated)?;
            (IpAddr::from(s), IpAddr::from(d), 14 + ihl, 14 + total)
        }
        [0x86, 0xdd] => {
            let ip = frame.get(14..54).ok_or(VxlanError::Truncated)?;
            if ip[0] >> 4 != 6 || ip[6] != 17 {
                return Err(VxlanError::NotUdp);
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 54 + plen > frame.len() {
                return Err(VxlanError::BadLength);
            }
            let s: [u8; 16] = ip[8..24].try_into().map_err(|_| VxlanError::Truncated)?;
            let d: [u8; 16] = ip[24..40].try_into().map_err(|_| VxlanError::Truncated)?;
            (IpAddr::from(s), IpAddr::from(d), 54, 54 + plen)
        }
        _ => return Err(VxlanError::NotUdp),
    };
    let udp = frame.get(udp_at..udp_at + 8).ok_or(VxlanError::Truncated)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < 8 + HEADER_LEN || udp_at + udp_len != l3_end {
        return Err(VxlanError::BadLength);
    }
    let check = u16::from_be_bytes([udp[6], udp[7]]);
    if verify_udp
        && check != 0
        && csum::fold(udp_sum(&frame[udp_at..l3_end], src_ip, dst_ip)) != 0xffff
    {
        return Err(VxlanError::BadUdpChecksum);
    }
    let vni = parse_header(&frame[udp_at + 8..])?;
    Ok(Decap {
        src_ip,
        dst_ip,
        src_port: u16::from_be_bytes([udp[0], udp[1]]),
        dst_port: u16::from_be_bytes([udp[2], udp[3]]),
        vni,
        inner: udp_at + 8 + HEADER_LEN..l3_end,
    })
}

#[cfg(test)]
#[path = "vxlan/tests.rs"]
mod tests;
