//! Frames from the underlay: check that a tunnel packet comes from a known
//! node and is for a pod of this node, strip the tunnel header, and hand
//! the inner packet to IPv4 forwarding. Ocelot is never an open relay: a
//! decapsulated packet for anything but a local pod is dropped.
//!
//! What a tunnel port delivers (see `port::tunnel`): for VXLAN, the UDP
//! payload (VXLAN header and inner Ethernet frame); for IPIP, the whole
//! outer IPv4 packet. The sender's underlay address is in `meta.peer`. The
//! AF_XDP uplink port (`port::xdp`) delivers the same, after checking and
//! stripping the outer headers, with the encapsulation in `meta.encap`.

use super::{ipv4, Ctx, Verdict, ETHERTYPE_IPV4, ETH_LEN};
use crate::counters::DropReason;
use crate::csum;
use crate::frame::Frame;
use crate::tables::{Encap, Hop, PortKind};
use crate::wire::{vxlan, MacAddr};
use std::net::IpAddr;

/// IP protocol number of IP in IP.
pub const PROTO_IPIP: u8 = 4;

pub(super) fn receive(ctx: &Ctx<'_>, encap: Encap, f: &mut Frame) -> Verdict {
    let o = &ctx.tables.overlay;
    let Some(peer) = f.meta.peer else {
        return Verdict::Drop(DropReason::TunnelUnknownPeer);
    };
    if o.node_at(peer).is_none() {
        return Verdict::Drop(DropReason::TunnelUnknownPeer);
    }
    match encap {
        Encap::Vxlan => {
            match vxlan::parse_header(f.data()) {
                Ok(vni) if vni == o.vni => {}
                Ok(_) => return Verdict::Drop(DropReason::TunnelWrongVni),
                Err(_) => return Verdict::Drop(DropReason::TunnelMalformed),
            }
            f.pull(vxlan::HEADER_LEN);
            let d = f.data();
            if d.len() < ETH_LEN || u16::from_be_bytes([d[12], d[13]]) != ETHERTYPE_IPV4 {
                return Verdict::Drop(DropReason::TunnelMalformed);
            }
            // The inner frame is addressed to our VTEP (a kernel VTEP drops
            // anything else too).
            if d[..6] != o.vtep_mac.0 {
                return Verdict::Drop(DropReason::NotForUs);
            }
        }
        Encap::Ipip => {
            let d = f.data();
            let Ok(h) = etherparse::Ipv4HeaderSlice::from_slice(d) else {
                return Verdict::Drop(DropReason::TunnelMalformed);
            };
            if h.protocol().0 != PROTO_IPIP
                || usize::from(h.total_len()) > d.len()
                || h.is_fragmenting_payload()
            {
                return Verdict::Drop(DropReason::TunnelMalformed);
            }
            let hl = h.slice().len();
            let inner_len = usize::from(h.total_len()) - hl;
            f.pull(hl);
            // IP in IP carries IPv4 only.
            if !f.resize(inner_len) || f.data().first().map(|b| b >> 4) != Some(4) {
                return Verdict::Drop(DropReason::TunnelMalformed);
            }
            let Some(eth) = f.push(ETH_LEN) else {
                return Verdict::Drop(DropReason::TunnelMalformed);
            };
            eth[..6].copy_from_slice(&o.vtep_mac.0);
            eth[6..12].copy_from_slice(&MacAddr::BROADCAST.0);
            eth[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        }
        Encap::Native => return Verdict::Drop(DropReason::TunnelMalformed),
    }
    // Only for a pod of this node.
    let d = f.data();
    let Some(dst) = d.get(ETH_LEN + 16..ETH_LEN + 20) else {
        return Verdict::Drop(DropReason::TunnelMalformed);
    };
    let dst = IpAddr::V4(std::net::Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]));
    match ctx.tables.route(dst) {
        Hop::Local(p) if ctx.tables.port(p).is_some_and(|e| e.kind == PortKind::Pod) => {}
        _ => return Verdict::Drop(DropReason::TunnelNotLocal),
    }
    mark_partial_checksum(f);
    ipv4::forward(ctx, f)
}

/// A kernel VTEP whose device offloads checksums, on a virtual underlay
/// (veth), sends inner TCP/UDP packets whose checksum field still holds
/// only the pseudo-header sum: the offload was never carried out, and the
/// kernel's own VXLAN receiver knows that from the packet's metadata, which
/// a socket does not hand us. Such a packet is recognised by exactly that
/// field value and passed on marked as partial (`NEEDS_CSUM`), as the
/// sending kernel meant it; the pod's kernel then treats it as the sender's
/// own kernel would have. Any other value is left alone (a wrong checksum
/// is the receiver's to drop).
fn mark_partial_checksum(f: &mut Frame) {
    use crate::wire::vnet::F_NEEDS_CSUM;
    let d = f.data();
    if f.vnet.needs_csum() || d.len() < ETH_LEN + 20 {
        return;
    }
    let ip = &d[ETH_LEN..];
    let hl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // Not for fragments: the checksum covers the whole datagram.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 || hl < 20 || total > ip.len() {
        return;
    }
    let field = match ip[9] {
        6 => 16,
        17 => 6,
        _ => return,
    };
    let Some(c) = ip.get(hl + field..hl + field + 2) else { return };
    let c = u16::from_be_bytes([c[0], c[1]]);
    let l4_len = total.saturating_sub(hl) as u32;
    let acc = csum::sum(&ip[12..20], 0) + u32::from(ip[9]) + l4_len;
    if c != 0 && c == csum::fold(acc) {
        f.vnet.flags |= F_NEEDS_CSUM;
        f.vnet.csum_start = (ETH_LEN + hl) as u16;
        f.vnet.csum_offset = field as u16;
    }
}
