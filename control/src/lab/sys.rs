//! The lab's contact with the system: named network namespaces and links
//! (through iproute2's `ip`, as a test harness would), processes started
//! inside a namespace, and finding and stopping them again.
//!
//! Nothing here touches the host's own interfaces: links are created with
//! `ip -n <lab namespace>`, their peers straight into another lab
//! namespace.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Run `ip ARGS...`; its stderr becomes the error.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns add NAME`, then bring `lo` up in it.
pub fn netns_add(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// `ip netns del NAME`; a namespace that is already gone is fine.
pub fn netns_del(name: &str) -> anyhow::Result<()> {
    if !crate::lab::names::netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(|_| ())
}

/// Delete a link in a lab namespace; gone already (or the namespace gone)
/// is fine.
pub fn link_del(netns: &str, name: &str) -> anyhow::Result<()> {
    if !crate::lab::names::netns_path(netns).exists() {
        return Ok(());
    }
    match ip(&["-n", netns, "link", "del", name]) {
        Ok(_) => Ok(()),
        Err(e) if format!("{e}").contains("Cannot find device") => Ok(()),
        Err(e) => Err(e),
    }
}

/// True when the link exists in a lab namespace.
pub fn link_exists(netns: &str, name: &str) -> anyhow::Result<bool> {
    match ip(&["-n", netns, "link", "show", "dev", name]) {
        Ok(_) => Ok(true),
        Err(e) if format!("{e}").contains("does not exist") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Set a sysctl under `/proc/sys/` inside a namespace: `/proc/sys/net` shows
/// the namespace of the thread that opens it, so a helper thread enters it.
pub fn sysctl_in(netns: &Path, key: &str, value: &str) -> anyhow::Result<()> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    let v = value.to_string();
    ocelot_dataplane::sys::netns::run_in(Some(netns), move || std::fs::write(&file, v))
        .with_context(|| format!("sysctl {key}={value} in {}", netns.display()))
}

/// Enter the network namespace `fd` on the calling thread.
pub fn setns_net(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns only changes the calling thread's namespace; `fd` is an
    // open namespace file for the duration of the call.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make `cmd` start inside the network namespace at `netns` and, with
/// `session`, in a session of its own (a daemon: it does not get the
/// terminal's signals, and its process group can be signalled whole). The
/// returned file must stay open until the command is spawned.
pub fn enter_on_spawn(cmd: &mut Command, netns: &Path, session: bool) -> anyhow::Result<File> {
    let ns = File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setns, setsid); `fd` stays open in the
    // child until exec because `ns` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(ns)
}

/// A process the lab started, named so that a recycled pid is never
/// mistaken for it: the pid and its start time (in clock ticks since boot,
/// `/proc/<pid>/stat` field 22).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
    /// What it is, for messages (`dataplane node-1`).
    pub role: String,
}

/// Field 22 of `/proc/<pid>/stat`, and whether the process is a zombie.
fn stat(pid: i32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is index 19.
    let zombie = fields.first().is_some_and(|s| *s == "Z" || *s == "X");
    Some((fields.get(19)?.parse().ok()?, zombie))
}

impl ProcRef {
    /// Describe a child just spawned.
    pub fn of(pid: u32, role: impl Into<String>) -> ProcRef {
        let pid = pid as i32;
        ProcRef { pid, start_time: stat(pid).map_or(0, |s| s.0), role: role.into() }
    }

    /// True while the process runs (a zombie does not count).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((t, false)) if t == self.start_time)
    }

    /// SIGTERM to its process group, then SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        if !self.alive() {
            return;
        }
        signal_group(self.pid, libc::SIGTERM);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// Signal the process group led by `pid` (our daemons lead their own), and
/// `pid` itself in case it does not lead one.
fn signal_group(pid: i32, sig: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill has no memory effects; pid > 1 so this never targets
    // init or every process.
    unsafe {
        // SAFETY (getpgid): reads a process attribute only.
        if libc::getpgid(pid) == pid {
            libc::kill(-pid, sig);
        }
        libc::kill(pid, sig);
    }
}

/// Pids of the processes whose network namespace is the one at `netns`
/// (what `ip netns pids` prints).
pub fn pids_in_netns(netns: &Path) -> Vec<i32> {
    let Ok(md) = std::fs::metadata(netns) else { return Vec::new() };
    let (dev, ino) = (md.dev(), md.ino());
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        })
        .collect()
}

/// Stop every process left in the namespace: SIGTERM, then SIGKILL.
pub fn kill_all_in_netns(netns: &Path, grace: Duration) -> usize {
    let pids = pids_in_netns(netns);
    for p in &pids {
        signal_group(*p, libc::SIGTERM);
    }
    let end = Instant::now() + grace;
    while Instant::now() < end && !pids_in_netns(netns).is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pids_in_netns(netns) {
        signal_group(p, libc::SIGKILL);
    }
    pids.len()
}

/// Start a daemon inside a namespace, in its own session, stdout and stderr
/// appended to `log`.
pub fn spawn_daemon(mut cmd: Command, netns: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let _ns = enter_on_spawn(&mut cmd, netns, true)?;
    cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// The last `n` lines of a log, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().map(|l| format!("    | {l}\n")).collect()
}

/// True when we run as root (the lab needs CAP_NET_ADMIN and CAP_SYS_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_of_ourselves() {
        let me = ProcRef::of(std::process::id(), "test");
        assert!(me.start_time > 0);
        assert!(me.alive());
        let recycled = ProcRef { start_time: me.start_time + 1, ..me.clone() };
        assert!(!recycled.alive(), "a different start time is another process");
    }

    #[test]
    fn stops_a_child_and_sees_it_gone() {
        let mut c = Command::new("sleep");
        c.arg("30");
        // SAFETY: setsid in the child before exec is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = c.spawn().unwrap();
        let p = ProcRef::of(child.id(), "sleep");
        assert!(p.alive());
        // Reap it from another thread so it does not linger as a zombie.
        let waiter = std::thread::spawn(move || child.wait());
        p.stop(Duration::from_secs(2));
        waiter.join().unwrap().unwrap();
        assert!(!p.alive());
    }

    #[test]
    fn tail_keeps_the_end() {
        let f = std::env::temp_dir().join(format!("ocelot-lab-tail-{}", std::process::id()));
        std::fs::write(&f, "1\n2\n3\n").unwrap();
        assert_eq!(tail(&f, 2), "    | 2\n    | 3\n");
        std::fs::remove_file(&f).unwrap();
        assert_eq!(tail(&f, 2), "");
    }
}
