//! The engine's cross-node side: the tunnel ports (opened on demand, only
//! for the encapsulations some route uses), the AF_XDP uplink port when the
//! uplink mode allows it, the other nodes, and the routes to their pods;
//! for native routing, the kernel routes via the peers.
//!
//! Uplink modes (`OverlaySpec::uplink_mode`): `socket` uses the tunnel
//! socket ports only; `xdp` attaches the XDP program and carries VXLAN and
//! IPIP through AF_XDP, or fails the request; `auto` tries XDP and, when it
//! cannot attach, logs why and stays on the sockets. The socket ports are
//! open in every mode: with XDP they receive what the program passes to
//! the kernel (outer fragments, say) and send what cannot leave through
//! AF_XDP yet (a peer whose neighbour is not resolved).

use super::{invalid, sys_err, Engine};
use crate::api::{ApiError, Cidr, OverlaySpec, OverlayStatus, Reply, UplinkMode};
use crate::counters::PortStats;
use crate::port::tunnel::{ipip_port, vxlan_port, VxlanConfig};
use crate::port::xdp::program::AttachMode;
use crate::port::xdp::tx::Fallback;
use crate::port::xdp::{UplinkConfig, XdpUplink};
use crate::port::{PortId, TxPort};
use crate::sys::netlink::{self, Op};
use crate::tables::{Encap, NextHop, Overlay, PortEntry, PortKind, RemoteNode};
use crate::wire::MacAddr;
use crate::worker::Command;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// UDP source ports (sockets) VXLAN spreads flows over.
const VXLAN_SOURCE_PORTS: usize = 8;
/// Outer headers: IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
const VXLAN_OVERHEAD: u32 = 50;
/// Outer IPv4 header.
const IPIP_OVERHEAD: u32 = 20;

/// A tunnel port the engine opened.
struct Tunnel<K> {
    key: K,
    port: PortId,
    worker: usize,
    tx: Arc<dyn TxPort>,
    stats: Arc<PortStats>,
}

impl Tunnel<()> {
    fn with_key<K>(self, key: K) -> Tunnel<K> {
        Tunnel { key, port: self.port, worker: self.worker, tx: self.tx, stats: self.stats }
    }
}

impl<K> Tunnel<K> {
    /// The socket port as the AF_XDP port's way to the kernel.
    fn fallback(&self) -> Fallback {
        Fallback { tx: self.tx.clone(), stats: self.stats.clone() }
    }
}

/// The AF_XDP uplink port, when in use.
struct XdpPort {
    uplink: XdpUplink,
    port: PortId,
    /// The workers polling its receive queues.
    workers: Vec<usize>,
}

/// The name of the AF_XDP uplink port in the counters.
const XDP_PORT_NAME: &str = "xdp";

/// What the uplink mode asks for, given whether any route uses a tunnel.
#[derive(Debug, PartialEq, Eq)]
enum UplinkPlan {
    /// No XDP; the status says why.
    NoXdp(&'static str),
    /// Try to attach.
    TryXdp,
}

fn plan(mode: UplinkMode, tunnels: bool) -> UplinkPlan {
    match (tunnels, mode) {
        (false, _) => UplinkPlan::NoXdp("none (no route uses a tunnel)"),
        (true, UplinkMode::Socket) => UplinkPlan::NoXdp("socket"),
        (true, UplinkMode::Auto | UplinkMode::Xdp) => UplinkPlan::TryXdp,
    }
}

/// After trying XDP: the status to report, or, in `xdp` mode, the error.
fn settle(mode: UplinkMode, attempt: Result<AttachMode, String>) -> Result<String, String> {
    match attempt {
        Ok(m) => Ok(format!("xdp ({m})")),
        Err(e) if mode == UplinkMode::Xdp => Err(e),
        Err(e) => Ok(format!("socket (xdp failed: {e})")),
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) status: Option<OverlayStatus>,
    vxlan: Option<Tunnel<VxlanConfig>>,
    ipip: Option<Tunnel<Ipv4Addr>>,
    /// Kernel routes installed for native routing: prefix → (gateway, uplink).
    native: BTreeMap<Cidr, (Ipv4Addr, String)>,
    xdp: Option<XdpPort>,
}

fn validate(spec: &OverlaySpec) -> Result<BTreeMap<&str, usize>, ApiError> {
    if spec.local_ip.is_unspecified() || spec.local_ip.is_multicast() {
        return Err(invalid(format!("local_ip {} is not a unicast address", spec.local_ip)));
    }
    let unicast = |m: MacAddr| !m.is_multicast() && m.0 != [0; 6];
    if !unicast(spec.vtep_mac) {
        return Err(invalid(format!("vtep_mac {} is not a unicast MAC", spec.vtep_mac)));
    }
    if spec.vni > 0x00ff_ffff {
        return Err(invalid(format!("VNI {} does not fit in 24 bits", spec.vni)));
    }
    if spec.vxlan_port == 0 {
        return Err(invalid("vxlan_port 0"));
    }
    if spec.uplink_mtu != 0 && !(576..=65535).contains(&spec.uplink_mtu) {
        return Err(invalid(format!("uplink_mtu {} outside 576..=65535", spec.uplink_mtu)));
    }
    let mut names = BTreeMap::new();
    let mut ips = BTreeSet::new();
    for (i, n) in spec.nodes.iter().enumerate() {
        if names.insert(n.name.as_str(), i).is_some() {
            return Err(invalid(format!("node {} listed twice", n.name)));
        }
        if !ips.insert(n.ip) {
            return Err(invalid(format!("two nodes share the address {}", n.ip)));
        }
        if n.ip == spec.local_ip {
            return Err(invalid(format!("node {} has this node's own address {}", n.name, n.ip)));
        }
        if !unicast(n.vtep_mac) {
            return Err(invalid(format!(
                "node {}: vtep_mac {} is not unicast",
                n.name, n.vtep_mac
            )));
        }
    }
    if spec.nodes.len() > usize::from(u16::MAX) {
        return Err(invalid("more than 65535 nodes"));
    }
    for r in &spec.routes {
        if !names.contains_key(r.node.as_str()) {
            return Err(invalid(format!("route {} names unknown node {}", r.cidr, r.node)));
        }
        if !r.cidr.addr.is_ipv4() {
            return Err(invalid(format!("route {}: only IPv4 is carried so far", r.cidr)));
        }
    }
    Ok(names)
}

impl Engine {
    /// Replace the overlay. Validated as a whole first: a bad spec changes
    /// nothing.
    pub fn set_overlay(&mut self, spec: OverlaySpec) -> Result<Reply, ApiError> {
        let names = validate(&spec)?;
        let owner = netlink::owner_of(None, IpAddr::V4(spec.local_ip))
            .map_err(|e| sys_err("looking up the uplink", e))?
            .ok_or_else(|| {
                invalid(format!("no interface of this node holds local_ip {}", spec.local_ip))
            })?;
        let uplink = owner.link.name.clone();
        let uplink_mtu =
            if spec.uplink_mtu != 0 { spec.uplink_mtu } else { owner.link.mtu.unwrap_or(1500) };
        let vxlan_mtu = uplink_mtu.saturating_sub(VXLAN_OVERHEAD);
        let ipip_mtu = uplink_mtu.saturating_sub(IPIP_OVERHEAD);
        let uses = |e: Encap| spec.routes.iter().any(|r| r.encap == e);

        // Tunnel ports: open what is needed, close what is not.
        let want_vxlan = uses(Encap::Vxlan).then_some(VxlanConfig {
            local_ip: spec.local_ip,
            port: spec.vxlan_port,
            vni: spec.vni,
            source_ports: VXLAN_SOURCE_PORTS,
        });
        if self.overlay.vxlan.as_ref().map(|t| &t.key) != want_vxlan.as_ref() {
            let old = self.overlay.vxlan.take().map(|t| (t.port, t.worker));
            self.close_tunnel(old);
            if let Some(cfg) = want_vxlan {
                let (rx, tx) = vxlan_port(&cfg).map_err(|e| sys_err("VXLAN socket", e))?;
                let t = self.open_tunnel("vxlan", Encap::Vxlan, Box::new(rx), tx, owner.link.mac);
                self.overlay.vxlan = Some(t.with_key(cfg));
            }
        }
        let want_ipip = uses(Encap::Ipip).then_some(spec.local_ip);
        if self.overlay.ipip.as_ref().map(|t| t.key) != want_ipip {
            let old = self.overlay.ipip.take().map(|t| (t.port, t.worker));
            self.close_tunnel(old);
            if let Some(ip) = want_ipip {
                let (rx, tx) = ipip_port(ip).map_err(|e| sys_err("IPIP socket", e))?;
                let t = self.open_tunnel("ipip", Encap::Ipip, Box::new(rx), tx, owner.link.mac);
                self.overlay.ipip = Some(t.with_key(ip));
            }
        }

        // The AF_XDP uplink, as the mode says.
        let uplink_cfg = UplinkConfig {
            ifname: uplink.clone(),
            ifindex: owner.link.index,
            mac: owner.link.mac.unwrap_or_default(),
            mtu: uplink_mtu,
            local_ip: spec.local_ip,
            vxlan_port: spec.vxlan_port,
            vni: spec.vni,
            vxlan: uses(Encap::Vxlan),
            ipip: uses(Encap::Ipip),
        };
        let uplink_mode = self.set_uplink(spec.uplink_mode, &uplink_cfg)?;

        // Native routing: the kernel sends these prefixes to the peer.
        let native: BTreeMap<Cidr, (Ipv4Addr, String)> = spec
            .routes
            .iter()
            .filter(|r| r.encap == Encap::Native)
            .map(|r| (r.cidr, (spec.nodes[names[r.node.as_str()]].ip, uplink.clone())))
            .collect();
        let mut ops: Vec<Op> = self
            .overlay
            .native
            .iter()
            .filter(|(c, v)| native.get(c) != Some(v))
            .map(|(c, (_, dev))| Op::DelRoute { dst: c.addr, prefix: c.len, dev: dev.clone() })
            .collect();
        ops.extend(native.iter().filter(|(c, v)| self.overlay.native.get(c) != Some(v)).map(
            |(c, (gw, dev))| Op::AddRoute {
                dst: c.addr,
                prefix: c.len,
                dev: dev.clone(),
                via: Some(IpAddr::V4(*gw)),
                link_scope: false,
            },
        ));
        netlink::apply(None, ops).map_err(|e| sys_err("native routes", e))?;
        self.overlay.native = native;

        // The tables.
        let nodes: Vec<RemoteNode> = spec
            .nodes
            .iter()
            .map(|n| RemoteNode { name: n.name.clone(), ip: n.ip, vtep_mac: n.vtep_mac })
            .collect();
        let by_ip = nodes.iter().enumerate().map(|(i, n)| (n.ip, i as u16)).collect();
        let overlay = Overlay {
            local_ip: Some(spec.local_ip),
            vtep_mac: spec.vtep_mac,
            vni: spec.vni,
            vxlan_port: self.overlay.vxlan.as_ref().map(|t| t.port),
            ipip_port: self.overlay.ipip.as_ref().map(|t| t.port),
            vxlan_mtu: vxlan_mtu.min(65535) as u16,
            ipip_mtu: ipip_mtu.min(65535) as u16,
            nodes,
            by_ip,
        };
        let uplink_port = self.overlay.xdp.as_ref().map(|x| x.port);
        let mut shadowed = Vec::new();
        let t = self.tables.update(|t| {
            let stale: Vec<(IpAddr, u8)> = t
                .routes
                .iter()
                .filter(|(_, _, nh)| matches!(nh, NextHop::Remote { .. }))
                .map(|(a, l, _)| (a, l))
                .collect();
            for (a, l) in stale {
                t.routes.remove(a, l);
            }
            for r in &spec.routes {
                // A local pod's own route always wins over a remote one.
                if matches!(t.routes.get_exact(r.cidr.addr, r.cidr.len), Some(NextHop::Port(_))) {
                    shadowed.push(r.cidr);
                    continue;
                }
                let node = names[r.node.as_str()] as u16;
                t.routes.insert(r.cidr.addr, r.cidr.len, NextHop::Remote { node, encap: r.encap });
            }
            t.overlay = overlay;
            t.uplink_port = uplink_port;
        });
        for c in shadowed {
            tracing::warn!(cidr = %c, "remote route ignored: the prefix is a local endpoint's");
        }
        let status = OverlayStatus {
            spec,
            uplink,
            uplink_prefix: owner.prefix,
            uplink_mtu,
            vxlan_mtu,
            ipip_mtu,
            uplink_mode,
        };
        tracing::info!(
            uplink = %status.uplink,
            mode = %status.uplink_mode,
            mtu = uplink_mtu,
            nodes = status.spec.nodes.len(),
            routes = status.spec.routes.len(),
            "overlay set"
        );
        self.overlay.status = Some(status.clone());
        self.refresh_services();
        self.persist();
        Ok(Reply::Overlay { tables_version: t.version, overlay: status })
    }

    fn open_tunnel(
        &mut self,
        name: &str,
        encap: Encap,
        rx: Box<dyn crate::port::RxPort>,
        tx: Arc<dyn crate::port::TxPort>,
        uplink_mac: Option<MacAddr>,
    ) -> Tunnel<()> {
        let id = self.tables.load().free_port_id();
        let w = self.pick_worker();
        let stats = Arc::new(PortStats::default());
        self.tables.update(|t| {
            t.set_port(PortEntry {
                id,
                name: name.into(),
                kind: PortKind::Tunnel(encap),
                peer_mac: uplink_mac.unwrap_or_default(),
                ips: Vec::new(),
                tx: tx.clone(),
                stats: stats.clone(),
                policy: None,
            });
        });
        self.workers[w].send(Command::AddPort(id, rx));
        tracing::info!(port = id, worker = w, "{name} tunnel port open");
        Tunnel { key: (), port: id, worker: w, tx, stats }
    }

    /// Bring the AF_XDP uplink port to what `mode` asks for; returns the
    /// status line. In `xdp` mode a failure is the request's error (the
    /// tunnels then stay on the sockets).
    fn set_uplink(&mut self, mode: UplinkMode, cfg: &UplinkConfig) -> Result<String, ApiError> {
        if let UplinkPlan::NoXdp(why) = plan(mode, cfg.vxlan || cfg.ipip) {
            self.close_xdp();
            return Ok(why.to_string());
        }
        let attempt = self.open_xdp(cfg).map_err(|e| e.to_string());
        if let Err(e) = &attempt {
            match mode {
                UplinkMode::Xdp => tracing::error!(uplink = %cfg.ifname, "AF_XDP: {e}"),
                _ => {
                    tracing::warn!(uplink = %cfg.ifname, "AF_XDP unavailable, tunnels use the kernel's sockets: {e}")
                }
            }
        }
        settle(mode, attempt).map_err(|e| sys_err("uplink mode xdp", e))
    }

    /// Open the AF_XDP uplink port, or reconfigure the one open on the
    /// same uplink.
    fn open_xdp(&mut self, cfg: &UplinkConfig) -> Result<AttachMode, crate::port::xdp::XdpError> {
        let vxlan = self.overlay.vxlan.as_ref().map(Tunnel::fallback);
        let ipip = self.overlay.ipip.as_ref().map(Tunnel::fallback);
        let reconfigured = match self.overlay.xdp.as_mut() {
            Some(x) if x.uplink.config.same_uplink(cfg) => {
                Some(x.uplink.configure(cfg, vxlan.clone(), ipip.clone()).map(|()| x.uplink.mode))
            }
            _ => None,
        };
        match reconfigured {
            Some(Ok(mode)) => return Ok(mode),
            // Never leave a half-configured port carrying traffic.
            Some(Err(e)) => {
                self.close_xdp();
                return Err(e);
            }
            None => {}
        }
        // Another uplink (or address, or port): start over.
        self.close_xdp();
        let stats = Arc::new(PortStats::default());
        let (uplink, rxs) = XdpUplink::open(cfg, self.workers.len(), stats.clone(), vxlan, ipip)?;
        let id = self.tables.load().free_port_id();
        let tx: Arc<dyn TxPort> = uplink.tx();
        self.tables.update(|t| {
            t.set_port(PortEntry {
                id,
                name: XDP_PORT_NAME.into(),
                kind: PortKind::Uplink,
                peer_mac: cfg.mac,
                ips: Vec::new(),
                tx,
                stats,
                policy: None,
            });
        });
        // Each receive port on its own worker, the least busy first.
        let mut order: Vec<usize> = (0..self.workers.len()).collect();
        order.sort_by_key(|w| self.workers[*w].ports);
        let mut workers = Vec::new();
        for (rx, w) in rxs.into_iter().zip(order) {
            self.workers[w].send(Command::AddPort(id, Box::new(rx)));
            workers.push(w);
        }
        tracing::info!(port = id, ?workers, uplink = %cfg.ifname, "AF_XDP uplink port open");
        let mode = uplink.mode;
        self.overlay.xdp = Some(XdpPort { uplink, port: id, workers });
        Ok(mode)
    }

    /// Close the AF_XDP uplink port and detach the program, if open.
    pub(super) fn close_xdp(&mut self) {
        let Some(x) = self.overlay.xdp.take() else { return };
        self.tables.update(|t| {
            t.remove_port(x.port);
        });
        for w in &x.workers {
            self.workers[*w].send(Command::RemovePort(x.port));
        }
        x.uplink.close();
        tracing::info!(port = x.port, "AF_XDP uplink port closed");
    }

    fn close_tunnel(&mut self, t: Option<(PortId, usize)>) {
        if let Some((port, worker)) = t {
            self.tables.update(|t| {
                t.remove_port(port);
            });
            self.workers[worker].send(Command::RemovePort(port));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_decides_whether_xdp_is_tried() {
        for mode in [UplinkMode::Auto, UplinkMode::Xdp, UplinkMode::Socket] {
            assert!(matches!(plan(mode, false), UplinkPlan::NoXdp(s) if s.starts_with("none")));
        }
        assert_eq!(plan(UplinkMode::Socket, true), UplinkPlan::NoXdp("socket"));
        assert_eq!(plan(UplinkMode::Auto, true), UplinkPlan::TryXdp);
        assert_eq!(plan(UplinkMode::Xdp, true), UplinkPlan::TryXdp);
    }

    #[test]
    fn auto_falls_back_to_sockets_and_says_why_xdp_fails() {
        let failed = || Err("attaching the XDP program to eth0: no".to_string());
        assert_eq!(
            settle(UplinkMode::Auto, failed()),
            Ok("socket (xdp failed: attaching the XDP program to eth0: no)".into())
        );
        assert_eq!(
            settle(UplinkMode::Xdp, failed()),
            Err("attaching the XDP program to eth0: no".into())
        );
        assert_eq!(settle(UplinkMode::Auto, Ok(AttachMode::Driver)), Ok("xdp (driver)".into()));
        assert_eq!(settle(UplinkMode::Xdp, Ok(AttachMode::Skb)), Ok("xdp (skb)".into()));
    }
}
