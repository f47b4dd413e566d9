//! `ocelot lab`: a cluster without Kubernetes, on one machine.

/// Lab subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum LabCmd {}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {}
}
