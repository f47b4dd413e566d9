//! Services and natOutgoing in the lab, end to end: real packets from
//! pods, nodes and a client outside the cluster, through each node's
//! dataplane, to pods the lab's endpoint controller lists.
//!
//! One lab serves the whole sequence (bringing one up costs more than
//! all the checks): each step runs even when an earlier one failed, and
//! every failure is reported at the end. The steps that change the lab
//! (bad input, removing backends) come last.

use ocelot_tests::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const LAB: &str = r#"
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.65.0.0/16, blockSize: 26, natOutgoing: true}
---
apiVersion: ocelot.dev/v1
kind: IPPool
metadata: {name: plain}
spec: {cidr: 10.70.0.0/16, blockSize: 26}
---
kind: Node
metadata: {name: node-1}
---
kind: Node
metadata: {name: node-2}
---
kind: Namespace
metadata: {name: svc}
---
kind: Service
metadata: {name: web, namespace: svc}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
  - {name: sctp, port: 9000, protocol: SCTP}
---
kind: Service
metadata: {name: sticky, namespace: svc}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
kind: Service
metadata: {name: web-np, namespace: svc}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: http, nodePort: 30080}]
---
kind: Service
metadata: {name: lonely-np, namespace: svc}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: lonely}
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
"#;

/// `(name, node, address, labels)` of the pods.
const PODS: [(&str, &str, &str, &str); 6] = [
    ("web-1", "node-1", "10.65.0.2", "app: web"),
    ("web-2", "node-1", "10.65.0.3", "app: web"),
    ("web-3", "node-2", "10.65.0.66", "app: web"),
    ("client", "node-2", "10.65.0.67", "app: client"),
    ("lonely", "node-2", "10.65.0.68", "app: lonely"),
    ("plain", "node-1", "10.70.0.2", "app: plain"),
];

fn pod_yaml(name: &str) -> String {
    let (_, node, ip, labels) = PODS.iter().find(|p| p.0 == name).expect("a pod of PODS");
    format!(
        "---\nkind: Pod\nmetadata: {{name: {name}, namespace: svc, labels: {{{labels}}}, \
         annotations: {{ocelot.dev/ip-addrs: '[\"{ip}\"]'}}}}\nspec:\n  nodeName: {node}\n  \
         containers:\n  - name: c\n    ports:\n    - {{name: http, containerPort: 8080}}\n    \
         - {{name: dns, containerPort: 53, protocol: UDP}}\n    \
         - {{name: sctp, containerPort: 9000, protocol: SCTP}}\n"
    )
}

fn lab_yaml() -> String {
    let mut y = LAB.to_string();
    for (name, ..) in PODS {
        y.push_str(&pod_yaml(name));
    }
    y
}

/// What `ocelot lab connect` saw.
#[derive(Debug)]
struct Seen {
    answers: Vec<(String, u64)>,
    refused: u64,
    timeout: u64,
    failed: u64,
    max_ms: f64,
    raw: Value,
}

impl Seen {
    fn answered(&self) -> u64 {
        self.answers.iter().map(|(_, n)| n).sum()
    }
    fn names(&self) -> Vec<&str> {
        self.answers.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// `count` attempts from `from` (a pod `svc/x`, `node/n`, `external/e`).
fn connect(
    lab: &Lab,
    from: &str,
    to: &str,
    proto: &str,
    count: u32,
    extra: &str,
) -> Result<Seen, String> {
    let out = lab.try_ocelot(&format!(
        "connect {from} {to} --protocol {proto} --count {count} --parallel 4 -o json {extra}"
    ))?;
    let start = out.find('{').ok_or_else(|| format!("no JSON from lab connect: {out}"))?;
    let v: Value = serde_json::from_str(&out[start..]).map_err(|e| format!("{e}: {out}"))?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Seen {
        answers: v["answers"]
            .as_object()
            .map(|m| m.iter().map(|(k, c)| (k.clone(), c.as_u64().unwrap_or(0))).collect())
            .unwrap_or_default(),
        refused: n("refused"),
        timeout: n("timeout"),
        failed: n("failed"),
        max_ms: v["max_ms"].as_f64().unwrap_or(0.0),
        raw: v,
    })
}

/// A Service's cluster IP, from `ocelot lab get services`.
fn cluster_ip(lab: &Lab, name: &str) -> String {
    let out = lab.ocelot("get services -o json");
    let v: Value = serde_json::from_str(&out[out.find('[').expect("services JSON")..]).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["clusterIP"].as_str())
        .unwrap_or_else(|| panic!("no Service {name} with a clusterIP: {v}"))
        .to_string()
}

/// Ask a lab server over TCP, from namespace `netns`, who we are: its
/// name and our address as it sees it.
fn peer(netns: &str, ip: &str, port: u16) -> Result<(String, String), String> {
    let out = sh_out(&format!(
        "ip netns exec {netns} sh -c \"printf 'peer?\\n' | timeout 4 nc -w 2 {ip} {port}\""
    ));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut l = text.lines();
    match (l.next(), l.next()) {
        (Some(name), Some(addr)) => Ok((name.to_string(), addr.to_string())),
        _ => Err(format!("{netns} -> {ip}:{port}: no name and address in {text:?}")),
    }
}

/// Retry `f` until it succeeds or `within` passes (the agents and the
/// dataplane converge asynchronously); the last error otherwise.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let end = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= end => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A TCP connection held open by `nc` in a namespace: it read the
/// server's name, and echoes what it is sent.
struct Held {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    backend: String,
}

impl Held {
    fn open(netns: &str, ip: &str, port: u16) -> Result<Held, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "nc", ip, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("nc: {e}"))?;
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let backend = rx
            .recv_timeout(Duration::from_secs(3))
            .map_err(|_| format!("held connection to {ip}:{port}: no greeting"))?;
        Ok(Held { child, stdin, lines: rx, backend })
    }

    /// Send a line; true when it comes back.
    fn echoes(&mut self, word: &str) -> bool {
        if writeln!(self.stdin, "{word}").is_err() {
            return false;
        }
        self.lines.recv_timeout(Duration::from_secs(3)).is_ok_and(|l| l == word)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's log on a node.
fn agent_log(lab: &Lab, node: &str) -> String {
    std::fs::read_to_string(lab.node_dir(node).join("agent.log")).unwrap_or_default()
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// The whole sequence on one lab.
#[test]
fn services_and_nat_outgoing_in_one_lab() {
    let lab = Lab::up_yaml(&lab_yaml());
    let web = cluster_ip(&lab, "web");
    let sticky = cluster_ip(&lab, "sticky");
    let n1 = lab.node_ip("node-1");
    let n2 = lab.node_ip("node-2");
    let out = lab.ocelot("external add outside --port 80 --port 5300/UDP");
    let ext_ip = serde_json::from_str::<Value>(&out[out.find('{').expect("external JSON")..])
        .expect("external JSON")["ip"]
        .as_str()
        .expect("external ip")
        .to_string();
    let ext_ns = format!("ocl-{}-ext-outside", lab.name);
    let mut failures: Vec<String> = Vec::new();
    let mut step = |name: &str, r: Result<(), String>| {
        eprintln!("{} {name}", if r.is_ok() { "PASS" } else { "FAIL" });
        if let Err(e) = r {
            failures.push(format!("{name}: {e}"));
        }
    };
    let wait = Duration::from_secs(10);

    step(
        "a ClusterIP spreads many connections over its three backends on two nodes",
        eventually(wait, || {
            let s =
                connect(&lab, "svc/client", &format!("{web}:80"), "TCP", 60, "--timeout-ms 1000")?;
            check(
                s.answered() == 60 && s.names() == ["svc/web-1", "svc/web-2", "svc/web-3"],
                || format!("{}", s.raw),
            )
        }),
    );
    step(
        "the node itself reaches the ClusterIP",
        eventually(wait, || {
            let s = connect(&lab, "node/node-1", &format!("{web}:80"), "TCP", 20, "")?;
            check(s.answered() == 20, || format!("{}", s.raw))
        }),
    );
    step(
        "hairpin: a backend reaches itself through its Service",
        eventually(wait, || {
            let s = connect(&lab, "svc/web-1", &format!("{web}:80"), "TCP", 40, "")?;
            check(s.answered() == 40 && s.names().contains(&"svc/web-1"), || format!("{}", s.raw))
        }),
    );
    step(
        "UDP: DNS questions to the Service are answered by its backends",
        eventually(wait, || {
            let s = connect(&lab, "svc/client", &format!("{web}:53"), "UDP", 30, "--dns")?;
            check(s.answered() == 30 && s.answers.len() >= 2, || format!("{}", s.raw))
        }),
    );
    step(
        "SCTP: associations through the Service reach its backends",
        eventually(wait, || {
            let s = connect(&lab, "svc/client", &format!("{web}:9000"), "SCTP", 20, "")?;
            check(s.answered() == 20 && s.answers.len() >= 2, || format!("{}", s.raw))
        }),
    );
    step(
        "session affinity: one client always meets one backend",
        eventually(wait, || {
            let s = connect(&lab, "svc/client", &format!("{sticky}:80"), "TCP", 30, "")?;
            check(s.answered() == 30 && s.answers.len() == 1, || format!("{}", s.raw))
        }),
    );
    for node_ip in [&n1, &n2] {
        step(
            &format!(
                "NodePort (externalTrafficPolicy Cluster) on {node_ip} from outside the cluster"
            ),
            eventually(wait, || {
                let s =
                    connect(&lab, "external/outside", &format!("{node_ip}:30080"), "TCP", 30, "")?;
                check(s.answered() == 30 && s.answers.len() >= 2, || format!("{}", s.raw))
            }),
        );
    }
    step(
        "NodePort (externalTrafficPolicy Local): the backend's node answers, client address kept",
        eventually(wait, || {
            let s = connect(&lab, "external/outside", &format!("{n2}:30081"), "TCP", 10, "")?;
            check(s.names() == ["svc/lonely"] && s.answered() == 10, || format!("{}", s.raw))?;
            let (name, addr) = peer(&ext_ns, &n2, 30081)?;
            check(name == "svc/lonely" && addr.starts_with(&format!("{ext_ip}:")), || {
                format!("{name} saw the client as {addr}, not {ext_ip}")
            })
        }),
    );
    step(
        "NodePort (externalTrafficPolicy Local): a node without a local backend does not answer",
        (|| {
            let s = connect(
                &lab,
                "external/outside",
                &format!("{n1}:30081"),
                "TCP",
                5,
                "--timeout-ms 500",
            )?;
            check(s.answered() == 0 && s.refused + s.timeout + s.failed == 5, || {
                format!("{}", s.raw)
            })
        })(),
    );
    step(
        "natOutgoing: the outside server sees the pod's node",
        eventually(wait, || {
            let (name, addr) = peer(&lab.pod_netns("svc/client"), &ext_ip, 80)?;
            check(name == "external/outside" && addr.starts_with(&format!("{n2}:")), || {
                format!("{name} saw svc/client as {addr}, not node-2 ({n2})")
            })
        }),
    );
    // The outside knows the way back to the pool without natOutgoing, as a
    // routed network would.
    sh(&format!("ip -n {ext_ns} route replace 10.70.0.0/16 via {n1}"));
    step(
        "no natOutgoing: the outside server sees the pod's own address",
        eventually(wait, || {
            let (name, addr) = peer(&lab.pod_netns("svc/plain"), &ext_ip, 80)?;
            check(name == "external/outside" && addr.starts_with("10.70.0.2:"), || {
                format!("{name} saw svc/plain as {addr}")
            })
        }),
    );
    step(
        "the lab refuses what the API server refuses",
        (|| {
            let taken = lab.try_apply(
                "kind: Service\nmetadata: {name: dup, namespace: svc}\n\
                 spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, nodePort: 30080}]}\n",
            );
            check(
                taken.as_ref().is_err_and(|e| {
                    e.contains("nodePort 30080 is already allocated to Service svc/web-np")
                }),
                || format!("{taken:?}"),
            )?;
            let none = lab.try_apply("kind: Service\nmetadata: {name: none, namespace: svc}\nspec: {selector: {app: web}}\n");
            check(none.as_ref().is_err_and(|e| e.contains("spec.ports: Required value")), || {
                format!("{none:?}")
            })
        })(),
    );
    step(
        "bad objects in the datastore are reported by the agents; the rest keeps working",
        (|| {
            std::fs::write(
                lab.datastore().join("zz-bad-services.yaml"),
                "kind: Service\nmetadata: {name: bad-noports, namespace: svc}\nspec: {clusterIP: 10.96.1.1}\n---\n\
                 kind: Service\nmetadata: {name: bad-proto, namespace: svc}\n\
                 spec: {clusterIP: 10.96.1.2, ports: [{port: 80, protocol: ICMP}]}\n---\n\
                 kind: Service\nmetadata: {name: bad-range, namespace: svc}\n\
                 spec: {clusterIP: 172.31.0.1, ports: [{port: 80}]}\n---\n\
                 kind: Service\nmetadata: {name: bad-np, namespace: svc, creationTimestamp: '2999-01-01T00:00:00Z'}\n\
                 spec: {type: NodePort, clusterIP: 10.96.1.3, ports: [{port: 80, nodePort: 30080}]}\n---\n\
                 kind: EndpointSlice\nmetadata: {name: bad-orphan, namespace: svc, labels: {kubernetes.io/service-name: nobody}}\n\
                 endpoints: [{addresses: [10.65.0.9]}]\n---\n\
                 kind: EndpointSlice\nmetadata: {name: bad-ghost, namespace: svc, labels: {kubernetes.io/service-name: bad-np}}\n\
                 ports: [{port: 8080}]\nendpoints: [{addresses: [10.65.0.9], targetRef: {kind: Pod, name: ghost}}]\n",
            )
            .map_err(|e| e.to_string())?;
            let want = [
                "Service svc/bad-noports: no ports",
                "Service svc/bad-proto: port 80: unknown protocol \"ICMP\"",
                "Service svc/bad-range: clusterIP 172.31.0.1 is outside the service range",
                "Service svc/bad-np:80: nodePort",
                "EndpointSlice svc/bad-orphan: its Service svc/nobody does not exist",
                "EndpointSlice svc/bad-ghost: endpoint 10.65.0.9 names Pod svc/ghost, which does not exist",
            ];
            eventually(wait, || {
                let log = agent_log(&lab, "node-1");
                let missing: Vec<&&str> = want.iter().filter(|w| !log.contains(**w)).collect();
                check(missing.is_empty(), || format!("not in node-1's agent log: {missing:?}"))
            })?;
            eventually(wait, || {
                let s = connect(&lab, "external/outside", &format!("{n1}:30080"), "TCP", 10, "")?;
                check(
                    s.answered() == 10 && s.names().iter().all(|n| n.starts_with("svc/web-")),
                    || format!("nodePort 30080 after the bad objects: {}", s.raw),
                )?;
                let s = connect(&lab, "svc/client", &format!("{web}:80"), "TCP", 10, "")?;
                check(s.answered() == 10, || format!("{}", s.raw))
            })
        })(),
    );
    step(
        "a backend goes: new connections avoid it, open connections to the others go on",
        (|| {
            let mut held = Vec::new();
            for _ in 0..12 {
                held.push(Held::open(&lab.pod_netns("svc/client"), &web, 80)?);
            }
            let mut kept: Vec<Held> =
                held.into_iter().filter(|h| h.backend != "svc/web-2").collect();
            check(!kept.is_empty(), || "every held connection went to web-2".into())?;
            lab.try_delete(&pod_yaml("web-2"))?;
            eventually(wait, || {
                let s = connect(&lab, "svc/client", &format!("{web}:80"), "TCP", 40, "")?;
                check(s.answered() == 40 && s.names() == ["svc/web-1", "svc/web-3"], || {
                    format!("{}", s.raw)
                })
            })?;
            for h in &mut kept {
                let b = h.backend.clone();
                check(h.echoes("still-there"), || format!("the held connection to {b} broke"))?;
            }
            Ok(())
        })(),
    );
    step(
        "no backends left: connections are refused at once, not timed out",
        (|| {
            lab.try_delete(&(pod_yaml("web-1") + &pod_yaml("web-3")))?;
            eventually(wait, || {
                let s = connect(
                    &lab,
                    "svc/client",
                    &format!("{web}:80"),
                    "TCP",
                    10,
                    "--timeout-ms 3000",
                )?;
                check(s.refused == 10 && s.max_ms < 1000.0, || format!("{}", s.raw))
            })?;
            let s = connect(
                &lab,
                "svc/client",
                &format!("{web}:53"),
                "UDP",
                5,
                "--dns --timeout-ms 3000",
            )?;
            check(s.refused == 5 && s.max_ms < 1000.0, || format!("UDP: {}", s.raw))?;
            Ok(())
        })(),
    );
    if !failures.is_empty() {
        for n in ["node-1", "node-2"] {
            let log = agent_log(&lab, n);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!(
                "--- end of {n}'s agent log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    assert!(failures.is_empty(), "{} step(s) failed:\n{}", failures.len(), failures.join("\n"));
}
