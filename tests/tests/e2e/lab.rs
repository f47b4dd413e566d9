//! `ocelot lab`: up, get, probe, apply, delete and down, on the example
//! file and on a 3 x 3 cluster; down leaves nothing behind.

use ocelot_tests::*;
use serde_json::Value;
use std::path::PathBuf;

fn example() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples/lab.yaml")
        .display()
        .to_string()
}

#[test]
fn example_lab_up_probe_down_leaves_nothing() {
    let lab = Lab::up(&example());
    let pods = lab.pods();
    let list = pods.as_array().or_else(|| pods["pods"].as_array()).expect("pod list").clone();
    assert_eq!(list.len(), 5, "{pods}");
    let node_of = |key: &str| {
        list.iter()
            .find(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ) == key
            })
            .map(|p| p["node"].as_str().unwrap_or("").to_string())
            .expect("pod")
    };
    for (port, proto) in [(80, "TCP"), (81, "UDP")] {
        let m = lab.probe(port, proto);
        let rows = m.as_object().expect("matrix");
        assert_eq!(rows.len(), 5);
        for (from, cols) in rows {
            for (to, ok) in cols.as_object().unwrap() {
                if node_of(from) == node_of(to) {
                    assert_eq!(
                        ok,
                        &Value::Bool(true),
                        "{proto}/{port}: {from} -> {to} on one node must connect"
                    );
                }
            }
        }
    }
    // exec passes the exit code through.
    let out = sh_out(&format!(
        "{} lab exec x/a --name {} --run-dir {} -- sh -c 'exit 7'",
        bin("ocelot").display(),
        lab.name,
        lab.run_dir.0.display()
    ));
    assert_eq!(out.status.code(), Some(7));
    lab.ocelot("down");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

const THREE_BY_THREE: &str = r#"
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: pool}
spec: {cidr: 10.66.0.0/16}
---
apiVersion: v1
kind: Node
metadata: {name: solo}
"#;

fn pod(ns: &str, name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}}}}}\nspec:\n  nodeName: solo\n  containers:\n  - name: c\n    ports: [{{containerPort: 80}}]\n"
    )
}

#[test]
fn three_namespaces_of_three_pods_apply_and_delete() {
    let dir = TempDir::new("ocelot-lab-files-");
    let mut text = THREE_BY_THREE.to_string();
    for ns in ["x", "y", "z"] {
        text.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"));
        for p in ["a", "b", "c"] {
            text.push_str(&pod(ns, p));
        }
    }
    let file = dir.0.join("cluster.yaml");
    std::fs::write(&file, text).unwrap();
    let lab = Lab::up(&file.display().to_string());
    let m = lab.probe(80, "TCP");
    let cells: Vec<bool> = m
        .as_object()
        .unwrap()
        .values()
        .flat_map(|c| c.as_object().unwrap().values().map(|v| v == &Value::Bool(true)))
        .collect();
    assert_eq!(cells.len(), 81);
    assert!(cells.iter().all(|c| *c), "every pair on one node connects: {m}");

    // apply: a new pod joins and is reachable; delete: a pod goes away.
    let extra = dir.0.join("extra.yaml");
    std::fs::write(&extra, pod("z", "d")).unwrap();
    lab.ocelot(&format!("apply -f {}", extra.display()));
    let m = lab.probe(80, "TCP");
    assert_eq!(m["x/a"]["z/d"], Value::Bool(true), "{m}");
    let gone = dir.0.join("gone.yaml");
    std::fs::write(&gone, pod("x", "b")).unwrap();
    lab.ocelot(&format!("delete -f {}", gone.display()));
    let m = lab.probe(80, "TCP");
    assert!(
        m.get("x/b").is_none() && m["x/a"].get("x/b").is_none(),
        "deleted pod still probed: {m}"
    );
    lab.ocelot("down");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

/// A pod's `hostPort` is published by the chained `portmap` plugin: a
/// client attached to the fabric, outside the cluster, reaches the pod on
/// the node's address.
#[test]
fn host_port_reaches_the_pod_from_outside_the_cluster() {
    let dir = TempDir::new("ocelot-lab-files-");
    let file = dir.0.join("hostport.yaml");
    std::fs::write(
        &file,
        "apiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.67.0.0/16}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: hp}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: web, namespace: x}\nspec:\n  nodeName: hp\n  containers:\n  - name: c\n    ports: [{containerPort: 80, hostPort: 8080}]\n",
    )
    .unwrap();
    let lab = Lab::up(&file.display().to_string());
    let out = lab.ocelot("get nodes -o json");
    let nodes: Value = serde_json::from_str(&out[out.find('[').expect("nodes JSON")..]).unwrap();
    let node_ip = nodes[0]["internalIP"].as_str().expect("internalIP").to_string();
    // A client namespace on the fabric bridge, made inside namespaces only.
    let client = Netns::new("octc");
    let fabric = format!("ocl-{}-fabric", lab.name);
    client.exec(&format!("ip link add octc0 type veth peer name octc1 netns {fabric}"));
    client.exec("ip addr add 192.0.2.250/24 dev octc0");
    client.exec("ip link set octc0 up");
    sh(&format!("ip -n {fabric} link set octc1 master ocl-br0 up"));
    // The pod's server starts asynchronously (as a container would): retry.
    let mut answer = String::new();
    let ok = wait_until(std::time::Duration::from_secs(10), || {
        let out = client.exec_out(&format!("sh -c 'echo | timeout 2 nc -w 1 {node_ip} 8080'"));
        answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        answer == "x/web"
    });
    assert!(ok, "hostPort answered {answer:?}");
}
