//! The agent and the CNI plugin: pods attached by the real `ocelot-cni`,
//! addresses from the shared IPAM, restarts of either process.

use ocelot_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const CLUSTER: &str = r#"
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: default}
spec: {cidr: 10.90.0.0/16, blockSize: 26}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
"#;

fn write_pod(ds: &Path, name: &str, annotations: &str) {
    std::fs::write(
        ds.join(format!("pod-{name}.yaml")),
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, annotations: {{{annotations}}}}}\nspec: {{nodeName: node-1}}\n"),
    )
    .unwrap();
}

fn add(node: &AgentNode, pod: &Netns, cid: &str, name: &str) -> Value {
    let out = node.cni("ADD", cid, &pod.path(), &format!("x/{name}"), &node.cni_config("1.0.0"));
    assert!(
        out.status.success(),
        "ADD failed: {}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.agent.log_text()
    );
    serde_json::from_slice(&out.stdout).expect("result JSON")
}

fn ip_of(result: &Value) -> String {
    result["ips"][0]["address"].as_str().expect("address").split('/').next().unwrap().to_string()
}

fn setup() -> (TempDir, AgentNode) {
    let ds = TempDir::new("ocelot-ds-");
    std::fs::write(ds.0.join("cluster.yaml"), CLUSTER).unwrap();
    let node = AgentNode::start("node-1", "192.0.2.21", &ds.0);
    (ds, node)
}

#[test]
fn cni_add_check_del_through_the_agent() {
    let (ds, node) = setup();
    write_pod(&ds.0, "a", "");
    write_pod(&ds.0, "b", "ocelot.dev/ip-addrs: '[\"10.90.7.7\"]'");
    let pa = Netns::new("octp");
    let pb = Netns::new("octp");
    let ra = add(&node, &pa, "cid-a", "a");
    let rb = add(&node, &pb, "cid-b", "b");
    assert_eq!(ra["cniVersion"], "1.0.0");
    assert_eq!(ra["interfaces"][0]["sandbox"], pa.path().display().to_string());
    assert_eq!(ip_of(&rb), "10.90.7.7", "requested address granted");
    let a_ip = ip_of(&ra);
    assert!(a_ip.starts_with("10.90."), "{a_ip}");
    assert!(pa.exec("ip -4 addr show eth0").contains(&format!("{a_ip}/32")));
    assert!(pa.ping("10.90.7.7") && pb.ping(&a_ip), "pods cannot reach each other");

    // A repeated ADD returns the same address.
    assert_eq!(ip_of(&add(&node, &pa, "cid-a", "a")), a_ip);
    // CHECK with the prevResult succeeds.
    let mut conf: Value = serde_json::from_str(&node.cni_config("1.0.0")).unwrap();
    conf["prevResult"] = ra.clone();
    let chk = node.cni("CHECK", "cid-a", &pa.path(), "x/a", &conf.to_string());
    assert!(chk.status.success(), "CHECK: {}", String::from_utf8_lossy(&chk.stdout));

    // DEL removes the interface and frees the address; DEL again succeeds.
    let del = node.cni("DEL", "cid-a", &pa.path(), "x/a", &node.cni_config("1.0.0"));
    assert!(del.status.success(), "{}", String::from_utf8_lossy(&del.stdout));
    assert!(!pa.exec_out("ip link show eth0").status.success(), "eth0 survived DEL");
    assert!(node
        .cni("DEL", "cid-a", &pa.path(), "x/a", &node.cni_config("1.0.0"))
        .status
        .success());
    let state = std::fs::read_to_string(ds.0.join(".ipam/state.json")).unwrap();
    assert!(!state.contains("cid-a"), "allocation leaked: {state}");
}

#[test]
fn bad_requests_get_clear_errors_and_leak_nothing() {
    let (ds, node) = setup();
    write_pod(&ds.0, "c", "ocelot.dev/ip-addrs: '[\"192.0.2.99\"]'");
    let pc = Netns::new("octp");
    // A requested address outside every pool.
    let out = node.cni("ADD", "cid-c", &pc.path(), "x/c", &node.cni_config("1.0.0"));
    assert!(!out.status.success());
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["code"], 101, "{e}");
    // A netns that does not exist.
    write_pod(&ds.0, "d", "");
    let out = node.cni(
        "ADD",
        "cid-d",
        Path::new("/var/run/netns/ocelot-no-such-ns"),
        "x/d",
        &node.cni_config("1.0.0"),
    );
    assert!(!out.status.success());
    // A pod the datastore does not know.
    let out = node.cni("ADD", "cid-e", &pc.path(), "x/nobody", &node.cni_config("1.0.0"));
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["code"], 103, "{e}");
    // Nothing was allocated by any of them, nothing left in the node.
    let state = std::fs::read_to_string(ds.0.join(".ipam/state.json")).unwrap_or_default();
    assert!(!state.contains("cid-"), "allocation leaked: {state}");
    let links = node.ns.exec("ip -o link");
    assert!(
        !links.lines().any(|l| l.contains(": oc") && !l.contains("ocelot0")),
        "TAP left behind: {links}"
    );
    // A datastore file that is not YAML changes nothing; the agent keeps going.
    std::fs::write(ds.0.join("broken.yaml"), "kind: Pod\nmetadata: [oops\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pd = Netns::new("octp");
    add(&node, &pd, "cid-d2", "d");
    assert!(node.agent.log_text().contains("datastore file rejected"));
}

#[test]
fn restarts_of_agent_and_dataplane_converge() {
    let (ds, mut node) = setup();
    write_pod(&ds.0, "a", "");
    write_pod(&ds.0, "b", "");
    let pa = Netns::new("octp");
    let pb = Netns::new("octp");
    let a_ip = ip_of(&add(&node, &pa, "cid-a", "a"));
    let b_ip = ip_of(&add(&node, &pb, "cid-b", "b"));
    node.restart_agent();
    node.restart_dataplane();
    assert!(wait_until(Duration::from_secs(5), || pa.ping(&b_ip)), "traffic did not resume");
    // The restarted agent never hands out a live address again.
    write_pod(&ds.0, "c", "");
    let pc = Netns::new("octp");
    let c_ip = ip_of(&add(&node, &pc, "cid-c", "c"));
    assert!(c_ip != a_ip && c_ip != b_ip);
    assert!(pc.ping(&a_ip));
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let (ds, node) = setup();
    const N: usize = 40;
    for i in 0..N {
        write_pod(&ds.0, &format!("p{i}"), "");
    }
    let pods: Vec<Netns> = (0..N).map(|_| Netns::new("octp")).collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let node = &node;
                s.spawn(move || ip_of(&add(node, p, &format!("cid-{i}"), &format!("p{i}"))))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let uniq: std::collections::HashSet<_> = ips.iter().collect();
    assert_eq!(uniq.len(), N, "duplicate addresses: {ips:?}");
}

/// Run a standard plugin from /usr/lib/cni the way libcni does.
fn std_plugin(
    node: &AgentNode,
    plugin: &str,
    cmd: &str,
    cid: &str,
    netns: &Path,
    conf: &Value,
) -> std::process::Output {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.ns.name, &format!("/usr/lib/cni/{plugin}")])
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The conflist of manifests/ (ocelot, portmap, bandwidth) driven as libcni
/// drives it: ADD in order, each plugin getting the previous result; DEL in
/// reverse order.
#[test]
fn chains_with_portmap_and_bandwidth() {
    let (ds, node) = setup();
    write_pod(&ds.0, "a", "");
    let pa = Netns::new("octp");
    let name = "k8s-pod-network";
    let ocelot_conf = {
        let mut v: Value = serde_json::from_str(&node.cni_config("1.0.0")).unwrap();
        v["name"] = name.into();
        v
    };
    let stdin = ocelot_conf.to_string();
    let out = node.cni("ADD", "cid-chain", &pa.path(), "x/a", &stdin);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let r1: Value = serde_json::from_slice(&out.stdout).unwrap();
    let portmap = serde_json::json!({
        "cniVersion": "1.0.0", "name": name, "type": "portmap", "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]},
        "prevResult": r1,
    });
    let out = std_plugin(&node, "portmap", "ADD", "cid-chain", &pa.path(), &portmap);
    assert!(
        out.status.success(),
        "portmap ADD: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r2: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bandwidth = serde_json::json!({
        "cniVersion": "1.0.0", "name": name, "type": "bandwidth", "capabilities": {"bandwidth": true}, "prevResult": r2,
    });
    let out = std_plugin(&node, "bandwidth", "ADD", "cid-chain", &pa.path(), &bandwidth);
    assert!(
        out.status.success(),
        "bandwidth ADD: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r3: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r3["ips"], r1["ips"], "the chain keeps Ocelot's result");
    let nat = node.ns.exec("iptables-save -t nat");
    assert!(nat.contains("18080"), "portmap installed no DNAT rule:\n{nat}");

    // DEL in reverse order.
    for (p, conf) in [("bandwidth", &bandwidth), ("portmap", &portmap)] {
        let out = std_plugin(&node, p, "DEL", "cid-chain", &pa.path(), conf);
        assert!(
            out.status.success(),
            "{p} DEL: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(node.cni("DEL", "cid-chain", &pa.path(), "x/a", &stdin).status.success());
    assert!(!node.ns.exec("iptables-save -t nat").contains("18080"), "portmap rule left behind");
}

#[test]
fn an_exhausted_pool_is_a_clear_error_and_leaks_nothing() {
    let ds = TempDir::new("ocelot-ds-");
    std::fs::write(
        ds.0.join("cluster.yaml"),
        "apiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata: {name: tiny}\nspec: {cidr: 10.97.0.0/31, blockSize: 31}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: node-1}\n",
    )
    .unwrap();
    let node = AgentNode::start("node-1", "192.0.2.22", &ds.0);
    for p in ["a", "b", "c"] {
        write_pod(&ds.0, p, "");
    }
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("octp")).collect();
    add(&node, &pods[0], "cid-a", "a");
    add(&node, &pods[1], "cid-b", "b");
    let out = node.cni("ADD", "cid-c", &pods[2].path(), "x/c", &node.cni_config("1.0.0"));
    assert!(!out.status.success());
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["code"], 100, "{e}");
    assert!(e["msg"].as_str().unwrap_or("").contains("exhausted"), "{e}");
    assert!(!pods[2].exec_out("ip link show eth0").status.success(), "interface left in the pod");
    // Freeing one address makes room again.
    assert!(node
        .cni("DEL", "cid-a", &pods[0].path(), "x/a", &node.cni_config("1.0.0"))
        .status
        .success());
    add(&node, &pods[2], "cid-c", "c");
}

/// `GET http://127.0.0.1:9099{path}` (the agent's default --metrics-addr)
/// from inside namespace `netns`: (status, body).
fn agent_http(netns: &str, path: &str) -> (u16, String) {
    let script = "import sys,urllib.request,urllib.error\n\
try:\n r=urllib.request.urlopen('http://127.0.0.1:9099'+sys.argv[1],timeout=5);c=r.status;b=r.read()\n\
except urllib.error.HTTPError as e:\n c=e.code;b=e.read()\n\
except OSError as e:\n c=0;b=str(e).encode()\n\
print(c);sys.stdout.write(b.decode())";
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", script, path])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The samples of a Prometheus text exposition, `name{labels}` → value;
/// panics on a line that is not a comment or a sample.
fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            let v = match v {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            (series.to_string(), v)
        })
        .collect()
}

fn sum(s: &std::collections::BTreeMap<String, f64>, prefix: &str) -> f64 {
    s.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
}

/// A running agent's /livez, /readyz, /metrics and /status, and `ocelot
/// status`: ready once synced, values move with traffic and pods, not ready
/// once the dataplane is gone.
#[test]
fn agent_serves_probes_metrics_and_status() {
    let (ds, mut node) = setup();
    let ns = node.ns.name.clone();
    assert!(
        wait_until(Duration::from_secs(10), || agent_http(&ns, "/readyz").0 == 200),
        "never ready: {:?}\n{}",
        agent_http(&ns, "/readyz"),
        node.agent.log_text()
    );
    assert_eq!(agent_http(&ns, "/livez"), (200, "ok\n".into()));
    let (code, m1) = agent_http(&ns, "/metrics");
    assert_eq!(code, 200);
    assert!(m1.contains("# TYPE ocelot_dataplane_drops_total counter"), "{m1}");
    let s1 = samples(&m1);
    assert_eq!(s1["ocelot_dataplane_up"], 1.0, "{m1}");
    assert_eq!(s1["ocelot_agent_ready"], 1.0);
    assert_eq!(s1["ocelot_agent_endpoints"], 0.0);

    write_pod(&ds.0, "a", "");
    write_pod(&ds.0, "b", "");
    let (pa, pb) = (Netns::new("octp"), Netns::new("octp"));
    let a_ip = ip_of(&add(&node, &pa, "cid-a", "a"));
    let b_ip = ip_of(&add(&node, &pb, "cid-b", "b"));
    assert!(pa.ping(&b_ip) && pb.ping(&a_ip));
    let _ = pa.exec_out("ping -c1 -W1 10.90.250.250"); // in the pool, nobody: no_route
    let moved = wait_until(Duration::from_secs(5), || {
        let s = samples(&agent_http(&ns, "/metrics").1);
        s["ocelot_agent_endpoints"] == 2.0
            && s[r#"ocelot_ipam_node_allocated_addresses{pool="default"}"#] == 2.0
            && sum(&s, "ocelot_dataplane_port_rx_packets_total{")
                > sum(&s1, "ocelot_dataplane_port_rx_packets_total{")
            && s["ocelot_policy_calculation_seconds_count"] >= 1.0
    });
    assert!(moved, "metrics did not follow:\n{}", agent_http(&ns, "/metrics").1);

    let (code, st) = agent_http(&ns, "/status");
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(v["node"], "node-1");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 2, "{v}");

    let status = |format: &str| {
        node.ns.exec_out(&format!(
            "{} status -o {format} --dataplane-socket {}",
            bin("ocelot").display(),
            node.dir.0.join("dp.sock").display()
        ))
    };
    let out = status("json");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["healthy"], true, "{r}");
    assert_eq!(r["dataplane"]["endpoints"].as_array().unwrap().len(), 2, "{r}");
    let table = String::from_utf8_lossy(&status("table").stdout).to_string();
    assert!(table.contains("Agent:      ready") && table.contains("x/a"), "{table}");

    // The dataplane gone: not ready, and said why; alive all the same.
    node.dataplane.kill();
    let _ = std::fs::remove_file(node.dir.0.join("dp.sock"));
    assert!(
        wait_until(Duration::from_secs(5), || agent_http(&ns, "/readyz").0 == 503),
        "still ready without a dataplane"
    );
    assert!(agent_http(&ns, "/readyz").1.contains("dataplane not reachable"));
    assert_eq!(agent_http(&ns, "/livez").0, 200);
    assert_eq!(samples(&agent_http(&ns, "/metrics").1)["ocelot_dataplane_up"], 0.0);
    let out = status("json");
    assert!(!out.status.success(), "`ocelot status` exits 1 when unhealthy");
    node.restart_dataplane();
    assert!(
        wait_until(Duration::from_secs(10), || agent_http(&ns, "/readyz").0 == 200),
        "not ready again after the dataplane came back"
    );
}

/// `ocelot status` on a two-node VXLAN lab: the peer, its route and the
/// tunnel are listed, with honest words on the peer's health.
#[test]
fn status_on_an_overlay_lab_lists_the_peer() {
    let file = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples/lab-overlay.yaml");
    let lab = Lab::up(&file.display().to_string());
    let b = lab.pod_ip("x/b");
    assert!(lab.pod_exec_out("x/a", &format!("ping -c2 -W2 {b}")).status.success());
    let cmd = format!(
        "{} status -o json --dataplane-socket {}",
        bin("ocelot").display(),
        lab.node_dir("node-1").join("dp.sock").display()
    );
    let mut r = Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        let out = lab.node_exec_out("node-1", &cmd);
        r = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        out.status.success() && r["peers"].as_array().is_some_and(|p| !p.is_empty())
    });
    assert!(ok, "{r}");
    let peer = &r["peers"][0];
    assert_eq!(peer["name"], "node-2", "{r}");
    assert_eq!(peer["encap"], "vxlan", "{r}");
    assert!(peer["routes"].as_u64().unwrap() >= 1, "{r}");
    assert!(peer["tunnel"].as_str().unwrap().starts_with("unknown"), "{r}");
    // The VXLAN packets just sent made the kernel resolve node-2's address.
    let hop = peer["next_hop"].as_str().unwrap();
    assert!(hop.ends_with("on-link: reachable") || hop.ends_with("on-link: stale"), "{r}");
    assert!(
        r["dataplane"]["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["rx_packets"].as_u64() > Some(0)),
        "{r}"
    );
    assert!(r["agent"]["blocks"].as_array().is_some_and(|b| !b.is_empty()), "{r}");
    let table = String::from_utf8_lossy(
        &lab.node_exec_out("node-1", &cmd.replace("-o json", "-o table")).stdout,
    )
    .to_string();
    assert!(table.contains("Peers (1):") && table.contains("node-2"), "{table}");
}
