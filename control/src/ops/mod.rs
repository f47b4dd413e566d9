//! Operating Ocelot: the agent's HTTP endpoints (`/livez`, `/readyz`,
//! `/metrics`, `/status`), `ocelot status`, `ocelot install-cni`, and the
//! structured logs.
//!
//! ```text
//!  agent loop ──updates──> OpsState (atomics) ─┐
//!  Agent (cluster, IPAM) ──── Source ──────────┼─> http (hyper) ──> probes, Prometheus, `ocelot status`
//!  ocelot-dataplane ──counters/state socket────┘
//! ```

pub mod http;
pub mod install;
pub mod logging;
pub mod metrics;
pub mod state;
pub mod status;
pub mod view;

pub use state::OpsState;
pub use view::Source;

use crate::datastore::Cluster;
use crate::ipam::IpamState;
use std::path::PathBuf;

impl Source for crate::agent::Agent {
    fn node(&self) -> String {
        self.node.clone()
    }
    fn dataplane_socket(&self) -> PathBuf {
        self.args.dataplane_socket.clone()
    }
    fn with_cluster(&self, f: &mut dyn FnMut(&Cluster)) {
        f(&self.cluster.read().unwrap_or_else(|e| e.into_inner()))
    }
    fn ipam(&self) -> Result<IpamState, String> {
        self.ipam.load().map_err(|e| format!("cannot read IPAM state: {e}"))
    }
    fn problems(&self) -> Vec<String> {
        self.service_problems()
    }
}
