//! `conn-rate`: new TCP connections per second from pod A to pod B on one
//! node, with a large ingress policy on the server pod, through Ocelot's
//! dataplane and through the kernel path with the same rules, in one run.
//!
//! The policy is `rules` allow rules: `rules - 1` that never match the
//! client (other /32 peers, varied ports) and, last, the one that allows
//! the client to the server port. Paths:
//! - `ocelot`: the rules as the server endpoint's ingress policy
//!   (`set_policies` on the dataplane API);
//! - `kernel-iptables`: the rules as one iptables chain in the node
//!   namespace (conntrack ESTABLISHED,RELATED accepted first, the server's
//!   other traffic dropped after the chain);
//! - `kernel-ipset`: the rules as one `hash:ip,port` ipset matched by one
//!   iptables rule;
//! - `ocelot-no-policy` and `kernel-no-rules`: the same topologies without
//!   any rule, as references.
//!
//! The load is a connect → close loop written here: threads in the client
//! pod's namespace connect, wait for the server to close (it accepts and
//! closes at once, so the TIME_WAIT stays on the server side and the client
//! does not run out of ports) and close.

use crate::interrupt;
use crate::report::{Better, Comparison, Report};
use crate::scenario::cni_add::percentile;
use crate::topo::{cmd, KernelSameNode, OcelotSameNode, PodPair};
use anyhow::{anyhow, bail, Context, Result};
use ocelot_dataplane::api::client::Client;
use ocelot_dataplane::api::{Cidr, EndpointPolicyUpdate, Reply, Request};
use ocelot_dataplane::policy::{EndpointPolicy, Net, PortRange, Proto, Rule};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Paths, in column order.
pub const PATHS: [&str; 5] =
    ["ocelot", "kernel-iptables", "kernel-ipset", "ocelot-no-policy", "kernel-no-rules"];

/// The iptables chain and the ipset holding the rules (in the kernel
/// path's node namespace only).
pub const CHAIN: &str = "PERF-INGRESS";
pub const IPSET: &str = "perf-ingress";

#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnRateParams {
    /// Seconds of connect/close loop per path.
    pub duration: u32,
    /// Seconds of loop before each measurement, not counted.
    pub warmup: u32,
    /// Allow rules in the policy (the last one matches the client).
    pub rules: usize,
    /// Concurrent connect loops.
    pub parallel: usize,
    /// The server's TCP port.
    pub port: u16,
    pub pool: String,
    pub node_ip: String,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
    pub dp_args: String,
}

/// One allow rule: TCP from `peer`/32 to `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Allow {
    pub peer: Ipv4Addr,
    pub port: u16,
}

/// `n` rules: `n - 1` whose peers are other /32s of 10.200.0.0/16 and up
/// (never `client`) on ports spread over 1024..=65023, then the one that
/// allows `client` to `port`.
pub fn allow_rules(n: usize, client: Ipv4Addr, port: u16) -> Vec<Allow> {
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
    let mut out = Vec::with_capacity(n);
    let mut i: u32 = 0;
    while out.len() + 1 < n {
        let peer = Ipv4Addr::from(base + 1 + i);
        // A multiplier prime to 64000 walks all ports before repeating.
        let p = 1024 + ((i as u64 * 7919) % 64000) as u16;
        i += 1;
        if peer != client {
            out.push(Allow { peer, port: p });
        }
    }
    if n > 0 {
        out.push(Allow { peer: client, port });
    }
    out
}

/// The rules as an Ocelot ingress policy.
pub fn ocelot_policy(rules: &[Allow]) -> EndpointPolicy {
    let ingress = rules
        .iter()
        .map(|r| Rule {
            peers: Some(vec![Net {
                cidr: Cidr { addr: IpAddr::V4(r.peer), len: 32 },
                except: Vec::new(),
            }]),
            ports: Some(vec![PortRange { proto: Proto::Tcp, first: r.port, last: r.port }]),
        })
        .collect();
    EndpointPolicy { ingress: Some(ingress), egress: None }
}

/// `iptables-restore` input replacing the filter table: FORWARD accepts
/// established flows, sends new ones to `server` through [`CHAIN`], which
/// holds one ACCEPT per rule and then drops.
pub fn iptables_chain(rules: &[Allow], server: Ipv4Addr) -> String {
    let mut s = iptables_head(server);
    for r in rules {
        s.push_str(&format!("-A {CHAIN} -s {}/32 -p tcp --dport {} -j ACCEPT\n", r.peer, r.port));
    }
    s.push_str(&format!("-A {CHAIN} -j DROP\nCOMMIT\n"));
    s
}

/// The same filter table, with the rules in [`IPSET`] and one rule
/// matching it.
pub fn iptables_ipset(server: Ipv4Addr) -> String {
    let mut s = iptables_head(server);
    s.push_str(&format!("-A {CHAIN} -m set --match-set {IPSET} src,dst -j ACCEPT\n"));
    s.push_str(&format!("-A {CHAIN} -j DROP\nCOMMIT\n"));
    s
}

fn iptables_head(server: Ipv4Addr) -> String {
    format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :{CHAIN} - [0:0]\n\
         -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
         -A FORWARD -d {server}/32 -j {CHAIN}\n"
    )
}

/// `ipset restore` input creating [`IPSET`] with the rules.
pub fn ipset_restore(rules: &[Allow]) -> String {
    let mut s =
        format!("create {IPSET} hash:ip,port family inet maxelem {}\n", rules.len().max(1024) * 2);
    for r in rules {
        s.push_str(&format!("add {IPSET} {},tcp:{}\n", r.peer, r.port));
    }
    s
}

/// An empty filter table (what `iptables-restore` leaves when given it).
const IPTABLES_EMPTY: &str =
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

/// Run `prog args` inside network namespace `ns` with `input` on stdin.
pub(crate) fn run_with_input(ns: &str, prog: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, prog])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {prog}"))?;
    child.stdin.take().expect("piped stdin").write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{prog} {} failed ({}): {}", args.join(" "), out.status, {
            String::from_utf8_lossy(&out.stderr).trim_end().to_string()
        });
    }
    Ok(())
}

/// The name of the dataplane endpoint holding `ip`.
fn endpoint_of(socket: &Path, ip: Ipv4Addr) -> Result<String> {
    let mut c = Client::connect(socket, "ocelot-perf")?;
    let Reply::State { endpoints, .. } = c.call(Request::State)? else {
        bail!("unexpected reply to state");
    };
    endpoints
        .into_iter()
        .find(|e| e.spec.ips.contains(&IpAddr::V4(ip)))
        .map(|e| e.spec.name)
        .ok_or_else(|| anyhow!("no dataplane endpoint has {ip}"))
}

/// An accept-and-close loop in a pod's namespace, stopped when dropped.
pub(crate) struct Server {
    netns: Arc<File>,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(netns: &Path, port: u16) -> Result<Server> {
        let netns = Arc::new(File::open(netns).with_context(|| format!("{}", netns.display()))?);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (ns, st) = (netns.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("server".into()).spawn(move || {
            let l = ocelot_control::lab::sys::setns_net(ns.as_raw_fd())
                .and_then(|()| TcpListener::bind(("0.0.0.0", port)));
            let l = match l {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !st.load(Ordering::SeqCst) {
                // Accept and close at once.
                let _ = l.accept();
            }
        })?;
        rx.recv().context("server thread died")?.context("server listen")?;
        Ok(Server { netns, port, stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept with a connect from inside the namespace.
        let (ns, port) = (self.netns.clone(), self.port);
        let waker = std::thread::spawn(move || {
            if ocelot_control::lab::sys::setns_net(ns.as_raw_fd()).is_ok() {
                let to = SocketAddr::from(([127, 0, 0, 1], port));
                let _ = TcpStream::connect_timeout(&to, Duration::from_secs(1));
            }
        });
        let _ = waker.join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one connect/close run measured.
#[derive(Debug, serde::Serialize)]
pub struct LoopResult {
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
    pub per_sec: f64,
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
}

/// `parallel` threads in namespace `netns` connect to `to` and close,
/// for `secs` seconds.
pub(crate) fn connect_loop(
    netns: &Path,
    to: SocketAddr,
    parallel: usize,
    secs: f64,
) -> Result<LoopResult> {
    let ns = Arc::new(File::open(netns)?);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..parallel.max(1) {
        let ns = ns.clone();
        threads.push(std::thread::spawn(move || -> std::io::Result<(Vec<f32>, u64)> {
            ocelot_control::lab::sys::setns_net(ns.as_raw_fd())?;
            let (mut lat, mut failed) = (Vec::new(), 0u64);
            let mut buf = [0u8; 64];
            while Instant::now() < until && !interrupt::interrupted() {
                let t = Instant::now();
                match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                    Ok(mut s) => {
                        lat.push(t.elapsed().as_secs_f32() * 1e6);
                        // The server closes first: wait for its FIN.
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let _ = s.read(&mut buf);
                    }
                    Err(_) => failed += 1,
                }
            }
            Ok((lat, failed))
        }));
    }
    let (mut lat, mut failures) = (Vec::new(), 0);
    for t in threads {
        let (l, f) = t.join().map_err(|_| anyhow!("a connect thread panicked"))??;
        lat.extend(l.into_iter().map(f64::from));
        failures += f;
    }
    interrupt::check()?;
    let seconds = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(LoopResult {
        connections: lat.len() as u64,
        failures,
        seconds,
        per_sec: lat.len() as f64 / seconds,
        connect_p50_us: percentile(&lat, 0.5),
        connect_p99_us: percentile(&lat, 0.99),
    })
}

/// Fail unless a connect from namespace `netns` to `to` times out (its
/// SYN dropped by policy) rather than being refused or established.
fn check_dropped(netns: &Path, to: SocketAddr) -> Result<()> {
    let ns = File::open(netns)?;
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            ocelot_control::lab::sys::setns_net(ns.as_raw_fd())
                .map(|()| TcpStream::connect_timeout(&to, Duration::from_millis(300)))
        })
        .join()
    })
    .map_err(|_| anyhow!("the probe thread panicked"))??;
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        Err(e) => {
            bail!("the rules are not enforced: a connect to {to} gave {e} instead of timing out")
        }
        Ok(_) => bail!("the rules are not enforced: a connect to {to} was established"),
    }
}

/// Measure one path and record it. With `rules`, first check that they
/// are in force: a connect to another port of the server must be dropped.
fn measure(
    report: &mut Report,
    p: &ConnRateParams,
    path: &str,
    pair: &dyn PodPair,
    rules: bool,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let _server = Server::start(&pair.server().path(), p.port)?;
    let to = SocketAddr::from((p.server_ip, p.port));
    let client = pair.client().path();
    if rules {
        check_dropped(&client, SocketAddr::from((p.server_ip, p.port.wrapping_add(1))))?;
    }
    record_connects(
        report,
        path,
        &client,
        to,
        (p.warmup, p.duration, p.parallel),
        "TCP connect/close rate (conn/s)",
        progress,
    )
}

/// Warm up, run the connect/close loop from `client` to `to` and record
/// its rate, connect p50/p99 and failures under `path`. `run` is
/// (warm-up s, duration s, parallel loops).
pub(crate) fn record_connects(
    report: &mut Report,
    path: &str,
    client: &Path,
    to: SocketAddr,
    run: (u32, u32, usize),
    rate_title: &str,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let (warmup, duration, parallel) = run;
    if warmup > 0 {
        connect_loop(client, to, parallel, f64::from(warmup))?;
    }
    let r = connect_loop(client, to, parallel, f64::from(duration))?;
    progress(&format!(
        "[{path}] {:.0} conn/s ({} in {:.1} s, {} failed), connect p50 {:.1} us, p99 {:.1} us",
        r.per_sec, r.connections, r.seconds, r.failures, r.connect_p50_us, r.connect_p99_us
    ));
    if r.connections == 0 {
        bail!("no connection succeeded ({} failed)", r.failures);
    }
    report.add("conn_per_s", rate_title, "conn/s", Better::Higher, 0, path, r.per_sec);
    report.add(
        "connect_p50_us",
        "TCP connect p50 (us)",
        "us",
        Better::Lower,
        1,
        path,
        r.connect_p50_us,
    );
    report.add(
        "connect_p99_us",
        "TCP connect p99 (us)",
        "us",
        Better::Lower,
        1,
        path,
        r.connect_p99_us,
    );
    report.add(
        "connect_failed",
        "connects failed (1 s timeout)",
        "",
        Better::Lower,
        0,
        path,
        r.failures as f64,
    );
    report.detail(path, "conn_rate", &r);
    Ok(())
}

/// Measure a path, or record its failure and go on (interrupts stop).
pub(crate) fn attempt(
    report: &mut Report,
    path: &str,
    progress: &dyn Fn(&str),
    f: impl FnOnce(&mut Report) -> Result<()>,
) -> Result<()> {
    interrupt::check()?;
    if let Err(e) = f(report) {
        interrupt::check()?;
        let reason = format!("{e:#}");
        progress(&crate::report::failure_line(path, &reason));
        report.fail(path, &reason);
    }
    Ok(())
}

pub(crate) fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub fn run(p: &ConnRateParams, progress: &dyn Fn(&str)) -> Result<Report> {
    let t0 = Instant::now();
    let mut report = Report::with_comparisons(
        "conn-rate",
        &format!(
            "TCP connect/close loop, pod {} -> pod {}:{} on one node, {} ingress rules on the \
             server (the last one allows the client); ocelot = user-space dataplane policy, \
             kernel-iptables = one iptables chain, kernel-ipset = one hash:ip,port ipset",
            p.client_ip, p.server_ip, p.port, p.rules
        ),
        &PATHS,
        vec![
            Comparison::new("ocelot", "kernel-iptables"),
            Comparison::new("ocelot", "kernel-ipset"),
            Comparison::new("ocelot-no-policy", "kernel-no-rules"),
        ],
    );
    report.params = serde_json::to_value(p)?;
    let rules = allow_rules(p.rules, p.client_ip, p.port);
    let (cip, sip) = (p.client_ip.to_string(), p.server_ip.to_string());

    progress("setting up the ocelot node and pods...");
    let ocelot = OcelotSameNode::start(&p.node_ip, &p.pool, &cip, &sip, &p.dp_args);
    interrupt::check()?;
    progress("setting up the kernel (Calico-style) node and pods...");
    let kernel = KernelSameNode::start(&p.node_ip, &cip, &sip);
    interrupt::check()?;
    for pair in [&ocelot as &dyn PodPair, &kernel] {
        pair.check_connectivity()?;
        // Room for many connections from one address.
        cmd(&format!(
            "ip netns exec {} sysctl -qw net.ipv4.ip_local_port_range='1024 65535'",
            pair.client().name
        ))?;
    }

    attempt(&mut report, "ocelot-no-policy", progress, |r| {
        measure(r, p, "ocelot-no-policy", &ocelot, false, progress)
    })?;
    attempt(&mut report, "kernel-no-rules", progress, |r| {
        measure(r, p, "kernel-no-rules", &kernel, false, progress)
    })?;

    attempt(&mut report, "ocelot", progress, |r| {
        let socket = ocelot.node.socket();
        let endpoint = endpoint_of(&socket, p.server_ip)?;
        let t = Instant::now();
        let mut c = Client::connect(&socket, "ocelot-perf")?;
        c.call(Request::SetPolicies {
            policies: vec![EndpointPolicyUpdate { endpoint, policy: ocelot_policy(&rules) }],
        })
        .context("set_policies")?;
        let load = ms_since(t);
        progress(&format!("[ocelot] {} rules set in {load:.0} ms", rules.len()));
        r.add("rules_load_ms", "loading the rules (ms)", "ms", Better::Lower, 0, "ocelot", load);
        measure(r, p, "ocelot", &ocelot, true, progress)
    })?;

    let node = kernel.node.name.clone();
    attempt(&mut report, "kernel-iptables", progress, |r| {
        let t = Instant::now();
        run_with_input(&node, "iptables-restore", &[], &iptables_chain(&rules, p.server_ip))?;
        let load = ms_since(t);
        progress(&format!("[kernel-iptables] {} rules loaded in {load:.0} ms", rules.len()));
        r.add(
            "rules_load_ms",
            "loading the rules (ms)",
            "ms",
            Better::Lower,
            0,
            "kernel-iptables",
            load,
        );
        measure(r, p, "kernel-iptables", &kernel, true, progress)
    })?;
    // Back to an empty table, whatever happened.
    let cleared = run_with_input(&node, "iptables-restore", &[], IPTABLES_EMPTY);

    attempt(&mut report, "kernel-ipset", progress, |r| {
        cleared?;
        let t = Instant::now();
        run_with_input(&node, "ipset", &["restore"], &ipset_restore(&rules))?;
        run_with_input(&node, "iptables-restore", &[], &iptables_ipset(p.server_ip))?;
        let load = ms_since(t);
        progress(&format!("[kernel-ipset] {} entries loaded in {load:.0} ms", rules.len()));
        r.add(
            "rules_load_ms",
            "loading the rules (ms)",
            "ms",
            Better::Lower,
            0,
            "kernel-ipset",
            load,
        );
        measure(r, p, "kernel-ipset", &kernel, true, progress)
    })?;
    // The namespace's deletion takes the rules and the set with it.

    if let Ok(d) =
        (crate::scenario::Dataplane { pid: ocelot.node.proc.pid(), socket: ocelot.node.socket() })
            .drops()
    {
        report.detail("ocelot", "dataplane_drops_total", d);
    }
    report.notes.push(format!(
        "{} connect loop(s); the server accepts and closes at once, the client waits for its \
         FIN and closes; the loops share the machine's cores with the dataplane",
        p.parallel
    ));
    report.duration_s = t0.elapsed().as_secs_f64();
    progress("cleaning up...");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 3);

    #[test]
    fn only_the_last_rule_allows_the_client() {
        let r = allow_rules(10_000, CLIENT, 80);
        assert_eq!(r.len(), 10_000);
        assert_eq!(r.last(), Some(&Allow { peer: CLIENT, port: 80 }));
        assert!(r[..9_999].iter().all(|a| a.peer != CLIENT));
        assert_eq!(r.iter().collect::<HashSet<_>>().len(), 10_000, "no duplicates");
        let ports: HashSet<u16> = r.iter().map(|a| a.port).collect();
        assert!(ports.len() > 9_000, "ports vary: {}", ports.len());
        // The policy as the dataplane reads it: only the last rule allows.
        let pol = ocelot_policy(&r);
        let rules = pol.ingress.expect("ingress isolated");
        assert_eq!(rules.len(), 10_000);
        let allowing: Vec<usize> =
            (0..rules.len()).filter(|&i| rules[i].allows(CLIENT, Some(Proto::Tcp), 80)).collect();
        assert_eq!(allowing, [9_999]);
        assert!(!rules.iter().any(|x| x.allows(CLIENT, Some(Proto::Tcp), 81)));
    }

    #[test]
    fn client_inside_the_generated_range_is_skipped() {
        let client = Ipv4Addr::new(10, 200, 0, 3);
        let r = allow_rules(5, client, 8080);
        assert_eq!(r.len(), 5);
        assert!(r[..4].iter().all(|a| a.peer != client));
        assert_eq!(r[4], Allow { peer: client, port: 8080 });
        assert_eq!(allow_rules(1, client, 1), [Allow { peer: client, port: 1 }]);
        assert!(allow_rules(0, client, 1).is_empty());
    }

    #[test]
    fn iptables_chain_text() {
        let r = allow_rules(3, CLIENT, 80);
        let t = iptables_chain(&r, SERVER);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert!(lines.contains(&":PERF-INGRESS - [0:0]"));
        let fwd: Vec<&&str> = lines.iter().filter(|l| l.starts_with("-A FORWARD")).collect();
        assert_eq!(
            fwd,
            [
                &"-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                &"-A FORWARD -d 10.66.0.3/32 -j PERF-INGRESS"
            ]
        );
        let chain: Vec<&&str> = lines.iter().filter(|l| l.starts_with("-A PERF-INGRESS")).collect();
        assert_eq!(chain.len(), 4);
        assert_eq!(*chain[0], "-A PERF-INGRESS -s 10.200.0.1/32 -p tcp --dport 1024 -j ACCEPT");
        assert_eq!(*chain[2], "-A PERF-INGRESS -s 10.66.0.2/32 -p tcp --dport 80 -j ACCEPT");
        assert_eq!(*chain[3], "-A PERF-INGRESS -j DROP");
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn ipset_text() {
        let r = allow_rules(2, CLIENT, 80);
        assert_eq!(
            ipset_restore(&r),
            "create perf-ingress hash:ip,port family inet maxelem 2048\n\
             add perf-ingress 10.200.0.1,tcp:1024\nadd perf-ingress 10.66.0.2,tcp:80\n"
        );
        let t = iptables_ipset(SERVER);
        assert!(t.contains("-A PERF-INGRESS -m set --match-set perf-ingress src,dst -j ACCEPT\n"));
        assert!(t.ends_with("-A PERF-INGRESS -j DROP\nCOMMIT\n"));
    }
}
