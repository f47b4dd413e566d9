//! Lab pods: what kubelet and containerd do for a pod sandbox. A network
//! namespace, the conflist's CNI ADD run from the node's namespace, the
//! result remembered; then `ocelot lab serve` on the pod's ports. Deleting
//! runs CNI DEL with the remembered result and removes the namespace.

use crate::lab::cluster::{progress, Lab};
use crate::lab::cni::{self, Attachment, Runner};
use crate::lab::names;
use crate::lab::state::{PodPhase, PodState, PortSpec, Resource};
use crate::lab::sys::{self, ProcRef};
use crate::model::Pod;
use anyhow::Context;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long one CNI plugin may run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// CNI ADDs in flight at once (kubelet runs sandboxes in parallel too).
const PARALLEL_ADDS: usize = 8;
/// How long a pod's server may take to bind its ports.
const SERVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The ports a pod declares, de-duplicated, in order.
pub fn pod_ports(p: &Pod) -> Vec<PortSpec> {
    let mut v: Vec<PortSpec> = p
        .spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter())
        .map(|cp| PortSpec { port: cp.container_port, protocol: cp.protocol.to_ascii_uppercase() })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// One ADD to run.
struct AddJob {
    key: String,
    runner: Runner,
    list: Value,
    att: Attachment,
    caps: serde_json::Map<String, Value>,
}

impl Lab {
    fn runner(&self, node: &str, pod_dir: PathBuf) -> anyhow::Result<Runner> {
        let n =
            self.state.nodes.get(node).with_context(|| format!("node {node} is not in the lab"))?;
        Ok(Runner {
            cni_path: self.state.cni_path(),
            runtime_netns: Some(names::netns_path(&n.netns)),
            timeout: PLUGIN_TIMEOUT,
            log: Some(pod_dir.join("cni.log")),
        })
    }

    /// The node's rendered conflist, read as containerd reads net.d.
    fn node_conflist(&self, node: &str) -> anyhow::Result<Value> {
        let p = self.state.nodes[node].conflist();
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        cni::parse_conflist(&text)
    }

    fn attachment(p: &PodState) -> Attachment {
        Attachment {
            container_id: p.container_id.clone(),
            netns: p.netns_path(),
            ifname: p.ifname.clone(),
            args: cni::cni_args(&p.namespace, &p.name, &p.container_id, &p.uid),
        }
    }

    /// Attach pods: namespaces, CNI ADDs (in parallel), servers. Returns the
    /// pods that failed, each already cleaned up (DEL run, namespace gone)
    /// and marked `Failed`.
    pub fn attach_pods(&mut self, pods: Vec<Pod>) -> anyhow::Result<Vec<(String, anyhow::Error)>> {
        let mut failures = Vec::new();
        let mut jobs = Vec::new();
        for p in &pods {
            let key = p.key();
            let node = p.spec.node_name.clone().unwrap_or_default();
            let st = PodState {
                namespace: p.namespace().to_string(),
                name: p.metadata.name.clone(),
                node: node.clone(),
                netns: names::pod_netns(&self.state.name, p.namespace(), &p.metadata.name),
                container_id: names::container_id(),
                uid: names::pod_uid(),
                ifname: names::POD_IFNAME.into(),
                ips: Vec::new(),
                result: None,
                capability_args: Default::default(),
                ports: pod_ports(p),
                server: None,
                phase: PodPhase::Pending,
            };
            let pod_dir = self.state.pod_dir(&st.namespace, &st.name);
            let prepared = (|| -> anyhow::Result<AddJob> {
                let caps = cni::capability_args(
                    &p.metadata.annotations,
                    &p.ports().cloned().collect::<Vec<_>>(),
                )?;
                let mut st = st.clone();
                st.capability_args = caps.clone();
                self.state.pods.insert(key.clone(), st.clone());
                self.state.record(Resource::Netns { name: st.netns.clone() })?;
                std::fs::create_dir_all(&pod_dir)?;
                sys::netns_add(&st.netns)?;
                Ok(AddJob {
                    key: key.clone(),
                    runner: self.runner(&node, pod_dir.clone())?,
                    list: self.node_conflist(&node)?,
                    att: Lab::attachment(&st),
                    caps,
                })
            })();
            match prepared {
                Ok(j) => jobs.push(j),
                Err(e) => {
                    self.fail_pod(&key, &e);
                    failures.push((key, e));
                }
            }
        }
        if !jobs.is_empty() {
            progress!("CNI ADD for {} pod(s)", jobs.len());
        }
        let mut results: Vec<(String, anyhow::Result<Value>)> = Vec::new();
        for chunk in jobs.chunks(PARALLEL_ADDS) {
            let done: Vec<(String, anyhow::Result<Value>)> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|j| {
                        s.spawn(move || {
                            (j.key.clone(), cni::add(&j.runner, &j.list, &j.att, &j.caps))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("CNI ADD thread")).collect()
            });
            results.extend(done);
        }
        let mut servers = Vec::new();
        for (key, r) in results {
            let outcome = r.and_then(|result| {
                let ips = cni::result_ips(&result);
                if ips.is_empty() {
                    anyhow::bail!("the CNI result has no address: {result}");
                }
                let p = self.state.pods.get_mut(&key).expect("recorded");
                p.ips = ips;
                p.result = Some(result);
                self.state.save()?;
                self.start_server(&key)
            });
            match outcome {
                Ok(ready) => servers.push((key, ready)),
                Err(e) => {
                    self.fail_pod(&key, &e);
                    failures.push((key, e));
                }
            }
        }
        // Wait for every server to have bound its ports.
        let end = Instant::now() + SERVER_TIMEOUT;
        for (key, ready) in servers {
            let r = match ready {
                None => Ok(()),
                Some(f) => wait_file(&f, end).map(|text| {
                    if text.trim() != "ok" {
                        eprintln!("warning: pod {key}: {}", text.trim().replace('\n', "; "));
                    }
                }),
            };
            match r {
                Ok(()) => {
                    let p = self.state.pods.get_mut(&key).expect("recorded");
                    p.phase = PodPhase::Running;
                    let ports: Vec<String> =
                        p.ports.iter().map(|x| format!("{}/{}", x.port, x.protocol)).collect();
                    progress!(
                        "pod {key}: {} on {}, serving {}",
                        p.ips.join(","),
                        p.node,
                        if ports.is_empty() { "nothing".into() } else { ports.join(" ") }
                    );
                    self.state.save()?;
                }
                Err(e) => {
                    let pod_dir = self
                        .state
                        .pod_dir(&self.state.pods[&key].namespace, &self.state.pods[&key].name);
                    let e = e.context(format!(
                        "the pod's server did not start; end of its log:\n{}",
                        sys::tail(&pod_dir.join("serve.log"), 5)
                    ));
                    self.fail_pod(&key, &e);
                    failures.push((key, e));
                }
            }
        }
        Ok(failures)
    }

    /// Start `ocelot lab serve` in the pod; the file it writes when ready.
    fn start_server(&mut self, key: &str) -> anyhow::Result<Option<PathBuf>> {
        let p = self.state.pods[key].clone();
        if p.ports.is_empty() {
            return Ok(None);
        }
        let dir = self.state.pod_dir(&p.namespace, &p.name);
        let ready = dir.join("serve.ready");
        let _ = std::fs::remove_file(&ready);
        let exe = std::env::current_exe().context("finding the ocelot binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["lab", "serve", "--pod", key, "--ready-file"]).arg(&ready);
        for port in &p.ports {
            cmd.arg("--port").arg(format!("{}/{}", port.port, port.protocol));
        }
        let child = sys::spawn_daemon(cmd, &p.netns_path(), &dir.join("serve.log"))?;
        let r = ProcRef::of(child.id(), format!("server {key}"));
        self.state.record(Resource::Process { proc: r.clone() })?;
        self.state.pods.get_mut(key).expect("pod").server = Some(r);
        self.state.save()?;
        Ok(Some(ready))
    }

    /// A pod whose ADD (or server) failed: DEL it as containerd does after a
    /// failed ADD, remove its namespace, keep it listed as `Failed`.
    fn fail_pod(&mut self, key: &str, e: &anyhow::Error) {
        eprintln!("==> pod {key}: failed: {e:#}");
        if let Err(e2) = self.teardown_pod(key) {
            eprintln!("    cleaning up after it also failed: {e2:#}");
        }
        if let Some(p) = self.state.pods.get_mut(key) {
            p.phase = PodPhase::Failed { reason: format!("{e:#}") };
            p.ips.clear();
            p.result = None;
        }
        let _ = self.state.save();
    }

    /// Stop the server, CNI DEL, remove the namespace; the pod stays in the
    /// state. Best effort: every step runs, the first error is returned.
    fn teardown_pod(&mut self, key: &str) -> anyhow::Result<()> {
        let Some(p) = self.state.pods.get(key).cloned() else { return Ok(()) };
        let mut first: Option<anyhow::Error> = None;
        if let Some(srv) = &p.server {
            srv.stop(Duration::from_secs(2));
            self.state.forget(&Resource::Process { proc: srv.clone() })?;
            self.state.pods.get_mut(key).expect("pod").server = None;
        }
        if self.state.nodes.contains_key(&p.node) {
            let pod_dir = self.state.pod_dir(&p.namespace, &p.name);
            let r = self.runner(&p.node, pod_dir).and_then(|runner| {
                let list = self.node_conflist(&p.node)?;
                cni::del(
                    &runner,
                    &list,
                    &Lab::attachment(&p),
                    &p.capability_args,
                    p.result.as_ref(),
                )
            });
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        let ns = names::netns_path(&p.netns);
        sys::kill_all_in_netns(&ns, Duration::from_secs(1));
        match sys::netns_del(&p.netns) {
            Ok(()) => self.state.forget(&Resource::Netns { name: p.netns.clone() })?,
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Remove a pod from the lab (the datastore object is the caller's).
    pub fn detach_pod(&mut self, key: &str) -> anyhow::Result<()> {
        let r = self.teardown_pod(key);
        if let Some(p) = self.state.pods.remove(key) {
            let _ = std::fs::remove_dir_all(self.state.pod_dir(&p.namespace, &p.name));
        }
        self.state.save()?;
        r
    }

    /// A running pod's object changed: labels are the datastore's business
    /// (already written); new ports restart its server.
    pub fn update_pod(&mut self, p: &Pod) -> anyhow::Result<()> {
        let key = p.key();
        let ports = pod_ports(p);
        if self.state.pods[&key].ports == ports {
            return Ok(());
        }
        progress!("pod {key}: ports changed; restarting its server");
        if let Some(srv) = self.state.pods[&key].server.clone() {
            srv.stop(Duration::from_secs(2));
            self.state.forget(&Resource::Process { proc: srv })?;
        }
        {
            let st = self.state.pods.get_mut(&key).expect("pod");
            st.server = None;
            st.ports = ports;
        }
        if let Some(ready) = self.start_server(&key)? {
            wait_file(&ready, Instant::now() + SERVER_TIMEOUT)?;
        }
        self.state.save()
    }

    /// CNI DEL for every attached pod whose agent still runs, in parallel
    /// (`down`). Failures are reported, not fatal.
    pub fn del_all_pods(&mut self) {
        let jobs: Vec<(String, Runner, Value, Attachment, PodState)> = self
            .state
            .pods
            .values()
            .filter(|p| p.result.is_some())
            .filter(|p| {
                self.state.nodes.get(&p.node).is_some_and(|n| {
                    n.agent.as_ref().is_some_and(ProcRef::alive)
                        && crate::lab::node::socket_ready(&n.cni_socket())
                })
            })
            .filter_map(|p| {
                let runner =
                    self.runner(&p.node, self.state.pod_dir(&p.namespace, &p.name)).ok()?;
                let runner = Runner { timeout: Duration::from_secs(10), ..runner };
                let list = self.node_conflist(&p.node).ok()?;
                Some((p.key(), runner, list, Lab::attachment(p), p.clone()))
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        progress!("CNI DEL for {} pod(s)", jobs.len());
        for chunk in jobs.chunks(PARALLEL_ADDS) {
            std::thread::scope(|s| {
                for (key, runner, list, att, p) in chunk {
                    s.spawn(move || {
                        if let Err(e) =
                            cni::del(runner, list, att, &p.capability_args, p.result.as_ref())
                        {
                            eprintln!("warning: pod {key}: {e:#}");
                        }
                    });
                }
            });
        }
        for (key, ..) in jobs {
            if let Some(p) = self.state.pods.get_mut(&key) {
                p.result = None;
            }
        }
        let _ = self.state.save();
    }
}

/// Wait for a file to appear and return its content.
fn wait_file(p: &std::path::Path, until: Instant) -> anyhow::Result<String> {
    loop {
        if let Ok(t) = std::fs::read_to_string(p) {
            return Ok(t);
        }
        if Instant::now() >= until {
            anyhow::bail!("{} did not appear", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    #[test]
    fn ports_are_collected_once_and_uppercased() {
        let (objs, _) = parse_documents(
            "kind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n\
             \x20 - ports: [{containerPort: 81, protocol: udp}, {containerPort: 80}]\n\
             \x20 - ports: [{containerPort: 80, protocol: TCP}, {containerPort: 82, protocol: SCTP}]\n",
        )
        .unwrap();
        let crate::model::Object::Pod(p) = &objs[0] else { panic!() };
        let ports: Vec<String> =
            pod_ports(p).iter().map(|x| format!("{}/{}", x.port, x.protocol)).collect();
        assert_eq!(ports, ["80/TCP", "81/UDP", "82/SCTP"]);
    }
}
