//! The lab's state file, `<run-dir>/<lab>/state.json`: what the lab made
//! (recorded *before* making it, so `ocelot lab down` can undo everything
//! even after a crash), and the nodes and pods as the lab runs them.
//!
//! Commands that change the lab hold an exclusive `flock` on
//! `<run-dir>/<lab>/lock`; the file is replaced atomically (write, fsync,
//! rename), so readers (`get`, `probe`) never need the lock.

use crate::lab::sys::ProcRef;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = "lock";
/// Bumped when the format changes incompatibly.
pub const FORMAT: u32 = 1;

/// One thing the lab created, in creation order. Teardown walks the list
/// backwards. Devices live in the lab's namespaces and vanish with them;
/// they are listed so teardown can remove them explicitly first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// A named network namespace (`/run/netns/<name>`).
    Netns { name: String },
    /// A network device in one of the lab's namespaces.
    Link { netns: String, name: String },
    /// A background process (its own session and process group).
    Process { proc: ProcRef },
}

/// Where a pod is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "PascalCase")]
pub enum PodPhase {
    /// Recorded; its namespace and CNI ADD are under way.
    Pending,
    /// Attached: it has its addresses and its server runs.
    Running,
    /// The attach failed (CNI ADD error, server did not start, ...).
    Failed { reason: String },
}

impl PodPhase {
    pub fn name(&self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Failed { .. } => "Failed",
        }
    }
}

/// A port a pod serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// A node of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    /// Small number, unique in the lab: the bridge port's name and the
    /// fabric address derive from it.
    pub index: u32,
    pub netns: String,
    /// The underlay subnet it sits on (`lab.ocelot.dev/subnet`; 0 is the
    /// fabric CIDR).
    #[serde(default)]
    pub subnet: u32,
    /// The node's address on its subnet (its `InternalIP`).
    pub fabric_ip: String,
    /// Its subnet's prefix length.
    pub fabric_prefix: u8,
    /// `<lab dir>/nodes/<node>`.
    pub dir: PathBuf,
    #[serde(default)]
    pub dataplane: Option<ProcRef>,
    #[serde(default)]
    pub agent: Option<ProcRef>,
}

impl NodeState {
    pub fn dataplane_socket(&self) -> PathBuf {
        self.dir.join("dp.sock")
    }
    pub fn cni_socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }
    /// The rendered conflist (what containerd reads from `/etc/cni/net.d`).
    pub fn conflist(&self) -> PathBuf {
        self.dir.join("cni").join("10-ocelot.conflist")
    }
    /// Its address with its subnet's prefix (`ocelot.dev/underlay-cidr`).
    pub fn underlay_cidr(&self) -> String {
        format!("{}/{}", self.fabric_ip, self.fabric_prefix)
    }
}

/// A pod of the lab: what kubelet and containerd would remember.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    /// The sandbox ID (`CNI_CONTAINERID`).
    pub container_id: String,
    pub uid: String,
    pub ifname: String,
    /// Addresses from the CNI result, without prefix length.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The final result of the ADD chain (the `prevResult` of DEL, as
    /// libcni caches it).
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Capability arguments given at ADD (given again at DEL).
    #[serde(default)]
    pub capability_args: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub server: Option<ProcRef>,
    pub phase: PodPhase,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    pub fn netns_path(&self) -> PathBuf {
        crate::lab::names::netns_path(&self.netns)
    }
}

/// Everything the state file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub format: u32,
    pub name: String,
    /// `<run-dir>/<lab>`: state, datastore, node directories, logs.
    pub dir: PathBuf,
    /// Where `ocelot-dataplane`, `ocelot-cni` and `ocelot` (the agent) are.
    pub bin_dir: PathBuf,
    /// The standard CNI plugins (portmap, bandwidth, ...).
    pub cni_plugin_dir: PathBuf,
    /// The fabric subnet (underlay subnet 0), e.g. `192.0.2.0/24`.
    pub fabric_cidr: String,
    /// Underlay subnets 1, 2, ... (see `underlay.rs`).
    #[serde(default)]
    pub subnet_cidrs: Vec<String>,
    /// MTU written into the conflist.
    pub mtu: u32,
    /// The conflist template, parsed.
    pub conflist: serde_json::Value,
    pub created: Vec<Resource>,
    pub nodes: BTreeMap<String, NodeState>,
    /// By `namespace/name`.
    pub pods: BTreeMap<String, PodState>,
    /// The Service cluster-IP range (the API server's flag, and the agents').
    #[serde(default = "default_service_cidr")]
    pub service_cidr: String,
    /// The NodePort range, inclusive.
    #[serde(default = "ocelot_dataplane::api::default_node_port_range")]
    pub node_port_range: (u16, u16),
    /// Clients outside the cluster, on the fabric (`ocelot lab external`).
    #[serde(default)]
    pub externals: BTreeMap<String, ExternalState>,
}

fn default_service_cidr() -> String {
    crate::services::DEFAULT_SERVICE_CIDR.to_string()
}

/// A namespace on an underlay subnet, outside the cluster: a client of
/// NodePorts, a server for pods leaving through natOutgoing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalState {
    pub name: String,
    pub netns: String,
    pub subnet: u32,
    /// Its address on the subnet.
    pub ip: String,
    pub prefix: u8,
    /// Its port on the subnet's bridge (in the fabric namespace).
    pub link: String,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub server: Option<ProcRef>,
}

impl LabState {
    pub fn datastore(&self) -> PathBuf {
        self.dir.join("datastore")
    }
    /// The directory put first on `CNI_PATH`: `ocelot` -> `ocelot-cni`.
    pub fn cni_bin(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }
    pub fn pod_dir(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join("pods").join(format!("{namespace}.{name}"))
    }
    /// `CNI_PATH`, as containerd would set it.
    pub fn cni_path(&self) -> Vec<PathBuf> {
        vec![self.cni_bin(), self.cni_plugin_dir.clone()]
    }

    pub fn load(path: &Path) -> anyhow::Result<LabState> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: LabState = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a lab state file", path.display()))?;
        if s.format != FORMAT {
            anyhow::bail!(
                "{}: state format {} (this ocelot reads {FORMAT}); use the ocelot that made it",
                path.display(),
                s.format
            );
        }
        Ok(s)
    }

    /// Write atomically: a reader sees the old file or the new one.
    pub fn save(&self) -> anyhow::Result<()> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self)?;
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Record a resource and save, before the caller creates it.
    pub fn record(&mut self, r: Resource) -> anyhow::Result<()> {
        if !self.created.contains(&r) {
            self.created.push(r);
        }
        self.save()
    }

    /// Forget a resource that is gone, and save.
    pub fn forget(&mut self, r: &Resource) -> anyhow::Result<()> {
        self.created.retain(|x| x != r);
        self.save()
    }

    /// The lowest node index not in use (indices start at 1).
    pub fn free_node_index(&self) -> u32 {
        let used: std::collections::BTreeSet<u32> = self.nodes.values().map(|n| n.index).collect();
        (1..).find(|i| !used.contains(i)).unwrap_or(1)
    }
}

/// An exclusive lock on a lab, held until dropped.
pub struct LabLock {
    _file: File,
}

impl LabLock {
    /// Take the lock on `dir` (created if missing), waiting for another
    /// command that holds it.
    pub fn acquire(dir: &Path) -> anyhow::Result<LabLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own; it has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!("==> waiting for another `ocelot lab` command on this lab to finish");
            // SAFETY: as above, blocking this time.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("locking {}", path.display()));
            }
        }
        Ok(LabLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(dir: &Path) -> LabState {
        LabState {
            format: FORMAT,
            name: "t".into(),
            dir: dir.to_path_buf(),
            bin_dir: "/bin".into(),
            cni_plugin_dir: "/usr/lib/cni".into(),
            fabric_cidr: "192.0.2.0/24".into(),
            subnet_cidrs: vec!["198.51.100.0/24".into()],
            mtu: 1500,
            conflist: serde_json::json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}),
            created: vec![],
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            service_cidr: default_service_cidr(),
            node_port_range: (30000, 32767),
            externals: BTreeMap::new(),
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ocelot-lab-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn records_before_and_roundtrips() {
        let dir = tempdir("state");
        let mut s = sample(&dir);
        s.record(Resource::Netns { name: "ocl-t-fabric".into() }).unwrap();
        s.record(Resource::Link { netns: "ocl-t-fabric".into(), name: "ocl-br0".into() }).unwrap();
        s.record(Resource::Netns { name: "ocl-t-fabric".into() }).unwrap();
        s.record(Resource::Process {
            proc: ProcRef { pid: 42, start_time: 7, role: "agent node-1".into() },
        })
        .unwrap();
        s.pods.insert(
            "x/a".into(),
            PodState {
                namespace: "x".into(),
                name: "a".into(),
                node: "n1".into(),
                netns: "ocl-t-pod-x.a".into(),
                container_id: "c".into(),
                uid: "u".into(),
                ifname: "eth0".into(),
                ips: vec!["10.65.0.2".into()],
                result: Some(serde_json::json!({"ips": []})),
                capability_args: Default::default(),
                ports: vec![PortSpec { port: 80, protocol: "TCP".into() }],
                server: None,
                phase: PodPhase::Failed { reason: "boom".into() },
            },
        );
        s.save().unwrap();
        let back = LabState::load(&dir.join(STATE_FILE)).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.created.len(), 3, "no duplicates");
        assert!(!dir.join(".state.json.tmp").exists());
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains("\"kind\": \"netns\""), "{text}");
        assert!(text.contains("\"phase\": \"Failed\""), "{text}");
        s.forget(&Resource::Netns { name: "ocl-t-fabric".into() }).unwrap();
        assert_eq!(LabState::load(&dir.join(STATE_FILE)).unwrap().created.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_other_formats_and_garbage() {
        let dir = tempdir("state-bad");
        let mut s = sample(&dir);
        s.format = 99;
        s.save().unwrap();
        let e = LabState::load(&dir.join(STATE_FILE)).unwrap_err();
        assert!(format!("{e:#}").contains("state format 99"), "{e:#}");
        std::fs::write(dir.join(STATE_FILE), "{").unwrap();
        assert!(LabState::load(&dir.join(STATE_FILE)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_indices_fill_gaps() {
        let dir = std::env::temp_dir();
        let mut s = sample(&dir);
        assert_eq!(s.free_node_index(), 1);
        for (name, index) in [("a", 1), ("c", 3)] {
            s.nodes.insert(
                name.into(),
                NodeState {
                    name: name.into(),
                    index,
                    netns: String::new(),
                    subnet: 0,
                    fabric_ip: String::new(),
                    fabric_prefix: 24,
                    dir: PathBuf::new(),
                    dataplane: None,
                    agent: None,
                },
            );
        }
        assert_eq!(s.free_node_index(), 2);
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempdir("lock");
        let _l = LabLock::acquire(&dir).unwrap();
        let f = File::open(dir.join(LOCK_FILE)).unwrap();
        // SAFETY: flock on an fd we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(r, 0, "a second lock must not be granted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
