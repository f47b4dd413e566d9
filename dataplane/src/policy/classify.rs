//! The compiled form of one direction of an endpoint's policy: "does any
//! rule allow this peer on this protocol and port?" answered with a cost
//! that does not depend on the number of rules or addresses.
//!
//! Compilation, in the manner of recursive flow classification:
//! 1. Rules with the same ports are merged (their peers united): what is
//!    left is one rule per distinct port set, usually a handful.
//! 2. Peer addresses: every CIDR and exception of every rule goes into a
//!    longest-prefix table. Walking the prefixes in nesting order gives, for
//!    each, the set of rules whose peers contain the addresses that match
//!    it longest; identical sets share one class number.
//! 3. Ports: per protocol, the range boundaries cut 0-65535 into intervals;
//!    each interval gets the class of the set of rules that cover it.
//! 4. A bit matrix says, per (peer class, port class), whether the two rule
//!    sets meet.
//!
//! A lookup is then one longest-prefix match (a probe per distinct prefix
//! length), one binary search over the interval starts of the protocol,
//! and one bit test.

use super::{EndpointPolicy, PortRange, Proto, Rule};
use crate::api::Cidr;
use crate::tables::lpm::PrefixKey;
use crate::tables::Lpm;
use rustc_hash::FxHashMap;
use std::net::{IpAddr, Ipv4Addr};

/// A set of (merged) rules, as bits.
type Bits = Vec<u64>;

fn set(b: &mut Bits, i: usize) {
    b[i / 64] |= 1 << (i % 64);
}

fn clear(b: &mut Bits, i: usize) {
    b[i / 64] &= !(1 << (i % 64));
}

/// Call `f` with the index of every set bit.
fn for_each_bit(b: &Bits, mut f: impl FnMut(usize)) {
    for (w, word) in b.iter().enumerate() {
        let mut x = *word;
        while x != 0 {
            let t = x.trailing_zeros() as usize;
            f(w * 64 + t);
            x &= x - 1;
        }
    }
}

/// Up to this many (peer class, port class) cells, a bit matrix (2 MiB);
/// beyond, the allowed pairs in a hash set (many classes on both sides,
/// for example thousands of peers each on its own port).
const DENSE_CELLS: usize = 1 << 24;

/// The allowed (peer class, port class) pairs.
#[derive(Clone)]
enum Allowed {
    /// Bit `a * port_classes + b`.
    Dense(Vec<u64>),
    Sparse(rustc_hash::FxHashSet<(u32, u32)>),
}

impl Allowed {
    fn set(&mut self, a: u32, b: u32, port_classes: u32) {
        match self {
            Allowed::Dense(v) => {
                let bit = a as usize * port_classes as usize + b as usize;
                v[bit / 64] |= 1 << (bit % 64);
            }
            Allowed::Sparse(s) => {
                s.insert((a, b));
            }
        }
    }

    #[inline]
    fn get(&self, a: u32, b: u32, port_classes: u32) -> bool {
        match self {
            Allowed::Dense(v) => {
                let bit = a as usize * port_classes as usize + b as usize;
                v.get(bit / 64).is_some_and(|w| w & (1 << (bit % 64)) != 0)
            }
            Allowed::Sparse(s) => s.contains(&(a, b)),
        }
    }
}

/// Numbers identical rule sets.
#[derive(Default)]
struct Classes {
    ids: FxHashMap<Bits, u32>,
    sets: Vec<Bits>,
}

impl Classes {
    fn id(&mut self, b: &Bits) -> u32 {
        if let Some(i) = self.ids.get(b) {
            return *i;
        }
        let i = self.sets.len() as u32;
        self.ids.insert(b.clone(), i);
        self.sets.push(b.clone());
        i
    }
}

/// Index of a protocol's interval table.
fn slot(p: Option<Proto>) -> usize {
    match p {
        Some(Proto::Tcp) => 0,
        Some(Proto::Udp) => 1,
        Some(Proto::Sctp) => 2,
        None => 3,
    }
}

/// One direction of one endpoint's policy, compiled.
#[derive(Clone)]
pub struct Classifier {
    ip: Lpm<u32, u32>,
    /// Class of addresses under no prefix.
    ip_default: u32,
    /// Per protocol (TCP, UDP, SCTP, any other): interval starts, ascending
    /// (the first is 0), with each interval's class.
    ports: [Vec<(u16, u32)>; 4],
    port_classes: u32,
    /// Which (peer class, port class) pairs are allowed.
    allowed: Allowed,
    /// Rules left after merging, for the record.
    pub merged_rules: usize,
    pub ip_classes: u32,
}

fn v4(c: &Cidr) -> Option<(u32, u8)> {
    match c.network().addr {
        IpAddr::V4(a) => Some((u32::from(a), c.len.min(32))),
        IpAddr::V6(_) => None,
    }
}

fn inside(outer: (u32, u8), inner: (u32, u8)) -> bool {
    inner.1 >= outer.1 && inner.0.mask(outer.1) == outer.0
}

/// Merge rules with identical port sets, uniting their peers.
fn merge(rules: &[Rule]) -> Vec<Rule> {
    let mut by_ports: Vec<Rule> = Vec::new();
    let mut index: FxHashMap<Option<Vec<PortRange>>, usize> = FxHashMap::default();
    for r in rules {
        let mut ports = r.ports.clone();
        if let Some(p) = ports.as_mut() {
            p.sort_by_key(|r| (r.proto, r.first, r.last));
            p.dedup();
        }
        match index.get(&ports) {
            Some(&i) => {
                let m = &mut by_ports[i];
                match (m.peers.as_mut(), &r.peers) {
                    (Some(acc), Some(more)) => acc.extend(more.iter().cloned()),
                    _ => m.peers = None,
                }
            }
            None => {
                index.insert(ports.clone(), by_ports.len());
                by_ports.push(Rule { peers: r.peers.clone(), ports });
            }
        }
    }
    by_ports
}

impl Classifier {
    /// Compile `rules` (an isolated direction: no rule, nothing allowed).
    pub fn compile(rules: &[Rule]) -> Classifier {
        let rules = merge(rules);
        let n = rules.len();
        let words = n.div_ceil(64).max(1);
        let mut classes = Classes::default();

        // Peers: every prefix with the nets it opens and the exceptions it
        // closes, walked in nesting order.
        let mut any_peer: Bits = vec![0; words];
        // prefix -> (net instances opened here, net instances excepted here)
        let mut marks: FxHashMap<(u32, u8), (Vec<usize>, Vec<usize>)> = FxHashMap::default();
        let mut owner: Vec<usize> = Vec::new(); // net instance -> rule
        for (i, r) in rules.iter().enumerate() {
            let Some(nets) = &r.peers else {
                set(&mut any_peer, i);
                continue;
            };
            for net in nets {
                let Some(c) = v4(&net.cidr) else { continue };
                let k = owner.len();
                owner.push(i);
                marks.entry(c).or_default().0.push(k);
                for e in &net.except {
                    if let Some(e) = v4(e) {
                        marks.entry(e).or_default().1.push(k);
                    }
                }
            }
        }
        let mut prefixes: Vec<(u32, u8)> = marks.keys().copied().collect();
        prefixes.sort_unstable();
        let mut ip = Lpm::default();
        let ip_default = classes.id(&any_peer);
        // Per net instance: inside its CIDR, and how many of its exceptions
        // we are inside. Per rule: how many of its nets are active.
        let mut inside_net = vec![false; owner.len()];
        let mut excluded = vec![0u32; owner.len()];
        let mut active = vec![0u32; n];
        let mut bits = any_peer.clone();
        let mut stack: Vec<(u32, u8)> = Vec::new();
        let activate = |k: usize, d: i32, active: &mut Vec<u32>, bits: &mut Bits| {
            let i = owner[k];
            if d > 0 {
                active[i] += 1;
                set(bits, i);
            } else {
                active[i] -= 1;
                if active[i] == 0 && rules[i].peers.is_some() {
                    clear(bits, i);
                }
            }
        };
        let enter = |p: (u32, u8),
                     d: i32,
                     inside_net: &mut Vec<bool>,
                     excluded: &mut Vec<u32>,
                     active: &mut Vec<u32>,
                     bits: &mut Bits| {
            let (opens, closes) = &marks[&p];
            if d > 0 {
                for &k in opens {
                    inside_net[k] = true;
                    if excluded[k] == 0 {
                        activate(k, 1, active, bits);
                    }
                }
                for &k in closes {
                    if inside_net[k] && excluded[k] == 0 {
                        activate(k, -1, active, bits);
                    }
                    excluded[k] += 1;
                }
            } else {
                for &k in closes {
                    excluded[k] -= 1;
                    if inside_net[k] && excluded[k] == 0 {
                        activate(k, 1, active, bits);
                    }
                }
                for &k in opens {
                    if excluded[k] == 0 {
                        activate(k, -1, active, bits);
                    }
                    inside_net[k] = false;
                }
            }
        };
        for &p in &prefixes {
            while let Some(&top) = stack.last() {
                if inside(top, p) {
                    break;
                }
                stack.pop();
                enter(top, -1, &mut inside_net, &mut excluded, &mut active, &mut bits);
            }
            enter(p, 1, &mut inside_net, &mut excluded, &mut active, &mut bits);
            stack.push(p);
            ip.insert(p.0, p.1, classes.id(&bits));
        }
        let ip_class_count = classes.sets.len();

        // Ports: per protocol, a sweep over range boundaries.
        let mut any_port: Bits = vec![0; words];
        for (i, r) in rules.iter().enumerate() {
            if r.ports.is_none() {
                set(&mut any_port, i);
            }
        }
        let mut pclasses = Classes::default();
        let mut ports: [Vec<(u16, u32)>; 4] = Default::default();
        for proto in [Some(Proto::Tcp), Some(Proto::Udp), Some(Proto::Sctp), None] {
            // (boundary, rule, +1 opens / -1 closes), closes at last + 1.
            let mut events: Vec<(u32, usize, i32)> = Vec::new();
            if let Some(p) = proto {
                for (i, r) in rules.iter().enumerate() {
                    for pr in r.ports.iter().flatten().filter(|pr| pr.proto == p) {
                        let (a, b) = (pr.first.min(pr.last), pr.first.max(pr.last));
                        events.push((u32::from(a), i, 1));
                        events.push((u32::from(b) + 1, i, -1));
                    }
                }
            }
            events.sort_unstable();
            let mut count = vec![0u32; n];
            let mut bits = any_port.clone();
            let table = &mut ports[slot(proto)];
            table.push((0, pclasses.id(&bits)));
            let mut k = 0;
            while k < events.len() {
                let at = events[k].0;
                while k < events.len() && events[k].0 == at {
                    let (_, i, d) = events[k];
                    if d > 0 {
                        count[i] += 1;
                        set(&mut bits, i);
                    } else {
                        count[i] -= 1;
                        if count[i] == 0 && rules[i].ports.is_some() {
                            clear(&mut bits, i);
                        }
                    }
                    k += 1;
                }
                if at > 65535 {
                    break;
                }
                let id = pclasses.id(&bits);
                match table.last_mut() {
                    Some(last) if last.0 == at as u16 => last.1 = id,
                    Some(last) if last.1 == id => {}
                    _ => table.push((at as u16, id)),
                }
            }
        }
        let port_classes = pclasses.sets.len() as u32;

        // Which (peer class, port class) pairs meet: through each rule's
        // classes on both sides (an inverted index), so the cost follows the
        // pairs that exist, not all pairs times the rules.
        let mut rule_ip: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (a, set) in classes.sets.iter().enumerate() {
            for_each_bit(set, |i| rule_ip[i].push(a as u32));
        }
        let mut rule_port: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (b, set) in pclasses.sets.iter().enumerate() {
            for_each_bit(set, |i| rule_port[i].push(b as u32));
        }
        let cells = ip_class_count * port_classes as usize;
        let mut allowed = if cells <= DENSE_CELLS {
            Allowed::Dense(vec![0u64; cells.div_ceil(64)])
        } else {
            Allowed::Sparse(Default::default())
        };
        for i in 0..n {
            for &a in &rule_ip[i] {
                for &b in &rule_port[i] {
                    allowed.set(a, b, port_classes);
                }
            }
        }
        Classifier {
            ip,
            ip_default,
            ports,
            port_classes,
            allowed,
            merged_rules: n,
            ip_classes: ip_class_count as u32,
        }
    }

    /// Does the policy allow `peer` on `proto`/`port` (`proto` None: any
    /// other protocol, such as ICMP; `port` is then ignored)?
    #[inline]
    pub fn allows(&self, peer: Ipv4Addr, proto: Option<Proto>, port: u16) -> bool {
        let a = self.ip.lookup(u32::from(peer)).copied().unwrap_or(self.ip_default);
        let t = &self.ports[slot(proto)];
        let port = if proto.is_none() { 0 } else { port };
        let i = t.partition_point(|(start, _)| *start <= port).saturating_sub(1);
        let b = t.get(i).map_or(0, |x| x.1);
        self.allowed.get(a, b, self.port_classes)
    }

    /// Prefixes in the peer table.
    pub fn prefixes(&self) -> usize {
        self.ip.len()
    }
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Classifier{{rules={} prefixes={} ip_classes={} port_classes={}}}",
            self.merged_rules,
            self.prefixes(),
            self.ip_classes,
            self.port_classes
        )
    }
}

/// Both directions of an endpoint, compiled; `None` is not isolated.
#[derive(Clone, Debug, Default)]
pub struct CompiledPolicy {
    pub ingress: Option<Classifier>,
    pub egress: Option<Classifier>,
}

impl CompiledPolicy {
    pub fn compile(p: &EndpointPolicy) -> CompiledPolicy {
        CompiledPolicy {
            ingress: p.ingress.as_deref().map(Classifier::compile),
            egress: p.egress.as_deref().map(Classifier::compile),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Net;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn net(s: &str, except: &[&str]) -> Net {
        Net { cidr: cidr(s), except: except.iter().map(|e| cidr(e)).collect() }
    }

    fn tcp(first: u16, last: u16) -> PortRange {
        PortRange { proto: Proto::Tcp, first, last }
    }

    /// Does the classifier agree with the rules' plain meaning?
    fn agree(rules: &[Rule], peers: &[Ipv4Addr], ports: &[(Option<Proto>, u16)]) {
        let c = Classifier::compile(rules);
        for &p in peers {
            for &(proto, port) in ports {
                let want = rules.iter().any(|r| r.allows(p, proto, port));
                assert_eq!(c.allows(p, proto, port), want, "{p} {proto:?}/{port} in {rules:?}");
            }
        }
    }

    #[test]
    fn no_rules_deny_everything_and_an_empty_rule_allows_everything() {
        let c = Classifier::compile(&[]);
        assert!(!c.allows("10.0.0.1".parse().unwrap(), Some(Proto::Tcp), 80));
        assert!(!c.allows("10.0.0.1".parse().unwrap(), None, 0));
        let c = Classifier::compile(&[Rule::default()]);
        assert!(c.allows("10.0.0.1".parse().unwrap(), Some(Proto::Udp), 53));
        assert!(c.allows("10.0.0.1".parse().unwrap(), None, 0));
    }

    #[test]
    fn peers_with_exceptions_ports_and_ranges() {
        let rules = vec![
            Rule {
                peers: Some(vec![net("10.0.0.0/8", &["10.1.0.0/16"]), net("10.1.2.3/32", &[])]),
                ports: Some(vec![
                    tcp(80, 80),
                    PortRange { proto: Proto::Udp, first: 1000, last: 2000 },
                ]),
            },
            Rule {
                peers: Some(vec![net("0.0.0.0/7", &["10.1.2.0/24"])]),
                ports: Some(vec![tcp(443, 443)]),
            },
            Rule { peers: Some(vec![net("192.168.0.0/16", &[])]), ports: None },
            // Overlapping exceptions from two nets of one rule.
            Rule {
                peers: Some(vec![
                    net("172.16.0.0/12", &["172.16.5.0/24"]),
                    net("172.16.0.0/16", &[]),
                ]),
                ports: Some(vec![tcp(22, 22)]),
            },
        ];
        let peers: Vec<Ipv4Addr> = [
            "10.0.0.1",
            "10.1.0.1",
            "10.1.2.3",
            "10.1.2.4",
            "10.1.3.1",
            "11.0.0.1",
            "1.2.3.4",
            "192.168.7.7",
            "192.169.0.1",
            "172.16.5.5",
            "172.17.5.5",
            "172.16.9.9",
            "8.8.8.8",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let ports = [
            (Some(Proto::Tcp), 79),
            (Some(Proto::Tcp), 80),
            (Some(Proto::Tcp), 81),
            (Some(Proto::Tcp), 443),
            (Some(Proto::Tcp), 22),
            (Some(Proto::Udp), 999),
            (Some(Proto::Udp), 1000),
            (Some(Proto::Udp), 2000),
            (Some(Proto::Udp), 2001),
            (Some(Proto::Sctp), 80),
            (None, 0),
            (Some(Proto::Tcp), 65535),
            (Some(Proto::Tcp), 0),
        ];
        agree(&rules, &peers, &ports);
    }

    #[test]
    fn random_rule_sets_agree_with_the_plain_meaning() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..200 {
            let mut rules = Vec::new();
            for _ in 0..next(6) {
                let peers = (next(4) != 0).then(|| {
                    (0..1 + next(3))
                        .map(|_| {
                            let len = [8u8, 16, 24, 30, 32][next(5) as usize];
                            let a = Ipv4Addr::new(10, next(3) as u8, next(3) as u8, next(8) as u8);
                            let c = Cidr { addr: IpAddr::V4(a), len };
                            let except = (0..next(2))
                                .map(|_| Cidr {
                                    addr: IpAddr::V4(a),
                                    len: (len + 1 + next(4) as u8).min(32),
                                })
                                .collect();
                            Net { cidr: c, except }
                        })
                        .collect()
                });
                let ports = (next(3) != 0).then(|| {
                    (0..1 + next(2))
                        .map(|_| {
                            let proto = [Proto::Tcp, Proto::Udp, Proto::Sctp][next(3) as usize];
                            let first = next(6) as u16 * 20;
                            PortRange { proto, first, last: first + next(30) as u16 }
                        })
                        .collect()
                });
                rules.push(Rule { peers, ports });
            }
            let peers: Vec<Ipv4Addr> = (0..40)
                .map(|_| Ipv4Addr::new(10, next(3) as u8, next(3) as u8, next(8) as u8))
                .collect();
            let ports: Vec<(Option<Proto>, u16)> = (0..30)
                .map(|_| {
                    let proto = [Some(Proto::Tcp), Some(Proto::Udp), Some(Proto::Sctp), None]
                        [next(4) as usize];
                    (proto, next(140) as u16)
                })
                .collect();
            agree(&rules, &peers, &ports);
        }
    }

    #[test]
    fn many_rules_merge_into_few_classes() {
        // 10,000 rules, each one pod on port 80 or 8080: two merged rules.
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| Rule {
                peers: Some(vec![Net {
                    cidr: Cidr { addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), len: 32 },
                    except: vec![],
                }]),
                ports: Some(vec![tcp(
                    if i % 2 == 0 { 80 } else { 8080 },
                    if i % 2 == 0 { 80 } else { 8080 },
                )]),
            })
            .collect();
        let c = Classifier::compile(&rules);
        assert_eq!(c.merged_rules, 2);
        assert!(c.ip_classes <= 3, "{}", c.ip_classes);
        assert!(c.allows(Ipv4Addr::from(0x0a00_0002), Some(Proto::Tcp), 80));
        assert!(!c.allows(Ipv4Addr::from(0x0a00_0002), Some(Proto::Tcp), 8080));
        assert!(c.allows(Ipv4Addr::from(0x0a00_0003), Some(Proto::Tcp), 8080));
        assert!(!c.allows(Ipv4Addr::from(0x0b00_0003), Some(Proto::Tcp), 8080));
    }

    #[test]
    fn thousands_of_peers_each_on_its_own_port_compile_fast_and_agree() {
        // Many classes on both sides: the sparse pair set, and a compile
        // cost that follows the pairs that exist.
        let n = 6_000u32;
        let rules: Vec<Rule> = (0..n)
            .map(|i| Rule {
                peers: Some(vec![Net {
                    cidr: Cidr { addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), len: 32 },
                    except: vec![],
                }]),
                ports: Some(vec![tcp(1000 + i as u16, 1000 + i as u16)]),
            })
            .collect();
        let t = std::time::Instant::now();
        let c = Classifier::compile(&rules);
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "{:?}", t.elapsed());
        assert!(matches!(c.allowed, Allowed::Sparse(_)), "{c:?}");
        for i in (0..n).step_by(97) {
            let peer = Ipv4Addr::from(0x0a00_0000 + i);
            assert!(c.allows(peer, Some(Proto::Tcp), 1000 + i as u16));
            assert!(!c.allows(peer, Some(Proto::Tcp), 1001 + i as u16));
            assert!(!c.allows(peer, Some(Proto::Udp), 1000 + i as u16));
        }
    }
}
