//! A small epoll set, readable when any of its fds is: several sockets
//! behind the one fd a port gives its worker (the AF_XDP uplink port of a
//! worker that serves several receive queues).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct EpollSet(OwnedFd);

impl EpollSet {
    pub fn new() -> io::Result<EpollSet> {
        // SAFETY: plain system call; the result is checked and then owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
        Ok(EpollSet(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watch `fd` for input, edge-triggered (the owner drains it).
    pub fn add(&self, fd: RawFd) -> io::Result<()> {
        let mut ev =
            libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: fd as u64 };
        // SAFETY: `ev` is a valid event for the duration of the call.
        let r = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consume the pending events without waiting, so the set becomes
    /// readable again on the next input (call once its fds are drained).
    pub fn clear(&self) {
        // SAFETY: epoll_event is plain data; all-zero is valid.
        let mut evs: [libc::epoll_event; 16] = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `evs` has room for the 16 events the call may write.
            let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 16, 0) };
            if n < 16 {
                return;
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
