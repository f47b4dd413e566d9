//! The lab's underlay: the subnets nodes sit on, one bridge each in the
//! fabric namespace, and the fabric namespace routing between them.
//!
//! Subnet 0 is the fabric CIDR (`--fabric-cidr`, default `192.0.2.0/24`,
//! bridge `ocl-br0`). Subnets 1, 2, ... come from `--subnet-cidrs` (default
//! `198.51.100.0/24,203.0.113.0/24`: like subnet 0, RFC 5737 documentation
//! ranges, so nothing real is shadowed), bridge `ocl-br<k>`. A Node picks
//! its subnet with the annotation `lab.ocelot.dev/subnet: "<k>"` (default 0),
//! fixed for the node's life. Every bridge carries its subnet's `.1`, the
//! fabric namespace forwards, and every node has a default route via its
//! subnet's `.1`: racks on different L3 subnets, joined by a router.
//!
//! ```text
//!  fabric netns (ip_forward=1)
//!    ocl-br0 192.0.2.1/24     ── ocl-n1 ═ node-1 192.0.2.11     default via 192.0.2.1
//!                             └─ ocl-n2 ═ node-2 192.0.2.12     default via 192.0.2.1
//!    ocl-br1 198.51.100.1/24  ── ocl-n3 ═ node-3 198.51.100.13  default via 198.51.100.1
//! ```

use crate::lab::cluster::{progress, Lab};
use crate::lab::names;
use crate::lab::state::{NodeState, Resource};
use crate::lab::sys;
use crate::model::{Node, NodeAddress};
use anyhow::{anyhow, bail};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The Node annotation choosing a node's subnet in the lab manifest.
pub const SUBNET_ANNOTATION: &str = "lab.ocelot.dev/subnet";
/// The Node annotation the lab writes: the node's address with its
/// subnet's prefix, so agents can tell which subnet a peer is on.
pub const UNDERLAY_CIDR_ANNOTATION: &str = "ocelot.dev/underlay-cidr";
/// Subnets 1, 2, ... unless `--subnet-cidrs` says otherwise.
pub const DEFAULT_SUBNET_CIDRS: &str = "198.51.100.0/24,203.0.113.0/24";

/// One underlay subnet, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub index: u32,
    /// As configured, e.g. `198.51.100.0/24`.
    pub cidr: String,
    pub base: Ipv4Addr,
    pub prefix: u8,
    /// Its bridge in the fabric namespace.
    pub bridge: String,
}

impl Subnet {
    /// The router's address on the subnet (its bridge): `.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// Node number `index`'s address: `.10 + index` in the subnet.
    pub fn node_address(&self, index: u32) -> anyhow::Result<Ipv4Addr> {
        let host = 10 + u64::from(index);
        if host >= (1u64 << (32 - self.prefix)) - 1 {
            bail!("subnet {} ({}) has no room for node number {index}", self.index, self.cidr);
        }
        Ok(Ipv4Addr::from(u32::from(self.base) + host as u32))
    }

    /// A fixed MAC for the bridge, so it keeps its address as ports come
    /// and go (nodes' ARP entries for the gateway stay right).
    pub fn bridge_mac(&self) -> String {
        format!("02:6f:63:6c:{:02x}:{:02x}", (self.index >> 8) & 0xff, self.index & 0xff)
    }
}

/// An IPv4 CIDR: base address (host bits cleared) and prefix length.
pub fn parse_cidr(s: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/').ok_or_else(|| anyhow!("{s:?} is not an IPv4 CIDR"))?;
    let a: Ipv4Addr = a.parse().map_err(|_| anyhow!("{s:?} is not an IPv4 CIDR"))?;
    let p: u8 = p.parse().ok().filter(|p| *p <= 30).ok_or_else(|| anyhow!("{s:?}: prefix 0-30"))?;
    Ok((Ipv4Addr::from(u32::from(a) & mask(p)), p))
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

/// Subnet `k`: the fabric CIDR for 0, else the k-th of `extra`.
pub fn subnet(fabric_cidr: &str, extra: &[String], k: u32) -> anyhow::Result<Subnet> {
    let cidr = match k {
        0 => fabric_cidr,
        _ => extra.get(k as usize - 1).map(String::as_str).ok_or_else(|| {
            anyhow!(
                "subnet {k} is not configured: this lab has subnets 0-{} (0 is --fabric-cidr \
                 {fabric_cidr}; `ocelot lab up --subnet-cidrs A,B,...` sets 1, 2, ...)",
                extra.len()
            )
        })?,
    };
    let (base, prefix) = parse_cidr(cidr).map_err(|e| anyhow!("subnet {k}: {e}"))?;
    let bridge = names::bridge(k);
    if bridge.len() > names::MAX_IFNAME {
        bail!("subnet {k}: too many subnets (bridge name {bridge} is too long)");
    }
    Ok(Subnet { index: k, cidr: cidr.to_string(), base, prefix, bridge })
}

/// Every configured subnet parses, and no two overlap (the router could
/// not tell them apart).
pub fn check_subnets(fabric_cidr: &str, extra: &[String]) -> anyhow::Result<()> {
    let all: Vec<Subnet> = (0..=extra.len() as u32)
        .map(|k| subnet(fabric_cidr, extra, k))
        .collect::<Result<_, _>>()?;
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            let m = mask(a.prefix.min(b.prefix));
            if u32::from(a.base) & m == u32::from(b.base) & m {
                bail!(
                    "subnet {} ({}) overlaps subnet {} ({}); give --fabric-cidr and \
                     --subnet-cidrs disjoint ranges",
                    a.index,
                    a.cidr,
                    b.index,
                    b.cidr
                );
            }
        }
    }
    Ok(())
}

/// The subnet a Node asks for (`lab.ocelot.dev/subnet`, default 0).
pub fn node_subnet(n: &Node) -> anyhow::Result<u32> {
    match n.metadata.annotations.get(SUBNET_ANNOTATION) {
        None => Ok(0),
        Some(v) => v.trim().parse().map_err(|_| {
            anyhow!(
                "node {}: annotation {SUBNET_ANNOTATION}: {v:?} is not a subnet number (0, 1, ...)",
                n.metadata.name
            )
        }),
    }
}

/// Check the subnets of nodes about to be applied: the annotation is a
/// number, the subnet is configured, and a node already in the lab keeps
/// its subnet.
pub fn check_nodes(
    fabric_cidr: &str,
    extra: &[String],
    existing: &BTreeMap<String, NodeState>,
    nodes: &[Node],
) -> anyhow::Result<()> {
    for n in nodes {
        let name = &n.metadata.name;
        let k = node_subnet(n)?;
        subnet(fabric_cidr, extra, k).map_err(|e| anyhow!("node {name}: {e}"))?;
        if let Some(st) = existing.get(name).filter(|st| st.subnet != k) {
            bail!(
                "node {name}: {SUBNET_ANNOTATION} cannot change in a running lab ({} -> {k}); \
                 delete the node first",
                st.subnet
            );
        }
    }
    Ok(())
}

/// The Node object as the lab writes it: its address as the `InternalIP`,
/// and the same address with its subnet's prefix as `ocelot.dev/underlay-cidr`.
pub fn node_object(mut n: Node, st: &NodeState) -> Node {
    n.status.addresses.retain(|a| a.kind != "InternalIP");
    n.status
        .addresses
        .insert(0, NodeAddress { kind: "InternalIP".into(), address: st.fabric_ip.clone() });
    n.metadata.annotations.insert(UNDERLAY_CIDR_ANNOTATION.into(), st.underlay_cidr());
    n
}

impl Lab {
    /// Subnet `k` resolved against the lab's configuration.
    pub fn subnet(&self, k: u32) -> anyhow::Result<Subnet> {
        subnet(&self.state.fabric_cidr, &self.state.subnet_cidrs, k)
    }

    /// Subnet `k`'s bridge in the fabric namespace, up, holding the
    /// subnet's `.1`: made on first use (recorded first, so `down` removes
    /// it), checked on every later use.
    pub fn ensure_subnet(&mut self, k: u32) -> anyhow::Result<Subnet> {
        let s = self.subnet(k)?;
        let ns = names::fabric_netns(&self.state.name);
        let gw = format!("{}/{}", s.gateway(), s.prefix);
        if !sys::link_exists(&ns, &s.bridge)? {
            progress!("fabric: subnet {k} {}: bridge {}, router address {gw}", s.cidr, s.bridge);
            self.state.record(Resource::Link { netns: ns.clone(), name: s.bridge.clone() })?;
            let mac = s.bridge_mac();
            sys::ip(&["-n", &ns, "link", "add", &s.bridge, "address", &mac, "type", "bridge"])?;
        }
        sys::ip(&["-n", &ns, "addr", "replace", &gw, "dev", &s.bridge])?;
        sys::ip(&["-n", &ns, "link", "set", &s.bridge, "up"])?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectMeta;

    fn extra() -> Vec<String> {
        DEFAULT_SUBNET_CIDRS.split(',').map(String::from).collect()
    }

    fn node(name: &str, subnet: Option<&str>) -> Node {
        let mut n = Node {
            metadata: ObjectMeta { name: name.into(), ..Default::default() },
            ..Default::default()
        };
        if let Some(s) = subnet {
            n.metadata.annotations.insert(SUBNET_ANNOTATION.into(), s.into());
        }
        n
    }

    fn state(name: &str, subnet: u32, ip: &str) -> NodeState {
        NodeState {
            name: name.into(),
            index: 1,
            netns: String::new(),
            subnet,
            fabric_ip: ip.into(),
            fabric_prefix: 24,
            dir: Default::default(),
            dataplane: None,
            agent: None,
        }
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(parse_cidr("192.0.2.7/24").unwrap(), (Ipv4Addr::new(192, 0, 2, 0), 24));
        assert!(parse_cidr("192.0.2.0").is_err());
        assert!(parse_cidr("192.0.2.0/31").is_err());
        assert!(parse_cidr("fd00::/64").is_err());
    }

    #[test]
    fn subnet_addresses() {
        let x = extra();
        let s0 = subnet("192.0.2.0/24", &x, 0).unwrap();
        assert_eq!((s0.bridge.as_str(), s0.gateway()), ("ocl-br0", Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(s0.node_address(1).unwrap(), Ipv4Addr::new(192, 0, 2, 11));
        let s1 = subnet("192.0.2.0/24", &x, 1).unwrap();
        assert_eq!((s1.base, s1.prefix), (Ipv4Addr::new(198, 51, 100, 0), 24));
        assert_eq!(s1.bridge, "ocl-br1");
        assert_eq!(s1.gateway(), Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(s1.node_address(3).unwrap(), Ipv4Addr::new(198, 51, 100, 13));
        let s2 = subnet("192.0.2.0/24", &x, 2).unwrap();
        assert_eq!(s2.node_address(4).unwrap(), Ipv4Addr::new(203, 0, 113, 14));
        assert_eq!(s2.bridge_mac(), "02:6f:63:6c:00:02");
        let wide = subnet("198.18.0.0/15", &x, 0).unwrap();
        assert_eq!(wide.node_address(300).unwrap(), Ipv4Addr::new(198, 18, 1, 54));
        assert!(subnet("192.0.2.0/28", &x, 0).unwrap().node_address(5).is_err());
        let e = subnet("192.0.2.0/24", &x, 3).unwrap_err().to_string();
        assert!(e.contains("subnet 3 is not configured") && e.contains("0-2"), "{e}");
        assert!(subnet("192.0.2.0/24", &["nope".into()], 1).is_err());
    }

    #[test]
    fn configured_subnets_must_not_overlap() {
        assert!(check_subnets("192.0.2.0/24", &extra()).is_ok());
        assert!(check_subnets("192.0.2.0/24", &[]).is_ok());
        let e = check_subnets("198.51.0.0/16", &extra()).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
        assert!(check_subnets("192.0.2.0/24", &["192.0.2.128/25".into()]).is_err());
        assert!(check_subnets("192.0.2.0/24", &["bad".into()]).is_err());
    }

    #[test]
    fn nodes_choose_their_subnet() {
        assert_eq!(node_subnet(&node("a", None)).unwrap(), 0);
        assert_eq!(node_subnet(&node("a", Some("1"))).unwrap(), 1);
        for bad in ["", "-1", "one", "1.5"] {
            let e = node_subnet(&node("a", Some(bad))).unwrap_err().to_string();
            assert!(e.contains(SUBNET_ANNOTATION), "{e}");
        }
        let x = extra();
        let none = BTreeMap::new();
        assert!(check_nodes("192.0.2.0/24", &x, &none, &[node("a", Some("2"))]).is_ok());
        let e = check_nodes("192.0.2.0/24", &x, &none, &[node("a", Some("3"))]).unwrap_err();
        assert!(e.to_string().starts_with("node a: subnet 3 is not configured"), "{e}");
        let running: BTreeMap<String, NodeState> =
            [("a".to_string(), state("a", 0, "192.0.2.11"))].into_iter().collect();
        assert!(check_nodes("192.0.2.0/24", &x, &running, &[node("a", None)]).is_ok());
        let e = check_nodes("192.0.2.0/24", &x, &running, &[node("a", Some("1"))]).unwrap_err();
        assert!(e.to_string().contains("cannot change"), "{e}");
    }

    #[test]
    fn node_object_carries_address_and_underlay_cidr() {
        let mut n = node("c", Some("1"));
        n.status
            .addresses
            .push(NodeAddress { kind: "InternalIP".into(), address: "1.2.3.4".into() });
        n.status.addresses.push(NodeAddress { kind: "Hostname".into(), address: "c".into() });
        let out = node_object(n, &state("c", 1, "198.51.100.13"));
        assert_eq!(out.internal_ip(), Some("198.51.100.13".parse().unwrap()));
        assert_eq!(out.status.addresses.len(), 2);
        assert_eq!(out.metadata.annotations[UNDERLAY_CIDR_ANNOTATION], "198.51.100.13/24");
        assert_eq!(out.metadata.annotations[SUBNET_ANNOTATION], "1");
    }
}
