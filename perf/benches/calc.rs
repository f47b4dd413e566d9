//! The agent's policy calculation on a synthetic cluster of 10,000 pods in
//! 100 namespaces with 1,000 NetworkPolicies (10 per namespace, each with
//! pod-selector, namespace-selector and named-port rules).
//!
//! - `calc/all-endpoints`: every pod's rules from scratch (the whole
//!   cluster's work; goal: under 1 s).
//! - `calc/one-node`: the 100 endpoints of one node, from scratch (after a
//!   policy or namespace change).
//! - `calc/label-change`: one pod's label flips on a node's calculation
//!   graph: the sets that pick the pod are patched and only the endpoints
//!   using them are computed again (goal: under 5 ms).
//!
//! Run: `cargo bench -p ocelot-perf --bench calc`.

use criterion::{criterion_group, criterion_main, Criterion};
use ocelot_control::policy::calc::{Calc, Graph, Model, PodInfo};
use ocelot_control::policy::NetworkPolicy;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

fn cluster() -> Model {
    let mut m = Model::default();
    for n in 0..100 {
        let ns = format!("ns{n}");
        let labels =
            [("kubernetes.io/metadata.name", ns.as_str()), ("team", &format!("t{}", n % 10))]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        m.namespaces.insert(ns.clone(), labels);
        for p in 0..100u32 {
            let labels = [("app", format!("a{}", p % 20)), ("tier", format!("t{}", p % 3))]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let ports = serde_json::from_str(
                r#"[{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}]"#,
            )
            .unwrap();
            m.pods.insert(
                format!("{ns}/p{p}"),
                PodInfo {
                    namespace: ns.clone(),
                    labels,
                    ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + n * 256 + p))],
                    ports,
                },
            );
        }
        for k in 0..10 {
            let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("np{k}"), "namespace": ns},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("a{}", k * 2)}},
                    "ingress": [
                        {"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", k * 2 + 1)}}}],
                         "ports": [{"port": "http"}, {"port": 9000}]},
                        {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{k}")}},
                                   "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t0", "t1"]}]}}],
                         "ports": [{"port": "metrics"}]}
                    ],
                    "egress": [
                        {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a19"}}}],
                         "ports": [{"port": 53, "protocol": "UDP"}]},
                        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.64.0.0/16"]}}]}
                    ],
                    "policyTypes": ["Ingress", "Egress"]
                }
            }))
            .unwrap();
            m.policies.insert(format!("{ns}/np{k}"), np);
        }
    }
    m
}

fn calc(c: &mut Criterion) {
    let m = cluster();
    assert_eq!((m.pods.len(), m.policies.len(), m.namespaces.len()), (10_000, 1_000, 100));
    let all: Vec<String> = m.pods.keys().cloned().collect();
    // One node: every 100th pod.
    let node: Vec<String> = all.iter().step_by(100).cloned().collect();
    let t = std::time::Instant::now();
    let mut calc0 = Calc::new(&m);
    let rules: usize = all
        .iter()
        .map(|k| {
            let e = calc0.endpoint(k);
            e.ingress.map_or(0, |r| r.len()) + e.egress.map_or(0, |r| r.len())
        })
        .sum();
    eprintln!("calc: {} endpoints, {rules} rules, first full run {:?}", all.len(), t.elapsed());
    let mut g = c.benchmark_group("calc");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("all-endpoints-10k-pods-1k-policies", |b| {
        b.iter(|| {
            let mut calc = Calc::new(&m);
            for k in &all {
                black_box(calc.endpoint(k));
            }
        })
    });
    g.bench_function("one-node-100-endpoints", |b| {
        b.iter(|| {
            let mut calc = Calc::new(&m);
            let out: BTreeMap<&String, _> = node.iter().map(|k| (k, calc.endpoint(k))).collect();
            black_box(out)
        })
    });
    // A label change: ns7/p1 moves between app=a1 and app=a3; ns7's np0
    // allows a1 into a0, so the node's a0 endpoint in ns7 must follow.
    let targets: BTreeMap<String, String> =
        node.iter().map(|k| (format!("ep-{k}"), k.clone())).collect();
    let mut graph = Graph::new(m.clone(), targets);
    let mut pod = m.pods["ns7/p1"].clone();
    let mut on = false;
    let mut touched = 0;
    g.bench_function("label-change-one-node", |b| {
        b.iter(|| {
            on = !on;
            pod.labels.insert("app".into(), (if on { "a3" } else { "a1" }).into());
            touched = graph.pod_changed("ns7/p1", Some(pod.clone()));
        })
    });
    eprintln!("calc: a label change recomputed {touched} endpoint(s) of the node's 100");
    g.finish();
    if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
        if let Some(l) = s.lines().find(|l| l.starts_with("VmHWM")) {
            eprintln!(
                "calc: peak memory of the bench process: {}",
                l.trim_start_matches("VmHWM:").trim()
            );
        }
    }
}

criterion_group!(benches, calc);
criterion_main!(benches);
