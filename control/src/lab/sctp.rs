//! SCTP for the lab's servers and probes, two ways.
//!
//! * Kernel SCTP: one-to-one sockets (`socket(AF_INET, SOCK_STREAM,
//!   IPPROTO_SCTP)`) through libc, as std has none; read and write them as
//!   a `File`. The kernel's `sctp` module must be loaded (`modprobe sctp`);
//!   without it `socket` fails with `EPROTONOSUPPORT` ([`unavailable`]).
//! * User space, when the kernel has no SCTP: a raw IPv4 socket for
//!   protocol 132 ([`RawSctp`]) carries the first half of the handshake,
//!   INIT then INIT ACK (whose State Cookie carries the pod's answer), then
//!   an ABORT: real SCTP packets with correct ports and CRC32c on the wire,
//!   so the dataplane sees (and polices) what a kernel stack would send
//!   first. [`Responder`] answers in the serving pod, [`probe_raw`] asks
//!   from the probing one; the packets and the decisions are in
//!   `sctp_wire.rs`, which does no I/O.
//!
//! Every raw socket for protocol 132 in a namespace receives a copy of
//! every SCTP packet there, so several can coexist (a responder and the
//! prober threads of the same pod, two servers): each takes only the
//! packets that are its own and ignores the rest, and none answers for a
//! port it does not serve.

use crate::lab::sctp_wire::{self, Fresh, Probe, Reply};
use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// True when the error means this kernel has no SCTP.
pub fn unavailable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPROTONOSUPPORT) | Some(libc::ESOCKTNOSUPPORT))
}

/// What to say when SCTP is missing.
pub const UNAVAILABLE: &str =
    "SCTP is not available in this kernel (socket: protocol not supported); try `modprobe sctp`";

/// What to say when the user-space fallback stands in for it.
pub const USER_SPACE: &str = "this kernel has no SCTP: probed with a user-space INIT / INIT ACK \
                              exchange over raw sockets (real SCTP packets, no association)";

/// True when this kernel has SCTP, asked once per process: a failing
/// `socket` makes the kernel try to load the module each time.
pub fn kernel_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| !matches!(socket(libc::AF_INET), Err(e) if unavailable(&e)))
}

fn socket(family: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects; the fd is checked, then owned.
    let fd =
        unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A `sockaddr_in`/`sockaddr_in6` for `addr`, and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn family(ip: IpAddr) -> i32 {
    if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// A listening SCTP socket on `0.0.0.0:port`.
pub fn listen(port: u16) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (an int, size given) during the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let (ss, len) = sockaddr(SocketAddr::from(([0, 0, 0, 0], port)));
    // SAFETY: `ss` holds a valid sockaddr of length `len` during the call.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(ss).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accept one association.
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: accept4 with null address pointers writes nothing to memory.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept4 and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Connect to `addr` within `timeout`; reads then time out after the same.
pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<File> {
    let fd = socket(family(addr.ip()))?;
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a socket we own; no memory effects.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    // SAFETY: as above.
    unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    let (ss, len) = sockaddr(addr);
    // SAFETY: `ss` holds a valid sockaddr of length `len` during the call.
    if unsafe { libc::connect(raw, std::ptr::addr_of!(ss).cast(), len) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd { fd: raw, events: libc::POLLOUT, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll reads and writes the one pollfd we pass.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut err: libc::c_int = 0;
        let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `elen` bytes into `err`.
        unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                std::ptr::addr_of_mut!(err).cast(),
                &mut elen,
            )
        };
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    // SAFETY: fcntl on a socket we own.
    unsafe { libc::fcntl(raw, libc::F_SETFL, flags) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads the timeval during the call.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(File::from(fd))
}

/// A raw IPv4 socket for IP protocol 132: reads every SCTP packet that
/// reaches this namespace, IPv4 header included.
#[derive(Debug)]
pub struct RawSctp {
    fd: OwnedFd,
}

impl RawSctp {
    /// Open one. With `header_included` (`IP_HDRINCL`) we write the IPv4
    /// header ourselves (the responder does, to answer from the address the
    /// INIT was sent to); without, the kernel adds it. Needs CAP_NET_RAW.
    pub fn open(header_included: bool) -> io::Result<RawSctp> {
        let proto = i32::from(sctp_wire::PROTOCOL);
        // SAFETY: socket has no memory effects; the fd is checked, then owned.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if header_included {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads `one` (an int, size given) during the call.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_HDRINCL,
                    std::ptr::addr_of!(one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(RawSctp { fd })
    }

    /// Send `bytes` (an SCTP packet, or a whole IPv4 packet with
    /// `header_included`) to `dst`.
    pub fn send(&self, dst: Ipv4Addr, bytes: &[u8]) -> io::Result<()> {
        let (ss, len) = sockaddr(SocketAddr::from((dst, 0)));
        // SAFETY: sendto reads `bytes` and the sockaddr `ss` of length `len`
        // during the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                std::ptr::addr_of!(ss).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One packet into `buf`, waiting at most `wait`; `None` if none came
    /// (or a signal interrupted the wait).
    pub fn recv(&self, buf: &mut [u8], wait: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: poll reads and writes the one pollfd we pass.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }
}

/// Random bits from the kernel (`getrandom`), for tags, TSNs and ports.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Never seen for 4 bytes once the pool is up; stay usable anyway.
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.subsec_nanos() ^ std::process::id().rotate_left(16);
    }
    u32::from_ne_bytes(b)
}

fn fresh() -> Fresh {
    Fresh { tag: random_u32(), tsn: random_u32() }
}

/// Largest packet a raw socket reads whole.
const RAW_BUF: usize = 65_536;

/// The user-space SCTP server of a pod: one raw socket for all its SCTP
/// ports, answering each INIT to one of them with an INIT ACK whose State
/// Cookie is the answer (see [`sctp_wire::respond`]).
#[derive(Debug)]
pub struct Responder {
    sock: RawSctp,
    ports: BTreeSet<u16>,
    answer: Vec<u8>,
}

impl Responder {
    pub fn open(ports: impl IntoIterator<Item = u16>, answer: &[u8]) -> io::Result<Responder> {
        Ok(Responder {
            sock: RawSctp::open(true)?,
            ports: ports.into_iter().collect(),
            answer: answer.to_vec(),
        })
    }

    /// Serve forever.
    pub fn run(self) {
        let mut buf = vec![0u8; RAW_BUF];
        loop {
            if let Err(e) = self.step(&mut buf, Duration::from_secs(60)) {
                eprintln!("sctp (user space): {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Answer what arrives within `wait`, at most one packet; true when an
    /// INIT ACK was sent.
    fn step(&self, buf: &mut [u8], wait: Duration) -> io::Result<bool> {
        let Some(n) = self.sock.recv(buf, wait)? else { return Ok(false) };
        let serves = |port| self.ports.contains(&port);
        let Some((to, reply)) = sctp_wire::respond(&buf[..n], serves, &self.answer, fresh()) else {
            return Ok(false);
        };
        self.sock.send(to, &reply)?;
        Ok(true)
    }
}

/// How a user-space probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawOutcome {
    /// An INIT ACK came back; its State Cookie.
    Answered(Vec<u8>),
    /// The peer answered with an ABORT.
    Aborted,
    /// No answer within the timeout; why (the last error, or the tries).
    NoAnswer(String),
}

/// Tries of INIT within the timeout, as the UDP probe does.
const TRIES: u32 = 3;

/// One user-space probe of `to` from the calling thread's namespace: an
/// INIT from a random port with a random tag, sent up to [`TRIES`] times
/// within `timeout`; the first INIT ACK (or ABORT) that answers it ends
/// the probe, and an INIT ACK is followed by an ABORT so the peer is left
/// with nothing half-open. The error is the raw socket's, when it cannot
/// be opened.
pub fn probe_raw(to: SocketAddrV4, timeout: Duration) -> io::Result<RawOutcome> {
    let deadline = Instant::now() + timeout;
    let sock = RawSctp::open(false)?;
    let probe = Probe {
        peer: to,
        // The dynamic range (RFC 6335), as a kernel would pick it.
        local_port: 49_152 + (random_u32() % 16_384) as u16,
        fresh: fresh(),
    };
    let init = probe.init();
    let mut buf = vec![0u8; RAW_BUF];
    let mut last = "no answer".to_string();
    for attempt in 1..=TRIES {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let slice_end = (now + (timeout / TRIES).max(Duration::from_millis(10))).min(deadline);
        if let Err(e) = sock.send(*to.ip(), &init) {
            last = format!("send: {e}");
            std::thread::sleep(slice_end.saturating_duration_since(Instant::now()));
            continue;
        }
        loop {
            let left = slice_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = format!("timed out ({attempt} tries)");
                break;
            }
            let n = match sock.recv(&mut buf, left) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) => {
                    last = format!("recv: {e}");
                    break;
                }
            };
            match probe.reply(&buf[..n]) {
                Some(Reply::Accepted { peer_tag, cookie }) => {
                    // Best effort: the responder keeps no state anyway.
                    let _ = sock.send(*to.ip(), &probe.abort(peer_tag));
                    return Ok(RawOutcome::Answered(cookie.to_vec()));
                }
                Some(Reply::Aborted) => return Ok(RawOutcome::Aborted),
                None => {}
            }
        }
    }
    Ok(RawOutcome::NoAnswer(last))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn loopback_roundtrip_or_clearly_unavailable() {
        let l = match listen(0) {
            Err(e) if unavailable(&e) => {
                eprintln!("{UNAVAILABLE}: skipping");
                return;
            }
            r => r.unwrap(),
        };
        // Port 0 bound an ephemeral port: find it.
        // SAFETY: sockaddr_storage is plain data.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `ss`.
        unsafe { libc::getsockname(l.as_raw_fd(), std::ptr::addr_of_mut!(ss).cast(), &mut len) };
        // SAFETY: the socket is AF_INET, so `ss` holds a sockaddr_in.
        let port =
            u16::from_be(unsafe { (*std::ptr::addr_of!(ss).cast::<libc::sockaddr_in>()).sin_port });
        let t = std::thread::spawn(move || {
            let mut c = accept(&l).unwrap();
            c.write_all(b"x/a\n").unwrap();
        });
        let mut c =
            connect(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2)).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert_eq!(s, "x/a\n");
        t.join().unwrap();
    }

    /// Run `f` on a thread of its own in a new network namespace with only
    /// `lo`, up. `None` (skip) where this process may not make one, or
    /// where the kernel has SCTP: its stack would answer INITs too.
    pub(crate) fn in_scratch_netns<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        if kernel_available() {
            eprintln!("this kernel has SCTP: user-space SCTP test skipped");
            return None;
        }
        std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) changes only the calling
            // thread's network namespace; no memory effects.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("unshare: {}: user-space SCTP test skipped", io::Error::last_os_error());
                return None;
            }
            // A child starts in its parent thread's namespace.
            let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
            if !matches!(up, Ok(s) if s.success()) {
                eprintln!("`ip link set lo up` failed ({up:?}): user-space SCTP test skipped");
                return None;
            }
            Some(f())
        })
        .join()
        .expect("scratch namespace thread")
    }

    /// A responder on a thread until `stop`.
    pub(crate) fn responder(
        ports: &[u16],
        answer: &str,
        stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let r = Responder::open(ports.iter().copied(), answer.as_bytes()).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; RAW_BUF];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                r.step(&mut buf, Duration::from_millis(20)).unwrap();
            }
        })
    }

    #[test]
    fn user_space_exchanges_on_loopback() {
        in_scratch_netns(|| {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            // Two responders: three raw sockets for protocol 132 in one
            // namespace with the probers', each seeing every packet.
            let a = responder(&[80, 81], "x/a\n", &stop);
            let b = responder(&[82], "x/b\n", &stop);
            let lo = Ipv4Addr::LOCALHOST;
            // A sniffer sees the whole of one exchange.
            let sniff = RawSctp::open(false).unwrap();
            let t = Duration::from_millis(900);
            assert_eq!(
                probe_raw(SocketAddrV4::new(lo, 80), t).unwrap(),
                RawOutcome::Answered(b"x/a\n".to_vec())
            );
            let mut buf = vec![0u8; RAW_BUF];
            let mut packets = Vec::new();
            while let Some(n) = sniff.recv(&mut buf, Duration::from_millis(200)).unwrap() {
                packets.push(buf[..n].to_vec());
            }
            let seen: Vec<_> = packets
                .iter()
                .map(|b| {
                    let d = sctp_wire::Datagram::parse(b).expect("only good packets on the wire");
                    (d.sctp.src_port, d.sctp.dst_port, d.sctp.verification_tag, d.sctp.chunk)
                })
                .collect();
            use sctp_wire::ChunkRepr::{Abort, Init, InitAck};
            let [(p1, 80, 0, Init(i)), (80, p2, t2, InitAck { init: ia, .. }), (p3, 80, t3, Abort { reflected: false })] =
                seen[..]
            else {
                panic!("{seen:?}")
            };
            assert_eq!((p1, p2, p3), (p1, p1, p1));
            assert_eq!(t2, i.initiate_tag, "the INIT ACK carries our tag");
            assert_eq!(t3, ia.initiate_tag, "the ABORT carries the peer's");

            // Many probes at once, each with a socket of its own.
            let probes: Vec<_> = (0..16u16)
                .map(|i| {
                    let port = 80 + i % 4;
                    let t = if port == 83 { Duration::from_millis(300) } else { t };
                    (port, std::thread::spawn(move || probe_raw(SocketAddrV4::new(lo, port), t)))
                })
                .collect();
            for (port, h) in probes {
                let got = h.join().unwrap().unwrap();
                let want = match port {
                    80 | 81 => RawOutcome::Answered(b"x/a\n".to_vec()),
                    82 => RawOutcome::Answered(b"x/b\n".to_vec()),
                    _ => RawOutcome::NoAnswer("timed out (3 tries)".into()),
                };
                assert_eq!(got, want, "port {port}");
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            a.join().unwrap();
            b.join().unwrap();
        });
    }
}
