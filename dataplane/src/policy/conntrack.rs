//! Connection tracking: the flows policy has allowed, so that their later
//! packets, and the replies, pass without being classified again.
//!
//! One table per worker: a flow's packets in both directions are processed
//! by the worker that owns its address pair (`pipeline::flow`), so no table
//! is shared between cores. Keys are the 5-tuple in a direction-free form
//! (the lower endpoint first); each entry remembers which side opened the
//! flow, its protocol state and when it expires. TCP follows SYN, SYN-ACK,
//! FIN and RST; UDP and SCTP are flows with an idle timeout; ICMP echo is
//! keyed by its identifier, and ICMP errors are allowed when the packet
//! they quote belongs to a tracked flow.
//!
//! The table is bounded (`capacity` per class, as Cilium splits TCP from
//! the rest); a new flow that finds it full, after expired entries were
//! swept, is refused and counted, never let to grow it.
//!
//! Every entry carries the policy generation its verdict was made under; a
//! packet of a flow whose endpoint's policy changed since is classified
//! again, and the flow ends if the new policy denies it.

use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;

/// An endpoint of a flow: address and port (ICMP echo: the identifier).
pub type End = (Ipv4Addr, u16);

/// A flow, direction-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub proto: u8,
    pub lo: End,
    pub hi: End,
}

impl Key {
    /// The key of a packet from `src` to `dst`, and whether `src` is the
    /// lower end.
    pub fn of(proto: u8, src: End, dst: End) -> (Key, bool) {
        if src <= dst {
            (Key { proto, lo: src, hi: dst }, true)
        } else {
            (Key { proto, lo: dst, hi: src }, false)
        }
    }
}

/// Where a TCP connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// SYN seen from the opener.
    SynSent,
    /// SYN-ACK seen from the answerer.
    SynRecv,
    Established,
    /// A FIN from one side.
    FinWait,
    /// FINs from both sides, or an RST.
    Closing,
}

/// One tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The opener is the lower end of the key.
    pub opener_lo: bool,
    pub tcp: Option<TcpState>,
    /// FIN seen from the lower / higher end.
    fin: (bool, bool),
    /// Expiry, in the table's clock (milliseconds).
    pub expires: u64,
    /// The policy generation the verdict was made under.
    pub generation: u64,
}

/// Idle timeouts, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    pub tcp_closing: u64,
    pub udp: u64,
    pub other: u64,
}

impl Default for Timeouts {
    /// Cilium's defaults: 6 h established TCP, 60 s handshakes and
    /// non-TCP flows, 10 s closing.
    fn default() -> Timeouts {
        Timeouts {
            tcp_syn: 60_000,
            tcp_established: 6 * 3600 * 1000,
            tcp_closing: 10_000,
            udp: 60_000,
            other: 60_000,
        }
    }
}

/// Table sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub tcp: usize,
    pub other: usize,
}

impl Default for Limits {
    /// About Cilium's defaults: 1M TCP and 256K other entries per node; each
    /// worker takes its share (see [`Limits::per_worker`]).
    fn default() -> Limits {
        Limits { tcp: 1 << 20, other: 1 << 18 }
    }
}

impl Limits {
    pub fn per_worker(self, workers: usize) -> Limits {
        let w = workers.max(1);
        Limits { tcp: (self.tcp / w).max(1), other: (self.other / w).max(1) }
    }
}

/// What a packet is, for tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub proto: u8,
    pub src: End,
    pub dst: End,
    /// TCP flags (0 for other protocols).
    pub flags: u8,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

/// What the table says about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Part of a tracked flow, in its opening direction (`true`) or as a
    /// reply (`false`); `stale` when its verdict predates `generation`.
    Known { forward: bool, stale: bool },
    /// Not tracked: policy must decide, then [`Conntrack::insert`].
    New,
    /// A TCP packet that cannot open a flow (no SYN) and is not tracked.
    Invalid,
}

/// One worker's table.
pub struct Conntrack {
    map: FxHashMap<Key, Entry>,
    limits: Limits,
    pub timeouts: Timeouts,
    tcp_count: usize,
    other_count: usize,
    last_sweep: u64,
    /// Flows refused because the table was full.
    pub refused: u64,
}

impl Conntrack {
    pub fn new(limits: Limits, timeouts: Timeouts) -> Conntrack {
        Conntrack {
            map: FxHashMap::default(),
            limits,
            timeouts,
            tcp_count: 0,
            other_count: 0,
            last_sweep: 0,
            refused: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (TCP, other) entries.
    pub fn counts(&self) -> (usize, usize) {
        (self.tcp_count, self.other_count)
    }

    fn timeout(&self, e: &Entry, proto: u8) -> u64 {
        match (proto, e.tcp) {
            (6, Some(TcpState::Established)) => self.timeouts.tcp_established,
            (6, Some(TcpState::FinWait | TcpState::Closing)) => self.timeouts.tcp_closing,
            (6, _) => self.timeouts.tcp_syn,
            (17, _) => self.timeouts.udp,
            _ => self.timeouts.other,
        }
    }

    /// Look a packet up at time `now`; a known flow's state and expiry
    /// advance. `generation` is the current policy generation of the
    /// endpoints concerned.
    pub fn track(&mut self, p: &Packet, now: u64, generation: u64) -> Seen {
        let (key, src_lo) = Key::of(p.proto, p.src, p.dst);
        let Some(mut e) = self.map.get(&key).copied() else {
            if p.proto == 6 && (p.flags & SYN == 0 || p.flags & ACK != 0) {
                return Seen::Invalid;
            }
            return Seen::New;
        };
        if e.expires <= now {
            self.remove(&key);
            if p.proto == 6 && (p.flags & SYN == 0 || p.flags & ACK != 0) {
                return Seen::Invalid;
            }
            return Seen::New;
        }
        let forward = src_lo == e.opener_lo;
        if p.proto == 6 {
            let st = e.tcp.unwrap_or(TcpState::SynSent);
            let next = if p.flags & RST != 0 {
                TcpState::Closing
            } else if p.flags & FIN != 0 {
                if src_lo {
                    e.fin.0 = true;
                } else {
                    e.fin.1 = true;
                }
                if e.fin.0 && e.fin.1 {
                    TcpState::Closing
                } else {
                    TcpState::FinWait
                }
            } else {
                match st {
                    TcpState::SynSent if !forward && p.flags & SYN != 0 && p.flags & ACK != 0 => {
                        TcpState::SynRecv
                    }
                    TcpState::SynRecv if forward && p.flags & ACK != 0 => TcpState::Established,
                    s => s,
                }
            };
            e.tcp = Some(next);
        }
        e.expires = now + self.timeout(&e, p.proto);
        let stale = e.generation != generation;
        self.map.insert(key, e);
        Seen::Known { forward, stale }
    }

    /// Record a new flow that policy allowed. Returns false (the packet must
    /// be dropped) when the table is full even after sweeping expired ones.
    pub fn insert(&mut self, p: &Packet, now: u64, generation: u64) -> bool {
        let (key, src_lo) = Key::of(p.proto, p.src, p.dst);
        let tcp = p.proto == 6;
        let full = if tcp {
            self.tcp_count >= self.limits.tcp
        } else {
            self.other_count >= self.limits.other
        };
        if full {
            // Sweep at most once per second of table time.
            if now >= self.last_sweep + 1000 {
                self.sweep(now);
            }
            let still = if tcp {
                self.tcp_count >= self.limits.tcp
            } else {
                self.other_count >= self.limits.other
            };
            if still {
                self.refused += 1;
                return false;
            }
        }
        // A flow picked up mid-way (no bare SYN) is taken as established.
        let state = if p.flags & SYN != 0 && p.flags & ACK == 0 {
            TcpState::SynSent
        } else {
            TcpState::Established
        };
        let mut e = Entry {
            opener_lo: src_lo,
            tcp: tcp.then_some(state),
            fin: (false, false),
            expires: 0,
            generation,
        };
        e.expires = now + self.timeout(&e, p.proto);
        if self.map.insert(key, e).is_none() {
            if tcp {
                self.tcp_count += 1;
            } else {
                self.other_count += 1;
            }
        }
        true
    }

    /// The verdict of a flow was made again under `generation`.
    pub fn refresh(&mut self, p: &Packet, generation: u64) {
        let (key, _) = Key::of(p.proto, p.src, p.dst);
        if let Some(e) = self.map.get_mut(&key) {
            e.generation = generation;
        }
    }

    /// Forget a flow (its policy no longer allows it).
    pub fn forget(&mut self, p: &Packet) {
        let (key, _) = Key::of(p.proto, p.src, p.dst);
        self.remove(&key);
    }

    /// Is the flow an ICMP error quotes (from `src` to `dst` as the
    /// original packet went) tracked?
    pub fn related(&self, proto: u8, src: End, dst: End, now: u64) -> bool {
        let (key, _) = Key::of(proto, src, dst);
        self.map.get(&key).is_some_and(|e| e.expires > now)
    }

    fn remove(&mut self, key: &Key) {
        if self.map.remove(key).is_some() {
            if key.proto == 6 {
                self.tcp_count -= 1;
            } else {
                self.other_count -= 1;
            }
        }
    }

    /// Drop every expired entry.
    pub fn sweep(&mut self, now: u64) {
        self.last_sweep = now;
        let (mut t, mut o) = (0, 0);
        self.map.retain(|k, e| {
            let keep = e.expires > now;
            if keep {
                if k.proto == 6 {
                    t += 1;
                } else {
                    o += 1;
                }
            }
            keep
        });
        self.tcp_count = t;
        self.other_count = o;
    }

    /// Bytes per entry, roughly (key, entry and hash-table overhead).
    pub fn entry_bytes() -> usize {
        std::mem::size_of::<(Key, Entry)>() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> End {
        (Ipv4Addr::new(10, 65, 0, 2), 40000)
    }

    fn b() -> End {
        (Ipv4Addr::new(10, 65, 1, 3), 80)
    }

    fn tcp(src: End, dst: End, flags: u8) -> Packet {
        Packet { proto: 6, src, dst, flags }
    }

    #[test]
    fn tcp_handshake_data_and_close() {
        let mut ct = Conntrack::new(Limits::default(), Timeouts::default());
        let syn = tcp(a(), b(), SYN);
        assert_eq!(ct.track(&syn, 0, 1), Seen::New);
        assert!(ct.insert(&syn, 0, 1));
        let synack = tcp(b(), a(), SYN | ACK);
        assert_eq!(ct.track(&synack, 1, 1), Seen::Known { forward: false, stale: false });
        assert_eq!(
            ct.track(&tcp(a(), b(), ACK), 2, 1),
            Seen::Known { forward: true, stale: false }
        );
        let (k, _) = Key::of(6, a(), b());
        assert_eq!(ct.map[&k].tcp, Some(TcpState::Established));
        assert_eq!(ct.map[&k].expires, 2 + Timeouts::default().tcp_established);
        ct.track(&tcp(a(), b(), FIN | ACK), 3, 1);
        assert_eq!(ct.map[&k].tcp, Some(TcpState::FinWait));
        ct.track(&tcp(b(), a(), FIN | ACK), 4, 1);
        assert_eq!(ct.map[&k].tcp, Some(TcpState::Closing));
        assert_eq!(ct.map[&k].expires, 4 + Timeouts::default().tcp_closing);
        // After the closing timeout the flow is gone; a stray ACK is invalid.
        assert_eq!(ct.track(&tcp(a(), b(), ACK), 5 + 10_000, 1), Seen::Invalid);
        assert!(ct.is_empty());
    }

    #[test]
    fn tcp_without_syn_cannot_open_a_flow() {
        let mut ct = Conntrack::new(Limits::default(), Timeouts::default());
        assert_eq!(ct.track(&tcp(a(), b(), ACK), 0, 1), Seen::Invalid);
        assert_eq!(ct.track(&tcp(a(), b(), SYN | ACK), 0, 1), Seen::Invalid);
        assert_eq!(ct.track(&tcp(a(), b(), RST), 0, 1), Seen::Invalid);
    }

    #[test]
    fn rst_closes_and_udp_expires_when_idle() {
        let mut ct = Conntrack::new(Limits::default(), Timeouts::default());
        let syn = tcp(a(), b(), SYN);
        ct.insert(&syn, 0, 1);
        ct.track(&tcp(b(), a(), RST | ACK), 1, 1);
        let (k, _) = Key::of(6, a(), b());
        assert_eq!(ct.map[&k].tcp, Some(TcpState::Closing));
        let u = Packet { proto: 17, src: a(), dst: b(), flags: 0 };
        assert_eq!(ct.track(&u, 0, 1), Seen::New);
        ct.insert(&u, 0, 1);
        let reply = Packet { proto: 17, src: b(), dst: a(), flags: 0 };
        assert_eq!(ct.track(&reply, 59_999, 1), Seen::Known { forward: false, stale: false });
        // Idle for the timeout from the last packet: gone.
        assert_eq!(ct.track(&reply, 59_999 + 60_000, 1), Seen::New);
    }

    #[test]
    fn a_policy_change_makes_flows_stale() {
        let mut ct = Conntrack::new(Limits::default(), Timeouts::default());
        let u = Packet { proto: 17, src: a(), dst: b(), flags: 0 };
        ct.insert(&u, 0, 1);
        assert_eq!(ct.track(&u, 1, 2), Seen::Known { forward: true, stale: true });
        ct.refresh(&u, 2);
        assert_eq!(ct.track(&u, 2, 2), Seen::Known { forward: true, stale: false });
        ct.forget(&u);
        assert_eq!(ct.track(&u, 3, 2), Seen::New);
    }

    #[test]
    fn the_table_is_bounded_refuses_when_full_and_sweeps_expired_entries() {
        let mut ct = Conntrack::new(Limits { tcp: 10, other: 5 }, Timeouts::default());
        for i in 0..5u16 {
            assert!(ct.insert(&Packet { proto: 17, src: (a().0, i), dst: b(), flags: 0 }, 0, 1));
        }
        let extra = Packet { proto: 17, src: (a().0, 99), dst: b(), flags: 0 };
        assert!(!ct.insert(&extra, 10, 1), "full: refused");
        assert_eq!(ct.refused, 1);
        // TCP has its own budget.
        assert!(ct.insert(&tcp(a(), b(), SYN), 10, 1));
        // Once the UDP entries expired, a sweep makes room.
        assert!(ct.insert(&extra, 60_001, 1));
        assert_eq!(ct.counts(), (1, 1));
    }

    #[test]
    fn icmp_errors_relate_to_tracked_flows() {
        let mut ct = Conntrack::new(Limits::default(), Timeouts::default());
        let u = Packet { proto: 17, src: a(), dst: b(), flags: 0 };
        ct.insert(&u, 0, 1);
        assert!(ct.related(17, a(), b(), 1));
        assert!(!ct.related(17, a(), (b().0, 81), 1));
        assert!(Conntrack::entry_bytes() <= 48, "{}", Conntrack::entry_bytes());
    }
}
