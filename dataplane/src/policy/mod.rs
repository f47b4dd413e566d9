//! Network policy in the dataplane: the rules the agent computes for each
//! endpoint (with every selector already resolved to addresses), and their
//! compiled form ([`classify::Classifier`]), whose lookup cost does not grow
//! with the number of rules or addresses.

pub mod classify;
pub mod conntrack;
pub mod filter;

use crate::api::Cidr;
use serde::{Deserialize, Serialize};

/// Transport protocols a rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            132 => Some(Proto::Sctp),
            _ => None,
        }
    }
}

/// A port range of one protocol, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub proto: Proto,
    pub first: u16,
    pub last: u16,
}

/// Addresses: a CIDR minus the CIDRs in `except` (each inside it). A pod
/// is a /32 without exceptions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Net {
    pub cidr: Cidr,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Cidr>,
}

/// One allow rule. `peers: None` is every peer; `ports: None` is every
/// protocol and port (ICMP included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub peers: Option<Vec<Net>>,
    #[serde(default)]
    pub ports: Option<Vec<PortRange>>,
}

/// What an endpoint may receive and send. `None` for a direction means not
/// isolated (everything allowed); `Some(rules)`, only what a rule allows
/// (`Some([])` denies everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPolicy {
    #[serde(default)]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default)]
    pub egress: Option<Vec<Rule>>,
}

impl Rule {
    /// The plain meaning of the rule, for tests: does it allow `peer` on
    /// `proto`/`port` (`proto` None: a protocol without ports, e.g. ICMP)?
    pub fn allows(&self, peer: std::net::Ipv4Addr, proto: Option<Proto>, port: u16) -> bool {
        let peer_ok = self.peers.as_ref().is_none_or(|nets| {
            let ip = peer.into();
            nets.iter().any(|n| n.cidr.contains(ip) && !n.except.iter().any(|e| e.contains(ip)))
        });
        let port_ok = self.ports.as_ref().is_none_or(|ps| {
            ps.iter().any(|r| Some(r.proto) == proto && (r.first..=r.last).contains(&port))
        });
        peer_ok && port_ok
    }
}
