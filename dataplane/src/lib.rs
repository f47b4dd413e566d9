//! Ocelot's user-space dataplane.
//!
//! Pods' `eth0` are TAP devices owned by this process; pinned worker threads
//! poll them in batches and run each batch through the [`pipeline`]. The
//! forwarding state is an immutable [`tables::Tables`] snapshot swapped
//! atomically by the control thread, which the agent programs over the
//! [`api`] socket.

pub mod api;
pub mod counters;
pub mod csum;
pub mod engine;
pub mod frame;
pub mod gro;
pub mod gso;
pub mod logging;
pub mod nat;
pub mod pipeline;
pub mod policy;
pub mod port;
pub mod state;
pub mod sys;
pub mod tables;
pub mod wire;
pub mod worker;
