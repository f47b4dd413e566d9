//! Software offloads, for ports that cannot take a frame as it came:
//! finishing a partial checksum, and cutting a GSO frame (TCP over IPv4 or
//! IPv6, UDP with USO) into segments of at most `gso_size` payload bytes,
//! each with correct lengths, IDs, sequence numbers, flags and checksums.

use crate::csum;
use crate::frame::Frame;
use crate::port::TxCaps;
use crate::wire::GsoType;

/// Why a frame could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// headers of the GSO frame could not be parsed
    #[error("GSO frame headers could not be parsed")]
    BadHeaders,
    /// GSO type does not match the frame's protocol
    #[error("GSO type does not match the frame")]
    Mismatch,
    /// the partial checksum could not be finished
    #[error("partial checksum offsets outside the frame")]
    BadCsum,
}

/// Does `f` need software help before `caps` can take it?
#[inline]
pub fn needs_help(f: &Frame, caps: TxCaps) -> bool {
    let v = &f.vnet;
    (v.needs_csum() && !caps.csum)
        || match v.gso_type {
            GsoType::None => false,
            GsoType::TcpV4 => !caps.tso4,
            GsoType::TcpV6 => !caps.tso6,
            GsoType::UdpL4 | GsoType::Udp => !caps.uso,
        }
}

/// Make `f` acceptable to a port with `caps`. A frame that needs no cutting
/// is fixed in place and `Ok(false)` returned; a GSO frame the port cannot
/// take is cut into `out` (appended) and `Ok(true)` returned, meaning `f`
/// itself must not be sent.
pub fn prepare(f: &mut Frame, caps: TxCaps, out: &mut Vec<Frame>) -> Result<bool, GsoError> {
    if f.vnet.is_gso() && needs_help(f, caps) {
        segment(f, out)?;
        return Ok(true);
    }
    if f.vnet.needs_csum() && !caps.csum {
        let mut v = f.vnet;
        csum::finish_partial(f.data_mut(), &mut v).map_err(|_| GsoError::BadCsum)?;
        f.vnet = v;
    }
    Ok(false)
}

struct Layout {
    l3: usize,
    l4: usize,
    payload: usize,
    v4: bool,
    tcp: bool,
}

fn layout(d: &[u8], gso: GsoType) -> Result<Layout, GsoError> {
    let l3 = crate::pipeline::ETH_LEN;
    if d.len() < l3 {
        return Err(GsoError::BadHeaders);
    }
    let et = u16::from_be_bytes([d[12], d[13]]);
    let (v4, l4, proto) = match et {
        crate::pipeline::ETHERTYPE_IPV4 => {
            let h = etherparse::Ipv4HeaderSlice::from_slice(&d[l3..])
                .map_err(|_| GsoError::BadHeaders)?;
            (true, l3 + h.slice().len(), h.protocol().0)
        }
        crate::pipeline::ETHERTYPE_IPV6 => {
            let h = etherparse::Ipv6HeaderSlice::from_slice(&d[l3..])
                .map_err(|_| GsoError::BadHeaders)?;
            (false, l3 + 40, h.next_header().0)
        }
        _ => return Err(GsoError::BadHeaders),
    };
    let tcp = match (gso, proto) {
        (GsoType::TcpV4, 6) if v4 => true,
        (GsoType::TcpV6, 6) if !v4 => true,
        (GsoType::UdpL4 | GsoType::Udp, 17) => false,
        _ => return Err(GsoError::Mismatch),
    };
    let payload = if tcp {
        let h = etherparse::TcpHeaderSlice::from_slice(d.get(l4..).ok_or(GsoError::BadHeaders)?)
            .map_err(|_| GsoError::BadHeaders)?;
        l4 + h.slice().len()
    } else {
        l4 + 8
    };
    if payload > d.len() {
        return Err(GsoError::BadHeaders);
    }
    Ok(Layout { l3, l4, payload, v4, tcp })
}

/// How a GSO frame splits into segments, computed once: each segment's
/// headers are derived from the frame's (lengths, IP ID, sequence number,
/// flags, checksums) and its payload is a slice of the frame's, so a port
/// can send segments by scatter-gather without copying the payload.
pub struct Plan {
    lay: Layout,
    mss: usize,
    n: usize,
    ip_id: u16,
    seq0: u32,
    flags0: u8,
}

impl Plan {
    pub fn new(f: &Frame) -> Result<Plan, GsoError> {
        let d = f.data();
        let lay = layout(d, f.vnet.gso_type)?;
        let mss = usize::from(f.vnet.gso_size).max(1);
        let n = (d.len() - lay.payload).div_ceil(mss).max(1);
        let ip_id = if lay.v4 { u16::from_be_bytes([d[lay.l3 + 4], d[lay.l3 + 5]]) } else { 0 };
        let (seq0, flags0) = if lay.tcp {
            let s = &d[lay.l4 + 4..lay.l4 + 8];
            (u32::from_be_bytes([s[0], s[1], s[2], s[3]]), d[lay.l4 + 13])
        } else {
            (0, 0)
        };
        Ok(Plan { lay, mss, n, ip_id, seq0, flags0 })
    }

    /// Number of segments.
    pub fn count(&self) -> usize {
        self.n
    }

    /// Length of every segment's headers (Ethernet to L4).
    pub fn header_len(&self) -> usize {
        self.lay.payload
    }

    /// Byte range of segment `i`'s payload in the frame.
    pub fn payload(&self, f: &Frame, i: usize) -> std::ops::Range<usize> {
        let start = self.lay.payload + i * self.mss;
        start..(start + self.mss).min(f.len())
    }

    /// Write segment `i`'s headers into `hdr` (`header_len()` bytes),
    /// checksums included.
    pub fn headers(&self, f: &Frame, i: usize, hdr: &mut [u8]) {
        let lay = &self.lay;
        let d = f.data();
        let pl = self.payload(f, i);
        let payload = &d[pl.clone()];
        let hdr = &mut hdr[..lay.payload];
        hdr.copy_from_slice(&d[..lay.payload]);
        let last = i + 1 == self.n;
        let seg_len = lay.payload + payload.len();
        if lay.v4 {
            let l3_len = (seg_len - lay.l3) as u16;
            hdr[lay.l3 + 2..lay.l3 + 4].copy_from_slice(&l3_len.to_be_bytes());
            hdr[lay.l3 + 4..lay.l3 + 6]
                .copy_from_slice(&self.ip_id.wrapping_add(i as u16).to_be_bytes());
            hdr[lay.l3 + 10..lay.l3 + 12].fill(0);
            let c = csum::checksum(&hdr[lay.l3..lay.l4]);
            hdr[lay.l3 + 10..lay.l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            let pl = (seg_len - lay.l4) as u16;
            hdr[lay.l3 + 4..lay.l3 + 6].copy_from_slice(&pl.to_be_bytes());
        }
        let l4_len = seg_len - lay.l4;
        let at = if lay.tcp {
            let seq = self.seq0.wrapping_add((i * self.mss) as u32);
            hdr[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let mut fl = self.flags0;
            if !last {
                fl &= !(0x01 | 0x08); // FIN, PSH only on the last segment
            }
            if i > 0 {
                fl &= !0x80; // CWR only on the first
            }
            hdr[lay.l4 + 13] = fl;
            lay.l4 + 16
        } else {
            hdr[lay.l4 + 4..lay.l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            lay.l4 + 6
        };
        hdr[at..at + 2].fill(0);
        let proto: u32 = if lay.tcp { 6 } else { 17 };
        let mut acc = if lay.v4 {
            csum::sum(&hdr[lay.l3 + 12..lay.l3 + 20], 0)
        } else {
            csum::sum(&hdr[lay.l3 + 8..lay.l3 + 40], 0)
        };
        acc = acc.wrapping_add(proto).wrapping_add(l4_len as u32);
        acc = csum::sum(&hdr[lay.l4..], acc);
        // The L4 header has even length, so the payload sums on from here.
        let c = !csum::fold(csum::sum(payload, acc));
        let c = if !lay.tcp && c == 0 { 0xffff } else { c };
        hdr[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// Room for one packet's rewritten headers (see [`Wire`]).
pub const SLOT: usize = 192;

/// A frame as the packets it puts on the wire, without copying payloads:
/// a plain frame is one packet as it is; a frame with a partial checksum
/// gets its headers (up to the checksum field) rewritten with the checksum
/// finished; a TCP/IPv4 GSO frame becomes its segments, each a rewritten
/// header and a slice of the frame's payload. The ports that build packets
/// themselves (the tunnel sockets' scatter-gather, the AF_XDP uplink's
/// buffers) share it.
pub enum Wire {
    Plain,
    Partial { field_end: usize, start: usize },
    Gso(Plan),
}

impl Wire {
    /// How `f` goes on the wire; `None` for what no port built on this can
    /// carry (GSO other than TCP/IPv4, inconsistent offsets, headers longer
    /// than [`SLOT`]).
    pub fn of(f: &Frame) -> Option<Wire> {
        let v = &f.vnet;
        if v.is_gso() {
            if v.gso_type != GsoType::TcpV4 {
                return None;
            }
            let plan = Plan::new(f).ok()?;
            return (plan.header_len() <= SLOT).then_some(Wire::Gso(plan));
        }
        if v.needs_csum() {
            let start = usize::from(v.csum_start);
            let field_end = start + usize::from(v.csum_offset) + 2;
            if field_end > f.len() || field_end > SLOT || (field_end - start) % 2 != 0 {
                return None;
            }
            return Some(Wire::Partial { field_end, start });
        }
        Some(Wire::Plain)
    }

    /// Number of packets.
    pub fn count(&self) -> usize {
        match self {
            Wire::Gso(p) => p.count(),
            _ => 1,
        }
    }

    /// Packet `i`'s shape: the length of its (rewritten) headers, and the
    /// range of the frame that follows them. Packet 0 is the longest.
    pub fn shape(&self, f: &Frame, i: usize) -> (usize, std::ops::Range<usize>) {
        match self {
            Wire::Plain => (0, 0..f.len()),
            Wire::Partial { field_end, .. } => (*field_end, *field_end..f.len()),
            Wire::Gso(plan) => (plan.header_len(), plan.payload(f, i)),
        }
    }

    /// Write packet `i`'s headers into `slot` (at least the length
    /// [`Wire::shape`] gives).
    pub fn write(&self, f: &Frame, i: usize, slot: &mut [u8]) {
        match self {
            Wire::Plain => {}
            Wire::Partial { field_end, start } => {
                let d = f.data();
                slot[..*field_end].copy_from_slice(&d[..*field_end]);
                let acc = csum::sum(&slot[*start..*field_end], 0);
                let c = !csum::fold(csum::sum(&d[*field_end..], acc));
                slot[field_end - 2..*field_end].copy_from_slice(&c.to_be_bytes());
            }
            Wire::Gso(plan) => plan.headers(f, i, slot),
        }
    }
}

/// Cut GSO frame `f` into complete segments appended to `out`.
pub fn segment(f: &Frame, out: &mut Vec<Frame>) -> Result<(), GsoError> {
    let plan = Plan::new(f)?;
    let h = plan.header_len();
    for i in 0..plan.count() {
        let pl = plan.payload(f, i);
        let mut s = Frame::with_capacity(h + pl.len());
        s.resize(h + pl.len());
        plan.headers(f, i, &mut s.data_mut()[..h]);
        s.data_mut()[h..].copy_from_slice(&f.data()[pl]);
        // Each segment goes where the frame was going (the tunnel peer).
        s.meta = f.meta;
        out.push(s);
    }
    Ok(())
}

/// A TCP/IPv4 GSO frame as a pod's TAP hands it over (partial checksum
/// holding the pseudo-header sum): for the ports' tests.
#[cfg(test)]
pub(crate) fn sample_tcp4_gso(payload_len: usize, mss: u16) -> Frame {
    use crate::wire::vnet::F_NEEDS_CSUM;
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 13 + 1) as u8).collect();
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([0x66, 0, 0, 0, 0, 2], [0x66, 0, 0, 0, 0, 1])
        .ipv4([10, 65, 0, 2], [10, 65, 1, 3], 63)
        .tcp(40000, 5201, 1000, 64000)
        .ack(5)
        .psh()
        .write(&mut v, &payload)
        .unwrap();
    let mut f = Frame::new();
    f.set_data(&v);
    f.vnet.flags = F_NEEDS_CSUM;
    f.vnet.gso_type = GsoType::TcpV4;
    f.vnet.gso_size = mss;
    f.vnet.csum_start = 34;
    f.vnet.csum_offset = 16;
    let tcp_len = (v.len() - 34) as u32;
    let acc = csum::sum(&v[26..34], 0) + 6 + tcp_len;
    f.data_mut()[50..52].copy_from_slice(&csum::fold(acc).to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::vnet::F_NEEDS_CSUM;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn tcp_gso(payload_len: usize, mss: u16, v6: bool) -> Frame {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7) as u8).collect();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [0xee; 6]);
        let b = if v6 {
            b.ipv6([0xfd; 16], [0xfe; 16], 64)
        } else {
            b.ipv4([10, 65, 0, 2], [10, 65, 0, 3], 64)
        };
        let b = b.tcp(40000, 5201, 1000, 64000).psh().ack(77);
        let mut v = Vec::new();
        b.write(&mut v, &payload).unwrap();
        let mut f = Frame::from_bytes(&v);
        let l4 = if v6 { 54 } else { 34 };
        f.vnet.flags = F_NEEDS_CSUM;
        f.vnet.gso_type = if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
        f.vnet.gso_size = mss;
        f.vnet.csum_start = l4 as u16;
        f.vnet.csum_offset = 16;
        f.vnet.hdr_len = (l4 + 20) as u16;
        f
    }

    fn check_segments(segs: &[Frame], payload_len: usize, mss: usize) {
        assert_eq!(segs.len(), payload_len.div_ceil(mss));
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let p = SlicedPacket::from_ethernet(s.data()).unwrap();
            let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("not tcp") };
            let expect = match &p.net {
                Some(etherparse::NetSlice::Ipv4(ip)) => {
                    assert_eq!(csum::checksum(ip.header().slice()), 0);
                    t.to_header().calc_checksum_ipv4(&ip.header().to_header(), t.payload()).unwrap()
                }
                Some(etherparse::NetSlice::Ipv6(ip)) => {
                    t.to_header().calc_checksum_ipv6(&ip.header().to_header(), t.payload()).unwrap()
                }
                _ => panic!(),
            };
            assert_eq!(t.checksum(), expect, "segment {i} checksum");
            assert_eq!(t.sequence_number(), 1000 + (i * mss) as u32);
            assert_eq!(t.psh(), i + 1 == segs.len(), "PSH only on the last");
            assert!(t.payload().len() <= mss);
            joined.extend_from_slice(t.payload());
        }
        let want: Vec<u8> = (0..payload_len).map(|i| (i * 7) as u8).collect();
        assert_eq!(joined, want);
    }

    #[test]
    fn tcp4_segmentation() {
        let mut f = tcp_gso(10_000, 1448, false);
        f.meta.peer = Some([192, 0, 2, 12].into());
        f.meta.flow_hash = 77;
        let mut out = Vec::new();
        assert!(prepare(&mut f, TxCaps::NONE, &mut out).unwrap());
        check_segments(&out, 10_000, 1448);
        assert!(out.iter().all(|s| s.meta == f.meta), "segments keep the tunnel peer");
    }

    #[test]
    fn tcp6_segmentation_of_64k() {
        let f = tcp_gso(65_000, 1440, true);
        let mut out = Vec::new();
        segment(&f, &mut out).unwrap();
        check_segments(&out, 65_000, 1440);
    }

    #[test]
    fn udp_uso_segmentation() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [0xee; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2)
            .write(&mut v, &payload)
            .unwrap();
        let mut f = Frame::from_bytes(&v);
        f.vnet = crate::wire::VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GsoType::UdpL4,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        let mut out = Vec::new();
        segment(&f, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        for s in &out {
            let p = SlicedPacket::from_ethernet(s.data()).unwrap();
            let Some(TransportSlice::Udp(u)) = p.transport else { panic!() };
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!() };
            assert_eq!(u.payload().len(), 1000);
            assert_eq!(
                u.checksum(),
                u.to_header().calc_checksum_ipv4(&ip.header().to_header(), u.payload()).unwrap()
            );
        }
    }

    #[test]
    fn partial_checksum_is_finished_in_place() {
        // One segment's worth: not GSO, only NEEDS_CSUM with the pseudo sum.
        let mut f = tcp_gso(100, 1448, false);
        f.vnet.gso_type = GsoType::None;
        f.vnet.gso_size = 0;
        // Replace the full checksum with the pseudo-header sum, as the kernel does.
        let d = f.data().to_vec();
        let mut acc = csum::sum(&d[26..34], 0);
        acc = acc.wrapping_add(6).wrapping_add((d.len() - 34) as u32);
        let pseudo = csum::fold(acc);
        let full = u16::from_be_bytes([d[50], d[51]]);
        f.data_mut()[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let mut out = Vec::new();
        assert!(!prepare(&mut f, TxCaps::NONE, &mut out).unwrap());
        assert!(out.is_empty());
        assert_eq!(u16::from_be_bytes([f.data()[50], f.data()[51]]), full);
        assert!(!f.vnet.needs_csum());
    }

    #[test]
    fn mismatched_or_truncated_gso_is_an_error() {
        let mut f = tcp_gso(3000, 1448, false);
        f.vnet.gso_type = GsoType::TcpV6;
        assert_eq!(segment(&f, &mut Vec::new()), Err(GsoError::Mismatch));
        let g = tcp_gso(3000, 1448, false);
        for len in [0, 10, 20, 40, 50] {
            let mut t = Frame::from_bytes(&g.data()[..len]);
            t.vnet = g.vnet;
            assert!(segment(&t, &mut Vec::new()).is_err(), "len {len}");
        }
    }

    #[test]
    fn caps_decide_what_needs_help() {
        let f = tcp_gso(3000, 1448, false);
        assert!(!needs_help(&f, TxCaps::ALL));
        assert!(needs_help(&f, TxCaps::NONE));
        assert!(needs_help(&f, TxCaps { tso4: false, ..TxCaps::ALL }));
        assert!(!needs_help(&f, TxCaps { tso6: false, ..TxCaps::ALL }));
    }
}
