//! The request/response protocol between `ocelot-cni` and the agent's CNI
//! server: one JSON request line on a unix socket, one JSON response line,
//! then the connection closes. The agent always answers in the newest
//! result model (CNI 1.1.0); the plugin converts to the version the runtime
//! asked for.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The CNI operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
}

/// One attachment named in a GC request (`cni.dev/valid-attachments`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// What the plugin sends the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CniRequest {
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for STATUS and GC).
    #[serde(default)]
    pub container_id: String,
    /// `CNI_NETNS` (ADD, CHECK; optional for DEL).
    #[serde(default)]
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: String,
    /// `CNI_ARGS`, parsed (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...).
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// The network's `name`.
    #[serde(default)]
    pub network: String,
    /// The plugin configuration object exactly as received on stdin.
    #[serde(default)]
    pub config: serde_json::Value,
    /// `prevResult`, converted to the 1.1.0 model (CHECK, DEL, chained ADD).
    #[serde(default)]
    pub prev_result: Option<CniResult>,
    /// For GC: the attachments that are still valid; everything else goes.
    #[serde(default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// An interface in a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// CNI 1.1.0 `socketPath` (vhost-user and the like); kept so a chained
    /// `prevResult` passes through unchanged.
    #[serde(rename = "socketPath", default, skip_serializing_if = "String::is_empty")]
    pub socket_path: String,
    /// CNI 1.1.0 `pciID`; kept for the same reason.
    #[serde(rename = "pciID", default, skip_serializing_if = "String::is_empty")]
    pub pci_id: String,
}

/// An address in a result (`address` is `IP/prefix`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// A route in a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    /// CNI 1.1.0 route attributes (`mtu`, `advmss`, `priority`, `table`,
    /// `scope`); kept so a chained `prevResult` passes through unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

/// DNS settings in a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// A result in the CNI 1.1.0 model (without `cniVersion`, which the plugin
/// adds when it encodes for the runtime's version).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CniResponse {
    /// Success; ADD carries the result, CHECK/DEL/STATUS/GC none.
    Ok { result: Option<CniResult> },
    /// A CNI error: `code` is the spec's error code (7 invalid config, 11
    /// try again later, 50/51 for STATUS, or 100+ for Ocelot's own).
    Error {
        code: u32,
        msg: String,
        #[serde(default)]
        details: String,
    },
}

/// Ocelot's own error codes (the spec reserves 100 and up for plugins).
pub mod codes {
    /// The pool has no free address for this pod.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// The requested address (annotation) is taken or outside every pool.
    pub const ADDRESS_UNAVAILABLE: u32 = 101;
    /// The dataplane refused or failed to create the interface.
    pub const DATAPLANE: u32 = 102;
    /// The pod is unknown to the datastore.
    pub const UNKNOWN_POD: u32 = 103;
    /// CHECK found the interface not as it should be.
    pub const CHECK_FAILED: u32 = 104;
}
