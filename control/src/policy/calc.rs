//! From NetworkPolicies to what the dataplane enforces: for one endpoint,
//! its ingress and egress rules with every selector resolved to addresses
//! and every named port to a number ([`EndpointPolicy`]).
//!
//! Selectors are resolved once per distinct (policy namespace, peer) and
//! shared by every endpoint and rule that uses them ([`Calc`]'s cache),
//! so the cost of a full calculation follows the number of distinct
//! selectors, not rules times pods.

use super::{LabelSelector, NetworkPolicy, Peer, PolicyPort, PortRef};
use crate::model::ContainerPort;
use ocelot_dataplane::api::Cidr;
use ocelot_dataplane::policy::{EndpointPolicy, Net, PortRange, Proto, Rule as DpRule};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// A pod as the calculation needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

/// The cluster as the calculation sees it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Labels per namespace.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, PodInfo>,
    /// Policies by `namespace/name`.
    pub policies: BTreeMap<String, NetworkPolicy>,
}

/// Members of one peer: pod keys (sorted).
type Members = Arc<Vec<String>>;

/// A distinct selector: (the policy's namespace, or "" with a namespace
/// selector; the selectors serialised).
pub type SetKey = (String, String);

/// The calculation, with its caches (valid for one [`Model`]).
pub struct Calc<'a> {
    pub model: &'a Model,
    /// Members per distinct (namespace, selectors): identical selectors in
    /// different policies share one set.
    cache: BTreeMap<SetKey, Members>,
    /// The same, by the peer's address in the model: the serialised key is
    /// computed once per peer, not once per endpoint.
    by_peer: std::collections::HashMap<(usize, usize), (SetKey, Members)>,
    /// Sets made during this run, with what they select (for [`Graph`]).
    created: Vec<(SetKey, String, Peer)>,
    /// The sets the last endpoint's rules used, and whether they depend on
    /// every pod (egress named ports to everyone).
    used: Vec<SetKey>,
    uses_all: bool,
    /// Policies by namespace (a pod is selected only by its namespace's).
    by_ns: BTreeMap<&'a str, Vec<&'a NetworkPolicy>>,
    /// Pod keys by namespace (a peer without a namespace selector looks
    /// only at its policy's namespace).
    pods_by_ns: BTreeMap<&'a str, Vec<&'a str>>,
    /// Host nets of a member set, built once per set.
    nets: std::collections::HashMap<usize, Arc<Vec<Net>>>,
}

fn proto_of(p: &PolicyPort) -> Option<Proto> {
    match p.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase().as_str() {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        _ => None,
    }
}

fn host(ip: IpAddr) -> Net {
    Net { cidr: Cidr { addr: ip, len: if ip.is_ipv4() { 32 } else { 128 } }, except: vec![] }
}

fn cidr_of(s: &str) -> Option<Cidr> {
    s.parse().ok()
}

impl<'a> Calc<'a> {
    pub fn new(model: &'a Model) -> Calc<'a> {
        Calc::with_cache(model, BTreeMap::new())
    }

    /// A calculation reusing resolved sets (still valid for `model`).
    pub fn with_cache(model: &'a Model, cache: BTreeMap<SetKey, Members>) -> Calc<'a> {
        let mut by_ns: BTreeMap<&'a str, Vec<&'a NetworkPolicy>> = BTreeMap::new();
        for np in model.policies.values() {
            by_ns.entry(np.namespace()).or_default().push(np);
        }
        let mut pods_by_ns: BTreeMap<&'a str, Vec<&'a str>> = BTreeMap::new();
        for (k, p) in &model.pods {
            pods_by_ns.entry(p.namespace.as_str()).or_default().push(k.as_str());
        }
        Calc {
            model,
            cache,
            by_peer: Default::default(),
            created: Vec::new(),
            used: Vec::new(),
            uses_all: false,
            by_ns,
            pods_by_ns,
            nets: Default::default(),
        }
    }

    /// Pods a selector peer picks (for a policy in `ns`).
    fn members(&mut self, ns: &str, peer: &Peer) -> Members {
        let at = (peer as *const Peer as usize, ns.as_ptr() as usize);
        if let Some((k, m)) = self.by_peer.get(&at) {
            self.used.push(k.clone());
            return m.clone();
        }
        let key = set_key(ns, peer);
        let m = self.members_uncached(&key, ns, peer);
        self.used.push(key.clone());
        self.by_peer.insert(at, (key, m.clone()));
        m
    }

    fn members_uncached(&mut self, key: &SetKey, ns: &str, peer: &Peer) -> Members {
        if let Some(m) = self.cache.get(key) {
            return m.clone();
        }
        let all = LabelSelector::default();
        let pod_sel = peer.pod_selector.as_ref().unwrap_or(&all);
        let ns_ok = |pod_ns: &str| match &peer.namespace_selector {
            Some(sel) => {
                sel.matches(&self.model.namespaces.get(pod_ns).cloned().unwrap_or_default())
            }
            None => pod_ns == ns,
        };
        let model = self.model;
        let m: Vec<String> = match &peer.namespace_selector {
            // Only the policy's namespace: look at its pods alone.
            None => self
                .pods_by_ns
                .get(ns)
                .into_iter()
                .flatten()
                .filter(|k| pod_sel.matches(&model.pods[**k].labels))
                .map(|k| k.to_string())
                .collect(),
            Some(_) => model
                .pods
                .iter()
                .filter(|(_, p)| ns_ok(&p.namespace) && pod_sel.matches(&p.labels))
                .map(|(k, _)| k.clone())
                .collect(),
        };
        let m = Arc::new(m);
        self.cache.insert(key.clone(), m.clone());
        self.created.push((key.clone(), ns.to_string(), peer.clone()));
        m
    }

    /// The peers of a rule: `None` for every peer; otherwise the nets of
    /// ipBlocks and the pods of selectors (as keys, to resolve ports).
    fn peers(&mut self, ns: &str, peers: &[Peer]) -> Option<(Vec<Net>, Vec<Members>)> {
        if peers.is_empty() {
            return None;
        }
        let mut nets = Vec::new();
        let mut sets = Vec::new();
        for p in peers {
            if let Some(b) = &p.ip_block {
                if let Some(c) = cidr_of(&b.cidr) {
                    nets.push(Net {
                        cidr: c,
                        except: b.except.iter().filter_map(|e| cidr_of(e)).collect(),
                    });
                }
            } else if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                sets.push(self.members(ns, p));
            }
        }
        Some((nets, sets))
    }

    /// The host nets of a member set, built once per set.
    fn set_nets(&mut self, m: &Members) -> Arc<Vec<Net>> {
        let at = Arc::as_ptr(m) as usize;
        if let Some(n) = self.nets.get(&at) {
            return n.clone();
        }
        let n: Vec<Net> = m
            .iter()
            .filter_map(|k| self.model.pods.get(k))
            .flat_map(|p| p.ips.iter().map(|ip| host(*ip)))
            .collect();
        let n = Arc::new(n);
        self.nets.insert(at, n.clone());
        n
    }

    /// A rule's peers as nets: ipBlocks and the members' addresses.
    fn peer_nets(&mut self, peers: Option<(Vec<Net>, Vec<Members>)>) -> Option<Vec<Net>> {
        peers.map(|(mut nets, sets)| {
            for m in &sets {
                nets.extend(self.set_nets(m).iter().cloned());
            }
            nets
        })
    }

    /// Resolve a rule's ports against the pod at the receiving end (`None`:
    /// an address, where named ports match nothing). `None` = every port.
    fn ports(ports: &[PolicyPort], dst: Option<&PodInfo>) -> Option<Vec<PortRange>> {
        if ports.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for p in ports {
            let Some(proto) = proto_of(p) else { continue };
            match &p.port {
                None => out.push(PortRange { proto, first: 0, last: 65535 }),
                Some(PortRef::Number(n)) => {
                    out.push(PortRange { proto, first: *n, last: p.end_port.unwrap_or(*n).max(*n) })
                }
                Some(PortRef::Name(name)) => {
                    for cp in dst.into_iter().flat_map(|d| &d.ports) {
                        if cp.name.as_deref() == Some(name.as_str())
                            && cp.protocol.eq_ignore_ascii_case(match proto {
                                Proto::Tcp => "TCP",
                                Proto::Udp => "UDP",
                                Proto::Sctp => "SCTP",
                            })
                        {
                            out.push(PortRange {
                                proto,
                                first: cp.container_port,
                                last: cp.container_port,
                            });
                        }
                    }
                }
            }
        }
        Some(out)
    }

    /// Ingress rules of policy `np` for endpoint `me`.
    fn ingress(&mut self, np: &NetworkPolicy, me: &PodInfo, out: &mut Vec<DpRule>) {
        for r in np.spec.ingress.iter().flatten() {
            let ports = Self::ports(&r.ports, Some(me));
            let peers = self.peers(np.namespace(), &r.from);
            let peers = self.peer_nets(peers);
            out.push(DpRule { peers, ports });
        }
    }

    /// Egress rules of policy `np`: named ports resolve per destination pod.
    fn egress(&mut self, np: &NetworkPolicy, out: &mut Vec<DpRule>) {
        for r in np.spec.egress.iter().flatten() {
            let named = r.ports.iter().any(|p| matches!(p.port, Some(PortRef::Name(_))));
            let peers = self.peers(np.namespace(), &r.to);
            if !named {
                let ports = Self::ports(&r.ports, None);
                let peers = self.peer_nets(peers);
                out.push(DpRule { peers, ports });
                continue;
            }
            // Named ports: one rule per destination pod, with the ports
            // resolved against it; addresses get the numeric ones only.
            let (nets, pods): (Vec<Net>, Vec<String>) = match peers {
                Some((nets, sets)) => {
                    let mut pods: Vec<String> =
                        sets.iter().flat_map(|m| m.iter().cloned()).collect();
                    pods.sort();
                    pods.dedup();
                    (nets, pods)
                }
                None => {
                    self.uses_all = true;
                    (vec![], self.model.pods.keys().cloned().collect())
                }
            };
            if !nets.is_empty() || r.to.is_empty() {
                let everyone = r.to.is_empty();
                out.push(DpRule {
                    peers: if everyone { None } else { Some(nets) },
                    ports: Self::ports(&r.ports, None),
                });
            }
            for k in pods {
                let Some(pod) = self.model.pods.get(&k) else { continue };
                out.push(DpRule {
                    peers: Some(pod.ips.iter().map(|ip| host(*ip)).collect()),
                    ports: Self::ports(&r.ports, Some(pod)),
                });
            }
        }
    }

    /// What the dataplane must enforce for the pod `key`.
    pub fn endpoint(&mut self, key: &str) -> EndpointPolicy {
        self.used.clear();
        self.uses_all = false;
        let Some(me) = self.model.pods.get(key) else { return EndpointPolicy::default() };
        let mut ingress: Option<Vec<DpRule>> = None;
        let mut egress: Option<Vec<DpRule>> = None;
        let policies = self.by_ns.get(me.namespace.as_str()).cloned().unwrap_or_default();
        for np in policies {
            if !np.spec.pod_selector.matches(&me.labels) {
                continue;
            }
            let (ing, eg) = np.types();
            if ing {
                let v = ingress.get_or_insert_with(Vec::new);
                self.ingress(np, me, v);
            }
            if eg {
                let v = egress.get_or_insert_with(Vec::new);
                self.egress(np, v);
            }
        }
        EndpointPolicy { ingress, egress }
    }
}

fn set_key(ns: &str, peer: &Peer) -> SetKey {
    (
        if peer.namespace_selector.is_some() { String::new() } else { ns.to_string() },
        serde_json::to_string(&(&peer.namespace_selector, &peer.pod_selector)).unwrap_or_default(),
    )
}

/// Does a selector peer (of a policy in `ns`) pick `pod`?
fn peer_picks(model: &Model, ns: &str, peer: &Peer, pod: &PodInfo) -> bool {
    let ns_ok = match &peer.namespace_selector {
        Some(sel) => {
            sel.matches(&model.namespaces.get(&pod.namespace).cloned().unwrap_or_default())
        }
        None => pod.namespace == ns,
    };
    ns_ok && peer.pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels))
}

/// What one endpoint's rules were made of.
struct Deps {
    pod: String,
    sets: Vec<SetKey>,
    all_pods: bool,
}

/// The calculation kept between changes, in the manner of a calculation
/// graph: resolved selector sets persist, each knows the endpoints that
/// use it, and a pod's change updates the sets that pick it (before or
/// after) and recomputes only the endpoints that use those sets or are
/// that pod. Policy and namespace changes rebuild it.
pub struct Graph {
    model: Model,
    cache: BTreeMap<SetKey, Members>,
    peers: BTreeMap<SetKey, (String, Peer)>,
    users: BTreeMap<SetKey, std::collections::BTreeSet<String>>,
    deps: BTreeMap<String, Deps>,
    targets: BTreeMap<String, String>,
    /// Each endpoint's policy, by endpoint name.
    pub results: BTreeMap<String, EndpointPolicy>,
}

impl Graph {
    /// Compute every endpoint (`targets`: endpoint name -> pod key).
    pub fn new(model: Model, targets: BTreeMap<String, String>) -> Graph {
        let mut g = Graph {
            model,
            cache: BTreeMap::new(),
            peers: BTreeMap::new(),
            users: BTreeMap::new(),
            deps: BTreeMap::new(),
            targets,
            results: BTreeMap::new(),
        };
        let all: Vec<String> = g.targets.keys().cloned().collect();
        g.compute(&all);
        g
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn targets(&self) -> &BTreeMap<String, String> {
        &self.targets
    }

    fn compute(&mut self, endpoints: &[String]) {
        let cache = std::mem::take(&mut self.cache);
        let mut calc = Calc::with_cache(&self.model, cache);
        for ep in endpoints {
            if let Some(old) = self.deps.remove(ep) {
                for k in &old.sets {
                    if let Some(u) = self.users.get_mut(k) {
                        u.remove(ep);
                    }
                }
            }
            let Some(pod) = self.targets.get(ep) else {
                self.results.remove(ep);
                continue;
            };
            let p = calc.endpoint(pod);
            let mut sets = std::mem::take(&mut calc.used);
            sets.sort();
            sets.dedup();
            for k in &sets {
                self.users.entry(k.clone()).or_default().insert(ep.clone());
            }
            self.deps.insert(ep.clone(), Deps { pod: pod.clone(), sets, all_pods: calc.uses_all });
            self.results.insert(ep.clone(), p);
        }
        for (k, ns, peer) in std::mem::take(&mut calc.created) {
            self.peers.insert(k, (ns, peer));
        }
        self.cache = std::mem::take(&mut calc.cache);
    }

    /// One pod changed (labels, addresses, ports), appeared (`Some`) or
    /// went (`None`). Returns how many endpoints were computed again.
    pub fn pod_changed(&mut self, key: &str, new: Option<PodInfo>) -> usize {
        let old = self.model.pods.get(key).cloned();
        if old == new {
            return 0;
        }
        let mut stale: std::collections::BTreeSet<String> = self
            .deps
            .iter()
            .filter(|(_, d)| d.all_pods || d.pod == key)
            .map(|(e, _)| e.clone())
            .collect();
        let mut touched = Vec::new();
        for (k, (ns, peer)) in &self.peers {
            let before = old.as_ref().is_some_and(|p| peer_picks(&self.model, ns, peer, p));
            let after = new.as_ref().is_some_and(|p| peer_picks(&self.model, ns, peer, p));
            if before || after {
                touched.push((k.clone(), after));
            }
        }
        for (k, member) in touched {
            if let Some(m) = self.cache.get_mut(&k) {
                let mut v: Vec<String> = (**m).clone();
                match (v.binary_search_by(|x| x.as_str().cmp(key)), member) {
                    (Ok(i), false) => {
                        v.remove(i);
                    }
                    (Err(i), true) => v.insert(i, key.to_string()),
                    _ => {}
                }
                *m = Arc::new(v);
            }
            stale.extend(self.users.get(&k).into_iter().flatten().cloned());
        }
        match new {
            Some(p) => self.model.pods.insert(key.to_string(), p),
            None => self.model.pods.remove(key),
        };
        let stale: Vec<String> = stale.into_iter().collect();
        self.compute(&stale);
        stale.len()
    }

    /// Move to `model` and `targets`: pod changes are applied one by one;
    /// anything else (policies, namespaces, the set of endpoints) rebuilds.
    /// Returns how many endpoints were computed again.
    pub fn update(&mut self, model: Model, targets: BTreeMap<String, String>) -> usize {
        if targets != self.targets
            || model.policies != self.model.policies
            || model.namespaces != self.model.namespaces
        {
            let n = targets.len();
            *self = Graph::new(model, targets);
            return n;
        }
        let changed: Vec<String> = self
            .model
            .pods
            .keys()
            .chain(model.pods.keys())
            .filter(|k| self.model.pods.get(*k) != model.pods.get(*k))
            .cloned()
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .collect();
        let mut n = 0;
        for k in changed {
            n += self.pod_changed(&k, model.pods.get(&k).cloned());
        }
        n
    }
}

#[cfg(test)]
mod tests {
    //! The upstream e2e truth tables again, now through the calculation and
    //! the dataplane's compiled classifier: what the dataplane would enforce.
    use super::*;
    use ocelot_dataplane::policy::classify::CompiledPolicy;
    use serde_json::Value;

    #[test]
    fn upstream_e2e_truth_tables_through_the_compiled_classifier() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/conformance/netpol_upstream_cases.json"
        );
        let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut probes = 0;
        let mut failures = Vec::new();
        for c in all["cases"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            let m = &c["model"];
            let mut model = Model::default();
            for n in m["namespaces"].as_array().unwrap() {
                model.namespaces.insert(
                    n["name"].as_str().unwrap().into(),
                    serde_json::from_value(n["labels"].clone()).unwrap(),
                );
            }
            for p in m["pods"].as_array().unwrap() {
                let ns = p["namespace"].as_str().unwrap().to_string();
                model.pods.insert(
                    format!("{ns}/{}", p["name"].as_str().unwrap()),
                    PodInfo {
                        namespace: ns,
                        labels: serde_json::from_value(p["labels"].clone()).unwrap(),
                        ips: vec![p["ip"].as_str().unwrap().parse().unwrap()],
                        ports: serde_json::from_value(p["containerPorts"].clone()).unwrap(),
                    },
                );
            }
            for p in c["policies"].as_array().unwrap() {
                let np: NetworkPolicy = serde_json::from_value(p.clone()).unwrap();
                model.policies.insert(format!("{}/{}", np.namespace(), np.metadata.name), np);
            }
            let mut calc = Calc::new(&model);
            let compiled: BTreeMap<String, CompiledPolicy> = model
                .pods
                .keys()
                .map(|k| (k.clone(), CompiledPolicy::compile(&calc.endpoint(k))))
                .collect();
            let ip = |k: &str| match model.pods[k].ips[0] {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => unreachable!(),
            };
            for pr in c["probes"].as_array().unwrap() {
                let port = pr["port"].as_u64().unwrap() as u16;
                let proto = match pr["protocol"].as_str().unwrap() {
                    "TCP" => Proto::Tcp,
                    "UDP" => Proto::Udp,
                    _ => Proto::Sctp,
                };
                for (from, row) in pr["expected"].as_object().unwrap() {
                    for (to, want) in row.as_object().unwrap() {
                        if from == to {
                            continue;
                        }
                        probes += 1;
                        let eg = compiled[from.as_str()]
                            .egress
                            .as_ref()
                            .is_none_or(|c| c.allows(ip(to), Some(proto), port));
                        let ing = compiled[to.as_str()]
                            .ingress
                            .as_ref()
                            .is_none_or(|c| c.allows(ip(from), Some(proto), port));
                        if (eg && ing) != want.as_bool().unwrap() {
                            failures.push(format!(
                                "{name}: {from} -> {to} {proto:?}/{port}: got {}",
                                eg && ing
                            ));
                        }
                    }
                }
            }
        }
        assert_eq!(probes, 4680);
        assert!(
            failures.is_empty(),
            "{} differ:\n{}",
            failures.len(),
            failures[..failures.len().min(20)].join("\n")
        );
    }

    #[test]
    fn the_graph_recomputes_only_what_a_pod_change_touches_and_agrees_with_a_full_run() {
        let mut model = Model::default();
        for n in 0..3u8 {
            let ns = format!("n{n}");
            model.namespaces.insert(
                ns.clone(),
                [("team".to_string(), format!("t{}", n % 2))].into_iter().collect(),
            );
            for p in 0..6u8 {
                model.pods.insert(
                    format!("{ns}/p{p}"),
                    PodInfo {
                        namespace: ns.clone(),
                        labels: [("app".to_string(), format!("a{}", p % 3))].into_iter().collect(),
                        ips: vec![IpAddr::V4(std::net::Ipv4Addr::new(10, n, 0, p))],
                        ports: serde_json::from_str(r#"[{"name": "http", "containerPort": 8080}]"#)
                            .unwrap(),
                    },
                );
            }
            let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "np", "namespace": ns},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "a0"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a1"}}},
                                          {"namespaceSelector": {"matchLabels": {"team": "t1"}},
                                           "podSelector": {"matchLabels": {"app": "a2"}}}],
                                 "ports": [{"port": "http"}]}],
                    "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "a2"}}}],
                                "ports": [{"port": "http"}]}]
                }
            }))
            .unwrap();
            model.policies.insert(format!("{ns}/np"), np);
        }
        let targets: BTreeMap<String, String> =
            model.pods.keys().step_by(2).map(|k| (format!("ep-{k}"), k.clone())).collect();
        let mut g = Graph::new(model.clone(), targets.clone());
        let mut x: u32 = 11;
        let mut total = 0;
        for step in 0..80 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let keys: Vec<String> = model.pods.keys().cloned().collect();
            let k = keys[(x >> 8) as usize % keys.len()].clone();
            match step % 7 {
                // A pod goes and comes back.
                5 => {
                    let p = model.pods.remove(&k).unwrap();
                    total += g.pod_changed(&k, None);
                    assert_eq!(g.results, Graph::new(model.clone(), targets.clone()).results);
                    model.pods.insert(k.clone(), p.clone());
                    total += g.pod_changed(&k, Some(p));
                }
                // A new address.
                6 => {
                    let p = model.pods.get_mut(&k).unwrap();
                    p.ips = vec![IpAddr::V4(std::net::Ipv4Addr::new(
                        10,
                        9,
                        (x >> 20) as u8,
                        (x >> 12) as u8,
                    ))];
                    total += g.pod_changed(&k, Some(p.clone()));
                }
                _ => {
                    let p = model.pods.get_mut(&k).unwrap();
                    p.labels.insert("app".into(), format!("a{}", (x >> 16) % 3));
                    total += g.pod_changed(&k, Some(p.clone()));
                }
            }
            assert_eq!(
                g.results,
                Graph::new(model.clone(), targets.clone()).results,
                "step {step}"
            );
        }
        assert!(total < 80 * targets.len(), "recomputed {total}: not everything every time");
        // Through `update`, a policy change rebuilds.
        model.policies.remove("n0/np");
        g.update(model.clone(), targets.clone());
        assert_eq!(g.results, Graph::new(model, targets).results);
    }
}
