//! A frame buffer: one Ethernet frame plus its virtio-net offload state.
//!
//! Buffers are allocated once per worker with room for a 64 KiB GSO frame
//! and headroom for encapsulation, then reused batch after batch: the packet
//! path allocates nothing in the steady state.

use crate::wire::VnetHdr;

/// Bytes kept free before the frame for headers pushed later (encapsulation).
pub const HEADROOM: usize = 128;
/// Largest frame a port may hand us: a 64 KiB GSO segment plus its L2 header.
pub const MAX_FRAME: usize = 65536 + 128;

/// What a frame carries besides its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// The underlay peer: the outer source of a frame received from a
    /// tunnel, the outer destination of one sent into a tunnel.
    pub peer: Option<std::net::Ipv4Addr>,
    /// A hash of the inner flow (for the outer UDP source port).
    pub flow_hash: u32,
    /// The encapsulation of a tunnel frame: set by the pipeline when it
    /// routes a frame into a tunnel, and by the AF_XDP uplink port on
    /// receive. A port that carries one encapsulation only ignores it.
    pub encap: Option<crate::tables::Encap>,
    /// A translated frame handed to the worker that owns its translated
    /// flow: the tuple the client sent (see `pipeline::nat`).
    pub nat: Option<crate::nat::Tuple>,
}

/// One frame and its offload metadata.
pub struct Frame {
    pub vnet: VnetHdr,
    pub meta: Meta,
    buf: Box<[u8]>,
    start: usize,
    len: usize,
}

impl Frame {
    /// A buffer able to hold any frame a port hands us.
    pub fn new() -> Frame {
        Frame::with_capacity(MAX_FRAME)
    }

    /// A smaller buffer (tests, segments produced by software GSO).
    pub fn with_capacity(cap: usize) -> Frame {
        Frame {
            vnet: VnetHdr::default(),
            meta: Meta::default(),
            buf: vec![0u8; HEADROOM + cap].into_boxed_slice(),
            start: HEADROOM,
            len: 0,
        }
    }

    /// A frame holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Frame {
        let mut f = Frame::with_capacity(bytes.len().max(128));
        f.set_data(bytes);
        f
    }

    /// The frame's bytes, from the Ethernet header on.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole writable area after the headroom, for a port to receive into.
    /// Call [`Frame::set_len`] with the number of bytes received.
    pub fn rx_area(&mut self) -> &mut [u8] {
        self.start = HEADROOM;
        self.len = 0;
        self.vnet = VnetHdr::default();
        self.meta = Meta::default();
        &mut self.buf[HEADROOM..]
    }

    /// Set the length after receiving into [`Frame::rx_area`].
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.buf.len() - self.start);
    }

    /// Grow or shrink the frame at its end. Returns false (and changes
    /// nothing) when the buffer cannot hold `len` bytes.
    pub fn resize(&mut self, len: usize) -> bool {
        if self.start + len > self.buf.len() {
            return false;
        }
        if len > self.len {
            self.buf[self.start + self.len..self.start + len].fill(0);
        }
        self.len = len;
        true
    }

    /// Replace the content with `bytes` (truncated to the capacity).
    pub fn set_data(&mut self, bytes: &[u8]) {
        self.start = HEADROOM;
        let n = bytes.len().min(self.buf.len() - HEADROOM);
        self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&bytes[..n]);
        self.len = n;
        self.vnet = VnetHdr::default();
        self.meta = Meta::default();
    }

    /// Remove `n` bytes from the front (a header being stripped). Returns
    /// false, changing nothing, when the frame is shorter than `n`.
    pub fn pull(&mut self, n: usize) -> bool {
        if n > self.len {
            return false;
        }
        self.start += n;
        self.len -= n;
        true
    }

    /// Add `n` bytes at the front, taken from the headroom, and return them
    /// for the caller to fill. `None` when the headroom is too small.
    pub fn push(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.start {
            return None;
        }
        self.start -= n;
        self.len += n;
        Some(&mut self.buf[self.start..self.start + n])
    }

    /// A copy of the frame with its offload state and metadata.
    pub fn duplicate(&self) -> Frame {
        let mut c = Frame::from_bytes(self.data());
        c.vnet = self.vnet;
        c.meta = self.meta;
        c
    }

    /// Room for the frame to grow into after its end.
    pub fn tailroom(&self) -> usize {
        self.buf.len() - self.start - self.len
    }
}

impl Default for Frame {
    fn default() -> Self {
        Frame::new()
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame{{len={} {:?}}}", self.len, self.vnet)
    }
}
