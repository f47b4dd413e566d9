//! ICMP errors the dataplane originates (RFC 792, RFC 1812 4.3.2): the frame
//! that caused the error is rewritten in place into the error for its
//! sender, quoting the offending IP header and 8 bytes of its payload.

use super::{ETH_LEN, GATEWAY_IP};
use crate::csum;
use crate::frame::Frame;
use crate::wire::MacAddr;

const IP_HDR: usize = 20;
const ICMP_HDR: usize = 8;
const PROTO_ICMP: u8 = 1;

/// Rewrite `f` into an ICMP time-exceeded (TTL exceeded in transit).
/// Returns false, leaving the frame to be dropped, when no error may be
/// sent (the offender is itself an ICMP error, or is unparseable).
pub(super) fn time_exceeded(f: &mut Frame, gw: MacAddr) -> bool {
    error(f, gw, 11, 0, [0; 4])
}

/// Rewrite `f` into an ICMP destination unreachable (host unreachable).
pub(super) fn host_unreachable(f: &mut Frame, gw: MacAddr) -> bool {
    error(f, gw, 3, 1, [0; 4])
}

/// Rewrite `f` into an ICMP "fragmentation needed" advertising `mtu`.
pub(super) fn frag_needed(f: &mut Frame, gw: MacAddr, mtu: u16) -> bool {
    let m = mtu.to_be_bytes();
    error(f, gw, 3, 4, [0, 0, m[0], m[1]])
}

/// Rewrite `f` into an ICMP port unreachable from `from` (a Service's
/// frontend that has no backend: the address the sender spoke to).
pub(super) fn port_unreachable(f: &mut Frame, gw: MacAddr, from: std::net::Ipv4Addr) -> bool {
    error_from(f, gw, from, 3, 3, [0; 4])
}

fn error(f: &mut Frame, gw: MacAddr, icmp_type: u8, code: u8, rest: [u8; 4]) -> bool {
    error_from(f, gw, GATEWAY_IP, icmp_type, code, rest)
}

fn error_from(
    f: &mut Frame,
    gw: MacAddr,
    from: std::net::Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
) -> bool {
    let data = f.data();
    let Some(ip) = data.get(ETH_LEN..) else { return false };
    if ip.len() < IP_HDR {
        return false;
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    if hl < IP_HDR || ip.len() < hl {
        return false;
    }
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if ip[9] == PROTO_ICMP && frag_offset == 0 {
        // Never answer an ICMP error with an error (RFC 1812 4.3.2.7).
        match ip.get(hl) {
            Some(0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) => {}
            _ => return false,
        }
    }
    let quoted_len =
        (hl + 8).min(ip.len()).min(usize::from(u16::from_be_bytes([ip[2], ip[3]])).max(hl));
    let mut quoted = [0u8; 60 + 8];
    quoted[..quoted_len].copy_from_slice(&ip[..quoted_len]);
    let src: [u8; 4] = ip[12..16].try_into().unwrap_or([0; 4]);
    let sender_mac = MacAddr(data[6..12].try_into().unwrap_or([0; 6]));

    let total = IP_HDR + ICMP_HDR + quoted_len;
    if !f.resize(ETH_LEN + total) {
        return false;
    }
    f.vnet = Default::default();
    let out = f.data_mut();
    super::set_macs(out, sender_mac, gw);
    out[12..14].copy_from_slice(&super::ETHERTYPE_IPV4.to_be_bytes());
    let ip = &mut out[ETH_LEN..];
    ip[..IP_HDR].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&src);
    let c = csum::checksum(&ip[..IP_HDR]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut ip[IP_HDR..];
    icmp[0] = icmp_type;
    icmp[1] = code;
    icmp[2..4].fill(0);
    icmp[4..8].copy_from_slice(&rest);
    icmp[ICMP_HDR..ICMP_HDR + quoted_len].copy_from_slice(&quoted[..quoted_len]);
    let c = csum::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    true
}
