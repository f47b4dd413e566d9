//! The agent's side of Services and natOutgoing: compute this node's
//! `ServicesSpec` (`crate::services`), send it when it differs from what
//! the dataplane has, and keep the problems found in the datastore for the
//! log and for `ocelot status`.

use super::Agent;
use ocelot_dataplane::api::{Cidr, Request, ServicesSpec};
use std::sync::Mutex;

/// What the agent knows of the Services it sent.
#[derive(Default)]
pub struct ServicesState {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The spec the dataplane holds (None: not yet, or it reconnected).
    sent: Option<ServicesSpec>,
    /// A spec the dataplane refused, with why: not sent again until it
    /// changes or the dataplane reconnects.
    refused: Option<(ServicesSpec, String)>,
    /// The problems of the last calculation.
    problems: Vec<String>,
}

impl ServicesState {
    /// The dataplane reconnected: it needs the spec again.
    pub fn reset(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sent = None;
        g.refused = None;
    }
}

/// `--service-cidr` values.
pub fn parse_service_cidr(s: &str) -> Result<Cidr, String> {
    let c: Cidr = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !c.addr.is_ipv4() {
        return Err(format!("{s:?}: only IPv4 service ranges are forwarded"));
    }
    Ok(c.network())
}

impl Agent {
    /// The calculation's settings from the flags.
    fn service_settings(&self) -> crate::services::Settings {
        crate::services::Settings {
            service_cidrs: self.args.service_cidr.clone(),
            node_port_range: self.args.node_port_range,
        }
    }

    /// Compute the Services and natOutgoing and send them when they
    /// changed. Problems in the datastore are logged when they appear and
    /// kept for [`Agent::service_problems`]; a refusal by the dataplane is
    /// logged once per spec, and everything else keeps working.
    pub fn sync_services(&self) {
        let out = {
            let c = self.cluster.read().unwrap_or_else(|e| e.into_inner());
            crate::services::compute(&c, &self.node, &self.service_settings())
        };
        let spec = out.spec;
        {
            let mut g = self.services.inner.lock().unwrap_or_else(|e| e.into_inner());
            for p in out.problems.iter().filter(|p| !g.problems.contains(p)) {
                tracing::error!("service problem: {p}");
            }
            if !g.problems.is_empty() && out.problems.is_empty() {
                tracing::info!("no service problems any more");
            }
            g.problems = out.problems;
            if g.sent.as_ref() == Some(&spec) || g.refused.as_ref().is_some_and(|(s, _)| *s == spec)
            {
                return;
            }
        }
        let n = spec.services.len();
        let backends: usize = spec.services.iter().map(|s| s.backends.len()).sum();
        // Never hold the lock across the request (a reconnect inside it
        // resets this state).
        match self.dataplane_call(Request::SetServices { services: spec.clone() }) {
            Ok(_) => {
                let mut g = self.services.inner.lock().unwrap_or_else(|e| e.into_inner());
                tracing::info!(services = n, backends, "services sent to the dataplane");
                g.sent = Some(spec);
                g.refused = None;
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(
                    services = n,
                    "dataplane refused the Services and natOutgoing (everything else keeps \
                     working; sent again when they change or the dataplane restarts): {why}"
                );
                let mut g = self.services.inner.lock().unwrap_or_else(|e| e.into_inner());
                g.refused = Some((spec, why));
            }
        }
    }

    /// What is wrong with the Services and EndpointSlices in the datastore
    /// (one line each), and why the dataplane refused them if it did: for
    /// `ocelot status`.
    pub fn service_problems(&self) -> Vec<String> {
        let g = self.services.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = g.problems.clone();
        if let Some((_, why)) = &g.refused {
            v.push(format!("the dataplane refused the Services: {why}"));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidrs_parse() {
        assert_eq!(parse_service_cidr("10.96.0.1/12").unwrap().to_string(), "10.96.0.0/12");
        assert!(parse_service_cidr("fd00::/108").is_err());
        assert!(parse_service_cidr("10.96.0.0").is_err());
    }
}
