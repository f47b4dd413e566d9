//! AF_XDP sockets, through `xdpilone`: one socket per (interface, receive
//! queue), each with a UMEM of its own, split in two halves that different
//! threads may drive at once:
//!
//! * receive ([`XskRx`], owned by one worker): its buffers cycle fill ring
//!   → kernel → rx ring → a copy into the worker's frame → fill ring;
//! * transmit ([`XskTx`], shared behind a lock): free list → tx ring →
//!   kernel → completion ring → free list.
//!
//! Copy mode, always: veth has no zero-copy, and a copy into the worker's
//! own frames is needed anyway (the pipeline rewrites frames in place and
//! keeps them past the next receive). In copy mode the kernel only
//! transmits on `sendto`, which handles at most 32 descriptors per call and
//! asks for more calls with `EAGAIN`; [`XskTx::flush`] loops.
//!
//! Memory safety rests on buffer ownership: every buffer is, at any time,
//! either the kernel's (its offset in the fill, rx, tx or completion ring)
//! or exactly one half's (between rx and fill, or on the free list). Bytes
//! are only ever borrowed from a buffer the borrowing half owns.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use xdpilone::xdp::XdpDesc;
use xdpilone::{
    CompletionQueue, FillQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig,
};

/// Bytes per buffer: one page.
pub const FRAME_SIZE: u32 = 4096;
/// Bytes the kernel keeps in front of a received packet in its buffer
/// (`XDP_PACKET_HEADROOM`).
pub const RX_HEADROOM: u32 = 256;
/// The longest packet a receive buffer holds; longer ones are dropped by
/// the kernel (the XDP program passes them to the kernel instead).
pub const MAX_RX_PACKET: u32 = FRAME_SIZE - RX_HEADROOM;

const SOL_XDP: libc::c_int = 283;
const XDP_STATISTICS: libc::c_int = 7;
/// sendto calls per flush at most: 32 descriptors each, so a full ring of
/// 2048 needs 64, plus retries after reclaiming completions.
const MAX_KICKS: usize = 256;

fn xerr(what: &str) -> impl Fn(xdpilone::Errno) -> io::Error + '_ {
    move |e| {
        let raw = e.get_raw().abs();
        let os = io::Error::from_raw_os_error(raw);
        io::Error::new(os.kind(), format!("AF_XDP {what}: {os}"))
    }
}

/// An anonymous, page-aligned mapping holding a UMEM's buffers.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; which thread may touch which buffer
// of it is governed by buffer ownership (see the module notes), never by
// the thread that created it.
unsafe impl Send for Area {}
// SAFETY: as above; `Area` itself hands out no references.
unsafe impl Sync for Area {}

impl Area {
    fn map(len: usize) -> io::Result<Area> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected, and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Area { ptr, len })
    }

    fn as_slice_ptr(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    /// `len` bytes at `offset`, if inside the area.
    fn range_ok(&self, offset: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`; every
        // half holding an `Arc<Area>` is gone, so nothing points into it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Where and how big.
#[derive(Clone, Debug)]
pub struct XskConfig {
    pub ifindex: u32,
    pub queue: u32,
    /// Receive buffers (also the fill and rx ring sizes); a power of two.
    pub rx_frames: u32,
    /// Transmit buffers (also the tx and completion ring sizes); a power of two.
    pub tx_frames: u32,
}

/// The kernel's counters of one socket (`XDP_STATISTICS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Dropped for lack of a free buffer, or too long for one.
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Dropped because the rx ring was full.
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
}

/// Open a copy-mode AF_XDP socket on one queue; returns its two halves.
/// The socket's fd goes into the XDP program's XSKMAP
/// ([`XskRx::fd`]).
pub fn open(cfg: &XskConfig) -> io::Result<(XskRx, XskTx)> {
    let (rx_n, tx_n) = (cfg.rx_frames, cfg.tx_frames);
    if !rx_n.is_power_of_two() || !tx_n.is_power_of_two() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "ring sizes must be powers of two",
        ));
    }
    let area = Arc::new(Area::map((rx_n + tx_n) as usize * FRAME_SIZE as usize)?);
    let ucfg = UmemConfig {
        fill_size: rx_n,
        complete_size: tx_n,
        frame_size: FRAME_SIZE,
        headroom: 0,
        flags: 0,
    };
    // SAFETY: the area is a fresh page-aligned mapping of exactly this
    // length; both halves hold the `Arc<Area>`, so it stays mapped for as
    // long as the socket's rings can name buffers in it.
    let umem = unsafe { Umem::new(ucfg, area.as_slice_ptr()) }.map_err(xerr("UMEM"))?;
    let mut info = IfInfo::invalid();
    info.from_ifindex(cfg.ifindex).map_err(xerr("interface"))?;
    info.set_queue(cfg.queue);
    let sock = Socket::with_shared(&info, &umem).map_err(xerr("socket"))?;
    let device = umem.fq_cq(&sock).map_err(xerr("fill/completion rings"))?;
    let user = umem
        .rx_tx(
            &sock,
            &SocketConfig {
                rx_size: NonZeroU32::new(rx_n),
                tx_size: NonZeroU32::new(tx_n),
                bind_flags: SocketConfig::XDP_BIND_COPY | SocketConfig::XDP_BIND_NEED_WAKEUP,
            },
        )
        .map_err(xerr("rx/tx rings"))?;
    let ring_rx = user.map_rx().map_err(xerr("map rx ring"))?;
    let ring_tx = user.map_tx().map_err(xerr("map tx ring"))?;
    umem.bind(&user).map_err(|e| {
        let os = io::Error::from_raw_os_error(e.get_raw().abs());
        io::Error::new(os.kind(), format!("AF_XDP bind to queue {}: {os}", cfg.queue))
    })?;
    let fd = user.as_raw_fd();
    let (fill, comp) = device.into_parts();
    let mut rx = XskRx {
        area: area.clone(),
        fill,
        ring: ring_rx,
        fd,
        rx_end: u64::from(rx_n) * u64::from(FRAME_SIZE),
        refill: (0..u64::from(rx_n)).map(|i| i * u64::from(FRAME_SIZE)).collect(),
    };
    rx.refill();
    let tx = XskTx {
        area,
        ring: ring_tx,
        comp,
        fd,
        ring_size: tx_n,
        free: (u64::from(rx_n)..u64::from(rx_n + tx_n))
            .map(|i| i * u64::from(FRAME_SIZE))
            .collect(),
        pending: Vec::with_capacity(tx_n as usize),
    };
    Ok((rx, tx))
}

/// The receive half of a socket.
pub struct XskRx {
    area: Arc<Area>,
    fill: FillQueue,
    ring: RingRx,
    fd: RawFd,
    /// Receive buffers are the offsets below this.
    rx_end: u64,
    /// Buffers owned here, to give back to the kernel.
    refill: Vec<u64>,
}

impl XskRx {
    /// The socket's fd: for epoll, and for the XDP program's map.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Take up to `max` received packets, calling `each` with every one's
    /// bytes (empty for a descriptor outside the receive buffers, which a
    /// correct kernel never writes); the buffers go back to the kernel
    /// afterwards. Returns how many were taken.
    pub fn recv(&mut self, max: u32, mut each: impl FnMut(&[u8])) -> u32 {
        let mut n = 0;
        let mut r = self.ring.receive(max);
        while let Some(d) = r.read() {
            n += 1;
            let base = d.addr - d.addr % u64::from(FRAME_SIZE);
            let len = d.len as usize;
            let ok = d.addr + d.len as u64 <= base + u64::from(FRAME_SIZE) && base < self.rx_end;
            match self.area.range_ok(d.addr, len).filter(|_| ok) {
                Some(off) => {
                    // SAFETY: the kernel handed this buffer over with the
                    // descriptor and does not touch it again until it is
                    // back on the fill ring, which happens after `each`
                    // returns; the range was checked to lie inside the area.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(self.area.ptr.as_ptr().add(off), len) };
                    each(bytes);
                }
                None => each(&[]),
            }
            if base < self.rx_end {
                self.refill.push(base);
            }
        }
        r.release();
        drop(r);
        self.refill();
        n
    }

    fn refill(&mut self) {
        if self.refill.is_empty() {
            return;
        }
        let mut w = self.fill.fill(self.refill.len() as u32);
        let k = w.insert(self.refill.iter().copied()) as usize;
        w.commit();
        drop(w);
        self.refill.drain(..k);
        if self.fill.needs_wakeup() {
            self.fill.wake();
        }
    }

    /// The kernel's counters for this socket.
    pub fn stats(&self) -> io::Result<XskStats> {
        let mut s = XskStats::default();
        let mut len = std::mem::size_of::<XskStats>() as libc::socklen_t;
        // SAFETY: `s` is a writable buffer of `len` bytes for the call; the
        // kernel writes at most that many.
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                SOL_XDP,
                XDP_STATISTICS,
                (&mut s as *mut XskStats).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// Why a packet was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxFull {
    /// No free buffer or ring slot, even after flushing.
    Full,
}

/// The transmit half of a socket.
pub struct XskTx {
    area: Arc<Area>,
    ring: RingTx,
    comp: CompletionQueue,
    fd: RawFd,
    ring_size: u32,
    /// Buffers owned here and unused.
    free: Vec<u64>,
    /// Written packets not yet on the tx ring.
    pending: Vec<XdpDesc>,
}

impl XskTx {
    /// Queue one packet: `write` fills a buffer of [`FRAME_SIZE`] bytes and
    /// returns the packet's length, or `None` to give the buffer back
    /// unsent (`Ok(false)`). The packet leaves at the next [`flush`].
    ///
    /// [`flush`]: XskTx::flush
    pub fn push(&mut self, write: impl FnOnce(&mut [u8]) -> Option<usize>) -> Result<bool, TxFull> {
        let room = |t: &XskTx| t.ring.pending() as usize + t.pending.len() < t.ring_size as usize;
        if self.free.is_empty() || !room(self) {
            // Whatever is pending leaves now, and its buffers come back.
            let _ = self.flush();
            self.reclaim();
        }
        if !room(self) {
            return Err(TxFull::Full);
        }
        let Some(addr) = self.free.pop() else { return Err(TxFull::Full) };
        let Some(off) = self.area.range_ok(addr, FRAME_SIZE as usize) else {
            return Err(TxFull::Full);
        };
        // SAFETY: `addr` came off the free list, so neither a ring nor the
        // kernel holds it: this is the only reference to the buffer's bytes,
        // and the range was checked to lie inside the area.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(self.area.ptr.as_ptr().add(off), FRAME_SIZE as usize)
        };
        match write(buf) {
            Some(len) if len <= FRAME_SIZE as usize => {
                self.pending.push(XdpDesc { addr, len: len as u32, options: 0 });
                Ok(true)
            }
            _ => {
                self.free.push(addr);
                Ok(false)
            }
        }
    }

    /// Put the pending packets on the tx ring and have the kernel send
    /// them (copy mode sends only on `sendto`). An error means the device
    /// refused (down, gone); what was already on the ring stays there.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let mut w = self.ring.transmit(self.pending.len() as u32);
            let k = w.insert(self.pending.iter().copied()) as usize;
            w.commit();
            drop(w);
            self.pending.drain(..k);
        }
        let mut kicks = 0;
        while self.ring.pending() > 0 && kicks < MAX_KICKS {
            kicks += 1;
            // SAFETY: a zero-length sendto with no buffer and no address
            // only tells the socket to process its tx ring.
            let r = unsafe {
                libc::sendto(self.fd, std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0)
            };
            if r >= 0 {
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // More than a call's worth, no room in the completion ring,
                // or no memory for a moment: make room and go on.
                Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => self.reclaim(),
                // One packet dropped by the device: the rest goes on.
                Some(libc::EBUSY) => {}
                _ => return Err(e),
            }
        }
        self.reclaim();
        Ok(())
    }

    /// Take back the buffers of packets the kernel has sent.
    pub fn reclaim(&mut self) {
        let mut c = self.comp.complete(self.ring_size);
        while let Some(addr) = c.read() {
            let base = addr - addr % u64::from(FRAME_SIZE);
            self.free.push(base);
        }
        c.release();
    }
}
