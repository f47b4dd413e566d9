//! IPAM state kept in the Kubernetes API: [`KubeStore`], one `IPAMBlock`
//! object per block.
//!
//! A transaction reads every block, runs IPAM's pure logic on a copy, and
//! writes back only the blocks it changed ([`plan`]):
//!
//! - a new block is `create`d. Its name is its CIDR, so when two nodes claim
//!   the same block at once the API server lets exactly one create succeed;
//!   the other gets `409 AlreadyExists`, re-reads (now seeing the block as
//!   the winner's) and claims the next free block instead;
//! - a changed block is `replace`d carrying the `resourceVersion` it was read
//!   at; if anyone wrote the block since (`409 Conflict`) nothing is written
//!   and the transaction runs again on fresh state;
//! - a block the transaction removed is deleted with a `resourceVersion`
//!   precondition, under the same rule.
//!
//! Atomicity is per block, not per transaction: Kubernetes has no
//! multi-object transaction. Every IPAM operation the agent runs changes
//! one block (an allocation takes one address from one block, claiming it
//! if new; a release frees a handle's address, in one block) except an
//! explicit request for several addresses in different blocks, which may be
//! half-written when a conflict stops it: its retry then sees the handle
//! holding the first part and takes the rest (`Ipam::allocate`); if the rest
//! is gone meanwhile, the request fails and the CNI ADD's undo releases the
//! handle, first part included.
//! Retrying is safe because allocation is by handle and idempotent: a run
//! that follows a partly applied one finds the handle's address and
//! returns it instead of taking another, and a release of an already freed
//! handle frees nothing. Retries are bounded, with jittered exponential
//! backoff; when they run out the error says so.
//!
//! `BlockAffinity` objects are written after the block they index (create
//! after a claim, delete after a block's deletion). They are an index for
//! people and tools; the block's `spec.affinity` is the truth, so a failed
//! affinity write is logged, not fatal, and `ocelot controller` mends the
//! index.

use super::crd::{
    affinity_name, block_from_spec, block_name, spec_from_block, AffinityState,
    BlockAffinityObject, BlockAffinitySpec, BlockError, IpamBlockObject,
};
use crate::ipam::store::IpamStore;
use crate::ipam::{Block, IpamState};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use ocelot_dataplane::api::Cidr;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a Kubernetes IPAM transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeIpamError {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// An `IPAMBlock` object is not a valid block; IPAM refuses to guess.
    #[error("{0}; fix or delete the object")]
    Block(#[from] BlockError),
    /// Every attempt's writes conflicted with other writers'.
    #[error(
        "gave up after {attempts} attempts: each time another writer changed the same IPAM \
         blocks first (last: {last}); the blocks are heavily contended, try again"
    )]
    Contended { attempts: u32, last: String },
    /// A block this transaction created overlaps another, and could not be
    /// taken back.
    #[error(
        "IPAMBlock {ours} overlaps IPAMBlock {theirs} (do IP pools overlap?) and could not be \
         deleted: {why}; delete one of them by hand"
    )]
    Overlap { ours: String, theirs: String, why: String },
    /// The API server does not know IPAMBlocks.
    #[error(
        "the API server has no IPAMBlock resource: install Ocelot's CRDs \
         (`ocelot crds | kubectl apply -f -`, or manifests/crds.yaml)"
    )]
    NoCrd,
    /// The blocking API was called from inside an async task.
    #[error("KubeStore's blocking calls cannot run inside an async task; use the async ones")]
    InsideRuntime,
}

impl From<KubeIpamError> for io::Error {
    fn from(e: KubeIpamError) -> io::Error {
        io::Error::other(e)
    }
}

/// How often and how patiently a conflicting transaction is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (the first one included).
    pub attempts: u32,
    /// The wait before the first retry; doubled each time, with jitter.
    pub base: Duration,
    /// The longest wait between two attempts.
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 10, base: Duration::from_millis(20), max: Duration::from_secs(1) }
    }
}

impl Retry {
    /// The wait before attempt `n` (1 = the first retry): exponential,
    /// capped, scaled by a random factor in [0.5, 1) so that writers that
    /// collided once do not collide again in step.
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << n.saturating_sub(1).min(16));
        let d = exp.min(self.max);
        d.mul_f64(0.5 + 0.5 * unit_random())
    }
}

/// A number in [0, 1) from the standard library's randomly keyed hasher.
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A block as read from the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    pub name: String,
    pub resource_version: Option<String>,
    pub block: Block,
}

/// One write a transaction needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A block that did not exist.
    Create(Block),
    /// A block that changed, as it was read (name, version) and is now.
    Replace { name: String, resource_version: Option<String>, block: Block },
    /// A block the transaction removed.
    Delete { name: String, resource_version: Option<String>, block: Block },
}

/// The writes that turn `before` into `after`: only changed blocks; writes
/// to existing blocks first (they may conflict, and then nothing was
/// created for nothing), creates last.
pub fn plan(before: &BTreeMap<Cidr, StoredBlock>, after: &IpamState) -> Vec<Write> {
    let mut out = Vec::new();
    for (cidr, s) in before {
        match after.blocks.get(cidr) {
            Some(b) if *b == s.block => {}
            Some(b) => out.push(Write::Replace {
                name: s.name.clone(),
                resource_version: s.resource_version.clone(),
                block: b.clone(),
            }),
            None => out.push(Write::Delete {
                name: s.name.clone(),
                resource_version: s.resource_version.clone(),
                block: s.block.clone(),
            }),
        }
    }
    for (cidr, b) in &after.blocks {
        if !before.contains_key(cidr) {
            out.push(Write::Create(b.clone()));
        }
    }
    out
}

/// The state a set of stored blocks holds.
pub fn state_of(stored: &BTreeMap<Cidr, StoredBlock>) -> IpamState {
    IpamState { blocks: stored.iter().map(|(c, s)| (*c, s.block.clone())).collect() }
}

/// Is this API error a `409` (AlreadyExists on create, Conflict on a
/// versioned write), or a `404` on a versioned write (the block went away
/// since it was read)? Both mean: read again and retry.
fn is_contention(e: &kube::Error, not_found_too: bool) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || (not_found_too && s.code == 404),
        _ => false,
    }
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        e => e.to_string(),
    }
}

/// The outcome of applying a plan.
enum Applied {
    Done,
    /// Another writer got there first; the message says where.
    Contended(String),
}

/// IPAM state as `IPAMBlock` objects (see the module's doc).
pub struct KubeStore {
    blocks: Api<IpamBlockObject>,
    affinities: Api<BlockAffinityObject>,
    rt: tokio::runtime::Handle,
    retry: Retry,
    /// The last stamp and when it was taken (stamps are rate-limited).
    stamp: Mutex<Option<(Instant, String)>>,
    /// Events seen by the change watch ([`KubeStore::with_change_watch`]).
    changes: Arc<AtomicU64>,
    /// True while the change watch is healthy: stamps then cost nothing.
    watching: Arc<AtomicBool>,
}

/// How long a stamp is reused before the blocks are listed again.
const STAMP_TTL: Duration = Duration::from_secs(1);

impl KubeStore {
    /// A store over `client`; the blocking calls run on `rt`.
    pub fn new(client: kube::Client, rt: tokio::runtime::Handle) -> KubeStore {
        KubeStore {
            blocks: Api::all(client.clone()),
            affinities: Api::all(client),
            rt,
            retry: Retry::default(),
            stamp: Mutex::new(None),
            changes: Arc::new(AtomicU64::new(0)),
            watching: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The same store keeping a watch on IPAMBlocks (one connection), so
    /// that [`IpamStore::stamp`] — which the agent asks several times a
    /// second — counts watch events instead of listing every block. While
    /// the watch is down (it reconnects with backoff), stamps list again,
    /// at most once a second.
    pub fn with_change_watch(self) -> KubeStore {
        use futures::StreamExt as _;
        use kube::runtime::{watcher, WatchStreamExt as _};
        let api = self.blocks.clone();
        let (changes, watching) = (self.changes.clone(), self.watching.clone());
        self.rt.spawn(async move {
            let mut events =
                std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(watcher::Event::InitDone) => watching.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(e) => {
                        if watching.swap(false, Ordering::SeqCst) {
                            tracing::warn!("IPAMBlock watch: {e}; listing until it is back");
                        }
                    }
                }
                changes.fetch_add(1, Ordering::SeqCst);
            }
        });
        self
    }

    /// The same store with another retry policy.
    pub fn with_retry(mut self, retry: Retry) -> KubeStore {
        self.retry = retry;
        self
    }

    /// Every block, by CIDR. An invalid object is an error.
    pub async fn read(&self) -> Result<BTreeMap<Cidr, StoredBlock>, KubeIpamError> {
        let list = match self.blocks.list(&ListParams::default()).await {
            Ok(l) => l,
            Err(kube::Error::Api(s)) if s.code == 404 => return Err(KubeIpamError::NoCrd),
            Err(e) => return Err(e.into()),
        };
        let mut out = BTreeMap::new();
        for o in list.items {
            let name = o.metadata.name.clone().unwrap_or_default();
            let block = block_from_spec(&name, &o.spec)?;
            out.insert(
                block.cidr,
                StoredBlock { name, resource_version: o.metadata.resource_version.clone(), block },
            );
        }
        Ok(out)
    }

    /// A copy of the current state.
    pub async fn load_async(&self) -> Result<IpamState, KubeIpamError> {
        Ok(state_of(&self.read().await?))
    }

    /// Run `f` on fresh state and write back what it changed, again on
    /// conflict (see the module's doc); `f` may run several times.
    pub async fn update_async(
        &self,
        f: &mut (dyn FnMut(&mut IpamState) + Send),
    ) -> Result<(), KubeIpamError> {
        self.update_inner(f).await
    }

    /// [`Self::update_async`] returning what `f`'s last run returned.
    pub async fn transact_async<R: Send>(
        &self,
        mut f: impl FnMut(&mut IpamState) -> R + Send,
    ) -> Result<R, KubeIpamError> {
        let mut out = None;
        self.update_async(&mut |s| out = Some(f(s))).await?;
        out.ok_or(KubeIpamError::Contended { attempts: 0, last: "never ran".into() })
    }

    async fn update_inner<F: FnMut(&mut IpamState) + ?Sized>(
        &self,
        f: &mut F,
    ) -> Result<(), KubeIpamError> {
        let mut last = String::new();
        for attempt in 0..self.retry.attempts.max(1) {
            if attempt > 0 {
                let d = self.retry.delay(attempt);
                tracing::debug!(attempt, delay_ms = d.as_millis() as u64, "IPAM conflict: {last}");
                tokio::time::sleep(d).await;
            }
            let stored = self.read().await?;
            let mut state = state_of(&stored);
            f(&mut state);
            let writes = plan(&stored, &state);
            if writes.is_empty() {
                return Ok(());
            }
            match self.apply(&writes).await? {
                Applied::Done => {
                    *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Ok(());
                }
                Applied::Contended(why) => last = why,
            }
        }
        Err(KubeIpamError::Contended { attempts: self.retry.attempts.max(1), last })
    }

    async fn apply(&self, writes: &[Write]) -> Result<Applied, KubeIpamError> {
        for w in writes {
            let r = match w {
                Write::Create(b) => {
                    let name = block_name(&b.cidr);
                    let obj = IpamBlockObject {
                        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                        spec: spec_from_block(b),
                    };
                    match self.blocks.create(&PostParams::default(), &obj).await {
                        Ok(created) => {
                            let rv = created.metadata.resource_version;
                            if let Some(why) = self.overlap_check(b, &name, rv).await? {
                                return Ok(Applied::Contended(why));
                            }
                            self.affinity_created(b).await;
                            Ok(())
                        }
                        Err(e) if is_contention(&e, false) => {
                            return Ok(Applied::Contended(format!(
                                "creating IPAMBlock {name}: {}",
                                describe(&e)
                            )))
                        }
                        Err(e) => Err(e),
                    }
                }
                Write::Replace { name, resource_version, block } => {
                    let obj = IpamBlockObject {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            resource_version: resource_version.clone(),
                            ..Default::default()
                        },
                        spec: spec_from_block(block),
                    };
                    match self.blocks.replace(name, &PostParams::default(), &obj).await {
                        Ok(_) => Ok(()),
                        Err(e) if is_contention(&e, true) => {
                            return Ok(Applied::Contended(format!(
                                "replacing IPAMBlock {name}: {}",
                                describe(&e)
                            )))
                        }
                        Err(e) => Err(e),
                    }
                }
                Write::Delete { name, resource_version, block } => {
                    let dp = DeleteParams {
                        preconditions: Some(Preconditions {
                            resource_version: resource_version.clone(),
                            uid: None,
                        }),
                        ..Default::default()
                    };
                    match self.blocks.delete(name, &dp).await {
                        Ok(_) => {
                            self.affinity_deleted(block).await;
                            Ok(())
                        }
                        // Already gone: what this write wanted.
                        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                        Err(e) if is_contention(&e, false) => {
                            return Ok(Applied::Contended(format!(
                                "deleting IPAMBlock {name}: {}",
                                describe(&e)
                            )))
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            r?;
        }
        Ok(Applied::Done)
    }

    /// After creating `b`: is there another block over the same addresses?
    /// Claims of one block meet on its name, but blocks of different sizes
    /// over one range (pools that overlap, with different `blockSize`)
    /// have different names. If one exists, ours goes (deleted with the
    /// version we created) and the transaction is retried, seeing the
    /// other block and avoiding it. Of two overlapping blocks, the later
    /// creator's check always sees the earlier one (its read follows its
    /// own create), so one of them backs off; both may, and retry.
    async fn overlap_check(
        &self,
        b: &Block,
        name: &str,
        rv: Option<String>,
    ) -> Result<Option<String>, KubeIpamError> {
        let stored = self.read().await?;
        let Some(other) = stored.values().find(|s| {
            s.name != name
                && (s.block.cidr.contains(b.cidr.addr) || b.cidr.contains(s.block.cidr.addr))
        }) else {
            return Ok(None);
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions { resource_version: rv, uid: None }),
            ..Default::default()
        };
        match self.blocks.delete(name, &dp).await {
            Ok(_) => Ok(Some(format!(
                "IPAMBlock {name} overlaps IPAMBlock {}, created at the same time; do IP pools \
                 overlap?",
                other.name
            ))),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                Ok(Some(format!("IPAMBlock {name} overlaps IPAMBlock {} and is gone", other.name)))
            }
            Err(e) => Err(KubeIpamError::Overlap {
                ours: name.to_string(),
                theirs: other.name.clone(),
                why: describe(&e),
            }),
        }
    }

    /// Index a block just claimed. Best effort (see the module's doc).
    async fn affinity_created(&self, b: &Block) {
        let Some(node) = &b.affinity else { return };
        let obj = affinity_object(node, &b.cidr, AffinityState::Confirmed);
        match self.affinities.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            // Left by an earlier claim of the same block by the same node.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => tracing::warn!(
                block = %block_name(&b.cidr),
                "cannot write the BlockAffinity (the controller will): {}",
                describe(&e)
            ),
        }
    }

    /// Drop the index entry of a deleted block. Best effort.
    async fn affinity_deleted(&self, b: &Block) {
        let Some(node) = &b.affinity else { return };
        let name = affinity_name(node, &b.cidr);
        match self.affinities.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!(
                affinity = %name,
                "cannot delete the BlockAffinity (the controller will): {}",
                describe(&e)
            ),
        }
    }

    fn block_on<T>(&self, fut: impl std::future::Future<Output = T>) -> Result<T, KubeIpamError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(KubeIpamError::InsideRuntime);
        }
        Ok(self.rt.block_on(fut))
    }
}

/// The `BlockAffinity` object of `node` for the block `cidr`.
pub fn affinity_object(node: &str, cidr: &Cidr, state: AffinityState) -> BlockAffinityObject {
    BlockAffinityObject {
        metadata: ObjectMeta { name: Some(affinity_name(node, cidr)), ..Default::default() },
        spec: BlockAffinitySpec {
            node: node.to_string(),
            cidr: format!("{}/{}", cidr.addr, cidr.len),
            state,
        },
    }
}

impl IpamStore for KubeStore {
    fn update(&self, f: &mut dyn FnMut(&mut IpamState)) -> io::Result<()> {
        Ok(self.block_on(self.update_inner(f))??)
    }

    fn load(&self) -> io::Result<IpamState> {
        Ok(self.block_on(self.load_async())??)
    }

    fn stamp(&self) -> Option<String> {
        if self.watching.load(Ordering::SeqCst) {
            return Some(format!("watch:{}", self.changes.load(Ordering::SeqCst)));
        }
        let mut g = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, s)) = g.as_ref() {
            if at.elapsed() < STAMP_TTL {
                return Some(s.clone());
            }
        }
        let stored = self.block_on(self.read()).ok()?.ok()?;
        let s = stored
            .values()
            .map(|b| format!("{}@{}", b.name, b.resource_version.as_deref().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(",");
        *g = Some((Instant::now(), s.clone()));
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Allocation;

    fn block(cidr: &str, node: &str, ips: &[&str]) -> Block {
        Block {
            cidr: cidr.parse().unwrap(),
            pool: "p".into(),
            affinity: Some(node.into()),
            allocations: ips
                .iter()
                .map(|ip| {
                    (
                        ip.parse().unwrap(),
                        Allocation {
                            handle: format!("h-{ip}"),
                            node: node.into(),
                            pod: String::new(),
                            attrs: BTreeMap::new(),
                        },
                    )
                })
                .collect(),
            host_local: false,
        }
    }

    fn stored(blocks: &[Block]) -> BTreeMap<Cidr, StoredBlock> {
        blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    b.cidr,
                    StoredBlock {
                        name: block_name(&b.cidr),
                        resource_version: Some(format!("{}", i + 10)),
                        block: b.clone(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn plan_writes_only_what_changed_creates_last() {
        let a = block("10.0.0.0/26", "n1", &["10.0.0.1"]);
        let b = block("10.0.0.64/26", "n2", &[]);
        let before = stored(&[a.clone(), b.clone()]);
        let mut after = state_of(&before);
        assert!(plan(&before, &after).is_empty());

        let c = block("10.0.0.128/26", "n1", &["10.0.0.128"]);
        after.blocks.insert(c.cidr, c.clone());
        let b2 = block("10.0.0.64/26", "n2", &["10.0.0.65"]);
        after.blocks.insert(b2.cidr, b2.clone());
        after.blocks.remove(&a.cidr);
        let w = plan(&before, &after);
        assert_eq!(
            w,
            vec![
                Write::Delete {
                    name: "10-0-0-0-26".into(),
                    resource_version: Some("10".into()),
                    block: a
                },
                Write::Replace {
                    name: "10-0-0-64-26".into(),
                    resource_version: Some("11".into()),
                    block: b2
                },
                Write::Create(c),
            ]
        );
    }

    #[test]
    fn retry_delays_grow_with_jitter_and_stay_capped() {
        let r =
            Retry { attempts: 5, base: Duration::from_millis(10), max: Duration::from_millis(50) };
        for _ in 0..50 {
            let d1 = r.delay(1);
            assert!(d1 >= Duration::from_millis(5) && d1 < Duration::from_millis(10), "{d1:?}");
            let d3 = r.delay(3);
            assert!(d3 >= Duration::from_millis(20) && d3 < Duration::from_millis(40), "{d3:?}");
            assert!(r.delay(30) < Duration::from_millis(50));
        }
    }
}
