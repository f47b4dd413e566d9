//! Kubernetes API objects (k8s-openapi types, and `IPPool` as a
//! `DynamicObject`) to the model types the agent computes with. One pure
//! function per kind, no I/O.
//!
//! The result is what the directory datastore makes of the same object
//! written as YAML: spec bodies go through the model's own deserializers
//! (the same defaults, the same validation), so the two backends agree by
//! construction; the shared suite in `control/tests/k8s_datastore_shared.rs`
//! checks it. What is dropped to keep memory small:
//! - every annotation of a Pod but the `ocelot.dev/` ones (the only ones
//!   the agent reads; the full objects of this node's own pods are kept
//!   apart, see `KubeDatastore::local_pod`), and on every kind
//!   `kubectl.kubernetes.io/last-applied-configuration` (a copy of the
//!   object, never read);
//! - a Pod's addresses when they are not its own: a `hostNetwork` pod
//!   reports the node's addresses, and a finished pod (`Succeeded`,
//!   `Failed`) has given its address back for reuse.

use crate::datastore::Cluster;
use crate::model;
use crate::policy::NetworkPolicy;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, DynamicObject};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// Pod annotations kept in the model: the agent reads only its own.
pub const POD_ANNOTATION_PREFIX: &str = "ocelot.dev/";

/// Never kept: `kubectl apply`'s copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Why an object was not taken into the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// An object without `metadata.name` (an API server never sends one).
    #[error("{kind} without metadata.name")]
    NoName { kind: &'static str },
    /// A field the model cannot take, or a NetworkPolicy the API server
    /// would have refused.
    #[error("{kind} {key}: {err}")]
    Invalid { kind: &'static str, key: String, err: String },
}

/// `ocelot.dev/v1` `IPPool`, until the CRD's own type is used.
pub fn ip_pool_resource() -> ApiResource {
    ApiResource {
        group: "ocelot.dev".into(),
        version: "v1".into(),
        api_version: "ocelot.dev/v1".into(),
        kind: "IPPool".into(),
        plural: "ippools".into(),
    }
}

/// A Kubernetes type the datastore watches: how it becomes a model object,
/// its key in the [`Cluster`], and which map of the Cluster holds it.
pub trait ToModel {
    type Model: Clone + PartialEq + Send + 'static;
    const KIND: &'static str;
    /// Namespaced kinds are keyed `namespace/name`, the others `name`.
    const NAMESPACED: bool;
    fn meta(&self) -> &ObjectMeta;
    fn to_model(&self) -> Result<Self::Model, ConvertError>;
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, Self::Model>;

    /// The object's key in the Cluster, from its metadata alone (so a
    /// deletion is applied even when the object does not convert).
    fn key(&self) -> Result<String, ConvertError> {
        key_of(self.meta(), Self::KIND, Self::NAMESPACED)
    }
}

fn key_of(m: &ObjectMeta, kind: &'static str, namespaced: bool) -> Result<String, ConvertError> {
    let name = m.name.as_deref().filter(|n| !n.is_empty()).ok_or(ConvertError::NoName { kind })?;
    Ok(if namespaced {
        format!("{}/{name}", m.namespace.as_deref().unwrap_or("default"))
    } else {
        name.to_string()
    })
}

/// The model's metadata: name, namespace, labels, the annotations `keep`
/// accepts, creation time.
pub fn meta(
    m: &ObjectMeta,
    kind: &'static str,
    namespaced: bool,
    keep: impl Fn(&str) -> bool,
) -> Result<model::ObjectMeta, ConvertError> {
    key_of(m, kind, namespaced)?;
    let annotations = m
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != LAST_APPLIED && keep(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(model::ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: if namespaced {
            Some(m.namespace.clone().unwrap_or_else(|| "default".into()))
        } else {
            None
        },
        labels: m.labels.clone().unwrap_or_default(),
        annotations,
        creation_timestamp: m
            .creation_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_string)),
    })
}

fn all(_: &str) -> bool {
    true
}

/// Deserialize a model type from an object's JSON with our metadata in
/// place of its own: the path the YAML of the directory datastore takes.
fn via_json<T: DeserializeOwned>(
    obj: &impl serde::Serialize,
    meta: &model::ObjectMeta,
    kind: &'static str,
    key: &str,
) -> Result<T, ConvertError> {
    let invalid = |err: String| ConvertError::Invalid { kind, key: key.to_string(), err };
    let mut v = serde_json::to_value(obj).map_err(|e| invalid(e.to_string()))?;
    let serde_json::Value::Object(m) = &mut v else {
        return Err(invalid("not a JSON object".into()));
    };
    m.remove("apiVersion");
    m.remove("kind");
    m.insert("metadata".into(), serde_json::to_value(meta).map_err(|e| invalid(e.to_string()))?);
    serde_json::from_value(v).map_err(|e| invalid(e.to_string()))
}

impl ToModel for core::Node {
    type Model = model::Node;
    const KIND: &'static str = "Node";
    const NAMESPACED: bool = false;
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, model::Node> {
        &mut c.nodes
    }
    /// Name, labels, annotations (the VTEP MAC), podCIDR, addresses.
    fn to_model(&self) -> Result<model::Node, ConvertError> {
        let addresses = self
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .map(|a| model::NodeAddress { kind: a.type_.clone(), address: a.address.clone() })
            .collect();
        Ok(model::Node {
            metadata: meta(&self.metadata, Self::KIND, false, all)?,
            spec: model::NodeSpec { pod_cidr: self.spec.as_ref().and_then(|s| s.pod_cidr.clone()) },
            status: model::NodeStatus { addresses },
        })
    }
}

impl ToModel for core::Namespace {
    type Model = model::Namespace;
    const KIND: &'static str = "Namespace";
    const NAMESPACED: bool = false;
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, model::Namespace> {
        &mut c.namespaces
    }
    fn to_model(&self) -> Result<model::Namespace, ConvertError> {
        Ok(model::Namespace { metadata: meta(&self.metadata, Self::KIND, false, all)? })
    }
}

impl ToModel for core::Pod {
    type Model = model::Pod;
    const KIND: &'static str = "Pod";
    const NAMESPACED: bool = true;
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, model::Pod> {
        &mut c.pods
    }
    /// What the policy calculation needs of every pod: labels, namespace,
    /// node, container ports, and its own addresses.
    fn to_model(&self) -> Result<model::Pod, ConvertError> {
        let metadata =
            meta(&self.metadata, Self::KIND, true, |k| k.starts_with(POD_ANNOTATION_PREFIX))?;
        let key = format!("{}/{}", metadata.namespace.as_deref().unwrap_or(""), metadata.name);
        let invalid =
            |err: String| ConvertError::Invalid { kind: Self::KIND, key: key.clone(), err };
        let spec = self.spec.as_ref();
        let mut containers = Vec::new();
        for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            let mut ports = Vec::new();
            for p in c.ports.iter().flatten() {
                let port = |n: i32| {
                    u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                        invalid(format!("container {:?}: port {n} out of range", c.name))
                    })
                };
                ports.push(model::ContainerPort {
                    name: p.name.clone(),
                    container_port: port(p.container_port)?,
                    host_port: p.host_port.filter(|h| *h != 0).map(port).transpose()?,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                });
            }
            containers.push(model::Container { name: c.name.clone(), ports });
        }
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let status = self.status.as_ref();
        let finished =
            matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        let pod_ips = if host_network || finished {
            Vec::new()
        } else {
            status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|p| model::PodIp { ip: p.ip.clone() })
                .collect()
        };
        Ok(model::Pod {
            metadata,
            spec: model::PodSpec { node_name: spec.and_then(|s| s.node_name.clone()), containers },
            status: model::PodStatus { pod_ips },
        })
    }
}

impl ToModel for networking::NetworkPolicy {
    type Model = NetworkPolicy;
    const KIND: &'static str = "NetworkPolicy";
    const NAMESPACED: bool = true;
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, NetworkPolicy> {
        &mut c.policies
    }
    /// Through the model's deserializer, then validated as the YAML path
    /// validates: a policy we cannot enforce exactly is refused, not
    /// approximated.
    fn to_model(&self) -> Result<NetworkPolicy, ConvertError> {
        let metadata = meta(&self.metadata, Self::KIND, true, all)?;
        let key = self.key()?;
        let mut spec =
            serde_json::to_value(self.spec.clone().unwrap_or_default()).map_err(|e| {
                ConvertError::Invalid { kind: Self::KIND, key: key.clone(), err: e.to_string() }
            })?;
        // Optional in the API since 1.31 (the server defaults it to {}).
        if let serde_json::Value::Object(m) = &mut spec {
            m.entry("podSelector").or_insert_with(|| serde_json::json!({}));
        }
        let obj = serde_json::json!({ "spec": spec });
        let np: NetworkPolicy = via_json(&obj, &metadata, Self::KIND, &key)?;
        np.validate().map_err(|err| ConvertError::Invalid { kind: Self::KIND, key, err })?;
        Ok(np)
    }
}

impl ToModel for core::Service {
    type Model = model::Service;
    const KIND: &'static str = "Service";
    const NAMESPACED: bool = true;
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, model::Service> {
        &mut c.services
    }
    fn to_model(&self) -> Result<model::Service, ConvertError> {
        let metadata = meta(&self.metadata, Self::KIND, true, all)?;
        let obj = serde_json::json!({ "spec": self.spec });
        let mut s: model::Service = via_json(&obj, &metadata, Self::KIND, &self.key()?)?;
        if self.spec.is_none() {
            s.spec = Default::default();
        }
        Ok(s)
    }
}

impl ToModel for discovery::EndpointSlice {
    type Model = model::EndpointSlice;
    const KIND: &'static str = "EndpointSlice";
    const NAMESPACED: bool = true;
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, model::EndpointSlice> {
        &mut c.endpoint_slices
    }
    fn to_model(&self) -> Result<model::EndpointSlice, ConvertError> {
        let metadata = meta(&self.metadata, Self::KIND, true, all)?;
        let obj = serde_json::json!({
            "addressType": self.address_type,
            "endpoints": self.endpoints,
            "ports": self.ports.clone().unwrap_or_default(),
        });
        via_json(&obj, &metadata, Self::KIND, &self.key()?)
    }
}

impl ToModel for DynamicObject {
    type Model = model::IpPool;
    const KIND: &'static str = "IPPool";
    const NAMESPACED: bool = false;
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn slot(c: &mut Cluster) -> &mut BTreeMap<String, model::IpPool> {
        &mut c.pools
    }
    /// `ocelot.dev/v1` `IPPool`: its `spec` read as `model::IpPoolSpec`.
    fn to_model(&self) -> Result<model::IpPool, ConvertError> {
        let metadata = meta(&self.metadata, Self::KIND, false, all)?;
        let obj = serde_json::json!({ "spec": self.data.get("spec") });
        via_json(&obj, &metadata, Self::KIND, &self.key()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_documents, Object};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s");

    fn fixture<T: DeserializeOwned>(name: &str) -> T {
        let text = std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The same object read by the directory datastore.
    fn from_yaml(text: &str) -> Object {
        let (mut objs, _) = parse_documents(text).unwrap();
        objs.remove(0)
    }

    #[test]
    fn pod_keeps_what_policy_needs_and_drops_the_rest() {
        let pod: core::Pod = fixture("pod.json");
        let m = pod.to_model().unwrap();
        assert_eq!(pod.key().unwrap(), "web/frontend-7d4b9c");
        assert_eq!(m.metadata.labels["app"], "frontend");
        assert_eq!(
            m.metadata.annotations.keys().collect::<Vec<_>>(),
            vec!["ocelot.dev/ip-addrs"],
            "only ocelot.dev/ annotations are kept"
        );
        assert_eq!(m.spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(m.spec.containers.len(), 2);
        let ports: Vec<_> = m.ports().map(|p| (p.name.clone(), p.container_port)).collect();
        assert_eq!(ports, vec![(Some("http".into()), 8080), (None, 9090)]);
        assert_eq!(m.ports().nth(1).unwrap().protocol, "UDP");
        assert_eq!(m.status_ips().map(|i| i.to_string()).collect::<Vec<_>>(), ["10.65.0.7"]);
        assert_eq!(m.metadata.creation_timestamp.as_deref(), Some("2026-11-20T09:12:01Z"));
        let yaml = from_yaml(
            r#"
kind: Pod
metadata:
  name: frontend-7d4b9c
  namespace: web
  labels: {app: frontend, pod-template-hash: 7d4b9c}
  annotations: {ocelot.dev/ip-addrs: '["10.65.0.7"]'}
  creationTimestamp: "2026-11-20T09:12:01Z"
spec:
  nodeName: node-1
  containers:
  - {name: web, ports: [{name: http, containerPort: 8080}]}
  - {name: metrics, ports: [{containerPort: 9090, protocol: UDP}]}
status: {podIPs: [{ip: 10.65.0.7}]}
"#,
        );
        assert_eq!(yaml, Object::Pod(m), "the same pod as the directory datastore reads it");
    }

    #[test]
    fn host_network_and_finished_pods_have_no_addresses_of_their_own() {
        let mut pod: core::Pod = fixture("pod.json");
        pod.spec.as_mut().unwrap().host_network = Some(true);
        assert!(pod.to_model().unwrap().status.pod_ips.is_empty());
        let mut pod: core::Pod = fixture("pod.json");
        pod.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(pod.to_model().unwrap().status.pod_ips.is_empty());
    }

    #[test]
    fn bad_ports_and_missing_names_are_errors_not_panics() {
        let mut pod: core::Pod = fixture("pod.json");
        pod.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap()[0].container_port = 70000;
        let e = pod.to_model().unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        let mut pod: core::Pod = fixture("pod.json");
        pod.metadata.name = None;
        assert_eq!(pod.to_model().unwrap_err(), ConvertError::NoName { kind: "Pod" });
        assert!(pod.key().is_err());
        // A pod with no spec or status at all converts to an empty one.
        let bare = core::Pod {
            metadata: ObjectMeta { name: Some("p".into()), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(bare.key().unwrap(), "default/p");
        assert!(bare.to_model().unwrap().spec.containers.is_empty());
    }

    #[test]
    fn node_namespace() {
        let node: core::Node = fixture("node.json");
        let m = node.to_model().unwrap();
        assert_eq!(node.key().unwrap(), "node-1");
        assert_eq!(m.internal_ip(), Some("192.0.2.11".parse().unwrap()));
        assert_eq!(m.spec.pod_cidr.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(m.metadata.annotations["ocelot.dev/vxlan-tunnel-mac"], "66:00:00:00:00:01");
        assert!(!m.metadata.annotations.contains_key(LAST_APPLIED));
        assert_eq!(m.metadata.namespace, None);
        let ns: core::Namespace = fixture("namespace.json");
        let m = ns.to_model().unwrap();
        assert_eq!(m.metadata.labels["kubernetes.io/metadata.name"], "web");
        assert_eq!(
            Object::Namespace(m),
            from_yaml(
                "kind: Namespace\nmetadata: {name: web, labels: {kubernetes.io/metadata.name: web, team: a}, creationTimestamp: '2026-11-20T09:00:00Z'}\n"
            )
        );
    }

    #[test]
    fn network_policy_as_the_yaml_path_reads_it() {
        let np: networking::NetworkPolicy = fixture("networkpolicy.json");
        let m = np.to_model().unwrap();
        assert_eq!(np.key().unwrap(), "web/allow-frontend");
        let yaml = from_yaml(
            r#"
kind: NetworkPolicy
metadata: {name: allow-frontend, namespace: web, creationTimestamp: "2026-11-20T09:13:00Z"}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchExpressions: [{key: app, operator: In, values: [frontend]}]}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports: [{protocol: TCP, port: http}, {protocol: UDP, port: 1000, endPort: 2000}]
  egress: []
"#,
        );
        assert_eq!(Object::NetworkPolicy(m), yaml);
    }

    #[test]
    fn network_policy_the_api_server_would_refuse_is_an_error() {
        let mut np: networking::NetworkPolicy = fixture("networkpolicy.json");
        let ports = np.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0].ports.as_mut().unwrap();
        ports[1].end_port = Some(10);
        let e = np.to_model().unwrap_err();
        assert!(e.to_string().contains("endPort 10 below port 1000"), "{e}");
        // No podSelector at all (optional since 1.31): every pod.
        let mut np: networking::NetworkPolicy = fixture("networkpolicy.json");
        np.spec.as_mut().unwrap().pod_selector = None;
        assert_eq!(np.to_model().unwrap().spec.pod_selector, Default::default());
    }

    #[test]
    fn service_endpoint_slice_and_pool() {
        let svc: core::Service = fixture("service.json");
        let m = svc.to_model().unwrap();
        assert_eq!(svc.key().unwrap(), "web/backend");
        assert_eq!(m.spec.cluster_ip.as_deref(), Some("10.96.12.34"));
        assert_eq!(m.spec.ports[0].target_port, Some(model::IntOrString::Str("http".into())));
        assert_eq!(m.spec.ports[0].protocol, "TCP");
        let es: discovery::EndpointSlice = fixture("endpointslice.json");
        let m = es.to_model().unwrap();
        assert_eq!(m.service_key().as_deref(), Some("web/backend"));
        assert_eq!(m.endpoints[0].addresses, vec!["10.65.0.9"]);
        assert_eq!(m.endpoints[0].conditions.ready, Some(true));
        assert_eq!(m.ports[0].port, Some(8080));
        let pool: DynamicObject = fixture("ippool.json");
        let m = pool.to_model().unwrap();
        assert_eq!(pool.key().unwrap(), "default-ipv4");
        assert_eq!(
            Object::IpPool(m),
            from_yaml(
                "kind: IPPool\nmetadata: {name: default-ipv4, creationTimestamp: '2026-11-20T08:00:00Z'}\nspec: {cidr: 10.65.0.0/16, vxlanMode: Always, natOutgoing: true}\n"
            )
        );
        let mut bad = pool.clone();
        bad.data["spec"]["blockSize"] = serde_json::json!("big");
        assert!(matches!(bad.to_model(), Err(ConvertError::Invalid { kind: "IPPool", .. })));
        bad.data = serde_json::json!({});
        assert!(bad.to_model().is_err(), "a pool without a spec");
    }
}
