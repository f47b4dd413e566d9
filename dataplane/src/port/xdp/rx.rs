//! The AF_XDP uplink port's receive side, owned by one worker: the tunnel
//! packets the XDP program redirected into the sockets of one or more
//! receive queues. Each packet's outer Ethernet/IPv4(/UDP) headers are
//! checked and stripped (`wire::outer`), and the frame holds exactly what
//! the tunnel's socket port would have delivered, with `meta.peer` the
//! outer source and `meta.encap` the encapsulation; the pipeline takes it
//! from there as from a socket port. Frames with bad outer headers are
//! dropped here and counted on the port (`uplink_malformed`), as are the
//! packets the kernel could not hand to a socket (`uplink_rx_dropped`, from
//! the sockets' statistics).

use crate::counters::{DropReason, PortStats};
use crate::frame::Frame;
use crate::port::RxPort;
use crate::sys::epoll::EpollSet;
use crate::sys::xsk::XskRx;
use crate::wire::outer;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the sockets' kernel counters are read (when idle).
const STATS_EVERY: Duration = Duration::from_millis(250);

pub struct XdpRx {
    queues: Vec<XskRx>,
    /// With several queues: one fd for the worker, readable when any is.
    epoll: Option<EpollSet>,
    next: usize,
    local_ip: Ipv4Addr,
    vxlan_port: u16,
    stats: Arc<PortStats>,
    /// Kernel drops already counted, per queue.
    seen_drops: Vec<u64>,
    stats_at: Instant,
}

impl XdpRx {
    pub fn new(
        queues: Vec<XskRx>,
        local_ip: Ipv4Addr,
        vxlan_port: u16,
        stats: Arc<PortStats>,
    ) -> io::Result<XdpRx> {
        let epoll = if queues.len() > 1 {
            let e = EpollSet::new()?;
            for q in &queues {
                e.add(q.fd())?;
            }
            Some(e)
        } else {
            None
        };
        let n = queues.len();
        Ok(XdpRx {
            queues,
            epoll,
            next: 0,
            local_ip,
            vxlan_port,
            stats,
            seen_drops: vec![0; n],
            stats_at: Instant::now(),
        })
    }

    /// Count what the kernel dropped on the way to the sockets since last time.
    fn kernel_drops(&mut self) {
        self.stats_at = Instant::now();
        for (q, seen) in self.queues.iter().zip(self.seen_drops.iter_mut()) {
            if let Ok(s) = q.stats() {
                let total = s.rx_dropped + s.rx_ring_full;
                self.stats.drops.add(DropReason::UplinkRxDropped, total.saturating_sub(*seen));
                *seen = total;
            }
        }
    }
}

impl RxPort for XdpRx {
    fn recv(&mut self, frames: &mut [Frame]) -> io::Result<usize> {
        // Consume the set's events before draining: what arrives from now
        // on signals the set again.
        if let Some(e) = &self.epoll {
            e.clear();
        }
        let (local, port) = (self.local_ip, self.vxlan_port);
        let mut n = 0;
        let (mut bad, mut bad_bytes) = (0u64, 0u64);
        let nq = self.queues.len();
        for k in 0..nq {
            let q = &mut self.queues[(self.next + k) % nq];
            // Until the frames are full or the queue is empty (a dropped
            // packet must not look like an empty queue to the worker).
            while n < frames.len() {
                let want = (frames.len() - n) as u32;
                let got = q.recv(want, |bytes| match outer::parse(bytes, local, port) {
                    Ok(r) => {
                        let f = &mut frames[n];
                        f.set_data(&bytes[r.payload]);
                        f.meta.peer = Some(r.peer);
                        f.meta.encap = Some(r.encap);
                        n += 1;
                    }
                    Err(_) => {
                        bad += 1;
                        bad_bytes += bytes.len() as u64;
                    }
                });
                if got < want {
                    break;
                }
            }
        }
        self.next = self.next.wrapping_add(1);
        if bad > 0 {
            self.stats.add_rx(bad, bad_bytes);
            self.stats.drops.add(DropReason::UplinkMalformed, bad);
        }
        // Drained: look at the kernel's counters now and then.
        if n < frames.len() && self.stats_at.elapsed() >= STATS_EVERY {
            self.kernel_drops();
        }
        Ok(n)
    }

    fn fd(&self) -> Option<RawFd> {
        match &self.epoll {
            Some(e) => Some(e.fd()),
            None => self.queues.first().map(XskRx::fd),
        }
    }
}
