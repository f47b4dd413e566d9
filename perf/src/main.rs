//! `ocelot-perf`: measure Ocelot against the kernel path in one run.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use ocelot_perf::scenario::cross_node::{self, PathId};
use ocelot_perf::scenario::{self, same_node, SuiteParams, Test};
use ocelot_perf::{interrupt, tools};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ocelot-perf",
    version,
    about = "Measure pod-to-pod performance through Ocelot's user-space dataplane and through \
             the kernel path Calico programs, in the same run, and print the ratios.",
    long_about = None,
    after_help = "\
Needs root (it creates network namespaces), iperf3, sockperf, iproute2 and ping
(`apt-get install -y iperf3 sockperf iproute2 iputils-ping`), and the dataplane
binary next to this one (`cargo build --release -p ocelot-dataplane -p ocelot-perf`)
or in $OCELOT_BIN_DIR; cross-node's ocelot paths also need `ocelot` and
`ocelot-cni` there. Everything it creates is removed at the end, also on
failure or Ctrl-C. Progress goes to stderr; the table (or --json) to stdout.

Example:
  target/release/ocelot-perf same-node
  target/release/ocelot-perf --json same-node --duration 10 --streams 1,2 > same-node.json
  target/release/ocelot-perf cross-node --paths kernel"
)]
struct Cli {
    /// Print the report as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Two pods on one node: pod A -> pod B through the Ocelot dataplane
    /// (TAP eth0) vs through the kernel as Calico programs it (veth, proxy
    /// ARP, /32 routes). Metrics: TCP throughput, UDP small-packet rate and
    /// loss, TCP round-trip latency p50/p99 (sockperf), and the dataplane's
    /// CPU (idle and under load) and memory.
    SameNode(SameNodeArgs),
    /// A pod on node 1 to a pod on node 2, across an underlay: Ocelot's
    /// overlay (`ocelot lab`, pool in vxlanMode / ipipMode Always) vs the
    /// kernel as Calico programs it (vxlan.calico, tunl0), in one run,
    /// ratios per encapsulation. Metrics: TCP throughput with 1 and 4
    /// streams, UDP small-packet rate, TCP round trip p50/p99 (sockperf),
    /// the dataplanes' CPU. A path that fails is reported
    /// (`<path>: failed: <reason>`) and the others are measured anyway.
    CrossNode(CrossNodeArgs),
    /// Pod attach latency: CNI ADD and DEL from exec to result, p50/p99
    /// over many pods, through ocelot-cni (agent + dataplane) and through
    /// the standard ptp + host-local plugins; IPAM allocations per second.
    /// NetworkPolicy update latency in `ocelot lab` (2 nodes): from
    /// `ocelot lab apply -f` (a policy denying all ingress to the server
    /// pod's namespace) returning until the client pod's TCP connects to
    /// the server pod fail, and from `ocelot lab delete -f` returning until
    /// they succeed again; p50, p99 and max over --rounds.
    PolicyUpdate(PolicyUpdateArgs),
    /// New TCP connections per second (a connect/close loop) from pod A to
    /// pod B on one node, with a large ingress policy on pod B: Ocelot's
    /// dataplane policy vs the same rules as one iptables chain and as an
    /// ipset, plus both paths without rules; connect p50/p99 and the ratios.
    /// A path that fails is reported and the others are measured anyway.
    ConnRate(ConnRateArgs),
    /// New TCP connections per second and connect latency from a pod to a
    /// ClusterIP with N Services installed (--counts, default 10 and
    /// 5000), through Ocelot's dataplane and through the iptables rules
    /// kube-proxy writes (KUBE-SERVICES -> KUBE-SVC statistic -> KUBE-SEP
    /// DNAT), in one run, with the ratios.
    Services(ServicesArgs),
    CniAdd {
        /// Pods to attach.
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// Where the standard CNI plugins are (Debian: /usr/lib/cni).
        #[arg(long, default_value = "/usr/lib/cni")]
        cni_dir: String,
    },
}

/// Parameters every scenario takes.
#[derive(Args)]
struct SuiteArgs {
    /// Seconds measured per test and path (iperf3 -t, sockperf -t).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    duration: u32,
    /// Seconds at the start of each iperf3 run left out of the result
    /// (iperf3 -O): TCP slow start, first ARP.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Parallel TCP streams (iperf3 -P), comma-separated: one TCP run per
    /// entry [default: 1 for same-node, 1,4 for cross-node].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=128))]
    streams: Option<Vec<u32>>,
    /// UDP payload size in bytes for the packet-rate test (iperf3 -l).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=1472))]
    udp_len: u32,
    /// Seconds over which the idle dataplane's CPU use is measured.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=600))]
    idle_secs: u32,
    /// Tests to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tcp,udp,rtt,idle")]
    tests: Vec<Test>,
    /// TCP port of the iperf3 servers.
    #[arg(long, default_value_t = 5201)]
    iperf_port: u16,
    /// TCP port of the sockperf servers.
    #[arg(long, default_value_t = 11111)]
    sockperf_port: u16,
}

#[derive(Args)]
struct SameNodeArgs {
    #[command(flatten)]
    suite: SuiteArgs,
    /// IP pool routed to the Ocelot dataplane.
    #[arg(long, default_value = "10.66.0.0/16")]
    pool: String,
    /// The node's own address (on lo for Ocelot, on a stub uplink for the kernel path).
    #[arg(long, default_value = "192.0.2.10")]
    node_ip: String,
    /// Address of pod A, the client.
    #[arg(long, default_value = "10.66.0.2")]
    client_ip: String,
    /// Address of pod B, the server.
    #[arg(long, default_value = "10.66.0.3")]
    server_ip: String,
    /// Extra flags for `ocelot-dataplane run`, e.g. "--cores 1" or "--busy-poll"
    /// (with --busy-poll the idle CPU is a whole core by design).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    dp_args: String,
}

#[derive(Args)]
struct CrossNodeArgs {
    #[command(flatten)]
    suite: SuiteArgs,
    /// Paths to measure, comma-separated: ocelot-vxlan, kernel-vxlan,
    /// ocelot-ipip, kernel-ipip, or groups of them: all, kernel, ocelot,
    /// vxlan, ipip. Columns keep that order whatever the order given.
    #[arg(long, default_value = "all", value_parser = parse_path_set)]
    paths: PathSet,
    /// IP pool: the lab's IPPool, and where the kernel paths take their
    /// blocks (node 1 the first, node 2 the second).
    #[arg(long, default_value = "10.65.0.0/16")]
    pool: String,
    /// Block size of the pool (prefix length of each node's block).
    #[arg(long, default_value_t = 26, value_parser = clap::value_parser!(u8).range(1..=30))]
    block_size: u8,
    /// Underlay subnet of the kernel paths (nodes get .11 and .12, as in
    /// the lab's default fabric).
    #[arg(long, default_value = "192.0.2.0/24")]
    underlay: String,
}

#[derive(Args)]
struct PolicyUpdateArgs {
    /// Apply/delete rounds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rounds: u64,
    /// TCP port the server pod serves and the client connects to.
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// Milliseconds between the starts of two probe connects (the resolution).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1000))]
    interval_ms: u64,
    /// A probe connect not established within this many milliseconds counts as denied.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connect_timeout_ms: u64,
    /// Fail when a direction has not taken effect within this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    give_up_ms: u64,
    /// The lab's IP pool (VXLAN).
    #[arg(long, default_value = "10.65.0.0/16")]
    pool: String,
    /// Block size of the pool.
    #[arg(long, default_value_t = 26, value_parser = clap::value_parser!(u8).range(1..=30))]
    block_size: u8,
}

#[derive(Args)]
struct ConnRateArgs {
    /// Seconds of connect/close loop per path.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    duration: u32,
    /// Seconds of loop before each measurement, not counted.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Allow rules on the server pod (the last one allows the client).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rules: u64,
    /// Concurrent connect/close loops in the client pod.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
    /// TCP port of the server.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// IP pool routed to the Ocelot dataplane.
    #[arg(long, default_value = "10.66.0.0/16")]
    pool: String,
    /// The node's own address.
    #[arg(long, default_value = "192.0.2.10")]
    node_ip: String,
    /// Address of pod A, the client.
    #[arg(long, default_value = "10.66.0.2")]
    client_ip: std::net::Ipv4Addr,
    /// Address of pod B, the server.
    #[arg(long, default_value = "10.66.0.3")]
    server_ip: std::net::Ipv4Addr,
    /// Extra flags for `ocelot-dataplane run`.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    dp_args: String,
}

#[derive(Args)]
struct ServicesArgs {
    /// Numbers of Services, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "10,5000")]
    counts: Vec<usize>,
    /// Seconds of connect/close loop per path.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    duration: u32,
    /// Seconds of loop before each measurement, not counted.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Concurrent connect/close loops in the client pod.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
    /// The server pod's first TCP port (it serves the next one too).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// IP pool routed to the Ocelot dataplane.
    #[arg(long, default_value = "10.66.0.0/16")]
    pool: String,
    /// The node's own address.
    #[arg(long, default_value = "192.0.2.10")]
    node_ip: String,
    /// Address of the client pod.
    #[arg(long, default_value = "10.66.0.2")]
    client_ip: std::net::Ipv4Addr,
    /// Address of the server pod.
    #[arg(long, default_value = "10.66.0.3")]
    server_ip: std::net::Ipv4Addr,
    /// Extra flags for `ocelot-dataplane run`.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    dp_args: String,
}

/// The paths of `--paths`, in column order.
#[derive(Clone, Debug)]
struct PathSet(Vec<PathId>);

fn parse_path_set(s: &str) -> Result<PathSet, String> {
    cross_node::parse_paths(s).map(PathSet)
}

impl SuiteArgs {
    /// The suite's parameters; `streams` when --streams is not given.
    fn params(&self, streams: &[u32]) -> SuiteParams {
        SuiteParams {
            duration: self.duration,
            warmup: self.warmup,
            streams: self.streams.clone().unwrap_or_else(|| streams.to_vec()),
            udp_len: self.udp_len,
            idle_secs: self.idle_secs,
            tests: self.tests.clone(),
            iperf_port: self.iperf_port,
            sockperf_port: self.sockperf_port,
        }
    }
}

/// Root and the tools; the directory of the binaries, handed to
/// `ocelot-tests` through OCELOT_BIN_DIR.
fn preflight(tools_needed: &[&str]) -> Result<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root: it creates network namespaces, veth and TAP devices");
    }
    tools::check_installed(tools_needed)?;
    Ok(match std::env::var_os("OCELOT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
            // Single-threaded here: nothing else reads the environment yet.
            std::env::set_var("OCELOT_BIN_DIR", &dir);
            dir
        }
    })
}

/// The dataplane binary, which same-node and cni-add cannot do without.
fn need_dataplane(dir: &std::path::Path) -> Result<()> {
    let dp = dir.join("ocelot-dataplane");
    if !dp.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p ocelot-dataplane` \
             (or point OCELOT_BIN_DIR at the directory holding it)",
            dp.display()
        );
    }
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    const TOOLS: [&str; 5] = ["ip", "ss", "ping", "iperf3", "sockperf"];
    let bin_dir = match &cli.cmd {
        Cmd::CrossNode(_) => preflight(&[&TOOLS[..], &["bridge"]].concat())?,
        Cmd::PolicyUpdate(_) => preflight(&["ip", "bridge"])?,
        Cmd::ConnRate(_) | Cmd::Services(_) => {
            // ipset is checked when its path runs: missing, that path fails.
            let d = preflight(&["ip", "ping", "iptables-restore"])?;
            need_dataplane(&d)?;
            d
        }
        _ => {
            let d = preflight(&TOOLS)?;
            need_dataplane(&d)?;
            d
        }
    };
    let quiet = cli.quiet;
    let progress = move |s: &str| {
        if !quiet {
            eprintln!("ocelot-perf: {s}");
        }
    };
    let report = match &cli.cmd {
        Cmd::SameNode(a) => {
            let p = same_node::SameNodeParams {
                pool: a.pool.clone(),
                node_ip: a.node_ip.clone(),
                client_ip: a.client_ip.clone(),
                server_ip: a.server_ip.clone(),
                dp_args: a.dp_args.clone(),
            };
            scenario::same_node::run(&a.suite.params(&[1]), &p, &progress)?
        }
        Cmd::CrossNode(a) => {
            let p = cross_node::CrossNodeParams {
                paths: a.paths.0.clone(),
                pool: a.pool.clone(),
                block_size: a.block_size,
                underlay: a.underlay.clone(),
                bin_dir,
            };
            cross_node::run(&a.suite.params(&[1, 4]), &p, &progress)?
        }
        Cmd::PolicyUpdate(a) => scenario::policy_update::run(
            &scenario::policy_update::PolicyUpdateParams {
                rounds: a.rounds as usize,
                port: a.port,
                interval_ms: a.interval_ms,
                connect_timeout_ms: a.connect_timeout_ms,
                give_up_ms: a.give_up_ms,
                pool: a.pool.clone(),
                block_size: a.block_size,
                bin_dir,
            },
            &progress,
        )?,
        Cmd::Services(a) => scenario::services::run(
            &scenario::services::ServicesParams {
                counts: a.counts.clone(),
                duration: a.duration,
                warmup: a.warmup,
                parallel: a.parallel as usize,
                port: a.port,
                pool: a.pool.clone(),
                node_ip: a.node_ip.clone(),
                client_ip: a.client_ip,
                server_ip: a.server_ip,
                dp_args: a.dp_args.clone(),
            },
            &progress,
        )?,
        Cmd::ConnRate(a) => scenario::conn_rate::run(
            &scenario::conn_rate::ConnRateParams {
                duration: a.duration,
                warmup: a.warmup,
                rules: a.rules as usize,
                parallel: a.parallel as usize,
                port: a.port,
                pool: a.pool.clone(),
                node_ip: a.node_ip.clone(),
                client_ip: a.client_ip,
                server_ip: a.server_ip,
                dp_args: a.dp_args.clone(),
            },
            &progress,
        )?,
        Cmd::CniAdd { pods, cni_dir } => scenario::cni_add::run(
            &scenario::cni_add::CniAddParams { pods: *pods, cni_dir: cni_dir.clone() },
            &progress,
        )?,
    };
    if cli.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    interrupt::install();
    // The namespace toolkit panics on failure; report that like any error.
    // The guards run while the panic unwinds, before we get here.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        let at =
            info.location().map(|l| format!(" ({}:{})", l.file(), l.line())).unwrap_or_default();
        eprintln!("ocelot-perf: error: {msg}{at}");
    }));
    match std::panic::catch_unwind(|| run(&cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("ocelot-perf: error: {e:#}");
            eprintln!("ocelot-perf: everything it created was removed");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("ocelot-perf: everything it created was removed");
            ExitCode::FAILURE
        }
    }
}
