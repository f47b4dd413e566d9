//! The CNI plugin `ocelot-cni` and the protocol it speaks with the agent.
//!
//! No async runtime: the plugin is executed once per pod, on the critical
//! path of pod start-up, and exits in milliseconds.

pub mod proto;
