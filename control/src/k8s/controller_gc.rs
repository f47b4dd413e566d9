//! What `ocelot controller` frees: the pure decisions of IPAM garbage
//! collection, from the blocks, Pods and Nodes one pass read.
//!
//! The rule is never to free the address of a live pod:
//!
//! - an allocation is a candidate when its pod (`namespace/name`) is absent
//!   from a complete, fresh Pod list — or present but another pod (another
//!   UID, when the allocation recorded one, or bound to another node):
//!   a StatefulSet's pod recreated under the same name;
//! - a candidate is freed only after it was a candidate on `grace`
//!   consecutive passes (2 by default). One pass seeing a pod missing (a
//!   list racing the pod's creation, a cache behind) frees nothing; seeing
//!   it again clears its count;
//! - a pass whose Pod list failed or was incomplete judges no allocation
//!   and changes no count; the same for Nodes and blocks;
//! - the blocks are read before the Pods: every allocation the pass sees
//!   existed before the Pod list was taken, and its pod existed before its
//!   allocation (the kubelet runs CNI ADD for pods it was given), so a live
//!   pod is always in that list;
//! - an allocation with no pod recorded (made outside Kubernetes) is freed
//!   only when its node is gone.
//!
//! A block is deleted only when it is empty (after this pass's frees) and
//! its node is gone (gone for `grace` passes as well), or it has no node.
//! A gone node's block that still holds live addresses (borrowed by other
//! nodes, or pods not yet deleted) loses its affinity and stays.

use crate::ipam::{Block, IpamState};
use ocelot_dataplane::api::Cidr;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The allocation attribute holding the pod's UID (`K8S_POD_UID`).
pub const POD_UID_ATTR: &str = "podUID";

/// A pod as the GC needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LivePod {
    pub uid: Option<String>,
    /// `spec.nodeName`; None while unscheduled.
    pub node: Option<String>,
}

/// What GC remembers between passes (reset when leadership changes hands:
/// a new leader waits its own grace passes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcMemory {
    /// Consecutive passes an allocation (address, handle) was a candidate.
    missing: BTreeMap<(IpAddr, String), u32>,
    /// Consecutive passes a node was absent from the Node list.
    nodes_missing: BTreeMap<String, u32>,
}

/// What one pass changes in one block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockChange {
    /// Addresses to free, with the handle that held them.
    pub free: Vec<(IpAddr, String)>,
    /// Drop the block's affinity (its node is gone, live addresses remain).
    pub drop_affinity: bool,
    /// Delete the block (empty after `free`; no node, or its node is gone).
    pub delete: bool,
}

/// Why an allocation was or was not freed, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    pub blocks: BTreeMap<Cidr, BlockChange>,
    /// Allocations that are candidates but still within their grace.
    pub waiting: usize,
    /// Nodes judged gone this pass.
    pub gone_nodes: BTreeSet<String>,
}

impl BlockChange {
    /// The block after the change; None when it is to be deleted.
    pub fn apply(&self, b: &Block) -> Option<Block> {
        if self.delete {
            return None;
        }
        let mut b = b.clone();
        for (ip, handle) in &self.free {
            if b.allocations.get(ip).is_some_and(|a| a.handle == *handle) {
                b.allocations.remove(ip);
            }
        }
        if self.drop_affinity {
            b.affinity = None;
        }
        Some(b)
    }
}

/// Is the allocation's pod alive in `pods`?
fn pod_alive(a: &crate::ipam::Allocation, pods: &BTreeMap<String, LivePod>) -> bool {
    let Some(p) = pods.get(&a.pod) else { return false };
    if let (Some(want), Some(have)) = (a.attrs.get(POD_UID_ATTR), p.uid.as_ref()) {
        if !want.is_empty() && want != have {
            return false;
        }
    }
    match &p.node {
        Some(n) => n == &a.node,
        None => true,
    }
}

/// Decide one pass. `pods`/`nodes` are None when their list failed or was
/// incomplete. `grace` is at least 1 (1: free on the first pass).
pub fn plan(
    mem: &mut GcMemory,
    state: &IpamState,
    pods: Option<&BTreeMap<String, LivePod>>,
    nodes: Option<&BTreeSet<String>>,
    grace: u32,
) -> GcPlan {
    let grace = grace.max(1);
    let mut out = GcPlan::default();

    // Nodes: count consecutive absences of every node a block names.
    if let Some(nodes) = nodes {
        let named: BTreeSet<&String> =
            state.blocks.values().filter_map(|b| b.affinity.as_ref()).collect();
        let allocating: BTreeSet<&String> =
            state.blocks.values().flat_map(|b| b.allocations.values().map(|a| &a.node)).collect();
        let mut next = BTreeMap::new();
        for n in named.into_iter().chain(allocating) {
            if !nodes.contains(n) {
                let c = mem.nodes_missing.get(n).copied().unwrap_or(0) + 1;
                next.insert(n.clone(), c);
                if c >= grace {
                    out.gone_nodes.insert(n.clone());
                }
            }
        }
        mem.nodes_missing = next;
    }
    let gone = |n: &str| out.gone_nodes.contains(n);

    // Allocations.
    let mut next_missing = BTreeMap::new();
    let mut frees: BTreeMap<Cidr, Vec<(IpAddr, String)>> = BTreeMap::new();
    for b in state.blocks.values() {
        for (ip, a) in &b.allocations {
            let key = (*ip, a.handle.clone());
            let candidate = if a.pod.is_empty() {
                match nodes {
                    Some(_) => gone(&a.node),
                    None => {
                        // Cannot judge: keep the count as it was.
                        if let Some(c) = mem.missing.get(&key) {
                            next_missing.insert(key, *c);
                        }
                        continue;
                    }
                }
            } else {
                match pods {
                    Some(pods) => !pod_alive(a, pods),
                    None => {
                        if let Some(c) = mem.missing.get(&key) {
                            next_missing.insert(key, *c);
                        }
                        continue;
                    }
                }
            };
            if !candidate {
                continue;
            }
            // A pod-less allocation is judged by its node, whose count
            // already carries the grace.
            let c = if a.pod.is_empty() {
                grace
            } else {
                mem.missing.get(&key).copied().unwrap_or(0) + 1
            };
            if c >= grace {
                frees.entry(b.cidr).or_default().push((*ip, a.handle.clone()));
            } else {
                out.waiting += 1;
            }
            // Kept even when freed: if the write loses a race, the next
            // pass frees it without another grace period.
            next_missing.insert(key, c);
        }
    }
    mem.missing = next_missing;

    // Blocks.
    for b in state.blocks.values() {
        let free = frees.remove(&b.cidr).unwrap_or_default();
        let left = b.allocations.len() - free.len();
        let node_gone = match &b.affinity {
            Some(n) => gone(n),
            None => true,
        };
        // Without a Node list, a block with a node is never released.
        let node_gone = node_gone && (nodes.is_some() || b.affinity.is_none());
        let change = BlockChange {
            delete: left == 0 && node_gone,
            drop_affinity: left > 0 && node_gone && b.affinity.is_some(),
            free,
        };
        if change != BlockChange::default() {
            out.blocks.insert(b.cidr, change);
        }
    }
    out
}

/// The `BlockAffinity` objects to create (node, block) and delete (names)
/// so that they index exactly the blocks that have a node. `existing` are
/// the objects' (name, node, cidr), read *before* the blocks (see
/// `controller`), so an affinity whose block is missing is stale.
pub fn affinity_repairs(
    blocks: &IpamState,
    existing: &[(String, String, String)],
) -> (Vec<(String, Cidr)>, Vec<String>) {
    let want: BTreeMap<String, (String, Cidr)> = blocks
        .blocks
        .values()
        .filter_map(|b| {
            let n = b.affinity.as_ref()?;
            Some((super::crd::affinity_name(n, &b.cidr), (n.clone(), b.cidr)))
        })
        .collect();
    let have: BTreeSet<&String> = existing.iter().map(|(name, _, _)| name).collect();
    let create =
        want.iter().filter(|(name, _)| !have.contains(name)).map(|(_, v)| v.clone()).collect();
    let delete = existing
        .iter()
        .filter(|(name, node, cidr)| match want.get(name) {
            Some((n, c)) => n != node || format!("{}/{}", c.addr, c.len) != *cidr,
            None => true,
        })
        .map(|(name, _, _)| name.clone())
        .collect();
    (create, delete)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Allocation;

    fn alloc(node: &str, pod: &str, uid: Option<&str>) -> Allocation {
        Allocation {
            handle: format!("{pod}/eth0"),
            node: node.into(),
            pod: pod.into(),
            attrs: uid.map(|u| (POD_UID_ATTR.to_string(), u.to_string())).into_iter().collect(),
        }
    }

    fn state(blocks: &[(&str, Option<&str>, &[(&str, Allocation)])]) -> IpamState {
        let mut s = IpamState::default();
        for (cidr, node, allocs) in blocks {
            let cidr: Cidr = cidr.parse().unwrap();
            s.blocks.insert(
                cidr,
                Block {
                    cidr,
                    pool: "p".into(),
                    affinity: node.map(str::to_string),
                    allocations: allocs
                        .iter()
                        .map(|(ip, a)| (ip.parse().unwrap(), a.clone()))
                        .collect(),
                    host_local: false,
                },
            );
        }
        s
    }

    fn pods(list: &[(&str, Option<&str>, &str)]) -> BTreeMap<String, LivePod> {
        list.iter()
            .map(|(k, uid, node)| {
                (
                    k.to_string(),
                    LivePod { uid: uid.map(str::to_string), node: Some(node.to_string()) },
                )
            })
            .collect()
    }

    fn nodes(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const B1: &str = "10.0.0.0/26";

    #[test]
    fn a_live_pod_is_never_freed_and_a_deleted_one_after_grace() {
        let st = state(&[(
            B1,
            Some("n1"),
            &[
                ("10.0.0.1", alloc("n1", "default/live", Some("u1"))),
                ("10.0.0.2", alloc("n1", "default/dead", None)),
            ],
        )]);
        let p = pods(&[("default/live", Some("u1"), "n1")]);
        let n = nodes(&["n1"]);
        let mut mem = GcMemory::default();
        let first = plan(&mut mem, &st, Some(&p), Some(&n), 2);
        assert!(first.blocks.is_empty(), "one pass frees nothing: {first:?}");
        assert_eq!(first.waiting, 1);
        let second = plan(&mut mem, &st, Some(&p), Some(&n), 2);
        let c = &second.blocks[&B1.parse().unwrap()];
        assert_eq!(c.free, vec![("10.0.0.2".parse().unwrap(), "default/dead/eth0".to_string())]);
        assert!(!c.delete && !c.drop_affinity, "the node is alive: its block stays");
        // Many more passes never touch the live pod.
        for _ in 0..5 {
            let pl = plan(&mut mem, &st, Some(&p), Some(&n), 2);
            assert!(pl
                .blocks
                .values()
                .all(|c| c.free.iter().all(|(ip, _)| ip.to_string() != "10.0.0.1")));
        }
    }

    #[test]
    fn a_pod_missing_from_one_list_is_not_freed() {
        let st = state(&[(B1, Some("n1"), &[("10.0.0.1", alloc("n1", "default/a", None))])]);
        let n = nodes(&["n1"]);
        let with = pods(&[("default/a", None, "n1")]);
        let without = pods(&[]);
        let mut mem = GcMemory::default();
        // Missing, back, missing, back...: the count restarts each time.
        for _ in 0..4 {
            assert!(plan(&mut mem, &st, Some(&without), Some(&n), 2).blocks.is_empty());
            assert!(plan(&mut mem, &st, Some(&with), Some(&n), 2).blocks.is_empty());
        }
        // A failed list between two misses judges nothing and keeps the count.
        assert!(plan(&mut mem, &st, Some(&without), Some(&n), 3).blocks.is_empty());
        assert!(plan(&mut mem, &st, None, Some(&n), 3).blocks.is_empty());
        assert!(plan(&mut mem, &st, Some(&without), Some(&n), 3).blocks.is_empty());
        assert!(!plan(&mut mem, &st, Some(&without), Some(&n), 3).blocks.is_empty());
    }

    #[test]
    fn a_recreated_pod_with_the_same_name_frees_the_old_address() {
        let st = state(&[(
            B1,
            Some("n1"),
            &[
                ("10.0.0.1", alloc("n1", "db/db-0", Some("old"))),
                ("10.0.0.2", {
                    let mut a = alloc("n1", "db/web-0", None);
                    a.handle = "w/eth0".into();
                    a
                }),
            ],
        )]);
        // db-0 is back with another UID; web-0 is back on another node.
        let p = pods(&[("db/db-0", Some("new"), "n1"), ("db/web-0", None, "n2")]);
        let n = nodes(&["n1", "n2"]);
        let mut mem = GcMemory::default();
        plan(&mut mem, &st, Some(&p), Some(&n), 2);
        let pl = plan(&mut mem, &st, Some(&p), Some(&n), 2);
        assert_eq!(pl.blocks[&B1.parse().unwrap()].free.len(), 2);
        // An unscheduled pod of that name (no node yet) is not judged by node.
        let p = BTreeMap::from([("db/web-0".to_string(), LivePod { uid: None, node: None })]);
        let st = state(&[(B1, Some("n1"), &[("10.0.0.2", alloc("n1", "db/web-0", None))])]);
        let mut mem = GcMemory::default();
        for _ in 0..3 {
            assert!(plan(&mut mem, &st, Some(&p), Some(&n), 2).blocks.is_empty());
        }
    }

    #[test]
    fn a_deleted_nodes_blocks_go_when_empty_and_lose_affinity_otherwise() {
        let st = state(&[
            (B1, Some("gone"), &[("10.0.0.1", alloc("gone", "default/a", None))]),
            // Borrowed by n1's live pod.
            ("10.0.0.64/26", Some("gone"), &[("10.0.0.65", alloc("n1", "default/b", None))]),
            ("10.0.0.128/26", Some("gone"), &[]),
            ("10.0.0.192/26", Some("n1"), &[]),
        ]);
        let p = pods(&[("default/b", None, "n1")]);
        let n = nodes(&["n1"]);
        let mut mem = GcMemory::default();
        let first = plan(&mut mem, &st, Some(&p), Some(&n), 2);
        assert!(first.blocks.is_empty(), "the node is gone for one pass only: {first:?}");
        let pl = plan(&mut mem, &st, Some(&p), Some(&n), 2);
        assert_eq!(pl.gone_nodes, nodes(&["gone"]));
        let c = |s: &str| pl.blocks.get(&s.parse::<Cidr>().unwrap()).cloned();
        assert_eq!(c(B1).map(|c| (c.free.len(), c.delete)), Some((1, true)));
        assert_eq!(
            c("10.0.0.64/26").map(|c| (c.free.len(), c.delete, c.drop_affinity)),
            Some((0, false, true))
        );
        assert_eq!(c("10.0.0.128/26").map(|c| c.delete), Some(true));
        assert_eq!(c("10.0.0.192/26"), None, "a live node's empty block stays");
        // Without a Node list nothing is released.
        let mut mem = GcMemory::default();
        for _ in 0..3 {
            let pl = plan(&mut mem, &st, Some(&p), None, 2);
            assert!(pl.blocks.values().all(|c| !c.delete && !c.drop_affinity), "{pl:?}");
        }
        // Without a Pod list no allocation is freed, even of a gone node.
        let mut mem = GcMemory::default();
        for _ in 0..3 {
            let pl = plan(&mut mem, &st, None, Some(&n), 2);
            assert!(pl.blocks.values().all(|c| c.free.is_empty()), "{pl:?}");
            assert!(c_is_kept(&pl, B1));
        }
    }

    fn c_is_kept(pl: &GcPlan, cidr: &str) -> bool {
        pl.blocks.get(&cidr.parse::<Cidr>().unwrap()).is_none_or(|c| !c.delete)
    }

    #[test]
    fn podless_allocations_go_with_their_node_only() {
        let st = state(&[(B1, Some("n1"), &[("10.0.0.1", alloc("n2", "", None))])]);
        let mut mem = GcMemory::default();
        for _ in 0..3 {
            assert!(plan(&mut mem, &st, Some(&pods(&[])), Some(&nodes(&["n1", "n2"])), 2)
                .blocks
                .is_empty());
        }
        let n = nodes(&["n1"]);
        assert!(plan(&mut mem, &st, Some(&pods(&[])), Some(&n), 2).blocks.is_empty());
        let pl = plan(&mut mem, &st, Some(&pods(&[])), Some(&n), 2);
        assert_eq!(pl.blocks[&B1.parse().unwrap()].free.len(), 1);
    }

    #[test]
    fn changes_apply_only_to_the_handle_that_was_judged() {
        let st = state(&[(B1, Some("n1"), &[("10.0.0.1", alloc("n1", "default/a", None))])]);
        let b = &st.blocks[&B1.parse().unwrap()];
        let c = BlockChange {
            free: vec![("10.0.0.1".parse().unwrap(), "someone-else".into())],
            ..Default::default()
        };
        assert_eq!(c.apply(b).as_ref(), Some(b), "the address changed hands: keep it");
        let c = BlockChange {
            free: vec![("10.0.0.1".parse().unwrap(), "default/a/eth0".into())],
            drop_affinity: true,
            delete: false,
        };
        let after = c.apply(b).unwrap();
        assert!(after.allocations.is_empty() && after.affinity.is_none());
    }

    #[test]
    fn affinity_index_repairs() {
        let st = state(&[(B1, Some("n1"), &[]), ("10.0.0.64/26", None, &[])]);
        let existing =
            vec![("n2-10-0-0-128-26".to_string(), "n2".to_string(), "10.0.0.128/26".to_string())];
        let (create, delete) = affinity_repairs(&st, &existing);
        assert_eq!(create, vec![("n1".to_string(), B1.parse().unwrap())]);
        assert_eq!(delete, vec!["n2-10-0-0-128-26".to_string()]);
        let existing = vec![("n1-10-0-0-0-26".to_string(), "n1".to_string(), B1.to_string())];
        assert_eq!(affinity_repairs(&st, &existing), (vec![], vec![]));
    }
}
