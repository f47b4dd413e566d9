//! `ocelot controller`'s default pool against the in-memory API server
//! (`k8s::fake`): created when the cluster has no IPPool, an existing pool
//! left exactly as it is, a 409 AlreadyExists taken as someone else's
//! creation, and the whole controller (Lease, then pool) doing it once.

use clap::Parser;
use http::Method;
use ocelot_control::k8s::controller::{run_with, ControllerArgs};
use ocelot_control::k8s::default_pool::{ensure, DefaultPoolArgs, Outcome, DEFAULT_POOL_NAME};
use ocelot_control::k8s::fake::{FakeApi, Fault};
use serde_json::{json, Value};
use std::time::Duration;

const POOLS: &str = "/apis/ocelot.dev/v1/ippools";

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: DefaultPoolArgs,
}

#[derive(Parser)]
struct CtlCli {
    #[command(flatten)]
    a: ControllerArgs,
}

fn spec(v: &[&str]) -> ocelot_control::k8s::crd::IpPoolSpec {
    let mut all = vec!["x"];
    all.extend_from_slice(v);
    Cli::try_parse_from(all).unwrap().a.spec().unwrap().unwrap()
}

fn user_pool(name: &str) -> Value {
    json!({
        "apiVersion": "ocelot.dev/v1", "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"cidr": "192.168.0.0/16", "blockSize": 24, "vxlanMode": "Never",
                 "ipipMode": "Always", "natOutgoing": false}
    })
}

fn creates(fake: &FakeApi) -> usize {
    fake.log().iter().filter(|l| l.starts_with(&format!("POST {POOLS} "))).count()
}

#[tokio::test]
async fn creates_the_pool_when_none_exists() {
    let fake = FakeApi::new();
    let want = spec(&[
        "--default-ipv4-pool-cidr=10.65.0.0/16",
        "--default-pool-encapsulation=vxlan-cross-subnet",
    ]);
    assert_eq!(ensure(fake.client(), Some(&want)).await, Outcome::Created);
    let pools = fake.objects(POOLS);
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!(p["metadata"]["name"], DEFAULT_POOL_NAME);
    assert_eq!(p["spec"]["cidr"], "10.65.0.0/16");
    assert_eq!(p["spec"]["blockSize"], 26);
    assert_eq!(p["spec"]["vxlanMode"], "CrossSubnet");
    assert_eq!(p["spec"]["ipipMode"], "Never");
    assert_eq!(p["spec"]["natOutgoing"], true);
    assert_eq!(p["spec"]["nodeSelector"], "all()");

    // Again: the pool exists now, nothing more is written (not even to it).
    let rv = p["metadata"]["resourceVersion"].clone();
    assert_eq!(
        ensure(fake.client(), Some(&want)).await,
        Outcome::PoolsExist(vec![DEFAULT_POOL_NAME.into()])
    );
    assert_eq!(creates(&fake), 1);
    assert_eq!(fake.objects(POOLS)[0]["metadata"]["resourceVersion"], rv);
}

#[tokio::test]
async fn leaves_an_existing_pool_alone() {
    let fake = FakeApi::new();
    let mine = fake.insert(POOLS, user_pool("mine")).unwrap();
    let before = fake.log().len();
    let want = spec(&["--default-ipv4-pool-cidr=10.65.0.0/16"]);
    assert_eq!(ensure(fake.client(), Some(&want)).await, Outcome::PoolsExist(vec!["mine".into()]));
    assert_eq!(fake.objects(POOLS), vec![mine.clone()]);
    let ours = &fake.log()[before..];
    assert!(ours.iter().all(|l| l.starts_with("GET")), "only reads: {ours:?}");

    // An existing pool named like the default one, with other values: kept as is.
    let fake = FakeApi::new();
    let mut odd = user_pool(DEFAULT_POOL_NAME);
    odd["spec"]["cidr"] = json!("172.16.0.0/12");
    let odd = fake.insert(POOLS, odd).unwrap();
    assert_eq!(
        ensure(fake.client(), Some(&want)).await,
        Outcome::PoolsExist(vec![DEFAULT_POOL_NAME.into()])
    );
    assert_eq!(fake.objects(POOLS), vec![odd]);

    // No CIDR: not even a list.
    let fake = FakeApi::new();
    assert_eq!(ensure(fake.client(), None).await, Outcome::Disabled);
    assert!(fake.log().is_empty());
}

#[tokio::test]
async fn tolerates_409_already_exists() {
    let fake = FakeApi::new();
    // Another writer creates the pool between our list and our create.
    fake.inject(Fault {
        method: Method::POST,
        path: POOLS.into(),
        code: 409,
        reason: "AlreadyExists".into(),
    });
    let want = spec(&["--default-ipv4-pool-cidr=10.65.0.0/16"]);
    let o = ensure(fake.client(), Some(&want)).await;
    assert_eq!(o, Outcome::AlreadyExists);
    assert!(o.done());

    // Any other failure is retried later.
    let fake = FakeApi::new();
    fake.inject(Fault {
        method: Method::GET,
        path: POOLS.into(),
        code: 500,
        reason: "InternalError".into(),
    });
    let o = ensure(fake.client(), Some(&want)).await;
    assert!(matches!(o, Outcome::Failed(_)) && !o.done(), "{o:?}");
    assert!(fake.objects(POOLS).is_empty());
    assert_eq!(ensure(fake.client(), Some(&want)).await, Outcome::Created);
}

/// The controller itself: leads (takes the Lease), then creates the pool.
#[tokio::test]
async fn the_leading_controller_creates_the_default_pool() {
    let fake = FakeApi::new();
    let args = CtlCli::try_parse_from([
        "x",
        "--identity=c1",
        "--retry-period-secs=1",
        "--default-ipv4-pool-cidr=10.70.0.0/16",
        "--default-pool-encapsulation=ipip",
        "--default-pool-block-size=28",
        "--default-pool-nat-outgoing=false",
    ])
    .unwrap()
    .a;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_with(fake.client(), args, async {
        let _ = rx.await;
    }));
    let mut pools = Vec::new();
    for _ in 0..100 {
        pools = fake.objects(POOLS);
        if !pools.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    assert_eq!(pools.len(), 1, "{:?}", fake.log());
    assert_eq!(pools[0]["metadata"]["name"], DEFAULT_POOL_NAME);
    assert_eq!(pools[0]["spec"]["cidr"], "10.70.0.0/16");
    assert_eq!(pools[0]["spec"]["blockSize"], 28);
    assert_eq!(pools[0]["spec"]["ipipMode"], "Always");
    assert_eq!(pools[0]["spec"]["vxlanMode"], "Never");
    assert_eq!(pools[0]["spec"]["natOutgoing"], false);
    assert_eq!(creates(&fake), 1);
}
