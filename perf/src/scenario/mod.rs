//! Scenarios: each builds its topologies and runs the measurement suite on
//! them. The suite is shared: it runs every test on every path in turn (all
//! paths for one test, then the next test) so the paths see the same
//! machine conditions, and records the results in a [`Report`].

pub mod cni_add;
pub mod same_node;

use crate::interrupt;
use crate::procfs::{self, CpuMeter};
use crate::report::{Better, Report};
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
    /// Parallel TCP streams.
    pub streams: u32,
    /// UDP payload bytes.
    pub udp_len: u32,
    /// Seconds over which the idle dataplane's CPU is measured.
    pub idle_secs: u32,
    pub tests: Vec<Test>,
    pub iperf_port: u16,
    pub sockperf_port: u16,
}

/// A dataplane process serving a path, for the Ocelot-only metrics.
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

/// A path to measure: two pods, and the dataplane if it is Ocelot's.
pub struct Subject<'a> {
    pub pair: &'a dyn PodPair,
    pub dataplane: Option<Dataplane>,
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
    cpu: Option<CpuMeter>,
    drops: Option<BTreeMap<String, u64>>,
}

impl Around {
    fn start(dp: Option<&Dataplane>) -> Result<Around> {
        Ok(match dp {
            Some(d) => Around { cpu: Some(CpuMeter::start(d.pid)?), drops: Some(d.drops()?) },
            None => Around { cpu: None, drops: None },
        })
    }

    /// Record `dp_cpu_<test>` and the drops seen during the test.
    fn finish(
        self,
        dp: Option<&Dataplane>,
        report: &mut Report,
        path: &str,
        test: &str,
        what: &str,
    ) -> Result<()> {
        let (Some(d), Some(cpu), Some(before)) = (dp, self.cpu, self.drops) else {
            return Ok(());
        };
        report.add(
            &format!("dp_cpu_{test}"),
            &format!("dataplane CPU during {what} (% of a core)"),
            "%",
            Better::Lower,
            1,
            path,
            cpu.percent()?,
        );
        let drops = diff(&d.drops()?, &before);
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

/// Run every test of `p` on every subject, in turn.
pub fn run_suite(
    subjects: &[Subject<'_>],
    p: &SuiteParams,
    report: &mut Report,
    logdir: &Path,
    progress: &dyn Fn(&str),
) -> Result<()> {
    // Servers for the whole suite, one set per path (killed on drop).
    let mut servers = Vec::new();
    for s in subjects {
        let (ns, ip) = (s.pair.server(), s.pair.server_ip());
        let want = |t| p.tests.contains(&t);
        let iperf = (want(Test::Tcp) || want(Test::Udp))
            .then(|| IperfServer::start(ns, ip, p.iperf_port, logdir))
            .transpose()?;
        let sockperf = want(Test::Rtt)
            .then(|| SockperfServer::start(ns, ip, p.sockperf_port, logdir))
            .transpose()?;
        servers.push((iperf, sockperf));
    }
    let streams = if p.streams == 1 { "1 stream".into() } else { format!("{} streams", p.streams) };
    for test in &p.tests {
        for s in subjects {
            interrupt::check()?;
            let path = s.pair.label();
            let dp = s.dataplane.as_ref();
            let run = IperfRun {
                server_ip: s.pair.server_ip(),
                port: p.iperf_port,
                seconds: p.duration,
                omit: p.warmup,
                streams: p.streams,
            };
            match test {
                Test::Tcp => {
                    let around = Around::start(dp)?;
                    let r = run.tcp(s.pair.client()).with_context(|| format!("{path}: tcp"))?;
                    let gbps = r.bits_per_second / 1e9;
                    progress(&format!(
                        "[{path}] tcp: {gbps:.2} Gbit/s, {} retransmits",
                        r.retransmits
                    ));
                    let label = format!("TCP throughput, {streams} (Gbit/s)");
                    report.add("tcp_gbps", &label, "Gbit/s", Better::Higher, 2, path, gbps);
                    report.add(
                        "tcp_retransmits",
                        "TCP retransmits (segments)",
                        "segments",
                        Better::Lower,
                        0,
                        path,
                        r.retransmits as f64,
                    );
                    around.finish(dp, report, path, "tcp", "TCP")?;
                    report.detail(path, "tcp", &r);
                }
                Test::Udp => {
                    let (c, sv) = (s.pair.client(), s.pair.server());
                    run.udp_warmup(c, p.udp_len).with_context(|| format!("{path}: udp"))?;
                    let around = Around::start(dp)?;
                    let before = LossCounters::read(c, sv)?;
                    let r = run.udp(c, p.udp_len).with_context(|| format!("{path}: udp"))?;
                    let loss = LossCounters::read(c, sv)?.since(&before);
                    if loss.client_eth0_tx_dropped + loss.server_udp_rcvbuf_errors > 0 {
                        report.notes.push(format!(
                            "{path} udp: {} packets dropped by the client's eth0 \
                             (queue full: {}), {} by the server's eth0, {} by the server's \
                             full socket buffer (iperf3 server too slow)",
                            loss.client_eth0_tx_dropped,
                            if s.dataplane.is_some() {
                                "the dataplane did not read them in time"
                            } else {
                                "veth"
                            },
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
                    around.finish(dp, report, path, "udp", &format!("UDP {n} B"))?;
                    report.detail(path, "udp", &r);
                }
                Test::Rtt => {
                    let around = Around::start(dp)?;
                    let r = tools::sockperf_rtt(
                        s.pair.client(),
                        s.pair.server_ip(),
                        p.sockperf_port,
                        p.duration,
                    )
                    .with_context(|| format!("{path}: rtt"))?;
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
                    around.finish(dp, report, path, "rtt", "TCP ping-pong")?;
                    report.detail(path, "rtt", &r);
                }
                Test::Idle => {
                    let Some(d) = dp else { continue };
                    // Let the queues drain and the worker go back to sleep.
                    std::thread::sleep(Duration::from_secs(1));
                    let secs = p.idle_secs.max(1);
                    let cpu = procfs::cpu_percent_over(d.pid, Duration::from_secs(secs.into()))?;
                    interrupt::check()?;
                    let rss = procfs::status_kib(d.pid, "VmRSS")? as f64 / 1024.0;
                    let hwm = procfs::status_kib(d.pid, "VmHWM")? as f64 / 1024.0;
                    progress(&format!(
                        "[{path}] idle: CPU {cpu:.2} % of a core over {secs} s, RSS {rss:.1} MiB (peak {hwm:.1} MiB)"
                    ));
                    report.add(
                        "dp_idle_cpu_pct",
                        &format!("dataplane CPU when idle, {secs} s (% of a core)"),
                        "%",
                        Better::Lower,
                        2,
                        path,
                        cpu,
                    );
                    report.add(
                        "dp_rss_mib",
                        "dataplane resident memory VmRSS (MiB)",
                        "MiB",
                        Better::Lower,
                        1,
                        path,
                        rss,
                    );
                    report.add(
                        "dp_rss_peak_mib",
                        "dataplane peak resident memory VmHWM (MiB)",
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
        }
    }
    drop(servers);
    Ok(())
}
