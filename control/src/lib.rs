//! The Ocelot node agent and its CLI: the datastore, IPAM, the CNI server,
//! the dataplane programming, and the lab.

pub mod agent;
pub mod datastore;
pub mod ipam;
pub mod k8s;
pub mod lab;
pub mod model;
pub mod ops;
pub mod policy;
pub mod services;
