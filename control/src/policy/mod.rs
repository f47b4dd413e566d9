//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`): the object model, and
//! its meaning as a function "may this connection happen?" (`eval`), written
//! from the upstream API documentation and checked against the upstream e2e
//! truth tables. The dataplane's compiled form must agree with it.

pub mod calc;
pub mod eval;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::model::ObjectMeta;

/// `metav1.LabelSelector`. An empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` term.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Does the selector match `labels`?
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator {
                    Operator::In => v.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => v.is_some(),
                    Operator::DoesNotExist => v.is_none(),
                }
            })
    }
}

/// `intstr.IntOrString` as a port: a number or a named container port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// One `ports` entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPort {
    /// TCP, UDP or SCTP; TCP when absent.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Absent: every port of the protocol.
    #[serde(default)]
    pub port: Option<PortRef>,
    /// With a numeric `port`: the range `port..=endPort`.
    #[serde(default)]
    pub end_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

/// One peer of a rule: pods by selectors (both given: the intersection),
/// or addresses by CIDR.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    pub ip_block: Option<IpBlock>,
}

/// An ingress rule (peers in `from`) or egress rule (peers in `to`). An
/// absent or empty peer list means every peer; an absent or empty port
/// list, every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    pub pod_selector: LabelSelector,
    #[serde(default)]
    pub policy_types: Option<Vec<PolicyType>>,
    /// `None` and `Some([])` differ only through `policyTypes`' default.
    #[serde(default)]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default)]
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub metadata: ObjectMeta,
    pub spec: NetworkPolicySpec,
}

impl NetworkPolicy {
    /// The policy's types: as given, else Ingress, plus Egress when the
    /// policy has egress rules (the API server's defaulting).
    pub fn types(&self) -> (bool, bool) {
        match &self.spec.policy_types {
            Some(t) if !t.is_empty() => {
                (t.contains(&PolicyType::Ingress), t.contains(&PolicyType::Egress))
            }
            _ => (true, self.spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        }
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// What the API server would refuse: `to` in an ingress rule, `from`
    /// in an egress rule, a peer with nothing in it or with an ipBlock
    /// beside selectors, bad CIDRs, an `endPort` without a numeric port or
    /// below it, an unknown protocol.
    pub fn validate(&self) -> Result<(), String> {
        let name = format!("NetworkPolicy {}/{}", self.namespace(), self.metadata.name);
        for r in self.spec.ingress.iter().flatten() {
            if !r.to.is_empty() {
                return Err(format!(
                    "{name}: an ingress rule has `to` (ingress peers go in `from`)"
                ));
            }
        }
        for r in self.spec.egress.iter().flatten() {
            if !r.from.is_empty() {
                return Err(format!("{name}: an egress rule has `from` (egress peers go in `to`)"));
            }
        }
        let rules = self.spec.ingress.iter().flatten().chain(self.spec.egress.iter().flatten());
        for r in rules {
            for p in r.from.iter().chain(&r.to) {
                match (&p.ip_block, p.pod_selector.is_some() || p.namespace_selector.is_some()) {
                    (None, false) => return Err(format!("{name}: a peer selects nothing")),
                    (Some(_), true) => {
                        return Err(format!("{name}: a peer has both ipBlock and selectors"))
                    }
                    (Some(b), false) => {
                        for c in std::iter::once(&b.cidr).chain(&b.except) {
                            if !valid_cidr(c) {
                                return Err(format!("{name}: {c:?} is not a CIDR"));
                            }
                        }
                    }
                    (None, true) => {}
                }
            }
            for pp in &r.ports {
                let proto = pp.protocol.as_deref().unwrap_or("TCP");
                if !["TCP", "UDP", "SCTP"].contains(&proto) {
                    return Err(format!("{name}: protocol {proto:?} (TCP, UDP or SCTP)"));
                }
                match (&pp.port, pp.end_port) {
                    (Some(PortRef::Number(0)), _) => return Err(format!("{name}: port 0")),
                    (Some(PortRef::Number(p)), Some(e)) if e < *p => {
                        return Err(format!("{name}: endPort {e} below port {p}"))
                    }
                    (Some(PortRef::Name(_)) | None, Some(_)) => {
                        return Err(format!("{name}: endPort needs a numeric port"))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn valid_cidr(c: &str) -> bool {
    let Some((a, l)) = c.split_once('/') else { return false };
    match (a.parse::<std::net::IpAddr>(), l.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(l)) => l <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(l)) => l <= 128,
        _ => false,
    }
}
