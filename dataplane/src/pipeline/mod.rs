//! The packet pipeline: a batch of frames from one port in, one verdict per
//! frame out. No I/O happens here (the worker owns the ports), so every
//! decision is testable on in-memory frames.
//!
//! Stages for this version: validate the virtio-net header → parse Ethernet
//! → ARP (answer for the gateway) | IPv4 (route, TTL, rewrite MACs, name
//! the tunnel peer). Frames from a tunnel port are first checked and
//! decapsulated (`tunnel`). Later stages (conntrack, policy, NAT) slot in
//! between without changing the shape: frames in, verdicts out.

mod arp;
pub mod flow;
mod icmp;
mod ipv4;
mod nat;
pub mod tunnel;

use crate::counters::{DropReason, DropTally};
use crate::frame::Frame;
use crate::port::PortId;
use crate::tables::{PortKind, Tables};
use crate::wire::MacAddr;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

/// The address the pods use as their gateway (Calico's convention); also the
/// source of the ICMP errors the dataplane sends.
pub const GATEWAY_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// What happens to one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the (rewritten) frame out of this port.
    Tx(PortId),
    /// Drop it, counting the reason.
    Drop(DropReason),
    /// The frame was dropped for the reason and rewritten into an error
    /// (ICMP) for its sender, to be sent out of the port.
    Reply(PortId, DropReason),
    /// The frame was translated and belongs to another worker (the owner
    /// of its translated flow): hand it over, as received on the port.
    Handoff(usize),
}

/// What a worker keeps between batches: its connection-tracking table, its
/// translated flows, and the clock they run on.
pub struct FlowState {
    pub ct: crate::policy::conntrack::Conntrack,
    /// Translations (Services, natOutgoing); also says which worker this is.
    pub nat: crate::nat::NatFlows,
    /// Milliseconds, from any fixed origin; set by the worker per batch.
    pub now_ms: u64,
}

impl FlowState {
    pub fn new(limits: crate::policy::conntrack::Limits) -> FlowState {
        FlowState {
            ct: crate::policy::conntrack::Conntrack::new(limits, Default::default()),
            nat: crate::nat::NatFlows::new(limits.tcp.max(limits.other)),
            now_ms: 0,
        }
    }
}

impl Default for FlowState {
    fn default() -> FlowState {
        FlowState::new(Default::default())
    }
}

/// Run a batch received on `in_port` through the pipeline. `verdicts` is
/// cleared and gets one entry per frame; drops are also tallied in `drops`.
pub fn process(
    tables: &Tables,
    in_port: PortId,
    frames: &mut [Frame],
    verdicts: &mut Vec<Verdict>,
    drops: &mut DropTally,
    flows: &mut FlowState,
) {
    verdicts.clear();
    let Some(port) = tables.port(in_port) else {
        verdicts.extend(frames.iter().map(|_| Verdict::Drop(DropReason::PortGone)));
        for _ in frames.iter() {
            drops.bump(DropReason::PortGone);
        }
        return;
    };
    let ctx = Ctx {
        tables,
        in_port,
        in_kind_host: tables.host_port == Some(in_port),
        in_ips: &port.ips,
        in_pod: (port.kind == PortKind::Pod).then_some(port),
        flows: std::cell::RefCell::new(flows),
    };
    // Tunnel ports carry one encapsulation; the AF_XDP uplink port names
    // each frame's own (a frame without one cannot be decapsulated).
    let tunnel = matches!(port.kind, PortKind::Tunnel(_) | PortKind::Uplink);
    for f in frames.iter_mut() {
        let v = match (tunnel, port.kind.rx_encap(f.meta.encap)) {
            (true, Some(e)) => tunnel::receive(&ctx, e, f),
            (true, None) => Verdict::Drop(DropReason::TunnelMalformed),
            (false, _) => one(&ctx, f),
        };
        if let Verdict::Drop(r) | Verdict::Reply(_, r) = v {
            drops.bump(r);
        }
        verdicts.push(v);
    }
}

struct Ctx<'a> {
    tables: &'a Tables,
    in_port: PortId,
    in_kind_host: bool,
    in_ips: &'a [std::net::IpAddr],
    /// The receiving port when it is a pod's: its address and MAC are the
    /// only ones it may send from, and its egress policy applies.
    in_pod: Option<&'a crate::tables::PortEntry>,
    flows: std::cell::RefCell<&'a mut FlowState>,
}

fn one(ctx: &Ctx<'_>, f: &mut Frame) -> Verdict {
    if !vnet_consistent(f) {
        return Verdict::Drop(DropReason::BadVnetHdr);
    }
    let data = f.data();
    if data.len() < ETH_LEN {
        return Verdict::Drop(DropReason::Malformed);
    }
    let dst = MacAddr([data[0], data[1], data[2], data[3], data[4], data[5]]);
    let ethertype = u16::from_be_bytes([data[12], data[13]]);
    if dst != ctx.tables.gateway_mac && dst != MacAddr::BROADCAST && !nat::steered(ctx, f) {
        return Verdict::Drop(if dst.is_multicast() && ethertype == ETHERTYPE_IPV6 {
            DropReason::UnsupportedEthertype
        } else {
            DropReason::NotForUs
        });
    }
    match ethertype {
        ETHERTYPE_IPV4 if dst != MacAddr::BROADCAST => {
            // A frame handed over by another worker was checked there (and
            // may carry a translated source).
            if let (Some(pod), None) = (ctx.in_pod, f.meta.nat) {
                if spoofed(pod, f.data()) {
                    return Verdict::Drop(DropReason::Spoofed);
                }
            }
            ipv4::forward(ctx, f)
        }
        ETHERTYPE_IPV4 => Verdict::Drop(DropReason::NotForUs),
        ETHERTYPE_ARP => arp::answer(ctx, f),
        _ => Verdict::Drop(DropReason::UnsupportedEthertype),
    }
}

/// Reverse-path check on a pod's port (as Calico does on workload
/// interfaces): the source MAC must be the pod's interface's and the source
/// IPv4 address one of the pod's.
fn spoofed(pod: &crate::tables::PortEntry, data: &[u8]) -> bool {
    if data[6..12] != pod.peer_mac.0 {
        return true;
    }
    match data.get(ETH_LEN + 12..ETH_LEN + 16) {
        Some(s) => {
            let src = std::net::IpAddr::V4(std::net::Ipv4Addr::new(s[0], s[1], s[2], s[3]));
            !pod.ips.contains(&src)
        }
        None => false, // too short: the IPv4 stage calls it malformed
    }
}

/// A frame's virtio-net header must describe offsets inside the frame.
fn vnet_consistent(f: &Frame) -> bool {
    let v = &f.vnet;
    if v.needs_csum() {
        let field = usize::from(v.csum_start) + usize::from(v.csum_offset) + 2;
        if field > f.len() {
            return false;
        }
    }
    if v.is_gso() && (v.gso_size == 0 || !v.needs_csum()) {
        return false;
    }
    true
}

/// Rewrite the Ethernet addresses of a frame.
#[inline]
fn set_macs(data: &mut [u8], dst: MacAddr, src: MacAddr) {
    data[0..6].copy_from_slice(&dst.0);
    data[6..12].copy_from_slice(&src.0);
}

#[cfg(test)]
mod tests;
