//! The one ethtool query the AF_XDP uplink needs: how many receive queues
//! an interface has (each gets its own socket). An ioctl on a socket of the
//! calling thread's network namespace, where the interface is.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETHTOOL_GCHANNELS: u32 = 0x3c;

#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// The receive queues in use on `ifname` (receive-only plus combined
/// channels); 1 when the driver does not say.
pub fn rx_queues(ifname: &str) -> io::Result<u32> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: plain system call; the result is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ch = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: (&mut ch as *mut EthtoolChannels).cast(),
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: `req` names the interface and points at `ch`, both alive and
    // writable for the call; SIOCETHTOOL with GCHANNELS writes only `ch`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(1),
            _ => Err(e),
        };
    }
    Ok((ch.rx_count + ch.combined_count).max(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_has_one_queue_or_says_nothing() {
        match super::rx_queues("lo") {
            Ok(n) => assert!(n >= 1),
            Err(e) => panic!("ethtool on lo: {e}"),
        }
        assert!(super::rx_queues("no-such-if0").is_err());
    }
}
