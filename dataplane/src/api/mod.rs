//! The dataplane's control API: newline-delimited JSON over a unix socket
//! that only root can open. Documented for operators in
//! `docs/dataplane-api.md`; these types are the definition.
//!
//! Every request is `{"id": N, "op": "...", ...fields}` and gets exactly one
//! response `{"id": N, "ok": {...}}` or `{"id": N, "error": {"code": ..,
//! "message": ..}}`. The first request on a connection must be `hello`,
//! which negotiates the protocol version. A bad request gets an error and
//! changes nothing; the connection stays usable.

pub mod client;
pub mod server;

use crate::counters::CounterSnapshot;
use crate::wire::MacAddr;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;

/// Protocol versions this build speaks, newest last.
pub const VERSIONS: &[u32] = &[1];

/// Longest request line accepted: room for `set_services` of a large
/// cluster (5,000 Services with two backends each are about 1.7 MB).
pub const MAX_LINE: usize = 64 << 20;

/// An IP prefix, written `10.65.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Is `ip` inside the prefix (host bits of `addr` ignored)?
    pub fn contains(&self, ip: IpAddr) -> bool {
        use crate::tables::lpm::PrefixKey;
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                u32::from(n).mask(self.len) == u32::from(a).mask(self.len)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                u128::from(n).mask(self.len) == u128::from(a).mask(self.len)
            }
            _ => false,
        }
    }

    /// The prefix with its host bits cleared.
    pub fn network(&self) -> Cidr {
        use crate::tables::lpm::PrefixKey;
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(u32::from(a).mask(self.len).into()),
            IpAddr::V6(a) => IpAddr::V6(u128::from(a).mask(self.len).into()),
        };
        Cidr { addr, len: self.len }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) =
            s.split_once('/').ok_or_else(|| format!("invalid CIDR {s:?}: expected ADDR/LEN"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("invalid CIDR {s:?}: bad address"))?;
        let len: u8 = l.parse().map_err(|_| format!("invalid CIDR {s:?}: bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("invalid CIDR {s:?}: prefix length above {max}"));
        }
        Ok(Cidr { addr, len })
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A pod interface the dataplane owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Unique key of the endpoint (1 to 15 characters, an interface-name
    /// alphabet).
    pub name: String,
    /// Path of the pod's network namespace (`/var/run/netns/..`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// Name of the interface inside the pod (`eth0`).
    pub ifname: String,
    /// MAC of the pod's interface; derived from `name` when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// The pod's addresses (each routed to it as a host route).
    pub ips: Vec<IpAddr>,
    /// MTU of the pod's interface.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

fn default_mtu() -> u32 {
    1500
}

/// Another node, as the overlay needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteNodeSpec {
    pub name: String,
    /// Its underlay address: where tunnel packets go, and the only source
    /// tunnel packets from it are accepted from.
    pub ip: std::net::Ipv4Addr,
    /// Its VTEP MAC (the inner destination of VXLAN frames to it).
    pub vtep_mac: MacAddr,
}

/// Pods of another node, and how to reach them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteRoute {
    pub cidr: Cidr,
    /// A node of [`OverlaySpec::nodes`], by name.
    pub node: String,
    pub encap: crate::tables::Encap,
}

/// The whole cross-node state: this node's tunnel endpoint, the other
/// nodes, and the routes to their pods. Each `set_overlay` replaces the
/// previous one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    /// This node's underlay address; the uplink is the interface holding it.
    pub local_ip: std::net::Ipv4Addr,
    /// This node's VTEP MAC.
    pub vtep_mac: MacAddr,
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
    /// The uplink's MTU; 0 (the default) reads it from the interface.
    #[serde(default)]
    pub uplink_mtu: u32,
    #[serde(default)]
    pub nodes: Vec<RemoteNodeSpec>,
    #[serde(default)]
    pub routes: Vec<RemoteRoute>,
    /// How tunnel traffic crosses the uplink: the kernel's sockets (the
    /// default), AF_XDP, or AF_XDP when it can attach.
    #[serde(default)]
    pub uplink_mode: UplinkMode,
}

/// How the tunnels use the uplink. The socket ports are open in every mode
/// (with XDP they carry what the program passes to the kernel, such as
/// outer fragments, and what leaves before a neighbour is resolved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkMode {
    /// AF_XDP when the XDP program attaches; otherwise the kernel's
    /// sockets, with the reason in the overlay status.
    Auto,
    /// AF_XDP, or `set_overlay` fails.
    Xdp,
    /// The kernel's sockets only: no XDP program on the uplink. The
    /// default: on virtual uplinks (veth) it moves 64 KiB UDP GSO/GRO
    /// bundles where AF_XDP moves single frames, and measured 3.6x the
    /// TCP throughput (perf/README.md); AF_XDP has the lower latency.
    #[default]
    Socket,
}

impl UplinkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkMode::Auto => "auto",
            UplinkMode::Xdp => "xdp",
            UplinkMode::Socket => "socket",
        }
    }
}

impl std::fmt::Display for UplinkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for UplinkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(UplinkMode::Auto),
            "xdp" => Ok(UplinkMode::Xdp),
            "socket" => Ok(UplinkMode::Socket),
            _ => Err(format!("uplink mode {s:?}: expected auto, xdp or socket")),
        }
    }
}

/// Calico's default VNI.
pub fn default_vni() -> u32 {
    4096
}

/// The IANA VXLAN port.
pub fn default_vxlan_port() -> u16 {
    4789
}

/// What the dataplane made of an [`OverlaySpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayStatus {
    pub spec: OverlaySpec,
    /// The interface holding `local_ip`, and its prefix length.
    pub uplink: String,
    pub uplink_prefix: u8,
    /// The MTU in use (detected or given).
    pub uplink_mtu: u32,
    /// Largest inner packet per encapsulation: the pods' MTU should not
    /// exceed the one of the encapsulation they use.
    pub vxlan_mtu: u32,
    pub ipip_mtu: u32,
    /// What carries tunnel traffic and why: `xdp (driver)`, `xdp (skb)`,
    /// `socket`, `socket (xdp failed: ...)`, or `none (...)` when no route
    /// uses a tunnel.
    #[serde(default)]
    pub uplink_mode: String,
}

/// Where a Service is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendKind {
    /// The Service's cluster IP: from pods and from the node itself.
    ClusterIp,
    /// `nodePort` on one of the node's addresses, reached from outside the
    /// node (and from its pods).
    NodePort,
    /// An `externalIPs` address.
    ExternalIp,
}

/// One address and port a Service answers on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub kind: FrontendKind,
}

/// One backend of a Service port (an EndpointSlice endpoint, with the
/// port resolved for it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// On this node (for the `Local` traffic policies).
    #[serde(default)]
    pub local: bool,
    /// EndpointSlice `conditions.ready`: takes new connections.
    #[serde(default = "yes")]
    pub ready: bool,
    /// `conditions.serving`: used for new connections only when no backend
    /// is ready (as kube-proxy does).
    #[serde(default = "yes")]
    pub serving: bool,
    /// `conditions.terminating`: existing connections finish, new ones go
    /// elsewhere.
    #[serde(default)]
    pub terminating: bool,
}

fn yes() -> bool {
    true
}

/// One port of one Service: its frontends and backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// `namespace/name:port` (the port's name, or its number), for status
    /// and logs; unique.
    pub name: String,
    pub proto: crate::policy::Proto,
    pub frontends: Vec<Frontend>,
    /// May be empty: new connections are then refused at once (TCP RST,
    /// ICMP port unreachable).
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 = no affinity.
    #[serde(default)]
    pub affinity_timeout_s: u32,
    /// `externalTrafficPolicy: Local`: NodePort/external traffic only to
    /// local backends, client address kept.
    #[serde(default)]
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: cluster-IP traffic only to local
    /// backends.
    #[serde(default)]
    pub internal_local: bool,
}

/// Source NAT of pod traffic leaving the cluster (`natOutgoing`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatOutgoingSpec {
    /// Pods whose address is in one of these (the pools with
    /// `natOutgoing: true`) are translated...
    #[serde(default)]
    pub sources: Vec<Cidr>,
    /// ...unless the destination is in one of these: every pool, the
    /// service ranges, the nodes' addresses.
    #[serde(default)]
    pub exclude: Vec<Cidr>,
    /// The address they leave with; `None` = the uplink's address.
    #[serde(default)]
    pub addr: Option<IpAddr>,
    /// Source ports of translated flows (natOutgoing, hairpin, NodePort
    /// to another node), inclusive. Default 61440-65535: outside Linux's
    /// ephemeral range, so replies to the node's address never meet one
    /// of its sockets, and one mask (0xf000) selects them for steering.
    #[serde(default = "default_snat_ports")]
    pub ports: (u16, u16),
}

impl Default for NatOutgoingSpec {
    fn default() -> NatOutgoingSpec {
        NatOutgoingSpec {
            sources: Vec::new(),
            exclude: Vec::new(),
            addr: None,
            ports: default_snat_ports(),
        }
    }
}

/// The default source ports of translated flows.
pub fn default_snat_ports() -> (u16, u16) {
    (61440, 65535)
}

/// Everything the dataplane translates: Services and natOutgoing. Replaced
/// whole by `set_services`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesSpec {
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// The cluster-IP ranges: routed from the node into the dataplane.
    #[serde(default)]
    pub service_cidrs: Vec<Cidr>,
    /// The NodePort range, inclusive (Kubernetes' default 30000-32767).
    #[serde(default = "default_node_port_range")]
    pub node_port_range: (u16, u16),
    #[serde(default)]
    pub nat_outgoing: NatOutgoingSpec,
}

impl Default for ServicesSpec {
    fn default() -> ServicesSpec {
        ServicesSpec {
            services: Vec::new(),
            service_cidrs: Vec::new(),
            node_port_range: default_node_port_range(),
            nat_outgoing: NatOutgoingSpec::default(),
        }
    }
}

/// Kubernetes' default `--service-node-port-range`.
pub fn default_node_port_range() -> (u16, u16) {
    (30000, 32767)
}

/// What the dataplane made of a [`ServicesSpec`] (`set_services`, `state`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesStatus {
    /// Service ports, frontends and backends in use.
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Bytes of the Maglev lookup tables.
    pub table_bytes: usize,
    /// Routed from the node into the dataplane (through the host interface).
    #[serde(default)]
    pub service_cidrs: Vec<Cidr>,
    /// The address natOutgoing translates to (`None`: natOutgoing cannot
    /// apply: no `addr` and no overlay yet).
    #[serde(default)]
    pub nat_addr: Option<std::net::Ipv4Addr>,
    /// How replies to translated source ports reach the dataplane:
    /// `tc ingress on <uplink>`, or why not.
    #[serde(default)]
    pub steering: String,
}

/// One endpoint's policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointPolicyUpdate {
    pub endpoint: String,
    pub policy: crate::policy::EndpointPolicy,
}

/// Requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Negotiate the version: the dataplane picks the newest it shares.
    Hello {
        versions: Vec<u32>,
        #[serde(default)]
        client: String,
    },
    /// Replace the whole desired state: endpoints not listed are removed.
    Sync {
        endpoints: Vec<EndpointSpec>,
        #[serde(default)]
        pools: Vec<Cidr>,
    },
    /// Create (or confirm) one endpoint.
    AddEndpoint { endpoint: EndpointSpec },
    /// Remove one endpoint; succeeds when it is already gone.
    RemoveEndpoint { name: String },
    /// Replace the overlay: tunnel endpoint, other nodes, their routes.
    SetOverlay { overlay: OverlaySpec },
    /// Set the NetworkPolicy of some endpoints (the others keep theirs).
    /// An endpoint may get its policy before it exists: it applies from
    /// the endpoint's first packet.
    SetPolicies { policies: Vec<EndpointPolicyUpdate> },
    /// Replace the Services and natOutgoing (validated whole first;
    /// persisted). Existing connections keep their translation.
    SetServices { services: ServicesSpec },
    /// Read every counter.
    Counters,
    /// Read the endpoints, pools and table version.
    State,
}

/// A request with its correlation id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

/// Error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not a valid request.
    BadRequest,
    /// No common protocol version.
    UnsupportedVersion,
    /// `hello` must come first.
    HelloFirst,
    /// A field is invalid (name, address, namespace...).
    InvalidArgument,
    /// The kernel refused an operation (TAP, netlink).
    System,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into() }
    }
}

/// An endpoint as the dataplane holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub spec: EndpointSpec,
    pub port: u32,
    pub worker: usize,
    pub mac: MacAddr,
}

/// Counters of one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    pub port: u32,
    pub name: String,
    pub kind: crate::tables::PortKind,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
}

/// Counters of one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    pub worker: usize,
    pub core: Option<usize>,
    pub ports: usize,
    pub batches: u64,
    pub polls: u64,
    pub handoff_in: u64,
    pub handoff_out: u64,
    #[serde(default)]
    pub gro_merged: u64,
    /// Connection-tracking entries in use, and new flows refused because
    /// the table was full.
    #[serde(default)]
    pub ct_entries: u64,
    #[serde(default)]
    pub ct_refused: u64,
    /// Translated flows (forward and reverse halves) and source ports
    /// allocated by this worker.
    #[serde(default)]
    pub nat_entries: u64,
    #[serde(default)]
    pub snat_ports: u64,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
}

/// Successful results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        version: u32,
        dataplane: String,
        tables_version: u64,
    },
    Done {
        tables_version: u64,
    },
    Endpoint {
        endpoint: EndpointStatus,
    },
    Overlay {
        tables_version: u64,
        overlay: OverlayStatus,
    },
    Services {
        tables_version: u64,
        services: ServicesStatus,
    },
    Counters {
        ports: Vec<PortCounters>,
        workers: Vec<WorkerCounters>,
        drop_reasons: Vec<(String, String)>,
    },
    State {
        tables_version: u64,
        endpoints: Vec<EndpointStatus>,
        pools: Vec<Cidr>,
        host_iface: Option<String>,
        #[serde(default)]
        overlay: Option<OverlayStatus>,
        #[serde(default)]
        services: ServicesStatus,
    },
}

/// The response to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: Option<u64>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

// One value per API response, off the packet path: not worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Reply),
    Error(ApiError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let e: Envelope =
            serde_json::from_str(r#"{"id":7,"op":"hello","versions":[1,2],"client":"agent"}"#)
                .unwrap();
        assert_eq!(e.request, Request::Hello { versions: vec![1, 2], client: "agent".into() });
        let e: Envelope = serde_json::from_str(
            r#"{"id":8,"op":"add_endpoint","endpoint":{"name":"oc1","netns":"/var/run/netns/p","ifname":"eth0","ips":["10.65.0.2"]}}"#,
        )
        .unwrap();
        let Request::AddEndpoint { endpoint } = e.request else { panic!() };
        assert_eq!(endpoint.mtu, 1500);
        assert!(serde_json::from_str::<Envelope>(r#"{"id":9,"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Envelope>(r#"{"id":9,"op":"remove_endpoint"}"#).is_err());
    }

    #[test]
    fn response_wire_format() {
        let r = Response {
            id: Some(3),
            outcome: Outcome::Error(ApiError::new(ErrorCode::HelloFirst, "say hello")),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":3,"error":{"code":"hello_first","message":"say hello"}}"#
        );
        let r = Response { id: Some(4), outcome: Outcome::Ok(Reply::Done { tables_version: 9 }) };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":4,"ok":{"kind":"done","tables_version":9}}"#
        );
        assert_eq!(
            serde_json::from_str::<Response>(&serde_json::to_string(&r).unwrap()).unwrap(),
            r
        );
    }

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "10.65.0.0/16".parse().unwrap();
        assert_eq!(c.len, 16);
        assert!("10.65.0.0/33".parse::<Cidr>().is_err());
        assert!("10.65.0.0".parse::<Cidr>().is_err());
        assert!("fd00::/64".parse::<Cidr>().is_ok());
    }
}
