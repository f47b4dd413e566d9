//! The node agent: datastore → IPAM and endpoints → dataplane; CNI server.

use std::path::PathBuf;

/// `ocelot agent` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (the Node object it runs for).
    #[arg(long, env = "OCELOT_NODE_NAME")]
    pub node: String,
    /// Directory datastore: Kubernetes YAML files (Nodes, Namespaces, Pods,
    /// IPPools), watched for changes. Shared by every node of a lab; IPAM
    /// state lives in its `.ipam/` subdirectory.
    #[arg(long, default_value = "/etc/ocelot/datastore")]
    pub datastore: PathBuf,
    /// The dataplane's control socket.
    #[arg(long, default_value = "/run/ocelot/dataplane.sock")]
    pub dataplane_socket: PathBuf,
    /// The socket the CNI plugin talks to (created root-only).
    #[arg(long, default_value = "/run/ocelot/cni.sock")]
    pub cni_socket: PathBuf,
    /// MTU of the pods' interfaces (0 = auto: 1500 until the overlay lands).
    #[arg(long, default_value_t = 0)]
    pub mtu: u32,
}

pub fn run(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("the agent is being built")
}
