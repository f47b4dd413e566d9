//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only,
//! so work in another namespace runs on a short-lived helper thread: the
//! caller's threads never change namespace. Sockets and TAP fds created
//! there stay bound to that namespace after the thread ends.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Run `f` on a thread that has entered the network namespace at `path`
/// (a bind mount such as `/var/run/netns/NAME` or `/proc/PID/ns/net`).
/// With `None`, `f` runs on a helper thread in the caller's namespace.
pub fn run_in<T: Send + 'static>(
    path: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = match path {
        Some(p) => Some(File::open(p).map_err(|e| {
            io::Error::new(e.kind(), format!("network namespace {}: {e}", p.display()))
        })?),
        None => None,
    };
    std::thread::Builder::new()
        .name("ocelot-netns".into())
        .spawn(move || {
            if let Some(ns) = ns {
                // SAFETY: `ns` is an open namespace fd; setns only changes
                // this helper thread, which exits when `f` returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("netns helper thread panicked"))?
}

/// True when `path` names a network namespace we can open.
pub fn exists(path: &Path) -> bool {
    File::open(path).is_ok()
}
