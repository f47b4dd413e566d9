//! The measuring tools: iperf3 (throughput, packet rate) and sockperf
//! (round-trip latency), run inside network namespaces, and parsers of their
//! output (pure functions, tested on captured output).

use crate::interrupt;
use anyhow::{anyhow, bail, Context, Result};
use ocelot_tests::{wait_until, Netns, Proc};
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How to install what is missing.
pub const INSTALL_HINT: &str = "apt-get install -y iperf3 sockperf iproute2 iputils-ping";

/// Fail early, with the fix, when a tool is missing.
pub fn check_installed(tools: &[&str]) -> Result<()> {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if !missing.is_empty() {
        bail!("not installed: {} (install with `{INSTALL_HINT}`)", missing.join(", "));
    }
    Ok(())
}

/// The path of `tool` in `$PATH`.
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The first line `tool --version` prints (for the report).
pub fn version(tool: &str) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            strip_ansi(s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim())
        })
        .unwrap_or_default()
}

/// What a command printed, and whether it succeeded.
pub struct Ran {
    pub ok: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// Run `args` inside `ns`, killing it after `timeout` (or on Ctrl-C).
pub fn run_in(ns: &Netns, args: &[&str], timeout: Duration) -> Result<Ran> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).args(args);
    run_timed(cmd, &format!("`{}` in {}", args.join(" "), ns.name), timeout)
}

/// Run `cmd` (described as `what` in errors), killing it after `timeout`
/// (or on Ctrl-C).
pub fn run_timed(cmd: Command, what: &str, timeout: Duration) -> Result<Ran> {
    run_with(cmd, what, timeout, true)
}

/// Run a cleanup command to its end (or `timeout`), even after Ctrl-C: it
/// gets its own process group, so a second Ctrl-C at the terminal does not
/// reach it either.
pub fn run_cleanup(mut cmd: Command, what: &str, timeout: Duration) -> Result<Ran> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    run_with(cmd, what, timeout, false)
}

fn run_with(mut cmd: Command, what: &str, timeout: Duration, interruptible: bool) -> Result<Ran> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= end || (interruptible && interrupt::interrupted()) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    if interruptible {
        interrupt::check()?;
    }
    let Some(st) = status else {
        bail!(
            "{what} did not finish within {}s\n{}{}",
            timeout.as_secs(),
            tail(&stdout, 20),
            tail(&stderr, 20)
        );
    };
    Ok(Ran { ok: st.success(), status: st.to_string(), stdout, stderr })
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let mut t = lines[lines.len().saturating_sub(n)..].join("\n");
    if !t.is_empty() {
        t.push('\n');
    }
    t
}

/// Remove terminal colour escapes (sockperf prints them).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for c in it.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Wait until something listens on TCP `port` in `ns`.
pub fn wait_listening(ns: &Netns, port: u16, server: &Proc, what: &str) -> Result<()> {
    let ok = wait_until(Duration::from_secs(5), || {
        let o = ns.exec_out(&format!("ss -Hltn 'sport = :{port}'"));
        o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty()
    });
    if !ok {
        bail!(
            "{what} did not start listening on port {port} in {}:\n{}",
            ns.name,
            server.log_text()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- iperf3

/// An iperf3 server (`iperf3 -s`) in a namespace, killed on drop.
pub struct IperfServer {
    pub proc: Proc,
    pub port: u16,
}

impl IperfServer {
    pub fn start(ns: &Netns, ip: &str, port: u16, logdir: &Path) -> Result<IperfServer> {
        let log = logdir.join(format!("iperf3-server-{}.log", ns.name));
        let proc = ns.spawn(&format!("iperf3 -s -B {ip} -p {port}"), &log);
        wait_listening(ns, port, &proc, "iperf3 server")?;
        Ok(IperfServer { proc, port })
    }
}

/// A TCP throughput result.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TcpResult {
    /// Received bits per second, all streams.
    pub bits_per_second: f64,
    pub retransmits: u64,
    pub seconds: f64,
}

/// A UDP packet-rate result (receiver's view).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct UdpResult {
    pub sent_packets: u64,
    pub received_packets: u64,
    pub lost_packets: i64,
    pub lost_percent: f64,
    pub seconds: f64,
    /// Packets received per second.
    pub received_pps: f64,
    /// Packets sent per second.
    pub sent_pps: f64,
}

/// iperf3 options shared by the TCP and UDP runs.
#[derive(Clone, Debug)]
pub struct IperfRun<'a> {
    pub server_ip: &'a str,
    pub port: u16,
    pub seconds: u32,
    /// Seconds at the start left out of the result (`-O`): slow start, ARP.
    pub omit: u32,
    pub streams: u32,
}

impl IperfRun<'_> {
    fn base_args(&self) -> Vec<String> {
        vec![
            "iperf3".into(),
            "-c".into(),
            self.server_ip.into(),
            "-p".into(),
            self.port.to_string(),
            "-t".into(),
            self.seconds.to_string(),
            "-O".into(),
            self.omit.to_string(),
            "-P".into(),
            self.streams.to_string(),
            "--connect-timeout".into(),
            "3000".into(),
            "-J".into(),
        ]
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.seconds + self.omit) + 20)
    }

    fn run(&self, client: &Netns, extra: &[&str]) -> Result<Value> {
        let mut args = self.base_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let ran = run_in(client, &argv, self.timeout())?;
        let v: Value = serde_json::from_str(&ran.stdout).map_err(|e| {
            anyhow!(
                "`{}` ({}) printed no JSON ({e}):\n{}{}",
                argv.join(" "),
                ran.status,
                tail(&ran.stdout, 20),
                tail(&ran.stderr, 20)
            )
        })?;
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            bail!("`{}` in {} failed: {err}", argv.join(" "), client.name);
        }
        if !ran.ok {
            bail!(
                "`{}` in {} failed ({})\n{}",
                argv.join(" "),
                client.name,
                ran.status,
                tail(&ran.stderr, 20)
            );
        }
        Ok(v)
    }

    /// TCP throughput from `client` to the server.
    pub fn tcp(&self, client: &Netns) -> Result<TcpResult> {
        parse_iperf_tcp(&self.run(client, &[])?)
    }

    /// UDP at full speed (`-b 0`) with `len`-byte payloads, for `seconds`
    /// (`omit` is not used: with `-O`, iperf3 3.12 resets the receiver's
    /// counts but not the sequence numbers and reports bogus loss; warm up
    /// with [`IperfRun::udp_warmup`] instead).
    pub fn udp(&self, client: &Netns, len: u32) -> Result<UdpResult> {
        let len = len.to_string();
        let run = IperfRun { omit: 0, ..self.clone() };
        parse_iperf_udp(&run.run(client, &["-u", "-b", "0", "-l", &len])?)
    }

    /// A discarded UDP run of `omit` seconds.
    pub fn udp_warmup(&self, client: &Netns, len: u32) -> Result<()> {
        if self.omit > 0 {
            let warm = IperfRun { seconds: self.omit, omit: 0, ..self.clone() };
            warm.udp(client, len)?;
        }
        Ok(())
    }
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// `end.sum_received.bits_per_second` and the sender's retransmits.
pub fn parse_iperf_tcp(v: &Value) -> Result<TcpResult> {
    let bps = f(v, &["end", "sum_received", "bits_per_second"])
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(TcpResult {
        bits_per_second: bps,
        retransmits: f(v, &["end", "sum_sent", "retransmits"]).unwrap_or(0.0) as u64,
        seconds: f(v, &["end", "sum_received", "seconds"]).unwrap_or(0.0),
    })
}

/// The receiver's counts of a UDP run: `end.sum_received` (`end.sum` in
/// older iperf3), where `packets` is what the sender sent (by sequence
/// number) and `lost_packets` the gaps, so received = packets - lost.
pub fn parse_iperf_udp(v: &Value) -> Result<UdpResult> {
    let end = v.get("end").context("iperf3 JSON has no `end`")?;
    let r = end
        .get("sum_received")
        .filter(|r| r.get("packets").is_some())
        .or_else(|| end.get("sum"))
        .context("iperf3 JSON has no end.sum_received")?;
    let packets = r.get("packets").and_then(Value::as_u64).context("no packets")?;
    let lost = r.get("lost_packets").and_then(Value::as_i64).unwrap_or(0);
    let seconds = r.get("seconds").and_then(Value::as_f64).context("no seconds")?;
    if seconds <= 0.0 {
        bail!("iperf3 UDP run lasted {seconds} s");
    }
    let received = (packets as i64 - lost).max(0) as u64;
    let sent = end
        .get("sum_sent")
        .and_then(|s| s.get("packets"))
        .and_then(Value::as_u64)
        .unwrap_or(packets);
    let sent_secs = f(end, &["sum_sent", "seconds"]).filter(|s| *s > 0.0).unwrap_or(seconds);
    Ok(UdpResult {
        sent_packets: sent,
        received_packets: received,
        lost_packets: lost,
        lost_percent: r.get("lost_percent").and_then(Value::as_f64).unwrap_or(0.0),
        seconds,
        received_pps: received as f64 / seconds,
        sent_pps: sent as f64 / sent_secs,
    })
}

// -------------------------------------------------------------- sockperf

/// A sockperf TCP server in a namespace, killed on drop.
pub struct SockperfServer {
    pub proc: Proc,
    pub port: u16,
}

impl SockperfServer {
    pub fn start(ns: &Netns, ip: &str, port: u16, logdir: &Path) -> Result<SockperfServer> {
        let log = logdir.join(format!("sockperf-server-{}.log", ns.name));
        let proc = ns.spawn(&format!("sockperf server --tcp -i {ip} -p {port}"), &log);
        wait_listening(ns, port, &proc, "sockperf server")?;
        Ok(SockperfServer { proc, port })
    }
}

/// Round-trip times in microseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Rtt {
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub observations: u64,
}

/// TCP ping-pong (one message in flight) from `client` for `seconds`,
/// reported as full round trips (`--full-rtt`; sockperf's default is half).
pub fn sockperf_rtt(client: &Netns, ip: &str, port: u16, seconds: u32) -> Result<Rtt> {
    let (p, t) = (port.to_string(), seconds.to_string());
    let argv = ["sockperf", "ping-pong", "--tcp", "-i", ip, "-p", &p, "-t", &t, "--full-rtt"];
    let ran = run_in(client, &argv, Duration::from_secs(u64::from(seconds) + 20))?;
    let text = strip_ansi(&format!("{}\n{}", ran.stdout, ran.stderr));
    if !ran.ok {
        bail!(
            "`{}` in {} failed ({}):\n{}",
            argv.join(" "),
            client.name,
            ran.status,
            tail(&text, 20)
        );
    }
    parse_sockperf(&text)
        .with_context(|| format!("cannot parse sockperf's output:\n{}", tail(&text, 30)))
}

/// Percentile lines (`---> percentile 99.000 =   31.498`) and the average
/// (`avg-rtt=33.6` with `--full-rtt`, `avg-latency=` without).
pub fn parse_sockperf(text: &str) -> Result<Rtt> {
    let pct = |p: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            let rest = l.split("percentile ").nth(1)?;
            let (k, v) = rest.split_once('=')?;
            (k.trim() == p).then(|| v.trim().parse().ok())?
        })
    };
    let avg = text.lines().find_map(|l| {
        let rest = l.split("avg-").nth(1)?;
        let v = rest.split_once('=')?.1;
        v.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?.parse().ok()
    });
    let observations = text.lines().find_map(|l| {
        let rest = l.split("Total ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    });
    Ok(Rtt {
        p50_us: pct("50.000").context("no `percentile 50.000` line")?,
        p99_us: pct("99.000").context("no `percentile 99.000` line")?,
        p999_us: pct("99.900").unwrap_or(f64::NAN),
        avg_us: avg.unwrap_or(f64::NAN),
        observations: observations.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKPERF: &str = "\
sockperf: == version #3.7-no.git == \n\
sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=58448; ReceivedMessages=58447\n\
sockperf: ========= Printing statistics for Server No: 0\n\
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=45983; ReceivedMessages=45983\n\
sockperf: \u{1b}[2;35m====> avg-rtt=33.664 (std-dev=15.780)\u{1b}[0m\n\
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0\n\
sockperf: Summary: Round trip is 33.664 usec\n\
sockperf: \u{1b}[2;35mTotal 45983 observations\u{1b}[0m; each percentile contains 459.83 observations\n\
sockperf: ---> <MAX> observation = 2039.596\n\
sockperf: ---> percentile 99.999 = 2039.596\n\
sockperf: ---> percentile 99.990 =  206.606\n\
sockperf: ---> percentile 99.900 =   95.228\n\
sockperf: ---> percentile 99.000 =   62.996\n\
sockperf: ---> percentile 90.000 =   41.696\n\
sockperf: ---> percentile 75.000 =   36.226\n\
sockperf: ---> percentile 50.000 =   30.456\n\
sockperf: ---> percentile 25.000 =   29.174\n\
sockperf: ---> <MIN> observation =   22.432\n";

    #[test]
    fn sockperf_output() {
        let r = parse_sockperf(&strip_ansi(SOCKPERF)).unwrap();
        assert_eq!(r.p50_us, 30.456);
        assert_eq!(r.p99_us, 62.996);
        assert_eq!(r.p999_us, 95.228);
        assert_eq!(r.avg_us, 33.664);
        assert_eq!(r.observations, 45983);
        assert!(parse_sockperf("sockperf: nothing").is_err());
    }

    #[test]
    fn iperf_udp_receiver_counts() {
        let v: Value = serde_json::from_str(
            r#"{"end":{"sum":{"seconds":2.0,"packets":241180,"lost_packets":585,"lost_percent":0.24},
                "sum_sent":{"seconds":2.0,"packets":241180,"lost_packets":0},
                "sum_received":{"seconds":2.000103,"bytes":15398080,"packets":241180,"lost_packets":585,"lost_percent":0.242557}}}"#,
        )
        .unwrap();
        let r = parse_iperf_udp(&v).unwrap();
        assert_eq!(r.received_packets, 240595);
        assert_eq!(r.lost_packets, 585);
        assert!((r.received_pps - 240595.0 / 2.000103).abs() < 1e-6);
        assert!((r.sent_pps - 120590.0).abs() < 1e-6);
    }

    #[test]
    fn iperf_tcp_received_rate() {
        let v: Value = serde_json::from_str(
            r#"{"end":{"sum_sent":{"bits_per_second":2.6e10,"retransmits":3},
                "sum_received":{"seconds":5.0,"bits_per_second":2.5e10}}}"#,
        )
        .unwrap();
        let r = parse_iperf_tcp(&v).unwrap();
        assert_eq!(r.bits_per_second, 2.5e10);
        assert_eq!(r.retransmits, 3);
        assert!(parse_iperf_tcp(&serde_json::json!({"end":{}})).is_err());
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("a\u{1b}[2;35mb\u{1b}[0mc"), "abc");
    }
}

// ------------------------------------------------------ where packets go

/// Kernel counters that tell where UDP packets were lost: the client's
/// `eth0` dropping what it could not queue (for a TAP: what the dataplane
/// did not read in time), the server's `eth0` dropping on receive, and the
/// server's UDP sockets overflowing (the receiving application too slow).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LossCounters {
    pub client_eth0_tx_dropped: u64,
    pub server_eth0_rx_dropped: u64,
    pub server_udp_in_datagrams: u64,
    pub server_udp_rcvbuf_errors: u64,
}

impl LossCounters {
    pub fn read(client: &Netns, server: &Netns) -> Result<LossCounters> {
        let (_, tx_dropped) = link_dropped(client, "eth0")?;
        let (rx_dropped, _) = link_dropped(server, "eth0")?;
        let snmp = server.exec("cat /proc/net/snmp");
        let udp = |k: &str| snmp_field(&snmp, "Udp", k).unwrap_or(0);
        Ok(LossCounters {
            client_eth0_tx_dropped: tx_dropped,
            server_eth0_rx_dropped: rx_dropped,
            server_udp_in_datagrams: udp("InDatagrams"),
            server_udp_rcvbuf_errors: udp("RcvbufErrors"),
        })
    }

    /// What changed since `before`.
    pub fn since(&self, before: &LossCounters) -> LossCounters {
        LossCounters {
            client_eth0_tx_dropped: self.client_eth0_tx_dropped - before.client_eth0_tx_dropped,
            server_eth0_rx_dropped: self.server_eth0_rx_dropped - before.server_eth0_rx_dropped,
            server_udp_in_datagrams: self.server_udp_in_datagrams - before.server_udp_in_datagrams,
            server_udp_rcvbuf_errors: self.server_udp_rcvbuf_errors
                - before.server_udp_rcvbuf_errors,
        }
    }
}

/// `(rx dropped, tx dropped)` of an interface in `ns`.
pub fn link_dropped(ns: &Netns, ifname: &str) -> Result<(u64, u64)> {
    let v = link_stats(ns, ifname)?;
    Ok((parse_link_counter(&v, "rx", "dropped")?, parse_link_counter(&v, "tx", "dropped")?))
}

/// One counter (`dir` `rx`/`tx`, `field` `packets`, `bytes`, `dropped`...)
/// of an interface in `ns`.
pub fn link_counter(ns: &Netns, ifname: &str, dir: &str, field: &str) -> Result<u64> {
    parse_link_counter(&link_stats(ns, ifname)?, dir, field)
}

/// The MTU of an interface in `ns`.
pub fn link_mtu(ns: &Netns, ifname: &str) -> Result<u32> {
    parse_link_mtu(&link_stats(ns, ifname)?)
}

/// `mtu` of the first link in `ip -j link` output.
pub fn parse_link_mtu(v: &Value) -> Result<u32> {
    v[0]["mtu"].as_u64().and_then(|m| u32::try_from(m).ok()).context("ip -j link: no mtu")
}

fn link_stats(ns: &Netns, ifname: &str) -> Result<Value> {
    let out = ns.exec(&format!("ip -j -s link show dev {ifname}"));
    serde_json::from_str(&out).context("ip -j -s link: bad JSON")
}

/// `stats64.<dir>.<field>` of the first link in `ip -j -s link` output.
pub fn parse_link_counter(v: &Value, dir: &str, field: &str) -> Result<u64> {
    v[0]["stats64"][dir][field]
        .as_u64()
        .with_context(|| format!("ip -j -s link: no stats64.{dir}.{field}"))
}

/// A counter of `/proc/net/snmp` (`Udp` / `RcvbufErrors`...): a header line
/// of names followed by a line of values, both prefixed by `proto:`.
pub fn snmp_field(snmp: &str, proto: &str, key: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == key)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

#[cfg(test)]
mod snmp_tests {
    #[test]
    fn link_counters() {
        // `ip -j -s link show dev vxlan.calico`, trimmed.
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"ifindex":3,"ifname":"vxlan.calico","mtu":1450,"operstate":"UNKNOWN",
                "stats64":{"rx":{"bytes":1679825,"packets":32292,"errors":0,"dropped":0},
                           "tx":{"bytes":6288919796,"packets":113248,"errors":0,"dropped":8}}}]"#,
        )
        .unwrap();
        assert_eq!(super::parse_link_counter(&v, "tx", "packets").unwrap(), 113248);
        assert_eq!(super::parse_link_counter(&v, "tx", "dropped").unwrap(), 8);
        assert_eq!(super::parse_link_counter(&v, "rx", "bytes").unwrap(), 1679825);
        assert!(super::parse_link_counter(&v, "rx", "nope").is_err());
        assert!(super::parse_link_counter(&serde_json::json!([]), "rx", "packets").is_err());
        assert_eq!(super::parse_link_mtu(&v).unwrap(), 1450);
        assert!(super::parse_link_mtu(&serde_json::json!([{}])).is_err());
    }

    #[test]
    fn snmp_udp() {
        let s = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                 Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                 Udp: 579086 0 137369 3 137369\n\
                 UdpLite: InDatagrams NoPorts\nUdpLite: 0 0\n";
        assert_eq!(super::snmp_field(s, "Udp", "RcvbufErrors"), Some(137369));
        assert_eq!(super::snmp_field(s, "Udp", "InDatagrams"), Some(579086));
        assert_eq!(super::snmp_field(s, "Ip", "DefaultTTL"), Some(64));
        assert_eq!(super::snmp_field(s, "Udp", "Nope"), None);
    }
}
