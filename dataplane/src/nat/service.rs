//! The compiled form of a [`ServicesSpec`]: frontends by (protocol,
//! address, port), each service port's backends with one Maglev table per
//! set of backends that may take new connections, and the natOutgoing
//! rules. Built by the control thread, read by the workers (immutable,
//! inside [`crate::tables::Tables`]).

use super::maglev::{self, Maglev};
use crate::api::{Cidr, FrontendKind, ServicesSpec};
use rustc_hash::FxHashMap;
use std::net::{IpAddr, Ipv4Addr};

/// The address hairpin flows are translated from (a pod reaching a Service
/// it backs itself): link-local, so it never collides with a real address,
/// routed by every pod via its default route to the gateway, hence back
/// into the dataplane. Cilium's default service loopback address.
pub const HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// The default source ports of translated flows: 61440-65535, outside
/// Linux's ephemeral range (32768-60999) so replies never meet a local
/// socket, and a power-of-two block so one mask selects them for steering.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61440, 65535);

/// One backend of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub local: bool,
}

/// A set of backends that take new connections, and its lookup table.
#[derive(Clone, Debug, Default)]
pub struct BackendSet {
    /// Indices into [`Service::backends`], ascending.
    pub members: Vec<u32>,
    pub table: Option<Maglev>,
}

impl BackendSet {
    /// The kube-proxy rule: ready (and not terminating) backends; when
    /// none is, the serving ones (which, ready being false, are
    /// terminating); `filter` restricts to local backends for the `Local`
    /// traffic policies.
    fn build(spec: &crate::api::ServiceSpec, local_only: bool) -> BackendSet {
        let eligible = |b: &&crate::api::Backend| !local_only || b.local;
        let mut members: Vec<u32> = (0..spec.backends.len() as u32)
            .filter(|&i| {
                let b = &spec.backends[i as usize];
                eligible(&b) && b.ready && !b.terminating
            })
            .collect();
        if members.is_empty() {
            members = (0..spec.backends.len() as u32)
                .filter(|&i| {
                    let b = &spec.backends[i as usize];
                    eligible(&b) && b.serving
                })
                .collect();
        }
        let names: Vec<Vec<u8>> = members
            .iter()
            .map(|&i| {
                let b = &spec.backends[i as usize];
                format!("{}:{}", b.addr, b.port).into_bytes()
            })
            .collect();
        // Slots name backends directly: one memory access per choice.
        let table = Maglev::build(&names).map(|t| t.map(|i| members[i as usize]));
        BackendSet { members, table }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The backend (index into [`Service::backends`]) for `flow_hash`.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<u32> {
        Some(self.table.as_ref()?.pick(flow_hash))
    }

    pub fn contains(&self, backend: u32) -> bool {
        self.members.binary_search(&backend).is_ok()
    }
}

/// One service port.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub proto: u8,
    pub backends: Vec<Backend>,
    /// New connections to the cluster IP (internal traffic policy).
    pub internal: BackendSet,
    /// New connections to node ports and external IPs (external traffic
    /// policy); shares nothing with `internal` but the backends.
    pub external: BackendSet,
    /// `sessionAffinity: ClientIP` timeout; 0 = none.
    pub affinity_ms: u64,
    pub external_local: bool,
    /// Backend index by address and port, for affinity and checks.
    pub index: FxHashMap<(Ipv4Addr, u16), u32>,
}

/// A frontend, as the workers find it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendRef {
    pub service: u32,
    pub kind: FrontendKind,
}

/// Source NAT of pod traffic leaving the cluster.
#[derive(Clone, Debug, Default)]
pub struct NatOutgoing {
    pub sources: Vec<Cidr>,
    pub exclude: Vec<Cidr>,
    /// `None`: the uplink's address (known once the overlay is set).
    pub addr: Option<Ipv4Addr>,
}

impl NatOutgoing {
    /// Does a flow from `src` to `dst` leave with the node's address?
    #[inline]
    pub fn applies(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let (s, d) = (IpAddr::V4(src), IpAddr::V4(dst));
        self.sources.iter().any(|c| c.contains(s)) && !self.exclude.iter().any(|c| c.contains(d))
    }
}

/// Everything the workers translate with.
#[derive(Clone, Debug, Default)]
pub struct Services {
    pub services: Vec<Service>,
    pub frontends: FxHashMap<(u8, Ipv4Addr, u16), FrontendRef>,
    /// NodePort frontends given on 0.0.0.0: any of the node's addresses.
    pub any_addr_node_ports: FxHashMap<(u8, u16), FrontendRef>,
    /// The node's own addresses (NodePort on 0.0.0.0, SNAT for NodePort).
    pub node_addrs: Vec<Ipv4Addr>,
    pub node_port_range: (u16, u16),
    pub nat_outgoing: NatOutgoing,
    /// Source ports of translated flows (natOutgoing, hairpin, NodePort).
    pub snat_ports: (u16, u16),
    /// Bytes of the lookup tables, for the state reply.
    pub table_bytes: usize,
    /// The address natOutgoing translates to: the spec's, else the node's
    /// first (uplink) address; `None`: natOutgoing cannot apply yet.
    pub nat_addr: Option<Ipv4Addr>,
    /// The cluster-IP ranges (the node routes them to the host port).
    pub service_cidrs: Vec<Cidr>,
    /// Every address translated flows may leave from (their replies are
    /// steered to the dataplane): `nat_addr` and the node's addresses.
    pub snat_addrs: Vec<Ipv4Addr>,
}

/// Why a spec is refused.
pub type SpecError = String;

fn v4(ip: IpAddr, what: &str) -> Result<Ipv4Addr, SpecError> {
    match ip {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(format!("{what} {ip}: only IPv4 is supported")),
    }
}

impl Services {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.any_addr_node_ports.is_empty()
            && self.nat_outgoing.sources.is_empty()
    }

    /// Do flows get translated to a node address (`nat_addr`), so that
    /// their replies, addressed to the node, must be steered from the
    /// uplink into the dataplane? natOutgoing; node ports and external IPs
    /// (their requests are steered too, and flows to another node's
    /// backend leave with a node address); and a cluster IP with a backend
    /// on another node (the node's own connections to it).
    pub fn needs_steering(&self) -> bool {
        if self.nat_addr.is_none() {
            return false;
        }
        !self.nat_outgoing.sources.is_empty()
            || !self.any_addr_node_ports.is_empty()
            || self.frontends.values().any(|f| {
                f.kind != FrontendKind::ClusterIp || {
                    let s = &self.services[f.service as usize];
                    s.internal.members.iter().any(|&i| !s.backends[i as usize].local)
                }
            })
    }

    /// Check a whole spec and compile it; nothing is built from a spec with
    /// any error. `node_addrs` are the node's addresses (for NodePort), the
    /// uplink's first (natOutgoing's default).
    pub fn compile(spec: &ServicesSpec, node_addrs: &[Ipv4Addr]) -> Result<Services, SpecError> {
        let mut s = Services {
            node_addrs: node_addrs.to_vec(),
            node_port_range: spec.node_port_range,
            snat_ports: spec.nat_outgoing.ports,
            ..Default::default()
        };
        let (lo, hi) = spec.node_port_range;
        if lo == 0 || lo > hi {
            return Err(format!("node_port_range {lo}-{hi}: expected 1 <= first <= last"));
        }
        let (plo, phi) = spec.nat_outgoing.ports;
        if plo < 1024 || plo > phi {
            return Err(format!("nat_outgoing.ports {plo}-{phi}: expected 1024 <= first <= last"));
        }
        for c in spec.service_cidrs.iter() {
            v4(c.addr, "service CIDR")?;
            s.service_cidrs.push(c.network());
        }
        let mut names = std::collections::HashSet::new();
        for (si, svc) in spec.services.iter().enumerate() {
            let what = |m: String| format!("service {:?}: {m}", svc.name);
            if svc.name.is_empty() {
                return Err(format!("service #{si}: empty name"));
            }
            if !names.insert(svc.name.as_str()) {
                return Err(what("listed twice".into()));
            }
            let proto = svc.proto.number();
            let mut backends = Vec::with_capacity(svc.backends.len());
            let mut index = FxHashMap::default();
            for b in &svc.backends {
                let addr = v4(b.addr, "backend").map_err(what)?;
                if b.port == 0 {
                    return Err(what(format!("backend {addr} has port 0")));
                }
                if index.insert((addr, b.port), backends.len() as u32).is_some() {
                    return Err(what(format!("backend {addr}:{} listed twice", b.port)));
                }
                backends.push(Backend { addr, port: b.port, local: b.local });
            }
            let r = FrontendRef { service: si as u32, kind: FrontendKind::ClusterIp };
            for f in &svc.frontends {
                let addr = v4(f.addr, "frontend").map_err(what)?;
                if f.port == 0 {
                    return Err(what(format!("frontend {addr} has port 0")));
                }
                let r = FrontendRef { kind: f.kind, ..r };
                let dup = if addr.is_unspecified() {
                    if f.kind != FrontendKind::NodePort {
                        return Err(what(format!(
                            "frontend 0.0.0.0:{} must be a node port",
                            f.port
                        )));
                    }
                    s.any_addr_node_ports.insert((proto, f.port), r).is_some()
                } else {
                    s.frontends.insert((proto, addr, f.port), r).is_some()
                };
                if dup {
                    return Err(what(format!(
                        "frontend {addr}:{}/{:?} is already used by another service",
                        f.port, svc.proto
                    )));
                }
            }
            let internal = BackendSet::build(svc, svc.internal_local);
            let external = BackendSet::build(svc, svc.external_local);
            s.table_bytes += internal.table.as_ref().map_or(0, Maglev::bytes)
                + external.table.as_ref().map_or(0, Maglev::bytes);
            s.services.push(Service {
                name: svc.name.clone(),
                proto,
                backends,
                internal,
                external,
                affinity_ms: u64::from(svc.affinity_timeout_s) * 1000,
                external_local: svc.external_local,
                index,
            });
        }
        // A node port on 0.0.0.0 and the same port on a node address.
        for ((proto, addr, port), _) in s.frontends.iter() {
            if s.any_addr_node_ports.contains_key(&(*proto, *port)) && s.node_addrs.contains(addr) {
                return Err(format!("frontend {addr}:{port} is also a node port on 0.0.0.0"));
            }
        }
        let n = &spec.nat_outgoing;
        for c in n.sources.iter().chain(&n.exclude) {
            v4(c.addr, "nat_outgoing prefix")?;
        }
        s.nat_outgoing = NatOutgoing {
            sources: n.sources.clone(),
            exclude: n.exclude.clone(),
            addr: n.addr.map(|a| v4(a, "nat_outgoing.addr")).transpose()?,
        };
        s.nat_addr = s.nat_outgoing.addr.or(node_addrs.first().copied());
        s.snat_addrs = node_addrs.to_vec();
        if let Some(a) = s.nat_addr.filter(|a| !node_addrs.contains(a)) {
            s.snat_addrs.push(a);
        }
        Ok(s)
    }

    /// The frontend a packet to `dst`:`port` over `proto` is for.
    #[inline]
    pub fn frontend(&self, proto: u8, dst: Ipv4Addr, port: u16) -> Option<FrontendRef> {
        if let Some(r) = self.frontends.get(&(proto, dst, port)) {
            return Some(*r);
        }
        if !self.any_addr_node_ports.is_empty()
            && (self.node_port_range.0..=self.node_port_range.1).contains(&port)
            && self.node_addrs.contains(&dst)
        {
            return self.any_addr_node_ports.get(&(proto, port)).copied();
        }
        None
    }

    /// Is `port` one of the translated source ports?
    #[inline]
    pub fn is_snat_port(&self, port: u16) -> bool {
        (self.snat_ports.0..=self.snat_ports.1).contains(&port)
    }
}

impl Service {
    /// The set new connections through a frontend of `kind` choose from.
    #[inline]
    pub fn set(&self, kind: FrontendKind) -> &BackendSet {
        match kind {
            FrontendKind::ClusterIp => &self.internal,
            FrontendKind::NodePort | FrontendKind::ExternalIp => &self.external,
        }
    }
}

/// The hash of a flow that picks its backend: its 5-tuple as the client
/// sent it.
#[inline]
pub fn flow_hash(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> u64 {
    let a = u64::from(u32::from(src.0)) << 32 | u64::from(u32::from(dst.0));
    let b = u64::from(src.1) << 24 | u64::from(dst.1) << 8 | u64::from(proto);
    maglev::mix(a ^ maglev::mix(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Backend as B, Frontend, NatOutgoingSpec, ServiceSpec};
    use crate::policy::Proto;

    pub(crate) fn backend(addr: &str, ready: bool, serving: bool, terminating: bool) -> B {
        B { addr: addr.parse().unwrap(), port: 8080, local: true, ready, serving, terminating }
    }

    fn svc(name: &str, vip: &str, backends: Vec<B>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            proto: Proto::Tcp,
            frontends: vec![Frontend {
                addr: vip.parse().unwrap(),
                port: 80,
                kind: FrontendKind::ClusterIp,
            }],
            backends,
            affinity_timeout_s: 0,
            external_local: false,
            internal_local: false,
        }
    }

    fn spec(services: Vec<ServiceSpec>) -> ServicesSpec {
        ServicesSpec { services, ..Default::default() }
    }

    #[test]
    fn ready_backends_first_then_serving_never_terminating_while_one_is_ready() {
        let s = Services::compile(
            &spec(vec![svc(
                "a/x:80",
                "10.96.0.10",
                vec![
                    backend("10.65.0.2", true, true, false),
                    backend("10.65.0.3", false, true, true),
                    backend("10.65.0.4", false, false, false),
                ],
            )]),
            &[],
        )
        .unwrap();
        assert_eq!(s.services[0].internal.members, vec![0]);
        let s = Services::compile(
            &spec(vec![svc(
                "a/x:80",
                "10.96.0.10",
                vec![
                    backend("10.65.0.3", false, true, true),
                    backend("10.65.0.4", false, false, false),
                ],
            )]),
            &[],
        )
        .unwrap();
        assert_eq!(s.services[0].internal.members, vec![0], "serving fallback");
        let f = s.frontend(6, "10.96.0.10".parse().unwrap(), 80).unwrap();
        assert_eq!(f.kind, FrontendKind::ClusterIp);
        assert!(s.frontend(6, "10.96.0.10".parse().unwrap(), 81).is_none());
        assert!(s.frontend(17, "10.96.0.10".parse().unwrap(), 80).is_none());
    }

    #[test]
    fn local_policies_restrict_the_sets() {
        let mut sp = svc(
            "a/x:80",
            "10.96.0.10",
            vec![backend("10.65.0.2", true, true, false), backend("10.65.1.2", true, true, false)],
        );
        sp.backends[1].local = false;
        sp.internal_local = true;
        let s = Services::compile(&spec(vec![sp]), &[]).unwrap();
        assert_eq!(s.services[0].internal.members, vec![0]);
        assert_eq!(s.services[0].external.members, vec![0, 1]);
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let ok = svc("a/x:80", "10.96.0.10", vec![backend("10.65.0.2", true, true, false)]);
        let dup_frontend = svc("a/y:80", "10.96.0.10", vec![]);
        let e = Services::compile(&spec(vec![ok.clone(), dup_frontend]), &[]).unwrap_err();
        assert!(e.contains("already used"), "{e}");
        let e = Services::compile(&spec(vec![ok.clone(), ok.clone()]), &[]).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let mut p0 = ok.clone();
        p0.frontends[0].port = 0;
        assert!(Services::compile(&spec(vec![p0]), &[]).unwrap_err().contains("port 0"));
        let mut v6 = ok.clone();
        v6.backends[0].addr = "fd00::1".parse().unwrap();
        assert!(Services::compile(&spec(vec![v6]), &[]).unwrap_err().contains("IPv4"));
        let mut bp = ok.clone();
        bp.backends[0].port = 0;
        assert!(Services::compile(&spec(vec![bp]), &[]).unwrap_err().contains("port 0"));
        let mut any = ok;
        any.frontends[0].addr = "0.0.0.0".parse().unwrap();
        assert!(Services::compile(&spec(vec![any]), &[]).unwrap_err().contains("node port"));
        let bad_range = ServicesSpec { node_port_range: (40000, 30000), ..Default::default() };
        assert!(Services::compile(&bad_range, &[]).is_err());
        let bad_nat = ServicesSpec {
            nat_outgoing: NatOutgoingSpec {
                addr: Some("fd00::1".parse().unwrap()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(Services::compile(&bad_nat, &[]).is_err());
    }

    #[test]
    fn node_ports_on_any_address_match_the_node_addresses_only() {
        let mut sp = svc("a/x:80", "10.96.0.10", vec![backend("10.65.0.2", true, true, false)]);
        sp.frontends.push(Frontend {
            addr: "0.0.0.0".parse().unwrap(),
            port: 30080,
            kind: FrontendKind::NodePort,
        });
        let node: Ipv4Addr = "192.0.2.10".parse().unwrap();
        let s = Services::compile(&spec(vec![sp]), &[node]).unwrap();
        assert_eq!(s.frontend(6, node, 30080).map(|f| f.kind), Some(FrontendKind::NodePort));
        assert!(s.frontend(6, "192.0.2.11".parse().unwrap(), 30080).is_none());
    }

    #[test]
    fn nat_outgoing_sources_and_exclusions() {
        let n = NatOutgoing {
            sources: vec!["10.65.0.0/16".parse().unwrap()],
            exclude: vec!["10.65.0.0/16".parse().unwrap(), "10.96.0.0/12".parse().unwrap()],
            addr: None,
        };
        let p = "10.65.0.2".parse().unwrap();
        assert!(n.applies(p, "198.51.100.7".parse().unwrap()));
        assert!(!n.applies(p, "10.65.3.3".parse().unwrap()));
        assert!(!n.applies(p, "10.96.0.10".parse().unwrap()));
        assert!(!n.applies("10.70.0.2".parse().unwrap(), "198.51.100.7".parse().unwrap()));
    }
}
