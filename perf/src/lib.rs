//! Ocelot's performance harness: builds the same pod-to-pod topology through
//! Ocelot's user-space dataplane and through the path Calico programs in the
//! kernel, measures both with the same tools in the same run, and reports
//! the ratios.
//!
//! The pieces are independent so new scenarios (Services, policy) reuse
//! them, as `same-node` and `cross-node` do:
//! - [`topo`]: topologies, each an RAII guard that removes everything it
//!   created when dropped (also on panic and on Ctrl-C); each exposes a
//!   [`topo::PodPair`] to measure between (one node, two nodes over a
//!   kernel overlay in [`topo::overlay`], or Ocelot's lab in [`topo::lab`]);
//! - [`tools`]: iperf3 and sockperf runners with parsers of their output;
//! - [`procfs`]: CPU time and memory of a process;
//! - [`report`]: metrics, ratios, the table and the JSON document;
//! - [`scenario`]: one module per scenario, wiring the above together.
//!
//! Failures are errors with a clear message; the helpers of `ocelot-tests`
//! panic instead, and the binary turns those panics into the same kind of
//! error after the guards have run.

pub mod interrupt;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod tools;
pub mod topo;
