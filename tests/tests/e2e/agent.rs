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
