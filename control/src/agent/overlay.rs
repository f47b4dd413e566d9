//! What this node's dataplane needs to reach the other nodes' pods: the
//! other nodes (underlay address, VTEP MAC), and a route per remote block,
//! borrowed address and podCIDR, each with the encapsulation its pool asks
//! for. A pure function of the cluster and the IPAM state, so it is tested
//! without I/O; the agent recomputes it when either changes.
//!
//! Conventions (as Calico publishes them on its Node objects):
//! - a node's underlay address is its `InternalIP`;
//! - its VTEP MAC is the annotation `ocelot.dev/vxlan-tunnel-mac`, or, when
//!   absent, derived from the node name (every agent derives the same one).

use crate::datastore::Cluster;
use crate::ipam::{contains, IpamState};
use crate::model::{EncapMode, IpPool, Node};
use ocelot_dataplane::api::{Cidr, OverlaySpec, RemoteNodeSpec, RemoteRoute, UplinkMode};
use ocelot_dataplane::tables::Encap;
use ocelot_dataplane::wire::MacAddr;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// Annotation carrying a node's VTEP MAC.
pub const VTEP_MAC_ANNOTATION: &str = "ocelot.dev/vxlan-tunnel-mac";

/// Settings of the overlay that are not in the datastore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub vni: u32,
    pub vxlan_port: u16,
    /// 0: read the uplink's.
    pub uplink_mtu: u32,
    /// AF_XDP, the kernel's sockets, or AF_XDP when it can attach.
    pub uplink_mode: UplinkMode,
}

/// A node's underlay address (its IPv4 `InternalIP`).
pub fn node_ip(n: &Node) -> Option<Ipv4Addr> {
    match n.internal_ip() {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    }
}

/// A node's VTEP MAC: its annotation, else derived from its name.
pub fn vtep_mac(n: &Node) -> MacAddr {
    n.metadata
        .annotations
        .get(VTEP_MAC_ANNOTATION)
        .and_then(|s| s.parse::<MacAddr>().ok())
        .filter(|m| !m.is_multicast() && m.0 != [0; 6])
        .unwrap_or_else(|| MacAddr::local_from_seed(format!("vtep:{}", n.metadata.name).as_bytes()))
}

/// Are `a` and `b` in the same /`prefix`?
fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    Cidr { addr: a.into(), len: prefix.min(32) }.contains(b.into())
}

/// How a pool's traffic to a node at `peer` travels, given whether the peer
/// shares our underlay subnet. VXLAN wins when a pool (wrongly) enables both.
pub fn encap_for(pool: Option<&IpPool>, same_subnet: bool) -> Encap {
    let Some(p) = pool else { return Encap::Native };
    let on = |m: &EncapMode| match m {
        EncapMode::Always => true,
        EncapMode::CrossSubnet => !same_subnet,
        EncapMode::Never => false,
    };
    if on(&p.spec.vxlan_mode) {
        Encap::Vxlan
    } else if on(&p.spec.ipip_mode) {
        Encap::Ipip
    } else {
        Encap::Native
    }
}

/// The pool a prefix belongs to (the most specific one containing it).
fn pool_of<'a>(cluster: &'a Cluster, cidr: &Cidr) -> Option<&'a IpPool> {
    cluster
        .pools
        .values()
        .filter_map(|p| p.spec.cidr.parse::<Cidr>().ok().map(|c| (c, p)))
        .filter(|(c, _)| c.len <= cidr.len && contains(c, &cidr.addr))
        .max_by_key(|(c, _)| c.len)
        .map(|(_, p)| p)
}

/// The overlay for node `me`, or why there is none yet. `local_prefix` is
/// the prefix length of our underlay subnet (for CrossSubnet).
pub fn compute(
    cluster: &Cluster,
    ipam: &IpamState,
    me: &str,
    local_prefix: u8,
    settings: &Settings,
) -> Result<OverlaySpec, String> {
    let node = cluster.nodes.get(me).ok_or_else(|| format!("no Node object named {me}"))?;
    let local_ip = node_ip(node).ok_or_else(|| format!("node {me} has no InternalIP address"))?;
    let mut nodes = Vec::new();
    let mut known = BTreeMap::new();
    for (name, n) in &cluster.nodes {
        if name == me {
            continue;
        }
        let Some(ip) = node_ip(n) else {
            tracing::warn!(node = %name, "node has no InternalIP; its pods are unreachable");
            continue;
        };
        if ip == local_ip {
            tracing::warn!(node = %name, %ip, "node claims this node's own address; ignored");
            continue;
        }
        known.insert(name.clone(), ip);
        nodes.push(RemoteNodeSpec { name: name.clone(), ip, vtep_mac: vtep_mac(n) });
    }
    let mut routes: BTreeMap<Cidr, String> = BTreeMap::new();
    // Node podCIDRs (host-local nodes, and nodes not run by Ocelot).
    for (name, n) in &cluster.nodes {
        if name == me || !known.contains_key(name) {
            continue;
        }
        if let Some(c) = n.spec.pod_cidr.as_deref().and_then(|s| s.parse::<Cidr>().ok()) {
            routes.insert(crate::ipam::network(&c), name.clone());
        }
    }
    for (cidr, b) in &ipam.blocks {
        match b.affinity.as_deref() {
            Some(owner) if owner != me && known.contains_key(owner) => {
                routes.insert(*cidr, owner.to_string());
            }
            _ => {}
        }
        // Borrowed addresses: a /32 to the node that holds each.
        for (ip, a) in &b.allocations {
            let owner = b.affinity.as_deref().unwrap_or("");
            if a.node != owner && a.node != me && known.contains_key(&a.node) {
                routes.insert(Cidr { addr: *ip, len: 32 }, a.node.clone());
            }
        }
    }
    let routes = routes
        .into_iter()
        .filter(|(c, _)| matches!(c.addr, IpAddr::V4(_)))
        .map(|(cidr, n)| {
            let peer = known[&n];
            let encap =
                encap_for(pool_of(cluster, &cidr), same_subnet(local_ip, peer, local_prefix));
            RemoteRoute { cidr, node: n, encap }
        })
        .collect();
    Ok(OverlaySpec {
        local_ip,
        vtep_mac: vtep_mac(node),
        vni: settings.vni,
        vxlan_port: settings.vxlan_port,
        uplink_mtu: settings.uplink_mtu,
        nodes,
        routes,
        uplink_mode: settings.uplink_mode,
    })
}

/// The MTU for new pods: the uplink's minus the largest overhead among the
/// encapsulations the enabled pools may use (Calico's auto MTU). It does not
/// depend on which routes exist yet: the first pod of a cluster gets the
/// same MTU as the last.
pub fn pod_mtu<'a>(uplink_mtu: u32, pools: impl IntoIterator<Item = &'a IpPool>) -> u32 {
    let overhead = pools
        .into_iter()
        .filter(|p| !p.spec.disabled)
        .map(|p| {
            if p.spec.vxlan_mode != EncapMode::Never {
                50
            } else if p.spec.ipip_mode != EncapMode::Never {
                20
            } else {
                0
            }
        })
        .max()
        .unwrap_or(0);
    uplink_mtu.saturating_sub(overhead).max(68)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{Allocation, Block};
    use crate::model::{parse_documents, Object};

    const CLUSTER: &str = r#"
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: vx}
spec: {cidr: 10.65.0.0/16, vxlanMode: CrossSubnet}
---
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: ip}
spec: {cidr: 10.70.0.0/16, ipipMode: Always}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.0.2.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2, annotations: {ocelot.dev/vxlan-tunnel-mac: "66:00:00:00:00:02"}}
status: {addresses: [{type: InternalIP, address: 192.0.2.12}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
spec: {podCIDR: 10.66.0.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.13}]}
---
apiVersion: v1
kind: Node
metadata: {name: ghost}
"#;

    fn cluster() -> Cluster {
        let (objs, _) = parse_documents(CLUSTER).unwrap();
        Cluster::from_objects(objs.iter().collect::<Vec<&Object>>())
    }

    fn alloc(node: &str) -> Allocation {
        Allocation {
            handle: format!("h-{node}"),
            node: node.into(),
            pod: String::new(),
            attrs: Default::default(),
        }
    }

    fn block(
        cidr: &str,
        pool: &str,
        owner: Option<&str>,
        allocs: &[(&str, &str)],
    ) -> (Cidr, Block) {
        let c: Cidr = cidr.parse().unwrap();
        let b = Block {
            cidr: c,
            pool: pool.into(),
            affinity: owner.map(String::from),
            allocations: allocs.iter().map(|(ip, n)| (ip.parse().unwrap(), alloc(n))).collect(),
            host_local: false,
        };
        (c, b)
    }

    fn settings() -> Settings {
        Settings { vni: 4096, vxlan_port: 4789, uplink_mtu: 0, uplink_mode: UplinkMode::Auto }
    }

    #[test]
    fn routes_follow_block_affinities_borrowed_addresses_and_pod_cidrs() {
        let ipam = IpamState {
            blocks: [
                block(
                    "10.65.0.0/26",
                    "vx",
                    Some("n1"),
                    &[("10.65.0.1", "n1"), ("10.65.0.9", "n2")],
                ),
                block("10.65.0.64/26", "vx", Some("n2"), &[("10.65.0.65", "n2")]),
                block("10.70.0.0/26", "ip", Some("n2"), &[]),
                block("10.65.1.0/26", "vx", Some("n3"), &[]),
                block("10.65.2.0/26", "vx", Some("gone"), &[]),
            ]
            .into_iter()
            .collect(),
        };
        let o = compute(&cluster(), &ipam, "n1", 24, &settings()).unwrap();
        assert_eq!(o.local_ip, "192.0.2.11".parse::<Ipv4Addr>().unwrap());
        assert_eq!(o.vtep_mac, MacAddr::local_from_seed(b"vtep:n1"));
        let names: Vec<&str> = o.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n2", "n3"], "the node without an address is left out");
        assert_eq!(o.nodes[0].vtep_mac, "66:00:00:00:00:02".parse().unwrap());
        let r: Vec<(String, &str, Encap)> =
            o.routes.iter().map(|r| (r.cidr.to_string(), r.node.as_str(), r.encap)).collect();
        assert_eq!(
            r,
            [
                // Borrowed by n2 from our block: a host route to n2.
                ("10.65.0.9/32".to_string(), "n2", Encap::Native),
                // CrossSubnet: n2 shares our /24, so no encapsulation...
                ("10.65.0.64/26".to_string(), "n2", Encap::Native),
                // ...n3 does not.
                ("10.65.1.0/26".to_string(), "n3", Encap::Vxlan),
                // A podCIDR outside every pool: routed natively.
                ("10.66.0.0/24".to_string(), "n3", Encap::Native),
                ("10.70.0.0/26".to_string(), "n2", Encap::Ipip),
            ]
        );
        // From n2's side, the block borrowed from n1 is n2's own address.
        let o2 = compute(&cluster(), &ipam, "n2", 24, &settings()).unwrap();
        assert!(o2.routes.iter().all(|r| r.cidr.to_string() != "10.65.0.9/32"));
        assert!(o2.routes.iter().any(|r| r.cidr.to_string() == "10.65.0.0/26" && r.node == "n1"));
    }

    #[test]
    fn encapsulation_modes() {
        let pool = |vx: EncapMode, ip: EncapMode| {
            let mut p = cluster().pools["vx"].clone();
            p.spec.vxlan_mode = vx;
            p.spec.ipip_mode = ip;
            p
        };
        use EncapMode::*;
        assert_eq!(encap_for(Some(&pool(Always, Never)), true), Encap::Vxlan);
        assert_eq!(encap_for(Some(&pool(CrossSubnet, Never)), true), Encap::Native);
        assert_eq!(encap_for(Some(&pool(CrossSubnet, Never)), false), Encap::Vxlan);
        assert_eq!(encap_for(Some(&pool(Never, Always)), true), Encap::Ipip);
        assert_eq!(encap_for(Some(&pool(Never, CrossSubnet)), false), Encap::Ipip);
        assert_eq!(encap_for(Some(&pool(Never, CrossSubnet)), true), Encap::Native);
        assert_eq!(encap_for(Some(&pool(Never, Never)), false), Encap::Native);
        assert_eq!(encap_for(Some(&pool(Always, Always)), false), Encap::Vxlan);
        assert_eq!(encap_for(None, false), Encap::Native);
    }

    #[test]
    fn no_overlay_without_our_node_or_its_address() {
        let ipam = IpamState::default();
        assert!(compute(&cluster(), &ipam, "nobody", 24, &settings()).is_err());
        assert!(compute(&cluster(), &ipam, "ghost", 24, &settings()).is_err());
    }

    #[test]
    fn pod_mtu_subtracts_the_largest_overhead_of_the_enabled_pools() {
        let c = cluster();
        assert_eq!(pod_mtu(1500, c.pools.values()), 1450);
        let ipip_only = c.pools.values().filter(|p| p.metadata.name == "ip");
        assert_eq!(pod_mtu(9000, ipip_only), 8980);
        let mut native = c.pools["vx"].clone();
        native.spec.vxlan_mode = EncapMode::Never;
        assert_eq!(pod_mtu(1500, [&native]), 1500);
        let mut off = c.pools["vx"].clone();
        off.spec.disabled = true;
        assert_eq!(pod_mtu(1500, [&off, &native]), 1500);
    }
}
