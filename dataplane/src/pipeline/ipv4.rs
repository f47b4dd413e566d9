//! IPv4 forwarding: validate, route by longest prefix, check the path MTU
//! of a tunnel, decrement the TTL with an incremental checksum update,
//! rewrite the Ethernet addresses (to the peer's, or to the VTEPs' for a
//! tunnel) and, for a tunnel, name the underlay peer and the encapsulation
//! in the frame's meta.

use super::{flow, icmp, nat, set_macs, Ctx, Verdict, ETH_LEN};
use crate::counters::DropReason;
use crate::csum;
use crate::frame::Frame;
use crate::policy::filter;
use crate::tables::{Encap, Hop};
use crate::wire::GsoType;
use std::net::IpAddr;

/// Offsets inside the IPv4 header.
mod field {
    pub const FLAGS: usize = 6;
    pub const TTL: usize = 8;
    pub const CHECKSUM: std::ops::Range<usize> = 10..12;
}

/// The don't-fragment bit, in the flags byte.
const DF: u8 = 0x40;

pub(super) fn forward(ctx: &Ctx<'_>, f: &mut Frame) -> Verdict {
    let ip = &f.data()[ETH_LEN..];
    let Ok(h) = etherparse::Ipv4HeaderSlice::from_slice(ip) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    let hl = h.slice().len();
    let total = usize::from(h.total_len());
    if total < hl || total > ip.len() || csum::checksum(&ip[..hl]) != 0 {
        return Verdict::Drop(DropReason::Malformed);
    }
    // Services and natOutgoing: the frame may leave this stage rewritten.
    let view = match nat::stage(ctx, f) {
        nat::Outcome::Pass => None,
        nat::Outcome::Translated(flow) => Some(flow),
        nat::Outcome::Handoff(w) => return Verdict::Handoff(w),
        nat::Outcome::Reject(from) => {
            return match nat::reject(f, ctx.tables.gateway_mac, from) {
                true => Verdict::Reply(ctx.in_port, DropReason::ServiceNoBackend),
                false => Verdict::Drop(DropReason::ServiceNoBackend),
            };
        }
        nat::Outcome::Drop(r) => return Verdict::Drop(r),
    };
    let ip = &f.data()[ETH_LEN..];
    let dst = IpAddr::V4(std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    let ttl = ip[field::TTL];
    let df = ip[field::FLAGS] & DF != 0;
    let t = ctx.tables;
    // Where it goes: a local port with its peer's MAC, or a tunnel with the
    // remote VTEP's MAC and our own as the source.
    let (out, dst_mac, src_mac, peer) = match t.route(dst) {
        Hop::Local(out) => {
            // Never send the host's traffic back to the host: it routed it to
            // us. A translated packet (a NodePort reply steered in from the
            // uplink) has new addresses and cannot loop.
            if out == ctx.in_port && ctx.in_kind_host && view.is_none() {
                return Verdict::Drop(DropReason::NoRoute);
            }
            let Some(port) = t.port(out) else {
                return Verdict::Drop(DropReason::PortGone);
            };
            (out, port.peer_mac, t.gateway_mac, None)
        }
        Hop::Remote { node, encap } => {
            let o = &t.overlay;
            // With AF_XDP one uplink port carries both encapsulations.
            let (port, mtu) = match encap {
                Encap::Vxlan => (t.uplink_port.or(o.vxlan_port), o.vxlan_mtu),
                Encap::Ipip => (t.uplink_port.or(o.ipip_port), o.ipip_mtu),
                // The node's kernel routes it over the shared segment.
                Encap::Native => (t.host_port, u16::MAX),
            };
            let (Some(out), Some(n)) = (port, o.nodes.get(usize::from(node))) else {
                return Verdict::Drop(DropReason::NoOverlay);
            };
            // Natively routed prefixes leave through the host port: never
            // the host's own traffic (a loop, as above), but a translated
            // packet from it (NodePort or a node's connection to another
            // node's backend, a reply steered in for a natively routed
            // client) has new addresses and cannot loop.
            if out == ctx.in_port && view.is_none() {
                return Verdict::Drop(DropReason::NoRoute);
            }
            // The largest IP packet this frame puts on the wire: one segment
            // of a GSO frame, or the whole packet.
            let wire_len = if f.vnet.is_gso() {
                let l4 = usize::from(f.vnet.csum_start);
                let l4_hdr = match f.vnet.gso_type {
                    GsoType::TcpV4 | GsoType::TcpV6 => {
                        f.data().get(l4 + 12).map_or(20, |b| usize::from(b >> 4) * 4)
                    }
                    _ => 8,
                };
                l4.saturating_sub(ETH_LEN) + l4_hdr + usize::from(f.vnet.gso_size)
            } else {
                total
            };
            if wire_len > usize::from(mtu) && (df || f.vnet.is_gso()) {
                // Never drop silently for size: tell the sender the MTU.
                return match icmp::frag_needed(f, t.gateway_mac, mtu) {
                    true => Verdict::Reply(ctx.in_port, DropReason::TooBig),
                    false => Verdict::Drop(DropReason::TooBig),
                };
            }
            match encap {
                Encap::Native => {
                    let peer_mac = t.port(out).map(|p| p.peer_mac).unwrap_or(t.gateway_mac);
                    (out, peer_mac, t.gateway_mac, None)
                }
                _ => (out, n.vtep_mac, o.vtep_mac, Some((n.ip, encap))),
            }
        }
        Hop::None => {
            // Tell the sender at once (host unreachable), as a router does,
            // rather than letting it time out.
            return match icmp::host_unreachable(f, t.gateway_mac) {
                true => Verdict::Reply(ctx.in_port, DropReason::NoRoute),
                false => Verdict::Drop(DropReason::NoRoute),
            };
        }
    };
    if let Err(r) = police(ctx, f, out, view) {
        return Verdict::Drop(r);
    }
    if ttl <= 1 {
        return match icmp::time_exceeded(f, t.gateway_mac) {
            true => Verdict::Reply(ctx.in_port, DropReason::TtlExceeded),
            false => Verdict::Drop(DropReason::TtlExceeded),
        };
    }
    if let Some((ip, encap)) = peer {
        f.meta.peer = Some(ip);
        f.meta.encap = Some(encap);
        f.meta.flow_hash = flow::symmetric_hash(f.data());
    }
    let data = f.data_mut();
    let ip = &mut data[ETH_LEN..];
    let old = u16::from_be_bytes([ip[field::TTL], ip[field::TTL + 1]]);
    ip[field::TTL] -= 1;
    let new = u16::from_be_bytes([ip[field::TTL], ip[field::TTL + 1]]);
    let c = u16::from_be_bytes([ip[field::CHECKSUM.start], ip[field::CHECKSUM.start + 1]]);
    ip[field::CHECKSUM].copy_from_slice(&csum::update16(c, old, new).to_be_bytes());
    set_macs(data, dst_mac, src_mac);
    Verdict::Tx(out)
}

/// NetworkPolicy: the sending pod's egress and the receiving pod's ingress,
/// for the endpoints that live here (a remote node judges its own). The
/// node's own traffic to its pods is always allowed, as Kubernetes
/// requires (kubelet probes): traffic from the host interface whose source
/// is not a pod address (nothing of a pool, no endpoint, no remote block;
/// native-routed pod traffic also arrives through the host interface). An
/// ingress denial is also counted on the receiving endpoint's port, so each
/// endpoint shows the drops it asked for.
/// `view` is the flow to judge when the frame was translated (client to
/// backend, as Kubernetes judges Service traffic); else the frame's own.
fn police(
    ctx: &Ctx<'_>,
    f: &Frame,
    out: crate::port::PortId,
    view: Option<filter::Flow>,
) -> Result<(), DropReason> {
    let t = ctx.tables;
    let src_pol = ctx.in_pod.and_then(|p| p.policy.as_deref());
    let dst = t.port(out).filter(|p| p.kind == crate::tables::PortKind::Pod);
    let mut dst_pol = dst.and_then(|p| p.policy.as_deref());
    if src_pol.is_none() && dst_pol.is_none() {
        return Ok(());
    }
    let Some(flow) = view.or_else(|| filter::parse(&f.data()[ETH_LEN..])) else {
        return Err(DropReason::Malformed);
    };
    if ctx.in_kind_host && dst_pol.is_some() {
        let src = IpAddr::V4(flow.packet.src.0);
        // From the node itself (not an address of any pod we know of).
        if t.route(src) == Hop::Local(ctx.in_port) {
            dst_pol = None;
            if src_pol.is_none() {
                return Ok(());
            }
        }
    }
    let mut fl = ctx.flows.borrow_mut();
    let now = fl.now_ms;
    let r = filter::decide(&mut fl.ct, now, t.policy_generation, &flow, src_pol, dst_pol);
    if let (Err(DropReason::PolicyIngress), Some(d)) = (r, dst) {
        d.stats.drops.add(DropReason::PolicyIngress, 1);
    }
    r
}
