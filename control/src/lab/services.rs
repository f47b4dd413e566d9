//! What the API server and the controller manager do for Services, since
//! the lab has neither:
//! - on `apply`, a Service without `clusterIP` gets one from the service
//!   range, and each port of a NodePort/LoadBalancer Service without
//!   `nodePort` gets one from the NodePort range; a Service applied again
//!   keeps what it had; taken or out-of-range values are refused with a
//!   clear error, as the API server refuses them;
//! - after every `apply` and `delete`, the EndpointSlices of every Service
//!   with a selector are derived from the lab's pods (the endpoint slice
//!   controller): the pods of the Service's namespace whose labels match,
//!   ready when the pod runs, on their node, a named `targetPort` resolved
//!   from each pod's container ports (pods resolving to different numbers
//!   land in different slices, as upstream). Slices the lab manages carry
//!   `endpointslice.kubernetes.io/managed-by`; others are left alone.

use crate::datastore::{Cluster, Datastore, DirDatastore};
use crate::lab::cluster::Lab;
use crate::lab::state::PodPhase;
use crate::model::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, IntOrString, Object, ObjectMeta,
    ObjectReference, Pod, Service, SERVICE_NAME_LABEL,
};
use anyhow::{anyhow, bail, Context};
use ocelot_dataplane::api::Cidr;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

/// The label upstream's controller puts on the slices it manages.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Ours.
pub const MANAGED_BY: &str = "endpointslice-controller.lab.ocelot.dev";

/// The lab's API-server settings for Services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges {
    pub service_cidr: Cidr,
    pub node_ports: (u16, u16),
}

fn is_node_port_type(s: &Service) -> bool {
    matches!(s.spec.kind.as_deref(), Some("NodePort") | Some("LoadBalancer"))
}

/// The cluster IPs a Service holds (IPv4; `None` and empty are not).
fn cluster_ips(s: &Service) -> Vec<Ipv4Addr> {
    let listed: Vec<&String> = if s.spec.cluster_ips.is_empty() {
        s.spec.cluster_ip.iter().collect()
    } else {
        s.spec.cluster_ips.iter().collect()
    };
    listed.into_iter().filter_map(|a| a.parse().ok()).collect()
}

/// Now, as the API server writes `creationTimestamp` (RFC 3339, UTC).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Check the Services being applied and fill in what the API server would:
/// cluster IPs, nodePorts, the creation time. `existing` is the datastore's
/// Services (a re-applied Service keeps its allocations).
pub fn allocate(
    applied: &mut [Service],
    existing: &BTreeMap<String, Service>,
    r: &Ranges,
) -> anyhow::Result<()> {
    let keys: BTreeSet<String> = applied.iter().map(Service::key).collect();
    let mut ips: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for (k, s) in existing.iter().filter(|(k, _)| !keys.contains(*k)) {
        for a in cluster_ips(s) {
            ips.insert(a, k.clone());
        }
        for p in &s.spec.ports {
            if let Some(np) = p.node_port.and_then(|n| u16::try_from(n).ok()) {
                ports.insert(np, k.clone());
            }
        }
    }
    for s in applied.iter_mut() {
        let key = s.key();
        let before = existing.get(&key);
        validate(s).with_context(|| format!("Service {key}"))?;
        if s.metadata.creation_timestamp.is_none() {
            s.metadata.creation_timestamp = before
                .and_then(|b| b.metadata.creation_timestamp.clone())
                .or_else(|| Some(now_rfc3339()));
        }
        if s.spec.kind.as_deref() == Some("ExternalName") {
            continue;
        }
        // Cluster IP: as given, else as before, else the first free one.
        if s.spec.cluster_ip.is_none() && s.spec.cluster_ips.is_empty() {
            if let Some(b) = before {
                s.spec.cluster_ip = b.spec.cluster_ip.clone();
                s.spec.cluster_ips = b.spec.cluster_ips.clone();
            }
        }
        if s.spec.cluster_ip.as_deref() != Some("None") {
            let mut mine = cluster_ips(s);
            for a in &mine {
                if !r.service_cidr.contains((*a).into()) {
                    bail!(
                        "Service {key}: clusterIP {a} is not in the service range {}",
                        r.service_cidr
                    );
                }
                if let Some(other) = ips.get(a) {
                    bail!("Service {key}: clusterIP {a} is already allocated to Service {other}");
                }
            }
            if mine.is_empty() {
                let a = free_ip(&r.service_cidr, &ips).ok_or_else(|| {
                    anyhow!("Service {key}: the service range {} is full", r.service_cidr)
                })?;
                mine.push(a);
            }
            for a in &mine {
                ips.insert(*a, key.clone());
            }
            s.spec.cluster_ip = Some(mine[0].to_string());
            s.spec.cluster_ips = mine.iter().map(|a| a.to_string()).collect();
        }
        // NodePorts.
        if !is_node_port_type(s) {
            continue;
        }
        let (lo, hi) = r.node_ports;
        // Given (or kept) nodePorts first, so the free ones avoid them.
        let mut wanted: Vec<Option<u16>> = Vec::new();
        for p in &s.spec.ports {
            let np = p.node_port.or_else(|| {
                before.and_then(|b| {
                    b.spec
                        .ports
                        .iter()
                        .find(|q| q.port == p.port && q.protocol == p.protocol && q.name == p.name)
                        .and_then(|q| q.node_port)
                })
            });
            wanted.push(match np {
                None => None,
                Some(n) => {
                    let n = u16::try_from(n).ok().filter(|n| (lo..=hi).contains(n)).ok_or_else(
                        || anyhow!("Service {key}: nodePort {n} is not in the range {lo}-{hi}"),
                    )?;
                    if let Some(other) = ports.get(&n) {
                        bail!(
                            "Service {key}: nodePort {n} is already allocated to Service {other}"
                        );
                    }
                    Some(n)
                }
            });
        }
        let mut mine: BTreeSet<u16> = wanted.iter().flatten().copied().collect();
        for (i, w) in wanted.into_iter().enumerate() {
            let np = match w {
                Some(n) => n,
                None => {
                    (lo..=hi).find(|n| !ports.contains_key(n) && !mine.contains(n)).ok_or_else(
                        || anyhow!("Service {key}: the NodePort range {lo}-{hi} is full"),
                    )?
                }
            };
            mine.insert(np);
            s.spec.ports[i].node_port = Some(i64::from(np));
        }
        for n in mine {
            ports.insert(n, key.clone());
        }
    }
    Ok(())
}

/// What the API server refuses in a Service.
fn validate(s: &Service) -> anyhow::Result<()> {
    if s.spec.kind.as_deref() == Some("ExternalName") {
        return Ok(());
    }
    if let Some(k) = s.spec.kind.as_deref() {
        if !matches!(k, "ClusterIP" | "NodePort" | "LoadBalancer") {
            bail!("unknown type {k:?} (ClusterIP, NodePort, LoadBalancer, ExternalName)");
        }
    }
    if s.spec.ports.is_empty() {
        bail!("spec.ports: Required value");
    }
    let mut seen = BTreeSet::new();
    for p in &s.spec.ports {
        if crate::services::parse_proto(&p.protocol).is_none() {
            bail!("port {}: unsupported protocol {:?} (TCP, UDP, SCTP)", p.port, p.protocol);
        }
        if !(1..=65535).contains(&p.port) {
            bail!("port {}: must be 1-65535", p.port);
        }
        if !seen.insert((p.port, p.protocol.clone())) {
            bail!("port {}/{} appears twice", p.port, p.protocol);
        }
        if s.spec.ports.len() > 1 && p.name.as_deref().unwrap_or("").is_empty() {
            bail!("port {}: ports must be named when there are several", p.port);
        }
    }
    Ok(())
}

/// The lowest free address of the range, past the network address and
/// `.1` (upstream keeps it for the `kubernetes` Service).
fn free_ip(c: &Cidr, used: &BTreeMap<Ipv4Addr, String>) -> Option<Ipv4Addr> {
    let IpAddr::V4(base) = c.network().addr else { return None };
    let size = 1u64 << (32 - u32::from(c.len.min(32)));
    (2..size.saturating_sub(1))
        .map(|i| Ipv4Addr::from(u32::from(base).wrapping_add(i as u32)))
        .find(|a| !used.contains_key(a))
}

/// A pod as the endpoint controller sees it.
#[derive(Clone, Debug)]
pub struct PodRun<'a> {
    pub pod: &'a Pod,
    pub ip: Option<Ipv4Addr>,
    pub node: String,
    pub ready: bool,
}

fn selects(selector: &BTreeMap<String, String>, p: &Pod) -> bool {
    selector.iter().all(|(k, v)| p.metadata.labels.get(k) == Some(v))
}

/// The port of `p` a Service port targets on pod `pod`, if it has one.
fn resolve(p: &crate::model::ServicePort, pod: &Pod) -> Option<u16> {
    match &p.target_port {
        None => u16::try_from(p.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::Str(name)) => match name.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => pod
                .ports()
                .find(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.eq_ignore_ascii_case(&p.protocol)
                })
                .map(|cp| cp.container_port),
        },
    }
}

/// The EndpointSlices the endpoint controller wants, by `namespace/name`.
pub fn desired_slices(
    services: &BTreeMap<String, Service>,
    pods: &[PodRun<'_>],
) -> BTreeMap<String, EndpointSlice> {
    let mut out = BTreeMap::new();
    for svc in services.values() {
        let Some(sel) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) else { continue };
        if svc.spec.kind.as_deref() == Some("ExternalName") {
            continue;
        }
        // Pods grouped by their resolved ports: one slice per group.
        let mut groups: BTreeMap<Vec<(String, i64, String)>, Vec<Endpoint>> = BTreeMap::new();
        let mut members: Vec<&PodRun> = pods
            .iter()
            .filter(|r| r.pod.namespace() == svc.namespace() && selects(sel, r.pod))
            .collect();
        members.sort_by_key(|r| r.pod.key());
        for r in members {
            let Some(ip) = r.ip else { continue };
            let ports: Vec<(String, i64, String)> = svc
                .spec
                .ports
                .iter()
                .filter_map(|p| {
                    let n = resolve(p, r.pod)?;
                    Some((p.name.clone().unwrap_or_default(), i64::from(n), p.protocol.clone()))
                })
                .collect();
            groups.entry(ports).or_default().push(Endpoint {
                addresses: vec![ip.to_string()],
                conditions: EndpointConditions {
                    ready: Some(r.ready),
                    serving: Some(r.ready),
                    terminating: Some(false),
                },
                node_name: Some(r.node.clone()),
                target_ref: Some(ObjectReference {
                    kind: "Pod".into(),
                    namespace: Some(r.pod.namespace().to_string()),
                    name: r.pod.metadata.name.clone(),
                }),
            });
        }
        for (i, (ports, endpoints)) in groups.into_iter().enumerate() {
            let name = format!("{}-lab{i}", svc.metadata.name);
            let labels = [
                (SERVICE_NAME_LABEL.to_string(), svc.metadata.name.clone()),
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            ]
            .into_iter()
            .collect();
            let slice = EndpointSlice {
                metadata: ObjectMeta {
                    name,
                    namespace: Some(svc.namespace().to_string()),
                    labels,
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints,
                ports: ports
                    .into_iter()
                    .map(|(name, port, protocol)| EndpointPort {
                        name: Some(name).filter(|n| !n.is_empty()),
                        port: Some(port),
                        protocol,
                    })
                    .collect(),
            };
            out.insert(slice.key(), slice);
        }
    }
    out
}

impl Lab {
    /// The lab's Service ranges.
    pub fn ranges(&self) -> anyhow::Result<Ranges> {
        Ok(Ranges {
            service_cidr: self
                .state
                .service_cidr
                .parse()
                .map_err(|e| anyhow!("service range {:?}: {e}", self.state.service_cidr))?,
            node_ports: self.state.node_port_range,
        })
    }

    /// The datastore as the agents read it.
    pub fn read_cluster(&self) -> anyhow::Result<Cluster> {
        let ds = DirDatastore::open(&self.state.datastore())
            .with_context(|| format!("reading {}", self.state.datastore().display()))?;
        Ok(ds.cluster().clone())
    }

    /// Allocate what the Services being applied leave to the API server.
    pub fn prepare_services(&self, objs: &mut [Object]) -> anyhow::Result<()> {
        let mut services: Vec<Service> = objs
            .iter()
            .filter_map(|o| match o {
                Object::Service(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        if services.is_empty() {
            return Ok(());
        }
        let existing = self.read_cluster()?.services;
        allocate(&mut services, &existing, &self.ranges()?)?;
        let mut by_key: BTreeMap<String, Service> =
            services.into_iter().map(|s| (s.key(), s)).collect();
        for o in objs.iter_mut() {
            if let Object::Service(s) = o {
                if let Some(done) = by_key.remove(&s.key()) {
                    *s = done;
                }
            }
        }
        Ok(())
    }

    /// Rewrite the EndpointSlices the lab manages from the Services and the
    /// pods as they are now; only what changed is written.
    pub fn sync_endpoints(&self) -> anyhow::Result<()> {
        let cluster = self.read_cluster()?;
        let runs: Vec<PodRun> = cluster
            .pods
            .iter()
            .filter_map(|(k, pod)| {
                let st = self.state.pods.get(k)?;
                Some(PodRun {
                    pod,
                    ip: st.ips.iter().find_map(|a| a.parse().ok()),
                    node: st.node.clone(),
                    ready: st.phase == PodPhase::Running,
                })
            })
            .collect();
        let want = desired_slices(&cluster.services, &runs);
        for (k, s) in &cluster.endpoint_slices {
            let ours =
                s.metadata.labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
            if ours && !want.contains_key(k) {
                self.remove_object(&Object::EndpointSlice(s.clone()))?;
            }
        }
        for (k, s) in want {
            if cluster.endpoint_slices.get(&k) != Some(&s) {
                self.write_object(&Object::EndpointSlice(s))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    fn objects(text: &str) -> Vec<Object> {
        parse_documents(text).unwrap().0
    }

    fn services(text: &str) -> Vec<Service> {
        objects(text)
            .into_iter()
            .filter_map(|o| match o {
                Object::Service(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn ranges() -> Ranges {
        Ranges { service_cidr: "10.96.0.0/12".parse().unwrap(), node_ports: (30000, 30002) }
    }

    #[test]
    fn cluster_ips_and_node_ports_are_allocated_kept_and_never_shared() {
        let mut a = services(
            "kind: Service\nmetadata: {name: a, namespace: x}\n\
             spec: {type: NodePort, ports: [{name: p, port: 80}, {name: q, port: 81, nodePort: 30000}]}\n\
             ---\nkind: Service\nmetadata: {name: b, namespace: x}\nspec: {ports: [{port: 80}]}\n",
        );
        allocate(&mut a, &BTreeMap::new(), &ranges()).unwrap();
        assert_eq!(a[0].spec.cluster_ip.as_deref(), Some("10.96.0.2"));
        assert_eq!(a[0].spec.cluster_ips, ["10.96.0.2"]);
        assert_eq!(a[1].spec.cluster_ip.as_deref(), Some("10.96.0.3"));
        let nps: Vec<Option<i64>> = a[0].spec.ports.iter().map(|p| p.node_port).collect();
        assert_eq!(nps, [Some(30001), Some(30000)]);
        assert!(a[0].metadata.creation_timestamp.as_deref().unwrap().ends_with('Z'));
        let existing: BTreeMap<String, Service> = a.iter().map(|s| (s.key(), s.clone())).collect();
        // Applied again without allocations: it keeps them.
        let mut again = services(
            "kind: Service\nmetadata: {name: a, namespace: x}\n\
             spec: {type: NodePort, ports: [{name: p, port: 80}, {name: q, port: 81}]}\n",
        );
        allocate(&mut again, &existing, &ranges()).unwrap();
        assert_eq!(again[0].spec.cluster_ip.as_deref(), Some("10.96.0.2"));
        assert_eq!(again[0].spec.ports[0].node_port, Some(30001));
        assert_eq!(again[0].metadata.creation_timestamp, a[0].metadata.creation_timestamp);
        // Taken, outside, exhausted, invalid: refused with a clear error.
        for (text, want) in [
            (
                "spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}",
                "already allocated to Service x/b",
            ),
            ("spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}", "not in the service range"),
            (
                "spec: {type: NodePort, ports: [{port: 80, nodePort: 30001}]}",
                "nodePort 30001 is already allocated to Service x/a",
            ),
            (
                "spec: {type: NodePort, ports: [{port: 80, nodePort: 80}]}",
                "not in the range 30000-30002",
            ),
            (
                "spec: {type: NodePort, ports: [{name: a, port: 80}, {name: b, port: 81}]}",
                "range 30000-30002 is full",
            ),
            ("spec: {}", "spec.ports: Required value"),
            ("spec: {ports: [{port: 80, protocol: ICMP}]}", "unsupported protocol"),
        ] {
            let mut s =
                services(&format!("kind: Service\nmetadata: {{name: c, namespace: x}}\n{text}\n"));
            let e = format!("{:#}", allocate(&mut s, &existing, &ranges()).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn slices_follow_selectors_readiness_and_named_ports() {
        let objs = objects(
            "kind: Service\nmetadata: {name: web, namespace: x}\n\
             spec: {selector: {app: web}, clusterIP: 10.96.0.9, ports: [{name: http, port: 80, targetPort: http}]}\n\
             ---\nkind: Service\nmetadata: {name: manual, namespace: x}\nspec: {ports: [{port: 80}]}\n\
             ---\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: web}}\n\
             spec: {containers: [{ports: [{name: http, containerPort: 8080}]}]}\n\
             ---\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: web}}\n\
             spec: {containers: [{ports: [{name: http, containerPort: 9090}]}]}\n\
             ---\nkind: Pod\nmetadata: {name: c, namespace: x, labels: {app: web}}\n\
             spec: {containers: [{ports: [{name: http, containerPort: 8080}]}]}\n\
             ---\nkind: Pod\nmetadata: {name: d, namespace: y, labels: {app: web}}\n",
        );
        let c = Cluster::from_objects(objs.iter().collect::<Vec<_>>());
        let run = |k: &str, ip: &str, ready: bool| PodRun {
            pod: &c.pods[k],
            ip: ip.parse().ok(),
            node: "n1".into(),
            ready,
        };
        let runs = vec![
            run("x/a", "10.65.0.2", true),
            run("x/b", "10.65.0.3", true),
            run("x/c", "10.65.0.4", false),
            run("y/d", "10.65.0.5", true),
        ];
        let want = desired_slices(&c.services, &runs);
        let keys: Vec<&String> = want.keys().collect();
        assert_eq!(keys, ["x/web-lab0", "x/web-lab1"], "one slice per resolved port set");
        let s0 = &want["x/web-lab0"];
        assert_eq!(s0.ports[0].port, Some(8080));
        assert_eq!(s0.ports[0].name.as_deref(), Some("http"));
        let eps: Vec<(&str, Option<bool>)> =
            s0.endpoints.iter().map(|e| (e.addresses[0].as_str(), e.conditions.ready)).collect();
        assert_eq!(eps, [("10.65.0.2", Some(true)), ("10.65.0.4", Some(false))]);
        assert_eq!(want["x/web-lab1"].ports[0].port, Some(9090));
        assert_eq!(s0.metadata.labels[SERVICE_NAME_LABEL], "web");
        // The agent's calculation reads them back as the backends.
        let mut c2 = c.clone();
        c2.endpoint_slices = want;
        let o = crate::services::compute(&c2, "n1", &Default::default());
        let b: Vec<String> =
            o.spec.services[0].backends.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect();
        assert_eq!(b, ["10.65.0.2:8080", "10.65.0.3:9090", "10.65.0.4:8080"]);
        assert_eq!(o.problems, Vec::<String>::new());
    }

    #[test]
    fn timestamps_look_like_the_api_servers() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.as_bytes()[10] == b'T', "{t}");
    }
}
