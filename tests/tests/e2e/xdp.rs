//! The AF_XDP uplink (issue 4) end to end, on a two-node lab started with
//! `OCELOT_UPLINK_MODE=xdp` (the lab's agents inherit the environment of
//! `ocelot lab up`, and pass the mode to their dataplane): pods on the two
//! nodes reach each other over VXLAN, then IPIP, and the bulk of it crosses
//! the `xdp` port of both nodes; the nodes' own traffic (ping, TCP between
//! the node namespaces) works with the program attached; a `kill -9` of a
//! dataplane takes its program with it; and after `lab down` none of the
//! programs the lab attached is loaded any more.

use ocelot_tests::*;
use serde_json::Value;
use std::time::Duration;

const POOL: &str = "10.65.0.0/16";
/// Bytes of the bulk TCP transfer in each mode.
const BULK: u64 = 2_000_000;
const CONVERGE: Duration = Duration::from_secs(10);

fn pool(vxlan: &str, ipip: &str) -> String {
    format!(
        "---\napiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata: {{name: pods}}\n\
         spec: {{cidr: {POOL}, blockSize: 26, vxlanMode: {vxlan}, ipipMode: {ipip}}}\n"
    )
}

fn node(name: &str) -> String {
    format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n")
}

fn pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n\
         \x20   - {{containerPort: 80, protocol: TCP}}\n"
    )
}

/// `ocelot lab up` of `yaml` with the uplink mode in its environment.
fn lab_up(yaml: &str, mode: &str) -> Lab {
    let lab = Lab { name: unique("t"), run_dir: TempDir::new("ocelot-lab-") };
    let file = lab.run_dir.0.join("lab.yaml");
    std::fs::write(&file, yaml).expect("write lab input");
    sh(&format!(
        "OCELOT_UPLINK_MODE={mode} {} lab up --name {} --run-dir {} -f {} 2>&1",
        bin("ocelot").display(),
        lab.name,
        lab.run_dir.0.display(),
        file.display()
    ));
    lab
}

/// Packets and bytes through one port of a node's dataplane, and its drops.
fn port(lab: &Lab, node: &str, name: &str) -> (u64, u64, u64, u64, Value) {
    let stats = lab.stats(node);
    let p = stats["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or(Value::Null);
    let n = |f: &str| p[f].as_u64().unwrap_or(0);
    (n("rx_packets"), n("tx_packets"), n("rx_bytes"), n("tx_bytes"), p["drops"].clone())
}

/// Wait until `node` routes to `peer` with `encap` and says which uplink
/// mode it uses; returns that.
fn wait_overlay(lab: &Lab, node: &str, peer: &str, encap: &str) -> String {
    let mut last = Value::Null;
    let ok = wait_until(CONVERGE, || {
        last = lab.state(node)["overlay"].clone();
        let routes = last["spec"]["routes"].as_array().cloned().unwrap_or_default();
        routes.iter().any(|r| r["node"] == peer) && routes.iter().all(|r| r["encap"] == encap)
    });
    assert!(ok, "{node}: never routed to {peer} by {encap}; last: {last}");
    last["uplink_mode"].as_str().unwrap_or("").to_string()
}

fn ping(netns: &str, ip: &str) {
    let out = sh_out(&format!("ip netns exec {netns} ping -c 2 -i 0.2 -W 1 {ip}"));
    assert!(
        out.status.success(),
        "ping {ip} from {netns}:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The id of the XDP program attached to a node's uplink, if any.
fn attached(lab: &Lab, node: &str) -> Option<u32> {
    let out = lab.node_exec(node, "ip -d link show ocl-fab");
    let at = out.find("prog/xdp id ")?;
    out[at + 12..].split_whitespace().next()?.parse().ok()
}

#[test]
fn xdp_uplink_carries_the_tunnels_and_leaves_the_host_alone() {
    let yaml = [
        pool("Always", "Never"),
        node("node-1"),
        node("node-2"),
        pod("a", "node-1"),
        pod("b", "node-2"),
    ]
    .concat();
    let lab = lab_up(&yaml, "xdp");
    let (a, b) = (lab.pod_ip("x/a"), lab.pod_ip("x/b"));
    let (pod_a, pod_b) = (lab.pod_netns("x/a"), lab.pod_netns("x/b"));
    let (n1, n2) = (lab.node_ip("node-1"), lab.node_ip("node-2"));

    for (vxlan, ipip, encap) in [("Always", "Never", "vxlan"), ("Never", "Always", "ipip")] {
        lab.apply(&pool(vxlan, ipip));
        for (me, peer) in [("node-1", "node-2"), ("node-2", "node-1")] {
            let mode = wait_overlay(&lab, me, peer, encap);
            assert!(mode.starts_with("xdp ("), "{me} in {encap}: uplink mode {mode:?}");
        }
        let before = [port(&lab, "node-1", "xdp"), port(&lab, "node-2", "xdp")];
        ping(&pod_a, &b);
        ping(&pod_b, &a);
        assert_eq!(tcp_transfer(&pod_b, &pod_a, &b, 5555, BULK), BULK, "{encap}: x/a -> x/b");
        let after = [port(&lab, "node-1", "xdp"), port(&lab, "node-2", "xdp")];
        for (i, node) in ["node-1", "node-2"].iter().enumerate() {
            let (b0, a0) = (&before[i], &after[i]);
            assert!(
                a0.0 > b0.0 && a0.1 > b0.1,
                "{encap}: {node}'s xdp port carried nothing: {b0:?} -> {a0:?}"
            );
            assert!(a0.4.get("uplink_malformed").is_none(), "{encap}: {node}: {}", a0.4);
        }
        // The bulk left node-1 and arrived on node-2 through AF_XDP.
        assert!(
            after[0].3 - before[0].3 >= BULK,
            "{encap}: node-1 sent {} bytes by XDP",
            after[0].3 - before[0].3
        );
        assert!(
            after[1].2 - before[1].2 >= BULK,
            "{encap}: node-2 got {} bytes by XDP",
            after[1].2 - before[1].2
        );
    }

    // The nodes' own traffic, with the program attached on both uplinks.
    let ids = [attached(&lab, "node-1"), attached(&lab, "node-2")];
    assert!(ids.iter().all(Option::is_some), "programs attached: {ids:?}");
    let (ns1, ns2) = (lab.node_netns("node-1"), lab.node_netns("node-2"));
    ping(&ns1, &n2);
    ping(&ns2, &n1);
    assert_eq!(tcp_transfer(&ns2, &ns1, &n2, 5556, 500_000), 500_000, "node-1 -> node-2 TCP");

    // kill -9: the program goes with the process (its BPF link closes).
    let nodes = lab.nodes();
    let pid = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "node-1")
        .and_then(|n| n["dataplane"]["pid"].as_i64())
        .expect("node-1's dataplane pid");
    sh(&format!("kill -9 {pid}"));
    assert!(
        wait_until(Duration::from_secs(3), || attached(&lab, "node-1").is_none()),
        "node-1's uplink kept its XDP program after kill -9"
    );
    ping(&ns1, &n2);

    lab.ocelot("down");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    assert!(
        sh_out("bpftool version").status.success(),
        "bpftool is needed to look for leftover programs (apt-get install bpftool; ./dev.sh does)"
    );
    for id in ids.into_iter().flatten() {
        let gone = wait_until(Duration::from_secs(3), || {
            !sh_out(&format!("bpftool prog show id {id}")).status.success()
        });
        assert!(gone, "XDP program {id} is still loaded after lab down");
    }
}
