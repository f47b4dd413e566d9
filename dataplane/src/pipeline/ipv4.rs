//! IPv4 forwarding between the node's ports: validate, route by longest
//! prefix, decrement the TTL with an incremental checksum update, rewrite
//! the Ethernet addresses.

use super::{icmp, set_macs, Ctx, Verdict, ETH_LEN};
use crate::counters::DropReason;
use crate::csum;
use crate::frame::Frame;
use std::net::IpAddr;

/// Offsets inside the IPv4 header.
mod field {
    pub const TTL: usize = 8;
    pub const CHECKSUM: std::ops::Range<usize> = 10..12;
}

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
    let dst = IpAddr::V4(h.destination_addr());
    let Some(out) = ctx.tables.route(dst) else {
        // Tell the sender at once (host unreachable), as a router does,
        // rather than letting it time out.
        return match icmp::host_unreachable(f, ctx.tables.gateway_mac) {
            true => Verdict::Reply(ctx.in_port, DropReason::NoRoute),
            false => Verdict::Drop(DropReason::NoRoute),
        };
    };
    // Never send the host's traffic back to the host: it routed it to us.
    if out == ctx.in_port && ctx.in_kind_host {
        return Verdict::Drop(DropReason::NoRoute);
    }
    let Some(port) = ctx.tables.port(out) else {
        return Verdict::Drop(DropReason::PortGone);
    };
    if h.ttl() <= 1 {
        return match icmp::time_exceeded(f, ctx.tables.gateway_mac) {
            true => Verdict::Reply(ctx.in_port, DropReason::TtlExceeded),
            false => Verdict::Drop(DropReason::TtlExceeded),
        };
    }
    let peer = port.peer_mac;
    let data = f.data_mut();
    let ip = &mut data[ETH_LEN..];
    let old = u16::from_be_bytes([ip[field::TTL], ip[field::TTL + 1]]);
    ip[field::TTL] -= 1;
    let new = u16::from_be_bytes([ip[field::TTL], ip[field::TTL + 1]]);
    let c = u16::from_be_bytes([ip[field::CHECKSUM.start], ip[field::CHECKSUM.start + 1]]);
    ip[field::CHECKSUM].copy_from_slice(&csum::update16(c, old, new).to_be_bytes());
    set_macs(data, peer, ctx.tables.gateway_mac);
    Verdict::Tx(out)
}
