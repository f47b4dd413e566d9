//! From NetworkPolicies to what the dataplane enforces: for one endpoint,
//! its ingress and egress rules with every selector resolved to addresses
//! and every named port to a number ([`EndpointPolicy`]).
//!
//! Selectors are resolved once per distinct (policy namespace, peer) and
//! shared by every endpoint and rule that uses them ([`Calc`]'s cache),
//! so the cost of a full calculation follows the number of distinct
//! selectors, not rules times pods.

use super::eval::in_cidr;
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

/// The calculation, with its caches (valid for one [`Model`]).
pub struct Calc<'a> {
    pub model: &'a Model,
    /// Members per distinct (namespace, selectors): identical selectors in
    /// different policies share one set.
    cache: BTreeMap<(String, String), Members>,
    /// The same, by the peer's address in the model: the serialised key is
    /// computed once per peer, not once per endpoint.
    by_peer: std::collections::HashMap<(usize, usize), Members>,
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
            cache: BTreeMap::new(),
            by_peer: Default::default(),
            by_ns,
            pods_by_ns,
            nets: Default::default(),
        }
    }

    /// Pods a selector peer picks (for a policy in `ns`).
    fn members(&mut self, ns: &str, peer: &Peer) -> Members {
        let at = (peer as *const Peer as usize, ns.as_ptr() as usize);
        if let Some(m) = self.by_peer.get(&at) {
            return m.clone();
        }
        let m = self.members_uncached(ns, peer);
        self.by_peer.insert(at, m.clone());
        m
    }

    fn members_uncached(&mut self, ns: &str, peer: &Peer) -> Members {
        let key = (
            if peer.namespace_selector.is_some() { String::new() } else { ns.to_string() },
            serde_json::to_string(&(&peer.namespace_selector, &peer.pod_selector))
                .unwrap_or_default(),
        );
        if let Some(m) = self.cache.get(&key) {
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
        self.cache.insert(key, m.clone());
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
                None => (vec![], self.model.pods.keys().cloned().collect()),
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

/// Does `ip` fall in one of the nets? (For tests and diagnostics.)
pub fn in_nets(nets: &[Net], ip: IpAddr) -> bool {
    nets.iter().any(|n| {
        in_cidr(ip, &n.cidr.to_string()) && !n.except.iter().any(|e| in_cidr(ip, &e.to_string()))
    })
}

/// Rules of a policy (ingress and egress).
pub fn rule_count(np: &NetworkPolicy) -> usize {
    np.spec.ingress.as_ref().map_or(0, Vec::len) + np.spec.egress.as_ref().map_or(0, Vec::len)
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
}
