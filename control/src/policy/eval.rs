//! The meaning of a set of NetworkPolicies, as a plain function of one
//! connection: the reference the compiled dataplane form is tested against.
//!
//! From the API documentation: a pod is isolated for ingress (egress) when
//! some policy in its namespace selects it and has that policy type; an
//! isolated pod accepts (sends) only what at least one rule of one such
//! policy allows; a connection needs the sender's egress and the
//! receiver's ingress. A rule's peers are pods picked by `podSelector` (in
//! the policy's namespace), by `namespaceSelector`, by both (the
//! intersection), or addresses by `ipBlock` (minus `except`); its ports are
//! numbers, ranges (`endPort`) or names resolved against the destination
//! pod's container ports.

use super::{LabelSelector, NetworkPolicy, Peer, PolicyPort, PortRef, Rule};
use crate::model::ContainerPort;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A pod, as far as policy is concerned.
#[derive(Clone, Copy, Debug)]
pub struct PodView<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub ip: IpAddr,
    pub ports: &'a [ContainerPort],
}

/// One end of a connection: a pod, or an address outside every pod.
#[derive(Clone, Copy, Debug)]
pub enum Party<'a> {
    Pod(PodView<'a>),
    Addr(IpAddr),
}

impl Party<'_> {
    fn ip(&self) -> IpAddr {
        match self {
            Party::Pod(p) => p.ip,
            Party::Addr(a) => *a,
        }
    }
}

/// What policies are evaluated against.
pub struct World<'a> {
    /// Labels of each namespace, by name.
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub policies: &'a [NetworkPolicy],
}

/// Is `ip` inside the CIDR `cidr` (host bits ignored, as the API allows)?
pub fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    cidr.parse::<ocelot_dataplane::api::Cidr>().is_ok_and(|c| c.contains(ip))
}

impl World<'_> {
    fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces.get(ns).cloned().unwrap_or_default()
    }

    /// Does a rule's peer (of a policy in namespace `policy_ns`) match?
    fn peer_matches(&self, peer: &Peer, policy_ns: &str, who: &Party<'_>) -> bool {
        if let Some(b) = &peer.ip_block {
            let ip = who.ip();
            return in_cidr(ip, &b.cidr) && !b.except.iter().any(|e| in_cidr(ip, e));
        }
        let Party::Pod(p) = who else { return false };
        let ns_ok = match &peer.namespace_selector {
            Some(sel) => sel.matches(&self.ns_labels(p.namespace)),
            None => p.namespace == policy_ns,
        };
        let pod_ok = peer.pod_selector.as_ref().is_none_or(|s| s.matches(p.labels));
        // A peer with neither selector nor ipBlock is invalid upstream;
        // it matches nothing here.
        (peer.namespace_selector.is_some() || peer.pod_selector.is_some()) && ns_ok && pod_ok
    }

    fn port_matches(pp: &PolicyPort, dst: &Party<'_>, port: u16, proto: &str) -> bool {
        let want = pp.protocol.as_deref().unwrap_or("TCP");
        if !want.eq_ignore_ascii_case(proto) {
            return false;
        }
        match &pp.port {
            None => true,
            Some(PortRef::Number(n)) => match pp.end_port {
                Some(end) => (*n..=end).contains(&port),
                None => *n == port,
            },
            Some(PortRef::Name(name)) => match dst {
                Party::Pod(p) => p.ports.iter().any(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.eq_ignore_ascii_case(proto)
                        && cp.container_port == port
                }),
                Party::Addr(_) => false,
            },
        }
    }

    fn rule_allows(
        &self,
        rule: &Rule,
        policy_ns: &str,
        peer: &Party<'_>,
        dst: &Party<'_>,
        port: u16,
        proto: &str,
    ) -> bool {
        let peers = if rule.from.is_empty() { &rule.to } else { &rule.from };
        (peers.is_empty() || peers.iter().any(|p| self.peer_matches(p, policy_ns, peer)))
            && (rule.ports.is_empty()
                || rule.ports.iter().any(|pp| Self::port_matches(pp, dst, port, proto)))
    }

    fn selects(np: &NetworkPolicy, pod: &PodView<'_>) -> bool {
        np.namespace() == pod.namespace && np.spec.pod_selector.matches(pod.labels)
    }

    /// May `pod` receive from `from` on `port`/`proto`?
    pub fn ingress_allowed(
        &self,
        pod: &PodView<'_>,
        from: &Party<'_>,
        port: u16,
        proto: &str,
    ) -> bool {
        let mut isolated = false;
        for np in self.policies.iter().filter(|np| np.types().0 && Self::selects(np, pod)) {
            isolated = true;
            let rules = np.spec.ingress.as_deref().unwrap_or(&[]);
            if rules
                .iter()
                .any(|r| self.rule_allows(r, np.namespace(), from, &Party::Pod(*pod), port, proto))
            {
                return true;
            }
        }
        !isolated
    }

    /// May `pod` send to `to` on `port`/`proto`?
    pub fn egress_allowed(
        &self,
        pod: &PodView<'_>,
        to: &Party<'_>,
        port: u16,
        proto: &str,
    ) -> bool {
        let mut isolated = false;
        for np in self.policies.iter().filter(|np| np.types().1 && Self::selects(np, pod)) {
            isolated = true;
            let rules = np.spec.egress.as_deref().unwrap_or(&[]);
            if rules.iter().any(|r| self.rule_allows(r, np.namespace(), to, to, port, proto)) {
                return true;
            }
        }
        !isolated
    }

    /// May a connection from `src` to `dst` on `port`/`proto` happen?
    pub fn allowed(&self, src: &Party<'_>, dst: &Party<'_>, port: u16, proto: &str) -> bool {
        let egress = match src {
            Party::Pod(p) => self.egress_allowed(p, dst, port, proto),
            Party::Addr(_) => true,
        };
        let ingress = match dst {
            Party::Pod(p) => self.ingress_allowed(p, src, port, proto),
            Party::Addr(_) => true,
        };
        egress && ingress
    }
}

/// A selector that matches everything (`{}`).
pub fn everything() -> LabelSelector {
    LabelSelector::default()
}

#[cfg(test)]
mod tests {
    //! The 58 upstream Kubernetes e2e cases, evaluated on their model.
    use super::*;
    use crate::model::ContainerPort;
    use serde_json::Value;

    fn cases() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/conformance/netpol_upstream_cases.json"
        );
        let text =
            std::fs::read_to_string(path).expect("../shared/conformance beside the repository");
        serde_json::from_str(&text).unwrap()
    }

    struct Pod {
        ns: String,
        labels: BTreeMap<String, String>,
        ip: IpAddr,
        ports: Vec<ContainerPort>,
    }

    #[test]
    fn upstream_e2e_truth_tables() {
        let all = cases();
        let list = all["cases"].as_array().unwrap();
        assert_eq!(list.len(), 58);
        let mut probes = 0;
        let mut failures = Vec::new();
        for c in list {
            let name = c["name"].as_str().unwrap();
            let m = &c["model"];
            let namespaces: BTreeMap<String, BTreeMap<String, String>> = m["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap().to_string(),
                        serde_json::from_value(n["labels"].clone()).unwrap(),
                    )
                })
                .collect();
            let pods: BTreeMap<String, Pod> = m["pods"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let ns = p["namespace"].as_str().unwrap().to_string();
                    let key = format!("{ns}/{}", p["name"].as_str().unwrap());
                    let pod = Pod {
                        ns,
                        labels: serde_json::from_value(p["labels"].clone()).unwrap(),
                        ip: p["ip"].as_str().unwrap().parse().unwrap(),
                        ports: serde_json::from_value(p["containerPorts"].clone()).unwrap(),
                    };
                    (key, pod)
                })
                .collect();
            let policies: Vec<NetworkPolicy> = c["policies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let np: NetworkPolicy = serde_json::from_value(p.clone())
                        .unwrap_or_else(|e| panic!("{name}: policy {p}: {e}"));
                    np.validate().unwrap();
                    np
                })
                .collect();
            let world = World { namespaces: &namespaces, policies: &policies };
            let view = |k: &str| {
                let p = &pods[k];
                Party::Pod(PodView {
                    namespace: &p.ns,
                    labels: &p.labels,
                    ip: p.ip,
                    ports: &p.ports,
                })
            };
            let ignore_loopback = c["ignore_loopback"].as_bool().unwrap_or(true);
            for pr in c["probes"].as_array().unwrap() {
                let port = pr["port"].as_u64().unwrap() as u16;
                let proto = pr["protocol"].as_str().unwrap();
                for (from, row) in pr["expected"].as_object().unwrap() {
                    for (to, want) in row.as_object().unwrap() {
                        if ignore_loopback && from == to {
                            continue;
                        }
                        probes += 1;
                        let got = world.allowed(&view(from), &view(to), port, proto);
                        if got != want.as_bool().unwrap() {
                            failures
                                .push(format!("{name}: {from} -> {to} {proto}/{port}: got {got}"));
                        }
                    }
                }
            }
        }
        assert!(probes >= 4680, "only {probes} probes");
        assert!(
            failures.is_empty(),
            "{} of {probes} probes differ:\n{}",
            failures.len(),
            failures[..failures.len().min(20)].join("\n")
        );
    }

    #[test]
    fn selectors_and_cidrs() {
        let labels: BTreeMap<String, String> = [("app", "web"), ("tier", "1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sel: LabelSelector = serde_json::from_str(
            r#"{"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["1", "2"]}, {"key": "x", "operator": "DoesNotExist"}]}"#,
        )
        .unwrap();
        assert!(sel.matches(&labels));
        let sel: LabelSelector = serde_json::from_str(
            r#"{"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["1"]}]}"#,
        )
        .unwrap();
        assert!(!sel.matches(&labels));
        assert!(everything().matches(&labels));
        // Host bits in the CIDR are ignored.
        assert!(in_cidr("10.0.1.7".parse().unwrap(), "10.0.1.5/24"));
        assert!(!in_cidr("10.0.2.7".parse().unwrap(), "10.0.1.5/24"));
        assert!(in_cidr("10.0.2.7".parse().unwrap(), "0.0.0.0/0"));
        assert!(!in_cidr("10.0.2.7".parse().unwrap(), "garbage"));
    }
}
