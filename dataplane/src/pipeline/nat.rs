//! The translation stage, between validation and routing: Services (DNAT
//! of a frontend to a backend, with source NAT for hairpin and NodePort to
//! another node) and natOutgoing (source NAT of pod traffic leaving the
//! cluster).
//!
//! * A packet of a known flow, either direction, is rewritten from the
//!   worker's NAT table; a new flow to a frontend gets a backend (affinity,
//!   else Maglev on its 5-tuple) and, when no backend may take it, is
//!   refused at once (TCP RST, ICMP port unreachable).
//! * Ownership: the client's packets reach the owner of (client,
//!   frontend); replies reach the owner of the translated pair. When the
//!   two differ, the translating worker hands each translated packet to
//!   the other, which keeps the reverse translation and the policy state
//!   (docs/design.md, "Services and natOutgoing").
//! * Policy judges the flow as Kubernetes does, after DNAT and before
//!   SNAT: client → backend, in both directions; the stage returns that
//!   view for `ipv4::police`.

use super::{flow, Ctx, ETH_LEN};
use crate::api::FrontendKind;
use crate::counters::DropReason;
use crate::csum;
use crate::frame::Frame;
use crate::nat::flows::{NatError, Tuple};
use crate::nat::rewrite::{self, Kind};
use crate::nat::service::{self, HAIRPIN_ADDR};
use crate::policy::conntrack::Packet;
use crate::policy::filter::Flow;
use crate::wire::MacAddr;
use std::net::Ipv4Addr;

/// What the stage made of a frame.
pub(super) enum Outcome {
    /// Nothing to translate.
    Pass,
    /// Translated; policy judges this flow (the DNAT-only view).
    Translated(Flow),
    /// Translated; the translated flow belongs to this worker.
    Handoff(usize),
    /// A new connection to a frontend with no usable backend: refuse it
    /// from this address.
    Reject(Ipv4Addr),
    Drop(DropReason),
}

/// A frame on the host port addressed (at layer 2) to the node's uplink,
/// not to us: a reply steered from the uplink to a translated source
/// address. Accepted as ours.
pub(super) fn steered(ctx: &Ctx<'_>, f: &Frame) -> bool {
    let d = f.data();
    if !ctx.in_kind_host || d.len() < ETH_LEN + 20 || d[0] & 1 != 0 {
        return false;
    }
    if u16::from_be_bytes([d[12], d[13]]) != super::ETHERTYPE_IPV4 {
        return false;
    }
    let dst = Ipv4Addr::new(d[ETH_LEN + 16], d[ETH_LEN + 17], d[ETH_LEN + 18], d[ETH_LEN + 19]);
    ctx.tables.services.snat_addrs.contains(&dst)
}

fn err(e: NatError) -> Outcome {
    Outcome::Drop(match e {
        NatError::Full => DropReason::NatTableFull,
        NatError::PortsExhausted => DropReason::SnatPortsExhausted,
    })
}

/// The flow policy judges for a client's packet `orig` sent as `to`.
fn policy_view(orig: &Tuple, to: &Tuple, flags: u8) -> Flow {
    Flow { packet: Packet { proto: orig.proto, src: orig.src, dst: to.dst, flags }, quoted: None }
}

fn apply(f: &mut Frame, kind: Kind, to: &Tuple) -> bool {
    let partial = f.vnet.needs_csum();
    rewrite::rewrite(&mut f.data_mut()[ETH_LEN..], kind, to, partial)
}

pub(super) fn stage(ctx: &Ctx<'_>, f: &mut Frame) -> Outcome {
    let svc = &*ctx.tables.services;
    let mut guard = ctx.flows.borrow_mut();
    let fl = &mut **guard;
    let (nf, nr) = fl.nat.counts();
    if svc.is_empty() && nf == 0 && nr == 0 && f.meta.nat.is_none() {
        return Outcome::Pass;
    }
    let now = fl.now_ms;
    let Some((t, flags, kind)) = rewrite::read(&f.data()[ETH_LEN..]) else {
        return Outcome::Pass;
    };
    // Translated by the worker that owns the client's side.
    if let Some(orig) = f.meta.nat {
        return match fl.nat.ensure_reverse(orig, t, flags, now) {
            Ok(()) => Outcome::Translated(policy_view(&orig, &t, flags)),
            Err(e) => err(e),
        };
    }
    if let Kind::IcmpError { quoted } = kind {
        return icmp_error(fl, f, &t, &quoted, now);
    }
    // A reply: back to what the client sent to.
    if let Some(orig) = fl.nat.reverse(&t, flags, now) {
        let back = orig.reversed();
        let view = Packet { proto: t.proto, src: t.src, dst: orig.src, flags };
        if !apply(f, kind, &back) {
            return Outcome::Drop(DropReason::NatMalformed);
        }
        return Outcome::Translated(Flow { packet: view, quoted: None });
    }
    let to = match fl.nat.forward(&t, flags, now) {
        Some(to) => to,
        None => match new_flow(ctx, &mut fl.nat, now, &t, flags, kind) {
            Ok(Some(to)) => to,
            Ok(None) => return Outcome::Pass,
            Err(o) => return o,
        },
    };
    if !apply(f, kind, &to) {
        return Outcome::Drop(DropReason::NatMalformed);
    }
    let owner = flow::pair_owner(to.src.0, to.dst.0, fl.nat.workers);
    if owner != fl.nat.worker {
        f.meta.nat = Some(t);
        return Outcome::Handoff(owner);
    }
    match fl.nat.ensure_reverse(t, to, flags, now) {
        Ok(()) => Outcome::Translated(policy_view(&t, &to, flags)),
        Err(e) => err(e),
    }
}

/// Set up the translation of a flow the table does not know: a Service's
/// frontend, or natOutgoing. `Ok(None)`: not translated.
fn new_flow(
    ctx: &Ctx<'_>,
    nat: &mut crate::nat::NatFlows,
    now: u64,
    t: &Tuple,
    flags: u8,
    kind: Kind,
) -> Result<Option<Tuple>, Outcome> {
    let svc = &*ctx.tables.services;
    if kind == Kind::Ports {
        if let Some(fe) = svc.frontend(t.proto, t.dst.0, t.dst.1) {
            let s = &svc.services[fe.service as usize];
            let set = s.set(fe.kind);
            let key = (t.proto, t.dst.0, t.dst.1);
            let sticky = (s.affinity_ms > 0)
                .then(|| nat.affinity(key, t.src.0, now))
                .flatten()
                .and_then(|b| s.index.get(&b).copied())
                .filter(|i| set.contains(*i));
            let Some(i) = sticky.or_else(|| set.pick(service::flow_hash(t.proto, t.src, t.dst)))
            else {
                return Err(Outcome::Reject(t.dst.0));
            };
            let b = s.backends[i as usize];
            if s.affinity_ms > 0 {
                nat.set_affinity(key, t.src.0, (b.addr, b.port), now, s.affinity_ms);
            }
            let mut to = Tuple { proto: t.proto, src: t.src, dst: (b.addr, b.port) };
            // Hairpin: the backend would see itself as the source.
            let snat = if b.addr == t.src.0 {
                Some(HAIRPIN_ADDR)
            } else if ctx.in_kind_host && !b.local {
                remote_backend_snat(svc, s, fe.kind, t)
            } else {
                None
            };
            if let Some(a) = snat {
                let hint = service::flow_hash(t.proto, t.src, t.dst);
                let p = nat.alloc_port(t.proto, a, to.dst, svc.snat_ports, hint).map_err(err)?;
                to.src = (a, p);
            }
            nat.insert_forward(*t, to, flags, snat.is_some(), now).map_err(err)?;
            return Ok(Some(to));
        }
    }
    // natOutgoing: from a local pod to outside the cluster.
    if ctx.in_pod.is_none() || !matches!(kind, Kind::Ports | Kind::EchoRequest) {
        return Ok(None);
    }
    let Some(addr) = svc.nat_addr else { return Ok(None) };
    if !svc.nat_outgoing.applies(t.src.0, t.dst.0) {
        return Ok(None);
    }
    let hint = service::flow_hash(t.proto, t.src, t.dst);
    let p = nat.alloc_port(t.proto, addr, t.dst, svc.snat_ports, hint).map_err(err)?;
    let to = Tuple { proto: t.proto, src: (addr, p), dst: t.dst };
    nat.insert_forward(*t, to, flags, true, now).map_err(err)?;
    Ok(Some(to))
}

/// The source address of a flow from the host port (the node itself, or a
/// client outside the cluster steered in) to another node's backend, or
/// `None` to keep the client's. The backend's reply is addressed to its
/// source, and the backend's node routes it through its own kernel,
/// untranslated (it holds no state of the flow): to meet its translation
/// again it must come back to this node on a steered port. So the source
/// becomes a node address with a port of the translated range, whose
/// replies the uplink steers back into the dataplane (`sys::steer`):
///
/// * NodePort (`externalTrafficPolicy: Cluster`): the node address the
///   client used;
/// * external IP (`Cluster`): the translated address (`nat_addr`);
/// * cluster IP: the translated address; mostly the node's own processes
///   (the service CIDRs are routed into the host port), whose replies the
///   kernel would otherwise get from the backend's address and refuse.
///
/// `Local` policies choose local backends only, so they never get here.
fn remote_backend_snat(
    svc: &service::Services,
    s: &service::Service,
    kind: FrontendKind,
    t: &Tuple,
) -> Option<Ipv4Addr> {
    match kind {
        FrontendKind::NodePort if !s.external_local => Some(t.dst.0),
        FrontendKind::ExternalIp if !s.external_local => Some(svc.nat_addr.unwrap_or(t.dst.0)),
        FrontendKind::ClusterIp => svc.nat_addr,
        _ => None,
    }
}

/// An ICMP error about a translated flow's packet (as translated) goes
/// back to the client, about the packet the client sent.
fn icmp_error(
    fl: &mut super::FlowState,
    f: &mut Frame,
    t: &Tuple,
    quoted: &Tuple,
    now: u64,
) -> Outcome {
    let Some(orig) = fl.nat.peek_reverse(&quoted.reversed(), now) else {
        return icmp_error_from_client(fl, f, t, quoted, now);
    };
    // The destination itself answered: it speaks as the frontend.
    let from = if t.src.0 == quoted.dst.0 { orig.dst.0 } else { t.src.0 };
    let outer = Tuple { proto: t.proto, src: (from, 0), dst: (orig.src.0, 0) };
    let kind = Kind::IcmpError { quoted: *quoted };
    let ip = &mut f.data_mut()[ETH_LEN..];
    if !rewrite::rewrite(ip, kind, &outer, false) || !rewrite::rewrite_quoted(ip, &orig) {
        return Outcome::Drop(DropReason::NatMalformed);
    }
    f.vnet = Default::default();
    let view = Packet { proto: t.proto, src: (t.src.0, 0), dst: (orig.src.0, 0), flags: 0 };
    let q = Packet { proto: orig.proto, src: orig.src, dst: quoted.dst, flags: 0 };
    Outcome::Translated(Flow { packet: view, quoted: Some(q) })
}

/// An ICMP error from the client's side about a reply it got (from the
/// frontend): it goes to the backend, about the reply as the backend sent
/// it. Routed from here (with several workers, the backend's side may
/// belong to another one; its policy then judges the error as new).
fn icmp_error_from_client(
    fl: &mut super::FlowState,
    f: &mut Frame,
    t: &Tuple,
    quoted: &Tuple,
    now: u64,
) -> Outcome {
    let Some(to) = fl.nat.peek_forward(&quoted.reversed(), now) else {
        return Outcome::Pass;
    };
    let outer = Tuple { proto: t.proto, src: (to.src.0, 0), dst: (to.dst.0, 0) };
    let kind = Kind::IcmpError { quoted: *quoted };
    let ip = &mut f.data_mut()[ETH_LEN..];
    if !rewrite::rewrite(ip, kind, &outer, false) || !rewrite::rewrite_quoted(ip, &to.reversed()) {
        return Outcome::Drop(DropReason::NatMalformed);
    }
    f.vnet = Default::default();
    let view = Packet { proto: t.proto, src: (t.src.0, 0), dst: (to.dst.0, 0), flags: 0 };
    let q = Packet { proto: to.proto, src: to.dst, dst: quoted.dst, flags: 0 };
    Outcome::Translated(Flow { packet: view, quoted: Some(q) })
}

const IP_HDR: usize = 20;
const TCP_HDR: usize = 20;

/// Rewrite `f` (a new connection to a frontend with no backend) into its
/// refusal, from `from`: a TCP RST (RFC 793's reset for a closed port), or
/// an ICMP port unreachable for UDP and SCTP. False: nothing to send.
pub(super) fn reject(f: &mut Frame, gw: MacAddr, from: Ipv4Addr) -> bool {
    let d = f.data();
    let Some(ip) = d.get(ETH_LEN..) else { return false };
    if ip.len() < IP_HDR || ip[9] != 6 {
        return super::icmp::port_unreachable(f, gw, from);
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let Some(tcp) = ip.get(hl..total).filter(|t| t.len() >= TCP_HDR) else { return false };
    let flags = tcp[13];
    if flags & 0x04 != 0 {
        return false; // never answer a reset
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    let payload = tcp.len().saturating_sub(doff) as u32;
    let seq_in = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack_in = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let (seq, ack, out_flags) = if flags & 0x10 != 0 {
        (ack_in, 0, 0x04)
    } else {
        let len = payload + u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
        (0, seq_in.wrapping_add(len), 0x14)
    };
    let (sport, dport) = ([tcp[2], tcp[3]], [tcp[0], tcp[1]]);
    let client: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
    let sender = MacAddr([d[6], d[7], d[8], d[9], d[10], d[11]]);
    if !f.resize(ETH_LEN + IP_HDR + TCP_HDR) {
        return false;
    }
    f.vnet = Default::default();
    let out = f.data_mut();
    super::set_macs(out, sender, gw);
    out[12..14].copy_from_slice(&super::ETHERTYPE_IPV4.to_be_bytes());
    let ip = &mut out[ETH_LEN..];
    ip[..IP_HDR].copy_from_slice(&[
        0x45,
        0,
        0,
        (IP_HDR + TCP_HDR) as u8,
        0,
        0,
        0x40,
        0,
        64,
        6,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&client);
    let c = csum::checksum(&ip[..IP_HDR]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let (hdr, tcp) = ip.split_at_mut(IP_HDR);
    tcp[..TCP_HDR].fill(0);
    tcp[0..2].copy_from_slice(&sport);
    tcp[2..4].copy_from_slice(&dport);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = out_flags;
    let acc = csum::sum(&hdr[12..20], 0) + 6 + TCP_HDR as u32;
    let c = !csum::fold(csum::sum(&tcp[..TCP_HDR], acc));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
#[path = "nat_tests.rs"]
mod tests;
