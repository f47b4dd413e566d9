//! The upstream Kubernetes NetworkPolicy e2e cases
//! (`../shared/conformance/netpol_upstream_cases.json`) on one lab.
//!
//! The file describes each case as a snapshot: a model (namespaces x, y, z
//! and pods a, b, c with labels, addresses and served ports), the
//! NetworkPolicies in force, and the expected reachability of every pod
//! pair on some ports and protocols. Multi-step cases are several snapshots
//! of one sequence.
//!
//! The runner brings the model up once: one node per /24 of the model's pod
//! addresses, every pod on the node whose block holds its address and given
//! that address through the `ocelot.dev/ip-addrs` annotation (so the ipBlock
//! CIDRs, derived from those addresses, apply as written), every pod serving
//! every port any case declares. Then, case after case, in the file's order,
//! it changes the lab by the difference from what it holds (policies
//! removed, added or rewritten; namespace and pod labels set or restored),
//! so the steps of a sequence are updates of a running lab, and whatever a
//! case does not hold of the previous case's state is removed or restored.
//! After a change it waits for every node's agent to notice it, then probes
//! the case's ports (all at once) in rounds until the result settles: the
//! expectation held by rounds at least [`CONFIRM`] apart (pass), or the
//! same mismatch for [`SETTLED`] (fail), or [`DEADLINE`] reached (the last
//! round decides). Every failure is reported at the end, SCTP's apart.

use ocelot_tests::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// The cases, from the crate's directory.
const CASES_FILE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance/netpol_upstream_cases.json");
/// How many cases the file holds (the issue runs all of them).
const CASE_COUNT: usize = 58;
/// The lab's IP pool: must hold every model address.
const POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
/// The pool's block size: a node per block of the model's addresses.
const BLOCK: u8 = 24;
/// The pod annotation asking for specific addresses.
const IP_ADDRS: &str = "ocelot.dev/ip-addrs";
/// The agent's log line for a datastore change it noticed.
const AGENT_NOTICED: &str = "datastore changed";

/// Per-probe timeout: a denied pair costs this much per round.
const PROBE_TIMEOUT_MS: u64 = 400;
/// How long the agents may take to notice a change of the datastore.
const NOTICE: Duration = Duration::from_secs(3);
/// A match counts once rounds started at least this far apart saw it.
const CONFIRM: Duration = Duration::from_millis(300);
/// A mismatch is final once rounds this far apart saw the same result.
const SETTLED: Duration = Duration::from_millis(1500);
/// The longest a case may take to converge, from the end of its change.
const DEADLINE: Duration = Duration::from_secs(5);
/// Pause between probe rounds.
const ROUND_PAUSE: Duration = Duration::from_millis(50);

/// How probes reach their target pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// At the pod's address.
    Pods,
    /// At the cluster IP of a Service of the pod's own (no selector, one
    /// EndpointSlice listing the pod, every served port on its own
    /// number): the policy then judges the translated flow.
    Services,
}

impl Via {
    /// The `ocelot lab probe` flags.
    fn probe_args(self) -> &'static [&'static str] {
        match self {
            Via::Pods => &[],
            Via::Services => &["--via-services"],
        }
    }
}

type Labels = BTreeMap<String, String>;

/// A served port of a pod, as its containerPort declares it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ServedPort {
    port: u16,
    protocol: String,
    name: String,
}

/// A pod of a case's model.
#[derive(Clone, Debug)]
struct ModelPod {
    namespace: String,
    name: String,
    labels: Labels,
    ip: Ipv4Addr,
    ports: Vec<ServedPort>,
}

impl ModelPod {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One expected matrix: `expected[from][to]` = allowed.
#[derive(Clone, Debug)]
struct Probe {
    port: u16,
    protocol: String,
    expected: BTreeMap<String, BTreeMap<String, bool>>,
}

/// One snapshot of the file.
#[derive(Clone, Debug)]
struct Case {
    name: String,
    sequence: String,
    step: u64,
    of: u64,
    namespaces: BTreeMap<String, Labels>,
    pods: Vec<ModelPod>,
    policies: Vec<Value>,
    probes: Vec<Probe>,
    ignore_loopback: bool,
}

/// The whole file, checked.
struct Suite {
    cases: Vec<Case>,
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: not a string: {v}"))
}

fn labels(v: &Value) -> Labels {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), text(v, k).to_string())).collect())
        .unwrap_or_default()
}

/// `namespace/name` of a NetworkPolicy object.
fn policy_key(p: &Value) -> String {
    format!(
        "{}/{}",
        p["metadata"]["namespace"].as_str().unwrap_or("default"),
        text(&p["metadata"]["name"], "policy name")
    )
}

impl Case {
    fn parse(c: &Value) -> Case {
        let name = text(&c["name"], "case name").to_string();
        let seq = &c["sequence"];
        let namespaces = c["model"]["namespaces"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no model.namespaces"))
            .iter()
            .map(|n| (text(&n["name"], "namespace").to_string(), labels(&n["labels"])))
            .collect();
        let pods = c["model"]["pods"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no model.pods"))
            .iter()
            .map(|p| ModelPod {
                namespace: text(&p["namespace"], "pod namespace").to_string(),
                name: text(&p["name"], "pod name").to_string(),
                labels: labels(&p["labels"]),
                ip: text(&p["ip"], "pod ip").parse().unwrap_or_else(|e| panic!("{name}: {e}")),
                ports: p["containerPorts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|cp| ServedPort {
                        port: cp["containerPort"].as_u64().expect("containerPort") as u16,
                        protocol: cp["protocol"].as_str().unwrap_or("TCP").to_string(),
                        name: cp["name"].as_str().unwrap_or("").to_string(),
                    })
                    .collect(),
            })
            .collect();
        let probes = c["probes"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no probes"))
            .iter()
            .map(|p| Probe {
                port: p["port"].as_u64().expect("probe port") as u16,
                protocol: text(&p["protocol"], "probe protocol").to_string(),
                expected: p["expected"]
                    .as_object()
                    .expect("probe expected")
                    .iter()
                    .map(|(from, row)| {
                        let row = row.as_object().expect("expected row");
                        let row = row
                            .iter()
                            .map(|(to, ok)| (to.clone(), ok.as_bool().expect("expected cell")))
                            .collect();
                        (from.clone(), row)
                    })
                    .collect(),
            })
            .collect();
        Case {
            sequence: seq["id"].as_str().unwrap_or(&name).to_string(),
            step: seq["step"].as_u64().unwrap_or(1),
            of: seq["of"].as_u64().unwrap_or(1),
            namespaces,
            pods,
            policies: c["policies"].as_array().cloned().unwrap_or_default(),
            probes,
            ignore_loopback: c["ignore_loopback"].as_bool().unwrap_or(false),
            name,
        }
    }

    /// The probed pairs, as `ocelot lab probe` takes them.
    fn targets(&self) -> Vec<(u16, &str)> {
        self.probes.iter().map(|p| (p.port, p.protocol.as_str())).collect()
    }
}

impl Suite {
    /// Read and check the file: its schema, every case's model, its
    /// sequences (complete, in order) and its probes (on served ports,
    /// covering every pair of the model).
    fn load() -> Suite {
        let raw = std::fs::read_to_string(CASES_FILE)
            .unwrap_or_else(|e| panic!("reading {CASES_FILE}: {e}"));
        let file: Value = serde_json::from_str(&raw).expect("cases JSON");
        assert_eq!(file["schema"]["version"], 1, "unknown schema: {}", file["schema"]);
        let pod_ips: BTreeMap<String, Ipv4Addr> = file["pod_ips"]
            .as_object()
            .expect("pod_ips")
            .iter()
            .map(|(k, v)| (k.clone(), text(v, k).parse().expect("pod_ips address")))
            .collect();
        let cases: Vec<Case> =
            file["cases"].as_array().expect("cases").iter().map(Case::parse).collect();
        let mut served: BTreeMap<(u16, String), String> = BTreeMap::new();
        for c in &cases {
            let keys: BTreeSet<String> = c.pods.iter().map(ModelPod::key).collect();
            assert_eq!(keys.len(), c.pods.len(), "{}: a pod appears twice", c.name);
            for p in &c.pods {
                assert!(
                    c.namespaces.contains_key(&p.namespace),
                    "{}: {} has no namespace",
                    c.name,
                    p.key()
                );
                assert_eq!(
                    pod_ips.get(&p.key()),
                    Some(&p.ip),
                    "{}: {} differs from pod_ips",
                    c.name,
                    p.key()
                );
                for sp in &p.ports {
                    // Every pod of the lab serves every port: a name must
                    // mean the same port everywhere for named ports to
                    // resolve as in the case.
                    let name =
                        served.entry((sp.port, sp.protocol.clone())).or_insert(sp.name.clone());
                    assert_eq!(
                        *name, sp.name,
                        "{}: {}/{} has two names",
                        c.name, sp.port, sp.protocol
                    );
                }
            }
            for pr in &c.probes {
                for p in &c.pods {
                    assert!(
                        p.ports.iter().any(|sp| sp.port == pr.port && sp.protocol == pr.protocol),
                        "{}: probe {}/{} targets {}, which does not serve it",
                        c.name,
                        pr.port,
                        pr.protocol,
                        p.key()
                    );
                }
                let rows: BTreeSet<&String> = pr.expected.keys().collect();
                assert_eq!(rows, keys.iter().collect(), "{}: expected rows", c.name);
                for row in pr.expected.values() {
                    assert_eq!(
                        row.keys().collect::<BTreeSet<_>>(),
                        keys.iter().collect(),
                        "{}: expected columns",
                        c.name
                    );
                }
            }
        }
        let mut i = 0;
        while i < cases.len() {
            let c = &cases[i];
            assert_eq!(c.step, 1, "{}: sequence {} does not start at step 1", c.name, c.sequence);
            for step in 1..=c.of {
                let s =
                    cases.get(i).unwrap_or_else(|| panic!("sequence {} is cut short", c.sequence));
                assert_eq!(
                    (s.sequence.as_str(), s.step, s.of),
                    (c.sequence.as_str(), step, c.of),
                    "steps out of order at {}",
                    s.name
                );
                i += 1;
            }
        }
        let names: BTreeSet<&String> = cases.iter().map(|c| &c.name).collect();
        assert_eq!(names.len(), cases.len(), "two cases share a name");
        Suite { cases }
    }

    /// Every pod any case has (the first case's labels), each serving every
    /// port any case declares.
    fn pods(&self) -> BTreeMap<String, ModelPod> {
        let ports: BTreeSet<ServedPort> =
            self.cases.iter().flat_map(|c| &c.pods).flat_map(|p| p.ports.iter().cloned()).collect();
        let mut pods = BTreeMap::new();
        for p in self.cases.iter().flat_map(|c| &c.pods) {
            pods.entry(p.key()).or_insert_with(|| ModelPod {
                ports: ports.iter().cloned().collect(),
                ..p.clone()
            });
        }
        pods
    }

    /// Every namespace any case has, with the first case's labels.
    fn namespaces(&self) -> BTreeMap<String, Labels> {
        let mut ns = BTreeMap::new();
        for c in &self.cases {
            for (n, l) in &c.namespaces {
                ns.entry(n.clone()).or_insert_with(|| l.clone());
            }
        }
        ns
    }
}

/// The node whose block holds `ip`.
fn node_of(ip: Ipv4Addr) -> String {
    let (base, len) = POOL;
    let mask = |l: u8| if l == 0 { 0 } else { u32::MAX << (32 - u32::from(l)) };
    assert_eq!(u32::from(ip) & mask(len), u32::from(base), "{ip} is outside the pool {base}/{len}");
    format!("node-{}", (u32::from(ip) & !mask(len)) >> (32 - u32::from(BLOCK)))
}

fn namespace_doc(name: &str, labels: &Labels) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod_doc(p: &ModelPod, labels: &Labels) -> Value {
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|sp| json!({"name": sp.name, "containerPort": sp.port, "protocol": sp.protocol}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": p.name, "namespace": p.namespace, "labels": labels,
            "annotations": {IP_ADDRS: json!([p.ip.to_string()]).to_string()},
        },
        "spec": {"nodeName": node_of(p.ip), "containers": [{"name": "c", "ports": ports}]},
    })
}

/// Documents as one multi-document YAML text (JSON is YAML).
fn yaml(docs: &[Value]) -> String {
    docs.iter().map(Value::to_string).collect::<Vec<_>>().join("\n---\n") + "\n"
}

/// The labels and policies the lab holds, or should.
#[derive(Clone, Debug, PartialEq)]
struct World {
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<String, Labels>,
    policies: BTreeMap<String, Value>,
}

/// How to go from one world to another: what to delete, what to apply.
#[derive(Debug, Default)]
struct Change {
    delete: Vec<Value>,
    apply: Vec<Value>,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.apply.is_empty()
    }

    /// One line for the log: what changed.
    fn summary(&self) -> String {
        let names = |docs: &[Value]| -> Vec<String> {
            docs.iter()
                .map(|d| {
                    let m = &d["metadata"];
                    match m["namespace"].as_str() {
                        Some(ns) => format!(
                            "{} {ns}/{}",
                            d["kind"].as_str().unwrap_or("?"),
                            m["name"].as_str().unwrap_or("?")
                        ),
                        None => format!(
                            "{} {}",
                            d["kind"].as_str().unwrap_or("?"),
                            m["name"].as_str().unwrap_or("?")
                        ),
                    }
                })
                .collect()
        };
        format!(
            "delete [{}], apply [{}]",
            names(&self.delete).join(", "),
            names(&self.apply).join(", ")
        )
    }
}

/// The lab's model: its pods and namespaces, and the world each case asks for.
struct Model {
    pods: BTreeMap<String, ModelPod>,
    namespaces: BTreeMap<String, Labels>,
}

impl Model {
    fn new(suite: &Suite) -> Model {
        Model { pods: suite.pods(), namespaces: suite.namespaces() }
    }

    fn nodes(&self) -> BTreeSet<String> {
        self.pods.values().map(|p| node_of(p.ip)).collect()
    }

    /// A Service per pod, with its EndpointSlice: `to-<pod>` in the pod's
    /// namespace, cluster IP 10.96.1.<n> in the pods' order.
    fn services(&self) -> Vec<Value> {
        let mut docs = Vec::new();
        for (i, p) in self.pods.values().enumerate() {
            let name = format!("to-{}", p.name);
            let port_name =
                |sp: &ServedPort| format!("p{}-{}", sp.port, sp.protocol.to_lowercase());
            let ports: Vec<Value> = p
                .ports
                .iter()
                .map(|sp| json!({"name": port_name(sp), "port": sp.port, "targetPort": sp.port, "protocol": sp.protocol}))
                .collect();
            docs.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": p.namespace},
                "spec": {"clusterIP": format!("10.96.1.{}", i + 1), "ports": ports},
            }));
            let slice_ports: Vec<Value> = p
                .ports
                .iter()
                .map(|sp| json!({"name": port_name(sp), "port": sp.port, "protocol": sp.protocol}))
                .collect();
            docs.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-1"), "namespace": p.namespace,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": slice_ports,
                "endpoints": [{
                    "addresses": [p.ip.to_string()], "nodeName": node_of(p.ip),
                    "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name},
                }],
            }));
        }
        docs
    }

    /// The lab as `ocelot lab up` takes it: the pool, the nodes, the
    /// namespaces and the pods (and their Services, probing through them).
    fn lab_yaml(&self, via: Via) -> String {
        let (base, len) = POOL;
        let mut docs = vec![json!({
            "apiVersion": "ocelot.dev/v1", "kind": "IPPool", "metadata": {"name": "netpol"},
            "spec": {"cidr": format!("{base}/{len}"), "blockSize": BLOCK, "vxlanMode": "Never", "ipipMode": "Never"},
        })];
        for n in self.nodes() {
            docs.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}));
        }
        let w = self.base();
        for (n, l) in &w.namespaces {
            docs.push(namespace_doc(n, l));
        }
        for (k, p) in &self.pods {
            docs.push(pod_doc(p, &w.pods[k]));
        }
        if via == Via::Services {
            docs.extend(self.services());
        }
        yaml(&docs)
    }

    /// The world the lab comes up with: no policies.
    fn base(&self) -> World {
        World {
            namespaces: self.namespaces.clone(),
            pods: self.pods.iter().map(|(k, p)| (k.clone(), p.labels.clone())).collect(),
            policies: BTreeMap::new(),
        }
    }

    /// The world `case` asks for; what it does not mention keeps the
    /// base's labels.
    fn world(&self, case: &Case) -> World {
        let mut w = self.base();
        w.namespaces.extend(case.namespaces.clone());
        w.pods.extend(case.pods.iter().map(|p| (p.key(), p.labels.clone())));
        w.policies = case.policies.iter().map(|p| (policy_key(p), p.clone())).collect();
        w
    }

    /// From `from` to `to`: policies that go, namespaces, pods and policies
    /// that are new or differ.
    fn change(&self, from: &World, to: &World) -> Change {
        let mut c = Change::default();
        for (k, p) in &from.policies {
            if !to.policies.contains_key(k) {
                c.delete.push(p.clone());
            }
        }
        for (n, l) in &to.namespaces {
            if from.namespaces.get(n) != Some(l) {
                c.apply.push(namespace_doc(n, l));
            }
        }
        for (k, l) in &to.pods {
            if from.pods.get(k) != Some(l) {
                c.apply.push(pod_doc(&self.pods[k], l));
            }
        }
        for (k, p) in &to.policies {
            if from.policies.get(k) != Some(p) {
                c.apply.push(p.clone());
            }
        }
        c
    }
}

/// One cell that differs from the expectation. `got` is `None` when the
/// matrix has no such cell (a pod not running).
#[derive(Clone, Debug, PartialEq)]
struct Cell {
    from: String,
    to: String,
    expected: bool,
    got: Option<bool>,
}

/// One port's result in a round: the cells compared, and the difference.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    port: u16,
    protocol: String,
    /// The compared cells' values, in order (what "the same result" means).
    cells: Vec<Option<bool>>,
    wrong: Vec<Cell>,
    /// The probe's own note (how SCTP was probed, or why it could not
    /// be), or why there was no matrix.
    note: Option<String>,
}

/// Compare one probe's answer with its expectation.
fn compare(probe: &Probe, answer: &Result<Value, String>, ignore_loopback: bool) -> Seen {
    let (matrix, note) = match answer {
        Ok(v) => (v["matrix"].clone(), v["note"].as_str().map(String::from)),
        Err(e) => (Value::Null, Some(e.clone())),
    };
    let mut seen = Seen {
        port: probe.port,
        protocol: probe.protocol.clone(),
        cells: Vec::new(),
        wrong: Vec::new(),
        note,
    };
    for (from, row) in &probe.expected {
        for (to, &expected) in row {
            if ignore_loopback && from == to {
                continue;
            }
            let got = matrix[from][to].as_bool();
            seen.cells.push(got);
            if got != Some(expected) {
                seen.wrong.push(Cell { from: from.clone(), to: to.clone(), expected, got });
            }
        }
    }
    seen
}

/// How a case ended.
#[derive(Debug)]
struct Outcome {
    name: String,
    passed: bool,
    elapsed: Duration,
    rounds: usize,
    /// The last round's results (the mismatches, when it failed).
    seen: Vec<Seen>,
    /// Why the lab could not be put in the case's state.
    error: Option<String>,
    /// Something odd but not a failure (an agent that did not log).
    warnings: Vec<String>,
}

impl Outcome {
    fn failing(&self) -> impl Iterator<Item = &Seen> {
        self.seen.iter().filter(|s| !s.wrong.is_empty())
    }

    /// True when every failing probe is SCTP (and nothing else went wrong).
    fn sctp_only(&self) -> bool {
        !self.passed && self.error.is_none() && self.failing().all(|s| s.protocol == "SCTP")
    }
}

/// How many times each node's agent has noticed a datastore change.
fn notices(lab: &Lab, nodes: &BTreeSet<String>) -> BTreeMap<String, usize> {
    nodes
        .iter()
        .map(|n| {
            let log =
                std::fs::read_to_string(lab.node_dir(n).join("agent.log")).unwrap_or_default();
            (n.clone(), log.matches(AGENT_NOTICED).count())
        })
        .collect()
}

/// Wait until every node's agent noticed a change since `before`; the
/// nodes whose agent did not, if the wait ran out.
fn wait_noticed(lab: &Lab, before: &BTreeMap<String, usize>) -> Vec<String> {
    let nodes: BTreeSet<String> = before.keys().cloned().collect();
    let mut late = Vec::new();
    wait_until(NOTICE, || {
        let now = notices(lab, &nodes);
        late = nodes.iter().filter(|n| now[*n] <= before[*n]).cloned().collect();
        late.is_empty()
    });
    late
}

/// Put the lab in `case`'s state, then probe until the result settles.
fn run_case(lab: &Lab, model: &Model, case: &Case, current: &mut World, via: Via) -> Outcome {
    let t0 = Instant::now();
    let want = model.world(case);
    let change = model.change(current, &want);
    let nodes = model.nodes();
    let mut out = Outcome {
        name: case.name.clone(),
        passed: false,
        elapsed: Duration::ZERO,
        rounds: 0,
        seen: Vec::new(),
        error: None,
        warnings: Vec::new(),
    };
    if !change.is_empty() {
        eprintln!("    change: {}", change.summary());
        let before = notices(lab, &nodes);
        let applied = (|| {
            if !change.delete.is_empty() {
                lab.try_delete(&yaml(&change.delete))?;
            }
            if !change.apply.is_empty() {
                lab.try_apply(&yaml(&change.apply))?;
            }
            Ok::<(), String>(())
        })();
        if let Err(e) = applied {
            // What the lab holds is unknown now: remove every policy either
            // world has (a missing one is no error), and let the next case
            // rewrite every namespace and pod.
            let all: Vec<Value> =
                current.policies.values().chain(want.policies.values()).cloned().collect();
            if !all.is_empty() {
                let _ = lab.try_delete(&yaml(&all));
            }
            *current = World {
                namespaces: BTreeMap::new(),
                pods: BTreeMap::new(),
                policies: BTreeMap::new(),
            };
            out.error = Some(e);
            out.elapsed = t0.elapsed();
            return out;
        }
        *current = want;
        let late = wait_noticed(lab, &before);
        if !late.is_empty() {
            out.warnings.push(format!(
                "the agent of {} did not log {AGENT_NOTICED:?} within {NOTICE:?}",
                late.join(", ")
            ));
        }
    }
    let deadline = Instant::now() + DEADLINE;
    let targets = case.targets();
    // The run of identical results: when it started, how many rounds.
    let mut run: Option<(Vec<Seen>, Instant, usize)> = None;
    loop {
        let start = Instant::now();
        let answers = lab.probe_many_with(&targets, PROBE_TIMEOUT_MS, via.probe_args());
        let seen: Vec<Seen> = case
            .probes
            .iter()
            .zip(&answers)
            .map(|(p, a)| compare(p, a, case.ignore_loopback))
            .collect();
        out.rounds += 1;
        let matched = seen.iter().all(|s| s.wrong.is_empty());
        let same = |prev: &Vec<Seen>| {
            prev.iter().zip(&seen).all(|(a, b)| a.cells == b.cells && a.note == b.note)
        };
        match &mut run {
            Some((prev, _, n)) if same(prev) => *n += 1,
            _ => run = Some((seen.clone(), start, 1)),
        }
        let (_, since, n) = run.as_ref().expect("set above");
        let held = start.duration_since(*since);
        out.seen = seen;
        let settled = *n >= 2 && held >= if matched { CONFIRM } else { SETTLED };
        if settled || Instant::now() >= deadline {
            out.passed = matched;
            break;
        }
        std::thread::sleep(ROUND_PAUSE);
    }
    out.elapsed = t0.elapsed();
    out
}

fn allowed(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "allowed",
        Some(false) => "denied",
        None => "not probed",
    }
}

/// A failing probe: its differing cells grouped by (expected, got).
fn describe(s: &Seen) -> String {
    let mut out = format!("  {}/{}: {} cell(s) differ", s.protocol, s.port, s.wrong.len());
    if let Some(n) = &s.note {
        let _ = write!(out, " (probe note: {})", n.lines().next().unwrap_or(""));
    }
    out.push('\n');
    let mut groups: BTreeMap<(bool, Option<bool>), Vec<String>> = BTreeMap::new();
    for c in &s.wrong {
        groups.entry((c.expected, c.got)).or_default().push(format!("{}->{}", c.from, c.to));
    }
    for ((expected, got), cells) in groups {
        let _ = writeln!(
            out,
            "    expected {}, got {} ({}): {}",
            allowed(Some(expected)),
            allowed(got),
            cells.len(),
            cells.join(" ")
        );
    }
    out
}

/// The final report: every case's status, then every failure.
fn report(outcomes: &[Outcome], up: Duration, total: Duration) -> String {
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let sctp = outcomes.iter().filter(|o| o.sctp_only()).count();
    let failed = outcomes.len() - passed;
    let mut r = format!(
        "NetworkPolicy upstream cases: {passed} passed, {failed} failed ({} on TCP/UDP or setup, {sctp} on SCTP only) of {}; \
         {:.1} s in all (lab up {:.1} s)\n",
        failed - sctp,
        outcomes.len(),
        total.as_secs_f64(),
        up.as_secs_f64()
    );
    for o in outcomes {
        let _ = writeln!(
            r,
            "{} {:>5.1} s {:>2} round(s)  {}",
            if o.passed { "PASS" } else { "FAIL" },
            o.elapsed.as_secs_f64(),
            o.rounds,
            o.name
        );
        for w in &o.warnings {
            let _ = writeln!(r, "      warning: {w}");
        }
    }
    let section = |title: &str, pick: &dyn Fn(&Outcome) -> bool| -> String {
        let list: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed && pick(o)).collect();
        if list.is_empty() {
            return String::new();
        }
        let mut s = format!("\n=== {title}: {} case(s) ===\n", list.len());
        for o in list {
            let _ = writeln!(s, "{}", o.name);
            if let Some(e) = &o.error {
                let _ = writeln!(
                    s,
                    "  could not apply the case: {}",
                    e.trim_end().replace('\n', "\n    ")
                );
            }
            for f in o.failing() {
                s.push_str(&describe(f));
            }
        }
        s
    };
    r.push_str(&section("failures on TCP/UDP (or setup)", &|o| !o.sctp_only()));
    r.push_str(&section("failures on SCTP", &|o| o.sctp_only()));
    r
}

/// The file is well formed: schema, sequences, probes on served ports,
/// expectations covering every pair (no lab needed).
#[test]
fn upstream_netpol_cases_are_well_formed() {
    let suite = Suite::load();
    assert_eq!(suite.cases.len(), CASE_COUNT);
    let model = Model::new(&suite);
    // Every pod on the node whose block holds its address.
    for p in model.pods.values() {
        assert!(node_of(p.ip).starts_with("node-"));
    }
    assert!(model.nodes().len() >= 2, "the model should span nodes: {:?}", model.nodes());
}

/// Moving between cases changes exactly what differs, and moving back
/// restores the labels.
#[test]
fn netpol_changes_are_differences() {
    let suite = Suite::load();
    let model = Model::new(&suite);
    let base = model.base();
    let labelled = suite
        .cases
        .iter()
        .find(|c| c.name.contains("AddPodLabels(x/b"))
        .expect("the updated-pod case");
    let w = model.world(labelled);
    let there = model.change(&base, &w);
    let kinds: Vec<&str> = there.apply.iter().map(|d| d["kind"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["Pod", "NetworkPolicy"], "{}", there.summary());
    assert!(there.delete.is_empty());
    assert_eq!(there.apply[0]["metadata"]["labels"]["pod2"], "updated");
    let back = model.change(&w, &base);
    assert_eq!(back.delete.len(), 1, "{}", back.summary());
    assert_eq!(back.apply.len(), 1);
    assert!(back.apply[0]["metadata"]["labels"].get("pod2").is_none());
    assert!(model.change(&w, &w).is_empty());
}

/// Every upstream case on one lab, in order; all must pass.
#[test]
fn upstream_netpol_cases_pass_on_one_lab() {
    run_suite(Via::Pods);
}

/// The same cases with every target reached through a ClusterIP Service
/// of its own: NetworkPolicy holds for translated flows as for direct ones.
#[test]
fn upstream_netpol_cases_pass_through_services() {
    run_suite(Via::Services);
}

/// Every case on one lab, in order, probing `via`; all must pass.
fn run_suite(via: Via) {
    let t0 = Instant::now();
    let suite = Suite::load();
    let model = Model::new(&suite);
    let lab = Lab::up_yaml(&model.lab_yaml(via));
    let up = t0.elapsed();
    let mut current = model.base();
    let mut outcomes = Vec::new();
    for (i, case) in suite.cases.iter().enumerate() {
        eprintln!("[{}/{}] {}", i + 1, suite.cases.len(), case.name);
        let o = run_case(&lab, &model, case, &mut current, via);
        eprintln!(
            "    {} in {:.1} s, {} round(s)",
            if o.passed { "pass" } else { "FAIL" },
            o.elapsed.as_secs_f64(),
            o.rounds
        );
        outcomes.push(o);
    }
    drop(lab);
    let text = report(&outcomes, up, t0.elapsed());
    assert!(outcomes.iter().all(|o| o.passed), "probing {via:?}: {text}");
    eprintln!("{text}");
}
