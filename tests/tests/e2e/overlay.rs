//! The overlay end to end (issue 4), on labs: pods on different nodes reach
//! each other in every mode an IP pool offers (VXLAN, IPIP, native routing,
//! and CrossSubnet over two underlay subnets), and the tunnel ports'
//! counters show which path the traffic took; a node set up the way Calico
//! programs Linux (a kernel `vxlan.calico`, then `tunl0`) interoperates in
//! both directions; packets too big for the tunnel get the ICMP error and
//! TCP settles on the tunnel's MSS; forged tunnel packets are dropped and
//! counted by reason.
//!
//! Each test builds its own lab (a second or so) and takes it down on drop;
//! whatever a test adds outside the lab (a kernel node, a stranger on the
//! fabric) is a toolkit `Netns`, deleted on drop too.

use ocelot_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// The Ocelot pods' pool in the labs built here.
const POOL: &str = "10.65.0.0/16";
/// Bytes of a bulk TCP transfer: thousands of full-size segments.
const BULK: u64 = 4_000_000;
/// The VXLAN MTU on the lab's 1500-byte underlay (1500 - 50).
const VXLAN_MTU: u32 = 1450;
/// The largest ICMP echo payload that fits it (1450 - 20 - 8).
const FITS_VXLAN: u32 = 1422;
/// The largest TCP MSS that fits it (1450 - 20 - 20).
const VXLAN_MSS: u64 = 1410;
/// How long the agents may take to notice a datastore change and program
/// their dataplane.
const CONVERGE: Duration = Duration::from_secs(10);

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples")
        .join(name)
        .display()
        .to_string()
}

/// An IP pool with Calico's encapsulation fields.
fn pool(name: &str, cidr: &str, vxlan: &str, ipip: &str, disabled: bool) -> String {
    format!(
        "---\napiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata: {{name: {name}}}\n\
         spec: {{cidr: {cidr}, blockSize: 26, vxlanMode: {vxlan}, ipipMode: {ipip}, disabled: {disabled}}}\n"
    )
}

fn node(name: &str) -> String {
    format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n")
}

/// Pod `ns/name` on `node`, served by the lab on 80/TCP and 81/UDP.
fn pod(key: &str, node: &str) -> String {
    let (ns, name) = key.split_once('/').expect("ns/name");
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n\
         \x20   - {{containerPort: 80, protocol: TCP}}\n\
         \x20   - {{containerPort: 81, protocol: UDP}}\n"
    )
}

/// Packets through one port of a node's dataplane. Tunnel ports exist only
/// while some route uses them; an absent port counts nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Traffic {
    rx_packets: u64,
    tx_packets: u64,
    rx_bytes: u64,
    tx_bytes: u64,
}

fn traffic(lab: &Lab, node: &str, port: &str) -> Traffic {
    let stats = lab.stats(node);
    let Some(p) = stats["ports"].as_array().expect("ports").iter().find(|p| p["name"] == port)
    else {
        return Traffic::default();
    };
    let n = |f: &str| p[f].as_u64().unwrap_or(0);
    Traffic {
        rx_packets: n("rx_packets"),
        tx_packets: n("tx_packets"),
        rx_bytes: n("rx_bytes"),
        tx_bytes: n("tx_bytes"),
    }
}

/// Drops of one port, by reason (empty when the port is absent).
fn port_drops(lab: &Lab, node: &str, port: &str) -> BTreeMap<String, u64> {
    let stats = lab.stats(node);
    stats["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port)
        .and_then(|p| p["drops"].as_object())
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// Drops for `reason` over all of a node's workers.
fn drops(lab: &Lab, node: &str, reason: &str) -> u64 {
    lab.stats(node)["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["drops"][reason].as_u64().unwrap_or(0))
        .sum()
}

/// Wait until `node`'s dataplane routes to every listed peer node, and only
/// with the given encapsulation (`vxlan`, `ipip` or `native`).
fn wait_overlay(lab: &Lab, node: &str, want: &[(&str, &str)]) {
    let mut last = Value::Null;
    let ok = wait_until(CONVERGE, || {
        last = lab.state(node)["overlay"].clone();
        let routes = last["spec"]["routes"].as_array().cloned().unwrap_or_default();
        want.iter().all(|(peer, encap)| {
            let to: Vec<&Value> = routes.iter().filter(|r| r["node"] == *peer).collect();
            !to.is_empty() && to.iter().all(|r| r["encap"] == *encap)
        })
    });
    assert!(ok, "{node}: the overlay never routed {want:?}; last: {last}");
}

/// Every pod reaches every pod, on 80/TCP and 81/UDP.
fn assert_all_reachable(lab: &Lab, what: &str) {
    for (port, proto) in [(80, "TCP"), (81, "UDP")] {
        let m = lab.probe(port, proto);
        let rows = m.as_object().expect("matrix");
        let failed: Vec<String> = rows
            .iter()
            .flat_map(|(from, cols)| {
                cols.as_object()
                    .expect("matrix row")
                    .iter()
                    .filter(|(_, ok)| **ok != Value::Bool(true))
                    .map(move |(to, _)| format!("{from} -> {to}"))
            })
            .collect();
        assert!(!rows.is_empty(), "{what}: nothing probed: {m}");
        assert!(failed.is_empty(), "{what}: {proto}/{port} not reached: {failed:?}\n{m}");
    }
}

/// `ping` from a namespace; the output when it gets no answer.
fn ping_from(netns: &str, ip: &str, args: &str) -> Result<(), String> {
    let out = sh_out(&format!("ip netns exec {netns} ping -c 2 -i 0.2 -W 1 {args} {ip}"));
    if out.status.success() {
        return Ok(());
    }
    Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn assert_ping(netns: &str, ip: &str, what: &str) {
    if let Err(out) = ping_from(netns, ip, "") {
        panic!("{what}: ping {ip} from {netns} failed:\n{out}");
    }
}

/// One TCP transfer on the port these tests use.
fn tcp_transfer(server: &str, client: &str, ip: &str, bytes: u64) -> u64 {
    ocelot_tests::tcp_transfer(server, client, ip, 5555, bytes)
}

/// iperf3 (a fixed 4 MiB) from `client` to `ip` in `server`: the MSS the
/// sender's connection settled on, and the bytes sent.
fn iperf_mss(server: &str, client: &str, ip: &str) -> (u64, u64) {
    const PORT: u16 = 5201;
    let dir = TempDir::new("ocelot-iperf-");
    let _server =
        spawn_in(server, &format!("timeout 60 iperf3 -s -1 -p {PORT}"), &dir.0.join("srv.log"));
    wait_listening(server, PORT);
    let out = sh(&format!(
        "ip netns exec {client} timeout 60 iperf3 -c {ip} -p {PORT} -n 4M -J --connect-timeout 3000"
    ));
    let v: Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let mss = v["start"]["tcp_mss_default"].as_u64().unwrap_or_else(|| panic!("no MSS in {v}"));
    (mss, v["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0))
}

/// Wait until each of the given nodes' dataplane has an overlay that lists
/// all the others: their agents have connected and computed it.
fn wait_nodes_known(lab: &Lab, nodes: &[&str]) {
    for me in nodes {
        let mut last = Value::Null;
        let ok = wait_until(CONVERGE, || {
            last = lab.state(me)["overlay"]["spec"]["nodes"].clone();
            let Some(list) = last.as_array() else { return false };
            let known: Vec<&str> = list.iter().filter_map(|n| n["name"].as_str()).collect();
            nodes.iter().filter(|n| *n != me).all(|n| known.contains(n))
        });
        assert!(ok, "{me} never learnt the other nodes: {last}");
    }
}

/// Two nodes, pods x/a and x/c on node-1 and x/b on node-2; the pool is
/// switched live (`lab apply`) from VXLAN to IPIP to native routing. In
/// each mode: every pair connects over TCP and UDP, pods ping across
/// nodes and reach the other node's own address, 4 MB of TCP cross, and the
/// counters show the path: the tunnel port carried it (both nodes, both
/// directions), or, natively, no tunnel port did and the pod's traffic left
/// through the node's kernel, which has a route to the peer's block.
#[test]
fn two_nodes_talk_in_every_mode() {
    let yaml = [
        pool("pods", POOL, "Always", "Never", false),
        node("node-1"),
        node("node-2"),
        pod("x/a", "node-1"),
        pod("x/c", "node-1"),
        pod("x/b", "node-2"),
    ]
    .concat();
    let lab = Lab::up_yaml(&yaml);
    let (a, b) = (lab.pod_ip("x/a"), lab.pod_ip("x/b"));
    let (n1, n2) = (lab.node_ip("node-1"), lab.node_ip("node-2"));
    let (pod_a, pod_b) = (lab.pod_netns("x/a"), lab.pod_netns("x/b"));
    for (vxlan, ipip, tunnel) in [
        ("Always", "Never", Some("vxlan")),
        ("Never", "Always", Some("ipip")),
        ("Never", "Never", None),
    ] {
        let mode = tunnel.unwrap_or("native");
        lab.apply(&pool("pods", POOL, vxlan, ipip, false));
        wait_overlay(&lab, "node-1", &[("node-2", mode)]);
        wait_overlay(&lab, "node-2", &[("node-1", mode)]);
        let snapshot =
            |node: &str| ["vxlan", "ipip", "ocelot0"].map(|port| (port, traffic(&lab, node, port)));
        let before = [snapshot("node-1"), snapshot("node-2")];

        assert_all_reachable(&lab, mode);
        assert_ping(&pod_a, &b, mode);
        assert_ping(&pod_b, &a, mode);
        assert_ping(&pod_a, &n2, &format!("{mode}: pod to the other node"));
        assert_ping(&pod_b, &n1, &format!("{mode}: pod to the other node"));
        let got = tcp_transfer(&pod_b, &pod_a, &b, BULK);
        assert_eq!(got, BULK, "{mode}: TCP x/a -> x/b lost bytes");

        let after = [snapshot("node-1"), snapshot("node-2")];
        for (i, node) in ["node-1", "node-2"].iter().enumerate() {
            for ((port, t0), (_, t1)) in before[i].iter().zip(after[i].iter()) {
                let grew = t1.tx_packets > t0.tx_packets && t1.rx_packets > t0.rx_packets;
                let moved = t1.tx_packets != t0.tx_packets || t1.rx_packets != t0.rx_packets;
                if Some(*port) == tunnel {
                    assert!(grew, "{mode}: {node}'s {port} port carried nothing: {t0:?} -> {t1:?}");
                } else if *port != "ocelot0" {
                    assert!(!moved, "{mode}: {node}'s {port} port was used: {t0:?} -> {t1:?}");
                }
            }
        }
        // The bulk itself left node-1 the expected way: through the tunnel
        // port, or natively through the node's kernel (the host port).
        let bulk_port = tunnel.unwrap_or("ocelot0");
        let of = |snap: &[(&str, Traffic); 3]| {
            snap.iter().find(|(p, _)| *p == bulk_port).map(|(_, t)| *t).unwrap_or_default()
        };
        let (t0, t1) = (of(&before[0]), of(&after[0]));
        assert!(
            t1.tx_bytes - t0.tx_bytes >= BULK,
            "{mode}: node-1's {bulk_port} sent only {} bytes of the {BULK}-byte transfer",
            t1.tx_bytes - t0.tx_bytes
        );
        let routes = lab.node_exec("node-1", "ip -4 route show");
        let kernel_route = routes.lines().any(|l| l.contains(&format!("via {n2} ")));
        assert_eq!(
            kernel_route,
            tunnel.is_none(),
            "{mode}: node-1's kernel route via node-2 ({n2}) present = {kernel_route}:\n{routes}"
        );
    }
}

/// The CrossSubnet example: node-1 and node-2 on subnet 0, node-3 on
/// subnet 1, pool `vxlanMode: CrossSubnet`. Every pair connects; node-1 to
/// node-2 is routed natively (the vxlan ports of both stay untouched),
/// node-1 to node-3 goes through VXLAN.
#[test]
fn cross_subnet_encapsulates_only_between_subnets() {
    let lab = Lab::up(&example("lab-crosssubnet.yaml"));
    wait_overlay(&lab, "node-1", &[("node-2", "native"), ("node-3", "vxlan")]);
    wait_overlay(&lab, "node-2", &[("node-1", "native"), ("node-3", "vxlan")]);
    wait_overlay(&lab, "node-3", &[("node-1", "vxlan"), ("node-2", "vxlan")]);
    assert_all_reachable(&lab, "CrossSubnet");
    let (b, c) = (lab.pod_ip("x/b"), lab.pod_ip("x/c"));
    let pod_a = lab.pod_netns("x/a");

    let vx = |node: &str| traffic(&lab, node, "vxlan");
    let (n1, n2) = (vx("node-1"), vx("node-2"));
    assert_ping(&pod_a, &b, "same subnet");
    assert_eq!(tcp_transfer(&lab.pod_netns("x/b"), &pod_a, &b, BULK), BULK);
    assert_eq!(vx("node-1"), n1, "node-1 -> node-2 went through node-1's vxlan port");
    assert_eq!(vx("node-2"), n2, "node-1 -> node-2 went through node-2's vxlan port");
    let n2_ip = lab.node_ip("node-2");
    let routes = lab.node_exec("node-1", "ip -4 route show");
    assert!(routes.contains(&format!("via {n2_ip} ")), "no kernel route via node-2:\n{routes}");

    let (n1, n3) = (vx("node-1"), vx("node-3"));
    assert_ping(&pod_a, &c, "across subnets");
    let (m1, m3) = (vx("node-1"), vx("node-3"));
    assert!(m1.tx_packets > n1.tx_packets, "node-1 -> node-3 did not leave by VXLAN");
    assert!(m1.rx_packets > n1.rx_packets, "node-3 -> node-1 did not arrive by VXLAN");
    assert!(m3.rx_packets > n3.rx_packets && m3.tx_packets > n3.tx_packets, "{n3:?} -> {m3:?}");
}

/// The Calico-style node: its address on the lab's fabric, its podCIDR,
/// its one pod, and its VTEP MAC.
const KERNEL_IP: &str = "192.0.2.50";
const KERNEL_POD_CIDR: &str = "10.66.0.0/24";
const KERNEL_POOL: &str = "10.66.0.0/16";
const KERNEL_POD: &str = "10.66.0.2";
const KERNEL_VTEP_MAC: &str = "66:cc:00:00:00:50";

/// Stands in for the kernel's `tunl0` when the kernel has no IPIP: a TUN
/// device of that name, and a raw protocol-4 socket carrying what it routes
/// to one peer (the kernel adds the outer header) and delivering what
/// arrives, stripped of it.
const IPIP_STAND_IN: &str = r#"
import fcntl, os, select, socket, struct, sys
name, local, peer, ready = sys.argv[1:5]
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
raw.bind((local, 0))
open(ready, "w").close()
while True:
    r, _, _ = select.select([tun, raw], [], [])
    if raw in r:
        pkt, _ = raw.recvfrom(65535)
        os.write(tun, pkt[(pkt[0] & 15) * 4:])
    if tun in r:
        pkt = os.read(tun, 65535)
        if pkt and pkt[0] >> 4 == 4:
            raw.sendto(pkt, (peer, 0))
"#;

/// A node set up the way Calico programs Linux, with no Ocelot process on
/// it: a namespace on the lab's fabric bridge, a pod behind a veth (its
/// /32, default via 169.254.1.1 onlink; proxy ARP and a /32 route on the
/// node side; forwarding on) and the kernel VXLAN device `vxlan.calico`
/// (VNI 4096, port 4789, MTU 1450, a fixed MAC, no learning).
struct KernelNode {
    /// The IPIP stand-in, when the kernel has no `tunl0`.
    ipip: Option<Proc>,
    pod: Netns,
    ns: Netns,
    dir: TempDir,
}

impl KernelNode {
    fn attach(lab: &Lab) -> KernelNode {
        let ns = Netns::new("ock");
        let pod = Netns::new("ockp");
        let dir = TempDir::new("ocelot-kernel-node-");
        // No IPv6 chatter on the tunnels.
        for n in [&ns, &pod] {
            n.exec(
                "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
            );
        }
        let fabric = lab.fabric_netns();
        let port = unique("ock");
        ns.exec(&format!("ip link add uplink type veth peer name {port} netns {fabric}"));
        sh(&format!("ip -n {fabric} link set {port} master ocl-br0 up"));
        ns.exec(&format!("ip addr add {KERNEL_IP}/24 dev uplink"));
        ns.exec("ip link set uplink up");
        ns.exec("ip route add default via 192.0.2.1 dev uplink");
        ns.exec("sysctl -qw net.ipv4.ip_forward=1");
        ns.exec(&format!(
            "ip link add vxlan.calico type vxlan id 4096 dstport 4789 local {KERNEL_IP} dev uplink nolearning"
        ));
        ns.exec(&format!("ip link set vxlan.calico mtu 1450 address {KERNEL_VTEP_MAC} up"));
        ns.exec(&format!("ip link add cali0 type veth peer name eth0 netns {}", pod.name));
        ns.exec("ip link set cali0 up");
        ns.exec("sysctl -qw net.ipv4.conf.cali0.proxy_arp=1 net.ipv4.neigh.cali0.proxy_delay=0");
        ns.exec(&format!("ip route add {KERNEL_POD}/32 dev cali0"));
        pod.exec(&format!("ip addr add {KERNEL_POD}/32 dev eth0"));
        pod.exec("ip link set eth0 mtu 1450 up");
        pod.exec("ip route add 169.254.1.1 dev eth0 scope link");
        pod.exec("ip route add default via 169.254.1.1 dev eth0 onlink");
        KernelNode { ipip: None, pod, ns, dir }
    }

    /// Route `pool` to an Ocelot node through `vxlan.calico`, as Felix
    /// does: via an address onlink, that address's neighbour entry the
    /// node's VTEP MAC, and the MAC's FDB entry the node's address.
    fn vxlan_to(&self, pool: &str, node_ip: &str, vtep_mac: &str) {
        self.ns.exec(&format!("ip route replace {pool} via {node_ip} dev vxlan.calico onlink"));
        self.ns.exec(&format!(
            "ip neigh replace {node_ip} lladdr {vtep_mac} dev vxlan.calico nud permanent"
        ));
        self.ns.exec(&format!("bridge fdb replace {vtep_mac} dev vxlan.calico dst {node_ip}"));
    }

    /// Route `pool` to an Ocelot node through `tunl0`, as Felix does. When
    /// this kernel has no IPIP (`tunl0` neither present nor loadable), a
    /// userspace stand-in takes its place (noted on stderr).
    fn ipip_to(&mut self, pool: &str, node_ip: &str) {
        if !self.has_tunl0() {
            let _ = sh_out("modprobe ipip");
        }
        if !self.has_tunl0() {
            eprintln!(
                "note: this kernel has no IPIP (no tunl0, ipip not loadable); \
                 a userspace tunl0 (TUN + raw protocol-4 socket) stands in"
            );
            let script = self.dir.0.join("ipip.py");
            std::fs::write(&script, IPIP_STAND_IN).expect("write the IPIP stand-in");
            let ready = self.dir.0.join("ipip.ready");
            self.ipip = Some(self.ns.spawn(
                &format!(
                    "python3 {} tunl0 {KERNEL_IP} {node_ip} {}",
                    script.display(),
                    ready.display()
                ),
                &self.dir.0.join("ipip.log"),
            ));
            let up = wait_until(Duration::from_secs(5), || ready.exists());
            let log = self.ipip.as_ref().map(Proc::log_text).unwrap_or_default();
            assert!(up, "the IPIP stand-in did not start:\n{log}");
        }
        self.ns.exec("ip link set tunl0 mtu 1480 up");
        self.ns.exec(&format!("ip route replace {pool} via {node_ip} dev tunl0 onlink"));
    }

    fn has_tunl0(&self) -> bool {
        self.ns.exec_out("ip link show tunl0").status.success()
    }

    /// Make the node known to Ocelot the way a cluster would: its Node
    /// object (InternalIP, podCIDR, VTEP MAC) in the lab's datastore, next
    /// to the lab's own (the lab starts processes for the Nodes it is
    /// given; this one runs none).
    fn publish(&self, lab: &Lab) {
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: kernel-1\n  annotations: \
             {{ocelot.dev/vxlan-tunnel-mac: \"{KERNEL_VTEP_MAC}\"}}\nspec: {{podCIDR: {KERNEL_POD_CIDR}}}\n\
             status:\n  addresses: [{{type: InternalIP, address: {KERNEL_IP}}}]\n"
        );
        let ds = lab.datastore();
        let tmp = ds.join(".node-kernel-1.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write the kernel node");
        std::fs::rename(&tmp, ds.join("node-kernel-1.yaml")).expect("publish the kernel node");
    }
}

/// A one-node lab (x/a on node-1, pool 10.65.0.0/16 over VXLAN) and a
/// Calico-style kernel node on its fabric, routed to each other over VXLAN.
fn lab_with_kernel_node() -> (Lab, KernelNode) {
    let yaml = [pool("pods", POOL, "Always", "Never", false), node("node-1"), pod("x/a", "node-1")]
        .concat();
    let lab = Lab::up_yaml(&yaml);
    wait_nodes_known(&lab, &["node-1"]);
    let vtep = lab.state("node-1")["overlay"]["spec"]["vtep_mac"]
        .as_str()
        .expect("node-1's VTEP MAC")
        .to_string();
    let k = KernelNode::attach(&lab);
    k.vxlan_to(POOL, &lab.node_ip("node-1"), &vtep);
    k.publish(&lab);
    // The kernel node's pool: its encapsulation, never allocated from.
    lab.apply(&pool("kernel-pods", KERNEL_POOL, "Always", "Never", true));
    wait_overlay(&lab, "node-1", &[("kernel-1", "vxlan")]);
    (lab, k)
}

/// A counter of `nstat` (e.g. `TcpInCsumErrors`) in a namespace.
fn nstat(netns: &str, name: &str) -> u64 {
    let out = sh(&format!("ip netns exec {netns} nstat -az {name}"));
    out.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the lab's server in a pod answers on `port`: over TCP without
/// sending anything (data left unread when the server closes would turn its
/// FIN into a reset that can overtake the answer), over UDP to a datagram.
fn ask(netns: &str, ip: &str, port: u16, udp: bool) -> String {
    let nc = if udp {
        format!("echo hi | timeout 5 nc -u -w 1 {ip} {port}")
    } else {
        format!("timeout 5 nc -d -w 2 {ip} {port}")
    };
    let out = sh_out(&format!("ip netns exec {netns} sh -c '{nc}'"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Ping both ways, the lab's server answering the kernel pod over TCP and
/// UDP, and 1 MB over TCP each way.
fn assert_interop(lab: &Lab, k: &KernelNode, what: &str) {
    let a = lab.pod_ip("x/a");
    let pod_a = lab.pod_netns("x/a");
    assert_ping(&pod_a, KERNEL_POD, &format!("{what}: Ocelot pod -> kernel pod"));
    assert_ping(&k.pod.name, &a, &format!("{what}: kernel pod -> Ocelot pod"));
    assert_eq!(ask(&k.pod.name, &a, 80, false), "x/a", "{what}: TCP kernel pod -> x/a:80");
    assert_eq!(ask(&k.pod.name, &a, 81, true), "x/a", "{what}: UDP kernel pod -> x/a:81");
    let mb = 1_000_000;
    assert_eq!(tcp_transfer(&k.pod.name, &pod_a, KERNEL_POD, mb), mb, "{what}: Ocelot -> kernel");
    assert_eq!(tcp_transfer(&pod_a, &k.pod.name, &a, mb), mb, "{what}: kernel -> Ocelot");
}

/// Interop with a node programmed the way Calico programs Linux (the
/// kernel is the reference): over VXLAN (VNI 4096, port 4789, static
/// neighbour and FDB entries), then over IPIP (`tunl0`), pods on both sides
/// ping each other and connect over TCP and UDP in both directions.
///
/// `vxlan.calico` computes inner checksums here (`tx-checksum-ip-generic
/// off`, as Felix sets it where it detects broken checksum offload): with
/// the kernel default the inner TCP/UDP checksums stay unfinished on a veth
/// underlay, which the next test covers.
#[test]
fn calico_style_kernel_node_interop_vxlan_then_ipip() {
    let (lab, mut k) = lab_with_kernel_node();
    k.ns.exec("ethtool -K vxlan.calico tx-checksum-ip-generic off");
    assert_interop(&lab, &k, "VXLAN");

    let n1 = lab.node_ip("node-1");
    k.ipip_to(POOL, &n1);
    lab.apply(
        &[
            pool("kernel-pods", KERNEL_POOL, "Never", "Always", true),
            pool("pods", POOL, "Never", "Always", false),
        ]
        .concat(),
    );
    wait_overlay(&lab, "node-1", &[("kernel-1", "ipip")]);
    let before = traffic(&lab, "node-1", "ipip");
    assert_interop(&lab, &k, "IPIP");
    let after = traffic(&lab, "node-1", "ipip");
    assert!(
        after.rx_packets > before.rx_packets && after.tx_packets > before.tx_packets,
        "IPIP: node-1's ipip port carried nothing: {before:?} -> {after:?}"
    );
}

/// A kernel VXLAN peer with its default checksum offload: over a virtual
/// underlay such as the lab's veths, the inner TCP/UDP checksum of what it
/// sends is still partial when it arrives (the kernel carries "checksum
/// pending" beside the packet, and a UDP socket delivers the bytes as they
/// are). A kernel VXLAN receiver keeps that state; a pod behind Ocelot
/// must get the packet with a checksum it accepts too.
#[test]
fn kernel_vxlan_peer_with_checksum_offload_reaches_pods() {
    let (lab, k) = lab_with_kernel_node();
    let a = lab.pod_ip("x/a");
    let pod_a = lab.pod_netns("x/a");
    assert_ping(&k.pod.name, &a, "kernel pod -> Ocelot pod");
    let tcp0 = nstat(&pod_a, "TcpInCsumErrors");
    let udp0 = nstat(&pod_a, "UdpInCsumErrors");
    let tcp = ask(&k.pod.name, &a, 80, false);
    let udp = ask(&k.pod.name, &a, 81, true);
    let (tcp1, udp1) = (nstat(&pod_a, "TcpInCsumErrors"), nstat(&pod_a, "UdpInCsumErrors"));
    assert!(
        tcp == "x/a" && udp == "x/a",
        "the kernel pod's TCP/UDP did not reach x/a through Ocelot's VXLAN (TCP answered {tcp:?}, \
         UDP {udp:?}); x/a's kernel counted checksum errors: TCP {tcp0} -> {tcp1}, UDP {udp0} -> {udp1}: \
         the decapsulated packets kept the sender's unfinished inner checksum"
    );
}

/// Across VXLAN: pods get MTU 1450 and a DF ping of 1450 bytes crosses;
/// from a node's own namespace (MTU 1500) a 1500-byte DF ping gets
/// "fragmentation needed, mtu 1450" from the dataplane (counted as
/// too_big) rather than vanishing, and then 1450 crosses; TCP between pods
/// uses an MSS within 1410; and a TCP sender that was promised MSS 1460
/// learns the tunnel MTU from the dataplane's ICMP and completes 4 MB.
#[test]
fn vxlan_mtu_too_big_gets_icmp_and_tcp_settles() {
    // Nodes first, pods once both agents have their overlay: a pod added
    // before its agent reached the dataplane gets MTU 1500 (see
    // `Agent::auto_mtu`), which is not what this test is about.
    let lab = Lab::up_yaml(
        &[pool("pods", POOL, "Always", "Never", false), node("node-1"), node("node-2")].concat(),
    );
    wait_nodes_known(&lab, &["node-1", "node-2"]);
    lab.apply(&[pod("x/a", "node-1"), pod("x/b", "node-2")].concat());
    wait_overlay(&lab, "node-1", &[("node-2", "vxlan")]);
    wait_overlay(&lab, "node-2", &[("node-1", "vxlan")]);
    let (a, b) = (lab.pod_ip("x/a"), lab.pod_ip("x/b"));
    let (pod_a, pod_b) = (lab.pod_netns("x/a"), lab.pod_netns("x/b"));
    for p in [&pod_a, &pod_b] {
        let mtu = sh(&format!("ip netns exec {p} cat /sys/class/net/eth0/mtu"));
        assert_eq!(mtu.trim(), VXLAN_MTU.to_string(), "{p}: eth0's MTU");
    }
    let df = |n: u32| format!("-M do -s {n}");
    for (from, to) in [(&pod_a, &b), (&pod_b, &a)] {
        if let Err(out) = ping_from(from, to, &df(FITS_VXLAN)) {
            panic!("{from}: a {VXLAN_MTU}-byte DF ping to {to} did not cross:\n{out}");
        }
    }

    // The node's own stack: ocelot0 has MTU 1500.
    let node1 = lab.node_netns("node-1");
    lab.node_exec("node-1", "ip route flush cache");
    let too_big = drops(&lab, "node-1", "too_big");
    let out = lab.node_exec_out("node-1", &format!("ping -c 1 -W 1 {} {b}", df(1472)));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "1500 bytes with DF crossed a 1450-byte tunnel:\n{text}");
    assert!(
        text.contains("mtu = 1450") || text.contains("mtu=1450"),
        "no fragmentation-needed with mtu 1450:\n{text}"
    );
    let grew = drops(&lab, "node-1", "too_big");
    assert!(grew > too_big, "too_big did not count: {too_big} -> {grew}");
    if let Err(out) = ping_from(&node1, &b, &df(FITS_VXLAN)) {
        panic!("after the ICMP error, {VXLAN_MTU} bytes with DF did not cross:\n{out}");
    }

    // TCP between pods: the MSS fits the tunnel and 4 MiB arrive.
    let (mss, sent) = iperf_mss(&pod_b, &pod_a, &b);
    assert!(mss <= VXLAN_MSS, "x/a -> x/b: MSS {mss} does not fit the tunnel");
    assert_eq!(sent, 4 << 20, "iperf3 did not send its 4 MiB");

    // A sender told MSS 1460 (x/a advertises it to node-2's address) sends
    // full 1500-byte segments, as GSO frames: the dataplane must answer
    // with the tunnel MTU and TCP must settle and complete.
    let n2 = lab.node_ip("node-2");
    lab.pod_exec(
        "x/a",
        &format!("ip route add {n2}/32 via 169.254.1.1 dev eth0 onlink advmss 1460"),
    );
    lab.node_exec("node-2", "ip route flush cache");
    let too_big = drops(&lab, "node-2", "too_big");
    let got = tcp_transfer(&pod_a, &lab.node_netns("node-2"), &a, BULK);
    assert_eq!(got, BULK, "node-2 -> x/a lost bytes");
    let grew = drops(&lab, "node-2", "too_big");
    assert!(grew > too_big, "node-2 never got fragmentation-needed: {too_big} -> {grew}");
    let route = lab.node_exec("node-2", &format!("ip route get {a}"));
    assert!(route.contains("mtu 1450"), "node-2 did not learn the tunnel MTU:\n{route}");
}

/// The Internet checksum.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 =
        b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|x| u8::from_str_radix(x, 16).expect("MAC")).collect();
    v.try_into().expect("6-byte MAC")
}

/// A VXLAN header: `flags` (0x08 is the I flag) and the VNI.
fn vxlan_header(flags: u8, vni: u32) -> Vec<u8> {
    let mut h = vec![flags, 0, 0, 0];
    h.extend_from_slice(&(vni << 8).to_be_bytes());
    h
}

/// An Ethernet frame to `dst_mac` holding an ICMP echo request `src` -> `dst`.
fn echo_frame(dst_mac: [u8; 6], src: &str, dst: &str) -> Vec<u8> {
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut icmp = vec![8, 0, 0, 0, 0x4f, 0x43, 0, 1];
    icmp.extend_from_slice(b"forged by ocelot e2e");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&mac("02:00:00:00:0f:0f"));
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Crafted datagrams to node-1's VXLAN port: from node-2's address (a
/// known node) with a wrong VNI, the I flag clear, a 3-byte header, a
/// truncated inner frame, an inner MAC that is not node-1's VTEP, inner
/// destinations that are no pod of node-1 (8.8.8.8, a node-2 pod); and a
/// well-formed one from an address on the fabric that is no node. Each is
/// dropped with its reason counted exactly once on node-1's vxlan port,
/// nothing is relayed or answered, and the pods still talk afterwards. A
/// well-formed one from node-2 to x/a, first, shows the crafting is right:
/// it is delivered and x/a answers through the tunnel.
#[test]
fn forged_tunnel_packets_are_dropped_and_counted() {
    let lab = Lab::up(&example("lab-overlay.yaml"));
    wait_overlay(&lab, "node-1", &[("node-2", "vxlan")]);
    wait_overlay(&lab, "node-2", &[("node-1", "vxlan")]);
    let (a, b) = (lab.pod_ip("x/a"), lab.pod_ip("x/b"));
    let (n1, n2) = (lab.node_ip("node-1"), lab.node_ip("node-2"));
    let overlay = lab.state("node-1")["overlay"]["spec"].clone();
    let vtep = mac(overlay["vtep_mac"].as_str().expect("VTEP MAC"));
    let vni = overlay["vni"].as_u64().expect("VNI") as u32;

    // A stranger on the fabric: an address that is no node.
    let stranger = Netns::new("ocf");
    let port = unique("ocf");
    stranger.exec(&format!(
        "ip link add uplink type veth peer name {port} netns {}",
        lab.fabric_netns()
    ));
    sh(&format!("ip -n {} link set {port} master ocl-br0 up", lab.fabric_netns()));
    stranger.exec("ip addr add 192.0.2.77/24 dev uplink");
    stranger.exec("ip link set uplink up");

    let dir = TempDir::new("ocelot-forge-");
    let send = |from: &str, src_ip: &str, bytes: &[u8]| {
        let f = dir.0.join(unique("dgram-"));
        std::fs::write(&f, bytes).expect("write datagram");
        sh(&format!("ip netns exec {from} nc -u -w0 -s {src_ip} {n1} 4789 < {}", f.display()));
    };
    let node2 = lab.node_netns("node-2");
    let good = [vxlan_header(0x08, vni), echo_frame(vtep, &b, &a)].concat();

    // The control: delivered, and x/a's echo reply leaves by VXLAN.
    let t0 = traffic(&lab, "node-1", "vxlan");
    let d0 = port_drops(&lab, "node-1", "vxlan");
    send(node2.as_str(), &n2, &good);
    let ok = wait_until(Duration::from_secs(3), || {
        traffic(&lab, "node-1", "vxlan").tx_packets > t0.tx_packets
    });
    assert!(
        ok,
        "a well-formed packet from node-2 was not answered: {:?}",
        port_drops(&lab, "node-1", "vxlan")
    );
    assert_eq!(port_drops(&lab, "node-1", "vxlan"), d0, "the well-formed packet was dropped");

    let header = vxlan_header(0x08, vni);
    let (node2, stranger_ns) = (node2.as_str(), stranger.name.as_str());
    let cases: Vec<(&str, &str, &str, Vec<u8>, &str)> = vec![
        (
            "wrong VNI",
            node2,
            &n2,
            [vxlan_header(0x08, vni + 1), echo_frame(vtep, &b, &a)].concat(),
            "tunnel_wrong_vni",
        ),
        (
            "I flag clear",
            node2,
            &n2,
            [vxlan_header(0, vni), echo_frame(vtep, &b, &a)].concat(),
            "tunnel_malformed",
        ),
        ("3 bytes", node2, &n2, header[..3].to_vec(), "tunnel_malformed"),
        (
            "inner frame truncated",
            node2,
            &n2,
            [header.clone(), echo_frame(vtep, &b, &a)[..10].to_vec()].concat(),
            "tunnel_malformed",
        ),
        (
            "inner MAC not our VTEP",
            node2,
            &n2,
            [header.clone(), echo_frame(mac("02:00:00:00:0e:0e"), &b, &a)].concat(),
            "not_for_us",
        ),
        (
            "inner destination 8.8.8.8",
            node2,
            &n2,
            [header.clone(), echo_frame(vtep, &b, "8.8.8.8")].concat(),
            "tunnel_not_local",
        ),
        (
            "inner destination a node-2 pod",
            node2,
            &n2,
            [header.clone(), echo_frame(vtep, &a, &b)].concat(),
            "tunnel_not_local",
        ),
        ("from an unknown node", stranger_ns, "192.0.2.77", good.clone(), "tunnel_unknown_peer"),
    ];
    let t0 = traffic(&lab, "node-1", "vxlan");
    for (what, from, src_ip, bytes, reason) in &cases {
        let before = port_drops(&lab, "node-1", "vxlan");
        let rx = traffic(&lab, "node-1", "vxlan").rx_packets;
        send(from, src_ip, bytes);
        // Received (so it reached the pipeline), then counted.
        let seen = wait_until(Duration::from_secs(3), || {
            traffic(&lab, "node-1", "vxlan").rx_packets > rx
                && port_drops(&lab, "node-1", "vxlan").get(*reason) != before.get(*reason)
        });
        let after = port_drops(&lab, "node-1", "vxlan");
        assert!(seen, "{what}: {reason} did not count: {before:?} -> {after:?}");
        let mut want = before.clone();
        *want.entry(reason.to_string()).or_default() += 1;
        assert_eq!(after, want, "{what}: expected exactly one {reason}");
    }
    // Nothing was relayed, nor answered (an answer to x/b would leave by VXLAN).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        traffic(&lab, "node-1", "vxlan").tx_packets,
        t0.tx_packets,
        "a forged packet got through"
    );

    assert_all_reachable(&lab, "after the forged packets");
    assert_ping(&lab.pod_netns("x/a"), &b, "after the forged packets");
    assert_ping(&lab.pod_netns("x/b"), &a, "after the forged packets");
}
