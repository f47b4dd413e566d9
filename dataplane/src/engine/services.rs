//! The engine's Services side: check and compile a `ServicesSpec` whole,
//! route the service CIDRs from the node's kernel into the dataplane (so
//! node processes reach cluster IPs), steer replies to translated source
//! ports from the uplink to the host port (`sys::steer`), publish, persist.

use super::{invalid, sys_err, Engine};
use crate::api::{ApiError, Cidr, Reply, ServicesSpec, ServicesStatus};
use crate::nat::Services;
use crate::sys::netlink::{self, Op};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// What the engine keeps of the Services side.
#[derive(Default)]
pub(super) struct State {
    pub spec: Option<ServicesSpec>,
    /// Kernel routes installed for the service CIDRs.
    routes: Vec<Cidr>,
    status: ServicesStatus,
    steer: Option<crate::sys::steer::Steering>,
    steer_note: String,
}

impl Engine {
    /// The node's addresses translated flows may use: the overlay's
    /// `local_ip` (the uplink's address) when set.
    fn node_addrs(&self) -> Vec<Ipv4Addr> {
        self.overlay.status.iter().map(|s| s.spec.local_ip).collect()
    }

    /// Replace the Services and natOutgoing. The whole spec is checked
    /// before anything changes; a spec the kernel refuses (routes) changes
    /// nothing either.
    pub fn set_services(&mut self, spec: ServicesSpec) -> Result<Reply, ApiError> {
        for c in &spec.service_cidrs {
            check_cidr(c)?;
        }
        let compiled = Services::compile(&spec, &self.node_addrs()).map_err(invalid)?;
        let mut cidrs = spec.service_cidrs.clone();
        cidrs.sort();
        cidrs.dedup();
        self.route_service_cidrs(&cidrs)?;
        let steering = self.steer_replies(&compiled);
        let status = ServicesStatus {
            services: compiled.services.len(),
            frontends: compiled.frontends.len() + compiled.any_addr_node_ports.len(),
            backends: compiled.services.iter().map(|s| s.backends.len()).sum(),
            table_bytes: compiled.table_bytes,
            service_cidrs: cidrs,
            nat_addr: compiled.nat_addr,
            steering,
        };
        let t = self.tables.update(|t| t.services = Arc::new(compiled));
        tracing::info!(
            services = status.services,
            frontends = status.frontends,
            backends = status.backends,
            steering = %status.steering,
            "services set"
        );
        self.services.spec = Some(spec);
        self.services.status = status.clone();
        self.persist();
        Ok(Reply::Services { tables_version: t.version, services: status })
    }

    /// Compile the spec again (the node's addresses changed with the
    /// overlay).
    pub(super) fn refresh_services(&mut self) {
        if let Some(spec) = self.services.spec.clone() {
            if let Err(e) = self.set_services(spec) {
                tracing::error!("cannot apply the services again: {}", e.message);
            }
        }
    }

    pub(super) fn services_status(&self) -> ServicesStatus {
        self.services.status.clone()
    }

    /// Route `cidrs` through the host interface (and nothing else that we
    /// routed before).
    fn route_service_cidrs(&mut self, cidrs: &[Cidr]) -> Result<(), ApiError> {
        let Some(h) = &self.host else {
            self.services.routes.clear();
            return Ok(());
        };
        let mut ops: Vec<Op> = self
            .services
            .routes
            .iter()
            .filter(|c| !cidrs.contains(c))
            .map(|c| Op::DelRoute { dst: c.addr, prefix: c.len, dev: h.name.clone() })
            .collect();
        ops.extend(cidrs.iter().map(|c| Op::AddRoute {
            dst: c.network().addr,
            prefix: c.len,
            dev: h.name.clone(),
            via: None,
            link_scope: true,
        }));
        netlink::apply(None, ops).map_err(|e| sys_err("service CIDR routes", e))?;
        self.services.routes = cidrs.to_vec();
        Ok(())
    }

    /// Steer replies to the translated source ports on the node's own
    /// addresses from the uplink into the dataplane, when something is
    /// translated to such an address; remove the steering otherwise.
    /// Failure is reported in the status, not fatal: pods' ClusterIP
    /// traffic needs none.
    fn steer_replies(&mut self, s: &Services) -> String {
        let want = match (&self.host, s.needs_steering()) {
            (Some(h), true) => s.nat_addr.map(|a| (a, h.name.clone())),
            _ => None,
        };
        let Some((addr, host)) = want else {
            if let Some(st) = self.services.steer.take() {
                st.remove();
            }
            self.services.steer_note = "none (nothing translated to a node address)".into();
            return self.services.steer_note.clone();
        };
        // Node ports on this address (or on any), steered one by one.
        let mut node_ports: Vec<u16> = s
            .frontends
            .iter()
            .filter(|(k, f)| f.kind == crate::api::FrontendKind::NodePort && k.1 == addr)
            .map(|(k, _)| k.2)
            .chain(s.any_addr_node_ports.keys().map(|k| k.1))
            .collect();
        node_ports.sort_unstable();
        node_ports.dedup();
        let key = (addr, host.clone(), s.snat_ports, node_ports.clone());
        if let Some(st) = &self.services.steer {
            if *st.key() == key {
                return self.services.steer_note.clone();
            }
        }
        if let Some(st) = self.services.steer.take() {
            st.remove();
        }
        self.services.steer_note =
            match crate::sys::steer::Steering::install(addr, &host, s.snat_ports, &node_ports) {
                Ok(st) => {
                    let note = format!("tc ingress on {}", st.uplink());
                    self.services.steer = Some(st);
                    note
                }
                Err(e) => {
                    tracing::warn!("cannot steer replies of translated flows: {e}");
                    format!("none ({e})")
                }
            };
        self.services.steer_note.clone()
    }

    /// Remove the steering (the dataplane stops).
    pub(super) fn remove_steering(&mut self) {
        if let Some(st) = self.services.steer.take() {
            st.remove();
        }
    }
}

/// A kernel route for a service CIDR must be IPv4 and not the default.
pub(super) fn check_cidr(c: &Cidr) -> Result<(), ApiError> {
    match c.addr {
        IpAddr::V4(_) if c.len > 0 => Ok(()),
        _ => Err(invalid(format!("service CIDR {c}: expected an IPv4 prefix, not the default"))),
    }
}
