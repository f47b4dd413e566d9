//! The MAC addresses the AF_XDP uplink sends tunnel packets to: the next
//! hop's, from the kernel's own neighbour table.
//!
//! The next hop is the peer node itself when the kernel's route to it is
//! on-link, else that route's gateway; a route out of another interface
//! means the uplink cannot carry it (the kernel path does). Workers never
//! ask netlink: they read an immutable map ([`Neighbours::snapshot`], one
//! atomic load per batch), and a miss or an expired entry puts the peer on
//! a queue for the resolver thread, which asks the kernel and publishes a
//! new map. Meanwhile the packet takes the socket port, so nothing is
//! dropped for lack of a neighbour, and the kernel, routing that packet,
//! resolves the neighbour by ARP if it had to.
//!
//! Entries live briefly: a valid one is used for [`FRESH`], then used while
//! being refreshed; a stale one (the kernel has not confirmed it lately,
//! which is normal when our traffic bypasses the kernel) is used too, and
//! the resolver asks the kernel to re-confirm it (`NTF_USE`, an ARP probe),
//! as it does to start resolving an unknown one.

use crate::sys::netlink::{self, NeighState, Session};
use crate::wire::MacAddr;
use arc_swap::ArcSwap;
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a valid entry is used before it is refreshed.
pub const FRESH: Duration = Duration::from_secs(2);
/// A stale entry is checked again this soon (after asking the kernel).
pub const STALE_RECHECK: Duration = Duration::from_millis(500);
/// An unresolved neighbour is looked up again this soon.
pub const RETRY: Duration = Duration::from_millis(100);
/// A peer the uplink cannot reach directly (no route, or a route out of
/// another interface) is looked at again after this.
pub const ELSEWHERE: Duration = Duration::from_secs(5);
/// Peers waiting for the resolver; more requests are dropped (each is
/// repeated by the next packet to the same peer).
const QUEUE: usize = 256;

/// One peer's next-hop MAC, or the lack of one, and until when it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub mac: Option<MacAddr>,
    pub fresh_until: Instant,
}

pub type NeighMap = FxHashMap<Ipv4Addr, Entry>;

/// What to do for a packet to a peer with entry `e` at `now`: the MAC to
/// send to (`None`: the kernel path), and whether to ask the resolver for
/// a fresh look.
pub fn decide(e: Option<&Entry>, now: Instant) -> (Option<MacAddr>, bool) {
    match e {
        None => (None, true),
        Some(e) => (e.mac, now >= e.fresh_until),
    }
}

/// What the kernel said about a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No route, or the route leaves by another interface.
    Elsewhere,
    /// The next hop's neighbour entry (`None`: there is none yet).
    Neighbour(Option<(NeighState, Option<MacAddr>)>),
}

/// The entry to publish for a lookup at `now`, and whether to ask the
/// kernel to resolve or re-confirm the neighbour.
pub fn entry_for(l: Lookup, now: Instant) -> (Entry, bool) {
    let e = |mac, d| Entry { mac, fresh_until: now + d };
    match l {
        Lookup::Elsewhere => (e(None, ELSEWHERE), false),
        Lookup::Neighbour(Some((NeighState::Valid, Some(m)))) => (e(Some(m), FRESH), false),
        Lookup::Neighbour(Some((NeighState::Stale, Some(m)))) => (e(Some(m), STALE_RECHECK), true),
        Lookup::Neighbour(_) => (e(None, RETRY), true),
    }
}

/// The shared table: read by every worker, written by the resolver.
pub struct Neighbours {
    map: ArcSwap<NeighMap>,
    requests: Sender<Ipv4Addr>,
}

impl Neighbours {
    pub fn new() -> (Arc<Neighbours>, Receiver<Ipv4Addr>) {
        let (tx, rx) = crossbeam::channel::bounded(QUEUE);
        (Arc::new(Neighbours { map: ArcSwap::from_pointee(NeighMap::default()), requests: tx }), rx)
    }

    /// The current map, for one batch.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<NeighMap>> {
        self.map.load()
    }

    /// The MAC to send a packet for `peer` to (`None`: take the kernel
    /// path), asking the resolver for a fresh look when needed.
    #[inline]
    pub fn lookup(&self, map: &NeighMap, peer: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        let (mac, refresh) = decide(map.get(&peer), now);
        if refresh {
            // A full queue drops the request: the next packet asks again.
            let _ = self.requests.try_send(peer);
        }
        mac
    }

    fn publish(&self, peer: Ipv4Addr, e: Entry) {
        self.map.rcu(|m| {
            let mut m = NeighMap::clone(m);
            m.insert(peer, e);
            m
        });
    }
}

/// The resolver thread; stops when dropped.
pub struct Resolver {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Resolver {
    /// Resolve, for `table`, the peers asked on `requests`, through the
    /// uplink `ifindex`. The thread works in the caller's network namespace.
    pub fn start(
        table: Arc<Neighbours>,
        requests: Receiver<Ipv4Addr>,
        ifindex: u32,
    ) -> std::io::Result<Resolver> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ocelot-neigh".into())
            .spawn(move || run(&table, &requests, ifindex, &s))?;
        Ok(Resolver { stop, thread: Some(thread) })
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(table: &Neighbours, requests: &Receiver<Ipv4Addr>, ifindex: u32, stop: &AtomicBool) {
    let session = match Session::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(
                "neighbour resolver: no netlink: {e}; tunnel traffic takes the kernel path"
            );
            return;
        }
    };
    let mut warned = false;
    while !stop.load(Relaxed) {
        let peer = match requests.recv_timeout(Duration::from_millis(200)) {
            Ok(p) => p,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Requests pile up while a peer is unknown: one look is enough.
        let now = Instant::now();
        if table.snapshot().get(&peer).is_some_and(|e| now < e.fresh_until) {
            continue;
        }
        let lookup = session.run(|h| async move {
            match netlink::route_to(h.clone(), peer).await? {
                Some((gw, oif)) if oif == ifindex => {
                    let hop = gw.unwrap_or(peer);
                    Ok::<_, std::io::Error>((
                        hop,
                        Lookup::Neighbour(netlink::neighbour(h, ifindex, hop).await?),
                    ))
                }
                _ => Ok((peer, Lookup::Elsewhere)),
            }
        });
        let (hop, lookup) = match lookup {
            Ok(x) => x,
            Err(e) => {
                if !warned {
                    tracing::warn!(%peer, "neighbour lookup failed: {e}");
                    warned = true;
                }
                (peer, Lookup::Neighbour(None))
            }
        };
        let (entry, kick) = entry_for(lookup, Instant::now());
        if kick {
            if let Err(e) = session.run(|h| netlink::neighbour_use(h, ifindex, hop)) {
                tracing::debug!(%peer, %hop, "asking the kernel to resolve: {e}");
            }
        }
        tracing::debug!(%peer, %hop, ?lookup, "neighbour");
        table.publish(peer, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 9]);

    #[test]
    fn unknown_peers_take_the_kernel_path_and_are_looked_up() {
        let now = Instant::now();
        assert_eq!(decide(None, now), (None, true));
        let fresh = Entry { mac: Some(MAC), fresh_until: now + FRESH };
        assert_eq!(decide(Some(&fresh), now), (Some(MAC), false));
        // Expired: still used, and refreshed in the background.
        assert_eq!(decide(Some(&fresh), now + FRESH), (Some(MAC), true));
        let pending = Entry { mac: None, fresh_until: now + RETRY };
        assert_eq!(decide(Some(&pending), now), (None, false), "no request flood while pending");
        assert_eq!(decide(Some(&pending), now + RETRY), (None, true));
    }

    #[test]
    fn what_the_kernel_says_becomes_an_entry() {
        let now = Instant::now();
        let (e, kick) = entry_for(Lookup::Neighbour(Some((NeighState::Valid, Some(MAC)))), now);
        assert_eq!((e.mac, e.fresh_until, kick), (Some(MAC), now + FRESH, false));
        // Stale: usable, re-confirmed by the kernel, looked at again soon.
        let (e, kick) = entry_for(Lookup::Neighbour(Some((NeighState::Stale, Some(MAC)))), now);
        assert_eq!((e.mac, e.fresh_until, kick), (Some(MAC), now + STALE_RECHECK, true));
        // Being resolved, failed, or absent: resolve, and retry soon.
        for l in [
            Lookup::Neighbour(None),
            Lookup::Neighbour(Some((NeighState::Unresolved, None))),
            Lookup::Neighbour(Some((NeighState::Valid, None))),
        ] {
            let (e, kick) = entry_for(l, now);
            assert_eq!((e.mac, e.fresh_until, kick), (None, now + RETRY, true), "{l:?}");
        }
        let (e, kick) = entry_for(Lookup::Elsewhere, now);
        assert_eq!((e.mac, e.fresh_until, kick), (None, now + ELSEWHERE, false));
    }

    #[test]
    fn lookups_queue_requests_and_published_entries_are_seen() {
        let (t, rx) = Neighbours::new();
        let peer = Ipv4Addr::new(192, 0, 2, 12);
        let now = Instant::now();
        assert_eq!(t.lookup(&t.snapshot(), peer, now), None);
        assert_eq!(rx.try_recv(), Ok(peer));
        t.publish(peer, Entry { mac: Some(MAC), fresh_until: now + FRESH });
        assert_eq!(t.lookup(&t.snapshot(), peer, now), Some(MAC));
        assert!(rx.try_recv().is_err(), "a fresh entry asks nothing");
        // A full queue never blocks a worker.
        for _ in 0..QUEUE + 10 {
            t.lookup(&t.snapshot(), Ipv4Addr::new(10, 0, 0, 1), now);
        }
        assert_eq!(rx.len(), QUEUE);
    }

    #[test]
    fn the_resolver_finds_the_loopback_neighbourless_and_elsewhere() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: netlink neighbour requests need root");
            return;
        }
        // 127.0.0.1 is routed out of `lo` (index 1); an uplink index that
        // is not `lo` makes it "elsewhere".
        let (t, rx) = Neighbours::new();
        let r = Resolver::start(t.clone(), rx, u32::MAX).unwrap();
        let peer = Ipv4Addr::LOCALHOST;
        let start = Instant::now();
        t.lookup(&t.snapshot(), peer, start);
        let mut seen = None;
        while start.elapsed() < Duration::from_secs(3) && seen.is_none() {
            seen = t.snapshot().get(&peer).copied();
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(r);
        let e = seen.expect("the resolver published an entry");
        assert_eq!(e.mac, None);
        assert!(e.fresh_until >= start + ELSEWHERE, "{e:?}");
    }
}
