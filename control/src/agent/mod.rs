//! The node agent: datastore → IPAM and endpoints → dataplane, and the CNI
//! server the plugin talks to.
//!
//! ```text
//!  datastore dir ──watch──> Cluster ──┐
//!  ocelot-cni ──socket──> CNI server ─┼─> IPAM (shared locked file) ──> endpoints
//!                                     └─> DataplaneLink ──sync/add/remove──> ocelot-dataplane
//! ```
//! The IPAM allocations of this node are the desired endpoints: every
//! (re)connection to the dataplane sends them all (`sync`).

mod cni;
mod dataplane;
pub mod overlay;
pub mod policy;
pub mod pools;
pub mod services;

use crate::datastore::{Cluster, Datastore, DatastoreType, DirDatastore};
use crate::ipam::store::{FileStore, IpamStore};
use crate::ipam::Ipam;
use dataplane::DataplaneLink;
use ocelot_dataplane::api::{Cidr, EndpointSpec, OverlayStatus, Reply, Request};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// `ocelot agent` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (the Node object it runs for).
    #[arg(long, env = "OCELOT_NODE_NAME")]
    pub node: String,
    /// Directory datastore: Kubernetes YAML files (Nodes, Namespaces, Pods,
    /// IPPools), watched for changes. Shared by every node of a lab; IPAM
    /// state lives in its `.ipam/` subdirectory.
    #[arg(long, default_value = "/etc/ocelot/datastore")]
    pub datastore: PathBuf,
    /// Where the cluster is read: `dir` (the --datastore directory) or
    /// `kubernetes` (the API server, through the in-cluster configuration
    /// or KUBECONFIG; see docs/design.md).
    #[arg(long, env = "OCELOT_DATASTORE_TYPE", value_enum, default_value_t = DatastoreType::Dir)]
    pub datastore_type: DatastoreType,
    /// The dataplane's control socket.
    #[arg(long, default_value = "/run/ocelot/dataplane.sock")]
    pub dataplane_socket: PathBuf,
    /// The socket the CNI plugin talks to (created root-only).
    #[arg(long, default_value = "/run/ocelot/cni.sock")]
    pub cni_socket: PathBuf,
    /// MTU of the pods' interfaces (0 = auto: the CNI config's `mtu`, else 1500).
    #[arg(long, default_value_t = 0)]
    pub mtu: u32,
    /// How often the datastore directory is checked for changes, in ms,
    /// besides the kernel's file notifications (which wake the agent at
    /// once): the fallback when notifications are unavailable.
    #[arg(long, default_value_t = 200)]
    pub poll_ms: u64,
    /// VXLAN network identifier (Calico's default).
    #[arg(long, default_value_t = 4096)]
    pub vxlan_vni: u32,
    /// VXLAN UDP port (the IANA port, Calico's default).
    #[arg(long, default_value_t = 4789)]
    pub vxlan_port: u16,
    /// MTU of the uplink (the interface holding the node's InternalIP);
    /// 0 = read it from the interface. Pods get it minus the overhead of
    /// the encapsulation in use (50 VXLAN, 20 IPIP) unless --mtu is set.
    #[arg(long, default_value_t = 0)]
    pub uplink_mtu: u32,
    /// How tunnel traffic crosses the uplink: `xdp` (an XDP program hands
    /// this node's VXLAN/IPIP packets to the dataplane through AF_XDP; an
    /// error when it cannot attach), `socket` (the kernel's UDP and raw
    /// sockets, no XDP; the default: faster on virtual uplinks, see
    /// perf/README.md) or `auto` (XDP when it attaches, else sockets).
    #[arg(long, env = "OCELOT_UPLINK_MODE", default_value = "socket")]
    pub uplink_mode: ocelot_dataplane::api::UplinkMode,
    /// The Service cluster-IP range(s) (the API server's
    /// `--service-cluster-ip-range`); repeatable or comma-separated.
    #[arg(long, env = "OCELOT_SERVICE_CIDR", value_delimiter = ',',
          default_value = crate::services::DEFAULT_SERVICE_CIDR,
          value_parser = services::parse_service_cidr)]
    pub service_cidr: Vec<Cidr>,
    /// The NodePort range, FIRST-LAST (the API server's
    /// `--service-node-port-range`).
    #[arg(long, default_value = "30000-32767", value_parser = crate::services::parse_port_range)]
    pub node_port_range: (u16, u16),
    /// Address of the HTTP endpoints: /livez, /readyz (the DaemonSet's
    /// probes), /metrics (Prometheus) and /status (`ocelot status`).
    /// An empty value disables them.
    #[arg(long, env = "OCELOT_METRICS_ADDR", default_value = "0.0.0.0:9099")]
    pub metrics_addr: crate::ops::http::ListenAddr,
}

/// Attribute keys stored with each allocation, to rebuild endpoints.
pub(crate) mod attr {
    pub const NETNS: &str = "netns";
    pub const IFNAME: &str = "ifname";
    pub const ENDPOINT: &str = "endpoint";
    pub const MTU: &str = "mtu";
    pub const CONTAINER: &str = "containerID";
    /// The pod's UID (`K8S_POD_UID`), so the controller's GC tells a pod
    /// from a later one of the same name.
    pub const POD_UID: &str = crate::k8s::controller_gc::POD_UID_ATTR;
}

pub struct Agent {
    pub node: String,
    pub args: AgentArgs,
    /// IPAM state: the datastore directory's file, or IPAMBlocks on Kubernetes.
    pub ipam: Arc<dyn IpamStore>,
    pub cluster: RwLock<Cluster>,
    datastore: Mutex<Box<dyn Datastore>>,
    /// On Kubernetes: the API client (for IPAM too) and node publishing.
    pub kube: Option<crate::k8s::publish::KubeLink>,
    dataplane: DataplaneLink,
    /// The overlay last applied by the dataplane (None: not yet, or the
    /// dataplane reconnected and needs it again).
    overlay: Mutex<Option<OverlayStatus>>,
    /// Stamp of the IPAM state (other nodes' block claims), `IpamStore::stamp`.
    ipam_stamp: Mutex<Option<String>>,
    /// The NetworkPolicy the dataplane has, per endpoint (emptied when the
    /// connection is re-made, so everything is sent again).
    policies_sent: Mutex<BTreeMap<String, ocelot_dataplane::policy::EndpointPolicy>>,
    /// The policy calculation graph, kept between changes.
    policy_graph: Mutex<Option<crate::policy::calc::Graph>>,
    /// The Services sent, and the problems found (`services.rs`).
    services: services::ServicesState,
    /// Health and activity for the HTTP endpoints (`crate::ops`).
    pub ops: Arc<crate::ops::OpsState>,
}

impl Agent {
    pub fn new(args: AgentArgs) -> anyhow::Result<Agent> {
        let (ds, kube): (Box<dyn Datastore>, _) = match args.datastore_type {
            DatastoreType::Dir => (Box::new(DirDatastore::open(&args.datastore)?), None),
            DatastoreType::Kubernetes => {
                let (ds, link) =
                    crate::k8s::datastore::open_for_agent(&args.node, Duration::from_secs(30))?;
                (Box::new(ds), Some(link))
            }
        };
        // On Kubernetes, IPAM state is IPAMBlocks, through the datastore's
        // client; a watch on them makes `ipam_changed` free.
        let ipam: Arc<dyn IpamStore> = match &kube {
            Some(k) => Arc::new(
                crate::k8s::ipam::KubeStore::new(k.client.clone(), k.handle.clone())
                    .with_change_watch(),
            ),
            None => Arc::new(FileStore::open(&args.datastore.join(".ipam"))?),
        };
        Ok(Agent {
            node: args.node.clone(),
            cluster: RwLock::new(ds.cluster().clone()),
            datastore: Mutex::new(ds),
            kube,
            ipam,
            dataplane: DataplaneLink::new(args.dataplane_socket.clone()),
            overlay: Mutex::new(None),
            ipam_stamp: Mutex::new(None),
            policies_sent: Mutex::new(BTreeMap::new()),
            policy_graph: Mutex::new(None),
            services: Default::default(),
            ops: Default::default(),
            args,
        })
    }

    /// The same agent keeping IPAM state in `store` (KubeStore on
    /// Kubernetes) instead of the datastore directory's file.
    pub fn with_ipam_store(mut self, store: Arc<dyn IpamStore>) -> Agent {
        self.ipam = store;
        self
    }

    /// True when the IPAM state changed since the last call.
    fn ipam_changed(&self) -> bool {
        let stamp = self.ipam.stamp();
        let mut g = self.ipam_stamp.lock().unwrap_or_else(|e| e.into_inner());
        let changed = *g != stamp;
        *g = stamp;
        changed
    }

    /// Compute the overlay and hand it to the dataplane when it differs
    /// from what the dataplane has. Errors are logged (and retried on the
    /// next change or reconnect); the dataplane keeps its last good state.
    pub fn sync_overlay(&self) {
        let (cluster, local_ip) = {
            let c = self.cluster.read().unwrap_or_else(|e| e.into_inner());
            let ip = c.nodes.get(&self.node).and_then(overlay::node_ip);
            (c.clone(), ip)
        };
        let Some(local_ip) = local_ip else {
            tracing::debug!("no InternalIP for this node yet; no overlay");
            return;
        };
        let prefix = match ocelot_dataplane::sys::netlink::owner_of(None, local_ip.into()) {
            Ok(Some(o)) => o.prefix,
            Ok(None) => {
                tracing::warn!(%local_ip, "no interface holds this node's InternalIP; no overlay");
                return;
            }
            Err(e) => {
                tracing::warn!("cannot look up the uplink: {e}");
                return;
            }
        };
        let ipam = match self.ipam.load() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read IPAM state: {e}");
                return;
            }
        };
        let settings = overlay::Settings {
            vni: self.args.vxlan_vni,
            vxlan_port: self.args.vxlan_port,
            uplink_mtu: self.args.uplink_mtu,
            uplink_mode: self.args.uplink_mode,
        };
        let spec = match overlay::compute(&cluster, &ipam, &self.node, prefix, &settings) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("no overlay: {e}");
                return;
            }
        };
        let mut g = self.overlay.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref().is_some_and(|st| st.spec == spec) {
            return;
        }
        match self.dataplane.call(Request::SetOverlay { overlay: spec }) {
            Ok(Reply::Overlay { overlay, .. }) => {
                tracing::info!(
                    nodes = overlay.spec.nodes.len(),
                    routes = overlay.spec.routes.len(),
                    uplink = %overlay.uplink,
                    mtu = overlay.uplink_mtu,
                    "overlay applied"
                );
                let published = (overlay.spec.local_ip, overlay.uplink_prefix);
                *g = Some(overlay);
                drop(g);
                self.publish_node(published);
            }
            Ok(r) => {
                self.ops.sync_error("overlay");
                tracing::error!("dataplane answered set_overlay with {r:?}")
            }
            Err(e) => {
                self.ops.sync_error("overlay");
                tracing::error!("dataplane refused the overlay: {e}")
            }
        }
    }

    /// Compute this node's endpoints' NetworkPolicy and send the dataplane
    /// what changed. Errors are logged and retried on the next change.
    pub fn sync_policy(&self) {
        if !self.datastore_ready() {
            // An empty cluster would lift every policy: wait for the lists.
            tracing::debug!("datastore not listed yet; policy not sent");
            return;
        }
        let ipam = match self.ipam.load() {
            Ok(s) => s,
            Err(e) => {
                self.ops.sync_error("ipam");
                tracing::error!("cannot read IPAM state: {e}");
                return;
            }
        };
        let endpoints: BTreeMap<String, String> = {
            let mut st = ipam.clone();
            Ipam { state: &mut st, node: &self.node }
                .node_allocations()
                .into_values()
                .filter(|(_, a)| !a.pod.is_empty())
                .filter_map(|(_, a)| Some((a.attrs.get(attr::ENDPOINT)?.clone(), a.pod.clone())))
                .collect()
        };
        let t0 = std::time::Instant::now();
        let model = {
            let c = self.cluster.read().unwrap_or_else(|e| e.into_inner());
            policy::model(&c, &ipam)
        };
        // The calculation graph recomputes only what the change touches.
        let (want, recomputed) = {
            let mut g = self.policy_graph.lock().unwrap_or_else(|e| e.into_inner());
            let recomputed = match g.as_mut() {
                Some(graph) => graph.update(model, endpoints),
                None => {
                    let n = endpoints.len();
                    *g = Some(crate::policy::calc::Graph::new(model, endpoints));
                    n
                }
            };
            (g.as_ref().map(|g| g.results.clone()).unwrap_or_default(), recomputed)
        };
        self.ops.policy_calculated(t0.elapsed());
        // Never hold the lock across a dataplane request: a stale connection
        // is re-made inside it, and a fresh connection clears `sent`.
        let delta = {
            let sent = self.policies_sent.lock().unwrap_or_else(|e| e.into_inner());
            policy::delta(&sent, &want)
        };
        if delta.is_empty() {
            return;
        }
        let n = delta.len();
        let updates: Vec<_> = delta
            .iter()
            .map(|(k, v)| ocelot_dataplane::api::EndpointPolicyUpdate {
                endpoint: k.clone(),
                policy: v.clone(),
            })
            .collect();
        match self.dataplane_call(Request::SetPolicies { policies: updates }) {
            Ok(_) => {
                let mut sent = self.policies_sent.lock().unwrap_or_else(|e| e.into_inner());
                for (k, v) in delta {
                    sent.insert(k, v);
                }
                sent.retain(|k, _| want.contains_key(k));
                tracing::info!(
                    endpoints = n,
                    recomputed,
                    calc_us = t0.elapsed().as_micros() as u64,
                    "policy sent to the dataplane"
                );
            }
            Err(e) => {
                self.ops.sync_error("policy");
                tracing::error!("dataplane refused the policy: {e}")
            }
        }
    }

    /// The MTU for a new pod when none is configured: the uplink's minus the
    /// encapsulation overhead, once the overlay is known.
    pub fn auto_mtu(&self) -> Option<u32> {
        let uplink = self.overlay.lock().unwrap_or_else(|e| e.into_inner()).as_ref()?.uplink_mtu;
        let c = self.cluster.read().unwrap_or_else(|e| e.into_inner());
        Some(overlay::pod_mtu(uplink, c.pools.values()))
    }

    /// Has the datastore read the whole cluster once (Kubernetes: every
    /// watcher listed)? And the error keeping it from being current.
    pub fn datastore_ready(&self) -> bool {
        self.datastore.lock().unwrap_or_else(|e| e.into_inner()).ready()
    }

    pub fn datastore_error(&self) -> Option<String> {
        self.datastore.lock().unwrap_or_else(|e| e.into_inner()).last_error()
    }

    /// On Kubernetes: this node's VTEP MAC and underlay address as
    /// annotations, and NetworkUnavailable=False, once the dataplane has
    /// the overlay (`underlay`: its address and prefix).
    fn publish_node(&self, underlay: (std::net::Ipv4Addr, u8)) {
        let Some(k) = &self.kube else { return };
        let node =
            self.cluster.read().unwrap_or_else(|e| e.into_inner()).nodes.get(&self.node).cloned();
        if let Some(node) = node {
            k.publish_node(&node, underlay);
        }
    }

    /// A Warning Event regarding this node (Kubernetes only; rate-limited).
    pub fn warn_event(&self, reason: &str, note: &str) {
        if let Some(k) = &self.kube {
            k.warn(reason, note);
        }
    }

    /// Re-read the datastore; true when something changed.
    pub fn refresh(&self) -> bool {
        let mut ds = self.datastore.lock().unwrap_or_else(|e| e.into_inner());
        if ds.refresh() {
            *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = ds.cluster().clone();
            true
        } else {
            false
        }
    }

    /// The pool CIDRs routed into this node's dataplane: every enabled pool,
    /// and the node's podCIDR.
    pub fn dataplane_pools(&self) -> Vec<Cidr> {
        let c = self.cluster.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Cidr> = c
            .pools
            .values()
            .filter(|p| !p.spec.disabled)
            .filter_map(|p| p.spec.cidr.parse().ok())
            .collect();
        if let Some(pc) = c
            .nodes
            .get(&self.node)
            .and_then(|n| n.spec.pod_cidr.as_ref())
            .and_then(|s| s.parse().ok())
        {
            v.push(pc);
        }
        v.into_iter().map(|c| crate::ipam::network(&c)).collect()
    }

    /// This node's endpoints, from its IPAM allocations.
    pub fn desired_endpoints(&self) -> Vec<EndpointSpec> {
        let st = match self.ipam.load() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read IPAM state: {e}");
                return Vec::new();
            }
        };
        let mut st = st;
        let ipam = Ipam { state: &mut st, node: &self.node };
        ipam.node_allocations()
            .into_values()
            .filter_map(|(ips, a)| {
                Some(EndpointSpec {
                    name: a.attrs.get(attr::ENDPOINT)?.clone(),
                    netns: a.attrs.get(attr::NETNS)?.into(),
                    ifname: a.attrs.get(attr::IFNAME)?.clone(),
                    mac: None,
                    ips,
                    mtu: a.attrs.get(attr::MTU).and_then(|m| m.parse().ok()).unwrap_or(1500),
                })
            })
            .collect()
    }

    /// Connect to the dataplane if needed (with a full sync, and the
    /// overlay).
    pub fn ensure_dataplane(&self) -> bool {
        match self.dataplane.ensure(|| (self.desired_endpoints(), self.dataplane_pools())) {
            Ok(fresh) => {
                if fresh {
                    *self.overlay.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.policies_sent.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    self.services.reset();
                    self.sync_overlay();
                    self.sync_policy();
                    self.sync_services();
                }
                true
            }
            Err(e) => {
                tracing::debug!("{e}");
                self.warn_event("DataplaneUnreachable", &e.to_string());
                false
            }
        }
    }

    /// One request to the dataplane. A connection found dead (the dataplane
    /// restarted since the last request) is re-made, with its full sync,
    /// and the request sent once more, rather than failing a pod's ADD.
    pub fn dataplane_call(
        &self,
        req: Request,
    ) -> Result<Reply, ocelot_dataplane::api::client::ClientError> {
        use ocelot_dataplane::api::client::ClientError;
        match self.dataplane.call(req.clone()) {
            Err(ClientError::Io(_) | ClientError::Protocol(_)) if self.ensure_dataplane() => {
                tracing::info!("dataplane connection was stale; reconnected");
                self.dataplane.call(req)
            }
            r => r,
        }
    }

    /// Bring the dataplane up to date after a datastore or IPAM change: the
    /// endpoints whole (this node's few), then overlay, policy and Services,
    /// each sent only if it changed. The connection is kept: dropping it
    /// would make the next connect resend every policy and the whole
    /// Services spec (1.7 MB for 5,000 Services) on any pod change.
    pub fn resync(&self) {
        if !self.dataplane.connected() {
            self.ensure_dataplane();
            return;
        }
        let req =
            Request::Sync { endpoints: self.desired_endpoints(), pools: self.dataplane_pools() };
        match self.dataplane_call(req) {
            Ok(_) => {
                self.sync_overlay();
                self.sync_policy();
                self.sync_services();
            }
            Err(e) => {
                self.ops.sync_error("endpoints");
                tracing::warn!("dataplane sync failed (retried at the next change or poll): {e}");
                self.dataplane.reset();
            }
        }
    }
}

/// Watch the datastore directory and its IPAM state through the kernel's
/// file notifications (inotify), so a change is picked up within
/// milliseconds rather than at the next poll. `None` (logged) when the
/// watch cannot be set up: the agent then polls.
fn watch_datastore(
    dir: &std::path::Path,
) -> Option<(notify::RecommendedWatcher, std::sync::mpsc::Receiver<()>)> {
    use notify::Watcher as _;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut w = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.send(());
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("no file notifications, polling the datastore: {e}");
            return None;
        }
    };
    for d in [dir.to_path_buf(), dir.join(".ipam")] {
        if let Err(e) = w.watch(&d, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), "cannot watch, polling it: {e}");
        }
    }
    Some((w, rx))
}

/// The endpoint name for a handle: unique per container and interface,
/// 15 characters at most (it names the TAP before it moves into the pod).
pub fn endpoint_name(handle: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in handle.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("oc{:013x}", h & 0x000f_ffff_ffff_ffff)
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let set = ocelot_dataplane::sys::signals::block_termination();
    let agent = Arc::new(Agent::new(args.clone())?);
    tracing::info!(node = %agent.node, datastore = %args.datastore.display(), "agent starting");
    if !agent.cluster.read().unwrap_or_else(|e| e.into_inner()).nodes.contains_key(&agent.node) {
        tracing::warn!(node = %agent.node, "no Node object with this name in the datastore yet");
    }
    cni::serve(&args.cni_socket, agent.clone())?;
    if let Some(addr) = args.metrics_addr.0 {
        let bound = crate::ops::http::serve(addr, agent.ops.clone(), agent.clone())
            .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
        tracing::info!(%bound, "serving /livez /readyz /metrics /status");
    }
    let a = agent.clone();
    let wake = match args.datastore_type {
        DatastoreType::Dir => watch_datastore(&args.datastore).map(|(w, rx)| (Some(w), rx)),
        DatastoreType::Kubernetes => agent
            .datastore
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .subscribe()
            .map(|rx| (None, rx)),
    };
    std::thread::Builder::new().name("ocelot-watch".into()).spawn(move || loop {
        a.ops.tick();
        a.ops.set_dataplane(a.dataplane.connected());
        {
            let ds = a.datastore.lock().unwrap_or_else(|e| e.into_inner());
            a.ops.set_datastore(ds.ready(), ds.last_error());
        }
        let changed = a.refresh();
        if changed {
            tracing::info!("datastore changed");
            a.resync();
        } else if !a.dataplane.connected() {
            a.ensure_dataplane();
        } else if a.ipam_changed() {
            a.sync_overlay();
            a.sync_policy();
        }
        // Woken by the filesystem as soon as a file changes; the poll
        // interval remains the fallback (and the retry pace).
        let poll = Duration::from_millis(a.args.poll_ms);
        match &wake {
            Some((_, rx)) => {
                if rx.recv_timeout(poll).is_ok() {
                    // Let a burst of writes land, then take them all at once.
                    std::thread::sleep(Duration::from_millis(2));
                    while rx.try_recv().is_ok() {}
                }
            }
            None => std::thread::sleep(poll),
        }
    })?;
    agent.ensure_dataplane();
    ocelot_dataplane::sys::signals::wait(&set);
    tracing::info!("agent stopping; the dataplane keeps forwarding");
    let _ = std::fs::remove_file(&args.cni_socket);
    Ok(())
}
