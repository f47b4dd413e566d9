//! `ocelot-dataplane`: the user-space dataplane process and its small CLI.

use clap::{Args, Parser, Subcommand, ValueEnum};
use ocelot_dataplane::api::client::Client;
use ocelot_dataplane::api::{Cidr, EndpointSpec, Reply, Request};
use ocelot_dataplane::engine::{Engine, EngineConfig};
use ocelot_dataplane::sys::netlink;
use ocelot_dataplane::wire::MacAddr;
use ocelot_dataplane::worker::WorkerConfig;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

const DEFAULT_SOCKET: &str = "/run/ocelot/dataplane.sock";

#[derive(Parser)]
#[command(
    name = "ocelot-dataplane",
    version,
    about = "Ocelot's user-space dataplane: owns the pods' TAP interfaces and forwards their packets on pinned poll-mode workers."
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, global = true, default_value = "info", env = "OCELOT_LOG")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the dataplane in the foreground.
    Run(RunArgs),
    /// Print the counters: per port and per worker, drops by reason.
    Stats(ClientArgs),
    /// Print the endpoints, pools and table version.
    State(ClientArgs),
    /// Add or remove pod endpoints by hand (the agent does this in a cluster).
    #[command(subcommand)]
    Endpoint(EndpointCmd),
}

#[derive(Args)]
struct RunArgs {
    /// Cores to run workers on, one pinned worker per core, e.g. `1,2`.
    /// Without it, one unpinned worker.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Spin on the ports instead of sleeping in epoll: lowest latency, but
    /// each worker uses a whole core even when idle.
    #[arg(long)]
    busy_poll: bool,
    /// Frames per batch, and the most a worker takes from one port before
    /// moving to the next (the fairness budget). 64 lets receive coalescing
    /// rebuild a whole 64 KiB TCP frame from a tunnel's ~45 segments.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=256))]
    batch: u16,
    /// Path of the control socket (created root-only).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Directory for the persisted state that lets a restart re-attach to
    /// the pods' interfaces.
    #[arg(long, default_value = "/run/ocelot")]
    state_dir: PathBuf,
    /// Name of the host interface (a TAP in this namespace) through which
    /// the node reaches pods and pods reach everything else. `none` disables it.
    #[arg(long, default_value = "ocelot0")]
    host_iface: String,
    /// MTU of the host interface.
    #[arg(long, default_value_t = 1500)]
    host_mtu: u32,
    /// The MAC pods see as their gateway's (169.254.1.1).
    #[arg(long, default_value = "ee:ee:ee:ee:ee:ee")]
    gateway_mac: MacAddr,
    /// IP pool CIDRs: routed from the host into the dataplane; addresses in
    /// them without a local endpoint are dropped as `no_route`.
    #[arg(long = "pool")]
    pools: Vec<Cidr>,
}

#[derive(Args)]
struct ClientArgs {
    /// Path of the control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Create a pod interface: a TAP moved into NETNS as IFNAME.
    Add {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Endpoint key, also the TAP's name before it moves (max 15 chars).
        #[arg(long)]
        name: String,
        /// Path of the pod's network namespace.
        #[arg(long)]
        netns: PathBuf,
        /// Interface name inside the pod.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// The pod's IP address (repeat for several).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// The pod interface's MAC (derived from the name by default).
        #[arg(long)]
        mac: Option<MacAddr>,
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Also give the pod its addresses and the routes via 169.254.1.1
        /// (what the CNI plugin does in a cluster).
        #[arg(long)]
        configure: bool,
    },
    /// Remove an endpoint and its interface.
    Remove {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ocelot_dataplane::logging::init(&cli.log_level);
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Stats(a) => stats(a),
        Cmd::State(a) => state(a),
        Cmd::Endpoint(e) => endpoint(e),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocelot-dataplane: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn run(a: RunArgs) -> Res {
    // Block SIGINT/SIGTERM before any thread starts, so every thread
    // inherits the mask and only `wait_for_signal` receives them.
    let set = ocelot_dataplane::sys::signals::block_termination();
    let workers: Vec<WorkerConfig> = if a.cores.is_empty() {
        vec![WorkerConfig { core: None, busy_poll: a.busy_poll, batch: usize::from(a.batch) }]
    } else {
        let online = ocelot_dataplane::sys::affinity::online_cores();
        if let Some(c) = a.cores.iter().find(|c| **c >= online) {
            return Err(
                format!("--cores: core {c} does not exist (this machine has {online})").into()
            );
        }
        a.cores
            .iter()
            .map(|c| WorkerConfig {
                core: Some(*c),
                busy_poll: a.busy_poll,
                batch: usize::from(a.batch),
            })
            .collect()
    };
    let host_iface = (a.host_iface != "none").then_some(a.host_iface);
    let engine = Engine::start(EngineConfig {
        workers,
        state_dir: a.state_dir,
        host_iface,
        host_mtu: a.host_mtu,
        gateway_mac: a.gateway_mac,
        pools: a.pools,
    })?;
    let engine = Arc::new(Mutex::new(engine));
    ocelot_dataplane::api::server::serve(&a.socket, engine.clone())?;
    // Exit cleanly on SIGTERM/SIGINT; the pods' TAPs persist either way.
    ocelot_dataplane::sys::signals::wait(&set);
    tracing::info!("stopping; pod interfaces stay for the next start");
    engine.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    Ok(())
}

fn client(socket: &std::path::Path) -> Result<Client, Box<dyn std::error::Error>> {
    Ok(Client::connect(socket, "ocelot-dataplane-cli")?)
}

fn stats(a: ClientArgs) -> Res {
    let reply = client(&a.socket)?.call(Request::Counters)?;
    if a.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let Reply::Counters { ports, workers, drop_reasons } = reply else {
        return Err("unexpected reply".into());
    };
    println!(
        "{:<5} {:<16} {:<6} {:>12} {:>14} {:>12} {:>14}  drops",
        "PORT", "NAME", "KIND", "RX_PKTS", "RX_BYTES", "TX_PKTS", "TX_BYTES"
    );
    for p in &ports {
        let c = &p.counters;
        let kind = match p.kind {
            ocelot_dataplane::tables::PortKind::Pod => "pod",
            ocelot_dataplane::tables::PortKind::Host => "host",
            ocelot_dataplane::tables::PortKind::Tunnel(e) => match e {
                ocelot_dataplane::tables::Encap::Vxlan => "vxlan",
                ocelot_dataplane::tables::Encap::Ipip => "ipip",
                ocelot_dataplane::tables::Encap::Native => "native",
            },
            ocelot_dataplane::tables::PortKind::Uplink => "uplink",
        };
        println!(
            "{:<5} {:<16} {:<6} {:>12} {:>14} {:>12} {:>14}  {}",
            p.port,
            p.name,
            kind,
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            fmt_drops(&c.drops)
        );
    }
    println!();
    println!(
        "{:<7} {:<5} {:<6} {:>12} {:>12} {:>10} {:>10} {:>10}  drops",
        "WORKER", "CORE", "PORTS", "RX_PKTS", "TX_PKTS", "HANDOFF_IN", "BATCHES", "GRO_MERGED"
    );
    for w in &workers {
        let core = w.core.map_or("-".to_string(), |c| c.to_string());
        println!(
            "{:<7} {:<5} {:<6} {:>12} {:>12} {:>10} {:>10} {:>10}  {}",
            w.worker,
            core,
            w.ports,
            w.counters.rx_packets,
            w.counters.tx_packets,
            w.handoff_in,
            w.batches,
            w.gro_merged,
            fmt_drops(&w.counters.drops)
        );
    }
    let seen: std::collections::BTreeSet<&String> = ports
        .iter()
        .flat_map(|p| p.counters.drops.keys())
        .chain(workers.iter().flat_map(|w| w.counters.drops.keys()))
        .collect();
    if !seen.is_empty() {
        println!("\ndrop reasons:");
        for (name, desc) in drop_reasons.iter().filter(|(n, _)| seen.contains(n)) {
            println!("  {name:<22} {desc}");
        }
    }
    Ok(())
}

fn fmt_drops(d: &std::collections::BTreeMap<String, u64>) -> String {
    if d.is_empty() {
        return "-".into();
    }
    d.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

fn state(a: ClientArgs) -> Res {
    let reply = client(&a.socket)?.call(Request::State)?;
    if a.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let Reply::State { tables_version, endpoints, pools, host_iface, overlay, services } = reply
    else {
        return Err("unexpected reply".into());
    };
    println!(
        "tables version {tables_version}; host interface {}; pools {}",
        host_iface.as_deref().unwrap_or("none"),
        pools.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    );
    println!("{:<16} {:<5} {:<7} {:<18} {:<20} NETNS", "ENDPOINT", "PORT", "WORKER", "MAC", "IPS");
    for e in endpoints {
        let ips = e.spec.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        println!(
            "{:<16} {:<5} {:<7} {:<18} {:<20} {}",
            e.spec.name,
            e.port,
            e.worker,
            e.mac.to_string(),
            ips,
            e.spec.netns.display()
        );
    }
    if services.services > 0 || services.nat_addr.is_some() {
        println!(
            "services: {} ports, {} frontends, {} backends, tables {} KiB; natOutgoing to {}; steering: {}",
            services.services,
            services.frontends,
            services.backends,
            services.table_bytes / 1024,
            services.nat_addr.map_or("none".to_string(), |a| a.to_string()),
            services.steering
        );
    }
    if let Some(o) = overlay {
        println!(
            "\noverlay: local {} on {} (/{}), VTEP {}, VNI {}, port {}; MTU uplink {}, VXLAN {}, IPIP {}",
            o.spec.local_ip,
            o.uplink,
            o.uplink_prefix,
            o.spec.vtep_mac,
            o.spec.vni,
            o.spec.vxlan_port,
            o.uplink_mtu,
            o.vxlan_mtu,
            o.ipip_mtu
        );
        println!("uplink mode: {} (asked: {})", o.uplink_mode, o.spec.uplink_mode);
        println!("{:<16} {:<16} {:<18}", "NODE", "ADDRESS", "VTEP MAC");
        for n in &o.spec.nodes {
            println!("{:<16} {:<16} {:<18}", n.name, n.ip.to_string(), n.vtep_mac.to_string());
        }
        println!("{:<20} {:<16} ENCAP", "ROUTE", "NODE");
        for r in &o.spec.routes {
            println!("{:<20} {:<16} {:?}", r.cidr.to_string(), r.node, r.encap);
        }
    }
    Ok(())
}

fn endpoint(cmd: EndpointCmd) -> Res {
    match cmd {
        EndpointCmd::Add { socket, name, netns, ifname, ips, mac, mtu, configure } => {
            let spec = EndpointSpec {
                name,
                netns: netns.clone(),
                ifname: ifname.clone(),
                mac,
                ips: ips.clone(),
                mtu,
            };
            let reply = client(&socket)?.call(Request::AddEndpoint { endpoint: spec })?;
            if configure {
                netlink::apply(Some(&netns), netlink::pod_addressing(&ifname, &ips))?;
            }
            println!("{}", serde_json::to_string(&reply)?);
        }
        EndpointCmd::Remove { socket, name } => {
            let reply = client(&socket)?.call(Request::RemoveEndpoint { name })?;
            println!("{}", serde_json::to_string(&reply)?);
        }
    }
    Ok(())
}
