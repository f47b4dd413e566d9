use super::*;
use crate::model::{parse_documents, Object};

const CLUSTER: &str = r#"
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: nat}
spec: {cidr: 10.65.0.0/16, natOutgoing: true}
---
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: plain}
spec: {cidr: 10.70.0.0/16}
---
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.0.2.11}]}
---
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.0.2.12}]}
---
kind: Pod
metadata: {name: a, namespace: x}
---
kind: Pod
metadata: {name: b, namespace: x}
---
kind: Pod
metadata: {name: c, namespace: x}
---
kind: Service
metadata: {name: web, namespace: x}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.65.0.2]
  nodeName: n1
  targetRef: {kind: Pod, name: a, namespace: x}
- addresses: [10.65.0.3]
  nodeName: n2
  conditions: {ready: false, serving: true, terminating: true}
  targetRef: {kind: Pod, name: b}
---
kind: EndpointSlice
metadata: {name: web-2, namespace: x, labels: {kubernetes.io/service-name: web}}
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints:
- addresses: [10.65.0.4]
  nodeName: n2
  targetRef: {kind: Pod, name: c}
---
kind: EndpointSlice
metadata: {name: web-v6, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00::1"]}]
"#;

fn cluster(extra: &str) -> Cluster {
    let (objs, _) = parse_documents(&format!("{CLUSTER}\n---\n{extra}")).unwrap();
    Cluster::from_objects(objs.iter().collect::<Vec<&Object>>())
}

fn find<'a>(o: &'a Output, name: &str) -> &'a ServiceSpec {
    o.spec.services.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name}: {o:#?}"))
}

fn backends(s: &ServiceSpec) -> Vec<String> {
    s.backends.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect()
}

#[test]
fn one_spec_per_port_with_ports_resolved_per_slice() {
    let o = compute(&cluster(""), "n1", &Settings::default());
    assert_eq!(o.problems, Vec::<String>::new());
    let names: Vec<&str> = o.spec.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["x/web:dns", "x/web:http"]);
    let http = find(&o, "x/web:http");
    assert_eq!(http.proto, Proto::Tcp);
    assert_eq!(
        http.frontends,
        [Frontend { addr: "10.96.0.10".parse().unwrap(), port: 80, kind: FrontendKind::ClusterIp }]
    );
    // The named targetPort resolves per slice: 8080 on one, 9090 on the other.
    assert_eq!(backends(http), ["10.65.0.2:8080", "10.65.0.3:8080", "10.65.0.4:9090"]);
    let a = &http.backends[0];
    assert!(a.local && a.ready && a.serving && !a.terminating, "{a:?}");
    let b = &http.backends[1];
    assert!(!b.local && !b.ready && b.serving && b.terminating, "{b:?}");
    let dns = find(&o, "x/web:dns");
    assert_eq!(dns.proto, Proto::Udp);
    assert_eq!(backends(dns), ["10.65.0.2:5353", "10.65.0.3:5353"]);
    assert_eq!(
        (http.affinity_timeout_s, http.external_local, http.internal_local),
        (0, false, false)
    );
    // The same cluster from n2: locality follows the endpoint's node.
    let o2 = compute(&cluster(""), "n2", &Settings::default());
    let l: Vec<bool> = find(&o2, "x/web:http").backends.iter().map(|b| b.local).collect();
    assert_eq!(l, [false, true, true]);
}

#[test]
fn node_ports_external_ips_affinity_and_traffic_policies() {
    let o = compute(
        &cluster(
            r#"
kind: Service
metadata: {name: np, namespace: x}
spec:
  type: NodePort
  clusterIPs: [10.96.0.20, "fd00::20"]
  externalIPs: [203.0.113.7]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
kind: Service
metadata: {name: sticky, namespace: x}
spec:
  clusterIP: 10.96.0.21
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80}]
"#,
        ),
        "n2",
        &Settings::default(),
    );
    assert_eq!(o.problems, Vec::<String>::new());
    let np = find(&o, "x/np:80");
    let fe: Vec<(String, u16, FrontendKind)> =
        np.frontends.iter().map(|f| (f.addr.to_string(), f.port, f.kind)).collect();
    assert_eq!(
        fe,
        [
            ("10.96.0.20".into(), 80, FrontendKind::ClusterIp),
            ("203.0.113.7".into(), 80, FrontendKind::ExternalIp),
            ("192.0.2.12".into(), 30080, FrontendKind::NodePort),
        ]
    );
    assert!(np.backends.is_empty(), "no slices: refused at once");
    assert_eq!(np.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
    assert!(np.external_local && np.internal_local);
    assert_eq!(find(&o, "x/sticky:80").affinity_timeout_s, 60);
}

#[test]
fn nat_outgoing_from_the_pools_that_ask() {
    let o = compute(&cluster(""), "n1", &Settings::default());
    let n = &o.spec.nat_outgoing;
    assert_eq!(n.sources, ["10.65.0.0/16".parse::<Cidr>().unwrap()]);
    let ex: Vec<String> = n.exclude.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        ex,
        ["10.65.0.0/16", "10.70.0.0/16", "10.96.0.0/12", "192.0.2.11/32", "192.0.2.12/32"]
    );
    assert_eq!(n.addr, Some("192.0.2.11".parse().unwrap()));
    assert_eq!(o.spec.service_cidrs, ["10.96.0.0/12".parse::<Cidr>().unwrap()]);
    assert_eq!(o.spec.node_port_range, (30000, 32767));
}

#[test]
fn bad_input_is_reported_and_the_rest_keeps_working() {
    let o = compute(
        &cluster(
            r#"
kind: Service
metadata: {name: noports, namespace: x}
spec: {clusterIP: 10.96.0.30}
---
kind: Service
metadata: {name: outside, namespace: x}
spec: {clusterIP: 172.16.0.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: weird, namespace: x}
spec:
  clusterIP: 10.96.0.31
  ports: [{name: a, port: 80, protocol: ICMP}, {name: b, port: 81}]
---
kind: Service
metadata: {name: older, namespace: x, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {type: NodePort, clusterIP: 10.96.0.32, ports: [{port: 80, nodePort: 30001}]}
---
kind: Service
metadata: {name: aaa-younger, namespace: x, creationTimestamp: "2025-01-01T00:00:00Z"}
spec: {type: NodePort, clusterIP: 10.96.0.33, ports: [{port: 80, nodePort: 30001}]}
---
kind: Service
metadata: {name: udp-same-port, namespace: x}
spec: {type: NodePort, clusterIP: 10.96.0.34, ports: [{port: 80, protocol: UDP, nodePort: 30001}]}
---
kind: Service
metadata: {name: range, namespace: x}
spec: {type: NodePort, clusterIP: 10.96.0.35, ports: [{port: 80, nodePort: 80}]}
---
kind: EndpointSlice
metadata: {name: orphan, namespace: x, labels: {kubernetes.io/service-name: nobody}}
endpoints: [{addresses: [10.65.0.9]}]
---
kind: EndpointSlice
metadata: {name: ghost, namespace: x, labels: {kubernetes.io/service-name: weird}}
ports: [{name: b, port: 81}]
endpoints:
- {addresses: [10.65.0.9], targetRef: {kind: Pod, name: gone}}
- {addresses: [10.65.0.2], targetRef: {kind: Pod, name: a}}
"#,
        ),
        "n1",
        &Settings::default(),
    );
    let p = o.problems.join("\n");
    for want in [
        "Service x/noports: no ports",
        "Service x/outside: clusterIP 172.16.0.1 is outside the service range (10.96.0.0/12)",
        "Service x/weird: port a: unknown protocol \"ICMP\"",
        "Service x/aaa-younger:80: nodePort 192.0.2.11:30001/TCP is already x/older:80's",
        "Service x/range: port 80: nodePort 80 is outside the range 30000-32767",
        "EndpointSlice x/orphan: its Service x/nobody does not exist",
        "EndpointSlice x/ghost: endpoint 10.65.0.9 names Pod x/gone, which does not exist",
    ] {
        assert!(p.contains(want), "missing {want:?} in:\n{p}");
    }
    assert_eq!(o.problems.len(), 7, "{p}");
    // Everything else works: the good port of `weird` with its good
    // endpoint, the older NodePort, the younger's cluster IP, the UDP
    // nodePort (another protocol), and the first cluster's Services.
    assert_eq!(backends(find(&o, "x/weird:b")), ["10.65.0.2:81"]);
    let nodeports = |name: &str| -> Vec<u16> {
        find(&o, name)
            .frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::NodePort)
            .map(|f| f.port)
            .collect()
    };
    assert_eq!(nodeports("x/older:80"), [30001]);
    assert_eq!(nodeports("x/aaa-younger:80"), Vec::<u16>::new());
    assert_eq!(nodeports("x/udp-same-port:80"), [30001]);
    assert_eq!(nodeports("x/range:80"), Vec::<u16>::new());
    assert!(o.spec.services.iter().all(|s| !s.name.starts_with("x/outside")));
    assert!(o.spec.services.iter().all(|s| !s.name.starts_with("x/noports")));
    assert_eq!(find(&o, "x/web:http").backends.len(), 3);
}

#[test]
fn without_timestamps_name_order_decides_and_frontends_are_never_shared() {
    let o = compute(
        &cluster(
            r#"
kind: Service
metadata: {name: b, namespace: x}
spec: {type: NodePort, clusterIP: 10.96.0.40, ports: [{port: 80, nodePort: 30002}]}
---
kind: Service
metadata: {name: a, namespace: x}
spec: {type: NodePort, clusterIP: 10.96.0.40, ports: [{port: 80, nodePort: 30002}]}
"#,
        ),
        "n1",
        &Settings::default(),
    );
    assert_eq!(find(&o, "x/a:80").frontends.len(), 2);
    assert!(o.spec.services.iter().all(|s| s.name != "x/b:80"), "nothing left for b");
    assert_eq!(o.problems.len(), 2, "{:?}", o.problems);
    let mut all = BTreeSet::new();
    for s in &o.spec.services {
        for f in &s.frontends {
            assert!(all.insert((f.addr, f.port, s.proto)), "{f:?} twice");
        }
    }
}

#[test]
fn headless_external_name_and_unallocated() {
    let o = compute(
        &cluster(
            r#"
kind: Service
metadata: {name: headless, namespace: x}
spec: {clusterIP: None, selector: {a: b}, ports: [{port: 80}]}
---
kind: Service
metadata: {name: ext, namespace: x}
spec: {type: ExternalName, ports: [{port: 80}]}
---
kind: Service
metadata: {name: pending, namespace: x}
spec: {selector: {a: b}, ports: [{port: 80}]}
"#,
        ),
        "n1",
        &Settings::default(),
    );
    assert_eq!(o.problems, ["Service x/pending: no clusterIP allocated yet"]);
    assert_eq!(o.spec.services.len(), 2, "only x/web's ports");
}

#[test]
fn port_ranges_parse() {
    assert_eq!(parse_port_range("30000-32767"), Ok((30000, 32767)));
    assert_eq!(parse_port_range("80-80"), Ok((80, 80)));
    assert!(parse_port_range("32767-30000").is_err());
    assert!(parse_port_range("0-10").is_err());
    assert!(parse_port_range("30000").is_err());
    assert!(parse_port_range("a-b").is_err());
}
