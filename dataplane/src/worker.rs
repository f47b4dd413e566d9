//! Workers: identical threads, each pinned to a core, each owning the
//! receive side of a set of ports and polling them, in batches, with a
//! per-port budget per round so one busy port cannot starve the others.
//!
//! Event mode sleeps in epoll (mio) when a whole round found nothing, so an
//! idle dataplane uses no CPU; `--busy-poll` spins instead, for latency.
//!
//! Flow ownership: a frame is processed by the worker that owns its flow
//! ([`crate::pipeline::flow::owner`]); one received by another worker is
//! copied to the owner's hand-off queue. With one worker this costs nothing.

use crate::counters::{DropReason, DropTally, WorkerStats};
use crate::frame::Frame;
use crate::pipeline::{self, flow, Verdict};
use crate::port::{PortId, RxPort};
use crate::tables::{SharedTables, Tables};
use crate::{gro, gso};
use crossbeam::channel::{Receiver, Sender};
use crossbeam::queue::ArrayQueue;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

const WAKER: Token = Token(usize::MAX);
/// Frames waiting for their owning worker, per worker.
const HANDOFF_CAPACITY: usize = 4096;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Core to pin to; `None` leaves the thread unpinned.
    pub core: Option<usize>,
    pub busy_poll: bool,
    /// Frames per batch (and per port per round: the budget).
    pub batch: usize,
}

/// Messages from the control thread.
pub enum Command {
    AddPort(PortId, Box<dyn RxPort>),
    RemovePort(PortId),
    Stop,
}

/// What other workers and the control thread hold of a worker.
pub struct Peer {
    handoff: ArrayQueue<(PortId, Frame)>,
    waker: Option<Waker>,
}

impl Peer {
    fn wake(&self) {
        if let Some(w) = &self.waker {
            let _ = w.wake();
        }
    }
}

/// The control thread's handle on a running worker.
pub struct WorkerHandle {
    pub id: usize,
    pub stats: Arc<WorkerStats>,
    pub ports: usize,
    cmd: Sender<Command>,
    peers: Arc<Vec<Peer>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    pub fn send(&mut self, c: Command) {
        match &c {
            Command::AddPort(..) => self.ports += 1,
            Command::RemovePort(_) => self.ports = self.ports.saturating_sub(1),
            Command::Stop => {}
        }
        let _ = self.cmd.send(c);
        self.peers[self.id].wake();
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let _ = self.cmd.send(Command::Stop);
        self.peers[self.id].wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start one worker per config, sharing `tables`.
pub fn spawn_all(
    configs: &[WorkerConfig],
    tables: Arc<SharedTables>,
) -> std::io::Result<Vec<WorkerHandle>> {
    let n = configs.len().max(1);
    let mut polls = Vec::with_capacity(n);
    let mut peers = Vec::with_capacity(n);
    for c in configs {
        if c.busy_poll {
            polls.push(None);
            peers.push(Peer { handoff: ArrayQueue::new(HANDOFF_CAPACITY), waker: None });
        } else {
            let poll = Poll::new()?;
            let waker = Waker::new(poll.registry(), WAKER)?;
            polls.push(Some(poll));
            peers.push(Peer { handoff: ArrayQueue::new(HANDOFF_CAPACITY), waker: Some(waker) });
        }
    }
    let peers = Arc::new(peers);
    let mut handles = Vec::with_capacity(n);
    for (id, (c, poll)) in configs.iter().zip(polls).enumerate() {
        let (tx, rx) = crossbeam::channel::unbounded();
        let stats = Arc::new(WorkerStats { core: c.core, ..Default::default() });
        let w =
            Worker::new(id, n, c.clone(), poll, rx, peers.clone(), tables.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ocelot-worker-{id}"))
            .spawn(move || w.run())?;
        handles.push(WorkerHandle {
            id,
            stats,
            ports: 0,
            cmd: tx,
            peers: peers.clone(),
            thread: Some(thread),
        });
    }
    Ok(handles)
}

struct RxEntry {
    id: PortId,
    rx: Box<dyn RxPort>,
    /// Whether the last read error was already logged (no log floods).
    error_logged: bool,
    /// Event mode: epoll said readable and we have not drained it since.
    /// Ports without an fd, and every port in busy-poll mode, are always read.
    ready: bool,
    has_fd: bool,
}

/// Per-worker scratch, reused batch after batch.
struct Scratch {
    frames: Vec<Frame>,
    verdicts: Vec<Verdict>,
    tally: DropTally,
    groups: Vec<(PortId, Vec<u16>)>,
    segs: Vec<Frame>,
    handoff_in: Vec<(PortId, Frame)>,
    /// Hand-off frames of one input port, as a batch.
    handoff_run: Vec<Frame>,
    /// This worker's connection tracking (its flows are its own).
    flows: pipeline::FlowState,
}

struct Worker {
    id: usize,
    n: usize,
    cfg: WorkerConfig,
    poll: Option<Poll>,
    cmds: Receiver<Command>,
    peers: Arc<Vec<Peer>>,
    tables: Arc<SharedTables>,
    stats: Arc<WorkerStats>,
    ports: Vec<RxEntry>,
    s: Scratch,
    /// Connection tracking's clock.
    clock: std::time::Instant,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    fn new(
        id: usize,
        n: usize,
        cfg: WorkerConfig,
        poll: Option<Poll>,
        cmds: Receiver<Command>,
        peers: Arc<Vec<Peer>>,
        tables: Arc<SharedTables>,
        stats: Arc<WorkerStats>,
    ) -> Worker {
        let batch = cfg.batch.clamp(1, 256);
        let s = Scratch {
            frames: (0..batch).map(|_| Frame::new()).collect(),
            verdicts: Vec::with_capacity(batch),
            tally: DropTally::default(),
            groups: Vec::new(),
            segs: Vec::new(),
            handoff_in: Vec::with_capacity(batch),
            handoff_run: Vec::with_capacity(batch),
            flows: pipeline::FlowState::new(
                crate::policy::conntrack::Limits::default().per_worker(n),
            ),
        };
        let mut s = s;
        s.flows.nat.worker = id;
        s.flows.nat.workers = n;
        Worker {
            id,
            n,
            cfg: WorkerConfig { batch, ..cfg },
            poll,
            cmds,
            peers,
            tables,
            stats,
            ports: Vec::new(),
            s,
            clock: std::time::Instant::now(),
        }
    }

    fn run(mut self) {
        if let Some(core) = self.cfg.core {
            if let Err(e) = crate::sys::affinity::pin_current_thread(core) {
                tracing::warn!(worker = self.id, core, "cannot pin worker: {e}");
            }
        }
        tracing::info!(worker = self.id, core = ?self.cfg.core, busy_poll = self.cfg.busy_poll, batch = self.cfg.batch, "worker started");
        let mut events = Events::with_capacity(256);
        let mut start = 0usize;
        loop {
            if !self.commands() {
                break;
            }
            let mut work = self.drain_handoff();
            let np = self.ports.len();
            for k in 0..np {
                // Rotate the starting port so no port always goes first.
                let i = (start + k) % np;
                work += self.poll_port(i);
            }
            start = start.wrapping_add(1);
            self.stats.polls.fetch_add(1, Relaxed);
            if work > 0 {
                continue;
            }
            if self.cfg.busy_poll {
                std::hint::spin_loop();
            } else if let Some(poll) = self.poll.as_mut() {
                // Edge-triggered: we only sleep after a round in which every
                // port was read until it had nothing more.
                if let Err(e) = poll.poll(&mut events, Some(Duration::from_secs(1))) {
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        tracing::error!(worker = self.id, "epoll failed: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                for ev in events.iter() {
                    if ev.token() == WAKER {
                        continue;
                    }
                    if let Some(p) = self.ports.iter_mut().find(|p| p.id as usize == ev.token().0) {
                        p.ready = true;
                    }
                }
            }
        }
        tracing::info!(worker = self.id, "worker stopped");
    }

    /// Apply pending commands; false when told to stop.
    fn commands(&mut self) -> bool {
        while let Ok(c) = self.cmds.try_recv() {
            match c {
                Command::Stop => return false,
                Command::AddPort(id, rx) => {
                    self.remove_port(id);
                    if let (Some(poll), Some(fd)) = (self.poll.as_ref(), rx.fd()) {
                        if let Err(e) = poll.registry().register(
                            &mut SourceFd(&fd),
                            Token(id as usize),
                            Interest::READABLE,
                        ) {
                            tracing::error!(
                                worker = self.id,
                                port = id,
                                "cannot register port: {e}"
                            );
                        }
                    }
                    let has_fd = rx.fd().is_some();
                    self.ports.push(RxEntry { id, rx, error_logged: false, ready: true, has_fd });
                }
                Command::RemovePort(id) => self.remove_port(id),
            }
        }
        true
    }

    fn remove_port(&mut self, id: PortId) {
        if let Some(pos) = self.ports.iter().position(|p| p.id == id) {
            let e = self.ports.swap_remove(pos);
            if let (Some(poll), Some(fd)) = (self.poll.as_ref(), e.rx.fd()) {
                let _ = poll.registry().deregister(&mut SourceFd(&fd));
            }
        }
    }

    fn poll_port(&mut self, i: usize) -> usize {
        let batch = self.cfg.batch;
        let busy = self.cfg.busy_poll;
        let entry = &mut self.ports[i];
        if !(entry.ready || busy || !entry.has_fd) {
            return 0;
        }
        let n = match entry.rx.recv(&mut self.s.frames[..batch]) {
            Ok(n) => {
                entry.error_logged = false;
                n
            }
            Err(e) => {
                entry.ready = false;
                if !entry.error_logged {
                    tracing::warn!(worker = self.id, port = entry.id, "receive failed: {e}");
                    entry.error_logged = true;
                }
                return 0;
            }
        };
        // Fewer than a full batch means the port said "nothing more" (edge-
        // triggered epoll will tell us when it has data again).
        if n < batch {
            entry.ready = false;
        }
        if n == 0 {
            return 0;
        }
        let in_port = entry.id;
        let tables = self.tables.load();
        let kept = self.hand_off_foreign(in_port, n);
        let mut frames = std::mem::take(&mut self.s.frames);
        self.run_batch(&tables, in_port, &mut frames[..kept], n);
        self.s.frames = frames;
        n
    }

    /// Move frames owned by other workers to their queues; the frames this
    /// worker owns are compacted to the front. Returns how many stay.
    fn hand_off_foreign(&mut self, in_port: PortId, n: usize) -> usize {
        if self.n <= 1 {
            return n;
        }
        let kind = match self.tables.load().port(in_port) {
            Some(p) => p.kind.clone(),
            None => return n,
        };
        let mut kept = 0;
        for i in 0..n {
            let owner = flow::owner_of(&self.s.frames[i], &kind, self.n);
            if owner == self.id {
                self.s.frames.swap(kept, i);
                kept += 1;
                continue;
            }
            let f = &self.s.frames[i];
            let copy = f.duplicate();
            let peer = &self.peers[owner];
            if peer.handoff.push((in_port, copy)).is_err() {
                self.stats.port.drops.add(DropReason::HandoffFull, 1);
            } else {
                self.stats.handoff_out.fetch_add(1, Relaxed);
                peer.wake();
            }
        }
        kept
    }

    /// Frames the pipeline translated for a flow another worker owns go to
    /// that worker's queue (they carry the original tuple in `meta.nat`).
    fn hand_off_translated(&mut self, in_port: PortId, frames: &[Frame]) {
        for (i, v) in self.s.verdicts.iter().enumerate() {
            let Verdict::Handoff(owner) = *v else { continue };
            let Some(peer) = self.peers.get(owner) else { continue };
            if peer.handoff.push((in_port, frames[i].duplicate())).is_err() {
                self.stats.port.drops.add(DropReason::HandoffFull, 1);
            } else {
                self.stats.handoff_out.fetch_add(1, Relaxed);
                peer.wake();
            }
        }
    }

    fn drain_handoff(&mut self) -> usize {
        if self.n <= 1 {
            return 0;
        }
        let mut total = 0;
        loop {
            self.s.handoff_in.clear();
            while self.s.handoff_in.len() < self.cfg.batch {
                match self.peers[self.id].handoff.pop() {
                    Some(x) => self.s.handoff_in.push(x),
                    None => break,
                }
            }
            if self.s.handoff_in.is_empty() {
                return total;
            }
            total += self.s.handoff_in.len();
            self.stats.handoff_in.fetch_add(self.s.handoff_in.len() as u64, Relaxed);
            let tables = self.tables.load();
            let mut items = std::mem::take(&mut self.s.handoff_in);
            // Frames from one port are processed together, in arrival order.
            items.sort_by_key(|(p, _)| *p);
            let mut run = std::mem::take(&mut self.s.handoff_run);
            let mut it = items.drain(..).peekable();
            while let Some((port, f)) = it.next() {
                run.push(f);
                if it.peek().map(|(p, _)| *p) != Some(port) {
                    let len = run.len();
                    self.run_batch(&tables, port, &mut run, len);
                    run.clear();
                }
            }
            drop(it);
            self.s.handoff_in = items;
            self.s.handoff_run = run;
        }
    }

    /// Pipeline and transmit for `frames`, received on `in_port`.
    /// `received` is what the port delivered (for rx counters).
    fn run_batch(
        &mut self,
        tables: &Tables,
        in_port: PortId,
        frames: &mut [Frame],
        received: usize,
    ) {
        let in_stats = tables.port(in_port).map(|p| p.stats.clone());
        let rx_bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
        self.s.flows.now_ms = self.clock.elapsed().as_millis() as u64;
        pipeline::process(
            tables,
            in_port,
            frames,
            &mut self.s.verdicts,
            &mut self.s.tally,
            &mut self.s.flows,
        );
        self.hand_off_translated(in_port, frames);
        let (tcp, other) = self.s.flows.ct.counts();
        self.stats.ct_entries.store((tcp + other) as u64, Relaxed);
        self.stats.ct_refused.store(self.s.flows.ct.refused, Relaxed);
        let (fwd, rev) = self.s.flows.nat.counts();
        self.stats.nat_entries.store((fwd + rev) as u64, Relaxed);
        self.stats.snat_ports.store(self.s.flows.nat.snat_ports() as u64, Relaxed);
        // One tally per batch, published to the port and the worker alike
        // (never carried over to the next batch, even if the port is gone).
        match &in_stats {
            Some(st) => {
                st.add_rx(received as u64, rx_bytes);
                self.s.tally.flush(&[&st.drops, &self.stats.port.drops]);
            }
            None => self.s.tally.flush(&[&self.stats.port.drops]),
        }
        self.stats.port.add_rx(received as u64, rx_bytes);
        self.stats.batches.fetch_add(1, Relaxed);
        self.transmit(tables, frames);
    }

    fn transmit(&mut self, tables: &Tables, frames: &mut [Frame]) {
        for g in &mut self.s.groups {
            g.1.clear();
        }
        for (i, v) in self.s.verdicts.iter().enumerate() {
            let (Verdict::Tx(p) | Verdict::Reply(p, _)) = *v else { continue };
            match self.s.groups.iter_mut().find(|g| g.0 == p) {
                Some(g) => g.1.push(i as u16),
                None => self.s.groups.push((p, vec![i as u16])),
            }
        }
        let mut groups = std::mem::take(&mut self.s.groups);
        for (port, sel) in groups.iter_mut() {
            if sel.is_empty() {
                continue;
            }
            let Some(entry) = tables.port(*port) else {
                self.stats.port.drops.add(DropReason::PortGone, sel.len() as u64);
                continue;
            };
            let caps = entry.tx.caps();
            // Segments of one flow bound for a port that takes GSO frames
            // (a pod's TAP) leave as one frame.
            if caps.tso4 && caps.csum && sel.len() > 1 {
                let merged = gro::coalesce(frames, sel);
                self.stats.gro_merged.fetch_add(merged as u64, Relaxed);
            }
            if sel.iter().any(|&i| gso::needs_help(&frames[usize::from(i)], caps)) {
                let mut keep = Vec::with_capacity(sel.len());
                for &i in sel.iter() {
                    match gso::prepare(&mut frames[usize::from(i)], caps, &mut self.s.segs) {
                        Ok(false) => keep.push(i),
                        Ok(true) => {}
                        Err(_) => entry.stats.drops.add(DropReason::SegmentFailed, 1),
                    }
                }
                *sel = keep;
            }
            let mut out = entry.tx.send_batch(frames, sel);
            if !self.s.segs.is_empty() {
                let idx: Vec<u16> = (0..self.s.segs.len() as u16).collect();
                out.merge(entry.tx.send_batch(&self.s.segs, &idx));
                self.s.segs.clear();
            }
            entry.stats.record_tx(&out);
            self.stats.port.record_tx(&out);
        }
        // Forget ports not seen this batch so the list stays short.
        groups.retain(|g| !g.1.is_empty());
        self.s.groups = groups;
    }
}
