//! `KubeDatastore`: the agent's [`Datastore`] read from the Kubernetes API.
//!
//! ```text
//!  API server ──list/watch──> watcher (backoff, relist on 410) ──> Reflect<K> ──┐
//!    Nodes, Namespaces, Pods, NetworkPolicies, IPPools,                         ├─> Cluster (shared)
//!    Services, EndpointSlices: converted, one map each                          │     │ refresh()
//!  this node's Pods (spec.nodeName=<node>) ──> kube reflector Store<Pod> (full)  │     v
//!                                                                               └─  agent's copy
//! ```
//!
//! The watchers run on a tokio runtime of their own (one worker thread);
//! the agent's threads stay synchronous. Each watcher converts what it
//! receives (`convert`) and applies it to its map of a shared [`Cluster`]
//! (`watch::Reflect`); `refresh()` copies that Cluster when a watcher
//! changed it. While the API server is unreachable the watchers back off
//! and retry (kube's default backoff, client-go's parameters) and the
//! Cluster stays as it was, so the dataplane keeps forwarding; when the
//! server is back a watch resumes from its last version, or relists when
//! that version expired (410 Gone), and the agent converges without a
//! restart.

use super::convert::{ip_pool_resource, ToModel};
use super::watch::{Reflect, WatcherHealth};
use crate::datastore::{Cluster, Datastore};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::core::DynamicObject;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::runtime::{reflector, WatchStreamExt as _};
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The health entry of the watcher of this node's own pods.
pub const LOCAL_PODS: &str = "Pod (this node)";

/// Makes the backoff of one watcher.
pub type BackoffFactory = Arc<dyn Fn() -> Box<dyn Backoff> + Send + Sync>;

/// How the datastore watches.
#[derive(Clone)]
pub struct Options {
    /// This node's name: its pods are also kept as full objects.
    pub node: String,
    /// The pause after a failed request, growing while failures last:
    /// kube's default (client-go's: 0.8 s doubling to 30 s, with jitter).
    pub backoff: BackoffFactory,
}

impl Options {
    pub fn new(node: &str) -> Options {
        Options {
            node: node.to_string(),
            backoff: Arc::new(|| Box::new(DefaultBackoff::default()) as Box<dyn Backoff>),
        }
    }
}

/// Readiness and health of every watcher.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// By kind (and [`LOCAL_PODS`]).
    pub watchers: BTreeMap<String, WatcherHealth>,
}

impl Health {
    /// Every watcher has completed its initial list.
    pub fn ready(&self) -> bool {
        !self.watchers.is_empty() && self.watchers.values().all(|w| w.listed)
    }

    /// The most recent unresolved error (`kind: error`), else None.
    pub fn failing(&self) -> Option<String> {
        self.watchers.iter().find_map(|(k, w)| w.failing.as_ref().map(|e| format!("{k}: {e}")))
    }

    /// Objects skipped as invalid, as `kind key: error`.
    pub fn invalid(&self) -> Vec<String> {
        self.watchers
            .iter()
            .flat_map(|(k, w)| w.invalid.iter().map(move |(o, e)| format!("{k} {o}: {e}")))
            .collect()
    }
}

#[derive(Default)]
struct State {
    cluster: Cluster,
    /// Bumped on every change of `cluster` or of readiness.
    generation: u64,
    health: Health,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Woken on every change (the agent's loop waits on these).
    wake: Mutex<Vec<mpsc::Sender<()>>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        let mut w = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|tx| tx.send(()).is_ok());
    }
}

/// The cluster as the API server has it. See the module documentation.
pub struct KubeDatastore {
    shared: Arc<Shared>,
    cluster: Cluster,
    seen: u64,
    client: Client,
    local_pods: reflector::Store<Pod>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KubeDatastore {
    /// Connect with the in-cluster configuration, or `KUBECONFIG` /
    /// `~/.kube/config` (`kube::Client::try_default`), and start watching.
    pub fn connect(opts: Options) -> anyhow::Result<KubeDatastore> {
        Self::start(opts, async {
            Client::try_default().await.map_err(|e| {
                anyhow::anyhow!(
                    "no Kubernetes client configuration (in-cluster or KUBECONFIG): {e}"
                )
            })
        })
    }

    /// Start watching through the client `client` makes (it runs on the
    /// datastore's runtime: a client spawns its request buffer there).
    /// Returns at once; [`KubeDatastore::wait_ready`] waits for the lists.
    pub fn start(
        opts: Options,
        client: impl std::future::Future<Output = anyhow::Result<Client>>,
    ) -> anyhow::Result<KubeDatastore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ocelot-kube")
            .enable_all()
            .build()?;
        let client = runtime.block_on(client)?;
        let shared = Arc::new(Shared::default());
        let (local_pods, writer) = reflector::store::<Pod>();
        let mut ds = KubeDatastore {
            shared,
            cluster: Cluster::default(),
            seen: 0,
            client: client.clone(),
            local_pods,
            runtime: None,
        };
        let any = || watcher::Config::default().any_semantic();
        ds.watch(&runtime, &opts, Api::<Node>::all(client.clone()), any());
        ds.watch(&runtime, &opts, Api::<Namespace>::all(client.clone()), any());
        ds.watch(&runtime, &opts, Api::<Pod>::all(client.clone()), any());
        ds.watch(&runtime, &opts, Api::<NetworkPolicy>::all(client.clone()), any());
        ds.watch(
            &runtime,
            &opts,
            Api::<DynamicObject>::all_with(client.clone(), &ip_pool_resource()),
            any(),
        );
        ds.watch(&runtime, &opts, Api::<Service>::all(client.clone()), any());
        ds.watch(&runtime, &opts, Api::<EndpointSlice>::all(client.clone()), any());
        ds.watch_local_pods(&runtime, &opts, Api::<Pod>::all(client), writer);
        ds.runtime = Some(runtime);
        Ok(ds)
    }

    fn register(&self, name: &str) {
        self.shared.lock().health.watchers.insert(name.to_string(), WatcherHealth::default());
    }

    /// One kind: watcher → backoff → convert → its map of the Cluster.
    fn watch<K>(
        &self,
        rt: &tokio::runtime::Runtime,
        opts: &Options,
        api: Api<K>,
        config: watcher::Config,
    ) where
        K: ToModel + Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        self.register(K::KIND);
        let shared = self.shared.clone();
        let stream = watcher::watcher(api, config).backoff((opts.backoff)());
        rt.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut r = Reflect::<K>::default();
            while let Some(ev) = stream.next().await {
                let mut st = shared.lock();
                let was_listed = r.health.listed;
                let changed = match ev {
                    Ok(ev) => r.apply(&mut st.cluster, ev),
                    Err(e) => {
                        r.error(e.to_string());
                        false
                    }
                };
                st.health.watchers.insert(K::KIND.to_string(), r.health.clone());
                let wake = changed || was_listed != r.health.listed;
                if wake {
                    st.generation += 1;
                }
                drop(st);
                if wake {
                    shared.notify();
                }
            }
        });
    }

    /// This node's pods as full objects, in a kube reflector store.
    fn watch_local_pods(
        &self,
        rt: &tokio::runtime::Runtime,
        opts: &Options,
        api: Api<Pod>,
        writer: reflector::store::Writer<Pod>,
    ) {
        self.register(LOCAL_PODS);
        let shared = self.shared.clone();
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node));
        let stream = watcher::watcher(api, config)
            .modify(|p| p.managed_fields_mut().clear())
            .backoff((opts.backoff)())
            .reflect(writer);
        rt.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut h = WatcherHealth::default();
            while let Some(ev) = stream.next().await {
                if ev.is_ok() {
                    h.failing = None;
                }
                match ev {
                    Ok(watcher::Event::InitDone) => {
                        h.listed = true;
                        h.lists += 1;
                        h.events += 1;
                    }
                    Ok(_) => h.events += 1,
                    Err(e) => {
                        if h.failing.as_deref() != Some(e.to_string().as_str()) {
                            tracing::warn!("watch of this node's pods failed: {e}");
                        }
                        h.failing = Some(e.to_string());
                        h.last_error = Some(e.to_string());
                    }
                }
                let mut st = shared.lock();
                let became_ready =
                    h.listed && !st.health.watchers.get(LOCAL_PODS).is_some_and(|w| w.listed);
                st.health.watchers.insert(LOCAL_PODS.to_string(), h.clone());
                if became_ready {
                    st.generation += 1;
                    drop(st);
                    shared.notify();
                }
            }
        });
    }

    /// Readiness and health of every watcher.
    pub fn health(&self) -> Health {
        self.shared.lock().health.clone()
    }

    /// Wait until every watcher has listed once, at most `timeout`; true
    /// when they have.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.shared.wake.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        let end = Instant::now() + timeout;
        loop {
            if self.health().ready() {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // A timeout also re-checks: readiness is polled, not only pushed.
            let _ = rx.recv_timeout(left.min(Duration::from_millis(100)));
        }
    }

    /// The full object of a pod of this node, as the API server has it
    /// (managedFields cleared).
    pub fn local_pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.local_pods.get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// Every pod of this node, as full objects.
    pub fn local_pods(&self) -> Vec<Arc<Pod>> {
        self.local_pods.state()
    }

    /// The client the watchers use (for publishing the node's status).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The runtime the watchers run on, to run other API calls on.
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }
}

/// The agent's Kubernetes datastore: connected, its initial lists waited
/// for (at most `wait`; after that the agent starts anyway and converges
/// when the lists arrive), and the link for IPAM and node publishing.
pub fn open_for_agent(
    node: &str,
    wait: Duration,
) -> anyhow::Result<(KubeDatastore, super::publish::KubeLink)> {
    let mut ds = KubeDatastore::connect(Options::new(node))?;
    if ds.wait_ready(wait) {
        ds.refresh();
        tracing::info!(node, "Kubernetes datastore listed");
    } else {
        let h = ds.health();
        let missing: Vec<&String> =
            h.watchers.iter().filter(|(_, w)| !w.listed).map(|(k, _)| k).collect();
        tracing::warn!(
            ?missing,
            error = h.failing().unwrap_or_default(),
            "the API server has not answered every list yet; starting, and converging when it does"
        );
    }
    let handle = ds.handle().ok_or_else(|| anyhow::anyhow!("the datastore has no runtime"))?;
    let link = super::publish::KubeLink::new(ds.client(), handle, node);
    Ok((ds, link))
}

impl Datastore for KubeDatastore {
    fn refresh(&mut self) -> bool {
        let st = self.shared.lock();
        if st.generation == self.seen {
            return false;
        }
        self.seen = st.generation;
        if st.cluster == self.cluster {
            return false;
        }
        self.cluster = st.cluster.clone();
        true
    }

    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn ready(&self) -> bool {
        self.health().ready()
    }

    fn last_error(&self) -> Option<String> {
        self.health().failing()
    }

    fn subscribe(&mut self) -> Option<mpsc::Receiver<()>> {
        let (tx, rx) = mpsc::channel();
        self.shared.wake.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        Some(rx)
    }
}

impl Drop for KubeDatastore {
    fn drop(&mut self) {
        // Never block (the agent may drop us from anywhere): the watch
        // tasks are cancelled at their next await.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
