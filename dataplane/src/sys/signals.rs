//! Waiting for SIGINT/SIGTERM on the main thread.

/// Block SIGINT and SIGTERM for this thread and every thread it starts
/// afterwards; call first in `main`-like functions.
pub fn block_termination() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before any other use;
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Wait until one of the blocked signals arrives.
pub fn wait(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: `set` is an initialised sigset whose signals are blocked.
    unsafe { libc::sigwait(set, &mut sig) };
}
