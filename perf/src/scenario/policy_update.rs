//! `policy-update`: how long a NetworkPolicy takes from the datastore to
//! the dataplane, in the real lab.
//!
//! `ocelot lab up` with two nodes, a client pod on node 1 and a server pod
//! on node 2 serving TCP. Each round writes a policy denying all ingress in
//! the pods' namespace (`ocelot lab apply -f`) and, from the moment the
//! command returned, probes the server from the client with short TCP
//! connects until one fails: "deny takes effect". Then it deletes the
//! policy (`ocelot lab delete -f`) and probes until one succeeds: "allow
//! takes effect".
//!
//! The probes overlap: one connect starts every `interval`, each in its own
//! thread inside the client's network namespace, each given up after
//! `connect_timeout`. A dropped SYN would otherwise hold the prober for the
//! whole timeout. The latency of a direction is the start of the earliest
//! connect with the new outcome, so its resolution is the interval.

use crate::interrupt;
use crate::report::{Better, Report};
use crate::scenario::cni_add::percentile;
use crate::topo::lab::{self, OcelotLab};
use crate::topo::overlay::{Encap, UPLINK_MTU};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the agent polls the datastore at unless told otherwise
/// (`ocelot agent --poll-ms`).
pub const AGENT_DEFAULT_POLL_MS: u64 = 200;

#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyUpdateParams {
    pub rounds: usize,
    /// The server's TCP port.
    pub port: u16,
    /// Time between the starts of two probe connects.
    pub interval_ms: u64,
    /// A connect not established by then counts as denied.
    pub connect_timeout_ms: u64,
    /// A direction that has not taken effect by then fails the run.
    pub give_up_ms: u64,
    pub pool: String,
    pub block_size: u8,
    /// Where `ocelot`, `ocelot-dataplane` and `ocelot-cni` are.
    #[serde(skip)]
    pub bin_dir: PathBuf,
}

/// The policy: every pod of the namespace selected, no ingress rule, so
/// all ingress to them is denied (replies to their own connections pass).
pub fn deny_all_ingress(namespace: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  \
         name: perf-deny-ingress\n  namespace: {namespace}\nspec:\n  podSelector: {{}}\n  \
         policyTypes: [Ingress]\n"
    )
}

/// `--poll-ms` of an agent's command line, `None` when not given.
pub fn poll_ms_of(args: &[String]) -> Option<u64> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == "--poll-ms" {
            args.get(i + 1)?.parse().ok()
        } else {
            a.strip_prefix("--poll-ms=")?.parse().ok()
        }
    })
}

/// The watch interval of the agent with `pid`, from its command line.
fn agent_poll_ms(pid: i32) -> Option<u64> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(poll_ms_of(&args).unwrap_or(AGENT_DEFAULT_POLL_MS))
}

/// The earliest start among the attempts whose outcome is `want`.
pub fn first_with(attempts: &[(Duration, bool)], want: bool) -> Option<Duration> {
    attempts.iter().filter(|(_, ok)| *ok == want).map(|(t, _)| *t).min()
}

/// Pause before round `i`'s apply: spread over one agent poll period, so
/// the applies do not fall at the same phase of the agent's loop every
/// round (which would make every round measure the same point of it).
pub fn settle(i: usize, poll_ms: u64) -> Duration {
    let poll = poll_ms.max(1);
    Duration::from_millis(100 + (i as u64 * 37) % poll)
}

/// Connects from inside a network namespace.
struct Prober {
    netns: Arc<File>,
    to: SocketAddr,
    interval: Duration,
    connect_timeout: Duration,
    give_up: Duration,
}

impl Prober {
    /// Probe until a connect's outcome is `want` (true: established);
    /// the time from `since` to the start of the earliest such connect.
    fn until(&self, want: bool, since: Instant) -> Result<Duration> {
        let (tx, rx) = mpsc::channel::<std::io::Result<(Duration, bool)>>();
        let mut attempts = Vec::new();
        let mut running = 0usize;
        let mut hit = false;
        while !hit {
            interrupt::check()?;
            if since.elapsed() > self.give_up {
                bail!(
                    "{} did not take effect within {} ms ({} connects to {} tried)",
                    if want { "allow" } else { "deny" },
                    self.give_up.as_millis(),
                    attempts.len() + running,
                    self.to
                );
            }
            let (tx, ns, to, timeout) =
                (tx.clone(), self.netns.clone(), self.to, self.connect_timeout);
            std::thread::Builder::new()
                .name("probe".into())
                .spawn(move || {
                    let r = ocelot_control::lab::sys::setns_net(ns.as_raw_fd()).map(|()| {
                        let start = since.elapsed();
                        (start, TcpStream::connect_timeout(&to, timeout).is_ok())
                    });
                    let _ = tx.send(r);
                })
                .context("spawning a probe thread")?;
            running += 1;
            std::thread::sleep(self.interval);
            while let Ok(r) = rx.try_recv() {
                running -= 1;
                let a = r.context("setns into the client pod's network namespace")?;
                hit |= a.1 == want;
                attempts.push(a);
            }
        }
        // Connects started before the hit may still have the new outcome.
        while running > 0 {
            let r = rx
                .recv_timeout(self.connect_timeout * 4 + Duration::from_secs(1))
                .context("a probe thread did not report")?;
            running -= 1;
            attempts.push(r.context("setns into the client pod's network namespace")?);
        }
        Ok(first_with(&attempts, want).expect("a hit was seen"))
    }
}

/// The latencies of one direction, in ms.
#[derive(Default, serde::Serialize)]
struct Series {
    took_effect_ms: Vec<f64>,
    command_ms: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summarize(report: &mut Report, key: &str, label: &str, v: &[f64]) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let (min, max) = (s.first().copied(), s.last().copied());
    for (k, x) in [
        ("min", min.unwrap_or(f64::NAN)),
        ("p50", percentile(&s, 0.5)),
        ("p99", percentile(&s, 0.99)),
        ("max", max.unwrap_or(f64::NAN)),
    ] {
        report.add(
            &format!("{key}_{k}_ms"),
            &format!("{label} {k} (ms)"),
            "ms",
            Better::Lower,
            1,
            PATH,
            x,
        );
    }
}

/// The report's one column.
const PATH: &str = "ocelot-vxlan";

pub fn run(p: &PolicyUpdateParams, progress: &dyn Fn(&str)) -> Result<Report> {
    let t0 = Instant::now();
    let mut report = Report::with_comparisons(
        "policy-update",
        &format!(
            "{} rounds in `ocelot lab` (2 nodes, VXLAN): apply a NetworkPolicy denying all \
             ingress to the server pod's namespace, then delete it; from the apply/delete \
             command's return until TCP connects from the client pod (node-1) to the server \
             pod (node-2) port {} fail / succeed again",
            p.rounds, p.port
        ),
        &[PATH],
        Vec::new(),
    );
    report.params = serde_json::to_value(p)?;
    progress("ocelot lab up (2 nodes, VXLAN, server pod serving TCP)");
    let lab = OcelotLab::up_serving(
        Encap::Vxlan,
        &p.pool,
        p.block_size,
        Encap::Vxlan.mtu(UPLINK_MTU),
        &p.bin_dir,
        &[p.port],
    )?;
    let file = lab.run_dir().join("deny-ingress.yaml");
    std::fs::write(&file, deny_all_ingress(lab::NAMESPACE))?;
    let poll_ms: Vec<Option<u64>> =
        lab.nodes.iter().map(|n| n.agent.as_ref().and_then(|a| agent_poll_ms(a.pid))).collect();
    let poll = poll_ms.iter().flatten().copied().max().unwrap_or(AGENT_DEFAULT_POLL_MS);
    let prober = Prober {
        netns: Arc::new(open_netns(&lab.client.ns.path())?),
        to: SocketAddr::new(lab.server.ip.parse().context("server pod address")?, p.port),
        interval: Duration::from_millis(p.interval_ms),
        connect_timeout: Duration::from_millis(p.connect_timeout_ms),
        give_up: Duration::from_millis(p.give_up_ms),
    };
    progress(&format!("waiting for {} to accept connects from the client", prober.to));
    let check = |why: &str| -> anyhow::Error {
        let mut e = vec![why.to_string()];
        e.extend(lab.log_problems());
        anyhow::anyhow!("{}", e.join("\n"))
    };
    prober.until(true, Instant::now()).map_err(|e| check(&format!("{e:#}")))?;

    let (mut deny, mut allow) = (Series::default(), Series::default());
    for i in 0..p.rounds {
        interrupt::check()?;
        std::thread::sleep(settle(i, poll));
        let started = Instant::now();
        let took = lab.run_file("apply", &file)?;
        let returned = started + took;
        let d =
            prober.until(false, returned).map_err(|e| check(&format!("round {}: {e:#}", i + 1)))?;
        deny.command_ms.push(ms(took));
        deny.took_effect_ms.push(ms(d));

        std::thread::sleep(settle(i + p.rounds / 2, poll));
        let started = Instant::now();
        let took = lab.run_file("delete", &file)?;
        let returned = started + took;
        let a =
            prober.until(true, returned).map_err(|e| check(&format!("round {}: {e:#}", i + 1)))?;
        allow.command_ms.push(ms(took));
        allow.took_effect_ms.push(ms(a));
        progress(&format!(
            "round {}/{}: deny after {:.1} ms (apply took {:.1} ms), allow after {:.1} ms \
             (delete took {:.1} ms)",
            i + 1,
            p.rounds,
            ms(d),
            deny.command_ms.last().copied().unwrap_or_default(),
            ms(a),
            ms(took)
        ));
    }
    summarize(&mut report, "deny", "deny takes effect, after apply returned", &deny.took_effect_ms);
    summarize(
        &mut report,
        "allow",
        "allow takes effect, after delete returned",
        &allow.took_effect_ms,
    );
    summarize(&mut report, "apply_cmd", "`ocelot lab apply` itself", &deny.command_ms);
    summarize(&mut report, "delete_cmd", "`ocelot lab delete` itself", &allow.command_ms);
    report.add(
        "agent_poll_ms",
        "agent datastore poll interval (ms)",
        "ms",
        Better::Neither,
        0,
        PATH,
        poll as f64,
    );
    report.detail(PATH, "deny", &deny);
    report.detail(PATH, "allow", &allow);
    report.detail(
        PATH,
        "lab",
        serde_json::json!({
            "lab": lab.name(),
            "client": {"ip": lab.client.ip, "node": lab::NODES[0]},
            "server": {"ip": lab.server.ip, "node": lab::NODES[1], "port": p.port},
            "agent_poll_ms": poll_ms,
        }),
    );
    report.notes.push(format!(
        "the agents wake on file notifications (inotify) and poll the datastore directory \
         every {poll} ms as a fallback: without notifications, about {poll} ms would be the \
         worst case; the min is about what the agent's resync and the dataplane update cost"
    ));
    report.notes.push(format!(
        "resolution: a connect starts every {} ms (each given up after {} ms); a latency is the \
         start of the first connect with the new outcome",
        p.interval_ms, p.connect_timeout_ms
    ));
    report.notes.push(
        "each apply/delete waits 100 ms plus a step of 37 ms modulo the poll interval, so the \
         rounds sample every phase of the agents' poll loop"
            .into(),
    );
    drop(lab);
    report.duration_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn open_netns(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("opening {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_denies_all_ingress_of_the_namespace() {
        let (objs, skipped) =
            ocelot_control::model::parse_documents(&deny_all_ingress("perf")).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let [ocelot_control::model::Object::NetworkPolicy(np)] = &objs[..] else {
            panic!("{objs:?}")
        };
        assert_eq!(objs[0].key(), "NetworkPolicy/perf/perf-deny-ingress");
        assert_eq!(np.types(), (true, false), "ingress only");
        assert!(np.spec.ingress.as_deref().unwrap_or_default().is_empty(), "no rule allows");
    }

    #[test]
    fn poll_interval_from_the_command_line() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(poll_ms_of(&args("ocelot agent --node n --poll-ms 50")), Some(50));
        assert_eq!(poll_ms_of(&args("ocelot agent --poll-ms=20 --node n")), Some(20));
        assert_eq!(poll_ms_of(&args("ocelot agent --node n")), None);
        assert_eq!(poll_ms_of(&args("ocelot agent --poll-ms")), None);
    }

    #[test]
    fn the_earliest_attempt_with_the_new_outcome_wins() {
        let ms = Duration::from_millis;
        // Connects finish out of order: the one started at 6 ms timed out
        // after the one started at 8 ms had already failed fast.
        let a = [(ms(0), true), (ms(2), true), (ms(8), false), (ms(6), false), (ms(4), true)];
        assert_eq!(first_with(&a, false), Some(ms(6)));
        assert_eq!(first_with(&a, true), Some(ms(0)));
        assert_eq!(first_with(&a[..2], false), None);
    }

    #[test]
    fn settle_spreads_over_one_poll_period() {
        let phases: std::collections::BTreeSet<u128> =
            (0..20).map(|i| settle(i, 200).as_millis() % 200).collect();
        assert!(phases.len() >= 15, "{phases:?}");
        assert!((0..100).all(|i| settle(i, 200) < Duration::from_millis(300)));
        assert_eq!(settle(3, 0), Duration::from_millis(100));
    }
}
