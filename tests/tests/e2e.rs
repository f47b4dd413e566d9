//! End-to-end tests: real TAP devices, namespaces and processes. Run as
//! root, after `cargo build --workspace --bins`. Every test builds its own
//! uniquely named namespaces and removes them, also when it fails.

use ocelot_tests::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn port_counter(c: &Value, name_prefix: &str, field: &str) -> u64 {
    c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter(|p| p["name"].as_str().unwrap_or("").starts_with(name_prefix))
        .map(|p| p[field].as_u64().unwrap_or(0))
        .sum()
}

fn drops(c: &Value, reason: &str) -> u64 {
    c["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["drops"][reason].as_u64().unwrap_or(0))
        .sum()
}

/// iperf3 from `client` to `server_ip` for `secs`; returns bits/s received.
fn iperf(server: &Netns, client: &Netns, server_ip: &str, udp: bool) -> f64 {
    let port = 5201 + (std::process::id() % 1000) as u16;
    let dir = TempDir::new("iperf-");
    let _srv = server.spawn(&format!("iperf3 -s -1 -p {port}"), &dir.0.join("srv.log"));
    std::thread::sleep(Duration::from_millis(300));
    let mode = if udp { "-u -b 200M -l 1200" } else { "" };
    let out = client.exec(&format!("iperf3 -c {server_ip} -p {port} -t 2 -J {mode}"));
    let v: Value = serde_json::from_str(&out).expect("iperf3 json");
    let end = &v["end"];
    let bps = if udp {
        end["sum"]["bits_per_second"].as_f64()
    } else {
        end["sum_received"]["bits_per_second"].as_f64()
    };
    bps.unwrap_or(0.0)
}

#[test]
fn pods_and_node_talk_through_the_dataplane() {
    let node = DataplaneNode::start("oct-n", "192.0.2.10", "10.70.0.0/16", "");
    let a = node.add_pod("oct-a", "10.70.0.2");
    let b = node.add_pod("oct-b", "10.70.0.3");

    // The pods got a TAP eth0 with their /32 and Calico's gateway routes.
    let link = a.exec("ip -d link show eth0");
    assert!(link.contains("tun type tap"), "eth0 is not a TAP: {link}");
    assert!(a.exec("ip -4 addr show eth0").contains("10.70.0.2/32"));
    let routes = a.exec("ip route");
    assert!(routes.contains("default via 169.254.1.1 dev eth0"), "{routes}");

    assert!(a.ping("10.70.0.3"), "pod a -> pod b");
    assert!(b.ping("10.70.0.2"), "pod b -> pod a");
    assert!(a.ping("192.0.2.10"), "pod -> node");
    assert!(node.ns.ping("10.70.0.2"), "node -> pod");

    // TCP and UDP between the pods, and TCP from the node to a pod.
    let tcp = iperf(&b, &a, "10.70.0.3", false);
    assert!(tcp > 100e6, "pod-to-pod TCP only {tcp} bit/s");
    let udp = iperf(&b, &a, "10.70.0.3", true);
    assert!(udp > 1e6, "pod-to-pod UDP only {udp} bit/s");
    let host_tcp = iperf(&a, &node.ns, "10.70.0.2", false);
    assert!(host_tcp > 100e6, "node-to-pod TCP only {host_tcp} bit/s");

    // Large TCP writes crossed as GSO frames: far fewer frames than bytes/MTU.
    let c = node.counters();
    let pkts = port_counter(&c, "ocp", "rx_packets");
    let bytes = port_counter(&c, "ocp", "rx_bytes");
    assert!(
        bytes / pkts.max(1) > 3000,
        "average frame {} bytes: offloads not in use",
        bytes / pkts.max(1)
    );
}

#[test]
fn kill_9_and_restart_keeps_pods_and_traffic_resumes() {
    let mut node = DataplaneNode::start("oct-n", "192.0.2.11", "10.71.0.0/16", "");
    let a = node.add_pod("oct-a", "10.71.0.2");
    let b = node.add_pod("oct-b", "10.71.0.3");
    assert!(a.ping("10.71.0.3"));
    let before = a.exec("ip -o link show eth0");

    node.proc.kill();
    // The pod keeps its interface and address while the dataplane is gone.
    assert!(a.exec("ip -4 addr show eth0").contains("10.71.0.2/32"));
    assert!(!a.ping("10.71.0.3"), "traffic cannot flow with no dataplane");

    node.crash_and_restart();
    assert!(wait_until(Duration::from_secs(5), || a.ping("10.71.0.3")), "traffic did not resume");
    assert!(b.ping("10.71.0.2"));
    assert!(node.ns.ping("10.71.0.3"));
    let after = a.exec("ip -o link show eth0");
    // Same device (same ifindex and MAC), not a new one.
    assert_eq!(before.split(':').next(), after.split(':').next(), "{before} vs {after}");
    assert!(after.contains(
        before.split("link/ether ").nth(1).unwrap_or("?").split(' ').next().unwrap_or("?")
    ));
}

#[test]
fn drops_are_counted_by_reason() {
    let node = DataplaneNode::start("oct-n", "192.0.2.12", "10.72.0.0/16", "");
    let a = node.add_pod("oct-a", "10.72.0.2");
    let before = drops(&node.counters(), "no_route");
    // An address in the pool with no endpoint: dropped, not sent to the
    // host, and the sender told at once.
    let out = a.exec_out("ping -c 1 -W 1 10.72.0.99");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("169.254.1.1") && text.contains("Destination Host Unreachable"),
        "{text}"
    );
    let after = drops(&node.counters(), "no_route");
    assert!(after > before, "no_route did not count: {before} -> {after}");
    // TTL 1 towards another node address: time exceeded from the gateway.
    let out = a.exec_out("ping -c 1 -W 1 -t 1 192.0.2.12");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("169.254.1.1") && text.contains("Time to live exceeded"), "{text}");
    assert!(drops(&node.counters(), "ttl_exceeded") >= 1);
}

#[test]
fn api_rejects_bad_requests_and_changes_nothing() {
    let node = DataplaneNode::start("oct-n", "192.0.2.13", "10.73.0.0/16", "--host-iface none");
    let mode = std::fs::metadata(node.socket())
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap();
    assert_eq!(mode & 0o777, 0o600, "socket must be root-only");

    let s = UnixStream::connect(node.socket()).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |line: &str| -> Value {
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        let mut resp = String::new();
        r.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap()
    };
    assert_eq!(ask(r#"{"id":1,"op":"state"}"#)["error"]["code"], "hello_first");
    assert_eq!(ask("this is not json")["error"]["code"], "bad_request");
    assert_eq!(
        ask(r#"{"id":2,"op":"hello","versions":[99]}"#)["error"]["code"],
        "unsupported_version"
    );
    assert_eq!(ask(r#"{"id":3,"op":"hello","versions":[1]}"#)["ok"]["version"], 1);
    let bad_ns = ask(
        r#"{"id":4,"op":"add_endpoint","endpoint":{"name":"ocbad","netns":"/var/run/netns/does-not-exist","ifname":"eth0","ips":["10.73.0.2"]}}"#,
    );
    assert_eq!(bad_ns["error"]["code"], "invalid_argument", "{bad_ns}");
    let bad_name = ask(
        r#"{"id":5,"op":"add_endpoint","endpoint":{"name":"a-name-that-is-too-long","netns":"/proc/self/ns/net","ifname":"eth0","ips":["10.73.0.2"]}}"#,
    );
    assert_eq!(bad_name["error"]["code"], "invalid_argument");
    let state = ask(r#"{"id":6,"op":"state"}"#);
    assert_eq!(state["id"], 6);
    assert_eq!(state["ok"]["endpoints"].as_array().unwrap().len(), 0, "{state}");
    assert_eq!(
        state["ok"]["tables_version"],
        ask(r#"{"id":7,"op":"state"}"#)["ok"]["tables_version"]
    );
    // Nothing was left in the node namespace by the failed adds.
    assert!(!node.ns.exec("ip -o link").contains("ocbad"));
}

#[test]
fn removing_an_endpoint_deletes_its_interface() {
    let node = DataplaneNode::start("oct-n", "192.0.2.14", "10.74.0.0/16", "");
    let a = node.add_pod("oct-a", "10.74.0.2");
    let state = sh(&format!(
        "{} state -o json --socket {}",
        bin("ocelot-dataplane").display(),
        node.socket().display()
    ));
    let v: Value = serde_json::from_str(&state).unwrap();
    let name = v["endpoints"][0]["spec"]["name"].as_str().expect("endpoint").to_string();
    sh(&format!(
        "{} endpoint remove --socket {} --name {name}",
        bin("ocelot-dataplane").display(),
        node.socket().display()
    ));
    assert!(!a.exec_out("ip link show eth0").status.success(), "eth0 still there");
    // Removing again is fine (idempotent).
    sh(&format!(
        "{} endpoint remove --socket {} --name {name}",
        bin("ocelot-dataplane").display(),
        node.socket().display()
    ));
}

#[path = "e2e/agent.rs"]
mod agent;

#[path = "e2e/lab.rs"]
mod lab;

#[path = "e2e/overlay.rs"]
mod overlay;

#[path = "e2e/netpol.rs"]
mod netpol;

#[path = "e2e/xdp.rs"]
mod xdp;

#[path = "e2e/nat.rs"]
mod nat;

#[path = "e2e/services.rs"]
mod services;

/// Two workers: ports are spread over them, and frames received by the
/// worker that does not own their flow are handed to the one that does.
#[test]
fn two_workers_hand_off_flows_and_forward() {
    let node = DataplaneNode::start("oct-n", "192.0.2.15", "10.75.0.0/16", "--cores 0,1");
    let a = node.add_pod("oct-a", "10.75.0.2");
    let b = node.add_pod("oct-b", "10.75.0.3");
    assert!(a.ping("10.75.0.3") && b.ping("10.75.0.2"));
    let tcp = iperf(&b, &a, "10.75.0.3", false);
    assert!(tcp > 100e6, "TCP over two workers only {tcp} bit/s");
    let c = node.counters();
    let workers = c["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|w| w["ports"].as_u64().unwrap_or(0) > 0), "ports not spread: {c}");
    let handed: u64 = workers.iter().map(|w| w["handoff_in"].as_u64().unwrap_or(0)).sum();
    assert!(handed > 0, "no frame was handed to its flow's owner: {c}");
}
