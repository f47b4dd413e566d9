//! IPAM on Kubernetes without a cluster: `KubeStore` and the controller's
//! Lease against a `tower-test` mock that replays what a Kubernetes 1.30+
//! API server answers, and many allocators racing over the in-memory API
//! (`k8s::fake`), which enforces `resourceVersion` as the real one does.

use http::{Method, Request, Response};
use kube::client::Body;
use ocelot_control::ipam::store::IpamStore;
use ocelot_control::ipam::{
    Allocated, Allocation, Ipam, IpamError, PoolSpec, Request as IpamRequest,
};
use ocelot_control::k8s::fake::{FakeApi, Fault};
use ocelot_control::k8s::ipam::{KubeIpamError, KubeStore, Retry};
use ocelot_control::k8s::lease::{Attempt, LeaseLock};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock() -> (kube::Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "default"), handle)
}

/// Wait for the next request; check its method and path; return its JSON
/// body and the means to answer.
async fn next(
    h: &mut Handle,
    method: Method,
    path: &str,
) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), h.next_request())
        .await
        .expect("the client sent no request within 5 s")
        .expect("the client went away");
    assert_eq!(req.method(), method, "{} {}", req.method(), req.uri());
    assert_eq!(req.uri().path(), path, "{} {}", req.method(), req.uri());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let v = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (v, send)
}

fn answer(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: Value) {
    let resp = Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    send.send_response(resp);
}

const BLOCKS: &str = "/apis/ocelot.dev/v1/ipamblocks";
const AFFINITIES: &str = "/apis/ocelot.dev/v1/blockaffinities";

/// A Status as the API server sends it.
fn status(code: u16, reason: &str, plural_group: &str, name: &str, message: &str) -> Value {
    let (kind, group) = plural_group.split_once('.').unwrap_or((plural_group, ""));
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason,
        "details": {"name": name, "group": group, "kind": kind},
        "code": code
    })
}

fn already_exists(name: &str) -> Value {
    status(
        409,
        "AlreadyExists",
        "ipamblocks.ocelot.dev",
        name,
        &format!("ipamblocks.ocelot.dev \"{name}\" already exists"),
    )
}

fn conflict(name: &str) -> Value {
    status(
        409,
        "Conflict",
        "ipamblocks.ocelot.dev",
        name,
        &format!(
        "Operation cannot be fulfilled on ipamblocks.ocelot.dev \"{name}\": the object has been \
         modified; please apply your changes to the latest version and try again"
    ),
    )
}

/// An IPAMBlock as listed, with `allocs` (address, handle, node).
fn block(name: &str, cidr: &str, node: &str, rv: u32, allocs: &[(&str, &str, &str)]) -> Value {
    let allocations: serde_json::Map<String, Value> = allocs
        .iter()
        .map(|(ip, h, n)| {
            (ip.to_string(), json!({"handle": h, "pod": format!("default/{h}"), "node": n}))
        })
        .collect();
    json!({
        "apiVersion": "ocelot.dev/v1", "kind": "IPAMBlock",
        "metadata": {
            "creationTimestamp": "2026-11-23T19:00:00Z", "generation": 1, "name": name,
            "resourceVersion": rv.to_string(), "uid": format!("0b7c3f7e-{rv:04}-4c55-9a8e-1f0e2d3c4b5a")
        },
        "spec": {
            "cidr": cidr, "pool": "default-ipv4-ippool", "affinity": format!("host:{node}"),
            "allocations": allocations, "allocated": allocs.len(), "hostLocal": false
        }
    })
}

fn list(items: Vec<Value>, rv: u32) -> Value {
    json!({
        "apiVersion": "ocelot.dev/v1", "kind": "IPAMBlockList",
        "metadata": {"continue": "", "resourceVersion": rv.to_string()},
        "items": items
    })
}

/// The object as the server stores it after a create or replace.
fn stored(mut body: Value, rv: u32) -> Value {
    body["metadata"]["resourceVersion"] = json!(rv.to_string());
    body["metadata"]["uid"] = json!("d6f0c1a2-1111-4c55-9a8e-1f0e2d3c4b5a");
    body["metadata"]["creationTimestamp"] = json!("2026-11-23T19:00:00Z");
    body
}

fn pools(cidr: &str, block_size: u8) -> Vec<PoolSpec> {
    vec![PoolSpec { name: "default-ipv4-ippool".into(), cidr: cidr.parse().unwrap(), block_size }]
}

fn alloc(node: &str, handle: &str) -> Allocation {
    Allocation {
        handle: handle.into(),
        node: node.into(),
        pod: format!("default/{handle}"),
        attrs: BTreeMap::new(),
    }
}

fn fast() -> Retry {
    Retry { attempts: 5, base: Duration::from_millis(1), max: Duration::from_millis(2) }
}

/// Allocate `req` for `handle` on `node` through a KubeStore over `client`,
/// in a task, so the test can answer its requests.
fn spawn_allocate(
    client: kube::Client,
    node: &'static str,
    handle: &'static str,
    req: IpamRequest,
) -> tokio::task::JoinHandle<Result<Result<Allocated, IpamError>, KubeIpamError>> {
    let store = KubeStore::new(client, tokio::runtime::Handle::current()).with_retry(fast());
    tokio::spawn(async move {
        store
            .transact_async(move |st| Ipam { state: st, node }.allocate(&req, alloc(node, handle)))
            .await
    })
}

#[tokio::test]
async fn a_block_claimed_by_another_node_first_sends_us_to_the_next_block() {
    let (client, mut h) = mock();
    let task =
        spawn_allocate(client, "n2", "c1", IpamRequest::Auto { pools: pools("10.65.0.0/16", 26) });
    // Nothing claimed yet: n2 creates the first block...
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(s, 200, list(vec![], 40));
    let (body, s) = next(&mut h, Method::POST, BLOCKS).await;
    assert_eq!(body["metadata"]["name"], "10-65-0-0-26");
    assert_eq!(body["spec"]["affinity"], "host:n2");
    // ...but n1 created it a moment before.
    answer(s, 409, already_exists("10-65-0-0-26"));
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(
        s,
        200,
        list(
            vec![block("10-65-0-0-26", "10.65.0.0/26", "n1", 41, &[("10.65.0.0", "x", "n1")])],
            41,
        ),
    );
    // n2 neither borrows from n1's block nor overwrites it: the next block.
    let (body, s) = next(&mut h, Method::POST, BLOCKS).await;
    assert_eq!(body["metadata"]["name"], "10-65-0-64-26");
    assert_eq!(body["spec"]["allocations"]["10.65.0.64"]["handle"], "c1");
    assert_eq!(body["spec"]["allocated"], 1);
    let created = stored(body, 42);
    answer(s, 201, created.clone());
    // The claim looks for a block of another size over the same addresses.
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(
        s,
        200,
        list(
            vec![
                block("10-65-0-0-26", "10.65.0.0/26", "n1", 41, &[("10.65.0.0", "x", "n1")]),
                created,
            ],
            42,
        ),
    );
    // Its affinity is indexed after the block.
    let (body, s) = next(&mut h, Method::POST, AFFINITIES).await;
    assert_eq!(body["metadata"]["name"], "n2-10-65-0-64-26");
    assert_eq!(body["spec"], json!({"node": "n2", "cidr": "10.65.0.64/26", "state": "confirmed"}));
    answer(s, 201, stored(body, 43));
    let got = task.await.unwrap().unwrap().unwrap();
    assert_eq!(got.ips, vec!["10.65.0.64".parse::<IpAddr>().unwrap()]);
    assert!(got.borrowed.is_empty());
}

#[tokio::test]
async fn a_conflicting_replace_is_retried_on_fresh_state() {
    let (client, mut h) = mock();
    let task =
        spawn_allocate(client, "n1", "c2", IpamRequest::Auto { pools: pools("10.65.0.0/16", 26) });
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(
        s,
        200,
        list(
            vec![block("10-65-0-0-26", "10.65.0.0/26", "n1", 50, &[("10.65.0.0", "c0", "n1")])],
            50,
        ),
    );
    let (body, s) = next(&mut h, Method::PUT, &format!("{BLOCKS}/10-65-0-0-26")).await;
    assert_eq!(body["metadata"]["resourceVersion"], "50");
    assert!(body["spec"]["allocations"]["10.65.0.1"].is_object());
    // Another thread of n1 took 10.65.0.1 in between.
    answer(s, 409, conflict("10-65-0-0-26"));
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(
        s,
        200,
        list(
            vec![block(
                "10-65-0-0-26",
                "10.65.0.0/26",
                "n1",
                51,
                &[("10.65.0.0", "c0", "n1"), ("10.65.0.1", "c1", "n1")],
            )],
            51,
        ),
    );
    let (body, s) = next(&mut h, Method::PUT, &format!("{BLOCKS}/10-65-0-0-26")).await;
    assert_eq!(body["metadata"]["resourceVersion"], "51");
    assert_eq!(
        body["spec"]["allocations"]["10.65.0.1"]["handle"], "c1",
        "the winner's write is kept"
    );
    assert_eq!(body["spec"]["allocations"]["10.65.0.2"]["handle"], "c2");
    answer(s, 200, stored(body, 52));
    let got = task.await.unwrap().unwrap().unwrap();
    assert_eq!(got.ips, vec!["10.65.0.2".parse::<IpAddr>().unwrap()]);
}

#[tokio::test]
async fn a_conflict_storm_ends_in_a_clear_error_after_bounded_retries() {
    let (client, mut h) = mock();
    let store = KubeStore::new(client, tokio::runtime::Handle::current()).with_retry(Retry {
        attempts: 3,
        base: Duration::from_millis(1),
        max: Duration::from_millis(2),
    });
    let task = tokio::spawn(async move {
        store.transact_async(|st| Ipam { state: st, node: "n1" }.release("c0")).await
    });
    for rv in 60..63 {
        let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
        answer(
            s,
            200,
            list(
                vec![block("10-65-0-0-26", "10.65.0.0/26", "n1", rv, &[("10.65.0.0", "c0", "n1")])],
                rv,
            ),
        );
        let (_, s) = next(&mut h, Method::PUT, &format!("{BLOCKS}/10-65-0-0-26")).await;
        answer(s, 409, conflict("10-65-0-0-26"));
    }
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, KubeIpamError::Contended { attempts: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("gave up after 3 attempts") && msg.contains("10-65-0-0-26"), "{msg}");
    // No fourth attempt: the store is gone and asked nothing more.
    assert!(matches!(
        tokio::time::timeout(Duration::from_millis(50), h.next_request()).await,
        Err(_) | Ok(None)
    ));
}

#[tokio::test]
async fn an_invalid_block_object_is_an_error_not_a_guess() {
    let (client, mut h) = mock();
    let store = KubeStore::new(client, tokio::runtime::Handle::current());
    let task = tokio::spawn(async move { store.load_async().await });
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    let mut b = block("10-65-0-0-26", "10.65.0.0/26", "n1", 5, &[]);
    b["spec"]["allocations"] = json!({"10.99.0.1": {"handle": "h", "node": "n1"}});
    answer(s, 200, list(vec![b], 5));
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("outside the block"), "{err}");
}

#[tokio::test]
async fn a_block_overlapping_another_created_at_once_is_taken_back() {
    // n1's pool cuts /26 blocks, n2's /28 blocks of the same range (a
    // misconfiguration): their claims have different names.
    let (client, mut h) = mock();
    let task =
        spawn_allocate(client, "n2", "c9", IpamRequest::Auto { pools: pools("10.90.0.0/24", 28) });
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(s, 200, list(vec![], 70));
    let (body, s) = next(&mut h, Method::POST, BLOCKS).await;
    assert_eq!(body["metadata"]["name"], "10-90-0-0-28");
    let ours = stored(body, 72);
    answer(s, 201, ours.clone());
    // n1's /26 was created a moment before (rv 71).
    let theirs = block("10-90-0-0-26", "10.90.0.0/26", "n1", 71, &[("10.90.0.0", "x", "n1")]);
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(s, 200, list(vec![theirs.clone(), ours], 72));
    // n2 takes its block back, guarded by the version it created...
    let (body, s) = next(&mut h, Method::DELETE, &format!("{BLOCKS}/10-90-0-0-28")).await;
    assert_eq!(body["preconditions"]["resourceVersion"], "72", "{body}");
    answer(s, 200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    // ...and retries around n1's block.
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(s, 200, list(vec![theirs.clone()], 73));
    let (body, s) = next(&mut h, Method::POST, BLOCKS).await;
    assert_eq!(body["metadata"]["name"], "10-90-0-64-28");
    let ours = stored(body, 74);
    answer(s, 201, ours.clone());
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(s, 200, list(vec![theirs, ours], 74));
    let (_, s) = next(&mut h, Method::POST, AFFINITIES).await;
    answer(s, 201, json!({}));
    let got = task.await.unwrap().unwrap().unwrap();
    assert_eq!(got.ips, vec!["10.90.0.64".parse::<IpAddr>().unwrap()]);
}

#[tokio::test]
async fn stamps_follow_a_watch_instead_of_listing() {
    let (client, mut h) = mock();
    let store = KubeStore::new(client, tokio::runtime::Handle::current()).with_change_watch();
    // The watch's initial list.
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(req.uri().path(), BLOCKS);
    assert!(!req.uri().query().unwrap_or("").contains("watch"), "{}", req.uri());
    answer(send, 200, list(vec![block("10-65-0-0-26", "10.65.0.0/26", "n1", 80, &[])], 80));
    // Then the watch itself.
    let (req, send) = h.next_request().await.unwrap();
    assert!(req.uri().query().unwrap_or("").contains("watch=true"), "{}", req.uri());
    let before = wait_for_stamp(&store, |_| true).await;
    assert!(before.starts_with("watch:"), "{before}");
    // Another node claims a block: one event, a new stamp, no list.
    let ev = json!({
        "type": "ADDED",
        "object": block("10-65-0-64-26", "10.65.0.64/26", "n2", 81, &[]),
    });
    let mut line = serde_json::to_vec(&ev).unwrap();
    line.push(b'\n');
    send.send_response(Response::builder().status(200).body(Body::from(line)).unwrap());
    let after = wait_for_stamp(&store, |s| s != before).await;
    assert_ne!(after, before);
}

/// Poll `stamp` until `ok` accepts it (a watch runs in the background).
async fn wait_for_stamp(store: &KubeStore, ok: impl Fn(&str) -> bool) -> String {
    for _ in 0..200 {
        if let Some(s) = IpamStore::stamp(store) {
            if ok(&s) {
                return s;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the stamp never changed as expected");
}

#[tokio::test]
async fn a_request_for_two_blocks_cut_short_by_a_conflict_completes_on_retry() {
    // The ocelot.dev/ip-addrs annotation asks for addresses in two blocks:
    // two writes, not one transaction. The second loses a race; the retry
    // finds the first address held and takes the second, not stopping short.
    let (client, mut h) = mock();
    let want: Vec<IpAddr> = vec!["10.65.0.5".parse().unwrap(), "10.65.0.70".parse().unwrap()];
    let req = IpamRequest::Specific { ips: want.clone(), pools: pools("10.65.0.0/16", 26) };
    let task = spawn_allocate(client, "n1", "multi", req);
    let b0 =
        |rv, allocs: &[(&str, &str, &str)]| block("10-65-0-0-26", "10.65.0.0/26", "n1", rv, allocs);
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(s, 200, list(vec![b0(90, &[])], 90));
    let (body, s) = next(&mut h, Method::PUT, &format!("{BLOCKS}/10-65-0-0-26")).await;
    assert_eq!(body["spec"]["allocations"]["10.65.0.5"]["handle"], "multi");
    answer(s, 200, stored(body, 91));
    let (body, s) = next(&mut h, Method::POST, BLOCKS).await;
    assert_eq!(body["metadata"]["name"], "10-65-0-64-26");
    answer(s, 409, already_exists("10-65-0-64-26"));
    // Retry: the first write stands; n2 now holds the second block.
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(
        s,
        200,
        list(
            vec![
                b0(91, &[("10.65.0.5", "multi", "n1")]),
                block("10-65-0-64-26", "10.65.0.64/26", "n2", 92, &[]),
            ],
            92,
        ),
    );
    let (body, s) = next(&mut h, Method::PUT, &format!("{BLOCKS}/10-65-0-64-26")).await;
    assert_eq!(body["metadata"]["resourceVersion"], "92");
    assert_eq!(body["spec"]["affinity"], "host:n2", "borrowed, not taken over");
    assert_eq!(body["spec"]["allocations"]["10.65.0.70"]["handle"], "multi");
    answer(s, 200, stored(body, 93));
    let got = task.await.unwrap().unwrap().unwrap();
    assert_eq!(got.ips, want);
    assert_eq!(got.borrowed, vec![want[1]]);
}

#[tokio::test]
async fn missing_crds_are_named_as_such() {
    let (client, mut h) = mock();
    let store = KubeStore::new(client, tokio::runtime::Handle::current());
    let task = tokio::spawn(async move { store.load_async().await });
    let (_, s) = next(&mut h, Method::GET, BLOCKS).await;
    answer(
        s,
        404,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the server could not find the requested resource",
            "reason": "NotFound", "details": {}, "code": 404
        }),
    );
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, KubeIpamError::NoCrd), "{err:?}");
    assert!(err.to_string().contains("ocelot crds"), "{err}");
}

// --- Leader election -------------------------------------------------------

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/ocelot-controller";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";

fn lease(holder: &str, renew: &str, rv: u32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "creationTimestamp": "2026-11-23T19:00:00Z", "name": "ocelot-controller",
            "namespace": "kube-system", "resourceVersion": rv.to_string(),
            "uid": "5a1e7d7c-2f52-4a8e-9b0d-6f3e2a1c0b9d"
        },
        "spec": {
            "acquireTime": "2026-11-23T19:00:00.000000Z", "holderIdentity": holder,
            "leaseDurationSeconds": 15, "leaseTransitions": 2, "renewTime": renew
        }
    })
}

fn ts(s: &str) -> k8s_openapi::jiff::Timestamp {
    s.parse().unwrap()
}

#[tokio::test]
async fn lease_acquire_renew_and_lose() {
    let (client, mut h) = mock();
    let lock = Arc::new(LeaseLock::new(
        client,
        "kube-system",
        "ocelot-controller",
        "ctrl-a",
        Duration::from_secs(15),
    ));

    // Acquire: no Lease yet.
    let l = lock.clone();
    let t = tokio::spawn(async move { l.try_acquire_or_renew(ts("2026-11-23T20:00:00Z")).await });
    let (_, s) = next(&mut h, Method::GET, LEASE).await;
    answer(
        s,
        404,
        status(
            404,
            "NotFound",
            "leases.coordination.k8s.io",
            "ocelot-controller",
            "leases.coordination.k8s.io \"ocelot-controller\" not found",
        ),
    );
    let (body, s) = next(&mut h, Method::POST, LEASES).await;
    assert_eq!(body["spec"]["holderIdentity"], "ctrl-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    answer(s, 201, stored(body, 100));
    assert_eq!(t.await.unwrap(), Attempt::Held);

    // Renew: ours; the replace carries the version read.
    let l = lock.clone();
    let t = tokio::spawn(async move { l.try_acquire_or_renew(ts("2026-11-23T20:00:02Z")).await });
    let (_, s) = next(&mut h, Method::GET, LEASE).await;
    answer(s, 200, lease("ctrl-a", "2026-11-23T20:00:00.000000Z", 100));
    let (body, s) = next(&mut h, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "100");
    assert_eq!(ts(body["spec"]["renewTime"].as_str().unwrap()), ts("2026-11-23T20:00:02Z"));
    assert_eq!(body["spec"]["leaseTransitions"], 2, "a renewal is no transition");
    answer(s, 200, stored(body, 101));
    assert_eq!(t.await.unwrap(), Attempt::Held);

    // Someone else renewed 3 s ago: follow, write nothing.
    let l = lock.clone();
    let t = tokio::spawn(async move { l.try_acquire_or_renew(ts("2026-11-23T20:01:03Z")).await });
    let (_, s) = next(&mut h, Method::GET, LEASE).await;
    answer(s, 200, lease("ctrl-b", "2026-11-23T20:01:00.000000Z", 120));
    assert_eq!(t.await.unwrap(), Attempt::Follower("ctrl-b".into()));

    // ctrl-b's lease expired: take it over, but ctrl-c wrote first.
    let l = lock.clone();
    let t = tokio::spawn(async move { l.try_acquire_or_renew(ts("2026-11-23T20:02:00Z")).await });
    let (_, s) = next(&mut h, Method::GET, LEASE).await;
    answer(s, 200, lease("ctrl-b", "2026-11-23T20:01:00.000000Z", 130));
    let (body, s) = next(&mut h, Method::PUT, LEASE).await;
    assert_eq!(body["spec"]["holderIdentity"], "ctrl-a");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    answer(s, 409, status(409, "Conflict", "leases.coordination.k8s.io", "ocelot-controller",
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"ocelot-controller\": the object has been modified; please apply your changes to the latest version and try again"));
    assert_eq!(t.await.unwrap(), Attempt::Lost);

    // The API server is away: a failure, not a loss (the elector decides).
    let l = lock.clone();
    let t = tokio::spawn(async move { l.try_acquire_or_renew(ts("2026-11-23T20:03:00Z")).await });
    let (_, s) = next(&mut h, Method::GET, LEASE).await;
    answer(
        s,
        503,
        status(
            503,
            "ServiceUnavailable",
            "leases.coordination.k8s.io",
            "",
            "etcdserver: leader changed",
        ),
    );
    assert!(matches!(t.await.unwrap(), Attempt::Failed(_)));
}

#[tokio::test]
async fn a_stopping_leader_releases_the_lease_only_if_it_still_holds_it() {
    let (client, mut h) = mock();
    let lock = Arc::new(LeaseLock::new(
        client,
        "kube-system",
        "ocelot-controller",
        "ctrl-a",
        Duration::from_secs(15),
    ));
    let l = lock.clone();
    let t = tokio::spawn(async move { l.release().await });
    let (_, s) = next(&mut h, Method::GET, LEASE).await;
    answer(s, 200, lease("ctrl-a", "2026-11-23T20:00:00.000000Z", 200));
    let (body, s) = next(&mut h, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "200");
    assert!(body["spec"].get("holderIdentity").is_none_or(|v| v.is_null()), "{body}");
    answer(s, 200, stored(body, 201));
    assert!(t.await.unwrap());
    // Someone else's: left alone.
    let l = lock.clone();
    let t = tokio::spawn(async move { l.release().await });
    let (_, s) = next(&mut h, Method::GET, LEASE).await;
    answer(s, 200, lease("ctrl-b", "2026-11-23T20:00:00.000000Z", 300));
    assert!(!t.await.unwrap());
}

// --- Many allocators over one API ------------------------------------------

#[test]
fn concurrent_allocators_never_hand_out_one_address_twice() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let fake = FakeApi::new();
    // 4 blocks of 16 for 3 nodes: blocks run out, then nodes borrow.
    let req = IpamRequest::Auto { pools: pools("10.70.0.0/26", 28) };
    let retry =
        Retry { attempts: 200, base: Duration::from_millis(1), max: Duration::from_millis(20) };
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let _g = rt.enter();
            let store: Arc<dyn IpamStore> =
                Arc::new(KubeStore::new(fake.client(), rt.handle().clone()).with_retry(retry));
            let req = req.clone();
            std::thread::spawn(move || {
                let node = format!("n{}", t % 3);
                (0..10)
                    .map(|i| {
                        let handle = format!("c{t}-{i}");
                        store
                            .transact(|st| {
                                Ipam { state: st, node: &node }
                                    .allocate(&req, alloc(&node, &handle))
                            })
                            .unwrap()
                            .unwrap()
                            .ips[0]
                    })
                    .collect::<Vec<IpAddr>>()
            })
        })
        .collect();
    let ips: Vec<IpAddr> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(ips.len(), 60);
    assert_eq!(ips.iter().collect::<HashSet<_>>().len(), 60, "an address was handed out twice");

    // What the API holds agrees: 60 allocations, each block once, each
    // block's affinity with one node, each address in its block.
    let blocks = fake.objects(BLOCKS);
    assert_eq!(blocks.len(), 4);
    let mut seen = HashSet::new();
    for b in &blocks {
        for (ip, a) in b["spec"]["allocations"].as_object().unwrap() {
            assert!(seen.insert(ip.clone()), "{ip} in two blocks");
            assert!(a["handle"].as_str().unwrap().starts_with('c'));
        }
        assert_eq!(
            b["spec"]["allocated"].as_u64().unwrap() as usize,
            b["spec"]["allocations"].as_object().unwrap().len()
        );
    }
    assert_eq!(seen.len(), 60);
    // 20 addresses a node, 4 blocks of 16 for 3 nodes: some node must have
    // borrowed from another's block, and did so safely.
    let borrowed: usize = blocks
        .iter()
        .map(|b| {
            let owner = b["spec"]["affinity"].as_str().unwrap().trim_start_matches("host:");
            let allocs = b["spec"]["allocations"].as_object().unwrap();
            allocs.values().filter(|a| a["node"] != owner).count()
        })
        .sum();
    assert!(borrowed > 0, "no borrowing happened");
    let affinities = fake.objects(AFFINITIES);
    assert_eq!(affinities.len(), 4, "one affinity per block: {affinities:?}");
    let log = fake.log();
    let contended = log.iter().filter(|l| l.ends_with("-> 409")).count();
    eprintln!("{} requests, {contended} conflicts", log.len());

    // A repeated ADD gets its address back; a DEL frees it, once.
    let _g = rt.enter();
    let store: Arc<dyn IpamStore> = Arc::new(KubeStore::new(fake.client(), rt.handle().clone()));
    drop(_g);
    let again = store
        .transact(|st| Ipam { state: st, node: "n0" }.allocate(&req, alloc("n0", "c0-0")))
        .unwrap()
        .unwrap();
    assert!(again.existing);
    assert_eq!(again.ips[0], ips[0]);
    let freed = store.transact(|st| Ipam { state: st, node: "n0" }.release("c0-0")).unwrap();
    assert_eq!(freed, vec![ips[0]]);
    assert!(store
        .transact(|st| Ipam { state: st, node: "n0" }.release("c0-0"))
        .unwrap()
        .is_empty());
}

#[test]
fn a_store_write_that_fails_for_other_reasons_is_reported() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let fake = FakeApi::new();
    fake.inject(Fault {
        method: Method::POST,
        path: BLOCKS.into(),
        code: 403,
        reason: "Forbidden".into(),
    });
    let _g = rt.enter();
    let store: Arc<dyn IpamStore> = Arc::new(KubeStore::new(fake.client(), rt.handle().clone()));
    drop(_g);
    let req = IpamRequest::Auto { pools: pools("10.70.0.0/26", 28) };
    let err = store
        .transact(|st| Ipam { state: st, node: "n0" }.allocate(&req, alloc("n0", "c")))
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    // Nothing was written, and the next try works.
    assert!(fake.objects(BLOCKS).is_empty());
    let ok = store
        .transact(|st| Ipam { state: st, node: "n0" }.allocate(&req, alloc("n0", "c")))
        .unwrap()
        .unwrap();
    assert_eq!(ok.ips[0].to_string(), "10.70.0.0");
}
