//! The cluster as the agent sees it: the few fields of Kubernetes objects
//! (and of our `IPPool`) that Ocelot uses. Both datastores — a directory of
//! YAML, and later the Kubernetes API — produce these.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339, as the API server sets it (the older of two Services
    /// claiming one nodePort keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default, rename = "podCIDR", skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}

impl Node {
    /// The node's `InternalIP`, if it has one.
    pub fn internal_ip(&self) -> Option<std::net::IpAddr> {
        self.status
            .addresses
            .iter()
            .find(|a| a.kind == "InternalIP")
            .and_then(|a| a.address.parse().ok())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    /// Port on the node forwarded to this one (the `portmap` plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// TCP (default), UDP or SCTP.
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// One of `status.podIPs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// The pod's addresses as the API server reports them (`status.podIPs`).
/// The policy calculation takes them besides the IPAM allocations, so a
/// pod whose address Ocelot's IPAM did not give (another node's CNI, a
/// pod created before Ocelot) is still a peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<PodIp>,
}

impl PodStatus {
    fn is_empty(&self) -> bool {
        self.pod_ips.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default, skip_serializing_if = "PodStatus::is_empty")]
    pub status: PodStatus,
}

impl Pod {
    /// Every declared container port.
    pub fn ports(&self) -> impl Iterator<Item = &ContainerPort> {
        self.spec.containers.iter().flat_map(|c| c.ports.iter())
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }

    /// The addresses in `status.podIPs` that parse.
    pub fn status_ips(&self) -> impl Iterator<Item = std::net::IpAddr> + '_ {
        self.status.pod_ips.iter().filter_map(|p| p.ip.parse().ok())
    }
}

/// Encapsulation mode of a pool, as Calico spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EncapMode {
    Always,
    CrossSubnet,
    #[default]
    Never,
}

/// An IP pool: where pod addresses come from, and how they travel between
/// nodes.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ocelot.dev",
    version = "v1",
    kind = "IPPool",
    root = "IpPoolObject",
    plural = "ippools",
    shortname = "ocippool",
    category = "ocelot",
    doc = "An IP pool: pods take addresses from its blocks.",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Block", type_ = "integer", json_path = ".spec.blockSize"),
    printcolumn(name = "VXLAN", type_ = "string", json_path = ".spec.vxlanMode"),
    printcolumn(name = "IPIP", type_ = "string", json_path = ".spec.ipipMode"),
    printcolumn(name = "NAT", type_ = "boolean", json_path = ".spec.natOutgoing"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled")
)]
#[serde(rename_all = "camelCase")]
pub struct IpPoolSpec {
    /// The pool's CIDR, e.g. `10.65.0.0/16`.
    pub cidr: String,
    /// Prefix length of the blocks nodes claim (default 26: 64 addresses).
    #[serde(default = "default_block_size")]
    pub block_size: u8,
    /// VXLAN between nodes: `Always`, `CrossSubnet` or `Never` (default).
    #[serde(default)]
    pub vxlan_mode: EncapMode,
    /// IP-in-IP between nodes: `Always`, `CrossSubnet` or `Never` (default).
    #[serde(default, rename = "ipipMode")]
    pub ipip_mode: EncapMode,
    /// Masquerade traffic from the pool's pods to destinations outside every pool.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// Which nodes may take blocks from the pool: `all()` (default), or
    /// `key == 'value'` terms joined by `&&`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    /// A disabled pool hands out no new addresses.
    #[serde(default)]
    pub disabled: bool,
}

fn default_block_size() -> u8 {
    26
}

/// `ocelot.dev/v1` `IPPool`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPool {
    pub metadata: ObjectMeta,
    pub spec: IpPoolSpec,
}

/// An integer or a name (`targetPort`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

/// One port of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// TCP (default), UDP or SCTP.
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: i64,
    /// Defaults to `port`; a name resolves per endpoint (the pod's named
    /// container port, carried by the EndpointSlice's ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(default, rename = "clientIP", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

/// The fields of a `v1` `ServiceSpec` Ocelot uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (default), `NodePort`, `LoadBalancer`, `ExternalName`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// An address, `None` (headless) or absent (to be allocated).
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Pods backing the Service; absent: EndpointSlices are managed by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` (default) or `ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// `Cluster` (default) or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    /// `Cluster` (default) or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    #[serde(default, rename = "externalIPs", skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<String>,
}

/// `v1` `Service`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<ObjectReference>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default = "tcp")]
    pub protocol: String,
}

/// `discovery.k8s.io/v1` `EndpointSlice`; its Service is the
/// `kubernetes.io/service-name` label.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    /// `IPv4` (the only kind Ocelot forwards), `IPv6`, `FQDN`.
    #[serde(default = "ipv4_kind")]
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

fn ipv4_kind() -> String {
    "IPv4".into()
}

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl Service {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }
}

impl EndpointSlice {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }
    /// `namespace/name` of the Service this slice belongs to.
    pub fn service_key(&self) -> Option<String> {
        self.metadata.labels.get(SERVICE_NAME_LABEL).map(|s| format!("{}/{}", self.namespace(), s))
    }
}

/// One object of any kind Ocelot reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Node(Node),
    Namespace(Namespace),
    Pod(Pod),
    IpPool(IpPool),
    NetworkPolicy(crate::policy::NetworkPolicy),
    Service(Service),
    EndpointSlice(EndpointSlice),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Node(_) => "Node",
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::IpPool(_) => "IPPool",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Node(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::IpPool(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
        }
    }

    /// `Kind/namespace/name` (cluster-scoped kinds have no namespace).
    pub fn key(&self) -> String {
        match self {
            Object::Pod(p) => format!("Pod/{}", p.key()),
            Object::NetworkPolicy(p) => {
                format!("NetworkPolicy/{}/{}", p.namespace(), p.metadata.name)
            }
            Object::Service(s) => format!("Service/{}", s.key()),
            Object::EndpointSlice(s) => format!("EndpointSlice/{}", s.key()),
            o => format!("{}/{}", o.kind(), o.meta().name),
        }
    }
}

/// Why a YAML document was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document {doc}: not valid YAML: {err}")]
    Yaml { doc: usize, err: String },
    #[error("document {doc}: {kind} {name:?}: {err}")]
    Invalid { doc: usize, kind: String, name: String, err: String },
}

/// Parse multi-document Kubernetes YAML. Kinds Ocelot does not read are
/// skipped (and returned by name so callers can say so); a document that is
/// not valid YAML, or an object of a known kind with bad fields, is an error.
pub fn parse_documents(text: &str) -> Result<(Vec<Object>, Vec<String>), ParseError> {
    let mut objects = Vec::new();
    let mut skipped = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let v = serde_norway::Value::deserialize(doc)
            .map_err(|e| ParseError::Yaml { doc: doc_no, err: e.to_string() })?;
        if v.is_null() {
            continue;
        }
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let name = v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        let bad = |e: serde_norway::Error| ParseError::Invalid {
            doc: doc_no,
            kind: kind.clone(),
            name: name.clone(),
            err: e.to_string(),
        };
        let obj = match kind.as_str() {
            "Node" => Object::Node(serde_norway::from_value(v.clone()).map_err(bad)?),
            "Namespace" => Object::Namespace(serde_norway::from_value(v.clone()).map_err(bad)?),
            "Pod" => Object::Pod(serde_norway::from_value(v.clone()).map_err(bad)?),
            "IPPool" => Object::IpPool(serde_norway::from_value(v.clone()).map_err(bad)?),
            "NetworkPolicy" => {
                let mut np: crate::policy::NetworkPolicy =
                    serde_norway::from_value(v.clone()).map_err(bad)?;
                np.metadata.namespace.get_or_insert_with(|| "default".into());
                np.validate().map_err(|err| ParseError::Invalid {
                    doc: doc_no,
                    kind: kind.clone(),
                    name: name.clone(),
                    err,
                })?;
                Object::NetworkPolicy(np)
            }
            "Service" => {
                let mut svc: Service = serde_norway::from_value(v.clone()).map_err(bad)?;
                svc.metadata.namespace.get_or_insert_with(|| "default".into());
                Object::Service(svc)
            }
            "EndpointSlice" => {
                let mut es: EndpointSlice = serde_norway::from_value(v.clone()).map_err(bad)?;
                es.metadata.namespace.get_or_insert_with(|| "default".into());
                Object::EndpointSlice(es)
            }
            "" => {
                return Err(ParseError::Invalid { doc: doc_no, kind, name, err: "no kind".into() });
            }
            _ => {
                skipped.push(format!("{kind}/{name}"));
                continue;
            }
        };
        if obj.meta().name.is_empty() {
            return Err(ParseError::Invalid {
                doc: doc_no,
                kind,
                name,
                err: "metadata.name is empty".into(),
            });
        }
        objects.push(obj);
    }
    Ok((objects, skipped))
}

/// Write an object back as YAML (with its apiVersion and kind).
pub fn to_yaml(o: &Object) -> String {
    let (api, body) = match o {
        Object::Node(x) => ("v1", serde_norway::to_value(x)),
        Object::Namespace(x) => ("v1", serde_norway::to_value(x)),
        Object::Pod(x) => ("v1", serde_norway::to_value(x)),
        Object::IpPool(x) => ("ocelot.dev/v1", serde_norway::to_value(x)),
        Object::NetworkPolicy(x) => ("networking.k8s.io/v1", serde_norway::to_value(x)),
        Object::Service(x) => ("v1", serde_norway::to_value(x)),
        Object::EndpointSlice(x) => ("discovery.k8s.io/v1", serde_norway::to_value(x)),
    };
    let mut m = serde_norway::Mapping::new();
    m.insert("apiVersion".into(), api.into());
    m.insert("kind".into(), o.kind().into());
    if let Ok(serde_norway::Value::Mapping(b)) = body {
        for (k, v) in b {
            m.insert(k, v);
        }
    }
    serde_norway::to_string(&m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: default}
spec: {cidr: 10.65.0.0/16, natOutgoing: true}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses: [{type: InternalIP, address: 192.0.2.11}]
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}, annotations: {ocelot.dev/ip-addrs: '["10.65.0.7"]'}}
spec:
  nodeName: node-1
  containers:
  - name: c
    ports: [{containerPort: 80, name: serve-80-tcp}, {containerPort: 81, protocol: UDP}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    #[test]
    fn network_policies_parse_validate_and_round_trip() {
        let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports: [{port: 80}, {protocol: UDP, port: 1000, endPort: 2000}, {port: serve-81-tcp}]
  egress: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny}
spec: {podSelector: {}}
"#;
        let (objs, skipped) = parse_documents(text).unwrap();
        assert!(skipped.is_empty());
        let Object::NetworkPolicy(np) = &objs[0] else { panic!("{objs:?}") };
        assert_eq!(np.types(), (true, false), "an empty egress list is not an egress policy");
        assert_eq!(np.spec.ingress.as_ref().unwrap()[0].from.len(), 2);
        assert_eq!(objs[1].key(), "NetworkPolicy/default/deny");
        for o in &objs {
            let (back, _) = parse_documents(&to_yaml(o)).unwrap();
            assert_eq!(&back[0], o);
        }
        // What the API server refuses is refused here too.
        for bad in [
            "spec: {podSelector: {}, ingress: [{to: [{podSelector: {}}]}]}",
            "spec: {podSelector: {}, ingress: [{from: [{}]}]}",
            "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
            "spec: {podSelector: {}, egress: [{ports: [{port: 90, endPort: 80}]}]}",
            "spec: {podSelector: {}, egress: [{ports: [{protocol: ICMP}]}]}",
            "spec: {podSelector: {}, egress: [{ports: [{port: x, endPort: 80}]}]}",
            "spec: {podSelector: {}, surprise: 1}",
        ] {
            let doc = format!("kind: NetworkPolicy\nmetadata: {{name: n}}\n{bad}\n");
            assert!(parse_documents(&doc).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_the_kinds_we_read() {
        let (objs, skipped) = parse_documents(SAMPLE).unwrap();
        assert_eq!(objs.len(), 4);
        assert_eq!(skipped, vec!["ConfigMap/ignored"]);
        let Object::IpPool(p) = &objs[0] else { panic!() };
        assert_eq!(p.spec.block_size, 26);
        assert!(p.spec.nat_outgoing);
        assert_eq!(p.spec.vxlan_mode, EncapMode::Never);
        let Object::Node(n) = &objs[1] else { panic!() };
        assert_eq!(n.internal_ip(), Some("192.0.2.11".parse().unwrap()));
        let Object::Pod(pod) = &objs[3] else { panic!() };
        assert_eq!(pod.key(), "x/a");
        assert_eq!(pod.spec.containers[0].ports[0].protocol, "TCP");
        assert_eq!(pod.spec.containers[0].ports[1].protocol, "UDP");
        assert_eq!(objs[3].key(), "Pod/x/a");
    }

    #[test]
    fn yaml_roundtrip() {
        let (objs, _) = parse_documents(SAMPLE).unwrap();
        for o in &objs {
            let (back, _) = parse_documents(&to_yaml(o)).unwrap();
            assert_eq!(&back[0], o);
        }
    }

    #[test]
    fn bad_documents_are_clear_errors() {
        assert!(matches!(
            parse_documents("kind: Pod\nmetadata: [oops"),
            Err(ParseError::Yaml { .. })
        ));
        let e =
            parse_documents("kind: Pod\nmetadata: {name: p}\nspec: {containers: 5}").unwrap_err();
        assert!(e.to_string().contains("Pod \"p\""), "{e}");
        assert!(parse_documents("kind: Pod\nmetadata: {name: ''}").is_err());
        assert!(parse_documents("metadata: {name: x}").is_err());
    }
}
