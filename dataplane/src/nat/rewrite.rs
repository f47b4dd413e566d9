//! Reading a packet's translatable tuple, and rewriting its addresses and
//! ports with the checksums kept right: the IPv4 header checksum and the
//! TCP/UDP/ICMP checksums by incremental update (RFC 1624), a partial
//! checksum (`NEEDS_CSUM`, which holds the pseudo-header sum only, so only
//! address changes touch it) by the same arithmetic uncomplemented, SCTP's
//! CRC32c recomputed (it is not incremental), and ICMP errors with their
//! quoted header translated too and the ICMP checksum recomputed.
//!
//! Offsets are from the start of the IPv4 header; callers pass the packet
//! from there on and say whether its L4 checksum is partial.

use super::flows::Tuple;
use crate::csum;
use std::net::Ipv4Addr;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;

mod field {
    pub const TOTAL_LEN: std::ops::Range<usize> = 2..4;
    pub const FRAG: std::ops::Range<usize> = 6..8;
    pub const PROTO: usize = 9;
    pub const CHECKSUM: std::ops::Range<usize> = 10..12;
    pub const SRC: std::ops::Range<usize> = 12..16;
    pub const DST: std::ops::Range<usize> = 16..20;
}

/// What kind of packet a tuple was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// TCP, UDP or SCTP: ports.
    Ports,
    /// ICMP echo request: the identifier is the source "port".
    EchoRequest,
    /// ICMP echo reply: the identifier is the destination "port".
    EchoReply,
    /// An ICMP error; `quoted` is the tuple of the packet it quotes, as
    /// that packet went.
    IcmpError { quoted: Tuple },
}

/// A packet's tuple, TCP flags and kind; `None` when it has nothing to
/// translate by (a later fragment, another protocol, too short).
pub fn read(ip: &[u8]) -> Option<(Tuple, u8, Kind)> {
    let hl = header_len(ip)?;
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let proto = ip[field::PROTO];
    let src = addr(ip, field::SRC);
    let dst = addr(ip, field::DST);
    let l4 = ip.get(hl..)?;
    match proto {
        TCP | UDP | SCTP => {
            let p = l4.get(..4)?;
            let flags = if proto == TCP { *l4.get(13)? } else { 0 };
            let t = Tuple {
                proto,
                src: (src, u16::from_be_bytes([p[0], p[1]])),
                dst: (dst, u16::from_be_bytes([p[2], p[3]])),
            };
            Some((t, flags, Kind::Ports))
        }
        ICMP => {
            let ty = *l4.first()?;
            match ty {
                8 | 0 => {
                    let id = u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]);
                    let (s, d, k) =
                        if ty == 8 { (id, 0, Kind::EchoRequest) } else { (0, id, Kind::EchoReply) };
                    Some((Tuple { proto, src: (src, s), dst: (dst, d) }, 0, k))
                }
                3 | 4 | 11 | 12 => {
                    let inner = l4.get(8..)?;
                    let (q, _, qk) = read_quoted(inner)?;
                    if qk != Kind::Ports && qk != Kind::EchoRequest && qk != Kind::EchoReply {
                        return None;
                    }
                    let t = Tuple { proto, src: (src, 0), dst: (dst, 0) };
                    Some((t, 0, Kind::IcmpError { quoted: q }))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The tuple of a quoted packet (an ICMP error carries its header and at
/// least 8 bytes of its payload; the total length field may exceed what
/// is there).
fn read_quoted(ip: &[u8]) -> Option<(Tuple, u8, Kind)> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    if hl < 20 || ip.len() < hl + 8 {
        return None;
    }
    let proto = ip[field::PROTO];
    if proto == ICMP {
        let ty = ip[hl];
        if ty != 8 && ty != 0 {
            return None;
        }
    }
    // Parse as if complete: only the first 8 bytes of L4 are read.
    let mut head = [0u8; 68];
    head[..hl + 8].copy_from_slice(&ip[..hl + 8]);
    head[2..4].copy_from_slice(&((hl + 8) as u16).to_be_bytes());
    head[6..8].fill(0);
    let (t, f, k) = read(&head[..hl + 8])?;
    if matches!(k, Kind::IcmpError { .. }) {
        return None;
    }
    Some((t, f, k))
}

fn header_len(ip: &[u8]) -> Option<usize> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    (hl >= 20 && total >= hl && ip.len() >= hl).then_some(hl)
}

fn addr(ip: &[u8], r: std::ops::Range<usize>) -> Ipv4Addr {
    Ipv4Addr::new(ip[r.start], ip[r.start + 1], ip[r.start + 2], ip[r.start + 3])
}

/// The one's-complement change of replacing `old` by `new` (two words).
fn delta_addr(old: Ipv4Addr, new: Ipv4Addr) -> u32 {
    let (o, n) = (u32::from(old), u32::from(new));
    (!(o >> 16) & 0xffff) + (!o & 0xffff) + (n >> 16) + (n & 0xffff)
}

fn delta16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// RFC 1624 eqn. 3 for a sum of word changes.
fn apply(check: u16, delta: u32) -> u16 {
    !csum::fold(u32::from(!check) + delta)
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrite the packet at `ip` (as [`read`] saw it, with `kind`) to carry
/// `to`. `partial`: its L4 checksum field holds the pseudo-header sum (a
/// frame with `NEEDS_CSUM`). Returns false, changing nothing, when the
/// packet is too short for its headers.
pub fn rewrite(ip: &mut [u8], kind: Kind, to: &Tuple, partial: bool) -> bool {
    let Some(hl) = header_len(ip) else { return false };
    let proto = ip[field::PROTO];
    let (src, dst) = (addr(ip, field::SRC), addr(ip, field::DST));
    let addr_delta = delta_addr(src, to.src.0) + delta_addr(dst, to.dst.0);
    let total = usize::from(get16(ip, field::TOTAL_LEN.start)).min(ip.len());
    // The L4 part first (it needs the old addresses' delta only).
    match (proto, kind) {
        (TCP | UDP, Kind::Ports) => {
            let at = hl + if proto == TCP { 16 } else { 6 };
            if ip.len() < at + 2 || ip.len() < hl + 4 {
                return false;
            }
            let (sp, dp) = (get16(ip, hl), get16(ip, hl + 2));
            let c = get16(ip, at);
            let new = if partial {
                // Only the pseudo-header is in the field, uncomplemented.
                csum::fold(u32::from(c) + addr_delta)
            } else if proto == UDP && c == 0 {
                0 // no checksum: stays so
            } else {
                let d = addr_delta + delta16(sp, to.src.1) + delta16(dp, to.dst.1);
                let n = apply(c, d);
                if proto == UDP && n == 0 {
                    0xffff
                } else {
                    n
                }
            };
            put16(ip, hl, to.src.1);
            put16(ip, hl + 2, to.dst.1);
            put16(ip, at, new);
        }
        (SCTP, Kind::Ports) => {
            if ip.len() < hl + 12 || total < hl + 12 {
                return false;
            }
            put16(ip, hl, to.src.1);
            put16(ip, hl + 2, to.dst.1);
            if !partial {
                // CRC32c over the whole SCTP packet, checksum field zeroed.
                ip[hl + 8..hl + 12].fill(0);
                let crc = crc32c::crc32c(&ip[hl..total]);
                ip[hl + 8..hl + 12].copy_from_slice(&crc.to_le_bytes());
            }
        }
        (ICMP, Kind::EchoRequest | Kind::EchoReply) => {
            if ip.len() < hl + 8 {
                return false;
            }
            let id = if kind == Kind::EchoRequest { to.src.1 } else { to.dst.1 };
            let old = get16(ip, hl + 4);
            let c = get16(ip, hl + 2);
            put16(ip, hl + 4, id);
            put16(ip, hl + 2, apply(c, delta16(old, id)));
        }
        (ICMP, Kind::IcmpError { .. }) => {
            // The quoted packet is rewritten by `rewrite_quoted`; here only
            // the outer addresses change, and ICMP has no pseudo-header.
        }
        _ => return false,
    }
    ip[field::SRC].copy_from_slice(&to.src.0.octets());
    ip[field::DST].copy_from_slice(&to.dst.0.octets());
    let c = get16(ip, field::CHECKSUM.start);
    put16(ip, field::CHECKSUM.start, apply(c, addr_delta));
    true
}

/// Rewrite the packet an ICMP error at `ip` quotes to `quoted` (as that
/// packet went), and recompute the ICMP checksum. Returns false, changing
/// nothing, when the error is too short.
pub fn rewrite_quoted(ip: &mut [u8], quoted: &Tuple) -> bool {
    let Some(hl) = header_len(ip) else { return false };
    let total = usize::from(get16(ip, field::TOTAL_LEN.start)).min(ip.len());
    if total < hl + 8 + 28 {
        return false;
    }
    let Some((_, _, qkind)) = read_quoted(&ip[hl + 8..total]) else { return false };
    let inner = &mut ip[hl + 8..total];
    let qhl = usize::from(inner[0] & 0x0f) * 4;
    let (qs, qd) = (addr(inner, field::SRC), addr(inner, field::DST));
    let addr_delta = delta_addr(qs, quoted.src.0) + delta_addr(qd, quoted.dst.0);
    match qkind {
        Kind::Ports => {
            let (sp, dp) = (get16(inner, qhl), get16(inner, qhl + 2));
            let at = match inner[field::PROTO] {
                TCP => Some(qhl + 16),
                UDP => Some(qhl + 6),
                _ => None,
            };
            if let Some(at) = at.filter(|at| inner.len() >= at + 2) {
                let c = get16(inner, at);
                if !(inner[field::PROTO] == UDP && c == 0) {
                    let d = addr_delta + delta16(sp, quoted.src.1) + delta16(dp, quoted.dst.1);
                    put16(inner, at, apply(c, d));
                }
            }
            put16(inner, qhl, quoted.src.1);
            put16(inner, qhl + 2, quoted.dst.1);
        }
        Kind::EchoRequest | Kind::EchoReply => {
            let id = if qkind == Kind::EchoRequest { quoted.src.1 } else { quoted.dst.1 };
            let old = get16(inner, qhl + 4);
            let c = get16(inner, qhl + 2);
            put16(inner, qhl + 4, id);
            put16(inner, qhl + 2, apply(c, delta16(old, id)));
        }
        Kind::IcmpError { .. } => return false,
    }
    inner[field::SRC].copy_from_slice(&quoted.src.0.octets());
    inner[field::DST].copy_from_slice(&quoted.dst.0.octets());
    let c = get16(inner, field::CHECKSUM.start);
    put16(inner, field::CHECKSUM.start, apply(c, addr_delta));
    // The ICMP checksum covers everything quoted: recompute it.
    ip[hl + 2..hl + 4].fill(0);
    let c = csum::checksum(&ip[hl..total]);
    put16(ip, hl + 2, c);
    true
}

/// Is the packet at `ip` a non-first fragment (nothing to read ports from)?
pub fn later_fragment(ip: &[u8]) -> bool {
    ip.len() >= 8 && get16(ip, field::FRAG.start) & 0x1fff != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn tuple(p: u8, s: &str, sp: u16, d: &str, dp: u16) -> Tuple {
        Tuple { proto: p, src: (ip(s), sp), dst: (ip(d), dp) }
    }

    /// Every checksum of the packet is right, recomputed from scratch.
    fn verify(pkt: &[u8]) {
        let s = SlicedPacket::from_ip(pkt).unwrap();
        let Some(etherparse::NetSlice::Ipv4(v4)) = &s.net else { panic!("not IPv4") };
        let h = v4.header();
        assert_eq!(csum::checksum(h.slice()), 0, "IPv4 header checksum");
        let hdr = h.to_header();
        match &s.transport {
            Some(TransportSlice::Tcp(t)) => {
                assert_eq!(
                    t.checksum(),
                    t.to_header().calc_checksum_ipv4(&hdr, t.payload()).unwrap(),
                    "TCP checksum"
                );
            }
            Some(TransportSlice::Udp(u)) => {
                assert_eq!(
                    u.checksum(),
                    u.to_header().calc_checksum_ipv4(&hdr, u.payload()).unwrap(),
                    "UDP checksum"
                );
            }
            Some(TransportSlice::Icmpv4(i)) => {
                let hl = h.slice().len();
                assert_eq!(csum::checksum(&pkt[hl..]), 0, "ICMP checksum {:?}", i.icmp_type());
            }
            _ => {}
        }
    }

    fn tcp(src: &str, sp: u16, dst: &str, dp: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(ip(src).octets(), ip(dst).octets(), 64)
            .tcp(sp, dp, 7, 1000)
            .syn()
            .write(&mut v, payload)
            .unwrap();
        v
    }

    #[test]
    fn tcp_and_udp_are_translated_both_ways_with_valid_checksums() {
        let mut p = tcp("10.65.0.2", 40000, "10.96.0.10", 80, b"hello");
        let (t, flags, k) = read(&p).unwrap();
        assert_eq!(t, tuple(6, "10.65.0.2", 40000, "10.96.0.10", 80));
        assert_eq!(flags, 0x02);
        let to = tuple(6, "10.65.0.2", 40000, "10.65.1.3", 8080);
        assert!(rewrite(&mut p, k, &to, false));
        verify(&p);
        assert_eq!(read(&p).unwrap().0, to);
        // The reply, translated back to the VIP.
        let mut r = tcp("10.65.1.3", 8080, "10.65.0.2", 40000, b"world!");
        let back = tuple(6, "10.96.0.10", 80, "10.65.0.2", 40000);
        assert!(rewrite(&mut r, Kind::Ports, &back, false));
        verify(&r);
        assert_eq!(read(&r).unwrap().0, back);

        let mut u = Vec::new();
        PacketBuilder::ipv4(ip("10.65.0.2").octets(), ip("198.51.100.7").octets(), 64)
            .udp(5353, 53)
            .write(&mut u, b"query")
            .unwrap();
        let to = tuple(17, "192.0.2.10", 61441, "198.51.100.7", 53);
        assert!(rewrite(&mut u, Kind::Ports, &to, false));
        verify(&u);
        // A UDP packet without a checksum keeps none.
        let hl = 20;
        u[hl + 6..hl + 8].fill(0);
        assert!(rewrite(
            &mut u,
            Kind::Ports,
            &tuple(17, "10.65.0.2", 5353, "198.51.100.7", 53),
            false
        ));
        assert_eq!(&u[hl + 6..hl + 8], &[0, 0]);
    }

    #[test]
    fn many_random_translations_keep_checksums_valid() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..500 {
            let len = (next() % 300) as usize;
            let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut p = tcp("10.65.0.2", next() as u16, "10.96.0.10", 80, &payload);
            let to = Tuple {
                proto: 6,
                src: (Ipv4Addr::from(next() as u32), next() as u16),
                dst: (Ipv4Addr::from(next() as u32), next() as u16),
            };
            assert!(rewrite(&mut p, Kind::Ports, &to, false));
            verify(&p);
        }
    }

    #[test]
    fn a_partial_checksum_stays_the_pseudo_header_sum() {
        let mut p = tcp("10.65.0.2", 40000, "10.96.0.10", 80, &[7u8; 1000]);
        let hl = 20;
        let pseudo = |p: &[u8]| {
            let l4 = (p.len() - hl) as u32;
            csum::fold(csum::sum(&p[12..20], 0) + 6 + l4)
        };
        let v = pseudo(&p);
        p[hl + 16..hl + 18].copy_from_slice(&v.to_be_bytes());
        let to = tuple(6, "10.65.0.2", 40000, "10.65.1.3", 8080);
        assert!(rewrite(&mut p, Kind::Ports, &to, true));
        assert_eq!(get16(&p, hl + 16), pseudo(&p), "field = new pseudo-header sum");
        // Finishing it as the kernel would gives a valid packet.
        let c = csum::checksum(&p[hl..]);
        p[hl + 16..hl + 18].copy_from_slice(&c.to_be_bytes());
        verify(&p);
    }

    #[test]
    fn sctp_gets_a_fresh_crc32c() {
        // SCTP common header + an INIT-like chunk.
        let mut v = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 132, 0, 0];
        v.extend_from_slice(&ip("10.65.0.2").octets());
        v.extend_from_slice(&ip("10.96.0.10").octets());
        v.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0]);
        v.extend_from_slice(&[1, 0, 0, 20, 1, 2, 3, 4, 0, 0, 0x10, 0, 0, 1, 0, 1, 5, 6, 7, 8]);
        let total = v.len() as u16;
        v[2..4].copy_from_slice(&total.to_be_bytes());
        let c = csum::checksum(&v[..20]);
        v[10..12].copy_from_slice(&c.to_be_bytes());
        let (t, _, k) = read(&v).unwrap();
        assert_eq!(t.dst, (ip("10.96.0.10"), 80));
        let to = tuple(132, "10.65.0.2", 40000, "10.65.1.3", 8080);
        assert!(rewrite(&mut v, k, &to, false));
        assert_eq!(csum::checksum(&v[..20]), 0);
        let mut z = v[20..].to_vec();
        let got = u32::from_le_bytes([z[8], z[9], z[10], z[11]]);
        z[8..12].fill(0);
        assert_eq!(got, crc32c::crc32c(&z));
        assert_eq!(read(&v).unwrap().0, to);
    }

    #[test]
    fn echo_identifiers_are_translated() {
        let mut v = Vec::new();
        PacketBuilder::ipv4(ip("10.65.0.2").octets(), ip("198.51.100.7").octets(), 64)
            .icmpv4_echo_request(0x1234, 1)
            .write(&mut v, b"ping")
            .unwrap();
        let (t, _, k) = read(&v).unwrap();
        assert_eq!((t.src.1, t.dst.1, k), (0x1234, 0, Kind::EchoRequest));
        let to = tuple(1, "192.0.2.10", 61500, "198.51.100.7", 0);
        assert!(rewrite(&mut v, k, &to, false));
        verify(&v);
        assert_eq!(read(&v).unwrap().0, to);
    }

    #[test]
    fn icmp_errors_are_translated_inside_and_out() {
        // The translated packet that met a router: 192.0.2.10:61441 -> X:53.
        let mut q = Vec::new();
        PacketBuilder::ipv4(ip("192.0.2.10").octets(), ip("198.51.100.7").octets(), 1)
            .udp(61441, 53)
            .write(&mut q, b"query-bytes")
            .unwrap();
        let mut e = Vec::new();
        PacketBuilder::ipv4(ip("203.0.113.1").octets(), ip("192.0.2.10").octets(), 64)
            .icmpv4_raw(11, 0, [0; 4])
            .write(&mut e, &q)
            .unwrap();
        let (t, _, k) = read(&e).unwrap();
        let Kind::IcmpError { quoted } = k else { panic!("{k:?}") };
        assert_eq!(quoted, tuple(17, "192.0.2.10", 61441, "198.51.100.7", 53));
        assert_eq!(t.src.0, ip("203.0.113.1"));
        // Back to the pod: outer destination and the quoted source.
        let outer = tuple(1, "203.0.113.1", 0, "10.65.0.2", 0);
        let inner = tuple(17, "10.65.0.2", 5353, "198.51.100.7", 53);
        assert!(rewrite(&mut e, k, &outer, false));
        assert!(rewrite_quoted(&mut e, &inner));
        verify(&e);
        // The quoted header's own checksums are right too.
        let qip = &e[28..];
        assert_eq!(csum::checksum(&qip[..20]), 0, "quoted IPv4 checksum");
        let (qt, _, _) = read_quoted(qip).unwrap();
        assert_eq!(qt, inner);
        let mut whole = qip.to_vec();
        let n = whole.len() as u16;
        whole[2..4].copy_from_slice(&n.to_be_bytes());
        let s = SlicedPacket::from_ip(&whole).unwrap();
        let (Some(etherparse::NetSlice::Ipv4(v4)), Some(TransportSlice::Udp(u))) =
            (&s.net, &s.transport)
        else {
            panic!()
        };
        assert_eq!(
            u.checksum(),
            u.to_header().calc_checksum_ipv4(&v4.header().to_header(), u.payload()).unwrap()
        );
    }

    #[test]
    fn malformed_input_never_panics() {
        let p = tcp("10.65.0.2", 40000, "10.96.0.10", 80, b"x");
        let to = tuple(6, "1.2.3.4", 1, "5.6.7.8", 2);
        for n in 0..p.len() {
            let mut c = p[..n].to_vec();
            if let Some((_, _, k)) = read(&c) {
                rewrite(&mut c, k, &to, false);
                rewrite_quoted(&mut c, &to);
            }
            rewrite(&mut c, Kind::Ports, &to, true);
            rewrite_quoted(&mut c, &to);
        }
        let mut x: u64 = 99;
        for _ in 0..2000 {
            x = super::super::maglev::mix(x);
            let len = (x % 80) as usize;
            let mut b: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if !b.is_empty() {
                b[0] = 0x45;
            }
            if let Some((_, _, k)) = read(&b) {
                rewrite(&mut b, k, &to, false);
            }
            rewrite_quoted(&mut b, &to);
        }
    }
}
