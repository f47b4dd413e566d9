//! One scenario, two datastores: every step is applied to a directory
//! datastore (a YAML file per object) and to the Kubernetes datastore (the
//! same objects through a fake API server, as JSON watch events), and the
//! Cluster each gives the agent must be the same after every step.
//!
//! The objects carry what an API server would add anyway (`namespace`,
//! `creationTimestamp`), and pods only `ocelot.dev/` annotations: the
//! Kubernetes datastore keeps no others of pods (see `k8s::convert`).

mod k8s_datastore_support;

use k8s_datastore_support::{eventually, harness, Harness};
use ocelot_control::datastore::{Cluster, Datastore, DirDatastore};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

enum Step {
    /// One YAML object, created or replaced.
    Apply(&'static str),
    /// Kind and key (`namespace/name`, or `name`).
    Delete(&'static str, &'static str),
}

/// A datastore the scenario drives.
trait Driver {
    fn apply(&mut self, kind: &str, key: &str, yaml: &str);
    fn delete(&mut self, kind: &str, key: &str);
    /// The Cluster once the datastore has taken the last step; `expect`
    /// is what the other datastore gave (the Kubernetes one converges
    /// asynchronously: it is waited for, up to a bound).
    fn cluster(&mut self, expect: Option<&Cluster>) -> Cluster;
}

struct Dir {
    dir: PathBuf,
    ds: DirDatastore,
    /// The file holding each object, by `kind/key`.
    files: BTreeMap<String, PathBuf>,
    writes: usize,
}

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("ocelot-shared-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Dir { ds: DirDatastore::open(&dir).unwrap(), dir, files: BTreeMap::new(), writes: 0 }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Driver for Dir {
    fn apply(&mut self, kind: &str, key: &str, yaml: &str) {
        // A new file each time (and the old one removed), so a change is
        // never hidden by an equal size and modification time.
        self.writes += 1;
        let p = self.dir.join(format!("{}-{}.yaml", self.writes, kind.to_lowercase()));
        std::fs::write(&p, yaml).unwrap();
        if let Some(old) = self.files.insert(format!("{kind}/{key}"), p) {
            std::fs::remove_file(old).unwrap();
        }
    }

    fn delete(&mut self, kind: &str, key: &str) {
        if let Some(p) = self.files.remove(&format!("{kind}/{key}")) {
            std::fs::remove_file(p).unwrap();
        }
    }

    fn cluster(&mut self, _: Option<&Cluster>) -> Cluster {
        self.ds.refresh();
        assert!(self.ds.errors.is_empty(), "{:?}", self.ds.errors);
        self.ds.cluster().clone()
    }
}

struct Kube(Harness);

fn api_version(kind: &str) -> &'static str {
    match kind {
        "NetworkPolicy" => "networking.k8s.io/v1",
        "IPPool" => "ocelot.dev/v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => "v1",
    }
}

impl Driver for Kube {
    fn apply(&mut self, kind: &str, _: &str, yaml: &str) {
        let mut v: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        v["apiVersion"] = api_version(kind).into();
        self.0.api.apply(v);
    }

    fn delete(&mut self, kind: &str, key: &str) {
        self.0.api.delete(kind, key);
    }

    fn cluster(&mut self, expect: Option<&Cluster>) -> Cluster {
        let ds = &mut self.0.ds;
        if let Some(want) = expect {
            eventually(Duration::from_secs(10), || {
                ds.refresh();
                ds.cluster() == want
            });
        }
        ds.cluster().clone()
    }
}

fn kind_and_key(yaml: &str) -> (String, String) {
    let v: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    let kind = v["kind"].as_str().unwrap().to_string();
    let name = v["metadata"]["name"].as_str().unwrap();
    let key = match v["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    (kind, key)
}

/// Run `steps` on both drivers; after each, both Clusters are equal and
/// `check` holds on them.
fn run(steps: &[(Step, &dyn Fn(&Cluster))]) {
    let mut dir = Dir::new("scenario");
    let h = harness(Default::default());
    assert!(h.ds.wait_ready(Duration::from_secs(10)));
    let mut kube = Kube(h);
    for (i, (step, check)) in steps.iter().enumerate() {
        let drivers: [&mut dyn Driver; 2] = [&mut dir, &mut kube];
        for d in drivers {
            match step {
                Step::Apply(yaml) => {
                    let (kind, key) = kind_and_key(yaml);
                    d.apply(&kind, &key, yaml);
                }
                Step::Delete(kind, key) => d.delete(kind, key),
            }
        }
        let from_dir = dir.cluster(None);
        let from_kube = kube.cluster(Some(&from_dir));
        assert_eq!(from_kube, from_dir, "step {i}: the two datastores disagree");
        check(&from_dir);
    }
}

const NODE: &str = r#"
kind: Node
metadata:
  name: node-1
  labels: {kubernetes.io/hostname: node-1, zone: a}
  annotations: {ocelot.dev/vxlan-tunnel-mac: "66:00:00:00:00:01"}
  creationTimestamp: "2026-11-20T08:00:00Z"
spec: {podCIDR: 10.244.1.0/24}
status:
  addresses: [{type: InternalIP, address: 192.0.2.11}, {type: Hostname, address: node-1}]
"#;

const NS_WEB: &str = r#"
kind: Namespace
metadata:
  name: web
  labels: {kubernetes.io/metadata.name: web, team: a}
  annotations: {owner: team-a}
  creationTimestamp: "2026-11-20T09:00:00Z"
"#;

const NS_WEB_RELABELED: &str = r#"
kind: Namespace
metadata:
  name: web
  labels: {kubernetes.io/metadata.name: web, team: b}
  creationTimestamp: "2026-11-20T09:00:00Z"
"#;

const POD_A: &str = r#"
kind: Pod
metadata:
  name: a
  namespace: web
  labels: {app: web}
  annotations: {ocelot.dev/ip-addrs: '["10.65.0.7"]'}
  creationTimestamp: "2026-11-20T09:01:00Z"
spec:
  nodeName: node-1
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP, hostPort: 5353}]
status: {podIPs: [{ip: 10.65.0.7}]}
"#;

const POD_A_RELABELED: &str = r#"
kind: Pod
metadata:
  name: a
  namespace: web
  labels: {app: web, tier: front}
  annotations: {ocelot.dev/ip-addrs: '["10.65.0.7"]'}
  creationTimestamp: "2026-11-20T09:01:00Z"
spec:
  nodeName: node-1
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP, hostPort: 5353}]
status: {podIPs: [{ip: 10.65.0.7}]}
"#;

const POD_B: &str = r#"
kind: Pod
metadata:
  name: b
  namespace: web
  labels: {app: client}
  creationTimestamp: "2026-11-20T09:02:00Z"
spec:
  nodeName: node-2
  containers: [{name: c}]
status: {podIPs: [{ip: 10.65.1.3}]}
"#;

const POLICY: &str = r#"
kind: NetworkPolicy
metadata: {name: web, namespace: web, creationTimestamp: "2026-11-20T09:03:00Z"}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
    - namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports: [{port: http}, {protocol: UDP, port: 53}, {port: 9000, endPort: 9100}]
  egress: []
"#;

const POLICY_EGRESS: &str = r#"
kind: NetworkPolicy
metadata: {name: web, namespace: web, creationTimestamp: "2026-11-20T09:03:00Z"}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {}}]}]
"#;

const POOL: &str = r#"
kind: IPPool
metadata: {name: default, creationTimestamp: "2026-11-20T08:00:00Z"}
spec: {cidr: 10.65.0.0/16, vxlanMode: CrossSubnet, natOutgoing: true, nodeSelector: "zone == 'a'"}
"#;

const POOL_DISABLED: &str = r#"
kind: IPPool
metadata: {name: default, creationTimestamp: "2026-11-20T08:00:00Z"}
spec: {cidr: 10.65.0.0/16, blockSize: 28, disabled: true}
"#;

const SERVICE: &str = r#"
kind: Service
metadata: {name: web, namespace: web, creationTimestamp: "2026-11-20T09:04:00Z"}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}, {name: dns, protocol: UDP, port: 53, targetPort: 53}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  externalTrafficPolicy: Local
"#;

const SLICE: &str = r#"
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: web
  labels: {kubernetes.io/service-name: web}
  creationTimestamp: "2026-11-20T09:04:01Z"
addressType: IPv4
endpoints:
- addresses: [10.65.0.7]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  targetRef: {kind: Pod, namespace: web, name: a}
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
"#;

#[test]
fn directory_and_kubernetes_datastores_give_the_same_cluster() {
    let none: &dyn Fn(&Cluster) = &|_| {};
    run(&[
        (Step::Apply(NODE), &|c| assert!(c.nodes["node-1"].internal_ip().is_some())),
        (Step::Apply(NS_WEB), none),
        (Step::Apply(POOL), &|c| assert!(c.pools["default"].spec.nat_outgoing)),
        (Step::Apply(POD_A), &|c| assert_eq!(c.pods["web/a"].ports().count(), 2)),
        (Step::Apply(POD_B), &|c| assert_eq!(c.pods.len(), 2)),
        (Step::Apply(POLICY), &|c| assert!(c.policies.contains_key("web/web"))),
        (Step::Apply(SERVICE), none),
        (Step::Apply(SLICE), &|c| {
            assert_eq!(c.endpoint_slices["web/web-abc12"].service_key().as_deref(), Some("web/web"))
        }),
        (Step::Apply(POD_A_RELABELED), &|c| {
            assert_eq!(c.pods["web/a"].metadata.labels["tier"], "front")
        }),
        (Step::Apply(NS_WEB_RELABELED), &|c| {
            assert_eq!(c.namespaces["web"].metadata.labels["team"], "b")
        }),
        (Step::Apply(POLICY_EGRESS), &|c| assert_eq!(c.policies["web/web"].types(), (false, true))),
        (Step::Apply(POOL_DISABLED), &|c| assert!(c.pools["default"].spec.disabled)),
        (Step::Delete("Pod", "web/b"), &|c| assert_eq!(c.pods.len(), 1)),
        (Step::Delete("EndpointSlice", "web/web-abc12"), &|c| {
            assert!(c.endpoint_slices.is_empty())
        }),
        (Step::Delete("NetworkPolicy", "web/web"), &|c| assert!(c.policies.is_empty())),
        (Step::Delete("Service", "web/web"), none),
        (Step::Delete("IPPool", "default"), none),
        (Step::Delete("Pod", "web/a"), none),
        (Step::Delete("Namespace", "web"), none),
        (Step::Delete("Node", "node-1"), &|c| assert_eq!(c, &Cluster::default())),
    ]);
}

/// The policy calculation sees the same pods, addresses and policies from
/// either datastore (the Cluster is all it reads of them).
#[test]
fn the_policy_calculation_gets_the_same_model() {
    use ocelot_control::agent::policy::model;
    let mut dir = Dir::new("model");
    let h = harness(Default::default());
    assert!(h.ds.wait_ready(Duration::from_secs(10)));
    let mut kube = Kube(h);
    for yaml in [NS_WEB, POD_A, POD_B, POLICY] {
        let (kind, key) = kind_and_key(yaml);
        dir.apply(&kind, &key, yaml);
        kube.apply(&kind, &key, yaml);
    }
    let d = dir.cluster(None);
    let k = kube.cluster(Some(&d));
    let ipam = Default::default();
    let (md, mk) = (model(&d, &ipam), model(&k, &ipam));
    assert_eq!(md.pods, mk.pods);
    assert_eq!(md.namespaces, mk.namespaces);
    assert_eq!(md.policies, mk.policies);
    // Without any IPAM state the addresses come from status.podIPs.
    assert_eq!(mk.pods["web/b"].ips, vec!["10.65.1.3".parse::<std::net::IpAddr>().unwrap()]);
}
