//! The control side of the dataplane: owns the endpoints' TAPs, builds and
//! publishes table versions, assigns ports to workers, persists the desired
//! state. The API server calls it under a mutex; workers never do.

use crate::api::{
    ApiError, Cidr, EndpointSpec, EndpointStatus, ErrorCode, PortCounters, Reply, WorkerCounters,
};
use crate::counters::{DropReason, PortStats};
use crate::port::tap::tap_port;
use crate::port::PortId;
use crate::state::{Persisted, StateDir};
use crate::sys::netlink::{self, Op};
use crate::sys::{netns, tun};
use crate::tables::{NextHop, PortEntry, PortKind, SharedTables, Tables};
use crate::wire::MacAddr;
use crate::worker::{self, Command, WorkerConfig, WorkerHandle};
use std::collections::BTreeMap;

mod overlay;
mod services;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// How the engine starts.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub workers: Vec<WorkerConfig>,
    pub state_dir: PathBuf,
    /// Name of the host interface; `None` runs without one.
    pub host_iface: Option<String>,
    pub host_mtu: u32,
    pub gateway_mac: MacAddr,
    /// Pools given on the command line (the agent's sync replaces them).
    pub pools: Vec<Cidr>,
}

struct Endpoint {
    spec: EndpointSpec,
    port: PortId,
    worker: usize,
    mac: MacAddr,
    tap: Arc<tun::Tap>,
}

struct HostPort {
    name: String,
}

pub struct Engine {
    cfg: EngineConfig,
    /// NetworkPolicy per endpoint name (also for endpoints not added yet).
    policies: BTreeMap<String, crate::policy::EndpointPolicy>,
    overlay: overlay::State,
    services: services::State,
    tables: Arc<SharedTables>,
    workers: Vec<WorkerHandle>,
    endpoints: BTreeMap<String, Endpoint>,
    pools: Vec<Cidr>,
    host: Option<HostPort>,
    state: StateDir,
}

fn sys_err(ctx: impl std::fmt::Display, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::System, format!("{ctx}: {e}"))
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

fn host_len(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Engine {
    /// Start workers, the host interface, and every endpoint saved by a
    /// previous run (re-attaching to the pods' persistent TAPs).
    pub fn start(cfg: EngineConfig) -> std::io::Result<Engine> {
        let state = StateDir::open(&cfg.state_dir)?;
        let saved = match state.load() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read saved state, starting empty: {e}");
                Persisted::default()
            }
        };
        let tables = Arc::new(SharedTables::new(Tables::new(cfg.gateway_mac)));
        let workers = worker::spawn_all(&cfg.workers, tables.clone())?;
        let mut e = Engine {
            policies: saved.policies.clone(),
            overlay: overlay::State::default(),
            services: services::State::default(),
            pools: Vec::new(),
            cfg,
            tables,
            workers,
            endpoints: BTreeMap::new(),
            host: None,
            state,
        };
        if let Some(name) = e.cfg.host_iface.clone() {
            e.start_host_port(&name)?;
        }
        let pools = if saved.pools.is_empty() { e.cfg.pools.clone() } else { saved.pools.clone() };
        if let Err(err) = e.set_pools(pools) {
            tracing::error!("cannot install pool routes: {err}");
        }
        for spec in saved.endpoints {
            let name = spec.name.clone();
            if !netns::exists(&spec.netns) {
                tracing::warn!(endpoint = %name, netns = %spec.netns.display(), "pod namespace is gone; forgetting the endpoint");
                continue;
            }
            match e.add_endpoint(spec) {
                Ok(st) => tracing::info!(endpoint = %name, port = st.port, "endpoint restored"),
                Err(err) => tracing::error!(endpoint = %name, "cannot restore endpoint: {err}"),
            }
        }
        if let Some(o) = saved.overlay {
            if let Err(err) = e.set_overlay(o) {
                tracing::error!("cannot restore the overlay: {err}");
            }
        }
        if let Some(s) = saved.services {
            if let Err(err) = e.set_services(s) {
                tracing::error!("cannot restore the services: {err}");
            }
        }
        e.persist();
        Ok(e)
    }

    fn start_host_port(&mut self, name: &str) -> std::io::Result<()> {
        let tap = tun::Tap::open(name, true)?;
        let mac = MacAddr::local_from_seed(format!("host:{name}").as_bytes());
        netlink::apply(
            None,
            vec![Op::SetLink {
                name: name.into(),
                mac: Some(mac),
                mtu: Some(self.cfg.host_mtu),
                up: Some(true),
            }],
        )?;
        let (rx, tx) = tap_port(tap);
        let id = self.tables.load().free_port_id();
        let w = self.pick_worker();
        self.tables.update(|t| {
            t.set_port(PortEntry {
                id,
                name: name.into(),
                kind: PortKind::Host,
                peer_mac: mac,
                ips: Vec::new(),
                tx,
                stats: Arc::new(PortStats::default()),
                policy: None,
            });
            t.host_port = Some(id);
        });
        self.workers[w].send(Command::AddPort(id, Box::new(rx)));
        self.host = Some(HostPort { name: name.into() });
        tracing::info!(iface = name, port = id, %mac, "host interface ready");
        Ok(())
    }

    fn pick_worker(&self) -> usize {
        self.workers.iter().min_by_key(|w| w.ports).map_or(0, |w| w.id)
    }

    /// Install the pools: addresses in them without an endpoint are dropped
    /// here (never bounced to the host), and the host routes them to us.
    pub fn set_pools(&mut self, mut pools: Vec<Cidr>) -> Result<u64, ApiError> {
        pools.sort();
        pools.dedup();
        if let Some(h) = &self.host {
            let mut ops: Vec<Op> = self
                .pools
                .iter()
                .filter(|p| !pools.contains(p))
                .map(|p| Op::DelRoute { dst: p.addr, prefix: p.len, dev: h.name.clone() })
                .collect();
            ops.extend(pools.iter().map(|p| Op::AddRoute {
                dst: p.addr,
                prefix: p.len,
                dev: h.name.clone(),
                via: None,
                link_scope: true,
            }));
            netlink::apply(None, ops).map_err(|e| sys_err("host routes", e))?;
        }
        let old = std::mem::replace(&mut self.pools, pools.clone());
        let t = self.tables.update(|t| {
            for p in &old {
                if t.routes.lookup(p.addr) == Some(&NextHop::Unreachable) {
                    t.routes.remove(p.addr, p.len);
                }
            }
            for p in &pools {
                t.routes.insert(p.addr, p.len, NextHop::Unreachable);
            }
        });
        Ok(t.version)
    }

    fn validate(&self, spec: &EndpointSpec) -> Result<(), ApiError> {
        tun::check_ifname(&spec.name).map_err(|e| invalid(format!("endpoint name: {e}")))?;
        tun::check_ifname(&spec.ifname).map_err(|e| invalid(format!("ifname: {e}")))?;
        if Some(&spec.name) == self.host.as_ref().map(|h| &h.name) {
            return Err(invalid(format!("endpoint name {} is the host interface", spec.name)));
        }
        if spec.ips.is_empty() {
            return Err(invalid("an endpoint needs at least one IP address"));
        }
        if !(68..=65535).contains(&spec.mtu) {
            return Err(invalid(format!("MTU {} outside 68..=65535", spec.mtu)));
        }
        if let Some(m) = spec.mac {
            if m.is_multicast() || m.0 == [0; 6] {
                return Err(invalid(format!("MAC {m} is not a unicast address")));
            }
        }
        for ip in &spec.ips {
            if let Some(other) = self
                .endpoints
                .values()
                .find(|e| e.spec.name != spec.name && e.spec.ips.contains(ip))
            {
                return Err(invalid(format!(
                    "address {ip} already belongs to endpoint {}",
                    other.spec.name
                )));
            }
        }
        if !netns::exists(&spec.netns) {
            return Err(invalid(format!(
                "network namespace {} does not exist",
                spec.netns.display()
            )));
        }
        Ok(())
    }

    /// Create the pod's TAP (or re-attach to it) and start forwarding for it.
    /// Repeating the same request is a no-op; a changed spec replaces it.
    pub fn add_endpoint(&mut self, spec: EndpointSpec) -> Result<EndpointStatus, ApiError> {
        self.validate(&spec)?;
        if let Some(e) = self.endpoints.get(&spec.name) {
            if e.spec == spec {
                return Ok(self.status(e));
            }
            self.remove_endpoint(&spec.name.clone())?;
        }
        let mac = spec.mac.unwrap_or_else(|| MacAddr::local_from_seed(spec.name.as_bytes()));
        let tap = self.open_pod_tap(&spec, mac)?;
        let (rx, tx) = tap_port(tap);
        let tap = tx.0.clone();
        let id = self.tables.load().free_port_id();
        let w = self.pick_worker();
        let policy = self.compiled_policy(&spec.name);
        self.tables.update(|t| {
            t.set_port(PortEntry {
                id,
                name: spec.name.clone(),
                kind: PortKind::Pod,
                peer_mac: mac,
                ips: spec.ips.clone(),
                tx,
                stats: Arc::new(PortStats::default()),
                policy: policy.clone(),
            });
            if policy.is_some() {
                t.policy_generation += 1;
            }
            for ip in &spec.ips {
                t.routes.insert(*ip, host_len(ip), NextHop::Port(id));
            }
        });
        self.workers[w].send(Command::AddPort(id, Box::new(rx)));
        let e = Endpoint { spec: spec.clone(), port: id, worker: w, mac, tap };
        let st = self.status(&e);
        self.endpoints.insert(spec.name.clone(), e);
        self.persist();
        tracing::info!(endpoint = %spec.name, port = id, worker = w, ips = ?spec.ips, "endpoint added");
        Ok(st)
    }

    /// Open the pod's TAP from inside the pod's namespace: TUNSETIFF
    /// creates it there directly (or re-attaches to it after a restart or a
    /// repeated request), so no device ever crosses namespaces — a move
    /// costs the kernel an RCU grace period, most of an ADD's time.
    fn open_pod_tap(&self, spec: &EndpointSpec, mac: MacAddr) -> Result<tun::Tap, ApiError> {
        let ns = spec.netns.clone();
        let ifname = spec.ifname.clone();
        let settle = vec![Op::SetLink {
            name: ifname.clone(),
            mac: Some(mac),
            mtu: Some(spec.mtu),
            up: Some(true),
        }];
        netns::run_in(Some(&ns), move || {
            let existed = netlink::link(None, &ifname)?.is_some();
            let tap = tun::Tap::open(&ifname, true).map_err(|e| {
                if existed {
                    std::io::Error::new(
                        e.kind(),
                        format!("interface {ifname} exists and is not a TAP we can attach to: {e}"),
                    )
                } else {
                    e
                }
            })?;
            if let Err(e) = netlink::apply(None, settle) {
                if !existed {
                    // Leave nothing behind: the device goes with its last fd.
                    let _ = tap.set_persist(false);
                }
                return Err(e);
            }
            Ok(tap)
        })
        .map_err(|e| sys_err(format!("pod interface {} in {}", spec.ifname, ns.display()), e))
    }

    /// Stop forwarding for an endpoint and delete its interface. Succeeds
    /// when the endpoint or its namespace is already gone.
    pub fn remove_endpoint(&mut self, name: &str) -> Result<u64, ApiError> {
        let Some(e) = self.endpoints.remove(name) else {
            return Ok(self.tables.load().version);
        };
        let t = self.tables.update(|t| {
            t.remove_port(e.port);
        });
        self.workers[e.worker].send(Command::RemovePort(e.port));
        let _ = e.tap.set_persist(false);
        if netns::exists(&e.spec.netns) {
            if let Err(err) = netlink::apply(
                Some(&e.spec.netns),
                vec![Op::DelLink { name: e.spec.ifname.clone() }],
            ) {
                tracing::warn!(endpoint = name, "cannot delete pod interface: {err}");
            }
        }
        self.persist();
        tracing::info!(endpoint = name, port = e.port, "endpoint removed");
        Ok(t.version)
    }

    /// Make the endpoints and pools exactly these.
    pub fn sync(
        &mut self,
        endpoints: Vec<EndpointSpec>,
        pools: Vec<Cidr>,
    ) -> Result<u64, ApiError> {
        let mut names = std::collections::HashSet::new();
        for s in &endpoints {
            if !names.insert(s.name.as_str()) {
                return Err(invalid(format!("endpoint {} listed twice", s.name)));
            }
        }
        let stale: Vec<String> =
            self.endpoints.keys().filter(|n| !names.contains(n.as_str())).cloned().collect();
        self.policies.retain(|n, _| names.contains(n.as_str()));
        for n in stale {
            self.remove_endpoint(&n)?;
        }
        let mut errors = Vec::new();
        for s in endpoints {
            let n = s.name.clone();
            if let Err(e) = self.add_endpoint(s) {
                errors.push(format!("{n}: {}", e.message));
            }
        }
        let v = self.set_pools(pools)?;
        if errors.is_empty() {
            Ok(v)
        } else {
            Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("some endpoints were not applied: {}", errors.join("; ")),
            ))
        }
    }

    /// The compiled policy of an endpoint; `None` when it has none or is
    /// isolated in neither direction.
    fn compiled_policy(&self, name: &str) -> Option<Arc<crate::policy::classify::CompiledPolicy>> {
        self.policies
            .get(name)
            .filter(|p| p.ingress.is_some() || p.egress.is_some())
            .map(|p| Arc::new(crate::policy::classify::CompiledPolicy::compile(p)))
    }

    /// Set the policy of some endpoints: compiled once, published in one
    /// table version, with a new policy generation so tracked flows are
    /// judged again.
    pub fn set_policies(
        &mut self,
        updates: Vec<crate::api::EndpointPolicyUpdate>,
    ) -> Result<u64, ApiError> {
        for u in &updates {
            tun::check_ifname(&u.endpoint)
                .map_err(|e| invalid(format!("endpoint name {:?}: {e}", u.endpoint)))?;
        }
        let mut compiled = Vec::new();
        for u in updates {
            let isolated = u.policy.ingress.is_some() || u.policy.egress.is_some();
            let c = isolated
                .then(|| Arc::new(crate::policy::classify::CompiledPolicy::compile(&u.policy)));
            if let Some(e) = self.endpoints.get(&u.endpoint) {
                compiled.push((e.port, c));
            }
            if isolated {
                self.policies.insert(u.endpoint, u.policy);
            } else {
                self.policies.remove(&u.endpoint);
            }
        }
        let t = self.tables.update(|t| {
            for (port, c) in compiled {
                if let Some(Some(p)) = t.ports.get_mut(port as usize) {
                    p.policy = c;
                }
            }
            t.policy_generation += 1;
        });
        self.persist();
        Ok(t.version)
    }

    fn status(&self, e: &Endpoint) -> EndpointStatus {
        EndpointStatus { spec: e.spec.clone(), port: e.port, worker: e.worker, mac: e.mac }
    }

    /// Before the process exits: detach the uplink's XDP program (the
    /// pods' TAPs persist). A `kill -9` skips this; the program goes with
    /// the process anyway (see `port::xdp::program`).
    pub fn shutdown(&mut self) {
        self.close_xdp();
        self.remove_steering();
    }

    pub fn tables_version(&self) -> u64 {
        self.tables.load().version
    }

    pub fn state(&self) -> Reply {
        Reply::State {
            tables_version: self.tables_version(),
            endpoints: self.endpoints.values().map(|e| self.status(e)).collect(),
            pools: self.pools.clone(),
            host_iface: self.host.as_ref().map(|h| h.name.clone()),
            overlay: self.overlay.status.clone(),
            services: self.services_status(),
        }
    }

    pub fn counters(&self) -> Reply {
        let t = self.tables.load();
        let ports = t
            .ports
            .iter()
            .flatten()
            .map(|p| PortCounters {
                port: p.id,
                name: p.name.clone(),
                kind: p.kind.clone(),
                counters: p.stats.snapshot(),
            })
            .collect();
        let workers = self
            .workers
            .iter()
            .map(|w| {
                use std::sync::atomic::Ordering::Relaxed;
                WorkerCounters {
                    worker: w.id,
                    core: w.stats.core,
                    ports: w.ports,
                    batches: w.stats.batches.load(Relaxed),
                    polls: w.stats.polls.load(Relaxed),
                    handoff_in: w.stats.handoff_in.load(Relaxed),
                    handoff_out: w.stats.handoff_out.load(Relaxed),
                    gro_merged: w.stats.gro_merged.load(Relaxed),
                    ct_entries: w.stats.ct_entries.load(Relaxed),
                    ct_refused: w.stats.ct_refused.load(Relaxed),
                    nat_entries: w.stats.nat_entries.load(Relaxed),
                    snat_ports: w.stats.snat_ports.load(Relaxed),
                    counters: w.stats.port.snapshot(),
                }
            })
            .collect();
        let drop_reasons = DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), r.description().to_string()))
            .collect();
        Reply::Counters { ports, workers, drop_reasons }
    }

    fn persist(&self) {
        let s = Persisted {
            format: 0,
            endpoints: self.endpoints.values().map(|e| e.spec.clone()).collect(),
            pools: self.pools.clone(),
            overlay: self.overlay.status.as_ref().map(|s| s.spec.clone()),
            policies: self.policies.clone(),
            services: self.services.spec.clone(),
        };
        if let Err(e) = self.state.save(&s) {
            tracing::error!(dir = %self.state.path().display(), "cannot save state: {e}");
        }
    }
}
