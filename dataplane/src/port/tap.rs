//! A TAP device as a port: the pod's `eth0` (or the host interface). The
//! kernel on the far side takes any offloaded frame, so the transmit side
//! passes partial checksums and GSO frames through untouched.

use super::{RxPort, TxCaps, TxError, TxPort};
use crate::frame::Frame;
use crate::sys::tun::Tap;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

/// Receive side: owned by one worker.
pub struct TapRx(pub Arc<Tap>);

/// Transmit side: shared by all workers.
pub struct TapTx(pub Arc<Tap>);

/// Split an open TAP into its two sides.
pub fn tap_port(tap: Tap) -> (TapRx, Arc<TapTx>) {
    let t = Arc::new(tap);
    (TapRx(t.clone()), Arc::new(TapTx(t)))
}

impl RxPort for TapRx {
    fn recv(&mut self, frames: &mut [Frame]) -> io::Result<usize> {
        let mut n = 0;
        while n < frames.len() {
            match self.0.read_frame(&mut frames[n]) {
                Ok(true) => n += 1,
                Ok(false) => break,
                // A frame with an unparseable header still counts as received,
                // and is dropped by the pipeline as malformed.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    frames[n].set_len(0);
                    n += 1;
                }
                Err(e) if n > 0 => {
                    tracing::debug!(port = self.0.name(), "read error after {n} frames: {e}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.0.fd())
    }
}

impl TxPort for TapTx {
    fn caps(&self) -> TxCaps {
        TxCaps::ALL
    }

    fn send(&self, frame: &Frame) -> Result<(), TxError> {
        match self.0.write_frame(frame) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS)) => {
                Err(TxError::Full)
            }
            Err(_) => Err(TxError::Failed),
        }
    }
}
