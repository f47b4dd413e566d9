//! The Kubernetes datastore against a fake API server (kube's tower-test
//! mock client, real API-server JSON): list, watch events, bookmarks, an
//! expired watch (410) and the relist it forces, an unreachable server
//! that leaves the last good state in place, and the return to it.

mod k8s_datastore_support;

use k8s_datastore_support::{eventually, harness, FakeApi};
use ocelot_control::datastore::Datastore;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> Value {
    let p = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn pod(name: &str, node: &str, app: &str, ip: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "web", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox",
                 "ports": [{"containerPort": 80, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// A cluster with one object of every kind, from the fixtures.
fn seeded() -> FakeApi {
    let api = FakeApi::default();
    for f in [
        "node.json",
        "namespace.json",
        "pod.json",
        "networkpolicy.json",
        "ippool.json",
        "service.json",
        "endpointslice.json",
    ] {
        api.apply(fixture(f));
    }
    api
}

#[test]
fn lists_then_follows_watch_events() {
    let mut h = harness(seeded());
    assert!(h.ds.wait_ready(WAIT), "initial lists: {:?}", h.ds.health());
    assert!(h.ds.ready());
    assert!(h.ds.refresh());
    let c = h.ds.cluster().clone();
    assert_eq!(c.nodes.keys().collect::<Vec<_>>(), ["node-1"]);
    assert_eq!(c.namespaces.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(c.pods.keys().collect::<Vec<_>>(), ["web/frontend-7d4b9c"]);
    assert_eq!(c.policies.keys().collect::<Vec<_>>(), ["web/allow-frontend"]);
    assert_eq!(c.pools.keys().collect::<Vec<_>>(), ["default-ipv4"]);
    assert_eq!(c.services.keys().collect::<Vec<_>>(), ["web/backend"]);
    assert_eq!(c.endpoint_slices.keys().collect::<Vec<_>>(), ["web/backend-x2k9p"]);
    assert!(!h.ds.refresh(), "nothing new: no change");

    // ADDED
    h.api.apply(pod("b", "node-2", "client", "10.65.1.2"));
    assert!(eventually(WAIT, || h.ds.refresh() && h.ds.cluster().pods.contains_key("web/b")));
    // MODIFIED
    h.api.apply(pod("b", "node-2", "server", "10.65.1.2"));
    assert!(eventually(WAIT, || {
        h.ds.refresh();
        h.ds.cluster().pods["web/b"].metadata.labels["app"] == "server"
    }));
    // A change the model does not carry (an image) is no change.
    let mut img = pod("b", "node-2", "server", "10.65.1.2");
    img["spec"]["containers"][0]["image"] = json!("busybox:2");
    h.api.apply(img);
    h.api.bookmark();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!h.ds.refresh(), "an image change and a bookmark change nothing");
    // DELETED
    h.api.delete("Pod", "web/b");
    assert!(eventually(WAIT, || h.ds.refresh() && !h.ds.cluster().pods.contains_key("web/b")));
    // The watches are still the first ones: no relist so far.
    assert_eq!(h.api.lists("/api/v1/pods", &[]), 2, "every pod, and this node's");
    assert_eq!(h.api.lists("/api/v1/pods", &["fieldSelector=spec.nodeName"]), 1);
    assert_eq!(h.api.open_watches("Pod"), 2, "every pod, and this node's");
    assert_eq!(h.ds.health().failing(), None);
}

#[test]
fn expired_watch_relists_and_catches_up() {
    let mut h = harness(seeded());
    assert!(h.ds.wait_ready(WAIT));
    h.ds.refresh();
    let lists = |api: &FakeApi| api.lists("/api/v1/namespaces", &[]);
    assert_eq!(lists(&h.api), 1);
    // The watch must be open before the compaction, or it would simply
    // start after it, from the list's (still current) version, and never
    // see a 410.
    assert!(eventually(WAIT, || h.api.open_watches("Namespace") > 0));
    // The history is compacted: every open watch gets ERROR 410 and the
    // watchers list again. A namespace created meanwhile, and one deleted,
    // are seen through the relist.
    h.api.expire();
    h.api.apply(json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "new"}}));
    h.api.delete("Namespace", "web");
    assert!(eventually(WAIT, || {
        h.ds.refresh();
        h.ds.cluster().namespaces.keys().collect::<Vec<_>>() == ["new"]
    }));
    assert!(lists(&h.api) >= 2, "relisted after 410");
    let health = h.ds.health();
    assert!(
        health.watchers["Namespace"]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("too old resource version"),
        "{health:?}"
    );
    assert!(health.watchers["Namespace"].lists >= 2);
    // And it keeps following events after the relist.
    h.api.apply(pod("c", "node-1", "x", "10.65.0.9"));
    assert!(eventually(WAIT, || h.ds.refresh() && h.ds.cluster().pods.contains_key("web/c")));
}

#[test]
fn unreachable_server_keeps_the_last_good_state_then_converges() {
    let mut h = harness(seeded());
    assert!(h.ds.wait_ready(WAIT));
    h.ds.refresh();
    let before = h.ds.cluster().clone();
    h.api.set_down(true);
    assert!(eventually(WAIT, || h.ds.last_error().is_some()), "{:?}", h.ds.health());
    // Meanwhile the cluster changes, and its history is compacted.
    h.api.apply(pod("late", "node-1", "x", "10.65.0.10"));
    h.api.delete("NetworkPolicy", "web/allow-frontend");
    h.api.expire();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!h.ds.refresh(), "nothing is lost while the server is away");
    assert_eq!(h.ds.cluster(), &before);
    assert!(h.ds.ready(), "still ready: it has listed once, its data is the last good");
    h.api.set_down(false);
    assert!(eventually(WAIT, || {
        h.ds.refresh();
        let c = h.ds.cluster();
        c.pods.contains_key("web/late") && c.policies.is_empty()
    }));
    assert!(eventually(WAIT, || h.ds.last_error().is_none()), "{:?}", h.ds.health());
    // Its own pods came back through the relist of the node's watcher too.
    assert!(eventually(WAIT, || h.ds.local_pod("web", "late").is_some()));
}

#[test]
fn this_nodes_pods_are_kept_whole_the_others_trimmed() {
    let api = seeded();
    api.apply(pod("elsewhere", "node-2", "x", "10.65.1.3"));
    let mut h = harness(api);
    assert!(h.ds.wait_ready(WAIT));
    h.ds.refresh();
    let full = h.ds.local_pod("web", "frontend-7d4b9c").expect("this node's pod");
    let spec = full.spec.as_ref().unwrap();
    assert_eq!(spec.containers[0].image.as_deref(), Some("nginx:1.27"), "the full object");
    assert!(full.metadata.managed_fields.as_ref().is_none_or(|m| m.is_empty()));
    assert!(h.ds.local_pod("web", "elsewhere").is_none());
    assert_eq!(h.ds.local_pods().len(), 1);
    // Both pods are in the cluster, trimmed to what the agent uses.
    let c = h.ds.cluster();
    assert_eq!(c.pods.len(), 2);
    let ann = &c.pods["web/frontend-7d4b9c"].metadata.annotations;
    assert!(ann.keys().all(|k| k.starts_with("ocelot.dev/")), "{ann:?}");
    assert_eq!(
        c.pods["web/elsewhere"].status_ips().collect::<Vec<_>>(),
        ["10.65.1.3".parse::<std::net::IpAddr>().unwrap()]
    );
    // A pod moving onto this node joins the full store.
    h.api.apply(pod("elsewhere", "node-1", "x", "10.65.1.3"));
    assert!(eventually(WAIT, || h.ds.local_pod("web", "elsewhere").is_some()));
}

#[test]
fn a_bad_network_policy_is_reported_and_skipped() {
    let api = seeded();
    let mut bad = fixture("networkpolicy.json");
    bad["metadata"]["name"] = json!("bad");
    bad["spec"]["ingress"][0]["ports"][1]["endPort"] = json!(10);
    api.apply(bad);
    let mut h = harness(api);
    assert!(h.ds.wait_ready(WAIT));
    h.ds.refresh();
    assert_eq!(h.ds.cluster().policies.keys().collect::<Vec<_>>(), ["web/allow-frontend"]);
    let invalid = h.ds.health().invalid();
    assert_eq!(invalid.len(), 1, "{invalid:?}");
    assert!(invalid[0].contains("web/bad") && invalid[0].contains("endPort 10 below port 1000"));
    // Fixed: taken, and no longer reported.
    let mut fixed = fixture("networkpolicy.json");
    fixed["metadata"]["name"] = json!("bad");
    h.api.apply(fixed);
    assert!(eventually(WAIT, || h.ds.refresh() && h.ds.cluster().policies.contains_key("web/bad")));
    assert!(h.ds.health().invalid().is_empty());
}

#[test]
fn not_ready_until_every_watcher_has_listed() {
    let api = seeded();
    api.set_down(true);
    let mut h = harness(api);
    assert!(!h.ds.wait_ready(Duration::from_millis(300)));
    assert!(!h.ds.ready());
    assert!(h.ds.last_error().is_some());
    assert!(!h.ds.refresh());
    assert!(h.ds.cluster().nodes.is_empty());
    h.api.set_down(false);
    assert!(h.ds.wait_ready(WAIT));
    assert!(h.ds.refresh());
    assert!(h.ds.cluster().nodes.contains_key("node-1"));
}

#[test]
fn changes_wake_subscribers() {
    let mut h = harness(seeded());
    let rx = h.ds.subscribe().expect("the kubernetes datastore pushes changes");
    assert!(h.ds.wait_ready(WAIT));
    while rx.try_recv().is_ok() {}
    h.api.apply(pod("w", "node-2", "x", "10.65.1.9"));
    rx.recv_timeout(WAIT).expect("woken by the change");
    assert!(eventually(WAIT, || h.ds.refresh() && h.ds.cluster().pods.contains_key("web/w")));
}

#[test]
fn publishes_the_node_once_and_rate_limits_events() {
    use ocelot_control::k8s::publish::{KubeLink, IPV4_ADDRESS_ANNOTATION, UP_REASON};
    let mut h = harness(seeded());
    assert!(h.ds.wait_ready(WAIT));
    h.ds.refresh();
    let link = KubeLink::new(h.ds.client(), h.ds.handle().unwrap(), "node-1");
    // The fixture's node has its VTEP MAC already; its address is missing.
    let node = h.ds.cluster().nodes["node-1"].clone();
    link.publish_node(&node, ("192.0.2.11".parse().unwrap(), 24));
    assert!(eventually(WAIT, || h.api.writes().len() == 2), "{:?}", h.api.writes());
    let w = h.api.writes();
    assert_eq!((w[0].method.as_str(), w[0].path.as_str()), ("PATCH", "/api/v1/nodes/node-1"));
    assert_eq!(w[0].content_type, "application/merge-patch+json");
    assert_eq!(
        w[0].body,
        json!({"metadata": {"annotations": {IPV4_ADDRESS_ANNOTATION: "192.0.2.11/24"}}}),
        "only what is missing"
    );
    assert_eq!(w[1].path, "/api/v1/nodes/node-1/status");
    assert_eq!(w[1].content_type, "application/strategic-merge-patch+json");
    let cond = &w[1].body["status"]["conditions"][0];
    assert_eq!(cond["type"], "NetworkUnavailable");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], UP_REASON);
    // Published: nothing more is sent for the same node.
    let mut published = node.clone();
    published.metadata.annotations.insert(IPV4_ADDRESS_ANNOTATION.into(), "192.0.2.11/24".into());
    std::thread::sleep(Duration::from_millis(50));
    link.publish_node(&published, ("192.0.2.11".parse().unwrap(), 24));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.api.writes().len(), 2);
    // Events: posted in the background, once per reason per minute.
    link.warn("IPAMExhausted", "no address for pod web/x: pool exhausted");
    link.warn("IPAMExhausted", "no address for pod web/y: pool exhausted");
    assert!(eventually(WAIT, || h.api.writes().len() == 3));
    std::thread::sleep(Duration::from_millis(100));
    let w = h.api.writes();
    assert_eq!(w.len(), 3, "the second is held back: {w:?}");
    assert_eq!(w[2].method, "POST");
    assert_eq!(w[2].path, "/apis/events.k8s.io/v1/namespaces/default/events");
    assert_eq!(w[2].body["reason"], "IPAMExhausted");
    assert_eq!(w[2].body["type"], "Warning");
    assert_eq!(w[2].body["regarding"]["kind"], "Node");
    assert_eq!(w[2].body["regarding"]["name"], "node-1");
    assert_eq!(w[2].body["reportingController"], "ocelot-agent");
}

#[test]
fn publishing_while_the_server_is_down_retries_later() {
    use ocelot_control::k8s::publish::KubeLink;
    let mut h = harness(seeded());
    assert!(h.ds.wait_ready(WAIT));
    h.ds.refresh();
    let link = KubeLink::new(h.ds.client(), h.ds.handle().unwrap(), "node-1");
    let node = h.ds.cluster().nodes["node-1"].clone();
    h.api.set_down(true);
    let patches = |api: &FakeApi| api.requests("PATCH", &["/api/v1/nodes/node-1"]);
    link.publish_node(&node, ("192.0.2.11".parse().unwrap(), 24));
    assert!(eventually(WAIT, || patches(&h.api) == 1), "tried once");
    assert!(h.api.writes().is_empty());
    h.api.set_down(false);
    // Within the pause after a failure nothing is tried.
    std::thread::sleep(Duration::from_millis(50));
    link.publish_node(&node, ("192.0.2.11".parse().unwrap(), 24));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(patches(&h.api), 1);
    assert!(h.api.writes().is_empty());
}
