//! Services and natOutgoing through the dataplane, with real TCP and UDP
//! between pod namespaces: a `set_services` request sent straight to a
//! node's dataplane, then ClusterIP traffic to every backend, refusals for
//! a Service without backends, hairpin, ClusterIP from the node itself, a
//! restart keeping the Services, and natOutgoing to a server outside the
//! pools that sees the node's address. (The agent's side and the full lab
//! tests are services-control's.)

use ocelot_dataplane::api::client::Client;
use ocelot_dataplane::api::{
    Backend, ErrorCode, Frontend, FrontendKind, NatOutgoingSpec, Reply, Request, ServiceSpec,
    ServicesSpec,
};
use ocelot_dataplane::policy::Proto;
use ocelot_tests::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn call(node: &DataplaneNode, spec: ServicesSpec) -> Result<Reply, ErrorCode> {
    let mut c = Client::connect(&node.socket(), "nat-test").expect("connect");
    c.call(Request::SetServices { services: spec })
        .map_err(|e| e.code().unwrap_or_else(|| panic!("set_services failed without a code: {e}")))
}

fn backend(ip: &str, port: u16) -> Backend {
    Backend {
        addr: ip.parse().unwrap(),
        port,
        local: true,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn service(name: &str, proto: Proto, vip: &str, port: u16, backends: Vec<Backend>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        proto,
        frontends: vec![Frontend {
            addr: vip.parse().unwrap(),
            port,
            kind: FrontendKind::ClusterIp,
        }],
        backends,
        affinity_timeout_s: 0,
        external_local: false,
        internal_local: false,
    }
}

/// TCP and UDP servers on `port` in `pod` that answer with `name`.
fn serve(pod: &Netns, name: &str, port: u16, dir: &TempDir) -> (Proc, Proc) {
    let tcp = pod.spawn(
        &format!("socat TCP-LISTEN:{port},fork,reuseaddr SYSTEM:'echo {name}'"),
        &dir.0.join(format!("{name}-tcp.log")),
    );
    // One socket answering every datagram (socat's forking UDP server
    // loses datagrams that arrive while it forks).
    let udp = pod.spawn(
        &format!(
            "/usr/bin/python3 -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('',{port}))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(b'{name}',a)\""
        ),
        &dir.0.join(format!("{name}-udp.log")),
    );
    wait_listening(&pod.name, port);
    std::thread::sleep(Duration::from_millis(200));
    (tcp, udp)
}

/// What a TCP connection from `from` to `addr`:`port` is answered with.
fn ask_tcp(from: &Netns, addr: &str, port: u16) -> Result<String, String> {
    let o = from.exec_out(&format!("socat -T2 - TCP:{addr}:{port},connect-timeout=3 </dev/null"));
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

fn ask_udp(from: &Netns, addr: &str, port: u16) -> Result<String, String> {
    let o = from.exec_out(&format!("sh -c 'echo q | socat -t2 -T2 - UDP:{addr}:{port}'"));
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if o.status.success() && !out.is_empty() {
        Ok(out)
    } else {
        Err(format!("{} {}", o.status, String::from_utf8_lossy(&o.stderr).trim()))
    }
}

fn drops(c: &Value, reason: &str) -> u64 {
    c["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["drops"][reason].as_u64().unwrap_or(0))
        .sum()
}

const VIP: &str = "10.96.7.10";
const EMPTY_VIP: &str = "10.96.7.11";

fn cluster_spec(b: &str, c: &str) -> ServicesSpec {
    ServicesSpec {
        services: vec![
            service("x/web:tcp", Proto::Tcp, VIP, 80, vec![backend(b, 8080), backend(c, 8080)]),
            service("x/web:udp", Proto::Udp, VIP, 53, vec![backend(b, 8080), backend(c, 8080)]),
            service("x/empty:tcp", Proto::Tcp, EMPTY_VIP, 80, vec![]),
            service("x/empty:udp", Proto::Udp, EMPTY_VIP, 53, vec![]),
        ],
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..Default::default()
    }
}

#[test]
fn cluster_ip_reaches_every_backend_and_refuses_without_one() {
    let node = DataplaneNode::start("octs-n", "192.0.2.31", "10.71.0.0/16", "");
    let a = node.add_pod("octs-a", "10.71.0.2");
    let b = node.add_pod("octs-b", "10.71.0.3");
    let c = node.add_pod("octs-c", "10.71.0.4");
    let dir = TempDir::new("ocelot-nat-");
    let _sb = serve(&b, "b", 8080, &dir);
    let _sc = serve(&c, "c", 8080, &dir);
    let reply = call(&node, cluster_spec("10.71.0.3", "10.71.0.4")).expect("set_services");
    let Reply::Services { services, .. } = reply else { panic!("{reply:?}") };
    assert_eq!((services.services, services.frontends, services.backends), (4, 4, 4));

    // TCP and UDP to the cluster IP reach both backends.
    let mut tcp = BTreeSet::new();
    let mut udp = BTreeSet::new();
    for _ in 0..24 {
        tcp.insert(ask_tcp(&a, VIP, 80).expect("TCP to the cluster IP"));
        udp.insert(ask_udp(&a, VIP, 53).expect("UDP to the cluster IP"));
    }
    let both: BTreeSet<String> = ["b".to_string(), "c".to_string()].into();
    assert_eq!(tcp, both, "TCP answers");
    assert_eq!(udp, both, "UDP answers");

    // From the node itself, through the route into the dataplane.
    let from_node = ask_tcp(&node.ns, VIP, 80).expect("node to the cluster IP");
    assert!(both.contains(&from_node), "{from_node}");

    // No backend: refused at once, not a timeout.
    let before = drops(&node.counters(), "service_no_backend");
    let t = Instant::now();
    let e = ask_tcp(&a, EMPTY_VIP, 80).expect_err("TCP to a Service without backends");
    assert!(e.contains("refused"), "{e}");
    let e = ask_udp(&a, EMPTY_VIP, 53).expect_err("UDP to a Service without backends");
    assert!(e.contains("refused"), "{e}");
    assert!(t.elapsed() < Duration::from_millis(1500), "refusals took {:?}", t.elapsed());
    assert!(drops(&node.counters(), "service_no_backend") >= before + 2);

    // The state says what is in use.
    let st: Value = serde_json::from_str(&sh(&format!(
        "{} state -o json --socket {}",
        bin("ocelot-dataplane").display(),
        node.socket().display()
    )))
    .unwrap();
    assert_eq!(st["services"]["services"], 4, "{st}");
    let c = node.counters();
    let nat: u64 = c["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["nat_entries"].as_u64().unwrap_or(0))
        .sum();
    assert!(nat > 0, "translated flows are counted: {c}");

    // Emptied: the cluster IP is an ordinary address again (to the host).
    call(&node, ServicesSpec::default()).expect("empty spec");
    assert!(ask_tcp(&a, VIP, 80).is_err());
    let routes = node.ns.exec("ip route");
    assert!(!routes.contains("10.96.0.0/16"), "service route left behind: {routes}");
}

#[test]
fn hairpin_and_services_kept_across_a_restart() {
    let mut node = DataplaneNode::start("octs-n", "192.0.2.32", "10.72.0.0/16", "");
    let a = node.add_pod("octs-a", "10.72.0.2");
    let dir = TempDir::new("ocelot-nat-");
    let _sa = serve(&a, "a", 8080, &dir);
    let spec = ServicesSpec {
        services: vec![service(
            "x/self:tcp",
            Proto::Tcp,
            VIP,
            80,
            vec![backend("10.72.0.2", 8080)],
        )],
        ..Default::default()
    };
    call(&node, spec).expect("set_services");
    // The pod reaches the Service it backs itself.
    for _ in 0..3 {
        assert_eq!(ask_tcp(&a, VIP, 80).expect("hairpin"), "a");
    }
    node.crash_and_restart();
    assert!(
        wait_until(Duration::from_secs(5), || ask_tcp(&a, VIP, 80).as_deref() == Ok("a")),
        "the Services survive a restart:\n{}",
        node.proc.log_text()
    );
}

#[test]
fn bad_specs_are_refused_and_change_nothing() {
    let node = DataplaneNode::start("octs-n", "192.0.2.33", "10.73.0.0/16", "");
    let a = node.add_pod("octs-a", "10.73.0.2");
    let b = node.add_pod("octs-b", "10.73.0.3");
    let dir = TempDir::new("ocelot-nat-");
    let _sb = serve(&b, "b", 8080, &dir);
    let good = ServicesSpec {
        services: vec![service("x/web:tcp", Proto::Tcp, VIP, 80, vec![backend("10.73.0.3", 8080)])],
        ..Default::default()
    };
    call(&node, good.clone()).expect("set_services");
    let mut dup = good.clone();
    dup.services.push(service("x/other:tcp", Proto::Tcp, VIP, 80, vec![]));
    let mut port0 = good.clone();
    port0.services[0].backends[0].port = 0;
    let mut v6 = good.clone();
    v6.services[0].frontends[0].addr = "fd00::10".parse().unwrap();
    for bad in [dup, port0, v6] {
        assert_eq!(call(&node, bad), Err(ErrorCode::InvalidArgument));
    }
    assert_eq!(ask_tcp(&a, VIP, 80).expect("the good spec still works"), "b");
}

/// A namespace outside the node and every pool, one veth hop from it:
/// 198.18.`subnet`.2, with the node at .1 forwarding. Also returns the
/// node's side of the link (its uplink toward that host).
fn outside_host(node: &DataplaneNode, subnet: u8) -> (Netns, String) {
    let ext = Netns::new("octs-x");
    let (up, far) = (unique("otu"), unique("otx"));
    sh(&format!(
        "ip link add {up} netns {} type veth peer name {far} netns {}",
        node.ns.name, ext.name
    ));
    node.ns.exec(&format!("ip addr add 198.18.{subnet}.1/24 dev {up}"));
    node.ns.exec(&format!("ip link set {up} up"));
    node.ns.exec("sysctl -qw net.ipv4.ip_forward=1");
    ext.exec(&format!("ip addr add 198.18.{subnet}.2/24 dev {far}"));
    ext.exec(&format!("ip link set {far} up"));
    (ext, up)
}

#[test]
fn nat_outgoing_leaves_with_the_node_address() {
    let node = DataplaneNode::start("octs-n", "192.0.2.34", "10.74.0.0/16", "");
    let a = node.add_pod("octs-a", "10.74.0.2");
    // A server outside the pools, one hop away from the node.
    let (ext, up) = outside_host(&node, 4);
    let dir = TempDir::new("ocelot-nat-");
    let _tcp = ext.spawn(
        "socat TCP-LISTEN:9090,fork,reuseaddr SYSTEM:'echo $SOCAT_PEERADDR'",
        &dir.0.join("ext-tcp.log"),
    );
    let _udp = ext.spawn(
        "socat UDP-LISTEN:9090,fork,reuseaddr SYSTEM:'echo $SOCAT_PEERADDR'",
        &dir.0.join("ext-udp.log"),
    );
    wait_listening(&ext.name, 9090);
    let spec = ServicesSpec {
        nat_outgoing: NatOutgoingSpec {
            sources: vec!["10.74.0.0/16".parse().unwrap()],
            exclude: vec!["10.74.0.0/16".parse().unwrap(), "10.96.0.0/12".parse().unwrap()],
            addr: Some("198.18.4.1".parse().unwrap()),
            ..Default::default()
        },
        ..Default::default()
    };
    let reply = call(&node, spec).expect("set_services");
    let Reply::Services { services, .. } = reply else { panic!("{reply:?}") };
    assert!(services.steering.starts_with("tc ingress on"), "{}", services.steering);

    for _ in 0..3 {
        assert_eq!(ask_tcp(&a, "198.18.4.2", 9090).expect("TCP out"), "198.18.4.1");
        assert_eq!(ask_udp(&a, "198.18.4.2", 9090).expect("UDP out"), "198.18.4.1");
    }
    assert!(a.ping("198.18.4.2"), "ICMP echo through natOutgoing");
    let filters = node.ns.exec(&format!("tc filter show dev {up} ingress"));
    assert!(filters.contains("mirred"), "{filters}");

    // The spec no longer needs steering: it is gone.
    call(&node, ServicesSpec::default()).expect("empty spec");
    let filters = node.ns.exec(&format!("tc filter show dev {up} ingress"));
    assert!(!filters.contains("mirred"), "steering left behind: {filters}");
}

/// With two workers, a translated flow's two address pairs often belong to
/// different workers: the translated packets are handed over, and every
/// connection still gets its answer.
#[test]
fn cluster_ip_with_two_workers() {
    let node = DataplaneNode::start("octs-n", "192.0.2.35", "10.75.0.0/16", "--cores 0,1");
    let a = node.add_pod("octs-a", "10.75.0.2");
    let b = node.add_pod("octs-b", "10.75.0.3");
    let c = node.add_pod("octs-c", "10.75.0.4");
    let dir = TempDir::new("ocelot-nat-");
    let _sb = serve(&b, "b", 8080, &dir);
    let _sc = serve(&c, "c", 8080, &dir);
    call(&node, cluster_spec("10.75.0.3", "10.75.0.4")).expect("set_services");
    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        seen.insert(ask_tcp(&a, VIP, 80).expect("TCP to the cluster IP"));
        seen.insert(ask_udp(&a, VIP, 53).expect("UDP to the cluster IP"));
    }
    assert_eq!(seen, ["b".to_string(), "c".to_string()].into());
    assert_eq!(drops(&node.counters(), "handoff_full"), 0);
}

/// A client outside the node reaches a NodePort on the node's address: the
/// request is steered from the uplink into the dataplane, translated to
/// the local backend, and the reply leaves from the node port.
#[test]
fn node_port_from_outside_reaches_a_local_backend() {
    let node = DataplaneNode::start("octs-n", "192.0.2.36", "10.76.0.0/16", "");
    let b = node.add_pod("octs-b", "10.76.0.3");
    let (ext, _up) = outside_host(&node, 6);
    let dir = TempDir::new("ocelot-nat-");
    let _sb = serve(&b, "b", 8080, &dir);
    let mut svc = service("x/web:tcp", Proto::Tcp, VIP, 80, vec![backend("10.76.0.3", 8080)]);
    svc.frontends.push(Frontend {
        addr: "198.18.6.1".parse().unwrap(),
        port: 30080,
        kind: FrontendKind::NodePort,
    });
    let spec = ServicesSpec {
        services: vec![svc],
        nat_outgoing: NatOutgoingSpec {
            addr: Some("198.18.6.1".parse().unwrap()),
            ..Default::default()
        },
        ..Default::default()
    };
    let reply = call(&node, spec).expect("set_services");
    let Reply::Services { services, .. } = reply else { panic!("{reply:?}") };
    assert!(services.steering.starts_with("tc ingress on"), "{}", services.steering);
    for _ in 0..3 {
        assert_eq!(ask_tcp(&ext, "198.18.6.1", 30080).expect("NodePort from outside"), "b");
    }
}
