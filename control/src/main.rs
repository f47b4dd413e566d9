//! `ocelot`: the node agent, and the lab.

use clap::{Parser, Subcommand};
use ocelot_control::{agent, lab};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ocelot",
    version,
    about = "Ocelot: a Kubernetes network plugin with a user-space dataplane."
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
    /// Run the node agent: IPAM, the CNI server, and the dataplane's programming.
    Agent(agent::AgentArgs),
    /// A cluster of nodes and pods in network namespaces, no Kubernetes needed.
    #[command(subcommand)]
    Lab(lab::LabCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ocelot_dataplane::logging::init(&cli.log_level);
    let r = match cli.cmd {
        Cmd::Agent(a) => agent::run(a),
        Cmd::Lab(c) => lab::run(c),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocelot: {e:#}");
            ExitCode::FAILURE
        }
    }
}
