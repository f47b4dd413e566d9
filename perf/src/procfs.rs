//! CPU time and memory of a process, from `/proc`.

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// Clock ticks per second of `utime`/`stime` (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// `utime + stime` of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("cannot parse /proc/{pid}/stat: {stat}"))
}

/// Fields 14 and 15 of `/proc/PID/stat`, counted after the `(comm)` field
/// (which may contain spaces and parentheses).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f.get(14 - 3)?.parse().ok()?;
    let stime: u64 = f.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of a process over a span of wall time.
pub struct CpuMeter {
    pid: u32,
    ticks: u64,
    at: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Result<CpuMeter> {
        Ok(CpuMeter { pid, ticks: cpu_ticks(pid)?, at: Instant::now() })
    }

    /// CPU used since `start`, as % of one core.
    pub fn percent(&self) -> Result<f64> {
        let ticks = cpu_ticks(self.pid)? - self.ticks;
        let wall = self.at.elapsed().as_secs_f64();
        Ok(100.0 * ticks as f64 / clk_tck() as f64 / wall)
    }
}

/// CPU used by `pid` over `d` of sleeping, as % of one core. The
/// resolution is one clock tick over `d` (0.33 % for 3 s at 100 Hz).
pub fn cpu_percent_over(pid: u32, d: Duration) -> Result<f64> {
    let m = CpuMeter::start(pid)?;
    std::thread::sleep(d);
    m.percent()
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    match parse_status_kib(&s, field) {
        Some(v) => Ok(v),
        None => bail!("no {field} in /proc/{pid}/status"),
    }
}

pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The command name (`comm`) of a process.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_comm() {
        let s = "4242 (ocelot (data) plane) S 1 4242 4242 0 -1 4194560 1065 0 0 0 \
                 17 5 0 0 20 0 3 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(s), Some(22));
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tocelot-dataplan\nVmHWM:\t   9876 kB\nVmRSS:\t    5432 kB\n";
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(5432));
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(9876));
        assert_eq!(parse_status_kib(s, "VmSwap"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(status_kib(pid, "VmRSS").unwrap() > 0);
    }
}
