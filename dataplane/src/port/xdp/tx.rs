//! The AF_XDP uplink port's transmit side: each frame the pipeline routed
//! into a tunnel (`meta.peer`, `meta.encap`) becomes its wire packets
//! (`gso::Wire`: as it is, with its partial checksum finished, or cut into
//! TCP segments), each written with its outer headers straight into a
//! transmit buffer:
//!
//! * Ethernet: from the uplink's MAC to the next hop's ([`super::neigh`]);
//! * IPv4: DF clear (as the socket path and the kernel's VXLAN device),
//!   TTL 64, an identification counting up per queue, the checksum;
//! * VXLAN: UDP from `vxlan::source_port(flow_hash)`, the exact RFC 7348
//!   behaviour a kernel socket cannot offer, with a zero checksum (the
//!   kernel VXLAN device's default over IPv4), then the VXLAN header.
//!
//! What cannot leave this way takes the kernel's path, through the tunnel's
//! socket port and counted there: packets to a peer whose neighbour is not
//! resolved yet (the kernel resolves it meanwhile), and packets longer than
//! the uplink's MTU (the kernel fragments the outer packet, as the socket
//! path always does).
//!
//! An AF_XDP transmit ring has one producer: each worker thread uses the
//! queue its thread slot picks, behind a lock taken once per batch (never
//! contended when there are as many queues as workers).

use super::neigh::Neighbours;
use crate::counters::PortStats;
use crate::frame::Frame;
use crate::gso::Wire;
use crate::port::{TxCaps, TxError, TxOutcome, TxPort};
use crate::sys::xsk::{TxFull, XskTx};
use crate::tables::Encap;
use crate::wire::outer::{self, Ipv4Outer};
use crate::wire::{vxlan, MacAddr};
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// TTL of the outer packets.
pub const TTL: u8 = 64;

/// A tunnel's socket port, for what does not leave through AF_XDP.
#[derive(Clone)]
pub struct Fallback {
    pub tx: Arc<dyn TxPort>,
    /// The socket port's counters: what it carries is counted there.
    pub stats: Arc<PortStats>,
}

/// What the transmit side needs to know; replaced as a whole when the
/// overlay changes.
#[derive(Clone)]
pub struct TxConfig {
    pub local_ip: Ipv4Addr,
    /// The uplink's MAC.
    pub src_mac: MacAddr,
    pub vxlan_port: u16,
    pub vni: u32,
    /// The longest frame the uplink carries (its MTU plus the Ethernet
    /// header, at most one buffer).
    pub max_frame: usize,
    pub vxlan: Option<Fallback>,
    pub ipip: Option<Fallback>,
}

/// The outer headers of one packet.
#[derive(Clone, Copy, Debug)]
pub struct Headers {
    pub encap: Encap,
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ip_id: u16,
    pub ttl: u8,
    pub tos: u8,
    pub df: bool,
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
}

/// The length of packet `i` of `f` on the wire, outer headers included;
/// `None` when it cannot be carried (IPIP of less than an Ethernet header).
pub fn wire_len(encap: Encap, f: &Frame, wire: &Wire, i: usize) -> Option<usize> {
    let (h, r) = wire.shape(f, i);
    let inner = h + r.len();
    match encap {
        Encap::Vxlan => Some(outer::VXLAN_LEN + inner),
        Encap::Ipip => inner.checked_sub(outer::ETH_LEN).map(|ip| outer::IPIP_LEN + ip),
        Encap::Native => None,
    }
}

/// Write packet `i` of `f` (see [`Wire`]) with its outer headers into
/// `buf`; its length, or `None` when it does not fit or cannot be built.
pub fn write_packet(
    buf: &mut [u8],
    o: &Headers,
    f: &Frame,
    wire: &Wire,
    i: usize,
) -> Option<usize> {
    let len = wire_len(o.encap, f, wire, i)?;
    let (h, r) = wire.shape(f, i);
    let buf = buf.get_mut(..len)?;
    // The inner packet first: for IPIP its Ethernet header lands where the
    // outer IPv4 header goes, and is overwritten by it next.
    let at = match o.encap {
        Encap::Vxlan => outer::VXLAN_LEN,
        _ => outer::IPIP_LEN - outer::ETH_LEN,
    };
    wire.write(f, i, &mut buf[at..at + h]);
    buf[at + h..].copy_from_slice(&f.data()[r]);
    let ip = Ipv4Outer {
        src_mac: o.src_mac,
        dst_mac: o.dst_mac,
        src: o.src,
        dst: o.dst,
        protocol: match o.encap {
            Encap::Vxlan => outer::PROTO_UDP,
            _ => outer::PROTO_IPIP,
        },
        id: o.ip_id,
        ttl: o.ttl,
        tos: o.tos,
        df: o.df,
    };
    ip.emit(len - outer::IPIP_LEN, buf).ok()?;
    if o.encap == Encap::Vxlan {
        let udp = &mut buf[outer::IPIP_LEN..];
        outer::emit_udp(o.src_port, o.dst_port, len - outer::IPIP_LEN - outer::UDP_LEN, udp)
            .ok()?;
        vxlan::emit_header(o.vni, &mut udp[outer::UDP_LEN..]).ok()?;
    }
    Some(len)
}

/// One queue's transmit half.
pub struct TxQueue {
    pub xsk: XskTx,
    ip_id: u16,
}

impl TxQueue {
    pub fn new(xsk: XskTx) -> TxQueue {
        TxQueue { xsk, ip_id: 0 }
    }
}

/// The uplink port's transmit side.
pub struct XdpTx {
    queues: Vec<Mutex<TxQueue>>,
    cfg: ArcSwap<TxConfig>,
    neigh: Arc<Neighbours>,
    warned: AtomicBool,
}

/// Worker threads get slots in turn; a thread sends on queue `slot % n`.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: usize = NEXT_SLOT.fetch_add(1, Relaxed);
    /// Frames for the kernel path, per encapsulation, reused batch after batch.
    static KERNEL: RefCell<(Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl XdpTx {
    pub fn new(queues: Vec<TxQueue>, cfg: TxConfig, neigh: Arc<Neighbours>) -> XdpTx {
        XdpTx {
            queues: queues.into_iter().map(Mutex::new).collect(),
            cfg: ArcSwap::from_pointee(cfg),
            neigh,
            warned: AtomicBool::new(false),
        }
    }

    /// Replace the configuration (the socket ports were reopened, ...).
    pub fn configure(&self, cfg: TxConfig) {
        self.cfg.store(Arc::new(cfg));
    }

    fn send_all(
        &self,
        frames: &[Frame],
        sel: &[u16],
        kernel: &mut (Vec<u16>, Vec<u16>),
    ) -> TxOutcome {
        let mut out = TxOutcome::default();
        if self.queues.is_empty() {
            out.failed = sel.len() as u64;
            return out;
        }
        let cfg = self.cfg.load();
        let neigh = self.neigh.snapshot();
        let now = Instant::now();
        let q = &self.queues[SLOT.with(|s| *s) % self.queues.len()];
        let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
        kernel.0.clear();
        kernel.1.clear();
        for &fi in sel {
            let f = &frames[usize::from(fi)];
            let (Some(peer), Some(encap), Some(wire)) = (f.meta.peer, f.meta.encap, Wire::of(f))
            else {
                out.failed += 1;
                continue;
            };
            let to_kernel = match encap {
                Encap::Vxlan => &mut kernel.0,
                Encap::Ipip => &mut kernel.1,
                Encap::Native => {
                    out.failed += 1;
                    continue;
                }
            };
            // Packet 0 is the longest: if it fits, they all do.
            let fits = wire_len(encap, f, &wire, 0).is_some_and(|l| l <= cfg.max_frame);
            let mac = if fits { self.neigh.lookup(&neigh, peer, now) } else { None };
            let Some(dst_mac) = mac else {
                to_kernel.push(fi);
                continue;
            };
            let mut o = Headers {
                encap,
                src_mac: cfg.src_mac,
                dst_mac,
                src: cfg.local_ip,
                dst: peer,
                ip_id: 0,
                ttl: TTL,
                tos: 0,
                df: false,
                src_port: vxlan::source_port(f.meta.flow_hash),
                dst_port: cfg.vxlan_port,
                vni: cfg.vni,
            };
            let n = wire.count();
            for i in 0..n {
                o.ip_id = q.ip_id;
                q.ip_id = q.ip_id.wrapping_add(1);
                match q.xsk.push(|buf| write_packet(buf, &o, f, &wire, i)) {
                    Ok(true) => {
                        out.sent += 1;
                        let (h, r) = wire.shape(f, i);
                        out.bytes += (h + r.len()) as u64;
                    }
                    Ok(false) => out.failed += 1,
                    Err(TxFull::Full) => {
                        out.full += (n - i) as u64;
                        break;
                    }
                }
            }
        }
        if let Err(e) = q.xsk.flush() {
            if !self.warned.swap(true, Relaxed) {
                tracing::warn!(
                    "AF_XDP send failed: {e} (further failures are counted as tx_error)"
                );
            }
            out.failed += std::mem::take(&mut out.sent);
            out.bytes = 0;
        }
        drop(q);
        for (list, fb) in [(&kernel.0, &cfg.vxlan), (&kernel.1, &cfg.ipip)] {
            if list.is_empty() {
                continue;
            }
            match fb {
                Some(fb) => {
                    fb.stats.record_tx(&fb.tx.send_batch(frames, list));
                }
                None => out.failed += list.len() as u64,
            }
        }
        out
    }
}

impl TxPort for XdpTx {
    /// As the socket ports: partial checksums and TCP/IPv4 GSO frames are
    /// finished here, segment by segment, into the transmit buffers.
    fn caps(&self) -> TxCaps {
        TxCaps::CSUM_TSO4
    }

    fn send(&self, frame: &Frame) -> Result<(), TxError> {
        self.send_batch(std::slice::from_ref(frame), &[0]).single()
    }

    /// Packets through AF_XDP are counted here; those that take the kernel
    /// path are counted on the tunnel's socket port.
    fn send_batch(&self, frames: &[Frame], sel: &[u16]) -> TxOutcome {
        KERNEL.with(|k| self.send_all(frames, sel, &mut k.borrow_mut()))
    }
}

#[cfg(test)]
mod tests;
