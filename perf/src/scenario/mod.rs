//! Scenarios: each builds its topologies and runs the measurement suite on
//! them. The suite is shared: it runs every test on every path in turn (all
//! paths for one test, then the next test) so the paths see the same
//! machine conditions, and records the results in a [`Report`].

pub mod cni_add;
pub mod conn_rate;
pub mod cross_node;
pub mod policy_update;
pub mod same_node;
pub mod services;

use crate::interrupt;
use crate::procfs::{self, CpuMeter};
use crate::report::{self, Better, Report};
use crate::tools::{self, IperfRun, IperfServer, LossCounters, SockperfServer};
use crate::topo::PodPair;
use anyhow::{Context, Result};
use ocelot_dataplane::api::client::Client;
use ocelot_dataplane::api::{Reply, Request};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One measurement of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// iperf3 TCP throughput.
    Tcp,
    /// iperf3 UDP small-packet rate and loss.
    Udp,
    /// sockperf TCP ping-pong round-trip time.
    Rtt,
    /// CPU and memory of the idle dataplane (Ocelot paths only).
    Idle,
}

/// Parameters of the suite, shared by all scenarios.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SuiteParams {
    /// Seconds measured per iperf3/sockperf run.
    pub duration: u32,
    /// Seconds of each iperf3 run left out of its result (`-O`).
    pub warmup: u32,
    /// Parallel TCP streams (`iperf3 -P`): one TCP run per entry.
    pub streams: Vec<u32>,
    /// UDP payload bytes.
    pub udp_len: u32,
    /// Seconds over which the idle dataplane's CPU is measured.
    pub idle_secs: u32,
    pub tests: Vec<Test>,
    pub iperf_port: u16,
    pub sockperf_port: u16,
}

/// A dataplane process serving a path, for the Ocelot-only metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataplane {
    pub pid: u32,
    pub socket: PathBuf,
}

impl Dataplane {
    /// Drops by reason, summed over the workers.
    pub fn drops(&self) -> Result<BTreeMap<String, u64>> {
        let mut c = Client::connect(&self.socket, "ocelot-perf")
            .with_context(|| format!("cannot connect to {}", self.socket.display()))?;
        let Reply::Counters { workers, .. } = c.call(Request::Counters)? else {
            anyhow::bail!("unexpected reply to counters");
        };
        let mut total = BTreeMap::new();
        for w in workers {
            for (k, v) in w.counters.drops {
                *total.entry(k).or_insert(0) += v;
            }
        }
        Ok(total)
    }
}

/// Drops by reason, summed over several dataplanes.
pub fn drops_of(dps: &[Dataplane]) -> Result<BTreeMap<String, u64>> {
    let mut total = BTreeMap::new();
    for d in dps {
        for (k, v) in d.drops()? {
            *total.entry(k).or_insert(0) += v;
        }
    }
    Ok(total)
}

/// A path to measure: two pods, and the dataplanes serving them if they
/// are Ocelot's (one per node; none for the kernel).
pub struct Subject<'a> {
    pub pair: &'a dyn PodPair,
    pub dataplanes: Vec<Dataplane>,
}

/// What the suite does when a test fails on a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Return the error at once.
    Stop,
    /// Record it in [`Report::failures`], print `<path>: failed: <reason>`,
    /// leave the path's remaining cells empty and go on with the others.
    SkipPath,
}

/// One measurement of the suite: a [`Test`], with TCP once per stream count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Tcp { streams: u32 },
    Udp,
    Rtt,
    Idle,
}

/// The steps of `tests`, in order, TCP expanded to one step per entry of
/// `streams` (duplicates run once).
pub fn steps(tests: &[Test], streams: &[u32]) -> Vec<Step> {
    let mut out = Vec::new();
    for t in tests {
        let add: Vec<Step> = match t {
            Test::Tcp => streams.iter().map(|&n| Step::Tcp { streams: n }).collect(),
            Test::Udp => vec![Step::Udp],
            Test::Rtt => vec![Step::Rtt],
            Test::Idle => vec![Step::Idle],
        };
        for s in add {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

/// Names of a TCP step with `n` streams: the metric keys' stem (`tcp`,
/// `tcp_p4`) and the words for labels (`1 stream`, `4 streams`).
pub fn tcp_names(n: u32) -> (String, String) {
    if n == 1 {
        ("tcp".into(), "1 stream".into())
    } else {
        (format!("tcp_p{n}"), format!("{n} streams"))
    }
}

/// `" (% of a core)"` style units, naming the node count when a path has
/// several dataplanes (their values are summed).
fn dp_unit(unit: &str, dps: usize) -> String {
    if dps > 1 {
        format!("{unit}, sum of {dps} nodes")
    } else {
        unit.into()
    }
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Dataplane CPU and drops around one measurement.
struct Around {
    cpu: Vec<CpuMeter>,
    drops: BTreeMap<String, u64>,
}

impl Around {
    fn start(dps: &[Dataplane]) -> Result<Around> {
        let cpu = dps.iter().map(|d| CpuMeter::start(d.pid)).collect::<Result<_>>()?;
        Ok(Around { cpu, drops: drops_of(dps)? })
    }

    /// Record `dp_cpu_<test>` and the drops seen during the test.
    fn finish(
        self,
        dps: &[Dataplane],
        report: &mut Report,
        path: &str,
        test: &str,
        what: &str,
    ) -> Result<()> {
        if dps.is_empty() {
            return Ok(());
        }
        let mut cpu = 0.0;
        for m in &self.cpu {
            cpu += m.percent()?;
        }
        report.add(
            &format!("dp_cpu_{test}"),
            &format!("dataplane CPU during {what} ({})", dp_unit("% of a core", dps.len())),
            "%",
            Better::Lower,
            1,
            path,
            cpu,
        );
        let drops = diff(&drops_of(dps)?, &self.drops);
        if !drops.is_empty() {
            let s: Vec<String> = drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
            // The pods' own IPv6 multicast (router solicitations, MLD):
            // IPv6 is not forwarded yet, so these are expected.
            let why = if drops.keys().all(|k| k == "unsupported_ethertype") {
                " (the pods' IPv6 ND/MLD multicast; IPv6 is not forwarded yet)"
            } else {
                ""
            };
            report
                .notes
                .push(format!("{path} dataplane drops during {test}: {}{why}", s.join(" ")));
        }
        report.detail(path, &format!("dataplane_drops_{test}"), drops);
        Ok(())
    }
}

/// The iperf3 and sockperf servers of one path, killed on drop.
type Servers = (Option<IperfServer>, Option<SockperfServer>);

fn start_servers(s: &Subject<'_>, p: &SuiteParams, logdir: &Path) -> Result<Servers> {
    let (ns, ip) = (s.pair.server(), s.pair.server_ip());
    let want = |t| p.tests.contains(&t);
    let iperf = (want(Test::Tcp) || want(Test::Udp))
        .then(|| IperfServer::start(ns, ip, p.iperf_port, logdir))
        .transpose()?;
    let sockperf = want(Test::Rtt)
        .then(|| SockperfServer::start(ns, ip, p.sockperf_port, logdir))
        .transpose()?;
    Ok((iperf, sockperf))
}

/// Run every test of `p` on every subject, in turn. With
/// [`OnFailure::SkipPath`] a path that fails is left out of the remaining
/// tests and the others go on; an interruption always stops the suite.
pub fn run_suite(
    subjects: &[Subject<'_>],
    p: &SuiteParams,
    report: &mut Report,
    logdir: &Path,
    progress: &dyn Fn(&str),
    on_failure: OnFailure,
) -> Result<()> {
    let fail = |report: &mut Report, path: &str, e: anyhow::Error| -> Result<()> {
        interrupt::check()?;
        if on_failure == OnFailure::Stop {
            return Err(e.context(path.to_string()));
        }
        let reason = format!("{e:#}");
        progress(&report::failure_line(path, &reason));
        report.fail(path, &reason);
        Ok(())
    };
    // Servers for the whole suite, one set per path (killed on drop).
    let mut servers = Vec::new();
    for s in subjects {
        match start_servers(s, p, logdir) {
            Ok(sv) => servers.push(sv),
            Err(e) => fail(report, s.pair.label(), e)?,
        }
    }
    for step in steps(&p.tests, &p.streams) {
        for s in subjects {
            interrupt::check()?;
            let path = s.pair.label();
            if report.failed(path) {
                continue;
            }
            if let Err(e) = measure(step, s, p, report, progress) {
                fail(report, path, e)?;
            }
        }
    }
    drop(servers);
    Ok(())
}

/// One step on one path.
fn measure(
    step: Step,
    s: &Subject<'_>,
    p: &SuiteParams,
    report: &mut Report,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let path = s.pair.label();
    let dps = &s.dataplanes[..];
    let run = IperfRun {
        server_ip: s.pair.server_ip(),
        port: p.iperf_port,
        seconds: p.duration,
        omit: p.warmup,
        streams: 1,
    };
    match step {
        Step::Tcp { streams } => {
            let (key, words) = tcp_names(streams);
            let around = Around::start(dps)?;
            let run = IperfRun { streams, ..run };
            let r = run.tcp(s.pair.client()).with_context(|| key.clone())?;
            let gbps = r.bits_per_second / 1e9;
            let flag = if streams == 1 { String::new() } else { format!(" -P {streams}") };
            progress(&format!(
                "[{path}] tcp{flag}: {gbps:.2} Gbit/s, {} retransmits",
                r.retransmits
            ));
            let label = format!("TCP throughput, {words} (Gbit/s)");
            report.add(&format!("{key}_gbps"), &label, "Gbit/s", Better::Higher, 2, path, gbps);
            let label = if streams == 1 {
                "TCP retransmits (segments)".to_string()
            } else {
                format!("TCP retransmits, {words} (segments)")
            };
            report.add(
                &format!("{key}_retransmits"),
                &label,
                "segments",
                Better::Lower,
                0,
                path,
                r.retransmits as f64,
            );
            let what = if streams == 1 { "TCP".to_string() } else { format!("TCP, {words}") };
            around.finish(dps, report, path, &key, &what)?;
            report.detail(path, &key, &r);
        }
        Step::Udp => {
            let (c, sv) = (s.pair.client(), s.pair.server());
            run.udp_warmup(c, p.udp_len).context("udp")?;
            let around = Around::start(dps)?;
            let before = LossCounters::read(c, sv)?;
            let r = run.udp(c, p.udp_len).context("udp")?;
            let loss = LossCounters::read(c, sv)?.since(&before);
            if loss.client_eth0_tx_dropped + loss.server_udp_rcvbuf_errors > 0 {
                report.notes.push(format!(
                    "{path} udp: {} packets dropped by the client's eth0 \
                     (queue full: {}), {} by the server's eth0, {} by the server's \
                     full socket buffer (iperf3 server too slow)",
                    loss.client_eth0_tx_dropped,
                    if dps.is_empty() { "veth" } else { "the dataplane did not read them in time" },
                    loss.server_eth0_rx_dropped,
                    loss.server_udp_rcvbuf_errors
                ));
            }
            report.detail(path, "udp_loss_counters", &loss);
            progress(&format!(
                "[{path}] udp {} B: sent {:.0} pps, received {:.0} pps, loss {:.2} %",
                p.udp_len, r.sent_pps, r.received_pps, r.lost_percent
            ));
            let n = p.udp_len;
            report.add(
                "udp_rx_kpps",
                &format!("UDP {n} B payload, received (kpps)"),
                "kpps",
                Better::Higher,
                1,
                path,
                r.received_pps / 1e3,
            );
            report.add(
                "udp_tx_kpps",
                &format!("UDP {n} B payload, sent by iperf3 (kpps)"),
                "kpps",
                Better::Neither,
                1,
                path,
                r.sent_pps / 1e3,
            );
            report.add(
                "udp_loss_pct",
                &format!("UDP {n} B payload, loss (%)"),
                "%",
                Better::Lower,
                2,
                path,
                r.lost_percent,
            );
            around.finish(dps, report, path, "udp", &format!("UDP {n} B"))?;
            report.detail(path, "udp", &r);
        }
        Step::Rtt => {
            let around = Around::start(dps)?;
            let r = tools::sockperf_rtt(
                s.pair.client(),
                s.pair.server_ip(),
                p.sockperf_port,
                p.duration,
            )
            .context("rtt")?;
            progress(&format!(
                "[{path}] rtt: p50 {:.1} us, p99 {:.1} us ({} round trips)",
                r.p50_us, r.p99_us, r.observations
            ));
            for (key, label, v) in [
                ("rtt_p50_us", "TCP round trip p50 (us)", r.p50_us),
                ("rtt_p99_us", "TCP round trip p99 (us)", r.p99_us),
            ] {
                report.add(key, label, "us", Better::Lower, 1, path, v);
            }
            around.finish(dps, report, path, "rtt", "TCP ping-pong")?;
            report.detail(path, "rtt", &r);
        }
        Step::Idle => {
            if dps.is_empty() {
                return Ok(());
            }
            // Let the queues drain and the workers go back to sleep.
            std::thread::sleep(Duration::from_secs(1));
            let secs = p.idle_secs.max(1);
            let meters = dps.iter().map(|d| CpuMeter::start(d.pid)).collect::<Result<Vec<_>>>()?;
            std::thread::sleep(Duration::from_secs(secs.into()));
            let mut cpu = 0.0;
            for m in &meters {
                cpu += m.percent()?;
            }
            interrupt::check()?;
            let (mut rss, mut hwm) = (0.0, 0.0);
            for d in dps {
                rss += procfs::status_kib(d.pid, "VmRSS")? as f64 / 1024.0;
                hwm += procfs::status_kib(d.pid, "VmHWM")? as f64 / 1024.0;
            }
            progress(&format!(
                "[{path}] idle: CPU {cpu:.2} % of a core over {secs} s, RSS {rss:.1} MiB (peak {hwm:.1} MiB)"
            ));
            let n = dps.len();
            report.add(
                "dp_idle_cpu_pct",
                &format!("dataplane CPU when idle, {secs} s ({})", dp_unit("% of a core", n)),
                "%",
                Better::Lower,
                2,
                path,
                cpu,
            );
            report.add(
                "dp_rss_mib",
                &format!("dataplane resident memory VmRSS ({})", dp_unit("MiB", n)),
                "MiB",
                Better::Lower,
                1,
                path,
                rss,
            );
            report.add(
                "dp_rss_peak_mib",
                &format!("dataplane peak resident memory VmHWM ({})", dp_unit("MiB", n)),
                "MiB",
                Better::Lower,
                1,
                path,
                hwm,
            );
            let res = 100.0 / procfs::clk_tck() as f64 / f64::from(secs);
            report.detail(
                path,
                "idle",
                serde_json::json!({
                    "cpu_pct": cpu, "seconds": secs, "resolution_pct": res,
                    "vm_rss_kib": (rss * 1024.0) as u64, "vm_hwm_kib": (hwm * 1024.0) as u64,
                }),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_runs_once_per_stream_count_in_order() {
        let t = [Test::Tcp, Test::Udp, Test::Rtt, Test::Idle];
        assert_eq!(
            steps(&t, &[1, 4]),
            [Step::Tcp { streams: 1 }, Step::Tcp { streams: 4 }, Step::Udp, Step::Rtt, Step::Idle]
        );
        assert_eq!(steps(&[Test::Rtt, Test::Tcp], &[4, 4]), [Step::Rtt, Step::Tcp { streams: 4 }]);
        assert_eq!(steps(&[Test::Udp, Test::Udp], &[1]), [Step::Udp]);
    }

    #[test]
    fn tcp_metric_names() {
        assert_eq!(tcp_names(1), ("tcp".into(), "1 stream".into()));
        assert_eq!(tcp_names(4), ("tcp_p4".into(), "4 streams".into()));
        assert_eq!(dp_unit("MiB", 1), "MiB");
        assert_eq!(dp_unit("% of a core", 2), "% of a core, sum of 2 nodes");
    }

    #[test]
    fn drops_diff_keeps_what_grew() {
        let m = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let before = m(&[("no_route", 2), ("ttl", 1)]);
        let after = m(&[("no_route", 5), ("ttl", 1), ("unsupported_ethertype", 3)]);
        assert_eq!(diff(&after, &before), m(&[("no_route", 3), ("unsupported_ethertype", 3)]));
    }
}
