//! TAP devices with virtio-net headers and offloads.
//!
//! Written on `libc` rather than taken from a crate: `tun-tap` cannot set
//! `IFF_VNET_HDR`, `TUNSETOFFLOAD` or persistence, and the crates that can
//! (tun-rs) wrap device creation in their own configuration model, while we
//! need exactly four ioctls, plus re-attaching to a persistent device by
//! name from inside another network namespace (see [`super::netns`]). The
//! flag computation is a pure function, tested below.

use crate::frame::Frame;
use crate::wire::{VnetHdr, VNET_HDR_LEN};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Offloads we ask the kernel to hand us (`TUNSETOFFLOAD`): it may then give
/// us partial checksums and GSO frames up to 64 KiB instead of cutting them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso: bool,
    pub uso: bool,
}

impl Offloads {
    pub const ALL: Offloads = Offloads { csum: true, tso: true, uso: true };
}

/// The `TUNSETOFFLOAD` argument for `want`. TSO and USO need checksum
/// offload (the kernel refuses them alone), so they are dropped without it;
/// USO is left out when the kernel lacks it (before Linux 6.2).
pub fn offload_flags(want: Offloads, kernel_has_uso: bool) -> libc::c_uint {
    if !want.csum {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if want.tso {
        f |= libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    }
    if want.uso && kernel_has_uso {
        f |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
    }
    f
}

/// An open TAP queue. Reads and writes are one frame each, prefixed by a
/// virtio-net header; the fd is non-blocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// The offload flags the kernel accepted.
    pub offload_flags: libc::c_uint,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Check an interface name before handing it to the kernel.
pub fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME
        || name.contains(['/', ' ', '\0', ':'])
        || name == "."
        || name == ".."
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}: 1 to {MAX_IFNAME} characters, no '/', ':' or spaces"),
        ));
    }
    Ok(())
}

impl Tap {
    /// Open (creating if needed) the TAP named `name` in the calling
    /// thread's network namespace, with virtio-net headers and every offload
    /// the kernel has. With `persist`, the device outlives the fd.
    pub fn open(name: &str, persist: bool) -> io::Result<Tap> {
        check_ifname(name)?;
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: `path` is a valid NUL-terminated string; the returned fd is
        // checked before use and owned by `OwnedFd` below.
        let raw =
            unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads an `ifreq`-shaped struct of at least the
        // size of `IfReq`, which lives for the duration of the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe {
            libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int)
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut tap = Tap { fd, name: name.to_string(), offload_flags: 0 };
        tap.offload_flags = tap.set_offloads(Offloads::ALL)?;
        if persist {
            tap.set_persist(true)?;
        }
        Ok(tap)
    }

    /// Ask for `want`; falls back to no USO on kernels without it. Returns
    /// the flags set.
    pub fn set_offloads(&self, want: Offloads) -> io::Result<libc::c_uint> {
        for uso in [true, false] {
            let flags = offload_flags(want, uso);
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            if unsafe {
                libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong)
            } == 0
            {
                return Ok(flags);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) || !uso {
                return Err(e);
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Make the device outlive (or not) its last fd.
    pub fn set_persist(&self, on: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETPERSIST, libc::c_ulong::from(on)) }
            < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Read one frame into `frame`. `Ok(false)` when nothing is waiting.
    pub fn read_frame(&self, frame: &mut Frame) -> io::Result<bool> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        let area = frame.rx_area();
        let iov = [
            libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() },
            libc::iovec { iov_base: area.as_mut_ptr().cast(), iov_len: area.len() },
        ];
        // SAFETY: both iovecs point into buffers that are live and writable
        // for their stated lengths for the duration of the call.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(false) } else { Err(e) };
        }
        let n = n as usize;
        if n < VNET_HDR_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short read from TAP"));
        }
        frame.set_len(n - VNET_HDR_LEN);
        frame.vnet =
            VnetHdr::parse(&hdr).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(true)
    }

    /// Write one frame with its virtio-net header.
    pub fn write_frame(&self, frame: &Frame) -> io::Result<()> {
        let hdr = frame.vnet.to_bytes();
        let data = frame.data();
        let iov = [
            libc::iovec { iov_base: hdr.as_ptr() as *mut libc::c_void, iov_len: hdr.len() },
            libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() },
        ];
        // SAFETY: the iovecs point at live buffers of the stated lengths;
        // writev only reads through them.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_kernel_rules() {
        let all = offload_flags(Offloads::ALL, true);
        assert_eq!(
            all,
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_USO4
                | libc::TUN_F_USO6
        );
        assert_eq!(offload_flags(Offloads::ALL, false) & (libc::TUN_F_USO4 | libc::TUN_F_USO6), 0);
        // TSO without checksum offload is refused by the kernel: ask nothing.
        assert_eq!(offload_flags(Offloads { csum: false, tso: true, uso: true }, true), 0);
        assert_eq!(
            offload_flags(Offloads { csum: true, tso: false, uso: false }, true),
            libc::TUN_F_CSUM
        );
    }

    #[test]
    fn ifname_checks() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("ocelot0").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a-very-long-interface").is_err());
        assert!(check_ifname("a/b").is_err());
    }
}
