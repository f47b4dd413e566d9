//! Services and natOutgoing in the dataplane: pod traffic never crosses
//! the node's netfilter, so Ocelot translates it itself, as Calico's VPP
//! dataplane and Cilium do.
//!
//! * [`service`]: the compiled `ServicesSpec` the workers read (frontends,
//!   backends, one [`maglev`] table per set of backends that take new
//!   connections, natOutgoing rules).
//! * [`flows`]: each worker's translated flows, its source-port
//!   allocations and affinity choices.
//! * [`rewrite`]: reading a packet's tuple and rewriting it with its
//!   checksums kept right.
//!
//! The pipeline stage that ties them together is `pipeline::nat`; how flows
//! and workers meet is in docs/design.md ("Services and natOutgoing").

pub mod flows;
pub mod maglev;
pub mod rewrite;
pub mod service;

pub use flows::{NatFlows, Tuple};
pub use service::Services;
