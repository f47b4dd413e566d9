//! Ocelot across two nodes, built by the real lab: `ocelot lab up` on a
//! manifest with two nodes, one pod on each and an IP pool in VXLAN or IPIP
//! mode; `ocelot lab down` when dropped (also on failure and Ctrl-C).
//!
//! Only the lab's command line is used (`up`, `get pods|nodes -o json`,
//! `down`), never its internals: the pods' namespaces, addresses and the
//! nodes' dataplanes are read from `get ... -o json`.

use super::overlay::Encap;
use super::PodPair;
use crate::scenario::{drops_of, Dataplane};
use crate::tools;
use anyhow::{bail, Context, Result};
use ocelot_tests::{unique, wait_until, Netns, TempDir};
use serde::Deserialize;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Kubernetes namespace of the pods.
pub const NAMESPACE: &str = "perf";
/// The client pod, on [`NODES`]`[0]`, and the server pod, on `NODES[1]`.
pub const CLIENT: &str = "client";
pub const SERVER: &str = "server";
pub const NODES: [&str; 2] = ["node-1", "node-2"];

/// How long `ocelot lab up` may take (its own wait for the nodes is 30 s).
const UP_TIMEOUT: Duration = Duration::from_secs(90);
const DOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// The lab's manifest: the pool (`vxlanMode` or `ipipMode: Always`), two
/// nodes, the namespace and the two pods (no containerPorts: nothing else
/// listens in them).
pub fn manifest(encap: Encap, pool: &str, block_size: u8) -> String {
    manifest_serving(encap, pool, block_size, &[])
}

/// [`manifest`] with the server pod declaring `server_tcp` as TCP
/// containerPorts, which the lab serves.
pub fn manifest_serving(encap: Encap, pool: &str, block_size: u8, server_tcp: &[u16]) -> String {
    let (vxlan, ipip) = match encap {
        Encap::Vxlan => ("Always", "Never"),
        Encap::Ipip => ("Never", "Always"),
    };
    let mut m = format!(
        "apiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata:\n  name: perf-{}\nspec:\n  \
         cidr: {pool}\n  blockSize: {block_size}\n  vxlanMode: {vxlan}\n  ipipMode: {ipip}\n",
        encap.name()
    );
    for n in NODES {
        m.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  labels:\n    \
             kubernetes.io/hostname: {n}\n"
        ));
    }
    m.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"));
    for (pod, node) in [(CLIENT, NODES[0]), (SERVER, NODES[1])] {
        m.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {NAMESPACE}\n\
             spec:\n  nodeName: {node}\n"
        ));
        if pod == SERVER && !server_tcp.is_empty() {
            m.push_str("  containers:\n  - name: serve\n    ports:\n");
            for port in server_tcp {
                m.push_str(&format!(
                    "    - {{name: serve-{port}-tcp, containerPort: {port}, protocol: TCP}}\n"
                ));
            }
        }
    }
    m
}

/// A pod as `ocelot lab get pods -o json` shows it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Option<String>,
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// Path of its network namespace (`/run/netns/<name>`).
    pub netns: PathBuf,
}

/// A node as `ocelot lab get nodes -o json` shows it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LabNode {
    pub name: String,
    #[serde(rename = "internalIP")]
    pub internal_ip: String,
    pub dataplane: Option<LabProc>,
    #[serde(default)]
    pub agent: Option<LabProc>,
    #[serde(rename = "dataplaneSocket")]
    pub dataplane_socket: PathBuf,
    pub dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LabProc {
    pub pid: i32,
}

pub fn parse_pods(json: &str) -> Result<Vec<LabPod>> {
    serde_json::from_str(json).context("`ocelot lab get pods -o json`: unexpected output")
}

pub fn parse_nodes(json: &str) -> Result<Vec<LabNode>> {
    serde_json::from_str(json).context("`ocelot lab get nodes -o json`: unexpected output")
}

/// Pod `name` of [`NAMESPACE`], running on `node`, with its address and
/// the name of its network namespace.
pub fn running_pod(pods: &[LabPod], name: &str, node: &str) -> Result<(String, String)> {
    let key = format!("{NAMESPACE}/{name}");
    let Some(p) = pods.iter().find(|p| p.namespace == NAMESPACE && p.name == name) else {
        bail!("the lab has no pod {key}");
    };
    if p.status != "Running" {
        bail!(
            "pod {key} is {}: {}",
            p.status,
            p.reason.as_deref().unwrap_or("no reason given").lines().next().unwrap_or("")
        );
    }
    if p.node != node {
        bail!("pod {key} is on {}, not {node}", p.node);
    }
    let ip = p.ip.clone().with_context(|| format!("pod {key} has no address"))?;
    let ns = p
        .netns
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("pod {key}: bad netns path {}", p.netns.display()))?;
    Ok((ip, ns.to_string()))
}

/// The lab by name and directory; `ocelot lab down` on drop. Made before
/// `up`, so a lab that fails halfway up is taken down too.
struct LabGuard {
    ocelot: PathBuf,
    name: String,
    /// `None` once it must be kept (down failed: it holds the state that
    /// `ocelot lab down` needs to finish the job).
    run_dir: Option<TempDir>,
}

impl LabGuard {
    fn command(&self, sub: &str) -> Command {
        let mut c = Command::new(&self.ocelot);
        c.args(["lab", sub, "--name", &self.name, "--run-dir"]);
        c.arg(&self.run_dir.as_ref().expect("run dir").0);
        c
    }

    /// Run `ocelot lab <sub> ...`; its stdout.
    fn run(&self, sub: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let mut c = self.command(sub);
        c.args(args);
        let what = format!("`ocelot lab {sub} {}`", args.join(" "));
        let r = tools::run_timed(c, &what, timeout)?;
        if !r.ok {
            bail!(
                "{what} failed ({}):\n{}{}",
                r.status,
                tools::tail(&r.stdout, 10),
                tools::tail(&r.stderr, 15)
            );
        }
        Ok(r.stdout)
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let r = tools::run_cleanup(self.command("down"), "`ocelot lab down`", DOWN_TIMEOUT);
        let failed = match r {
            Ok(r) if r.ok => return,
            Ok(r) => format!("{}: {}", r.status, tools::tail(&r.stderr, 10).trim_end()),
            Err(e) => format!("{e:#}"),
        };
        let dir = self.run_dir.take().expect("run dir");
        eprintln!(
            "ocelot-perf: warning: `ocelot lab down --name {} --run-dir {}` failed ({failed}); \
             run it again to remove what is left",
            self.name,
            dir.0.display()
        );
        std::mem::forget(dir);
    }
}

/// A pod of the lab: the lab owns its namespace, so the handle must never
/// delete it (`Netns` would on drop).
pub struct PodRef {
    pub ns: ManuallyDrop<Netns>,
    pub ip: String,
}

impl PodRef {
    fn new(ns: String, ip: String) -> PodRef {
        PodRef { ns: ManuallyDrop::new(Netns { name: ns }), ip }
    }
}

/// Two lab nodes with Ocelot's overlay between them, a pod on each.
pub struct OcelotLab {
    label: String,
    pub encap: Encap,
    pub client: PodRef,
    pub server: PodRef,
    pub nodes: Vec<LabNode>,
    /// One per node, in [`NODES`] order.
    pub dataplanes: Vec<Dataplane>,
    guard: LabGuard,
}

impl OcelotLab {
    /// `ocelot lab up` with [`manifest`]; `mtu` is the pods' MTU,
    /// `bin_dir` holds `ocelot`, `ocelot-dataplane` and `ocelot-cni`.
    pub fn up(
        encap: Encap,
        pool: &str,
        block_size: u8,
        mtu: u32,
        bin_dir: &Path,
    ) -> Result<OcelotLab> {
        OcelotLab::up_serving(encap, pool, block_size, mtu, bin_dir, &[])
    }

    /// [`OcelotLab::up`] with the server pod serving `server_tcp`
    /// ([`manifest_serving`]).
    pub fn up_serving(
        encap: Encap,
        pool: &str,
        block_size: u8,
        mtu: u32,
        bin_dir: &Path,
        server_tcp: &[u16],
    ) -> Result<OcelotLab> {
        for b in ["ocelot", "ocelot-dataplane", "ocelot-cni"] {
            if !bin_dir.join(b).is_file() {
                bail!(
                    "{} not found: build the binaries with `cargo build --release -p ocelot-control \
                     -p ocelot-dataplane -p ocelot-cni-shim` (or set OCELOT_BIN_DIR)",
                    bin_dir.join(b).display()
                );
            }
        }
        let guard = LabGuard {
            ocelot: bin_dir.join("ocelot"),
            // `pfx<pid>x<n>-vxlan`: at most 20 characters, as the lab wants.
            name: format!("{}-{}", unique("pfx"), encap.name()),
            run_dir: Some(TempDir::new("ocelot-perf-lab-")),
        };
        let file = guard.run_dir.as_ref().expect("run dir").0.join("lab.yaml");
        std::fs::write(&file, manifest_serving(encap, pool, block_size, server_tcp))?;
        let (file, mtu, bins) =
            (file.display().to_string(), mtu.to_string(), bin_dir.display().to_string());
        guard.run("up", &["-f", &file, "--mtu", &mtu, "--bin-dir", &bins], UP_TIMEOUT)?;
        let pods = parse_pods(&guard.run("get", &["pods", "-o", "json"], DOWN_TIMEOUT)?)?;
        let nodes = parse_nodes(&guard.run("get", &["nodes", "-o", "json"], DOWN_TIMEOUT)?)?;
        let (cip, cns) = running_pod(&pods, CLIENT, NODES[0])?;
        let (sip, sns) = running_pod(&pods, SERVER, NODES[1])?;
        let mut dataplanes = Vec::new();
        let mut ordered = Vec::new();
        for want in NODES {
            let n = nodes
                .iter()
                .find(|n| n.name == want)
                .with_context(|| format!("the lab has no node {want}"))?;
            let pid = n.dataplane.as_ref().map(|p| p.pid).unwrap_or(0);
            match crate::procfs::comm(pid as u32) {
                Some(c) if pid > 0 && c.starts_with("ocelot-datap") => {}
                other => bail!("node {want}: process {pid} is {other:?}, not the dataplane"),
            }
            dataplanes.push(Dataplane { pid: pid as u32, socket: n.dataplane_socket.clone() });
            ordered.push(n.clone());
        }
        Ok(OcelotLab {
            label: format!("ocelot-{}", encap.name()),
            encap,
            client: PodRef::new(cns, cip),
            server: PodRef::new(sns, sip),
            nodes: ordered,
            dataplanes,
            guard,
        })
    }

    /// The lab's name (`ocelot lab ... --name`).
    pub fn name(&self) -> &str {
        &self.guard.name
    }

    /// Run `ocelot lab <sub> -f <file>` (`apply` or `delete`) and wait for
    /// its exit without polling, so the time it returns is exact to the
    /// scheduler; how long it took. Interrupted by Ctrl-C like any tool (it
    /// is in our process group).
    pub fn run_file(&self, sub: &str, file: &Path) -> Result<Duration> {
        let what = format!("`ocelot lab {sub} -f {}`", file.display());
        let mut c = self.guard.command(sub);
        c.arg("-f").arg(file).stdin(std::process::Stdio::null());
        let t = std::time::Instant::now();
        let out = c.output().with_context(|| format!("cannot run {what}"))?;
        let took = t.elapsed();
        crate::interrupt::check()?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}):\n{}{}",
                out.status,
                tools::tail(&String::from_utf8_lossy(&out.stdout), 10),
                tools::tail(&String::from_utf8_lossy(&out.stderr), 15)
            );
        }
        Ok(took)
    }

    /// The directory the lab keeps its own files in (holds no state of
    /// ours; a place for the files given to `apply`).
    pub fn run_dir(&self) -> &Path {
        &self.guard.run_dir.as_ref().expect("run dir").0
    }

    /// Warnings and errors the nodes' dataplanes and agents logged, last
    /// few per file, for failure messages.
    pub fn log_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in &self.nodes {
            for f in ["dataplane.log", "agent.log"] {
                let text =
                    tools::strip_ansi(&std::fs::read_to_string(n.dir.join(f)).unwrap_or_default());
                let bad: Vec<&str> =
                    text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
                for l in &bad[bad.len().saturating_sub(3)..] {
                    out.push(format!("{} {f}: {}", n.name, l.trim()));
                }
            }
        }
        out
    }
}

impl PodPair for OcelotLab {
    fn label(&self) -> &str {
        &self.label
    }
    fn ends(&self) -> [(&Netns, &str); 2] {
        [(&self.client.ns, &self.client.ip), (&self.server.ns, &self.server.ip)]
    }

    /// The client reaches the server across the nodes; if not, say what
    /// ping said, what the dataplanes dropped and what they logged.
    fn check_connectivity(&self) -> Result<()> {
        let before = drops_of(&self.dataplanes).unwrap_or_default();
        if wait_until(Duration::from_secs(5), || self.client().ping(self.server_ip())) {
            return Ok(());
        }
        let ping = self.client().exec_out(&format!("ping -c 1 -W 1 {}", self.server_ip()));
        let said = String::from_utf8_lossy(&ping.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&ping.stderr).lines())
            .find(|l| l.starts_with("From ") || l.contains("nreachable") || l.contains("rror"))
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| "no reply".into());
        let mut why = vec![format!(
            "pod {} on {} cannot ping pod {} on {} ({said})",
            self.client.ip, NODES[0], self.server.ip, NODES[1]
        )];
        let mut drops = Vec::new();
        for (n, d) in self.nodes.iter().zip(&self.dataplanes) {
            let Ok(now) = d.drops() else { continue };
            for (k, v) in now {
                let grew = v - before.get(&k).copied().unwrap_or(0).min(v);
                if grew > 0 && k != "unsupported_ethertype" {
                    drops.push(format!("{} {k}={grew}", n.name));
                }
            }
        }
        if !drops.is_empty() {
            why.push(format!("dataplane drops while pinging: {}", drops.join(", ")));
        }
        why.extend(self.log_problems());
        bail!("{}", why.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses_as_the_lab_reads_it() {
        for (encap, vx, ip) in [(Encap::Vxlan, "Always", "Never"), (Encap::Ipip, "Never", "Always")]
        {
            let m = manifest(encap, "10.65.0.0/16", 26);
            let (objs, skipped) = ocelot_control::model::parse_documents(&m).unwrap();
            assert!(skipped.is_empty(), "{skipped:?}");
            assert_eq!(objs.len(), 6, "pool, 2 nodes, namespace, 2 pods:\n{m}");
            assert!(m.contains(&format!("vxlanMode: {vx}\n  ipipMode: {ip}\n")), "{m}");
            assert!(m.contains("cidr: 10.65.0.0/16\n  blockSize: 26\n"), "{m}");
            let pods: Vec<_> = objs
                .iter()
                .filter_map(|o| match o {
                    ocelot_control::model::Object::Pod(p) => {
                        Some((p.key(), p.spec.node_name.clone()))
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(
                pods,
                [
                    ("perf/client".to_string(), Some("node-1".to_string())),
                    ("perf/server".to_string(), Some("node-2".to_string()))
                ]
            );
        }
    }

    #[test]
    fn the_server_serves_its_ports() {
        let m = manifest_serving(Encap::Vxlan, "10.65.0.0/16", 26, &[80, 8080]);
        let (objs, skipped) = ocelot_control::model::parse_documents(&m).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let ports: Vec<_> = objs
            .iter()
            .filter_map(|o| match o {
                ocelot_control::model::Object::Pod(p) => Some((
                    p.key(),
                    p.spec
                        .containers
                        .iter()
                        .flat_map(|c| c.ports.iter().map(|p| p.container_port))
                        .collect::<Vec<_>>(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            ports,
            [("perf/client".to_string(), vec![]), ("perf/server".to_string(), vec![80, 8080])]
        );
    }

    // `ocelot lab get pods -o json` on the vxlan manifest (2026-11-23).
    const PODS: &str = r#"[
  {"containerID": "cc95c01e67bd", "ip": "10.65.0.0", "ips": ["10.65.0.0"], "name": "client",
   "namespace": "perf", "netns": "/run/netns/ocl-pfxman-pod-perf.client", "node": "node-1",
   "ports": [], "reason": null, "status": "Running", "uid": "c4213d65"},
  {"containerID": "7c7c95026978", "ip": "10.65.0.64", "ips": ["10.65.0.64"], "name": "server",
   "namespace": "perf", "netns": "/run/netns/ocl-pfxman-pod-perf.server", "node": "node-2",
   "ports": [], "reason": null, "status": "Running", "uid": "484cce91"}
]"#;

    #[test]
    fn pods_from_get_pods() {
        let pods = parse_pods(PODS).unwrap();
        assert_eq!(
            running_pod(&pods, CLIENT, "node-1").unwrap(),
            ("10.65.0.0".into(), "ocl-pfxman-pod-perf.client".into())
        );
        assert_eq!(running_pod(&pods, SERVER, "node-2").unwrap().0, "10.65.0.64");
        let e = running_pod(&pods, SERVER, "node-1").unwrap_err().to_string();
        assert!(e.contains("is on node-2"), "{e}");
        assert!(running_pod(&pods, "nope", "node-1").is_err());

        let mut failed = pods.clone();
        failed[0].status = "Failed".into();
        failed[0].reason = Some("CNI ADD: no IP pool\nmore".into());
        let e = running_pod(&failed, CLIENT, "node-1").unwrap_err().to_string();
        assert_eq!(e, "pod perf/client is Failed: CNI ADD: no IP pool");
        failed[1].ip = None;
        assert!(running_pod(&failed, SERVER, "node-2").is_err());
        assert!(parse_pods("{}").is_err());
    }

    #[test]
    fn nodes_from_get_nodes() {
        let json = r#"[{"agent": {"pid": 14185, "role": "agent node-1", "start_time": 1},
            "cniSocket": "/r/pfxman/nodes/node-1/cni.sock",
            "dataplane": {"pid": 14184, "role": "dataplane node-1", "start_time": 1200613},
            "dataplaneSocket": "/r/pfxman/nodes/node-1/dp.sock", "dir": "/r/pfxman/nodes/node-1",
            "internalIP": "192.0.2.11", "name": "node-1", "netns": "/run/netns/ocl-pfxman-node-node-1"},
           {"agent": null, "cniSocket": "c", "dataplane": null, "dataplaneSocket": "d", "dir": "x",
            "internalIP": "192.0.2.12", "name": "node-2", "netns": "n"}]"#;
        let n = parse_nodes(json).unwrap();
        assert_eq!(n[0].dataplane, Some(LabProc { pid: 14184 }));
        assert_eq!(n[0].dataplane_socket, PathBuf::from("/r/pfxman/nodes/node-1/dp.sock"));
        assert_eq!(n[1].internal_ip, "192.0.2.12");
        assert_eq!(n[1].dataplane, None);
        assert_eq!(n[0].agent, Some(LabProc { pid: 14185 }));
        assert_eq!(n[1].agent, None);
    }

    #[test]
    fn lab_names_fit() {
        let name = format!("{}-{}", unique("pfx"), Encap::Vxlan.name());
        assert!(name.len() <= 20, "{name}");
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }
}
