//! Services and natOutgoing: the cluster's Services and EndpointSlices,
//! seen from one node, as the dataplane's `ServicesSpec`. A pure function
//! of the cluster, tested without I/O; the agent recomputes it when the
//! datastore changes and sends it when it differs.
//!
//! One `ServiceSpec` per Service port:
//! - frontends: the IPv4 cluster IPs (`clusterIPs`, else `clusterIP`), each
//!   `nodePort` on this node's InternalIP (types NodePort and
//!   LoadBalancer), and the `externalIPs`;
//! - backends: the endpoints of the Service's EndpointSlices (label
//!   `kubernetes.io/service-name`, address type IPv4), with the port the
//!   slice gives the Service port's name (the endpoint controller resolves
//!   named target ports per pod), else the numeric `targetPort`, else
//!   `port`; `local` when the endpoint's node is this one; the conditions
//!   as the API defines their absence (ready: true, serving: ready,
//!   terminating: false).
//!
//! Bad input never stops the others: each problem is one line in
//! [`Output::problems`] and only the Service (or port, or endpoint) it
//! concerns is left out. Two Services claiming one frontend (a nodePort on
//! one protocol, say): the older keeps it (`creationTimestamp`, then name
//! order), as the API server would have refused the younger.

use crate::datastore::Cluster;
use crate::model::{EndpointSlice, IntOrString, Pod, Service, ServicePort};
use ocelot_dataplane::api::{
    Backend, Cidr, Frontend, FrontendKind, NatOutgoingSpec, ServiceSpec, ServicesSpec,
};
use ocelot_dataplane::policy::Proto;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The most the API allows (one day).
pub const MAX_AFFINITY_TIMEOUT_S: i64 = 86_400;
/// Kubernetes' default `--service-cluster-ip-range`.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

/// What is not in the datastore: the API server's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `--service-cluster-ip-range`: cluster IPs must be inside.
    pub service_cidrs: Vec<Cidr>,
    /// `--service-node-port-range`, inclusive.
    pub node_port_range: (u16, u16),
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            service_cidrs: vec![DEFAULT_SERVICE_CIDR.parse().expect("a valid CIDR")],
            node_port_range: ocelot_dataplane::api::default_node_port_range(),
        }
    }
}

/// `30000-32767` (both ends inclusive).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: a port range is FIRST-LAST, e.g. 30000-32767"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("{s:?}: {a:?} is not a port"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("{s:?}: {b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: the range must be 1-65535 and FIRST <= LAST"));
    }
    Ok((a, b))
}

/// The calculation's result: what to send, and what was left out and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub spec: ServicesSpec,
    /// One line per problem, naming the object (sorted, no duplicates).
    pub problems: Vec<String>,
}

/// A protocol as the API spells it (`TCP`, `UDP`, `SCTP`).
pub fn parse_proto(s: &str) -> Option<Proto> {
    match s {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        _ => None,
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
        Proto::Sctp => "SCTP",
    }
}

/// One Service port on its way to a `ServiceSpec`.
struct Candidate {
    /// Who wins a contested frontend: older first, then by name.
    age: (bool, String, String),
    spec: ServiceSpec,
}

/// The Services as node `me` forwards them, and natOutgoing for its pods.
pub fn compute(cluster: &Cluster, me: &str, settings: &Settings) -> Output {
    let mut problems = BTreeSet::new();
    let node_ip = cluster.nodes.get(me).and_then(crate::agent::overlay::node_ip);
    let slices = slices_by_service(cluster, &mut problems);
    let mut candidates = Vec::new();
    for (key, svc) in &cluster.services {
        let mut say = |m: String| {
            problems.insert(format!("Service {key}: {m}"));
        };
        candidates.extend(service(
            svc,
            slices.get(key),
            &cluster.pods,
            me,
            node_ip,
            settings,
            &mut say,
        ));
    }
    // Contested frontends: the older Service keeps each.
    candidates.sort_by(|a, b| a.age.cmp(&b.age).then(a.spec.name.cmp(&b.spec.name)));
    let mut owner: BTreeMap<(IpAddr, u16, Proto), String> = BTreeMap::new();
    let mut services = Vec::new();
    for mut c in candidates {
        let proto = c.spec.proto;
        c.spec.frontends.retain(|f| match owner.get(&(f.addr, f.port, proto)) {
            Some(first) => {
                problems.insert(format!(
                    "Service {}: {} {}:{}/{} is already {first}'s; left out",
                    c.spec.name,
                    kind_name(f.kind),
                    f.addr,
                    f.port,
                    proto_name(proto)
                ));
                false
            }
            None => {
                owner.insert((f.addr, f.port, proto), c.spec.name.clone());
                true
            }
        });
        if !c.spec.frontends.is_empty() {
            services.push(c.spec);
        }
    }
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Output {
        spec: ServicesSpec {
            services,
            service_cidrs: settings.service_cidrs.clone(),
            node_port_range: settings.node_port_range,
            nat_outgoing: nat_outgoing(cluster, node_ip, settings),
        },
        problems: problems.into_iter().collect(),
    }
}

fn kind_name(k: FrontendKind) -> &'static str {
    match k {
        FrontendKind::ClusterIp => "cluster IP",
        FrontendKind::NodePort => "nodePort",
        FrontendKind::ExternalIp => "external IP",
    }
}

/// The IPv4 EndpointSlices of each Service, by the Service's key; slices
/// naming no Service, or one that does not exist, are problems.
fn slices_by_service<'a>(
    cluster: &'a Cluster,
    problems: &mut BTreeSet<String>,
) -> BTreeMap<String, Vec<&'a EndpointSlice>> {
    let mut out: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for (key, s) in &cluster.endpoint_slices {
        let Some(svc) = s.service_key() else {
            problems.insert(format!(
                "EndpointSlice {key}: no {} label; ignored",
                crate::model::SERVICE_NAME_LABEL
            ));
            continue;
        };
        if !cluster.services.contains_key(&svc) {
            problems.insert(format!("EndpointSlice {key}: its Service {svc} does not exist"));
            continue;
        }
        if s.address_type != "IPv4" {
            continue;
        }
        out.entry(svc).or_default().push(s);
    }
    out
}

/// A Service's ports as candidates.
fn service(
    svc: &Service,
    slices: Option<&Vec<&EndpointSlice>>,
    pods: &BTreeMap<String, Pod>,
    me: &str,
    node_ip: Option<Ipv4Addr>,
    settings: &Settings,
    say: &mut dyn FnMut(String),
) -> Vec<Candidate> {
    let key = svc.key();
    let spec = &svc.spec;
    let kind = spec.kind.as_deref().unwrap_or("ClusterIP");
    let node_ports = match kind {
        "ClusterIP" => false,
        "NodePort" | "LoadBalancer" => true,
        "ExternalName" => return Vec::new(),
        other => {
            say(format!("unknown type {other:?}; left out"));
            return Vec::new();
        }
    };
    if spec.ports.is_empty() {
        say("no ports; left out".into());
        return Vec::new();
    }
    // Cluster IPs: `clusterIPs` wins over `clusterIP` (they agree when set
    // by the API server); `None` is headless.
    let listed: Vec<&str> = if spec.cluster_ips.is_empty() {
        spec.cluster_ip.as_deref().into_iter().collect()
    } else {
        spec.cluster_ips.iter().map(String::as_str).collect()
    };
    let mut cluster_ips = Vec::new();
    let mut headless = false;
    for s in listed {
        if s == "None" || s.is_empty() {
            headless = true;
            continue;
        }
        match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                if !settings.service_cidrs.iter().any(|c| c.contains(a.into())) {
                    let ranges: Vec<String> =
                        settings.service_cidrs.iter().map(|c| c.to_string()).collect();
                    say(format!(
                        "clusterIP {a} is outside the service range ({}); left out",
                        ranges.join(", ")
                    ));
                    return Vec::new();
                }
                cluster_ips.push(a);
            }
            Ok(IpAddr::V6(_)) => {} // IPv4 only, like the rest of the dataplane.
            Err(_) => {
                say(format!("clusterIP {s:?} is not an address; left out"));
                return Vec::new();
            }
        }
    }
    if cluster_ips.is_empty() && !headless && spec.selector.is_some() {
        say("no clusterIP allocated yet".into());
    }
    let mut external_ips = Vec::new();
    for s in &spec.external_ips {
        match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => external_ips.push(a),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => say(format!("externalIP {s:?} is not an address; ignored")),
        }
    }
    let policy = |field: &str, v: &Option<String>, say: &mut dyn FnMut(String)| match v.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            say(format!("{field} {other:?} is neither Cluster nor Local; Cluster used"));
            false
        }
    };
    let external_local = policy("externalTrafficPolicy", &spec.external_traffic_policy, say);
    let internal_local = policy("internalTrafficPolicy", &spec.internal_traffic_policy, say);
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => 0,
        Some("ClientIP") => {
            match spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()) {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(c) => match c.timeout_seconds {
                    None => DEFAULT_AFFINITY_TIMEOUT_S,
                    Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => t as u32,
                    Some(t) => {
                        say(format!(
                            "sessionAffinityConfig timeoutSeconds {t} is not 1-{MAX_AFFINITY_TIMEOUT_S}; \
                             {DEFAULT_AFFINITY_TIMEOUT_S} used"
                        ));
                        DEFAULT_AFFINITY_TIMEOUT_S
                    }
                },
            }
        }
        Some(other) => {
            say(format!("sessionAffinity {other:?} is neither None nor ClientIP; None used"));
            0
        }
    };
    let age = (
        svc.metadata.creation_timestamp.is_none(),
        svc.metadata.creation_timestamp.clone().unwrap_or_default(),
        key.clone(),
    );
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for p in &spec.ports {
        let label = p.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| p.port.to_string());
        let Some(proto) = parse_proto(&p.protocol) else {
            say(format!(
                "port {label}: unknown protocol {:?} (TCP, UDP, SCTP); left out",
                p.protocol
            ));
            continue;
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|x| *x != 0) else {
            say(format!("port {label}: {} is not a port number; left out", p.port));
            continue;
        };
        let mut name = format!("{key}:{label}");
        if !names.insert(name.clone()) {
            name = format!("{name}/{}", proto_name(proto));
            if !names.insert(name.clone()) {
                say(format!("port {label}/{} appears twice; left out", proto_name(proto)));
                continue;
            }
        }
        let mut frontends: Vec<Frontend> = cluster_ips
            .iter()
            .chain(&external_ips)
            .enumerate()
            .map(|(i, a)| Frontend {
                addr: (*a).into(),
                port,
                kind: if i < cluster_ips.len() {
                    FrontendKind::ClusterIp
                } else {
                    FrontendKind::ExternalIp
                },
            })
            .collect();
        if node_ports {
            match node_port(p, settings) {
                Ok(Some(np)) => match node_ip {
                    Some(ip) => frontends.push(Frontend {
                        addr: ip.into(),
                        port: np,
                        kind: FrontendKind::NodePort,
                    }),
                    None => say(format!(
                        "port {label}: nodePort {np} not served: node {me} has no InternalIP"
                    )),
                },
                Ok(None) => say(format!("port {label}: no nodePort allocated yet")),
                Err(e) => say(format!("port {label}: {e}; nodePort left out")),
            }
        }
        if frontends.is_empty() {
            continue;
        }
        let slices = slices.map(Vec::as_slice).unwrap_or(&[]);
        let backends = backends(p, proto, slices, pods, me, say);
        out.push(Candidate {
            age: age.clone(),
            spec: ServiceSpec {
                name,
                proto,
                frontends,
                backends,
                affinity_timeout_s,
                external_local,
                internal_local,
            },
        });
    }
    out
}

/// A port's `nodePort`, checked against the range.
fn node_port(p: &ServicePort, settings: &Settings) -> Result<Option<u16>, String> {
    let Some(np) = p.node_port else { return Ok(None) };
    let (lo, hi) = settings.node_port_range;
    match u16::try_from(np) {
        Ok(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
        _ => Err(format!("nodePort {np} is outside the range {lo}-{hi}")),
    }
}

/// The backends of one Service port from its slices.
fn backends(
    p: &ServicePort,
    proto: Proto,
    slices: &[&EndpointSlice],
    pods: &BTreeMap<String, Pod>,
    me: &str,
    say: &mut dyn FnMut(String),
) -> Vec<Backend> {
    let want_name = p.name.as_deref().unwrap_or("");
    let fallback: Option<u16> = match &p.target_port {
        None => u16::try_from(p.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|x| *x != 0),
        Some(IntOrString::Str(s)) => s.parse::<u16>().ok().filter(|x| *x != 0),
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in slices {
        let sp = s.ports.iter().find(|sp| {
            sp.name.as_deref().unwrap_or("") == want_name
                && parse_proto(&sp.protocol) == Some(proto)
        });
        if sp.is_none() && !s.ports.is_empty() {
            continue; // The slice's endpoints do not serve this port.
        }
        let port = match sp.and_then(|sp| sp.port) {
            Some(n) => match u16::try_from(n).ok().filter(|x| *x != 0) {
                Some(n) => n,
                None => {
                    say(format!("EndpointSlice {}: port {n} is not a port number", s.key()));
                    continue;
                }
            },
            None => match fallback {
                Some(n) => n,
                None => {
                    if !s.endpoints.is_empty() {
                        say(format!(
                            "EndpointSlice {}: no port named {want_name:?} resolves the named \
                             targetPort; its endpoints are left out of that port",
                            s.key()
                        ));
                    }
                    continue;
                }
            },
        };
        for e in &s.endpoints {
            let Some(first) = e.addresses.first() else { continue };
            if let Some(r) = e.target_ref.as_ref().filter(|r| r.kind == "Pod") {
                let pod = format!("{}/{}", r.namespace.as_deref().unwrap_or(s.namespace()), r.name);
                if !pods.contains_key(&pod) {
                    say(format!(
                        "EndpointSlice {}: endpoint {first} names Pod {pod}, which does not exist; \
                         left out",
                        s.key()
                    ));
                    continue;
                }
            }
            let addr = match first.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => a,
                _ => {
                    say(format!("EndpointSlice {}: {first:?} is not an IPv4 address", s.key()));
                    continue;
                }
            };
            if !seen.insert((addr, port)) {
                continue;
            }
            let ready = e.conditions.ready.unwrap_or(true);
            out.push(Backend {
                addr: addr.into(),
                port,
                local: e.node_name.as_deref() == Some(me),
                ready,
                serving: e.conditions.serving.unwrap_or(ready),
                terminating: e.conditions.terminating.unwrap_or(false),
            });
        }
    }
    out.sort_by_key(|b| (b.addr, b.port));
    out
}

/// natOutgoing: the pools that ask for it are translated to this node's
/// address when they leave the cluster (not toward any pool, Service range
/// or node).
fn nat_outgoing(
    cluster: &Cluster,
    node_ip: Option<Ipv4Addr>,
    settings: &Settings,
) -> NatOutgoingSpec {
    let pools: Vec<(Cidr, bool)> = cluster
        .pools
        .values()
        .filter_map(|p| {
            let c: Cidr = p.spec.cidr.parse().ok()?;
            c.addr.is_ipv4().then(|| (c.network(), p.spec.nat_outgoing && !p.spec.disabled))
        })
        .collect();
    let sources: Vec<Cidr> = pools.iter().filter(|(_, nat)| *nat).map(|(c, _)| *c).collect();
    let mut exclude: BTreeSet<Cidr> = pools.iter().map(|(c, _)| *c).collect();
    exclude.extend(settings.service_cidrs.iter().map(Cidr::network));
    for n in cluster.nodes.values() {
        if let Some(a) = crate::agent::overlay::node_ip(n) {
            exclude.insert(Cidr { addr: a.into(), len: 32 });
        }
        if let Some(c) = n.spec.pod_cidr.as_deref().and_then(|s| s.parse::<Cidr>().ok()) {
            if c.addr.is_ipv4() {
                exclude.insert(c.network());
            }
        }
    }
    NatOutgoingSpec {
        sources,
        exclude: if pools.iter().any(|(_, nat)| *nat) {
            exclude.into_iter().collect()
        } else {
            Vec::new()
        },
        addr: node_ip.map(IpAddr::V4),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
