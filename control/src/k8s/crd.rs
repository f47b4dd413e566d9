//! Ocelot's custom resources (`ocelot.dev/v1`, all cluster-scoped):
//!
//! - `IPPool`: the pool the lab's YAML already declares (its spec is
//!   [`crate::model::IpPoolSpec`] itself);
//! - `IPAMBlock`: one block of a pool, named after its CIDR
//!   (`10.65.1.0/26` → `10-65-1-0-26`), holding its affinity and every
//!   allocation in it. It is the unit of atomicity of IPAM on Kubernetes:
//!   each change is one `create`/`replace`/`delete` guarded by the object's
//!   `resourceVersion` (see [`crate::k8s::ipam`]);
//! - `BlockAffinity`: `<node>-<block name>`, the index of which node holds
//!   which block (what `kubectl get blockaffinities` shows). Written after
//!   its block; the block is the truth, the controller mends the index.
//!
//! `ocelot crds` prints [`all_yaml`]; `manifests/crds.yaml` is that output,
//! and a test keeps the two equal.

use crate::ipam::{Allocation, Block};
use kube::CustomResource;
use kube::CustomResourceExt as _;
use ocelot_dataplane::api::Cidr;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The API group of every Ocelot resource.
pub const GROUP: &str = "ocelot.dev";

/// `IPAMBlock.spec.affinity` of a block held by `node`.
pub fn host_affinity(node: &str) -> String {
    format!("host:{node}")
}

// `IPPool`'s spec is the model's, so the lab's YAML, the directory
// datastore and the API server read one type.
pub use crate::model::{EncapMode, IpPoolObject, IpPoolSpec};

/// Who holds one address of a block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationSpec {
    /// The CNI handle: `<container ID>/<interface>`.
    pub handle: String,
    /// `namespace/name` of the pod (empty when the runtime did not say).
    #[serde(default)]
    pub pod: String,
    /// The node whose agent allocated the address.
    pub node: String,
    /// Endpoint attributes (netns, ifname, endpoint, mtu, containerID, podUID).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: BTreeMap<String, String>,
}

/// One block of a pool and the allocations in it.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ocelot.dev",
    version = "v1",
    kind = "IPAMBlock",
    root = "IpamBlockObject",
    plural = "ipamblocks",
    category = "ocelot",
    doc = "A block of an IP pool: its node affinity and its allocations. Named after its CIDR.",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Affinity", type_ = "string", json_path = ".spec.affinity"),
    printcolumn(name = "Allocated", type_ = "integer", json_path = ".spec.allocated"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(
        name = "HostLocal",
        type_ = "boolean",
        json_path = ".spec.hostLocal",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IpamBlockSpec {
    /// The block's CIDR, e.g. `10.65.1.0/26`.
    pub cidr: String,
    /// The IPPool the block was cut from (`podCIDR:<node>` for host-local ranges).
    pub pool: String,
    /// `host:<node>` when a node holds the block; absent when none does
    /// (its node is gone but borrowed addresses remain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// Allocated addresses, by address.
    #[serde(default)]
    pub allocations: BTreeMap<String, AllocationSpec>,
    /// How many addresses are allocated (informational, for `kubectl get`).
    #[serde(default)]
    pub allocated: u32,
    /// A node's `spec.podCIDR` used host-local: never borrowed from.
    #[serde(default)]
    pub host_local: bool,
}

/// The state of a node's claim on a block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    /// Being claimed: the block may not exist yet.
    Pending,
    /// The block exists and holds this affinity.
    #[default]
    Confirmed,
    /// Being released: the block is about to go.
    PendingDeletion,
}

/// Which node holds which block (the index of `IPAMBlock.spec.affinity`).
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ocelot.dev",
    version = "v1",
    kind = "BlockAffinity",
    root = "BlockAffinityObject",
    plural = "blockaffinities",
    category = "ocelot",
    doc = "A node's claim on an IPAM block. Named `<node>-<block name>`.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "State", type_ = "string", json_path = ".spec.state"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinitySpec {
    pub node: String,
    /// The block's CIDR.
    pub cidr: String,
    #[serde(default)]
    pub state: AffinityState,
}

/// The object name of the block `cidr`: `10.65.1.0/26` → `10-65-1-0-26`,
/// `fd00::/122` → `fd00-0-0-0-0-0-0-0-122` (IPv6 fully expanded, so two
/// blocks never share a name; a valid DNS-1123 subdomain either way).
pub fn block_name(cidr: &Cidr) -> String {
    match cidr.addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}-{}-{}-{}-{}", o[0], o[1], o[2], o[3], cidr.len)
        }
        IpAddr::V6(a) => {
            let mut s: Vec<String> = a.segments().iter().map(|g| format!("{g:x}")).collect();
            s.push(cidr.len.to_string());
            s.join("-")
        }
    }
}

/// The object name of `node`'s affinity for the block `cidr`.
pub fn affinity_name(node: &str, cidr: &Cidr) -> String {
    format!("{node}-{}", block_name(cidr))
}

/// Why an `IPAMBlock` object cannot be read as a block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("IPAMBlock {name}: spec.cidr {cidr:?}: {err}")]
    Cidr { name: String, cidr: String, err: String },
    #[error("IPAMBlock {name}: allocation key {key:?} is not an address")]
    Address { name: String, key: String },
    #[error("IPAMBlock {name}: address {ip} is outside the block {cidr}")]
    Outside { name: String, ip: IpAddr, cidr: String },
    #[error("IPAMBlock {name}: spec.affinity {affinity:?} is not `host:<node>`")]
    Affinity { name: String, affinity: String },
}

/// An `IPAMBlock` spec as IPAM's [`Block`]; `name` only for errors.
pub fn block_from_spec(name: &str, s: &IpamBlockSpec) -> Result<Block, BlockError> {
    let cidr: Cidr = s.cidr.parse().map_err(|err: String| BlockError::Cidr {
        name: name.into(),
        cidr: s.cidr.clone(),
        err,
    })?;
    let affinity = match s.affinity.as_deref() {
        None | Some("") => None,
        Some(a) => match a.strip_prefix("host:") {
            Some(n) if !n.is_empty() => Some(n.to_string()),
            _ => return Err(BlockError::Affinity { name: name.into(), affinity: a.into() }),
        },
    };
    let mut allocations = BTreeMap::new();
    for (k, a) in &s.allocations {
        let ip: IpAddr =
            k.parse().map_err(|_| BlockError::Address { name: name.into(), key: k.clone() })?;
        if !cidr.contains(ip) {
            return Err(BlockError::Outside { name: name.into(), ip, cidr: s.cidr.clone() });
        }
        allocations.insert(
            ip,
            Allocation {
                handle: a.handle.clone(),
                node: a.node.clone(),
                pod: a.pod.clone(),
                attrs: a.attrs.clone(),
            },
        );
    }
    Ok(Block { cidr, pool: s.pool.clone(), affinity, allocations, host_local: s.host_local })
}

/// IPAM's [`Block`] as an `IPAMBlock` spec.
pub fn spec_from_block(b: &Block) -> IpamBlockSpec {
    IpamBlockSpec {
        cidr: format!("{}/{}", b.cidr.addr, b.cidr.len),
        pool: b.pool.clone(),
        affinity: b.affinity.as_deref().map(host_affinity),
        allocations: b
            .allocations
            .iter()
            .map(|(ip, a)| {
                (
                    ip.to_string(),
                    AllocationSpec {
                        handle: a.handle.clone(),
                        pod: a.pod.clone(),
                        node: a.node.clone(),
                        attrs: a.attrs.clone(),
                    },
                )
            })
            .collect(),
        allocated: u32::try_from(b.allocations.len()).unwrap_or(u32::MAX),
        host_local: b.host_local,
    }
}

/// Every CRD, as one multi-document YAML stream (what `ocelot crds` prints
/// and `manifests/crds.yaml` holds).
pub fn all_yaml() -> Result<String, serde_norway::Error> {
    let mut out = String::from(
        "# Ocelot's custom resource definitions. Generated by `ocelot crds`;\n\
         # do not edit: a unit test fails when this file and the code differ.\n",
    );
    for crd in [IpPoolObject::crd(), IpamBlockObject::crd(), BlockAffinityObject::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `OCELOT_BLESS=1 cargo test -p ocelot-control committed_crds` rewrites
    /// the file (as `ocelot crds > manifests/crds.yaml` does).
    #[test]
    fn committed_crds_match_the_code() {
        let generated = all_yaml().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crds.yaml");
        if std::env::var_os("OCELOT_BLESS").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap();
        assert!(
            committed == generated,
            "manifests/crds.yaml is stale: run `ocelot crds > manifests/crds.yaml`"
        );
    }

    #[test]
    fn crds_are_cluster_scoped_ocelot_v1() {
        for crd in [IpPoolObject::crd(), IpamBlockObject::crd(), BlockAffinityObject::crd()] {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Cluster");
            assert_eq!(crd.spec.versions.len(), 1);
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, "v1");
            assert!(v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).is_some());
            assert!(v.additional_printer_columns.as_ref().is_some_and(|c| c.len() >= 3));
        }
        assert_eq!(IpamBlockObject::crd().spec.names.kind, "IPAMBlock");
        assert_eq!(IpPoolObject::crd().metadata.name.as_deref(), Some("ippools.ocelot.dev"));
    }

    #[test]
    fn the_labs_ippool_yaml_is_a_valid_object() {
        let text = include_str!("../../../manifests/examples/lab-overlay.yaml");
        let doc = text.split("\n---").next().unwrap();
        let obj: IpPoolObject = serde_norway::from_str(doc).unwrap();
        assert_eq!(obj.spec.cidr, "10.65.0.0/16");
        assert_eq!(obj.spec.vxlan_mode, EncapMode::Always);
        // The same text read as the model's pool gives the same spec.
        let m: crate::model::IpPool = serde_norway::from_str(doc).unwrap();
        assert_eq!(m.spec, obj.spec);
    }

    #[test]
    fn block_names() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        assert_eq!(block_name(&c("10.65.1.0/26")), "10-65-1-0-26");
        assert_eq!(block_name(&c("fd00::/122")), "fd00-0-0-0-0-0-0-0-122");
        assert_eq!(block_name(&c("::/122")), "0-0-0-0-0-0-0-0-122");
        assert_eq!(affinity_name("node-1", &c("10.65.1.64/26")), "node-1-10-65-1-64-26");
    }

    #[test]
    fn blocks_round_trip_and_bad_specs_are_errors() {
        let mut b = Block {
            cidr: "10.65.1.0/26".parse().unwrap(),
            pool: "p".into(),
            affinity: Some("node-1".into()),
            allocations: BTreeMap::new(),
            host_local: false,
        };
        b.allocations.insert(
            "10.65.1.3".parse().unwrap(),
            Allocation {
                handle: "c1/eth0".into(),
                node: "node-1".into(),
                pod: "default/a".into(),
                attrs: BTreeMap::new(),
            },
        );
        let s = spec_from_block(&b);
        assert_eq!(s.affinity.as_deref(), Some("host:node-1"));
        assert_eq!(s.allocated, 1);
        assert_eq!(block_from_spec("x", &s).unwrap(), b);

        let mut bad = s.clone();
        bad.allocations.insert("10.65.2.1".into(), AllocationSpec::default());
        assert!(matches!(block_from_spec("x", &bad), Err(BlockError::Outside { .. })));
        let mut bad = s.clone();
        bad.allocations.insert("nope".into(), AllocationSpec::default());
        assert!(matches!(block_from_spec("x", &bad), Err(BlockError::Address { .. })));
        let mut bad = s.clone();
        bad.cidr = "10.65.1.0".into();
        assert!(matches!(block_from_spec("x", &bad), Err(BlockError::Cidr { .. })));
        let mut bad = s;
        bad.affinity = Some("node-1".into());
        assert!(matches!(block_from_spec("x", &bad), Err(BlockError::Affinity { .. })));
    }
}
