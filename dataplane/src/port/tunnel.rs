//! The underlay as ports, through the node kernel's own sockets: VXLAN over
//! UDP sockets, IPIP over a raw IP socket (protocol 4). This mode needs no
//! XDP and leaves the uplink to the kernel: the host's own connectivity
//! never depends on the dataplane.
//!
//! Receive: one datagram per frame with `recvmmsg`; the frame holds what
//! the socket delivers (the VXLAN header and inner Ethernet frame; for IPIP
//! the whole outer IPv4 packet) and `meta.peer` the sender's address. The
//! pipeline checks and strips it (`pipeline::tunnel`).
//!
//! Transmit: frames arrive as complete inner Ethernet frames, already
//! segmented (the ports declare no offloads), with `meta.peer` naming the
//! remote node. VXLAN prepends its 8-byte header by scatter-gather, and
//! consecutive equal-sized segments of one flow to one peer leave in a
//! single `sendmsg` with UDP GSO (`UDP_SEGMENT`): one system call per TCP
//! super-frame rather than one per segment. A kernel socket has one source
//! port, so VXLAN sends from a small set of sockets bound to ports in
//! 49152-65535 and picks one by the inner flow's hash: flows spread over the
//! underlay's ECMP paths, and each flow keeps its path.
//!
//! The outer UDP checksum is set (the kernel computes it, offloaded where
//! the device can; UDP GSO refuses sockets without checksums). DF is clear,
//! as on the kernel VXLAN device by default: an oversized packet without DF
//! is fragmented outside; one with DF never gets here, the pipeline answers
//! it with "fragmentation needed".

use super::{RxPort, TxCaps, TxError, TxOutcome, TxPort};
use crate::frame::Frame;
use crate::gso::{Wire, SLOT};
use crate::pipeline::ETH_LEN;
use crate::wire::vxlan;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

/// Datagrams per `recvmmsg`/`sendmmsg` call, at most.
const MAX_BATCH: usize = 256;
/// Segments in one UDP GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 on
/// older kernels).
const MAX_GSO_SEGS: usize = 64;
/// Bytes of payload in one UDP GSO send (one IPv4 datagram's worth).
const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffers: enough for a few batches of 64 KiB super-frames.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn socket(kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the returned descriptor is checked and then
    // owned by the OwnedFd.
    let fd = cvt(unsafe {
        libc::socket(libc::AF_INET, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto)
    })?;
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` lives for the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
    s
}

fn bind(fd: &OwnedFd, a: SocketAddrV4) -> io::Result<()> {
    let s = sockaddr(a);
    // SAFETY: `s` is a valid sockaddr_in for the duration of the call.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&s as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Common options of every tunnel socket.
fn tune(fd: &OwnedFd) -> io::Result<()> {
    // Let the kernel fragment outside rather than refuse (DF clear).
    setsockopt(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT)?;
    // Bigger buffers; the forced variants need CAP_NET_ADMIN, fall back.
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, SOCKET_BUFFER).is_err() {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER)?;
    }
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SOCKET_BUFFER).is_err() {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER)?;
    }
    Ok(())
}

/// Scratch for `recvmmsg`: rebuilt before every call, so the raw pointers
/// in it never outlive the frames they point into.
struct RecvScratch {
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
}

// SAFETY: the raw pointers inside are only written and read within one
// `recv_batch` call on the owning thread; between calls they are dead
// values that are overwritten before use.
unsafe impl Send for RecvScratch {}

impl RecvScratch {
    fn new() -> RecvScratch {
        RecvScratch { msgs: Vec::new(), iovs: Vec::new(), addrs: Vec::new() }
    }

    /// Receive up to `frames.len()` datagrams; each frame gets one, with its
    /// sender in `meta.peer`. A truncated datagram is delivered empty (the
    /// pipeline drops it as malformed). Returns 0 when none is waiting.
    fn recv_batch(&mut self, fd: RawFd, frames: &mut [Frame]) -> io::Result<usize> {
        let n = frames.len().min(MAX_BATCH);
        if n == 0 {
            return Ok(0);
        }
        self.iovs.clear();
        for f in frames[..n].iter_mut() {
            let area = f.rx_area();
            self.iovs.push(libc::iovec { iov_base: area.as_mut_ptr().cast(), iov_len: area.len() });
        }
        // SAFETY: sockaddr_in is plain data; all-zero is valid.
        self.addrs.resize(n, unsafe { zeroed() });
        self.msgs.clear();
        for i in 0..n {
            // SAFETY: mmsghdr is plain data; all-zero is valid.
            let mut m: libc::mmsghdr = unsafe { zeroed() };
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut self.iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            self.msgs.push(m);
        }
        // SAFETY: every mmsghdr points at an iovec, an address buffer and a
        // frame area that stay alive and unaliased for the whole call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        let got = r as usize;
        for (i, f) in frames[..got].iter_mut().enumerate() {
            let m = &self.msgs[i];
            let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            f.set_len(if truncated { 0 } else { m.msg_len as usize });
            let a = &self.addrs[i];
            f.meta.peer = (a.sin_family == libc::AF_INET as libc::sa_family_t)
                .then(|| Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)));
        }
        Ok(got)
    }
}

/// How VXLAN is carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanConfig {
    /// This node's underlay address: the sockets bind to it.
    pub local_ip: Ipv4Addr,
    /// The UDP port VXLAN listens on and sends to (4789).
    pub port: u16,
    pub vni: u32,
    /// How many source ports (sockets) to spread flows over.
    pub source_ports: usize,
}

/// The VXLAN port's receive side. With UDP GRO the kernel hands over up
/// to 64 KiB of equal-sized datagrams of one underlay flow in one read; they
/// are split back into one frame each (in order; what does not fit in this
/// batch waits in `pending` for the next), and coalesced again per inner
/// TCP flow on the way to the pod (`gro`).
pub struct VxlanRx {
    sock: Arc<OwnedFd>,
    gro: bool,
    pending: std::collections::VecDeque<Frame>,
}

/// The VXLAN port's transmit side.
pub struct VxlanTx {
    senders: Vec<OwnedFd>,
    dst_port: u16,
    header: [u8; vxlan::HEADER_LEN],
    gso: bool,
    warned: AtomicBool,
}

/// Open the VXLAN sockets: the listener on `port`, and the senders.
pub fn vxlan_port(cfg: &VxlanConfig) -> io::Result<(VxlanRx, Arc<VxlanTx>)> {
    let mut header = [0u8; vxlan::HEADER_LEN];
    vxlan::emit_header(cfg.vni, &mut header).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("VNI {}: {e}", cfg.vni))
    })?;
    let rx = socket(libc::SOCK_DGRAM, libc::IPPROTO_UDP)?;
    tune(&rx)?;
    bind(&rx, SocketAddrV4::new(cfg.local_ip, cfg.port)).map_err(|e| {
        io::Error::new(e.kind(), format!("bind VXLAN socket {}:{}: {e}", cfg.local_ip, cfg.port))
    })?;
    let mut senders = Vec::new();
    let want = cfg.source_ports.clamp(1, 64);
    // Deterministic but node-specific ports, skipping any in use.
    let seed = u32::from(cfg.local_ip).wrapping_mul(2_654_435_761);
    let mut k = 0u32;
    while senders.len() < want && k < 4096 {
        let port = vxlan::source_port(seed.wrapping_add(k.wrapping_mul(40_503)));
        k += 1;
        let s = socket(libc::SOCK_DGRAM, libc::IPPROTO_UDP)?;
        tune(&s)?;
        match bind(&s, SocketAddrV4::new(cfg.local_ip, port)) {
            Ok(()) => senders.push(s),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
            Err(e) => return Err(e),
        }
    }
    if senders.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free UDP source port in 49152-65535 for VXLAN",
        ));
    }
    let gso = setsockopt(&senders[0], libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok();
    let gro = setsockopt(&rx, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
    let rx = Arc::new(rx);
    Ok((
        VxlanRx { sock: rx, gro, pending: Default::default() },
        Arc::new(VxlanTx {
            senders,
            dst_port: cfg.port,
            header,
            gso,
            warned: AtomicBool::new(false),
        }),
    ))
}

impl VxlanRx {
    /// Read one message into `f`; returns the GRO segment size when the
    /// message holds several datagrams, `None` when nothing was waiting.
    fn recv_one(&mut self, f: &mut Frame) -> io::Result<Option<usize>> {
        let area = f.rx_area();
        let mut iov = libc::iovec { iov_base: area.as_mut_ptr().cast(), iov_len: area.len() };
        // SAFETY: sockaddr_in is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_in = unsafe { zeroed() };
        let mut cbuf = GsoCmsg([0; 32]);
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len();
        // SAFETY: every pointer in `msg` refers to a live, writable buffer of
        // the stated length for the duration of the call.
        let r = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        let truncated = msg.msg_flags & libc::MSG_TRUNC != 0;
        f.set_len(if truncated { 0 } else { r as usize });
        f.meta.peer = Some(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)));
        let mut seg = r as usize;
        if self.gro && msg.msg_controllen > 0 {
            // SAFETY: the kernel filled `msg_controllen` bytes of cbuf with
            // well-formed cmsghdrs; CMSG_* walk only inside them.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                        if v > 0 {
                            seg = v as usize;
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
        }
        Ok(Some(seg))
    }
}

impl RxPort for VxlanRx {
    fn recv(&mut self, frames: &mut [Frame]) -> io::Result<usize> {
        let mut n = 0;
        // Datagrams left over from the last read come first (order matters).
        while n < frames.len() {
            let Some(p) = self.pending.pop_front() else { break };
            frames[n].set_data(p.data());
            frames[n].meta = p.meta;
            n += 1;
        }
        while n < frames.len() && self.pending.is_empty() {
            let seg = match self.recv_one(&mut frames[n]) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) if n > 0 => {
                    tracing::debug!("VXLAN receive error after {n} frames: {e}");
                    break;
                }
                Err(e) => return Err(e),
            };
            let (head, tail) = frames.split_at_mut(n + 1);
            let f = &mut head[n];
            n += 1;
            let total = f.len();
            if seg == 0 || total <= seg {
                continue;
            }
            // Split a coalesced read: datagram k is at k * seg.
            let mut off = seg;
            let mut k = 0;
            while off < total {
                let end = (off + seg).min(total);
                let part = &f.data()[off..end];
                match tail.get_mut(k) {
                    Some(t) => {
                        t.set_data(part);
                        t.meta = f.meta;
                        k += 1;
                    }
                    None => {
                        let mut p = Frame::with_capacity(part.len());
                        p.set_data(part);
                        p.meta = f.meta;
                        self.pending.push_back(p);
                    }
                }
                off = end;
            }
            f.resize(seg);
            n += k;
        }
        Ok(n)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}

/// Room for one `UDP_SEGMENT` control message.
#[repr(C, align(8))]
struct GsoCmsg([u8; 32]);

/// Packets gathered for one `sendmsg` (UDP GSO) or one `sendmmsg`.
struct Gather {
    slots: [[u8; SLOT]; MAX_GSO_SEGS],
    /// Per packet: header length and frame range, and the frame.
    parts: [(usize, usize, usize, usize); MAX_GSO_SEGS],
    n: usize,
}

impl Gather {
    fn new() -> Box<Gather> {
        Box::new(Gather {
            slots: [[0; SLOT]; MAX_GSO_SEGS],
            parts: [(0, 0, 0, 0); MAX_GSO_SEGS],
            n: 0,
        })
    }

    /// Length of packet `k` (headers and the frame's part).
    fn len(&self, k: usize) -> usize {
        let (h, a, b, _) = self.parts[k];
        h + b - a
    }
}

impl VxlanTx {
    /// Which sender a frame leaves from.
    fn sender(&self, f: &Frame) -> usize {
        f.meta.flow_hash as usize % self.senders.len()
    }

    /// Send the gathered packets (all to one peer from one sender, equal
    /// lengths but for a shorter last one) as one UDP GSO datagram, or one
    /// plain datagram when there is a single packet.
    fn flush(
        &self,
        frames: &[Frame],
        g: &mut Gather,
        peer: Ipv4Addr,
        sender: usize,
        out: &mut TxOutcome,
    ) {
        let n = std::mem::take(&mut g.n);
        if n == 0 {
            return;
        }
        let addr = sockaddr(SocketAddrV4::new(peer, self.dst_port));
        // SAFETY: iovec is plain data; all-zero is valid.
        let mut iovs: [libc::iovec; 3 * MAX_GSO_SEGS] = unsafe { zeroed() };
        let mut bytes = 0u64;
        for k in 0..n {
            let (h, a, b, fi) = g.parts[k];
            let d = &frames[fi].data()[a..b];
            iovs[3 * k] = libc::iovec {
                iov_base: self.header.as_ptr() as *mut libc::c_void,
                iov_len: self.header.len(),
            };
            iovs[3 * k + 1] = libc::iovec { iov_base: g.slots[k].as_mut_ptr().cast(), iov_len: h };
            iovs[3 * k + 2] =
                libc::iovec { iov_base: d.as_ptr() as *mut libc::c_void, iov_len: d.len() };
            bytes += (h + d.len()) as u64;
        }
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&addr as *const libc::sockaddr_in) as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = 3 * n;
        let mut cbuf = GsoCmsg([0; 32]);
        if n > 1 {
            let seg = (vxlan::HEADER_LEN + g.len(0)) as u16;
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
            // SAFETY: msg_control points at a buffer of msg_controllen bytes
            // (32 >= CMSG_SPACE(2)), aligned for cmsghdr.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
        let fd = self.senders[sender].as_raw_fd();
        // SAFETY: every pointer in `msg` refers to a live buffer of the
        // stated length (frames, headers, address, control) for the call.
        let r = unsafe { libc::sendmsg(fd, &msg, 0) };
        if r >= 0 {
            out.sent += n as u64;
            out.bytes += bytes;
            return;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOBUFS) => out.full += n as u64,
            _ => {
                out.failed += n as u64;
                warn_once(&self.warned, "VXLAN send", &e);
            }
        }
    }
}

/// Log the first send error of a port (the rest are counted, not logged,
/// so a broken underlay cannot flood the log).
fn warn_once(flag: &AtomicBool, what: &str, e: &io::Error) {
    if !flag.swap(true, Relaxed) {
        tracing::warn!("{what} failed: {e} (further failures are counted as tx_error)");
    }
}

impl TxPort for VxlanTx {
    /// Partial checksums and TCP/IPv4 GSO frames are finished here, by
    /// scatter-gather, without copying payloads.
    fn caps(&self) -> TxCaps {
        TxCaps::CSUM_TSO4
    }

    fn send(&self, frame: &Frame) -> Result<(), TxError> {
        self.send_batch(std::slice::from_ref(frame), &[0]).single()
    }

    /// Packets go out in order; consecutive ones to the same peer from the
    /// same sender and of the same length (the segments of a GSO frame, or
    /// a run of equal datagrams) leave in one UDP GSO send.
    fn send_batch(&self, frames: &[Frame], sel: &[u16]) -> TxOutcome {
        GATHER.with(|g| self.send_gathered(frames, sel, &mut g.borrow_mut()))
    }
}

thread_local! {
    /// Each worker's scratch for gathering packets (headers rewritten per
    /// segment), reused batch after batch.
    static GATHER: std::cell::RefCell<Box<Gather>> = std::cell::RefCell::new(Gather::new());
}

impl VxlanTx {
    fn send_gathered(&self, frames: &[Frame], sel: &[u16], g: &mut Gather) -> TxOutcome {
        let mut out = TxOutcome::default();
        g.n = 0;
        let mut key: Option<(Ipv4Addr, usize)> = None;
        let mut seg = 0;
        let mut total = 0;
        for &fi in sel {
            let fi = usize::from(fi);
            let f = &frames[fi];
            let (Some(peer), Some(wire)) = (f.meta.peer, Wire::of(f)) else {
                out.failed += 1;
                continue;
            };
            let k = (peer, self.sender(f));
            for i in 0..wire.count() {
                let (h, r) = wire.shape(f, i);
                let len = h + r.len();
                let fits = self.gso
                    && key == Some(k)
                    && g.n > 0
                    && g.n < MAX_GSO_SEGS
                    && len <= seg
                    && g.len(g.n - 1) == seg
                    && total + vxlan::HEADER_LEN + len <= MAX_GSO_BYTES;
                if !fits {
                    if let Some((p, s)) = key {
                        self.flush(frames, g, p, s, &mut out);
                    }
                    key = Some(k);
                    seg = len;
                    total = 0;
                }
                wire.write(f, i, &mut g.slots[g.n]);
                g.parts[g.n] = (h, r.start, r.end, fi);
                g.n += 1;
                total += vxlan::HEADER_LEN + len;
            }
        }
        if let Some((p, s)) = key {
            self.flush(frames, g, p, s, &mut out);
        }
        out
    }
}

/// IPIP: one raw socket for protocol 4, both directions.
pub struct IpipSocket {
    sock: OwnedFd,
    warned: AtomicBool,
}

/// The IPIP port's receive side.
pub struct IpipRx {
    sock: Arc<IpipSocket>,
    scratch: RecvScratch,
}

/// Open the raw IPIP socket, bound to this node's underlay address.
pub fn ipip_port(local_ip: Ipv4Addr) -> io::Result<(IpipRx, Arc<IpipSocket>)> {
    let s = socket(libc::SOCK_RAW, libc::IPPROTO_IPIP)?;
    tune(&s)?;
    bind(&s, SocketAddrV4::new(local_ip, 0))
        .map_err(|e| io::Error::new(e.kind(), format!("bind IPIP socket to {local_ip}: {e}")))?;
    let s = Arc::new(IpipSocket { sock: s, warned: AtomicBool::new(false) });
    Ok((IpipRx { sock: s.clone(), scratch: RecvScratch::new() }, s))
}

impl RxPort for IpipRx {
    fn recv(&mut self, frames: &mut [Frame]) -> io::Result<usize> {
        self.scratch.recv_batch(self.sock.sock.as_raw_fd(), frames)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.sock.sock.as_raw_fd())
    }
}

impl TxPort for IpipSocket {
    /// As for VXLAN, partial checksums and TCP/IPv4 GSO frames are finished
    /// here by scatter-gather (a raw socket has no GSO: one `sendmmsg`
    /// carries a batch of segments instead).
    fn caps(&self) -> TxCaps {
        TxCaps::CSUM_TSO4
    }

    fn send(&self, frame: &Frame) -> Result<(), TxError> {
        self.send_batch(std::slice::from_ref(frame), &[0]).single()
    }

    /// The inner IP packets (frames without their Ethernet header) go to
    /// `meta.peer`; the kernel adds the outer header.
    fn send_batch(&self, frames: &[Frame], sel: &[u16]) -> TxOutcome {
        GATHER.with(|g| self.send_gathered(frames, sel, &mut g.borrow_mut()))
    }
}

impl IpipSocket {
    fn send_gathered(&self, frames: &[Frame], sel: &[u16], g: &mut Gather) -> TxOutcome {
        let mut out = TxOutcome::default();
        g.n = 0;
        for &fi in sel {
            let fi = usize::from(fi);
            let f = &frames[fi];
            let (Some(_), Some(wire)) = (f.meta.peer, Wire::of(f)) else {
                out.failed += 1;
                continue;
            };
            if f.len() < ETH_LEN {
                out.failed += 1;
                continue;
            }
            for i in 0..wire.count() {
                if g.n == MAX_GSO_SEGS {
                    self.flush(frames, g, &mut out);
                }
                let (h, r) = wire.shape(f, i);
                wire.write(f, i, &mut g.slots[g.n]);
                g.parts[g.n] = (h, r.start, r.end, fi);
                g.n += 1;
            }
        }
        self.flush(frames, g, &mut out);
        out
    }

    fn flush(&self, frames: &[Frame], g: &mut Gather, out: &mut TxOutcome) {
        let n = std::mem::take(&mut g.n);
        if n == 0 {
            return;
        }
        // SAFETY: these are plain data; all-zero is valid.
        let mut iovs: [libc::iovec; 2 * MAX_GSO_SEGS] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut addrs: [libc::sockaddr_in; MAX_GSO_SEGS] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX_GSO_SEGS] = unsafe { zeroed() };
        for k in 0..n {
            let (h, a, b, fi) = g.parts[k];
            let f = &frames[fi];
            let peer = f.meta.peer.unwrap_or(Ipv4Addr::UNSPECIFIED);
            addrs[k] = sockaddr(SocketAddrV4::new(peer, 0));
            // The packet without its Ethernet header: from the rewritten
            // headers if there are any, else from the frame itself.
            let (hdr, rest) = if h >= ETH_LEN {
                (&g.slots[k][ETH_LEN..h], &f.data()[a..b])
            } else {
                (&g.slots[k][..0], &f.data()[(a + ETH_LEN).min(b)..b])
            };
            iovs[2 * k] =
                libc::iovec { iov_base: hdr.as_ptr() as *mut libc::c_void, iov_len: hdr.len() };
            iovs[2 * k + 1] =
                libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
            let m = &mut msgs[k].msg_hdr;
            m.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in).cast();
            m.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_iov = &mut iovs[2 * k];
            m.msg_iovlen = 2;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: the first `n` mmsghdrs point at live iovecs, addresses
            // and buffers for the duration of the call.
            let r = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                for m in &msgs[done..done + r as usize] {
                    out.bytes += u64::from(m.msg_len);
                }
                out.sent += r as u64;
                done += r as usize;
                continue;
            }
            // The first remaining message failed: count it and go on.
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::ENOBUFS) => out.full += 1,
                _ => {
                    out.failed += 1;
                    warn_once(&self.warned, "IPIP send", &e);
                }
            }
            done += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Round trips through real kernel sockets on loopback: what the
    //! transmit side puts on the wire must be exactly the software segments
    //! of the frame, each behind its tunnel header, and the receive side
    //! must hand them back one per frame, in order.
    use super::*;
    use crate::gso;
    use std::time::{Duration, Instant};

    use crate::gso::sample_tcp4_gso as tcp_gso;

    /// Receive until `want` frames arrived (or two seconds passed).
    fn drain(rx: &mut dyn RxPort, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut frames: Vec<Frame> = (0..16).map(|_| Frame::new()).collect();
        let end = Instant::now() + Duration::from_secs(2);
        while got.len() < want && Instant::now() < end {
            let n = rx.recv(&mut frames).unwrap();
            got.extend(frames[..n].iter().map(|f| f.data().to_vec()));
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        got
    }

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn vxlan_gso_frame_leaves_as_its_segments_and_comes_back_one_per_frame() {
        let lo = Ipv4Addr::LOCALHOST;
        let cfg = VxlanConfig { local_ip: lo, port: free_udp_port(), vni: 4096, source_ports: 2 };
        let (mut rx, tx) = vxlan_port(&cfg).unwrap();
        let mut f = tcp_gso(20_000, 1400);
        f.meta.peer = Some(lo);
        f.meta.flow_hash = 3;
        let mut want = Vec::new();
        gso::segment(&f, &mut want).unwrap();
        // A plain frame after it, to the same peer: its own datagram.
        let mut plain = Frame::from_bytes(&want[0].data()[..60]);
        plain.meta = f.meta;
        let frames = [f, plain];
        let out = tx.send_batch(&frames, &[0, 1]);
        assert_eq!(out.sent as usize, want.len() + 1, "{out:?}");
        assert_eq!((out.failed, out.full), (0, 0));
        let got = drain(&mut rx, want.len() + 1);
        assert_eq!(got.len(), want.len() + 1);
        for (g, w) in got.iter().zip(want.iter().map(|s| s.data()).chain([frames[1].data()])) {
            assert_eq!(vxlan::parse_header(g), Ok(4096));
            assert_eq!(&g[vxlan::HEADER_LEN..], w);
        }
        // Every inner segment is a valid TCP packet.
        for g in &got[..want.len()] {
            let p = etherparse::SlicedPacket::from_ethernet(&g[8..]).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else { panic!() };
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!() };
            let c = t.to_header().calc_checksum_ipv4(&ip.header().to_header(), t.payload());
            assert_eq!(c.unwrap(), t.checksum());
        }
    }

    #[test]
    fn a_frame_without_a_peer_is_a_counted_failure() {
        let lo = Ipv4Addr::LOCALHOST;
        let cfg = VxlanConfig { local_ip: lo, port: free_udp_port(), vni: 1, source_ports: 1 };
        let (_rx, tx) = vxlan_port(&cfg).unwrap();
        let f = tcp_gso(3000, 1400);
        let out = tx.send_batch(std::slice::from_ref(&f), &[0]);
        assert_eq!((out.sent, out.failed), (0, 1));
    }

    #[test]
    fn ipip_gso_frame_leaves_as_inner_ip_segments() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: raw sockets need root");
            return;
        }
        let lo = Ipv4Addr::LOCALHOST;
        let (mut rx, tx) = ipip_port(lo).unwrap();
        let mut f = tcp_gso(5000, 1400);
        f.meta.peer = Some(lo);
        let mut want = Vec::new();
        gso::segment(&f, &mut want).unwrap();
        let out = tx.send_batch(std::slice::from_ref(&f), &[0]);
        assert_eq!(out.sent as usize, want.len(), "{out:?}");
        // The raw socket may also see other IPIP traffic on loopback: keep
        // only ours (inner source 10.65.0.2, port 40000).
        let got: Vec<Vec<u8>> = drain(&mut rx, want.len())
            .into_iter()
            .filter(|p| p.len() > 44 && p[32..36] == [10, 65, 0, 2])
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            let hl = usize::from(g[0] & 0x0f) * 4;
            assert_eq!(g[9], 4, "outer protocol IPIP");
            assert_eq!(&g[hl..], &w.data()[ETH_LEN..]);
        }
    }
}
