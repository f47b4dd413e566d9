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

/// The VXLAN port's receive side.
pub struct VxlanRx {
    sock: Arc<OwnedFd>,
    scratch: RecvScratch,
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
    let rx = Arc::new(rx);
    Ok((
        VxlanRx { sock: rx, scratch: RecvScratch::new() },
        Arc::new(VxlanTx {
            senders,
            dst_port: cfg.port,
            header,
            gso,
            warned: AtomicBool::new(false),
        }),
    ))
}

impl RxPort for VxlanRx {
    fn recv(&mut self, frames: &mut [Frame]) -> io::Result<usize> {
        self.scratch.recv_batch(self.sock.as_raw_fd(), frames)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}

/// Room for one `UDP_SEGMENT` control message.
#[repr(C, align(8))]
struct GsoCmsg([u8; 32]);

impl VxlanTx {
    /// Which sender a frame leaves from.
    fn sender(&self, f: &Frame) -> usize {
        f.meta.flow_hash as usize % self.senders.len()
    }

    /// Send frames `sel[..]` (all with the same sender and peer, equal
    /// lengths but for a shorter last one) as one UDP GSO datagram, or one
    /// plain datagram when there is a single frame.
    fn send_group(&self, frames: &[Frame], sel: &[u16], out: &mut TxOutcome) {
        let first = &frames[usize::from(sel[0])];
        let Some(peer) = first.meta.peer else {
            out.failed += sel.len() as u64;
            return;
        };
        let addr = sockaddr(SocketAddrV4::new(peer, self.dst_port));
        let mut iovs: [libc::iovec; 2 * MAX_GSO_SEGS] =
            // SAFETY: iovec is plain data; all-zero is valid.
            unsafe { zeroed() };
        let mut bytes = 0u64;
        for (k, &i) in sel.iter().enumerate() {
            let d = frames[usize::from(i)].data();
            iovs[2 * k] = libc::iovec {
                iov_base: self.header.as_ptr() as *mut libc::c_void,
                iov_len: self.header.len(),
            };
            iovs[2 * k + 1] =
                libc::iovec { iov_base: d.as_ptr() as *mut libc::c_void, iov_len: d.len() };
            bytes += d.len() as u64;
        }
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&addr as *const libc::sockaddr_in) as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = 2 * sel.len();
        let mut cbuf = GsoCmsg([0; 32]);
        if sel.len() > 1 {
            let seg = (vxlan::HEADER_LEN + first.len()) as u16;
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
            // SAFETY: msg_control points at a buffer of msg_controllen bytes
            // (checked: 32 >= CMSG_SPACE(2)), aligned for cmsghdr.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
        let fd = self.senders[self.sender(first)].as_raw_fd();
        // SAFETY: every pointer in `msg` refers to a live buffer of the
        // stated length (frames, header, address, control) for the call.
        let r = unsafe { libc::sendmsg(fd, &msg, 0) };
        if r >= 0 {
            out.sent += sel.len() as u64;
            out.bytes += bytes;
            return;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOBUFS) => out.full += sel.len() as u64,
            _ => {
                out.failed += sel.len() as u64;
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
    fn caps(&self) -> TxCaps {
        TxCaps::NONE
    }

    fn send(&self, frame: &Frame) -> Result<(), TxError> {
        let frames = std::slice::from_ref(frame);
        let mut out = TxOutcome::default();
        self.send_group(frames, &[0], &mut out);
        match out {
            TxOutcome { sent: 1, .. } => Ok(()),
            TxOutcome { full: 1, .. } => Err(TxError::Full),
            _ => Err(TxError::Failed),
        }
    }

    fn send_batch(&self, frames: &[Frame], sel: &[u16]) -> TxOutcome {
        let mut out = TxOutcome::default();
        let mut start = 0;
        while start < sel.len() {
            let first = &frames[usize::from(sel[start])];
            let mut end = start + 1;
            if self.gso {
                let seg = first.len();
                let mut total = vxlan::HEADER_LEN + seg;
                while end < sel.len() && end - start < MAX_GSO_SEGS {
                    let f = &frames[usize::from(sel[end])];
                    total += vxlan::HEADER_LEN + f.len();
                    let same = f.meta.peer == first.meta.peer
                        && self.sender(f) == self.sender(first)
                        && f.len() <= seg
                        && total <= MAX_GSO_BYTES;
                    if !same {
                        break;
                    }
                    end += 1;
                    // Only the last segment may be shorter.
                    if f.len() < seg {
                        break;
                    }
                }
            }
            self.send_group(frames, &sel[start..end], &mut out);
            start = end;
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
    fn caps(&self) -> TxCaps {
        TxCaps::NONE
    }

    /// The inner IP packet (the frame without its Ethernet header) goes to
    /// `meta.peer`; the kernel adds the outer header.
    fn send(&self, frame: &Frame) -> Result<(), TxError> {
        let (Some(peer), Some(ip)) = (frame.meta.peer, frame.data().get(ETH_LEN..)) else {
            return Err(TxError::Failed);
        };
        let addr = sockaddr(SocketAddrV4::new(peer, 0));
        // SAFETY: `ip` and `addr` are live for the call; lengths are theirs.
        let r = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOBUFS) => Err(TxError::Full),
            _ => {
                warn_once(&self.warned, "IPIP send", &e);
                Err(TxError::Failed)
            }
        }
    }
}
