//! In-memory ports for tests and benchmarks: frames are injected and
//! collected through a shared handle, no fd involved.

use super::{RxPort, TxCaps, TxError, TxPort};
use crate::frame::Frame;
use crate::wire::VnetHdr;
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

/// A frame as it left a memory port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentFrame {
    pub vnet: VnetHdr,
    pub data: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    rx: Mutex<VecDeque<(VnetHdr, Vec<u8>)>>,
    tx: Mutex<Vec<SentFrame>>,
    capacity: usize,
}

/// Test-side handle: inject frames to be received, take frames sent.
#[derive(Clone)]
pub struct MemHandle(Arc<Shared>);

impl MemHandle {
    pub fn inject(&self, data: &[u8]) {
        self.inject_with(VnetHdr::default(), data);
    }

    pub fn inject_with(&self, vnet: VnetHdr, data: &[u8]) {
        self.0.rx.lock().unwrap_or_else(|e| e.into_inner()).push_back((vnet, data.to_vec()));
    }

    pub fn take_sent(&self) -> Vec<SentFrame> {
        std::mem::take(&mut *self.0.tx.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Receive side of a memory port.
pub struct MemRx(Arc<Shared>);

/// Transmit side of a memory port.
pub struct MemTx {
    shared: Arc<Shared>,
    caps: TxCaps,
}

/// A memory port that accepts the given offloads and holds at most
/// `capacity` unread sent frames (more are refused as `TxError::Full`).
pub fn mem_port(caps: TxCaps, capacity: usize) -> (MemRx, Arc<MemTx>, MemHandle) {
    let shared = Arc::new(Shared { capacity, ..Default::default() });
    (MemRx(shared.clone()), Arc::new(MemTx { shared: shared.clone(), caps }), MemHandle(shared))
}

impl RxPort for MemRx {
    fn recv(&mut self, frames: &mut [Frame]) -> io::Result<usize> {
        let mut q = self.0.rx.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < frames.len() {
            let Some((vnet, data)) = q.pop_front() else { break };
            let f = &mut frames[n];
            let area = f.rx_area();
            let len = data.len().min(area.len());
            area[..len].copy_from_slice(&data[..len]);
            f.set_len(len);
            f.vnet = vnet;
            n += 1;
        }
        Ok(n)
    }

    fn fd(&self) -> Option<RawFd> {
        None
    }
}

impl TxPort for MemTx {
    fn caps(&self) -> TxCaps {
        self.caps
    }

    fn send(&self, frame: &Frame) -> Result<(), TxError> {
        let mut q = self.shared.tx.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.shared.capacity {
            return Err(TxError::Full);
        }
        q.push(SentFrame { vnet: frame.vnet, data: frame.data().to_vec() });
        Ok(())
    }
}

/// A transmit port that only counts (for benchmarks of the pipeline).
#[derive(Default)]
pub struct SinkTx {
    pub sent: std::sync::atomic::AtomicU64,
}

impl TxPort for SinkTx {
    fn caps(&self) -> TxCaps {
        TxCaps::ALL
    }

    fn send(&self, _frame: &Frame) -> Result<(), TxError> {
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn send_batch(&self, frames: &[Frame], sel: &[u16]) -> super::TxOutcome {
        let bytes = sel.iter().map(|i| frames[usize::from(*i)].len() as u64).sum();
        self.sent.fetch_add(sel.len() as u64, std::sync::atomic::Ordering::Relaxed);
        super::TxOutcome { sent: sel.len() as u64, bytes, ..Default::default() }
    }
}
