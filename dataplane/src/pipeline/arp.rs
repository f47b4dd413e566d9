//! ARP: the dataplane answers for the pods' gateway.
//!
//! On a pod port, any request for an address other than the pod's own gets
//! our MAC (the pod routes everything via 169.254.1.1, and proxy-ARP-style
//! answers keep working if a pod is configured with on-link routes). On the
//! host port, we answer only for addresses that we route to a pod, and for
//! the service CIDRs the node routes to us (cluster IPs).

use super::{set_macs, Ctx, Verdict, ETH_LEN};
use crate::counters::DropReason;
use crate::frame::Frame;
use crate::tables::Hop;
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress};
use std::net::IpAddr;

pub(super) fn answer(ctx: &Ctx<'_>, f: &mut Frame) -> Verdict {
    let Ok(pkt) = ArpPacket::new_checked(&f.data()[ETH_LEN..]) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    let Ok(ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    }) = ArpRepr::parse(&pkt)
    else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if operation != ArpOperation::Request || target_protocol_addr == source_protocol_addr {
        return Verdict::Drop(DropReason::ArpIgnored);
    }
    let target = IpAddr::V4(target_protocol_addr);
    let ours = if ctx.in_kind_host {
        let routed = match ctx.tables.route(target) {
            Hop::Local(p) => p != ctx.in_port,
            Hop::Remote { .. } => true,
            Hop::None => false,
        };
        routed || ctx.tables.services.service_cidrs.iter().any(|c| c.contains(target))
    } else {
        !ctx.in_ips.contains(&target)
    };
    if !ours {
        return Verdict::Drop(DropReason::ArpIgnored);
    }
    let gw = ctx.tables.gateway_mac;
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(gw.0),
        source_protocol_addr: target_protocol_addr,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    f.vnet = Default::default();
    let data = f.data_mut();
    set_macs(data, crate::wire::MacAddr(source_hardware_addr.0), gw);
    reply.emit(&mut ArpPacket::new_unchecked(&mut data[ETH_LEN..]));
    Verdict::Tx(ctx.in_port)
}
