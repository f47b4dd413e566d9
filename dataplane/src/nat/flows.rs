//! A worker's translated flows.
//!
//! A flow is translated by the worker that owns the client's packets (the
//! pair client → frontend), which remembers the translation (`fwd`, keyed
//! by the tuple as the client sends it). Its replies carry another address
//! pair and belong to the worker owning the *translated* pair; that worker
//! keeps the reverse translation (`rev`, keyed by the reply as it arrives)
//! and receives every translated packet of the flow (handed off when the
//! two workers differ, see `pipeline::nat`). With one worker both halves
//! live in the same table.
//!
//! Source ports of translated flows (natOutgoing, hairpin, NodePort) are
//! allocated here, per (protocol, translated source address, destination),
//! from the worker's share of the port range (every `workers`-th port), so
//! two workers never hand out the same port. The table is bounded: a new
//! flow that finds it full, after a sweep, is refused and counted.

use crate::policy::conntrack::Timeouts;
use rustc_hash::{FxHashMap, FxHashSet};
use std::net::Ipv4Addr;

/// An address and a port (ICMP echo: the identifier on the client's side,
/// 0 on the server's).
pub type End = (Ipv4Addr, u16);

/// A directed 5-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub proto: u8,
    pub src: End,
    pub dst: End,
}

impl Tuple {
    #[inline]
    pub fn reversed(&self) -> Tuple {
        Tuple { proto: self.proto, src: self.dst, dst: self.src }
    }
}

const TCP: u8 = 6;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// TCP: only the opening SYN seen.
    Opening,
    Open,
    /// TCP: FIN or RST seen.
    Closing,
}

/// A forward translation.
#[derive(Clone, Copy, Debug)]
struct Fwd {
    to: Tuple,
    phase: Phase,
    expires: u64,
    /// The source port was allocated here (released with the entry).
    snat: bool,
}

/// A reverse translation: the client's original tuple.
#[derive(Clone, Copy, Debug)]
struct Rev {
    orig: Tuple,
    phase: Phase,
    expires: u64,
}

/// A remembered `sessionAffinity: ClientIP` choice.
#[derive(Clone, Copy, Debug)]
struct Affinity {
    backend: End,
    expires: u64,
}

/// Why a translation could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatError {
    /// The table is full.
    Full,
    /// No source port is free for this destination.
    PortsExhausted,
}

/// One worker's translations.
pub struct NatFlows {
    fwd: FxHashMap<Tuple, Fwd>,
    rev: FxHashMap<Tuple, Rev>,
    /// Reply tuples of the source ports this worker allocated.
    snat_used: FxHashSet<Tuple>,
    /// Allocated ports per (protocol, source address, destination).
    snat_count: FxHashMap<(u8, Ipv4Addr, End), u32>,
    affinity: FxHashMap<(u8, Ipv4Addr, u16, Ipv4Addr), Affinity>,
    /// Most entries in each of `fwd` and `rev`.
    capacity: usize,
    pub timeouts: Timeouts,
    last_sweep: u64,
    /// This worker's share of the port range: ports `first + k * step + offset`.
    pub worker: usize,
    pub workers: usize,
}

impl NatFlows {
    pub fn new(capacity: usize) -> NatFlows {
        NatFlows {
            fwd: FxHashMap::default(),
            rev: FxHashMap::default(),
            snat_used: FxHashSet::default(),
            snat_count: FxHashMap::default(),
            affinity: FxHashMap::default(),
            capacity: capacity.max(1),
            timeouts: Timeouts::default(),
            last_sweep: 0,
            worker: 0,
            workers: 1,
        }
    }

    /// (forward, reverse) entries in use.
    pub fn counts(&self) -> (usize, usize) {
        (self.fwd.len(), self.rev.len())
    }

    /// Allocated source ports.
    pub fn snat_ports(&self) -> usize {
        self.snat_used.len()
    }

    fn timeout(&self, proto: u8, phase: Phase) -> u64 {
        match (proto, phase) {
            (TCP, Phase::Opening) => self.timeouts.tcp_syn,
            (TCP, Phase::Open) => self.timeouts.tcp_established,
            (TCP, Phase::Closing) => self.timeouts.tcp_closing,
            (17, _) => self.timeouts.udp,
            _ => self.timeouts.other,
        }
    }

    fn advance(proto: u8, phase: Phase, flags: u8, forward: bool) -> Phase {
        if proto != TCP {
            return Phase::Open;
        }
        if flags & (FIN | RST) != 0 {
            return Phase::Closing;
        }
        match phase {
            // The client's ACK without SYN completes the handshake.
            Phase::Opening if forward && flags & ACK != 0 && flags & SYN == 0 => Phase::Open,
            Phase::Opening if !forward && flags & SYN != 0 && flags & ACK != 0 => Phase::Opening,
            p => p,
        }
    }

    /// The translation of the client's packet `t` (TCP `flags`), if the
    /// flow is known; its expiry and state advance.
    pub fn forward(&mut self, t: &Tuple, flags: u8, now: u64) -> Option<Tuple> {
        let e = self.fwd.get(t).copied()?;
        if e.expires <= now {
            self.drop_fwd(t);
            return None;
        }
        let phase = Self::advance(t.proto, e.phase, flags, true);
        let expires = now + self.timeout(t.proto, phase);
        if let Some(x) = self.fwd.get_mut(t) {
            x.phase = phase;
            x.expires = expires;
        }
        Some(e.to)
    }

    fn drop_fwd(&mut self, t: &Tuple) {
        if let Some(e) = self.fwd.remove(t) {
            if e.snat {
                self.release(&e.to);
            }
        }
    }

    fn release(&mut self, to: &Tuple) {
        if self.snat_used.remove(&to.reversed()) {
            let k = (to.proto, to.src.0, to.dst);
            if let Some(c) = self.snat_count.get_mut(&k) {
                *c -= 1;
                if *c == 0 {
                    self.snat_count.remove(&k);
                }
            }
        }
    }

    fn room(&mut self, now: u64, len: impl Fn(&NatFlows) -> usize) -> bool {
        if len(self) < self.capacity {
            return true;
        }
        if now >= self.last_sweep + 1000 {
            self.sweep(now);
        }
        len(self) < self.capacity
    }

    /// Remember that `orig` becomes `to` (`snat`: `to`'s source port was
    /// allocated by [`NatFlows::alloc_port`]).
    pub fn insert_forward(
        &mut self,
        orig: Tuple,
        to: Tuple,
        flags: u8,
        snat: bool,
        now: u64,
    ) -> Result<(), NatError> {
        if !self.fwd.contains_key(&orig) && !self.room(now, |s| s.fwd.len()) {
            if snat {
                self.release(&to);
            }
            return Err(NatError::Full);
        }
        let phase = if orig.proto == TCP && flags & SYN != 0 && flags & ACK == 0 {
            Phase::Opening
        } else {
            Phase::Open
        };
        let expires = now + self.timeout(orig.proto, phase);
        if let Some(old) = self.fwd.insert(orig, Fwd { to, phase, expires, snat }) {
            if old.snat && old.to != to {
                self.release(&old.to);
            }
        }
        Ok(())
    }

    /// At the translated tuple's owner: record (or refresh) the reverse of
    /// `orig` → `to`, for a forward packet with TCP `flags`.
    pub fn ensure_reverse(
        &mut self,
        orig: Tuple,
        to: Tuple,
        flags: u8,
        now: u64,
    ) -> Result<(), NatError> {
        let key = to.reversed();
        let phase = match self.rev.get(&key) {
            Some(e) if e.orig == orig && e.expires > now => {
                Self::advance(orig.proto, e.phase, flags, true)
            }
            _ => {
                if !self.room(now, |s| s.rev.len()) {
                    return Err(NatError::Full);
                }
                if orig.proto == TCP && flags & SYN != 0 && flags & ACK == 0 {
                    Phase::Opening
                } else {
                    Phase::Open
                }
            }
        };
        let expires = now + self.timeout(orig.proto, phase);
        self.rev.insert(key, Rev { orig, phase, expires });
        Ok(())
    }

    /// The original tuple of the flow a reply `r` belongs to (the reply is
    /// then `orig.reversed()`); its expiry and state advance.
    pub fn reverse(&mut self, r: &Tuple, flags: u8, now: u64) -> Option<Tuple> {
        let e = self.rev.get(r).copied()?;
        if e.expires <= now {
            self.rev.remove(r);
            return None;
        }
        let phase = Self::advance(r.proto, e.phase, flags, false);
        let expires = now + self.timeout(r.proto, phase);
        if let Some(x) = self.rev.get_mut(r) {
            x.phase = phase;
            x.expires = expires;
        }
        Some(e.orig)
    }

    /// The original tuple for a reply-direction tuple, without touching
    /// the entry (ICMP errors).
    pub fn peek_reverse(&self, r: &Tuple, now: u64) -> Option<Tuple> {
        self.rev.get(r).filter(|e| e.expires > now).map(|e| e.orig)
    }

    /// The translation of a forward-direction tuple, without touching it.
    pub fn peek_forward(&self, t: &Tuple, now: u64) -> Option<Tuple> {
        self.fwd.get(t).filter(|e| e.expires > now).map(|e| e.to)
    }

    /// A source port on `addr` for a flow to `dst`, free for this worker
    /// and disjoint from every other worker's, starting the search at a
    /// position derived from `hint` (the client's tuple, so a client's
    /// port tends to map to the same one). Ports are `range` inclusive.
    pub fn alloc_port(
        &mut self,
        proto: u8,
        addr: Ipv4Addr,
        dst: End,
        range: (u16, u16),
        hint: u64,
    ) -> Result<u16, NatError> {
        let (first, last) = (u32::from(range.0), u32::from(range.1));
        let step = self.workers.max(1) as u32;
        let offset = (self.worker as u32) % step;
        if first + offset > last {
            return Err(NatError::PortsExhausted);
        }
        let share = (last - first - offset) / step + 1;
        let key = (proto, addr, dst);
        if self.snat_count.get(&key).copied().unwrap_or(0) >= share {
            return Err(NatError::PortsExhausted);
        }
        let start = (hint % u64::from(share)) as u32;
        for k in 0..share {
            let slot = (start + k) % share;
            let port = (first + offset + slot * step) as u16;
            let reply = Tuple { proto, src: dst, dst: (addr, port) };
            if self.snat_used.insert(reply) {
                *self.snat_count.entry(key).or_insert(0) += 1;
                return Ok(port);
            }
        }
        Err(NatError::PortsExhausted)
    }

    /// Give back a port from [`NatFlows::alloc_port`] that was not used.
    pub fn free_port(&mut self, to: &Tuple) {
        self.release(to);
    }

    /// The backend a client was sent to through frontend `(proto, vip,
    /// port)` within the affinity timeout.
    pub fn affinity(&self, fe: (u8, Ipv4Addr, u16), client: Ipv4Addr, now: u64) -> Option<End> {
        self.affinity
            .get(&(fe.0, fe.1, fe.2, client))
            .filter(|a| a.expires > now)
            .map(|a| a.backend)
    }

    pub fn set_affinity(
        &mut self,
        fe: (u8, Ipv4Addr, u16),
        client: Ipv4Addr,
        backend: End,
        now: u64,
        timeout_ms: u64,
    ) {
        if self.affinity.len() >= self.capacity {
            self.affinity.retain(|_, a| a.expires > now);
            if self.affinity.len() >= self.capacity {
                return;
            }
        }
        let a = Affinity { backend, expires: now + timeout_ms };
        self.affinity.insert((fe.0, fe.1, fe.2, client), a);
    }

    /// Drop every expired entry.
    pub fn sweep(&mut self, now: u64) {
        self.last_sweep = now;
        let expired: Vec<Tuple> =
            self.fwd.iter().filter(|(_, e)| e.expires <= now).map(|(k, _)| *k).collect();
        for k in expired {
            self.drop_fwd(&k);
        }
        self.rev.retain(|_, e| e.expires > now);
        self.affinity.retain(|_, a| a.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str, sp: u16, dst: &str, dp: u16) -> Tuple {
        Tuple { proto: 6, src: (src.parse().unwrap(), sp), dst: (dst.parse().unwrap(), dp) }
    }

    #[test]
    fn forward_and_reverse_halves() {
        let mut n = NatFlows::new(16);
        let orig = t("10.65.0.2", 40000, "10.96.0.10", 80);
        let to = t("10.65.0.2", 40000, "10.65.0.3", 8080);
        n.insert_forward(orig, to, SYN, false, 0).unwrap();
        n.ensure_reverse(orig, to, SYN, 0).unwrap();
        assert_eq!(n.forward(&orig, ACK, 1), Some(to));
        assert_eq!(n.reverse(&to.reversed(), SYN | ACK, 1), Some(orig));
        assert_eq!(n.reverse(&to, ACK, 1), None, "only the reply direction");
        // Closing, then gone after the closing timeout.
        n.forward(&orig, FIN | ACK, 2);
        assert_eq!(n.forward(&orig, ACK, 2 + n.timeouts.tcp_closing), None);
        // An unanswered SYN expires after the handshake timeout.
        let o2 = t("10.65.0.2", 40001, "10.96.0.10", 80);
        n.insert_forward(o2, to, SYN, false, 0).unwrap();
        assert_eq!(n.forward(&o2, SYN, n.timeouts.tcp_syn + 1), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut n = NatFlows::new(2);
        let to = t("10.65.0.2", 1, "10.65.0.3", 8080);
        for p in 0..2 {
            n.insert_forward(t("10.65.0.2", p, "10.96.0.10", 80), to, SYN, false, 0).unwrap();
        }
        assert_eq!(
            n.insert_forward(t("10.65.0.2", 9, "10.96.0.10", 80), to, SYN, false, 0),
            Err(NatError::Full)
        );
        // After the entries expired, a sweep makes room.
        assert!(n
            .insert_forward(t("10.65.0.2", 9, "10.96.0.10", 80), to, SYN, false, 70_000)
            .is_ok());
    }

    #[test]
    fn ports_are_unique_per_destination_bounded_and_released() {
        let mut n = NatFlows::new(1 << 16);
        let a: Ipv4Addr = "192.0.2.10".parse().unwrap();
        let x: End = ("198.51.100.7".parse().unwrap(), 80);
        let y: End = ("198.51.100.8".parse().unwrap(), 80);
        let mut seen = std::collections::HashSet::new();
        for i in 0..16 {
            let p = n.alloc_port(6, a, x, (61440, 61455), i * 7919).unwrap();
            assert!((61440..=61455).contains(&p));
            assert!(seen.insert(p), "port {p} handed out twice");
        }
        assert_eq!(n.alloc_port(6, a, x, (61440, 61455), 3), Err(NatError::PortsExhausted));
        // Another destination has its own ports; so has another protocol.
        assert!(n.alloc_port(6, a, y, (61440, 61455), 3).is_ok());
        assert!(n.alloc_port(17, a, x, (61440, 61455), 3).is_ok());
        // A freed port can be used again.
        let to = Tuple { proto: 6, src: (a, 61445), dst: x };
        n.free_port(&to);
        assert_eq!(n.alloc_port(6, a, x, (61440, 61455), 0), Ok(61445));
    }

    #[test]
    fn workers_share_the_range_without_overlap() {
        let a: Ipv4Addr = "192.0.2.10".parse().unwrap();
        let x: End = ("198.51.100.7".parse().unwrap(), 80);
        let mut all = std::collections::HashSet::new();
        for w in 0..3 {
            let mut n = NatFlows::new(1 << 16);
            n.worker = w;
            n.workers = 3;
            while let Ok(p) = n.alloc_port(6, a, x, (61440, 61540), 17) {
                assert!(all.insert(p), "port {p} given by two workers");
            }
        }
        assert_eq!(all.len(), 101, "the whole range is used");
    }

    #[test]
    fn expired_forward_entries_release_their_ports() {
        let mut n = NatFlows::new(16);
        let a: Ipv4Addr = "192.0.2.10".parse().unwrap();
        let x: End = ("198.51.100.7".parse().unwrap(), 53);
        let p = n.alloc_port(17, a, x, (61440, 61440), 0).unwrap();
        let orig = Tuple { proto: 17, src: ("10.65.0.2".parse().unwrap(), 5353), dst: x };
        let to = Tuple { proto: 17, src: (a, p), dst: x };
        n.insert_forward(orig, to, 0, true, 0).unwrap();
        assert_eq!(n.alloc_port(17, a, x, (61440, 61440), 0), Err(NatError::PortsExhausted));
        n.sweep(n.timeouts.udp + 1);
        assert_eq!(n.snat_ports(), 0);
        assert_eq!(n.alloc_port(17, a, x, (61440, 61440), 0), Ok(61440));
    }

    #[test]
    fn affinity_remembers_until_its_timeout() {
        let mut n = NatFlows::new(16);
        let fe = (6, "10.96.0.10".parse().unwrap(), 80);
        let c: Ipv4Addr = "10.65.0.2".parse().unwrap();
        let b: End = ("10.65.0.3".parse().unwrap(), 8080);
        n.set_affinity(fe, c, b, 0, 10_000);
        assert_eq!(n.affinity(fe, c, 9_999), Some(b));
        assert_eq!(n.affinity(fe, c, 10_000), None);
    }
}
