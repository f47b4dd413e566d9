//! `ocelot`: the node agent, and the lab.

use clap::{Parser, Subcommand};
use ocelot_control::{agent, lab, ops};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ocelot",
    version,
    about = "Ocelot: a Kubernetes network plugin with a user-space dataplane."
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter
    /// (`info,ocelot_control::agent=debug`). Default: $RUST_LOG, else info.
    #[arg(long, global = true, env = "OCELOT_LOG")]
    log_level: Option<String>,
    /// Log line format: `text` for people, `json` (one object per line)
    /// for log collectors.
    #[arg(long, global = true, env = "OCELOT_LOG_FORMAT", value_enum, default_value_t = ops::logging::LogFormat::Text)]
    log_format: ops::logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: IPAM, the CNI server, and the dataplane's programming.
    Agent(agent::AgentArgs),
    /// A cluster of nodes and pods in network namespaces, no Kubernetes needed.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// The cluster role (one Deployment, leader-elected through a Lease):
    /// IPAM garbage collection of deleted Pods' addresses and deleted
    /// Nodes' blocks, never a live pod's.
    Controller(ocelot_control::k8s::controller::ControllerArgs),
    /// Print Ocelot's CustomResourceDefinitions (IPPool, IPAMBlock,
    /// BlockAffinity) as YAML: `ocelot crds | kubectl apply -f -`.
    Crds,
    /// Install the CNI plugin and its network configuration on this node
    /// (the DaemonSet's init container): atomic, and a no-op when done.
    InstallCni(ops::install::InstallCniArgs),
    /// This node's state: agent readiness, peers and tunnels, pools, blocks,
    /// routes, endpoints, policy, dataplane health and drops.
    Status(ops::status::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ops::logging::init(cli.log_level.as_deref(), cli.log_format);
    let r = match cli.cmd {
        Cmd::Agent(a) => agent::run(a),
        Cmd::Lab(c) => lab::run(c),
        Cmd::Controller(a) => ocelot_control::k8s::controller::run(a),
        Cmd::Crds => ocelot_control::k8s::crd::all_yaml()
            .map(|y| print!("{y}"))
            .map_err(|e| anyhow::anyhow!("cannot render the CRDs: {e}")),
        Cmd::InstallCni(a) => ops::install::run(a),
        Cmd::Status(a) => match ops::status::run(a) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocelot: {e:#}");
            ExitCode::FAILURE
        }
    }
}
