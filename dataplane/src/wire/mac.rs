//! Ethernet MAC addresses, printable and parseable as `aa:bb:cc:dd:ee:ff`.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// A locally administered unicast address derived from `seed`, stable for
    /// a given seed (used for pod and host interfaces the dataplane creates).
    pub fn local_from_seed(seed: &[u8]) -> MacAddr {
        // FNV-1a: small, dependency-free, good enough to spread names.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        // 0x02: locally administered, unicast.
        MacAddr([0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error for a string that is not six colon-separated hex octets.
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets like 02:00:00:00:00:01")]
pub struct ParseMacError(String);

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(|| ParseMacError(s.into()))?;
            if p.is_empty() || p.len() > 2 {
                return Err(ParseMacError(s.into()));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| ParseMacError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let m: MacAddr = "ee:ee:ee:ee:ee:0a".parse().unwrap();
        assert_eq!(m.0, [0xee, 0xee, 0xee, 0xee, 0xee, 0x0a]);
        assert_eq!(m.to_string(), "ee:ee:ee:ee:ee:0a");
    }

    #[test]
    fn rejects_bad() {
        for s in ["", "ee:ee", "ee:ee:ee:ee:ee:ee:ee", "zz:00:00:00:00:00", "eee:0:0:0:0:0"] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
    }

    #[test]
    fn seeded_is_local_unicast_and_stable() {
        let a = MacAddr::local_from_seed(b"pod-a");
        assert_eq!(a, MacAddr::local_from_seed(b"pod-a"));
        assert_ne!(a, MacAddr::local_from_seed(b"pod-b"));
        assert_eq!(a.0[0] & 0x03, 0x02);
    }
}
