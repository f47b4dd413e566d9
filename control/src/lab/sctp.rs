//! One-to-one SCTP sockets (`socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)`)
//! through libc: std has none. Read and write them as a `File`.
//!
//! The kernel's `sctp` module must be loaded (`modprobe sctp`); without it
//! `socket` fails with `EPROTONOSUPPORT`, reported by [`unavailable`].

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// True when the error means this kernel has no SCTP.
pub fn unavailable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPROTONOSUPPORT) | Some(libc::ESOCKTNOSUPPORT))
}

/// What to say when SCTP is missing.
pub const UNAVAILABLE: &str =
    "SCTP is not available in this kernel (socket: protocol not supported); try `modprobe sctp`";

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

#[cfg(test)]
mod tests {
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
}
