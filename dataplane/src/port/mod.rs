//! Ports: where frames enter and leave the dataplane.
//!
//! A port is split in two: its receive side ([`RxPort`]) is owned by exactly
//! one worker, which polls it; its transmit side ([`TxPort`]) is shared, so
//! any worker can send into any port (a TAP write is one atomic syscall).

pub mod memory;
pub mod tap;
pub mod tunnel;
pub mod xdp;

use crate::frame::Frame;
use std::io;
use std::os::fd::RawFd;

/// Index of a port in the dataplane's tables.
pub type PortId = u32;

/// What a port's transmit side accepts without software help.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TxCaps {
    /// Frames may carry a partial checksum (`NEEDS_CSUM`).
    pub csum: bool,
    /// TCP/IPv4 GSO frames.
    pub tso4: bool,
    /// TCP/IPv6 GSO frames.
    pub tso6: bool,
    /// UDP GSO frames (USO).
    pub uso: bool,
}

impl TxCaps {
    /// Everything: a TAP whose peer is the kernel takes any offloaded frame.
    pub const ALL: TxCaps = TxCaps { csum: true, tso4: true, tso6: true, uso: true };
    /// Nothing: every frame must be complete and at most one MTU.
    pub const NONE: TxCaps = TxCaps { csum: false, tso4: false, tso6: false, uso: false };
    /// What the tunnel ports finish themselves, by scatter-gather
    /// (`gso::Wire`): partial checksums and TCP/IPv4 GSO frames.
    pub const CSUM_TSO4: TxCaps = TxCaps { csum: true, tso4: true, tso6: false, uso: false };
}

/// Why a transmit failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxError {
    /// The port's queue is full (counted as `tx_full`).
    Full,
    /// The device refused the frame or is gone (counted as `tx_error`).
    Failed,
}

/// The receive side of a port, polled by its owning worker.
pub trait RxPort: Send {
    /// Receive up to `frames.len()` frames into the given buffers and return
    /// how many were filled. Returns 0 when nothing is waiting.
    fn recv(&mut self, frames: &mut [Frame]) -> io::Result<usize>;

    /// The fd to register with epoll, if the port has one.
    fn fd(&self) -> Option<RawFd>;
}

/// The transmit side of a port, shared by all workers.
pub trait TxPort: Send + Sync {
    fn caps(&self) -> TxCaps;

    /// Send one frame as it is (the worker already applied software offloads
    /// the port lacks).
    fn send(&self, frame: &Frame) -> Result<(), TxError>;

    /// Send the frames of `frames` picked by `sel`, in order. Returns the
    /// outcome of each attempt summed up.
    fn send_batch(&self, frames: &[Frame], sel: &[u16]) -> TxOutcome {
        let mut out = TxOutcome::default();
        for &i in sel {
            let f = &frames[usize::from(i)];
            match self.send(f) {
                Ok(()) => {
                    out.sent += 1;
                    out.bytes += f.len() as u64;
                }
                Err(TxError::Full) => out.full += 1,
                Err(TxError::Failed) => out.failed += 1,
            }
        }
        out
    }
}

/// What happened to a batch handed to [`TxPort::send_batch`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxOutcome {
    pub sent: u64,
    pub bytes: u64,
    pub full: u64,
    pub failed: u64,
}

impl TxOutcome {
    /// Add another batch's outcome.
    pub fn merge(&mut self, o: TxOutcome) {
        self.sent += o.sent;
        self.bytes += o.bytes;
        self.full += o.full;
        self.failed += o.failed;
    }

    /// The outcome of a one-frame batch, as [`TxPort::send`] reports it.
    pub fn single(self) -> Result<(), TxError> {
        match self {
            TxOutcome { full: 0, failed: 0, .. } => Ok(()),
            TxOutcome { failed: 0, .. } => Err(TxError::Full),
            _ => Err(TxError::Failed),
        }
    }
}
