//! The read-mostly state the workers forward with: ports, endpoints and
//! routes. A [`Tables`] value is immutable once published; the control
//! thread builds a new one and swaps it in atomically ([`SharedTables`]),
//! so workers read without locks and always see one consistent version.

pub mod lpm;

use crate::counters::PortStats;
use crate::port::{PortId, TxPort};
use crate::wire::MacAddr;
use arc_swap::ArcSwap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

pub use lpm::{DualLpm, Lpm};

/// What a port is attached to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortKind {
    /// A pod's `eth0`.
    Pod,
    /// The host interface (`ocelot0`) into the node's own network stack.
    Host,
    /// The underlay, as a tunnel: frames in and out are the tunnel's
    /// payload, with the peer node's address in [`crate::frame::Meta`].
    Tunnel(Encap),
    /// The uplink itself, through AF_XDP (`port::xdp`): like a tunnel port,
    /// but one port carries every encapsulation, so each frame names its
    /// own in [`crate::frame::Meta::encap`].
    Uplink,
}

impl PortKind {
    /// The encapsulation a frame received on a port of this kind arrived
    /// in (`meta_encap` is the frame's own, which the uplink port sets);
    /// `None` for a plain frame.
    #[inline]
    pub fn rx_encap(&self, meta_encap: Option<Encap>) -> Option<Encap> {
        match self {
            PortKind::Tunnel(e) => Some(*e),
            PortKind::Uplink => meta_encap,
            _ => None,
        }
    }
}

/// How traffic to another node's pods travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encap {
    /// VXLAN (RFC 7348) over UDP.
    Vxlan,
    /// IP in IP (protocol 4).
    Ipip,
    /// No encapsulation: the node's kernel routes it to the peer over the
    /// shared L2 segment.
    Native,
}

/// Another node, as the workers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
}

/// This node's side of the overlay.
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    pub local_ip: Option<Ipv4Addr>,
    pub vtep_mac: MacAddr,
    pub vni: u32,
    pub vxlan_port: Option<PortId>,
    pub ipip_port: Option<PortId>,
    /// Largest inner IP packet each encapsulation carries without
    /// fragmenting: the uplink MTU minus the outer headers.
    pub vxlan_mtu: u16,
    pub ipip_mtu: u16,
    /// Known nodes; [`NextHop::Remote`] indexes this list.
    pub nodes: Vec<RemoteNode>,
    /// Node index by underlay address: decapsulated traffic is accepted
    /// from these sources only.
    pub by_ip: rustc_hash::FxHashMap<Ipv4Addr, u16>,
}

impl Overlay {
    /// The known node at underlay address `ip`.
    #[inline]
    pub fn node_at(&self, ip: Ipv4Addr) -> Option<&RemoteNode> {
        self.by_ip.get(&ip).and_then(|i| self.nodes.get(usize::from(*i)))
    }
}

/// One port as the workers see it.
#[derive(Clone)]
pub struct PortEntry {
    pub id: PortId,
    pub name: String,
    pub kind: PortKind,
    /// MAC of the interface on the far side (the pod's `eth0`, or the host
    /// interface's own address): the destination of frames we send into it.
    pub peer_mac: MacAddr,
    /// Addresses that belong to the far side (a pod's IPs).
    pub ips: Vec<IpAddr>,
    pub tx: Arc<dyn TxPort>,
    pub stats: Arc<PortStats>,
    /// The endpoint's NetworkPolicy, compiled; `None`: not isolated.
    pub policy: Option<Arc<crate::policy::classify::CompiledPolicy>>,
}

impl PortEntry {
    /// A port whose transmit side only counts ([`crate::port::memory::SinkTx`]):
    /// for tests and benchmarks of the pipeline.
    pub fn counting(id: PortId, kind: PortKind, peer_mac: MacAddr, ips: Vec<IpAddr>) -> PortEntry {
        PortEntry {
            id,
            name: format!("p{id}"),
            kind,
            peer_mac,
            ips,
            tx: Arc::new(crate::port::memory::SinkTx::default()),
            stats: Arc::new(PortStats::default()),
            policy: None,
        }
    }
}

/// Where a route sends a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// A local port (a pod on this node, or the host interface).
    Port(PortId),
    /// A prefix we own but have no endpoint for: drop (`no_route`) rather
    /// than bounce it back to the host, which routes it to us again.
    Unreachable,
    /// Pods of another node ([`Overlay::nodes`] index), reached this way.
    Remote { node: u16, encap: Encap },
}

/// The result of a route lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// Out of a local port.
    Local(PortId),
    /// To another node.
    Remote { node: u16, encap: Encap },
    /// Nowhere.
    None,
}

/// One immutable version of the forwarding state.
#[derive(Clone)]
pub struct Tables {
    /// Increases with every published change.
    pub version: u64,
    /// The MAC the dataplane answers ARP with and sends from.
    pub gateway_mac: MacAddr,
    /// Ports indexed by [`PortId`]; removed ports leave a `None`.
    pub ports: Vec<Option<PortEntry>>,
    pub routes: DualLpm<NextHop>,
    /// Where traffic for destinations we do not own goes.
    pub host_port: Option<PortId>,
    /// The AF_XDP uplink port, when XDP carries the tunnels: VXLAN and IPIP
    /// leave through it instead of the overlay's socket ports.
    pub uplink_port: Option<PortId>,
    pub overlay: Overlay,
    /// Increases whenever any endpoint's policy changes: tracked flows
    /// whose verdict is older are judged again.
    pub policy_generation: u64,
    /// Services and natOutgoing, compiled (`nat::service`).
    pub services: Arc<crate::nat::Services>,
}

impl Tables {
    pub fn new(gateway_mac: MacAddr) -> Tables {
        Tables {
            version: 0,
            gateway_mac,
            ports: Vec::new(),
            routes: DualLpm::default(),
            host_port: None,
            uplink_port: None,
            overlay: Overlay::default(),
            policy_generation: 0,
            services: Arc::default(),
        }
    }

    #[inline]
    pub fn port(&self, id: PortId) -> Option<&PortEntry> {
        self.ports.get(id as usize).and_then(Option::as_ref)
    }

    /// The next hop for `dst`: the longest matching route, else the host.
    #[inline]
    pub fn route(&self, dst: IpAddr) -> Hop {
        match self.routes.lookup(dst) {
            Some(NextHop::Port(p)) => Hop::Local(*p),
            Some(NextHop::Unreachable) => Hop::None,
            Some(NextHop::Remote { node, encap }) => Hop::Remote { node: *node, encap: *encap },
            None => self.host_port.map_or(Hop::None, Hop::Local),
        }
    }

    /// The first free port id.
    pub fn free_port_id(&self) -> PortId {
        self.ports.iter().position(Option::is_none).unwrap_or(self.ports.len()) as PortId
    }

    /// Put `entry` at its id, growing the table as needed.
    pub fn set_port(&mut self, entry: PortEntry) {
        let i = entry.id as usize;
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
        }
        self.ports[i] = Some(entry);
    }

    /// Remove a port and every route that points at it.
    pub fn remove_port(&mut self, id: PortId) -> Option<PortEntry> {
        let old = self.ports.get_mut(id as usize).and_then(Option::take);
        let stale: Vec<(IpAddr, u8)> = self
            .routes
            .iter()
            .filter(|(_, _, nh)| **nh == NextHop::Port(id))
            .map(|(a, l, _)| (a, l))
            .collect();
        for (a, l) in stale {
            self.routes.remove(a, l);
        }
        if self.host_port == Some(id) {
            self.host_port = None;
        }
        if self.overlay.vxlan_port == Some(id) {
            self.overlay.vxlan_port = None;
        }
        if self.overlay.ipip_port == Some(id) {
            self.overlay.ipip_port = None;
        }
        if self.uplink_port == Some(id) {
            self.uplink_port = None;
        }
        while matches!(self.ports.last(), Some(None)) {
            self.ports.pop();
        }
        old
    }
}

/// The published tables, swapped atomically by the control thread.
pub struct SharedTables(ArcSwap<Tables>);

impl SharedTables {
    pub fn new(t: Tables) -> SharedTables {
        SharedTables(ArcSwap::from_pointee(t))
    }

    /// The current version, for one batch.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Tables>> {
        self.0.load()
    }

    pub fn load_full(&self) -> Arc<Tables> {
        self.0.load_full()
    }

    /// Build a new version from the current one and publish it.
    pub fn update(&self, f: impl FnOnce(&mut Tables)) -> Arc<Tables> {
        let mut t = (*self.0.load_full()).clone();
        f(&mut t);
        t.version += 1;
        let t = Arc::new(t);
        self.0.store(t.clone());
        t
    }
}
