//! `ocelot controller`'s garbage collection against the in-memory API
//! server (`k8s::fake`): agents allocate through `KubeStore`, Pods and
//! Nodes come and go, and the controller frees what belongs to the gone —
//! never a live pod's address, even one briefly missing from a list.

use http::Method;
use ocelot_control::ipam::{Allocation, Ipam, PoolSpec, Request as IpamRequest};
use ocelot_control::k8s::controller::Gc;
use ocelot_control::k8s::controller_gc::POD_UID_ATTR;
use ocelot_control::k8s::fake::{FakeApi, Fault};
use ocelot_control::k8s::ipam::KubeStore;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

const BLOCKS: &str = "/apis/ocelot.dev/v1/ipamblocks";
const AFFINITIES: &str = "/apis/ocelot.dev/v1/blockaffinities";
const PODS: &str = "/api/v1/namespaces/default/pods";
const NODES: &str = "/api/v1/nodes";

fn add_node(fake: &FakeApi, name: &str) {
    fake.insert(NODES, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
        .unwrap();
}

/// Create a pod; returns its UID.
fn add_pod(fake: &FakeApi, name: &str, node: &str) -> String {
    let p = fake
        .insert(
            PODS,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}]}
            }),
        )
        .unwrap();
    p["metadata"]["uid"].as_str().unwrap().to_string()
}

/// An agent on `node` allocates for pod `name` (as CNI ADD does).
async fn allocate(store: &KubeStore, node: &str, name: &str, uid: &str) -> IpAddr {
    let req = IpamRequest::Auto {
        pools: vec![PoolSpec {
            name: "default-ipv4-ippool".into(),
            cidr: "10.80.0.0/24".parse().unwrap(),
            block_size: 28,
        }],
    };
    let a = Allocation {
        handle: format!("cid-{name}/eth0"),
        node: node.into(),
        pod: format!("default/{name}"),
        attrs: BTreeMap::from([(POD_UID_ATTR.to_string(), uid.to_string())]),
    };
    store
        .transact_async(move |st| Ipam { state: st, node }.allocate(&req, a.clone()))
        .await
        .unwrap()
        .unwrap()
        .ips[0]
}

/// Address → pod of every allocation the API holds.
fn allocations(fake: &FakeApi) -> BTreeMap<String, String> {
    fake.objects(BLOCKS)
        .iter()
        .flat_map(|b| {
            b["spec"]["allocations"]
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|(ip, a): (String, Value)| (ip, a["pod"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

fn names(objs: Vec<Value>) -> Vec<String> {
    objs.iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn gc_frees_only_the_gone_and_never_a_live_pod() {
    let fake = FakeApi::new();
    add_node(&fake, "n1");
    add_node(&fake, "n2");
    let store = KubeStore::new(fake.client(), tokio::runtime::Handle::current());
    let ua = add_pod(&fake, "a", "n1");
    let ub = add_pod(&fake, "b", "n2");
    let uc = add_pod(&fake, "c", "n1");
    let ip_a = allocate(&store, "n1", "a", &ua).await;
    let ip_b = allocate(&store, "n2", "b", &ub).await;
    let ip_c = allocate(&store, "n1", "c", &uc).await;
    assert_eq!(allocations(&fake).len(), 3);

    let mut gc = Gc::new(fake.client(), 2, false);
    let r = gc.pass().await;
    assert_eq!((r.freed, r.waiting, r.conflicts), (0, 0, 0), "{r:?}");
    assert!(r.skipped.is_empty());

    // Pod a is briefly missing from one list (a list served from a cache
    // behind the pod's creation), then there again, same UID.
    let pod_a =
        fake.objects("/api/v1/pods").into_iter().find(|p| p["metadata"]["name"] == "a").unwrap();
    assert!(fake.remove(&format!("{PODS}/a")));
    let r = gc.pass().await;
    assert_eq!((r.freed, r.waiting), (0, 1), "{r:?}");
    let mut back = pod_a.clone();
    back["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    fake.insert(PODS, back).unwrap();
    for _ in 0..3 {
        let r = gc.pass().await;
        assert_eq!((r.freed, r.waiting), (0, 0), "{r:?}");
    }
    assert!(allocations(&fake).contains_key(&ip_a.to_string()));

    // Pod c is deleted: freed on the second pass that misses it.
    assert!(fake.remove(&format!("{PODS}/c")));
    let r = gc.pass().await;
    assert_eq!(r.freed, 0, "{r:?}");
    assert!(allocations(&fake).contains_key(&ip_c.to_string()));
    let r = gc.pass().await;
    assert!(r.freed >= 1, "{r:?}");
    assert!(!allocations(&fake).contains_key(&ip_c.to_string()));
    assert!(allocations(&fake).contains_key(&ip_b.to_string()), "b is alive");

    // A failing Pod list judges nothing, however long it lasts.
    for _ in 0..3 {
        fake.inject(Fault {
            method: Method::GET,
            path: "/api/v1/pods".into(),
            code: 500,
            reason: "InternalError".into(),
        });
        let r = gc.pass().await;
        assert_eq!(r.skipped, vec!["Pods".to_string()]);
        assert_eq!(r.freed, 0);
    }
    assert!(allocations(&fake).contains_key(&ip_b.to_string()));

    // A write that races an agent loses and is decided again next pass.
    assert!(fake.remove(&format!("{PODS}/b")));
    gc.pass().await;
    fake.inject(Fault {
        method: Method::PUT,
        path: BLOCKS.into(),
        code: 409,
        reason: "Conflict".into(),
    });
    let r = gc.pass().await;
    assert_eq!((r.freed, r.conflicts), (0, 1), "{r:?}");
    assert!(allocations(&fake).contains_key(&ip_b.to_string()));
    let r = gc.pass().await;
    assert_eq!(r.freed, 1, "{r:?}");
    assert!(!allocations(&fake).contains_key(&ip_b.to_string()));
    // n2 is alive: its empty block and affinity stay.
    assert_eq!(fake.objects(BLOCKS).len(), 2);
    assert_eq!(names(fake.objects(AFFINITIES)).len(), 2);

    // n2 is deleted: after its grace its empty block and affinity go.
    assert!(fake.remove(&format!("{NODES}/n2")));
    let r = gc.pass().await;
    assert_eq!(r.blocks_deleted, 0, "{r:?}");
    let r = gc.pass().await;
    assert_eq!(r.blocks_deleted, 1, "{r:?}");
    assert_eq!(names(fake.objects(BLOCKS)), vec!["10-80-0-0-28".to_string()]);
    assert_eq!(names(fake.objects(AFFINITIES)), vec!["n1-10-80-0-0-28".to_string()]);
}

#[tokio::test]
async fn a_recreated_pod_keeps_its_new_address_and_frees_the_old() {
    let fake = FakeApi::new();
    add_node(&fake, "n1");
    let store = KubeStore::new(fake.client(), tokio::runtime::Handle::current());
    let old_uid = add_pod(&fake, "db-0", "n1");
    let old_ip = allocate(&store, "n1", "db-0", &old_uid).await;
    // The StatefulSet pod is deleted and recreated under its name; its CNI
    // DEL was lost, the new sandbox got a new handle and address.
    assert!(fake.remove(&format!("{PODS}/db-0")));
    let new_uid = add_pod(&fake, "db-0", "n1");
    assert_ne!(old_uid, new_uid);
    let req = IpamRequest::Auto {
        pools: vec![PoolSpec {
            name: "p".into(),
            cidr: "10.80.0.0/24".parse().unwrap(),
            block_size: 28,
        }],
    };
    let a = Allocation {
        handle: "cid-db-0-new/eth0".into(),
        node: "n1".into(),
        pod: "default/db-0".into(),
        attrs: BTreeMap::from([(POD_UID_ATTR.to_string(), new_uid.clone())]),
    };
    let new_ip = store
        .transact_async(move |st| Ipam { state: st, node: "n1" }.allocate(&req, a.clone()))
        .await
        .unwrap()
        .unwrap()
        .ips[0];
    let mut gc = Gc::new(fake.client(), 2, false);
    gc.pass().await;
    let r = gc.pass().await;
    assert_eq!(r.freed, 1, "{r:?}");
    let left = allocations(&fake);
    assert!(left.contains_key(&new_ip.to_string()));
    assert!(!left.contains_key(&old_ip.to_string()));
    // The live pod's address survives any number of passes.
    for _ in 0..4 {
        gc.pass().await;
    }
    assert!(allocations(&fake).contains_key(&new_ip.to_string()));
}

#[tokio::test]
async fn dry_run_writes_nothing() {
    let fake = FakeApi::new();
    add_node(&fake, "n1");
    let store = KubeStore::new(fake.client(), tokio::runtime::Handle::current());
    let uid = add_pod(&fake, "x", "n1");
    let ip = allocate(&store, "n1", "x", &uid).await;
    assert!(fake.remove(&format!("{PODS}/x")));
    let before = fake.log().iter().filter(|l| !l.starts_with("GET")).count();
    let mut gc = Gc::new(fake.client(), 1, true);
    gc.pass().await;
    gc.pass().await;
    assert!(allocations(&fake).contains_key(&ip.to_string()));
    assert_eq!(fake.log().iter().filter(|l| !l.starts_with("GET")).count(), before);
}

fn controller_args(identity: &str) -> ocelot_control::k8s::controller::ControllerArgs {
    ocelot_control::k8s::controller::ControllerArgs {
        interval_secs: 1,
        grace_passes: 2,
        identity: Some(identity.into()),
        lease_namespace: "kube-system".into(),
        lease_name: "ocelot-controller".into(),
        lease_duration_secs: 15,
        renew_deadline_secs: 10,
        retry_period_secs: 1,
        dry_run: false,
        // No default pool: these tests are about garbage collection.
        default_pool: Default::default(),
    }
}

fn lease_holder(fake: &FakeApi) -> (Option<String>, i64) {
    let l = fake
        .objects("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases")
        .into_iter()
        .next()
        .expect("a Lease");
    (
        l["spec"]["holderIdentity"].as_str().map(str::to_string),
        l["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_a_handover_on_stop() {
    use ocelot_control::k8s::controller::run_with;
    use std::time::Duration;
    let fake = FakeApi::new();
    let (stop_a, a_stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, b_stopped) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn(run_with(fake.client(), controller_args("ctrl-a"), async {
        let _ = a_stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = tokio::spawn(run_with(fake.client(), controller_args("ctrl-b"), async {
        let _ = b_stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(lease_holder(&fake), (Some("ctrl-a".into()), 0), "a leads, b follows");
    stop_a.send(()).unwrap();
    a.await.unwrap();
    // a released the Lease on the way out: b takes it at its next round,
    // well before the 15 s lease would have expired.
    let mut holder = lease_holder(&fake);
    for _ in 0..30 {
        if holder.0.as_deref() == Some("ctrl-b") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder = lease_holder(&fake);
    }
    assert_eq!(holder, (Some("ctrl-b".into()), 1));
    stop_b.send(()).unwrap();
    b.await.unwrap();
    assert_eq!(lease_holder(&fake).0, None, "b released it too");
}
