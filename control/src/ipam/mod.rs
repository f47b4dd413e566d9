//! IP address management, Calico-style.
//!
//! A pool is cut into blocks of `blockSize`. A node claims a block (takes
//! its affinity) the first time it needs one and allocates from its own
//! blocks; when those are full and the pool has no unclaimed block left, it
//! borrows single addresses from other nodes' blocks. Host-local mode
//! allocates from the Node's `spec.podCIDR` instead. Allocations are keyed
//! by a handle (container ID and interface), so a repeated ADD returns the
//! same address and DEL frees it.
//!
//! [`Ipam`] is the pure logic over [`IpamState`]; [`store::FileStore`] keeps
//! the state in a file shared by every agent of a datastore, changed only
//! under an exclusive lock, so concurrent ADDs — threads of one agent or
//! agents of several nodes — never hand out one address twice.

pub mod store;

use ocelot_dataplane::api::Cidr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// Who holds an address, and what the agent needs to rebuild the endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub handle: String,
    pub node: String,
    /// `namespace/name` of the pod.
    #[serde(default)]
    pub pod: String,
    /// Endpoint attributes (netns path, ifname, ...) kept for resyncs.
    #[serde(default)]
    pub attrs: BTreeMap<String, String>,
}

/// One block of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub cidr: Cidr,
    /// The pool the block was cut from.
    pub pool: String,
    /// The node whose block this is; `None` for host-local ranges' owner-less use.
    pub affinity: Option<String>,
    /// Allocated addresses.
    pub allocations: BTreeMap<IpAddr, Allocation>,
    /// Host-local range (a Node's podCIDR): never borrowed from.
    #[serde(default)]
    pub host_local: bool,
}

/// Everything IPAM persists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamState {
    /// Blocks by their CIDR.
    pub blocks: BTreeMap<Cidr, Block>,
}

/// A pool as IPAM needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub cidr: Cidr,
    pub block_size: u8,
}

/// What to allocate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The first free address from this node's blocks, a new block, or a
    /// borrowed one, from the pools the node may use.
    Auto { pools: Vec<PoolSpec> },
    /// Exactly these addresses (the `ocelot.dev/ip-addrs` annotation); each
    /// must be free and inside one of `pools`.
    Specific { ips: Vec<IpAddr>, pools: Vec<PoolSpec> },
    /// Host-local: from the node's podCIDR.
    HostLocal { pod_cidr: Cidr },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("no free address: every pool the node may use is exhausted")]
    Exhausted,
    #[error("no IP pool is enabled for this node")]
    NoPool,
    #[error("address {0} is not inside any enabled IP pool")]
    OutsidePools(IpAddr),
    #[error("address {0} is already allocated to {1}")]
    InUse(IpAddr, String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// The outcome of an allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocated {
    pub ips: Vec<IpAddr>,
    /// True when the handle already held these addresses (a repeated ADD).
    pub existing: bool,
    /// Addresses taken from another node's block.
    pub borrowed: Vec<IpAddr>,
}

fn v4(c: &Cidr) -> Option<(u32, u8)> {
    match c.addr {
        IpAddr::V4(a) => Some((u32::from(a), c.len)),
        IpAddr::V6(_) => None,
    }
}

/// Does `c` contain `ip`?
pub fn contains(c: &Cidr, ip: &IpAddr) -> bool {
    c.contains(*ip)
}

/// The network address of `c` (host bits cleared).
pub fn network(c: &Cidr) -> Cidr {
    c.network()
}

/// The pure allocator over a state.
pub struct Ipam<'a> {
    pub state: &'a mut IpamState,
    pub node: &'a str,
}

impl Ipam<'_> {
    /// The addresses a handle holds.
    pub fn find(&self, handle: &str) -> Vec<IpAddr> {
        self.state
            .blocks
            .values()
            .flat_map(|b| b.allocations.iter())
            .filter(|(_, a)| a.handle == handle)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Allocate for `alloc.handle`; a handle that already holds addresses
    /// gets them back unchanged.
    pub fn allocate(&mut self, req: &Request, alloc: Allocation) -> Result<Allocated, IpamError> {
        let held = self.find(&alloc.handle);
        if !held.is_empty() {
            // A request for addresses in several blocks that an optimistic
            // store (Kubernetes: one block per write) applied in part before
            // a conflict: its rerun completes it rather than stopping short.
            if let Request::Specific { ips, pools } = req {
                let rest: Vec<IpAddr> =
                    ips.iter().filter(|ip| !held.contains(ip)).copied().collect();
                if !rest.is_empty() && held.iter().all(|h| ips.contains(h)) {
                    let done = self.specific(&rest, pools, alloc)?;
                    return Ok(Allocated { ips: ips.clone(), ..done });
                }
            }
            return Ok(Allocated { ips: held, existing: true, borrowed: Vec::new() });
        }
        match req {
            Request::Specific { ips, pools } => self.specific(ips, pools, alloc),
            Request::Auto { pools } => self.auto(pools, alloc),
            Request::HostLocal { pod_cidr } => self.host_local(pod_cidr, alloc),
        }
    }

    fn specific(
        &mut self,
        ips: &[IpAddr],
        pools: &[PoolSpec],
        alloc: Allocation,
    ) -> Result<Allocated, IpamError> {
        if ips.is_empty() {
            return Err(IpamError::Invalid("the requested address list is empty".into()));
        }
        // Check everything first: a request is granted whole or not at all.
        let mut plan = Vec::new();
        for ip in ips {
            let pool =
                pools.iter().find(|p| contains(&p.cidr, ip)).ok_or(IpamError::OutsidePools(*ip))?;
            let bcidr = block_of(pool, ip).ok_or(IpamError::OutsidePools(*ip))?;
            if let Some(b) = self.state.blocks.get(&bcidr) {
                if let Some(a) = b.allocations.get(ip) {
                    return Err(IpamError::InUse(*ip, a.pod.clone()));
                }
            }
            if plan.iter().any(|(i, _, _)| i == ip) {
                return Err(IpamError::Invalid(format!("address {ip} requested twice")));
            }
            plan.push((*ip, bcidr, pool.name.clone()));
        }
        let mut borrowed = Vec::new();
        for (ip, bcidr, pool) in plan {
            let node = self.node.to_string();
            let b = self.state.blocks.entry(bcidr).or_insert_with(|| Block {
                cidr: bcidr,
                pool,
                affinity: Some(node.clone()),
                allocations: BTreeMap::new(),
                host_local: false,
            });
            if b.affinity.as_deref() != Some(self.node) {
                borrowed.push(ip);
            }
            b.allocations.insert(ip, alloc.clone());
        }
        Ok(Allocated { ips: ips.to_vec(), existing: false, borrowed })
    }

    fn auto(&mut self, pools: &[PoolSpec], alloc: Allocation) -> Result<Allocated, IpamError> {
        if pools.is_empty() {
            return Err(IpamError::NoPool);
        }
        let in_pools =
            |b: &Block| pools.iter().any(|p| contains(&p.cidr, &b.cidr.addr)) && !b.host_local;
        // 1. Our own blocks.
        let own: Vec<Cidr> = self
            .state
            .blocks
            .values()
            .filter(|b| in_pools(b) && b.affinity.as_deref() == Some(self.node))
            .map(|b| b.cidr)
            .collect();
        for c in own {
            if let Some(ip) = self.take_free(&c, &alloc) {
                return Ok(Allocated { ips: vec![ip], existing: false, borrowed: Vec::new() });
            }
        }
        // 2. A new block.
        for p in pools {
            if let Some(c) = self.unclaimed_block(p) {
                self.state.blocks.insert(
                    c,
                    Block {
                        cidr: c,
                        pool: p.name.clone(),
                        affinity: Some(self.node.to_string()),
                        allocations: BTreeMap::new(),
                        host_local: false,
                    },
                );
                if let Some(ip) = self.take_free(&c, &alloc) {
                    return Ok(Allocated { ips: vec![ip], existing: false, borrowed: Vec::new() });
                }
            }
        }
        // 3. Borrow from another node's block.
        let others: Vec<Cidr> = self
            .state
            .blocks
            .values()
            .filter(|b| in_pools(b) && b.affinity.as_deref() != Some(self.node))
            .map(|b| b.cidr)
            .collect();
        for c in others {
            if let Some(ip) = self.take_free(&c, &alloc) {
                return Ok(Allocated { ips: vec![ip], existing: false, borrowed: vec![ip] });
            }
        }
        Err(IpamError::Exhausted)
    }

    fn host_local(&mut self, pod_cidr: &Cidr, alloc: Allocation) -> Result<Allocated, IpamError> {
        let c = network(pod_cidr);
        let node = self.node.to_string();
        let b = self.state.blocks.entry(c).or_insert_with(|| Block {
            cidr: c,
            pool: format!("podCIDR:{node}"),
            affinity: Some(node.clone()),
            allocations: BTreeMap::new(),
            host_local: true,
        });
        if b.affinity.as_deref() != Some(self.node) || !b.host_local {
            return Err(IpamError::Invalid(format!(
                "podCIDR {c} overlaps a block of another node or pool"
            )));
        }
        self.take_free(&c, &alloc)
            .map(|ip| Allocated { ips: vec![ip], existing: false, borrowed: Vec::new() })
            .ok_or(IpamError::Exhausted)
    }

    /// Allocate the lowest free address of block `c`. Host-local ranges
    /// skip their network and broadcast addresses.
    fn take_free(&mut self, c: &Cidr, alloc: &Allocation) -> Option<IpAddr> {
        let b = self.state.blocks.get_mut(c)?;
        let (base, len) = v4(&b.cidr)?;
        let size: u64 = 1u64 << (32 - u32::from(len));
        let (first, last) = if b.host_local && size > 2 { (1, size - 2) } else { (0, size - 1) };
        for off in first..=last {
            let ip = IpAddr::V4(Ipv4Addr::from(base.wrapping_add(off as u32)));
            if let std::collections::btree_map::Entry::Vacant(e) = b.allocations.entry(ip) {
                e.insert(alloc.clone());
                return Some(ip);
            }
        }
        None
    }

    fn unclaimed_block(&self, p: &PoolSpec) -> Option<Cidr> {
        let (base, plen) = v4(&network(&p.cidr))?;
        if p.block_size < plen || p.block_size > 32 {
            return None;
        }
        let n: u64 = 1u64 << (p.block_size - plen);
        let step: u64 = 1u64 << (32 - u32::from(p.block_size));
        (0..n)
            .map(|i| Cidr {
                addr: IpAddr::V4(Ipv4Addr::from((u64::from(base) + i * step) as u32)),
                len: p.block_size,
            })
            .find(|c| {
                !self.state.blocks.contains_key(c)
                    && !self
                        .state
                        .blocks
                        .keys()
                        .any(|k| contains(k, &c.addr) || contains(c, &k.addr))
            })
    }

    /// Free everything `handle` holds; returns what was freed.
    pub fn release(&mut self, handle: &str) -> Vec<IpAddr> {
        let mut freed = Vec::new();
        for b in self.state.blocks.values_mut() {
            b.allocations.retain(|ip, a| {
                let hit = a.handle == handle;
                if hit {
                    freed.push(*ip);
                }
                !hit
            });
        }
        freed
    }

    /// Free this node's allocations whose handle `keep` rejects (CNI GC).
    pub fn release_unless(&mut self, keep: impl Fn(&str) -> bool) -> Vec<(IpAddr, String)> {
        let node = self.node.to_string();
        let mut freed = Vec::new();
        for b in self.state.blocks.values_mut() {
            b.allocations.retain(|ip, a| {
                let drop = a.node == node && !keep(&a.handle);
                if drop {
                    freed.push((*ip, a.handle.clone()));
                }
                !drop
            });
        }
        freed
    }

    /// This node's allocations (for resyncing the dataplane).
    pub fn node_allocations(&self) -> BTreeMap<String, (Vec<IpAddr>, Allocation)> {
        let mut out: BTreeMap<String, (Vec<IpAddr>, Allocation)> = BTreeMap::new();
        for b in self.state.blocks.values() {
            for (ip, a) in &b.allocations {
                if a.node == self.node {
                    out.entry(a.handle.clone())
                        .or_insert_with(|| (Vec::new(), a.clone()))
                        .0
                        .push(*ip);
                }
            }
        }
        out
    }
}

/// The block of `pool` that contains `ip`.
fn block_of(pool: &PoolSpec, ip: &IpAddr) -> Option<Cidr> {
    if !contains(&pool.cidr, ip) || pool.block_size < pool.cidr.len {
        return None;
    }
    Some(network(&Cidr { addr: *ip, len: pool.block_size }))
}

#[cfg(test)]
mod tests;
