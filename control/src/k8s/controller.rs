//! `ocelot controller`: the cluster role, like calico-kube-controllers. One
//! replica at a time (a Lease elects it) garbage-collects IPAM: the
//! allocations of deleted Pods, the blocks and affinities of deleted Nodes,
//! and mends the `BlockAffinity` index. When the cluster has no IPPool at
//! all, it creates the default one from its flags
//! ([`super::default_pool`]).
//!
//! The decisions are [`super::controller_gc`]'s and [`super::lease`]'s;
//! this file reads, writes and waits. Every write is guarded by the block's
//! `resourceVersion`, so a write racing an agent (or a second replica that
//! still believes it leads) fails with a conflict and is decided again on
//! the next pass from fresh state: the controller never overwrites what it
//! did not read.

use super::controller_gc::{self, GcMemory, LivePod};
use super::crd::{spec_from_block, AffinityState, BlockAffinityObject, IpamBlockObject};
use super::ipam::{affinity_object, StoredBlock};
use super::lease::{Attempt, Elector, LeaseLock};
use crate::ipam::IpamState;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use ocelot_dataplane::api::Cidr;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// `ocelot controller` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Seconds between two garbage-collection passes.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub interval_secs: u64,
    /// Consecutive passes an allocation's pod (or a block's node) must be
    /// missing before its address (or block) is freed. 2 or more rides out
    /// a pod missing from one list; 1 frees on the first pass.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub grace_passes: u32,
    /// This replica's name in the Lease (the pod's name, from the downward
    /// API); defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "ocelot-controller")]
    pub lease_name: String,
    /// How long a Lease holds without renewal, in seconds.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// A leader that has not renewed for this long (seconds) stops acting;
    /// shorter than --lease-duration-secs, so two never act at once.
    #[arg(long, default_value_t = 10)]
    pub renew_deadline_secs: u64,
    /// Seconds between two attempts to take or renew the Lease.
    #[arg(long, default_value_t = 2)]
    pub retry_period_secs: u64,
    /// Log what would be freed; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub default_pool: super::default_pool::DefaultPoolArgs,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub freed: usize,
    pub blocks_deleted: usize,
    pub blocks_orphaned: usize,
    /// Allocations whose pod is missing, still within their grace.
    pub waiting: usize,
    /// Writes that lost to a concurrent writer (decided again next pass).
    pub conflicts: usize,
    pub affinities_created: usize,
    pub affinities_deleted: usize,
    /// Lists that failed or came back incomplete (nothing judged on them).
    pub skipped: Vec<String>,
}

/// Every object of `api`, following `continue` tokens; None (logged) when
/// any page fails, so a partial list is never taken for the whole.
async fn list_all<K>(api: &Api<K>, what: &str) -> Option<Vec<K>>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        match api.list(&lp).await {
            Ok(page) => {
                out.extend(page.items);
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(c) => lp.continue_token = Some(c),
                    None => return Some(out),
                }
            }
            Err(e) => {
                tracing::warn!("cannot list {what}: {e}; judging nothing on them this pass");
                return None;
            }
        }
    }
}

/// The IPAM garbage collector: the APIs it reads and writes, and what it
/// remembers between passes.
pub struct Gc {
    blocks: Api<IpamBlockObject>,
    affinities: Api<BlockAffinityObject>,
    pods: Api<Pod>,
    nodes: Api<Node>,
    grace: u32,
    dry_run: bool,
    memory: GcMemory,
}

impl Gc {
    pub fn new(client: kube::Client, grace: u32, dry_run: bool) -> Gc {
        Gc {
            blocks: Api::all(client.clone()),
            affinities: Api::all(client.clone()),
            pods: Api::all(client.clone()),
            nodes: Api::all(client),
            grace,
            dry_run,
            memory: GcMemory::default(),
        }
    }

    /// One pass: read (affinities, blocks, Nodes, Pods — in that order, see
    /// `controller_gc`), decide, write.
    pub async fn pass(&mut self) -> PassReport {
        let mut rep = PassReport::default();
        let affinities = list_all(&self.affinities, "BlockAffinities").await;
        let Some(objects) = list_all(&self.blocks, "IPAMBlocks").await else {
            rep.skipped.push("IPAMBlocks".into());
            return rep;
        };
        let mut stored: BTreeMap<Cidr, StoredBlock> = BTreeMap::new();
        for o in objects {
            let name = o.metadata.name.clone().unwrap_or_default();
            match super::crd::block_from_spec(&name, &o.spec) {
                Ok(block) => {
                    stored.insert(
                        block.cidr,
                        StoredBlock {
                            name,
                            resource_version: o.metadata.resource_version.clone(),
                            block,
                        },
                    );
                }
                Err(e) => tracing::warn!("{e}; left alone"),
            }
        }
        let nodes: Option<BTreeSet<String>> = list_all(&self.nodes, "Nodes")
            .await
            .map(|v| v.into_iter().filter_map(|n| n.metadata.name).collect());
        let pods: Option<BTreeMap<String, LivePod>> = list_all(&self.pods, "Pods")
            .await
            .map(|v| v.into_iter().filter_map(live_pod).collect());
        if nodes.is_none() {
            rep.skipped.push("Nodes".into());
        }
        if pods.is_none() {
            rep.skipped.push("Pods".into());
        }
        let mut state = super::ipam::state_of(&stored);
        let plan = controller_gc::plan(
            &mut self.memory,
            &state,
            pods.as_ref(),
            nodes.as_ref(),
            self.grace,
        );
        rep.waiting = plan.waiting;
        for (cidr, change) in &plan.blocks {
            let Some(s) = stored.get(cidr) else { continue };
            let after = change.apply(&s.block);
            for (ip, handle) in &change.free {
                tracing::info!(
                    %ip, %handle, block = %s.name, dry_run = self.dry_run,
                    "freeing the address of a deleted pod"
                );
            }
            if self.dry_run {
                continue;
            }
            let ok = match &after {
                None => self.delete_block(s, &mut rep).await,
                Some(b) => self.replace_block(s, b, &mut rep).await,
            };
            if ok {
                rep.freed += change.free.len();
                match after {
                    None => {
                        rep.blocks_deleted += 1;
                        state.blocks.remove(cidr);
                    }
                    Some(b) => {
                        if change.drop_affinity {
                            rep.blocks_orphaned += 1;
                        }
                        state.blocks.insert(*cidr, b);
                    }
                }
            }
        }
        match affinities {
            Some(list) if !self.dry_run => self.repair_affinities(&state, &list, &mut rep).await,
            Some(_) => {}
            None => rep.skipped.push("BlockAffinities".into()),
        }
        rep
    }

    async fn replace_block(
        &self,
        s: &StoredBlock,
        b: &crate::ipam::Block,
        rep: &mut PassReport,
    ) -> bool {
        let obj = IpamBlockObject {
            metadata: ObjectMeta {
                name: Some(s.name.clone()),
                resource_version: s.resource_version.clone(),
                ..Default::default()
            },
            spec: spec_from_block(b),
        };
        match self.blocks.replace(&s.name, &PostParams::default(), &obj).await {
            Ok(_) => true,
            Err(e) => {
                self.write_failed(&s.name, "replace", e, rep);
                false
            }
        }
    }

    async fn delete_block(&self, s: &StoredBlock, rep: &mut PassReport) -> bool {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: s.resource_version.clone(),
                uid: None,
            }),
            ..Default::default()
        };
        match self.blocks.delete(&s.name, &dp).await {
            Ok(_) => {
                tracing::info!(block = %s.name, "released the block of a deleted node");
                true
            }
            Err(e) => {
                self.write_failed(&s.name, "delete", e, rep);
                false
            }
        }
    }

    fn write_failed(&self, name: &str, op: &str, e: kube::Error, rep: &mut PassReport) {
        match &e {
            kube::Error::Api(s) if s.code == 409 || s.code == 404 => {
                rep.conflicts += 1;
                tracing::info!(block = %name, "{op} lost to a concurrent write; next pass decides again");
            }
            _ => tracing::warn!(block = %name, "cannot {op} the block: {e}"),
        }
    }

    async fn repair_affinities(
        &self,
        state: &IpamState,
        list: &[BlockAffinityObject],
        rep: &mut PassReport,
    ) {
        let existing: Vec<(String, String, String)> = list
            .iter()
            .map(|a| {
                (
                    a.metadata.name.clone().unwrap_or_default(),
                    a.spec.node.clone(),
                    a.spec.cidr.clone(),
                )
            })
            .collect();
        let (create, delete) = controller_gc::affinity_repairs(state, &existing);
        for (node, cidr) in create {
            let obj = affinity_object(&node, &cidr, AffinityState::Confirmed);
            match self.affinities.create(&PostParams::default(), &obj).await {
                Ok(_) => rep.affinities_created += 1,
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => tracing::warn!(%node, %cidr, "cannot create the BlockAffinity: {e}"),
            }
        }
        for name in delete {
            match self.affinities.delete(&name, &DeleteParams::default()).await {
                Ok(_) => rep.affinities_deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => tracing::warn!(affinity = %name, "cannot delete the BlockAffinity: {e}"),
            }
        }
    }
}

/// A Pod as the GC sees it, keyed `namespace/name`.
fn live_pod(p: Pod) -> Option<(String, LivePod)> {
    let ns = p.metadata.namespace.unwrap_or_else(|| "default".into());
    let name = p.metadata.name?;
    Some((
        format!("{ns}/{name}"),
        LivePod { uid: p.metadata.uid, node: p.spec.and_then(|s| s.node_name) },
    ))
}

fn identity(args: &ControllerArgs) -> String {
    if let Some(i) = args.identity.clone().filter(|i| !i.is_empty()) {
        return i;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("ocelot-controller-{}", std::process::id()))
}

/// The controller's loop: take or renew the Lease every retry period; while
/// leading, run a GC pass every interval. Returns when `stop` resolves.
pub async fn run_with(
    client: kube::Client,
    args: ControllerArgs,
    stop: impl std::future::Future<Output = ()>,
) {
    let me = identity(&args);
    let default_pool = match args.default_pool.spec() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}; no default pool will be created");
            None
        }
    };
    let mut default_pool_done = default_pool.is_none();
    let lock = LeaseLock::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &me,
        Duration::from_secs(args.lease_duration_secs.max(1)),
    );
    let mut elector = Elector::new(Duration::from_secs(args.renew_deadline_secs.max(1)));
    let mut gc: Option<Gc> = None;
    let mut next_pass = Instant::now();
    let mut was_leader = false;
    tracing::info!(identity = %me, lease = %format!("{}/{}", args.lease_namespace, args.lease_name), "controller starting");
    tokio::pin!(stop);
    loop {
        // Leadership counts from before the read: the Lease we wrote
        // cannot have been renewed later than this.
        let started = Instant::now();
        let attempt = lock.try_acquire_or_renew(k8s_openapi::jiff::Timestamp::now()).await;
        let leading = elector.observe(&attempt, started);
        if leading != was_leader {
            match &attempt {
                _ if leading => tracing::info!("leading: garbage collection starts"),
                Attempt::Follower(h) => tracing::info!(holder = %h, "not leading"),
                a => tracing::warn!(?a, "stepped down"),
            }
            was_leader = leading;
        }
        if let Attempt::Failed(e) = &attempt {
            tracing::warn!("lease: {e}");
        }
        if !leading {
            // A new term starts counting grace passes afresh.
            gc = None;
        } else if Instant::now() >= next_pass {
            if !default_pool_done {
                let o = super::default_pool::ensure(client.clone(), default_pool.as_ref()).await;
                match &o {
                    super::default_pool::Outcome::Created => tracing::info!(
                        pool = super::default_pool::DEFAULT_POOL_NAME,
                        spec = ?default_pool,
                        "no IPPool in the cluster: created the default pool"
                    ),
                    super::default_pool::Outcome::AlreadyExists => {
                        tracing::info!("the default pool was created by another writer")
                    }
                    super::default_pool::Outcome::PoolsExist(n) => {
                        tracing::info!(pools = ?n, "IPPools exist: no default pool created")
                    }
                    super::default_pool::Outcome::Disabled => {}
                    super::default_pool::Outcome::Failed(e) => {
                        tracing::warn!("default pool: {e}; trying again next pass")
                    }
                }
                default_pool_done = o.done();
            }
            let g =
                gc.get_or_insert_with(|| Gc::new(client.clone(), args.grace_passes, args.dry_run));
            let rep = g.pass().await;
            tracing::info!(
                freed = rep.freed,
                blocks_deleted = rep.blocks_deleted,
                blocks_orphaned = rep.blocks_orphaned,
                waiting = rep.waiting,
                conflicts = rep.conflicts,
                skipped = ?rep.skipped,
                "IPAM garbage-collection pass"
            );
            next_pass = Instant::now() + Duration::from_secs(args.interval_secs);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.retry_period_secs.max(1))) => {}
            _ = &mut stop => break,
        }
    }
    if was_leader && lock.release().await {
        tracing::info!("controller stopping; Lease released");
    } else {
        tracing::info!("controller stopping");
    }
}

/// `ocelot controller`: connect to the cluster (in-cluster config or
/// kubeconfig) and run until SIGTERM/SIGINT.
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    // Bad default-pool flags stop the controller at start, before anything.
    args.default_pool.spec().map_err(|e| anyhow::anyhow!("{e}"))?;
    // Block the termination signals before any thread starts, so that
    // every thread inherits the mask and only `wait` below receives them.
    let set = ocelot_dataplane::sys::signals::block_termination();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let client = rt
        .block_on(kube::Client::try_default())
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(run_with(client, args, async {
        let _ = rx.await;
    }));
    ocelot_dataplane::sys::signals::wait(&set);
    let _ = tx.send(());
    let _ = rt.block_on(task);
    Ok(())
}
