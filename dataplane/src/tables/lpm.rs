//! Longest-prefix match: one hash map per prefix length, probed from the
//! longest length present down. Lookup cost grows with the number of
//! distinct prefix lengths in use (a handful: /32 endpoints, /26 blocks,
//! pool CIDRs, the default route), not with the number of routes.

use rustc_hash::FxHashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address usable as an LPM key.
pub trait PrefixKey: Copy + Eq + std::hash::Hash {
    const BITS: u8;
    /// The address with every bit after the first `len` cleared.
    fn mask(self, len: u8) -> Self;
}

impl PrefixKey for u32 {
    const BITS: u8 = 32;
    fn mask(self, len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - u32::from(len.min(32))))
        }
    }
}

impl PrefixKey for u128 {
    const BITS: u8 = 128;
    fn mask(self, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - u32::from(len.min(128))))
        }
    }
}

/// A prefix-keyed map with longest-prefix lookup.
#[derive(Clone)]
pub struct Lpm<K: PrefixKey, V> {
    by_len: Vec<FxHashMap<K, V>>,
    /// Prefix lengths that hold at least one entry, longest first.
    lens: Vec<u8>,
}

impl<K: PrefixKey, V: Clone> Default for Lpm<K, V> {
    fn default() -> Self {
        Lpm { by_len: (0..=K::BITS).map(|_| FxHashMap::default()).collect(), lens: Vec::new() }
    }
}

impl<K: PrefixKey, V: Clone> Lpm<K, V> {
    /// Insert or replace the value for `addr/len` (host bits are masked).
    pub fn insert(&mut self, addr: K, len: u8, v: V) -> Option<V> {
        let len = len.min(K::BITS);
        let old = self.by_len[usize::from(len)].insert(addr.mask(len), v);
        self.reindex();
        old
    }

    pub fn remove(&mut self, addr: K, len: u8) -> Option<V> {
        let len = len.min(K::BITS);
        let old = self.by_len[usize::from(len)].remove(&addr.mask(len));
        self.reindex();
        old
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: K) -> Option<&V> {
        for &len in &self.lens {
            if let Some(v) = self.by_len[usize::from(len)].get(&addr.mask(len)) {
                return Some(v);
            }
        }
        None
    }

    /// The value stored for exactly `addr/len`.
    pub fn get_exact(&self, addr: K, len: u8) -> Option<&V> {
        self.by_len.get(usize::from(len))?.get(&addr.mask(len))
    }

    pub fn len(&self) -> usize {
        self.by_len.iter().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Every (prefix, length, value).
    pub fn iter(&self) -> impl Iterator<Item = (K, u8, &V)> {
        self.by_len
            .iter()
            .enumerate()
            .flat_map(|(len, m)| m.iter().map(move |(k, v)| (*k, len as u8, v)))
    }

    fn reindex(&mut self) {
        self.lens =
            (0..=K::BITS).rev().filter(|l| !self.by_len[usize::from(*l)].is_empty()).collect();
    }
}

/// IPv4 and IPv6 routes side by side (dual stack comes later; the types are
/// ready for it now).
#[derive(Clone)]
pub struct DualLpm<V> {
    pub v4: Lpm<u32, V>,
    pub v6: Lpm<u128, V>,
}

impl<V: Clone> Default for DualLpm<V> {
    fn default() -> Self {
        DualLpm { v4: Lpm::default(), v6: Lpm::default() }
    }
}

impl<V: Clone> DualLpm<V> {
    pub fn insert(&mut self, addr: IpAddr, len: u8, v: V) -> Option<V> {
        match addr {
            IpAddr::V4(a) => self.v4.insert(u32::from(a), len, v),
            IpAddr::V6(a) => self.v6.insert(u128::from(a), len, v),
        }
    }

    pub fn remove(&mut self, addr: IpAddr, len: u8) -> Option<V> {
        match addr {
            IpAddr::V4(a) => self.v4.remove(u32::from(a), len),
            IpAddr::V6(a) => self.v6.remove(u128::from(a), len),
        }
    }

    /// The route for exactly this prefix.
    pub fn get_exact(&self, addr: IpAddr, len: u8) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => self.v4.get_exact(u32::from(a), len),
            IpAddr::V6(a) => self.v6.get_exact(u128::from(a), len),
        }
    }

    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, u8, &V)> {
        self.v4
            .iter()
            .map(|(k, l, v)| (IpAddr::V4(Ipv4Addr::from(k)), l, v))
            .chain(self.v6.iter().map(|(k, l, v)| (IpAddr::V6(Ipv6Addr::from(k)), l, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn longest_wins() {
        let mut t = Lpm::<u32, &str>::default();
        t.insert(0, 0, "default");
        t.insert(ip("10.65.0.0"), 16, "pool");
        t.insert(ip("10.65.3.0"), 26, "block");
        t.insert(ip("10.65.3.7"), 32, "pod");
        assert_eq!(t.lookup(ip("10.65.3.7")), Some(&"pod"));
        assert_eq!(t.lookup(ip("10.65.3.8")), Some(&"block"));
        assert_eq!(t.lookup(ip("10.65.3.64")), Some(&"pool"));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(&"default"));
        t.remove(ip("10.65.3.7"), 32);
        assert_eq!(t.lookup(ip("10.65.3.7")), Some(&"block"));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn host_bits_are_masked() {
        let mut t = Lpm::<u32, u8>::default();
        t.insert(ip("10.65.3.77"), 26, 1);
        assert_eq!(t.get_exact(ip("10.65.3.64"), 26), Some(&1));
        assert_eq!(t.lookup(ip("10.65.3.127")), Some(&1));
        assert_eq!(t.lookup(ip("10.65.3.128")), None);
    }

    #[test]
    fn v6_works() {
        let mut t = DualLpm::<u8>::default();
        t.insert("fd00:1::".parse().unwrap(), 64, 6);
        t.insert("10.0.0.0".parse().unwrap(), 8, 4);
        assert_eq!(t.lookup("fd00:1::5".parse().unwrap()), Some(&6));
        assert_eq!(t.lookup("fd00:2::5".parse().unwrap()), None);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(&4));
        assert_eq!(t.iter().count(), 2);
    }
}
