//! The agent's view of itself, as `/status` serves it and `ocelot status`
//! prints it: readiness, the nodes it knows, pools and blocks, endpoints,
//! policy counts, errors. Built from a [`Source`] on each request.

use super::state::{Flags, Histogram, OpsState};
use crate::datastore::Cluster;
use crate::ipam::IpamState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What the operations endpoints read from the agent. The agent implements
/// it (`ops::source`); tests implement it over fixed data.
pub trait Source: Send + Sync + 'static {
    /// This node's name.
    fn node(&self) -> String;
    /// The dataplane's control socket.
    fn dataplane_socket(&self) -> PathBuf;
    /// Run `f` over the current cluster (under the agent's read lock: be quick).
    fn with_cluster(&self, f: &mut dyn FnMut(&Cluster));
    /// The IPAM state (every node's blocks).
    fn ipam(&self) -> Result<IpamState, String>;
    /// What is wrong in the datastore that the agent works around (bad
    /// Services, refused specs), one line each.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentView {
    pub node: String,
    pub version: String,
    pub uptime_s: u64,
    pub ready: bool,
    /// Why not ready (empty when ready).
    pub not_ready: Vec<String>,
    pub datastore_synced: bool,
    pub dataplane_connected: bool,
    pub endpoints_synced: bool,
    /// Seconds since the agent's loop last turned.
    pub last_loop_s: Option<f64>,
    /// The other nodes of the cluster.
    pub nodes: Vec<NodeView>,
    pub pools: Vec<PoolView>,
    /// Blocks affine to this node, and blocks it borrowed addresses from.
    pub blocks: Vec<BlockView>,
    /// This node's endpoints (its IPAM allocations).
    pub endpoints: Vec<EndpointView>,
    pub policies: PolicyView,
    pub sync_errors: BTreeMap<String, u64>,
    pub policy_calc_count: u64,
    pub policy_calc_last_s: f64,
    /// Why the datastore is not current (an API server error), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore_error: Option<String>,
    /// Problems in the datastore the agent works around (Services ...).
    #[serde(default)]
    pub problems: Vec<String>,
    /// IPAM could not be read (the rest of the view is still given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// The node's InternalIP (its underlay address), if it has one.
    pub internal_ip: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    pub cidr: String,
    pub block_size: u8,
    /// `vxlan`, `ipip` (with their mode), or `none`.
    pub encapsulation: String,
    pub disabled: bool,
    /// Addresses in the pool.
    pub capacity: u64,
    /// Blocks claimed by any node, and by this one.
    pub blocks: u64,
    pub blocks_here: u64,
    /// Addresses allocated on any node, and on this one.
    pub allocated: u64,
    pub allocated_here: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockView {
    pub cidr: String,
    pub pool: String,
    pub affinity: Option<String>,
    pub allocated: u64,
    /// Addresses of this node's pods in the block.
    pub allocated_here: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointView {
    pub name: String,
    /// `namespace/name`; empty for an allocation without a pod.
    pub pod: String,
    pub ips: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyView {
    /// NetworkPolicies in the cluster.
    pub network_policies: u64,
    /// Of them, in namespaces with endpoints on this node.
    pub local_namespaces: u64,
}

/// The addresses in a prefix of length `len`.
fn capacity(addr_bits: u32, len: u8) -> u64 {
    let host = addr_bits.saturating_sub(u32::from(len));
    if host >= 64 {
        u64::MAX
    } else {
        1u64 << host
    }
}

fn encapsulation(p: &crate::model::IpPoolSpec) -> String {
    use crate::model::EncapMode;
    let mode = |m: &EncapMode| match m {
        EncapMode::Always => Some("Always"),
        EncapMode::CrossSubnet => Some("CrossSubnet"),
        _ => None,
    };
    match (mode(&p.vxlan_mode), mode(&p.ipip_mode)) {
        (Some(m), _) => format!("vxlan ({m})"),
        (None, Some(m)) => format!("ipip ({m})"),
        (None, None) => "none".into(),
    }
}

/// Readiness as `/readyz` answers it: the agent's own flags, and the
/// dataplane answering a fresh connection now (the agent's link only finds
/// out the dataplane died at its next request).
pub fn readiness(src: &dyn Source, ops: &OpsState) -> Result<(), Vec<String>> {
    let mut why = ops.readiness().err().unwrap_or_default();
    if ops.flags().dataplane_connected {
        let socket = src.dataplane_socket();
        if let Err(e) = ocelot_dataplane::api::client::Client::connect(&socket, "ocelot-readyz") {
            why.push(format!("dataplane not reachable at {}: {e}", socket.display()));
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

/// Build the view from the agent's state.
pub fn build(src: &dyn Source, ops: &OpsState) -> AgentView {
    let node = src.node();
    let Flags { datastore_synced, dataplane_connected, endpoints_synced } = ops.flags();
    let not_ready = readiness(src, ops).err().unwrap_or_default();
    let calc: Histogram = ops.policy_calc();
    let mut v = AgentView {
        node: node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: ops.uptime().as_secs(),
        ready: not_ready.is_empty(),
        not_ready,
        datastore_synced,
        dataplane_connected,
        endpoints_synced,
        last_loop_s: ops.since_last_tick().map(|d| d.as_secs_f64()),
        sync_errors: ops.sync_errors(),
        datastore_error: ops.datastore_error(),
        problems: src.problems(),
        policy_calc_count: calc.count,
        policy_calc_last_s: calc.last,
        ..AgentView::default()
    };
    let ipam = match src.ipam() {
        Ok(s) => s,
        Err(e) => {
            v.ipam_error = Some(e);
            IpamState::default()
        }
    };
    // Endpoints and blocks from IPAM.
    let mut here_ns = std::collections::BTreeSet::new();
    let mut by_handle: BTreeMap<String, EndpointView> = BTreeMap::new();
    for b in ipam.blocks.values() {
        let here = b.allocations.values().filter(|a| a.node == node).count() as u64;
        if here > 0 || b.affinity.as_deref() == Some(node.as_str()) {
            v.blocks.push(BlockView {
                cidr: b.cidr.to_string(),
                pool: b.pool.clone(),
                affinity: b.affinity.clone(),
                allocated: b.allocations.len() as u64,
                allocated_here: here,
            });
        }
        for (ip, a) in b.allocations.iter().filter(|(_, a)| a.node == node) {
            let e = by_handle.entry(a.handle.clone()).or_insert_with(|| EndpointView {
                name: a
                    .attrs
                    .get(crate::agent::attr::ENDPOINT)
                    .cloned()
                    .unwrap_or_else(|| a.handle.clone()),
                pod: a.pod.clone(),
                ips: Vec::new(),
            });
            e.ips.push(ip.to_string());
            if let Some((ns, _)) = a.pod.split_once('/') {
                here_ns.insert(ns.to_string());
            }
        }
    }
    v.endpoints = by_handle.into_values().collect();
    src.with_cluster(&mut |c: &Cluster| {
        v.nodes = c
            .nodes
            .values()
            .filter(|n| n.metadata.name != node)
            .map(|n| NodeView {
                name: n.metadata.name.clone(),
                internal_ip: n.internal_ip().map(|a| a.to_string()),
            })
            .collect();
        v.pools = c
            .pools
            .values()
            .map(|p| {
                let len = p.spec.cidr.rsplit_once('/').and_then(|(_, l)| l.parse::<u8>().ok());
                let bits = if p.spec.cidr.contains(':') { 128 } else { 32 };
                let blocks: Vec<_> =
                    ipam.blocks.values().filter(|b| b.pool == p.metadata.name).collect();
                PoolView {
                    name: p.metadata.name.clone(),
                    cidr: p.spec.cidr.clone(),
                    block_size: p.spec.block_size,
                    encapsulation: encapsulation(&p.spec),
                    disabled: p.spec.disabled,
                    capacity: len.map(|l| capacity(bits, l)).unwrap_or(0),
                    blocks: blocks.len() as u64,
                    blocks_here: blocks
                        .iter()
                        .filter(|b| b.affinity.as_deref() == Some(node.as_str()))
                        .count() as u64,
                    allocated: blocks.iter().map(|b| b.allocations.len() as u64).sum(),
                    allocated_here: blocks
                        .iter()
                        .flat_map(|b| b.allocations.values())
                        .filter(|a| a.node == node)
                        .count() as u64,
                }
            })
            .collect();
        v.policies = PolicyView {
            network_policies: c.policies.len() as u64,
            local_namespaces: c
                .policies
                .keys()
                .filter(|k| k.split_once('/').is_some_and(|(ns, _)| here_ns.contains(ns)))
                .count() as u64,
        };
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_of_prefixes() {
        assert_eq!(capacity(32, 16), 65536);
        assert_eq!(capacity(32, 32), 1);
        assert_eq!(capacity(128, 0), u64::MAX);
    }
}
