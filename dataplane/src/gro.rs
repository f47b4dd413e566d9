//! Receive coalescing (GRO) for TCP over IPv4: consecutive in-order
//! segments of one flow, on their way to one port that takes GSO frames (a
//! pod's TAP), are merged into a single GSO frame. The kernel behind the TAP
//! then handles one 64 KiB packet instead of forty-five: this is what makes
//! a tunnel, which delivers MTU-sized segments, as fast as a path that
//! carries GSO frames end to end.
//!
//! The rules are the kernel's (`tcp_gro_receive`): same addresses, ports,
//! TOS, TTL and DF; no IP options; same ACK number, window and TCP options;
//! sequence numbers contiguous; only ACK and PSH flags (PSH closes the
//! frame); every segment but the last exactly `mss` bytes of payload. Each
//! segment's TCP checksum is verified before it is merged (a merged frame
//! leaves with a partial checksum, which nobody checks again); a segment
//! that fails stays on its own and the receiver drops it. A segment that
//! arrived with a partial checksum (see `pipeline::tunnel`) is merged as
//! it is: its sender's kernel asked for it to be trusted.

use crate::csum;
use crate::frame::Frame;
use crate::pipeline::{ETHERTYPE_IPV4, ETH_LEN};
use crate::wire::vnet::F_NEEDS_CSUM;
use crate::wire::{GsoType, VnetHdr};

const PROTO_TCP: u8 = 6;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Largest IPv4 packet a merged frame may become.
const MAX_IP_LEN: usize = 65_535;

/// What a segment looks like, for merging.
#[derive(Clone, Copy)]
struct Seg {
    /// Offset of the TCP header and of the payload.
    l4: usize,
    payload: usize,
    /// Payload length.
    len: usize,
    seq: u32,
    flags: u8,
}

/// A plain (non-GSO, complete) TCP/IPv4 segment with payload, without IP
/// options or fragmentation, whose checksum verifies.
fn parse(f: &Frame) -> Option<Seg> {
    if f.vnet.is_gso() {
        return None;
    }
    let d = f.data();
    if d.len() < ETH_LEN + 40 || u16::from_be_bytes([d[12], d[13]]) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &d[ETH_LEN..];
    if ip[0] != 0x45 || ip[9] != PROTO_TCP {
        return None;
    }
    // Not a fragment (MF clear, offset 0); DF may be either.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total > ip.len() || total < 40 {
        return None;
    }
    let l4 = ETH_LEN + 20;
    let thl = usize::from(d[l4 + 12] >> 4) * 4;
    let payload = l4 + thl;
    let end = ETH_LEN + total;
    if thl < 20 || payload >= end {
        return None;
    }
    let flags = d[l4 + 13];
    if flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    if f.vnet.needs_csum() {
        // A partial checksum (the sender's kernel meant the receiver to
        // trust it): nothing to verify, but it must be where TCP's is.
        if usize::from(f.vnet.csum_start) != l4 || f.vnet.csum_offset != 16 {
            return None;
        }
    } else {
        // The checksum, over the pseudo-header and the segment.
        let mut acc = csum::sum(&ip[12..20], 0);
        acc = acc.wrapping_add(u32::from(PROTO_TCP)).wrapping_add((end - l4) as u32);
        if csum::fold(csum::sum(&d[l4..end], acc)) != 0xffff {
            return None;
        }
    }
    let seq = u32::from_be_bytes([d[l4 + 4], d[l4 + 5], d[l4 + 6], d[l4 + 7]]);
    Some(Seg { l4, payload, len: end - payload, seq, flags })
}

/// May `b` follow `a` (already holding `a_len` payload bytes from `a_seq`)?
fn follows(a: &[u8], sa: &Seg, a_len: usize, b: &[u8], sb: &Seg) -> bool {
    let (ia, ib) = (&a[ETH_LEN..], &b[ETH_LEN..]);
    // TOS, DF, TTL, protocol, addresses.
    ia[1] == ib[1]
        && ia[6] & 0x40 == ib[6] & 0x40
        && ia[8] == ib[8]
        && ia[12..20] == ib[12..20]
        // Ports; ACK number; header length, window; options.
        && sa.l4 == sb.l4
        && a[sa.l4..sa.l4 + 4] == b[sb.l4..sb.l4 + 4]
        && a[sa.l4 + 8..sa.l4 + 13] == b[sb.l4 + 8..sb.l4 + 13]
        && a[sa.l4 + 14..sa.l4 + 16] == b[sb.l4 + 14..sb.l4 + 16]
        && a[sa.l4 + 20..sa.payload] == b[sb.l4 + 20..sb.payload]
        && sb.seq == sa.seq.wrapping_add(a_len as u32)
}

/// Coalesce the frames of `sel` (indices into `frames`, in order, all bound
/// for one GSO-capable port). Merged segments are removed from `sel`; the
/// frames they merged into become GSO frames. Returns how many segments
/// were merged away.
pub fn coalesce(frames: &mut [Frame], sel: &mut Vec<u16>) -> usize {
    if sel.len() < 2 {
        return 0;
    }
    let mut keep: Vec<u16> = Vec::with_capacity(sel.len());
    // The frame being built: its index, first segment, payload so far,
    // segments merged, and whether it may still grow.
    let mut open: Option<(usize, Seg, usize, u16)> = None;
    let mut merged = 0;
    for &i in sel.iter() {
        let i = usize::from(i);
        let seg = parse(&frames[i]);
        if let (Some((o, first, len, n)), Some(s)) = (open, seg) {
            let (a, b) = pair(frames, o, i);
            let mss = first.len;
            let fits = first.payload + len + s.len <= ETH_LEN + MAX_IP_LEN
                && s.len <= mss
                && a.tailroom() >= s.len
                && first.flags & TCP_PSH == 0;
            if fits && follows(a.data(), &first, len, b.data(), &s) {
                let at = a.len();
                if a.resize(at + s.len) {
                    a.data_mut()[at..].copy_from_slice(&b.data()[s.payload..s.payload + s.len]);
                    let mut first = first;
                    first.flags |= s.flags & TCP_PSH;
                    merged += 1;
                    // Only a full-sized segment lets the frame grow further.
                    open = (s.len == mss && first.flags & TCP_PSH == 0).then_some((
                        o,
                        first,
                        len + s.len,
                        n + 1,
                    ));
                    if open.is_none() {
                        finish(a, &first, len + s.len, n + 1);
                    }
                    continue;
                }
            }
        }
        if let Some((o, first, len, n)) = open.take() {
            finish(&mut frames[o], &first, len, n);
        }
        keep.push(i as u16);
        open = seg.map(|s| (i, s, s.len, 1));
    }
    if let Some((o, first, len, n)) = open {
        finish(&mut frames[o], &first, len, n);
    }
    *sel = keep;
    merged
}

/// Two distinct frames of the slice, mutably and immutably.
fn pair(frames: &mut [Frame], a: usize, b: usize) -> (&mut Frame, &Frame) {
    debug_assert_ne!(a, b);
    if a < b {
        let (x, y) = frames.split_at_mut(b);
        (&mut x[a], &y[0])
    } else {
        let (x, y) = frames.split_at_mut(a);
        (&mut y[0], &x[b])
    }
}

/// Make a frame that absorbed `n` segments (`len` payload bytes) a GSO
/// frame: IP length and checksum, PSH, partial TCP checksum, vnet header.
fn finish(f: &mut Frame, first: &Seg, len: usize, n: u16) {
    if n < 2 {
        return;
    }
    let d = f.data_mut();
    let ip_len = (first.payload - ETH_LEN + len) as u16;
    let ip = &mut d[ETH_LEN..];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[10..12].fill(0);
    let c = csum::checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let l4 = first.l4;
    d[l4 + 13] = first.flags;
    // A partial checksum holds the pseudo-header sum (with the length).
    let tcp_len = (first.payload - l4 + len) as u32;
    let acc = csum::sum(&d[ETH_LEN + 12..ETH_LEN + 20], 0) + u32::from(PROTO_TCP) + tcp_len;
    let pseudo = csum::fold(acc);
    d[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    f.vnet = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        ecn: false,
        hdr_len: first.payload as u16,
        gso_size: first.len as u16,
        csum_start: l4 as u16,
        csum_offset: 16,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gso;
    use crate::port::TxCaps;
    use etherparse::PacketBuilder;

    fn seg(seq: u32, payload: &[u8], psh: bool, dport: u16) -> Frame {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 65, 0, 2], [10, 65, 1, 3], 63)
            .tcp(40000, dport, seq, 5000)
            .ack(99);
        let b = if psh { b.psh() } else { b };
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        let mut f = Frame::new();
        f.set_data(&v);
        f
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// Cut `payload` into MSS-sized segments, as a sender would.
    fn segments(payload: &[u8], mss: usize, seq0: u32) -> Vec<Frame> {
        let n = payload.chunks(mss).count();
        payload
            .chunks(mss)
            .enumerate()
            .map(|(i, c)| seg(seq0 + (i * mss) as u32, c, i + 1 == n, 80))
            .collect()
    }

    #[test]
    fn in_order_segments_become_one_gso_frame_that_segments_back_identically() {
        let payload = data(10 * 1400 + 321);
        let mut frames = segments(&payload, 1400, 1000);
        let originals: Vec<Vec<u8>> = frames.iter().map(|f| f.data().to_vec()).collect();
        let mut sel: Vec<u16> = (0..frames.len() as u16).collect();
        assert_eq!(coalesce(&mut frames, &mut sel), 10);
        assert_eq!(sel, [0]);
        let f = &mut frames[0];
        assert_eq!(f.vnet.gso_type, GsoType::TcpV4);
        assert_eq!(f.vnet.gso_size, 1400);
        assert_eq!(f.len(), 54 + payload.len());
        assert_eq!(&f.data()[54..], &payload[..]);
        // Software GSO of the merged frame gives back the original segments
        // (but for the IP ID, which the sender numbered its own way).
        let mut out = Vec::new();
        assert!(gso::prepare(f, TxCaps::NONE, &mut out).unwrap());
        assert_eq!(out.len(), originals.len());
        for (s, o) in out.iter().zip(&originals) {
            let (mut a, mut b) = (s.data().to_vec(), o.clone());
            for x in [&mut a, &mut b] {
                x[ETH_LEN + 4..ETH_LEN + 6].fill(0);
                x[ETH_LEN + 10..ETH_LEN + 12].fill(0);
            }
            assert_eq!(a, b);
        }
    }

    #[test]
    fn gaps_other_flows_bad_checksums_and_flags_are_not_merged() {
        let p = data(1000);
        // A gap in the sequence.
        let mut frames = vec![seg(0, &p, false, 80), seg(2000, &p, false, 80)];
        let mut sel = vec![0, 1];
        assert_eq!(coalesce(&mut frames, &mut sel), 0);
        assert_eq!(sel, [0, 1]);
        assert!(!frames[0].vnet.is_gso());
        // Another flow in between stops the run; the flows each merge alone.
        let mut frames = vec![
            seg(0, &p, false, 80),
            seg(1000, &p, false, 80),
            seg(0, &p, false, 81),
            seg(2000, &p, false, 80),
        ];
        let mut sel = vec![0, 1, 2, 3];
        assert_eq!(coalesce(&mut frames, &mut sel), 1);
        assert_eq!(sel, [0, 2, 3]);
        // A corrupted segment is not merged (and not fixed either).
        let mut frames = vec![seg(0, &p, false, 80), seg(1000, &p, false, 80)];
        let n = frames[1].len();
        frames[1].data_mut()[n - 1] ^= 0xff;
        let mut sel = vec![0, 1];
        assert_eq!(coalesce(&mut frames, &mut sel), 0);
        // PSH closes a frame; a short segment too.
        let mut frames =
            vec![seg(0, &p, true, 80), seg(1000, &p, false, 80), seg(2000, &p[..10], false, 80)];
        let mut sel = vec![0, 1, 2];
        assert_eq!(coalesce(&mut frames, &mut sel), 1);
        assert_eq!(sel, [0, 1]);
        assert!(!frames[0].vnet.is_gso());
        assert!(frames[1].vnet.is_gso());
        // A larger segment after a smaller first one is not merged.
        let mut frames = vec![seg(0, &p[..500], false, 80), seg(500, &p, false, 80)];
        let mut sel = vec![0, 1];
        assert_eq!(coalesce(&mut frames, &mut sel), 0);
    }

    #[test]
    fn segments_with_partial_checksums_merge_without_verification() {
        let p = data(1000);
        let mut frames = vec![seg(0, &p, false, 80), seg(1000, &p, false, 80)];
        for f in &mut frames {
            // What the pipeline marks: a partial checksum at TCP's field.
            f.data_mut()[50..52].copy_from_slice(&[0x12, 0x34]);
            f.vnet.flags = F_NEEDS_CSUM;
            f.vnet.csum_start = 34;
            f.vnet.csum_offset = 16;
        }
        let mut sel = vec![0, 1];
        assert_eq!(coalesce(&mut frames, &mut sel), 1);
        assert!(frames[0].vnet.is_gso());
        // Elsewhere than TCP's checksum field: not merged.
        let mut frames = vec![seg(0, &p, false, 80), seg(1000, &p, false, 80)];
        frames[1].vnet.flags = F_NEEDS_CSUM;
        frames[1].vnet.csum_start = 30;
        let mut sel = vec![0, 1];
        assert_eq!(coalesce(&mut frames, &mut sel), 0);
    }

    #[test]
    fn merged_frames_stay_within_one_ip_packet() {
        let payload = data(60 * 1400);
        let mut frames = segments(&payload, 1400, 7);
        let mut sel: Vec<u16> = (0..frames.len() as u16).collect();
        coalesce(&mut frames, &mut sel);
        assert!(sel.len() >= 2);
        let mut total = 0;
        for &i in &sel {
            let f = &frames[usize::from(i)];
            assert!(f.len() - ETH_LEN <= MAX_IP_LEN);
            total += f.len() - 54;
        }
        assert_eq!(total, payload.len());
    }
}
