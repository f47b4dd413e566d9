//! The Kubernetes API backend: the agent's datastore read from the API
//! server (watchers on Nodes, Namespaces, Pods, NetworkPolicies, IPPools,
//! Services, EndpointSlices), the Node status the agent publishes, and the
//! IPAM custom resources and their store.
//!
//! Files: `convert` (k8s-openapi objects to model types, pure), `watch`
//! (watch streams applied to stores of converted objects), `datastore`
//! (`KubeDatastore`, the `Datastore` trait over them), `publish` (Node
//! annotations, the `NetworkUnavailable` condition, Events). The IPAM side
//! (`crd`, `ipam`, `fake`, `lease`, `controller*`, `default_pool`) is its own.

pub mod controller;
pub mod controller_gc;
pub mod convert;
pub mod crd;
pub mod datastore;
pub mod default_pool;
pub mod fake;
pub mod ipam;
pub mod lease;
pub mod publish;
pub mod watch;
