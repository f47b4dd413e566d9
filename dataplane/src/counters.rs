//! Counters: packets and bytes per port and per worker, and drops by reason.
//!
//! Drop reasons are declared once, as data, with a one-line description each;
//! every drop in the dataplane carries exactly one reason. Workers count into
//! plain per-batch locals and publish to these atomics once per batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! drop_reasons {
    ($($variant:ident = $name:literal : $desc:literal,)*) => {
        /// Why a frame was dropped. One reason per drop.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason { $($variant,)* }

        impl DropReason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            /// Number of reasons.
            pub const COUNT: usize = [$($name,)*].len();

            /// Stable snake_case name (used in the API and in metrics).
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }

            /// One-line description for operators.
            pub fn description(self) -> &'static str {
                match self { $(DropReason::$variant => $desc,)* }
            }
        }
    };
}

drop_reasons! {
    Malformed = "malformed": "frame could not be parsed: truncated or invalid Ethernet/ARP/IP header",
    BadVnetHdr = "bad_vnet_hdr": "virtio-net header unknown or inconsistent with the frame (GSO/checksum offsets)",
    UnsupportedEthertype = "unsupported_ethertype": "ethertype the dataplane does not forward (e.g. IPv6 before dual stack)",
    NotForUs = "not_for_us": "destination MAC is neither ours nor broadcast",
    ArpIgnored = "arp_ignored": "ARP that needs no answer (reply, gratuitous, or for the sender's own address)",
    NoRoute = "no_route": "no route to the destination address",
    TtlExceeded = "ttl_exceeded": "IPv4 TTL reached zero (an ICMP time-exceeded was sent back)",
    Fragment = "fragment": "IP fragment the dataplane cannot classify",
    TxFull = "tx_full": "the output port's queue was full",
    TxError = "tx_error": "the output port failed to send (device down or gone)",
    HandoffFull = "handoff_full": "the queue to the worker owning the flow was full",
    PortGone = "port_gone": "the output port was removed while the frame was in flight",
    SegmentFailed = "segment_failed": "software segmentation of a GSO frame failed",
    TooBig = "too_big": "packet with DF set larger than the path (tunnel) MTU; an ICMP fragmentation-needed was sent back",
    TunnelMalformed = "tunnel_malformed": "tunnel packet truncated, with bad flags, or not carrying Ethernet/IPv4 inside",
    TunnelUnknownPeer = "tunnel_unknown_peer": "tunnel packet from an address that is not a known node",
    TunnelWrongVni = "tunnel_wrong_vni": "VXLAN packet with a VNI other than ours",
    TunnelNotLocal = "tunnel_not_local": "decapsulated packet not for a pod on this node (never relayed)",
    NoOverlay = "no_overlay": "route to another node, but the overlay (tunnel port) is not set up",
    PolicyIngress = "policy_ingress": "denied by the receiving endpoint's NetworkPolicy (ingress)",
    PolicyEgress = "policy_egress": "denied by the sending endpoint's NetworkPolicy (egress)",
    ConntrackFull = "conntrack_full": "a new flow found the connection-tracking table full",
    Spoofed = "spoofed": "a pod sent from an address or MAC that is not its own",
    UplinkMalformed = "uplink_malformed": "frame from the AF_XDP uplink with a bad outer Ethernet/IPv4/UDP header (checksum, lengths, not for this node)",
    UplinkRxDropped = "uplink_rx_dropped": "frames the kernel could not hand to the AF_XDP socket (receive ring full, no free buffer, too long)",
    ServiceNoBackend = "service_no_backend": "a new connection to a Service frontend with no usable backend (a TCP RST or ICMP port unreachable was sent back)",
    NatTableFull = "nat_table_full": "a new translated flow found the worker's NAT table full",
    SnatPortsExhausted = "snat_ports_exhausted": "no free source port to translate a new flow to this destination (natOutgoing, hairpin, NodePort)",
    NatMalformed = "nat_malformed": "a packet of a translated flow too short to rewrite",
}

/// Counters of one port. Written by workers (once per batch), read by the API.
#[derive(Default, Debug)]
pub struct PortStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub drops: DropCounters,
}

/// One counter per drop reason.
#[derive(Debug)]
pub struct DropCounters([AtomicU64; DropReason::COUNT]);

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl DropCounters {
    pub fn add(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.0[reason as usize].fetch_add(n, Relaxed);
        }
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Relaxed)
    }

    /// Non-zero counters as (name, value).
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        DropReason::ALL
            .iter()
            .filter_map(|r| {
                let v = self.get(*r);
                (v > 0).then(|| (r.name().to_string(), v))
            })
            .collect()
    }
}

impl PortStats {
    pub fn add_rx(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.rx_packets.fetch_add(packets, Relaxed);
            self.rx_bytes.fetch_add(bytes, Relaxed);
        }
    }

    pub fn add_tx(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.tx_packets.fetch_add(packets, Relaxed);
            self.tx_bytes.fetch_add(bytes, Relaxed);
        }
    }

    /// Count a transmit batch: what left, and what the port refused.
    pub fn record_tx(&self, o: &crate::port::TxOutcome) {
        self.add_tx(o.sent, o.bytes);
        self.drops.add(DropReason::TxFull, o.full);
        self.drops.add(DropReason::TxError, o.failed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops: self.drops.snapshot(),
        }
    }
}

/// Counters of one worker thread.
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub core: Option<usize>,
    pub batches: AtomicU64,
    pub polls: AtomicU64,
    pub port: PortStats,
    pub handoff_in: AtomicU64,
    pub handoff_out: AtomicU64,
    /// Segments merged into another frame by receive coalescing (GRO).
    pub gro_merged: AtomicU64,
    /// Connection-tracking entries in use, and flows refused for lack of
    /// room (gauges, set once per batch).
    pub ct_entries: AtomicU64,
    pub ct_refused: AtomicU64,
    /// Translated-flow entries and allocated source ports (gauges).
    pub nat_entries: AtomicU64,
    pub snat_ports: AtomicU64,
}

/// A point-in-time copy of a [`PortStats`], as the API returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Drops by reason name; reasons with a zero count are left out.
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// Per-batch drop tally kept on the worker's stack, published once per batch.
#[derive(Default)]
pub struct DropTally([u32; DropReason::COUNT]);

impl DropTally {
    pub fn bump(&mut self, r: DropReason) {
        self.0[r as usize] += 1;
    }

    /// Add everything into each of `to` and reset.
    pub fn flush(&mut self, to: &[&DropCounters]) {
        for (i, n) in self.0.iter_mut().enumerate() {
            if *n > 0 {
                for c in to {
                    c.add(DropReason::ALL[i], u64::from(*n));
                }
                *n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_have_unique_names_and_descriptions() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        assert!(DropReason::ALL.iter().all(|r| !r.description().is_empty()));
    }

    #[test]
    fn tally_flushes_and_resets() {
        let c = DropCounters::default();
        let mut t = DropTally::default();
        t.bump(DropReason::NoRoute);
        t.bump(DropReason::NoRoute);
        t.flush(&[&c]);
        t.flush(&[&c]);
        assert_eq!(c.get(DropReason::NoRoute), 2);
        assert_eq!(c.snapshot().get("no_route"), Some(&2));
        assert_eq!(c.snapshot().len(), 1);
    }
}
