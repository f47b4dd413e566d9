//! The lab as a whole: `up`, `apply`, `delete`, `down`, and the datastore
//! directory the agents watch (one YAML file per object, replaced
//! atomically). Nodes are in `node.rs`, pods in `pod.rs`.

use crate::lab::names;
use crate::lab::state::{LabLock, LabState, PodPhase, Resource, FORMAT, STATE_FILE};
use crate::lab::sys::{self, ProcRef};
use crate::lab::underlay;
use crate::model::{Namespace, Node, Object, ObjectMeta, Pod};
use anyhow::{anyhow, bail, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Print a progress line (stderr, so stdout stays machine-readable).
macro_rules! progress {
    ($($t:tt)*) => { eprintln!("==> {}", format!($($t)*)) };
}
pub(crate) use progress;

/// How `up` builds the lab.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub bin_dir: PathBuf,
    pub cni_plugin_dir: PathBuf,
    /// The conflist template (the shipped one when `None`).
    pub conflist: Option<PathBuf>,
    pub mtu: u32,
    /// Underlay subnet 0 (bridge `ocl-br0`).
    pub fabric_cidr: String,
    /// Underlay subnets 1, 2, ... (see `underlay.rs`).
    pub subnet_cidrs: Vec<String>,
    /// How long nodes may take to open their sockets.
    pub ready_timeout: Duration,
    /// The Service cluster-IP range.
    pub service_cidr: String,
    /// The NodePort range, inclusive.
    pub node_port_range: (u16, u16),
}

/// A lab, locked for changes while this value lives.
pub struct Lab {
    pub state: LabState,
    _lock: LabLock,
}

/// Split the objects of a file into kinds, in the order they are applied.
#[derive(Default, Debug)]
pub struct Objects {
    pub pools: Vec<Object>,
    /// NetworkPolicies, Services and EndpointSlices: written to the
    /// datastore as they are, acted on by the agents.
    pub policies: Vec<Object>,
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
}

impl Objects {
    pub fn from_text(text: &str, origin: &str) -> anyhow::Result<Objects> {
        let (objs, skipped) =
            crate::model::parse_documents(text).with_context(|| format!("reading {origin}"))?;
        for s in skipped {
            eprintln!(
                "note: {origin}: {s} ignored (the lab reads Nodes, Namespaces, Pods, IPPools, NetworkPolicies)"
            );
        }
        let mut o = Objects::default();
        let mut seen = BTreeSet::new();
        for obj in objs {
            if !seen.insert(obj.key()) {
                bail!("{origin}: {} appears twice", obj.key());
            }
            names::validate_object_name(obj.kind(), &obj.meta().name).map_err(|e| anyhow!(e))?;
            match obj {
                Object::IpPool(_) => o.pools.push(obj),
                Object::NetworkPolicy(ref p) => {
                    names::validate_object_name("Namespace", p.namespace())
                        .map_err(|e| anyhow!(e))?;
                    o.policies.push(obj)
                }
                Object::Service(ref s) => {
                    names::validate_object_name("Namespace", s.namespace())
                        .map_err(|e| anyhow!(e))?;
                    o.policies.push(obj)
                }
                Object::EndpointSlice(ref s) => {
                    names::validate_object_name("Namespace", s.namespace())
                        .map_err(|e| anyhow!(e))?;
                    o.policies.push(obj)
                }
                Object::Namespace(n) => o.namespaces.push(n),
                Object::Node(n) => o.nodes.push(n),
                Object::Pod(p) => {
                    names::validate_object_name("Namespace", p.namespace())
                        .map_err(|e| anyhow!(e))?;
                    o.pods.push(p)
                }
            }
        }
        Ok(o)
    }

    pub fn read(path: &Path) -> anyhow::Result<Objects> {
        let text = if path == Path::new("-") {
            std::io::read_to_string(std::io::stdin()).context("reading stdin")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        };
        Objects::from_text(&text, &path.display().to_string())
    }
}

/// A namespace object as the API server stores it: with the
/// `kubernetes.io/metadata.name` label that NetworkPolicies select on.
pub fn normalize_namespace(mut n: Namespace) -> Namespace {
    n.metadata.labels.insert("kubernetes.io/metadata.name".into(), n.metadata.name.clone());
    n
}

/// Give pods without `spec.nodeName` the node with the fewest pods, as a
/// scheduler would. `counts` is updated.
pub fn schedule(pod: &mut Pod, counts: &mut BTreeMap<String, usize>) -> anyhow::Result<()> {
    if pod.spec.node_name.is_some() {
        return Ok(());
    }
    let node = counts
        .iter()
        .min_by_key(|(name, n)| (**n, (*name).clone()))
        .map(|(name, _)| name.clone())
        .ok_or_else(|| anyhow!("pod {}: no node to run on", pod.key()))?;
    *counts.get_mut(&node).expect("present") += 1;
    eprintln!("note: pod {} has no spec.nodeName; scheduled on {node}", pod.key());
    pod.spec.node_name = Some(node);
    Ok(())
}

impl Lab {
    fn lab_dir(run_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        names::validate_lab_name(name).map_err(|e| anyhow!(e))?;
        Ok(run_dir.join(name))
    }

    /// Open a running lab for changes.
    pub fn open(run_dir: &Path, name: &str) -> anyhow::Result<Lab> {
        let dir = Lab::lab_dir(run_dir, name)?;
        if !dir.join(STATE_FILE).exists() {
            bail!("lab {name:?} is not up (no {})", dir.join(STATE_FILE).display());
        }
        let lock = LabLock::acquire(&dir)?;
        let state = LabState::load(&dir.join(STATE_FILE))?;
        Ok(Lab { state, _lock: lock })
    }

    /// Read a lab's state without locking (for `get` and `probe`).
    pub fn read(run_dir: &Path, name: &str) -> anyhow::Result<LabState> {
        let dir = Lab::lab_dir(run_dir, name)?;
        let f = dir.join(STATE_FILE);
        if !f.exists() {
            bail!("lab {name:?} is not up (no {})", f.display());
        }
        LabState::load(&f)
    }

    /// `ocelot lab up`: build the whole lab. On error the lab stays as far
    /// as it got (for its logs); `down` removes it.
    pub fn up(run_dir: &Path, name: &str, opts: &UpOptions, objs: Objects) -> anyhow::Result<Lab> {
        if !sys::is_root() {
            bail!("the lab needs root (network namespaces, veths, setns)");
        }
        let dir = Lab::lab_dir(run_dir, name)?;
        if dir.join(STATE_FILE).exists() {
            bail!(
                "lab {name:?} is already up; `ocelot lab apply` changes it, \
                 `ocelot lab down --name {name}` removes it"
            );
        }
        if objs.nodes.is_empty() {
            bail!("the file declares no Node: a lab needs at least one");
        }
        underlay::check_subnets(&opts.fabric_cidr, &opts.subnet_cidrs)?;
        underlay::check_nodes(
            &opts.fabric_cidr,
            &opts.subnet_cidrs,
            &BTreeMap::new(),
            &objs.nodes,
        )?;
        let template = match &opts.conflist {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
            }
            None => crate::lab::cni::TEMPLATE.to_string(),
        };
        let conflist = crate::lab::cni::parse_conflist(&template)?;
        for (what, p) in [
            ("the dataplane", opts.bin_dir.join("ocelot-dataplane")),
            ("the CNI plugin", opts.bin_dir.join(crate::lab::cni::OCELOT_BINARY)),
        ] {
            if !p.is_file() {
                bail!("{what} is not at {} (build it, or set --bin-dir)", p.display());
            }
        }
        let lock = LabLock::acquire(&dir)?;
        if dir.join(STATE_FILE).exists() {
            bail!("lab {name:?} came up meanwhile");
        }
        let state = LabState {
            format: FORMAT,
            name: name.to_string(),
            dir: dir.clone(),
            bin_dir: opts.bin_dir.clone(),
            cni_plugin_dir: opts.cni_plugin_dir.clone(),
            fabric_cidr: opts.fabric_cidr.clone(),
            subnet_cidrs: opts.subnet_cidrs.clone(),
            mtu: opts.mtu,
            conflist,
            created: Vec::new(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            service_cidr: opts.service_cidr.clone(),
            node_port_range: opts.node_port_range,
            externals: BTreeMap::new(),
        };
        let mut lab = Lab { state, _lock: lock };
        lab.state.save()?;
        lab.prepare_dirs()?;
        lab.check_plugins()?;
        lab.create_fabric()?;
        lab.apply_objects(objs, opts.ready_timeout)?;
        Ok(lab)
    }

    fn prepare_dirs(&self) -> anyhow::Result<()> {
        let s = &self.state;
        for d in [s.datastore(), s.cni_bin(), s.dir.join("nodes"), s.dir.join("pods")] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        // Installed as `ocelot`, the conflist's type, as a DaemonSet would.
        let link = s.cni_bin().join(crate::lab::cni::OCELOT_TYPE);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(s.bin_dir.join(crate::lab::cni::OCELOT_BINARY), &link)
            .with_context(|| format!("creating {}", link.display()))?;
        Ok(())
    }

    /// Every plugin of the conflist must be on `CNI_PATH` before anything
    /// starts.
    fn check_plugins(&self) -> anyhow::Result<()> {
        let runner = crate::lab::cni::Runner {
            cni_path: self.state.cni_path(),
            runtime_netns: None,
            timeout: Duration::from_secs(1),
            log: None,
        };
        for t in crate::lab::cni::plugin_types(&self.state.conflist) {
            runner
                .find(&t)
                .context("install containernetworking-plugins, or set --cni-plugin-dir")?;
        }
        Ok(())
    }

    /// The fabric namespace, a router between the underlay subnets, with
    /// subnet 0's bridge; other subnets' bridges come with their first node.
    fn create_fabric(&mut self) -> anyhow::Result<()> {
        let ns = names::fabric_netns(&self.state.name);
        progress!("fabric: namespace {ns}, routing between the underlay subnets");
        self.state.record(Resource::Netns { name: ns.clone() })?;
        sys::netns_add(&ns)?;
        sys::sysctl_in(&names::netns_path(&ns), "net.ipv4.ip_forward", "1")?;
        self.ensure_subnet(0)?;
        Ok(())
    }

    /// Write an object into the datastore (atomically: a temporary hidden
    /// file, then rename; the agents read `*.yaml` and skip hidden files).
    pub fn write_object(&self, o: &Object) -> anyhow::Result<()> {
        let dir = self.state.datastore();
        let name = names::datastore_file(o);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, crate::model::to_yaml(o))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(&name))
            .with_context(|| format!("writing {}", dir.join(&name).display()))?;
        Ok(())
    }

    pub fn remove_object(&self, o: &Object) -> anyhow::Result<()> {
        let p = self.state.datastore().join(names::datastore_file(o));
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", p.display()))
            }
            _ => Ok(()),
        }
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        let probe = Object::Namespace(Namespace {
            metadata: ObjectMeta { name: ns.into(), ..Default::default() },
        });
        self.state.datastore().join(names::datastore_file(&probe)).exists()
    }

    /// Apply objects: pools and namespaces first, then nodes (new ones are
    /// built and started), then pods (new ones attached). Pod failures do
    /// not stop the others; they are reported together at the end.
    pub fn apply_objects(
        &mut self,
        mut objs: Objects,
        ready_timeout: Duration,
    ) -> anyhow::Result<()> {
        // Check nodes' subnets and pods' nodes before changing anything.
        underlay::check_nodes(
            &self.state.fabric_cidr,
            &self.state.subnet_cidrs,
            &self.state.nodes,
            &objs.nodes,
        )?;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for n in self
            .state
            .nodes
            .keys()
            .cloned()
            .chain(objs.nodes.iter().map(|n| n.metadata.name.clone()))
        {
            counts.entry(n).or_insert(0);
        }
        let mut pods = objs.pods;
        for p in &mut pods {
            if let Some(existing) = self.state.pods.get(&p.key()) {
                if p.spec.node_name.is_none() {
                    p.spec.node_name = Some(existing.node.clone());
                }
            }
        }
        let in_file: BTreeSet<String> = pods.iter().map(Pod::key).collect();
        let placed = self
            .state
            .pods
            .values()
            .filter(|p| !in_file.contains(&p.key()))
            .map(|p| p.node.clone())
            .chain(pods.iter().filter_map(|p| p.spec.node_name.clone()));
        for n in placed {
            if let Some(c) = counts.get_mut(&n) {
                *c += 1;
            }
        }
        for p in &mut pods {
            schedule(p, &mut counts)?;
            let node = p.spec.node_name.as_deref().unwrap_or_default();
            if !counts.contains_key(node) {
                bail!("pod {}: node {node:?} is neither in the lab nor in the file", p.key());
            }
            if let Some(existing) = self.state.pods.get(&p.key()) {
                if existing.node != node {
                    bail!(
                        "pod {}: spec.nodeName is immutable ({} -> {node}); delete the pod first",
                        p.key(),
                        existing.node
                    );
                }
            }
        }
        // Cluster IPs and nodePorts, as the API server allocates them.
        self.prepare_services(&mut objs.policies)?;
        for o in &objs.pools {
            self.write_object(o)?;
        }
        for n in objs.namespaces {
            self.write_object(&Object::Namespace(normalize_namespace(n)))?;
        }
        for o in &objs.policies {
            self.write_object(o)?;
        }
        let missing: BTreeSet<String> = pods
            .iter()
            .map(|p| p.namespace().to_string())
            .filter(|ns| !self.namespace_exists(ns))
            .collect();
        for ns in missing {
            eprintln!("note: namespace {ns} is not declared; creating it");
            let n = Namespace { metadata: ObjectMeta { name: ns, ..Default::default() } };
            self.write_object(&Object::Namespace(normalize_namespace(n)))?;
        }
        let mut new_nodes = Vec::new();
        for n in objs.nodes {
            if self.state.nodes.contains_key(&n.metadata.name) {
                self.write_node(n)?;
            } else {
                new_nodes.push(n);
            }
        }
        if !new_nodes.is_empty() {
            self.add_nodes(new_nodes, ready_timeout)?;
        }
        // Every pod's object is in the datastore before any is attached, as
        // pods exist in the API server before kubelet runs their sandbox.
        let mut to_attach = Vec::new();
        for p in pods {
            self.write_object(&Object::Pod(p.clone()))?;
            match self.state.pods.get(&p.key()) {
                Some(s) if s.phase == PodPhase::Running => self.update_pod(&p)?,
                Some(_) => {
                    // It failed before: start over.
                    self.detach_pod(&p.key())?;
                    to_attach.push(p);
                }
                None => to_attach.push(p),
            }
        }
        let failures = self.attach_pods(to_attach)?;
        self.sync_endpoints().context("deriving EndpointSlices")?;
        if !failures.is_empty() {
            let list: Vec<String> = failures.iter().map(|(k, e)| format!("  {k}: {e:#}")).collect();
            bail!(
                "{} pod(s) failed to start (the rest of the lab is up; \
                 `ocelot lab get pods -o wide --name {}` shows them):\n{}",
                failures.len(),
                self.state.name,
                list.join("\n")
            );
        }
        Ok(())
    }

    /// `ocelot lab delete`: pods first (CNI DEL, namespace removed), then
    /// nodes (with the pods left on them), namespaces (with their pods),
    /// and pools.
    pub fn delete_objects(&mut self, objs: Objects) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        let mut doomed: Vec<String> = objs.pods.iter().map(Pod::key).collect();
        for n in &objs.nodes {
            doomed.extend(
                self.state.pods.values().filter(|p| p.node == n.metadata.name).map(|p| p.key()),
            );
        }
        for ns in &objs.namespaces {
            doomed.extend(
                self.state
                    .pods
                    .values()
                    .filter(|p| p.namespace == ns.metadata.name)
                    .map(|p| p.key()),
            );
        }
        let mut seen = BTreeSet::new();
        doomed.retain(|k| seen.insert(k.clone()));
        for key in doomed {
            let Some(p) = self.state.pods.get(&key).cloned() else {
                eprintln!("note: pod {key} is not in the lab");
                continue;
            };
            progress!("pod {key}: deleting");
            if let Err(e) = self.detach_pod(&key) {
                errors.push(format!("pod {key}: {e:#}"));
            }
            let obj = Object::Pod(Pod {
                metadata: ObjectMeta {
                    name: p.name.clone(),
                    namespace: Some(p.namespace.clone()),
                    ..Default::default()
                },
                ..Default::default()
            });
            self.remove_object(&obj)?;
        }
        for n in &objs.nodes {
            if let Err(e) = self.remove_node(&n.metadata.name) {
                errors.push(format!("node {}: {e:#}", n.metadata.name));
            }
        }
        for n in objs.namespaces {
            self.remove_object(&Object::Namespace(n))?;
        }
        for p in objs.pools.iter().chain(&objs.policies) {
            self.remove_object(p)?;
        }
        if let Err(e) = self.sync_endpoints() {
            errors.push(format!("deriving EndpointSlices: {e:#}"));
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        Ok(())
    }
}

/// `ocelot lab down`: undo everything the state file lists, newest first.
/// With `cni_del`, pods whose node still runs get a CNI DEL first (as a
/// kubelet would before the node goes), so the agent releases addresses.
pub fn down(run_dir: &Path, name: &str, cni_del: bool) -> anyhow::Result<()> {
    let dir = Lab::lab_dir(run_dir, name)?;
    if !dir.exists() {
        eprintln!("lab {name:?} is not up: nothing to do");
        return Ok(());
    }
    let lock = LabLock::acquire(&dir)?;
    let state_file = dir.join(STATE_FILE);
    if !state_file.exists() {
        // A lab that never recorded anything: only files to remove.
        drop(lock);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        let _ = std::fs::remove_dir(run_dir);
        return Ok(());
    }
    let state = LabState::load(&state_file)?;
    let mut lab = Lab { state, _lock: lock };
    progress!(
        "lab {name}: taking down {} pods, {} nodes",
        lab.state.pods.len(),
        lab.state.nodes.len()
    );
    if cni_del {
        lab.del_all_pods();
    }
    let mut errors: Vec<String> = Vec::new();
    // Every process first, all at once: SIGTERM, a grace period, SIGKILL.
    let procs: Vec<ProcRef> = lab
        .state
        .created
        .iter()
        .filter_map(|r| match r {
            Resource::Process { proc } => Some(proc.clone()),
            _ => None,
        })
        .collect();
    stop_all(&procs, Duration::from_secs(3));
    for p in &procs {
        if p.alive() {
            errors.push(format!("{} (pid {}) would not die", p.role, p.pid));
        } else {
            let _ = lab.state.forget(&Resource::Process { proc: p.clone() });
        }
    }
    // Then whatever else runs in the lab's namespaces (`lab exec` leftovers).
    let netnses: Vec<String> = lab
        .state
        .created
        .iter()
        .filter_map(|r| match r {
            Resource::Netns { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for ns in &netnses {
        let n = sys::kill_all_in_netns(&names::netns_path(ns), Duration::from_secs(2));
        if n > 0 {
            eprintln!("note: stopped {n} other process(es) in {ns}");
        }
    }
    for r in lab.state.created.clone().into_iter().rev() {
        let res = match &r {
            Resource::Link { netns, name } => sys::link_del(netns, name),
            Resource::Netns { name } => sys::netns_del(name),
            Resource::Process { .. } => continue,
        };
        match res {
            Ok(()) => {
                let _ = lab.state.forget(&r);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!(
            "lab {name:?} is not fully down (run `ocelot lab down --name {name}` again):\n  {}",
            errors.join("\n  ")
        );
    }
    let lab_dir = lab.state.dir.clone();
    drop(lab);
    std::fs::remove_dir_all(&lab_dir).with_context(|| format!("removing {}", lab_dir.display()))?;
    let _ = std::fs::remove_dir(run_dir);
    progress!("lab {name}: down");
    Ok(())
}

/// SIGTERM every live process, wait up to `grace` for all, SIGKILL the rest.
pub fn stop_all(procs: &[ProcRef], grace: Duration) {
    std::thread::scope(|s| {
        for p in procs {
            s.spawn(move || p.stop(grace));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_split_and_checked() {
        let o = Objects::from_text(
            "kind: Pod\nmetadata: {name: a, namespace: x}\n---\nkind: Node\nmetadata: {name: n1}\n\
             ---\nkind: ConfigMap\nmetadata: {name: c}\n",
            "t",
        )
        .unwrap();
        assert_eq!((o.pods.len(), o.nodes.len(), o.namespaces.len()), (1, 1, 0));
        let dup = "kind: Node\nmetadata: {name: n1}\n---\nkind: Node\nmetadata: {name: n1}\n";
        assert!(Objects::from_text(dup, "t").unwrap_err().to_string().contains("twice"));
        assert!(
            Objects::from_text("kind: Pod\nmetadata: {name: a, namespace: 'x/y'}\n", "t").is_err()
        );
    }

    #[test]
    fn namespaces_get_their_name_label() {
        let n = normalize_namespace(Namespace {
            metadata: ObjectMeta { name: "x".into(), ..Default::default() },
        });
        assert_eq!(n.metadata.labels["kubernetes.io/metadata.name"], "x");
    }

    #[test]
    fn scheduling_spreads_unplaced_pods() {
        let mut counts: BTreeMap<String, usize> =
            [("n1".to_string(), 1), ("n2".to_string(), 0)].into_iter().collect();
        let mut pods: Vec<Pod> = (0..3)
            .map(|i| Pod {
                metadata: ObjectMeta { name: format!("p{i}"), ..Default::default() },
                ..Default::default()
            })
            .collect();
        pods[2].spec.node_name = Some("n1".into());
        for p in &mut pods {
            schedule(p, &mut counts).unwrap();
        }
        let placed: Vec<&str> = pods.iter().map(|p| p.spec.node_name.as_deref().unwrap()).collect();
        assert_eq!(placed, ["n2", "n1", "n1"]);
        let mut none = BTreeMap::new();
        assert!(schedule(&mut Pod::default(), &mut none).is_err());
    }
}
