//! The CNI server: the plugin's requests, served against IPAM, the
//! dataplane and the pod's namespace. A failed ADD undoes what it did, so
//! nothing leaks; DEL succeeds when things are already gone.

use super::{attr, endpoint_name, Agent};
use crate::ipam::{Allocation, Ipam, IpamError, Request as IpamRequest};
use ocelot_cni::proto::{
    codes, CniRequest, CniResponse, CniResult, Command, Interface, IpConfig, Route,
};
use ocelot_dataplane::api::{EndpointSpec, Reply, Request as DpRequest};
use ocelot_dataplane::sys::netlink;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spec error codes used here.
const INVALID_ENV: u32 = 4;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN: u32 = 11;
const STATUS_UNAVAILABLE: u32 = 50;
const STATUS_NO_IPS: u32 = 51;

/// The pod annotation asking for specific addresses (JSON list).
pub const IP_ADDRS_ANNOTATION: &str = "ocelot.dev/ip-addrs";

pub fn serve(path: &Path, agent: Arc<Agent>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is served by another agent", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "CNI server listening");
    std::thread::Builder::new().name("ocelot-cni-srv".into()).spawn(move || {
        for s in l.incoming().flatten() {
            let a = agent.clone();
            let _ = std::thread::Builder::new().name("ocelot-cni-req".into()).spawn(move || {
                if let Err(e) = connection(s, &a) {
                    tracing::debug!("CNI connection: {e}");
                }
            });
        }
    })?;
    Ok(())
}

fn connection(s: UnixStream, agent: &Agent) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = s.try_clone()?;
    let mut line = String::new();
    BufReader::new(s).take(4 << 20).read_line(&mut line)?;
    let resp = match serde_json::from_str::<CniRequest>(&line) {
        Ok(req) => {
            let t = Instant::now();
            let cmd = req.command;
            let cid = req.container_id.clone();
            let r = handle(agent, req);
            match &r {
                CniResponse::Ok { .. } => {
                    tracing::info!(?cmd, container = %cid, ms = t.elapsed().as_millis() as u64, "CNI request served")
                }
                CniResponse::Error { code, msg, .. } => {
                    tracing::warn!(?cmd, container = %cid, code, "CNI request failed: {msg}")
                }
            }
            r
        }
        Err(e) => err(INVALID_CONFIG, format!("invalid request from the plugin: {e}")),
    };
    let mut v = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
    v.push(b'\n');
    out.write_all(&v)
}

use std::io::Read as _;

fn err(code: u32, msg: impl Into<String>) -> CniResponse {
    CniResponse::Error { code, msg: msg.into(), details: String::new() }
}

fn handle(agent: &Agent, req: CniRequest) -> CniResponse {
    match req.command {
        Command::Add => add(agent, &req),
        Command::Del => del(agent, &req),
        Command::Check => check(agent, &req),
        Command::Status => status(agent),
        Command::Gc => gc(agent, &req),
    }
}

fn handle_of(req: &CniRequest) -> String {
    format!("{}/{}", req.container_id, req.ifname)
}

fn pod_key(req: &CniRequest) -> Option<String> {
    let ns = req.args.get("K8S_POD_NAMESPACE")?;
    let name = req.args.get("K8S_POD_NAME")?;
    Some(format!("{ns}/{name}"))
}

fn mtu(agent: &Agent, req: &CniRequest) -> u32 {
    if agent.args.mtu > 0 {
        return agent.args.mtu;
    }
    req.config
        .get("mtu")
        .and_then(|m| m.as_u64())
        .filter(|m| (68..=65535).contains(m))
        .map(|m| m as u32)
        .or_else(|| agent.auto_mtu())
        .unwrap_or(1500)
}

/// What the pod asks for, given the datastore.
fn ipam_request(
    agent: &Agent,
    req: &CniRequest,
    pod: Option<&crate::model::Pod>,
) -> Result<IpamRequest, Box<CniResponse>> {
    let c = agent.cluster.read().unwrap_or_else(|e| e.into_inner());
    let node = c.nodes.get(&agent.node);
    let pools = super::pools::for_node(c.pools.values(), node);
    if let Some(raw) = pod.and_then(|p| p.metadata.annotations.get(IP_ADDRS_ANNOTATION)) {
        let ips: Vec<IpAddr> = serde_json::from_str(raw).map_err(|e| {
            Box::new(err(
                INVALID_CONFIG,
                format!(
                    "annotation {IP_ADDRS_ANNOTATION}: {e} (expected a JSON list of addresses)"
                ),
            ))
        })?;
        return Ok(IpamRequest::Specific { ips, pools });
    }
    let use_pod_cidr = req
        .config
        .get("ipam")
        .and_then(|i| i.get("usePodCidr"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if use_pod_cidr {
        let cidr = node.and_then(|n| n.spec.pod_cidr.as_ref()).ok_or_else(|| {
            Box::new(err(
                INVALID_CONFIG,
                format!("usePodCidr is set but Node {} has no spec.podCIDR", agent.node),
            ))
        })?;
        let pod_cidr = cidr.parse().map_err(|e| {
            Box::new(err(INVALID_CONFIG, format!("Node {} spec.podCIDR: {e}", agent.node)))
        })?;
        return Ok(IpamRequest::HostLocal { pod_cidr });
    }
    Ok(IpamRequest::Auto { pools })
}

fn ipam_err(e: IpamError) -> CniResponse {
    let code = match e {
        IpamError::Exhausted | IpamError::NoPool => codes::POOL_EXHAUSTED,
        IpamError::InUse(..) | IpamError::OutsidePools(_) => codes::ADDRESS_UNAVAILABLE,
        IpamError::Invalid(_) => INVALID_CONFIG,
    };
    err(code, e.to_string())
}

fn add(agent: &Agent, req: &CniRequest) -> CniResponse {
    let Some(netns) = req.netns.clone().filter(|n| !n.is_empty()) else {
        return err(INVALID_ENV, "CNI_NETNS is required for ADD");
    };
    if req.container_id.is_empty() || req.ifname.is_empty() {
        return err(INVALID_ENV, "CNI_CONTAINERID and CNI_IFNAME are required for ADD");
    }
    if !Path::new(&netns).exists() {
        return err(INVALID_ENV, format!("network namespace {netns} does not exist"));
    }
    // The pod may have been written to the datastore a moment ago.
    let key = pod_key(req);
    let pod = key.as_ref().and_then(|k| {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(p) = agent.cluster.read().unwrap_or_else(|e| e.into_inner()).pods.get(k) {
                return Some(p.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            agent.refresh();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    if let (Some(k), None) = (&key, &pod) {
        return err(codes::UNKNOWN_POD, format!("pod {k} is not in the datastore"));
    }
    let ireq = match ipam_request(agent, req, pod.as_ref()) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let handle = handle_of(req);
    let ep_name = endpoint_name(&handle);
    // The automatic MTU comes with the overlay, which connecting to the
    // dataplane brings: connect first, or the first pod gets 1500.
    if agent.auto_mtu().is_none() {
        agent.ensure_dataplane();
    }
    let mtu = mtu(agent, req);
    let alloc = Allocation {
        handle: handle.clone(),
        node: agent.node.clone(),
        pod: key.clone().unwrap_or_default(),
        attrs: [
            (attr::NETNS, netns.clone()),
            (attr::IFNAME, req.ifname.clone()),
            (attr::ENDPOINT, ep_name.clone()),
            (attr::MTU, mtu.to_string()),
            (attr::CONTAINER, req.container_id.clone()),
        ]
        .into_iter()
        .chain(req.args.get("K8S_POD_UID").map(|u| (attr::POD_UID, u.clone())))
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    };
    let t_start = Instant::now();
    let allocated = match agent
        .ipam
        .transact(|st| Ipam { state: st, node: &agent.node }.allocate(&ireq, alloc.clone()))
    {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            if matches!(e, IpamError::Exhausted | IpamError::NoPool) {
                let pod = pod_key(req).unwrap_or_else(|| req.container_id.clone());
                agent.warn_event("IPAMExhausted", &format!("no address for pod {pod}: {e}"));
            }
            return ipam_err(e);
        }
        Err(e) => return err(TRY_AGAIN, format!("IPAM state: {e}")),
    };
    let undo = |msg: String, code: u32| {
        if !allocated.existing {
            let _ =
                agent.ipam.transact(|st| Ipam { state: st, node: &agent.node }.release(&handle));
            let _ = agent.dataplane.call(DpRequest::RemoveEndpoint { name: ep_name.clone() });
        }
        err(code, msg)
    };
    if !agent.ensure_dataplane() {
        return undo(
            format!("the dataplane at {} is not reachable", agent.args.dataplane_socket.display()),
            TRY_AGAIN,
        );
    }
    let t_ipam = t_start.elapsed();
    let spec = EndpointSpec {
        name: ep_name.clone(),
        netns: netns.clone().into(),
        ifname: req.ifname.clone(),
        mac: None,
        ips: allocated.ips.clone(),
        mtu,
    };
    // The pod's policy is in place before its first packet.
    agent.sync_policy();
    let mac = match agent.dataplane_call(DpRequest::AddEndpoint { endpoint: spec }) {
        Ok(Reply::Endpoint { endpoint }) => endpoint.mac,
        Ok(other) => {
            return undo(format!("unexpected dataplane reply {other:?}"), codes::DATAPLANE)
        }
        Err(e) => return undo(format!("dataplane: {e}"), codes::DATAPLANE),
    };
    let t_dp = t_start.elapsed();
    if let Err(e) = netlink::apply(
        Some(Path::new(&netns)),
        netlink::pod_addressing(&req.ifname, &allocated.ips),
    ) {
        return undo(format!("configuring {} in {netns}: {e}", req.ifname), codes::DATAPLANE);
    }
    tracing::debug!(
        ipam_us = t_ipam.as_micros() as u64,
        dataplane_us = (t_dp - t_ipam).as_micros() as u64,
        addressing_us = (t_start.elapsed() - t_dp).as_micros() as u64,
        "ADD timings"
    );
    let result = CniResult {
        interfaces: vec![Interface {
            name: req.ifname.clone(),
            mac: mac.to_string(),
            mtu: Some(mtu),
            sandbox: netns,
            ..Default::default()
        }],
        ips: allocated
            .ips
            .iter()
            .map(|ip| IpConfig {
                interface: Some(0),
                address: format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }),
                gateway: None,
            })
            .collect(),
        routes: vec![Route {
            dst: "0.0.0.0/0".into(),
            gw: Some(ocelot_dataplane::pipeline::GATEWAY_IP.to_string()),
            ..Default::default()
        }],
        dns: Default::default(),
    };
    CniResponse::Ok { result: Some(result) }
}

fn del(agent: &Agent, req: &CniRequest) -> CniResponse {
    if req.container_id.is_empty() || req.ifname.is_empty() {
        return err(INVALID_ENV, "CNI_CONTAINERID and CNI_IFNAME are required for DEL");
    }
    let handle = handle_of(req);
    let freed =
        match agent.ipam.transact(|st| Ipam { state: st, node: &agent.node }.release(&handle)) {
            Ok(f) => f,
            Err(e) => return err(TRY_AGAIN, format!("IPAM state: {e}")),
        };
    // The dataplane side is best effort: if it is away, the next sync
    // removes the endpoint because IPAM no longer lists it.
    if agent.ensure_dataplane() {
        if let Err(e) =
            agent.dataplane_call(DpRequest::RemoveEndpoint { name: endpoint_name(&handle) })
        {
            tracing::warn!(%handle, "dataplane remove: {e}");
        }
    }
    tracing::debug!(%handle, ?freed, "released");
    CniResponse::Ok { result: None }
}

fn check(agent: &Agent, req: &CniRequest) -> CniResponse {
    let handle = handle_of(req);
    let held = match agent.ipam.load() {
        Ok(mut st) => Ipam { state: &mut st, node: &agent.node }.find(&handle),
        Err(e) => return err(TRY_AGAIN, format!("IPAM state: {e}")),
    };
    if held.is_empty() {
        return err(codes::CHECK_FAILED, format!("no address is allocated to {handle}"));
    }
    if let Some(prev) = &req.prev_result {
        for ip in &held {
            if !prev.ips.iter().any(|c| c.address.split('/').next() == Some(&ip.to_string())) {
                return err(
                    codes::CHECK_FAILED,
                    format!("prevResult lacks the allocated address {ip}"),
                );
            }
        }
    }
    let Some(netns) = req.netns.clone() else {
        return err(INVALID_ENV, "CNI_NETNS is required for CHECK");
    };
    match netlink::link(Some(Path::new(&netns)), &req.ifname) {
        Ok(Some(l)) if l.up => {}
        Ok(Some(_)) => {
            return err(codes::CHECK_FAILED, format!("{} in {netns} is down", req.ifname))
        }
        Ok(None) => {
            return err(codes::CHECK_FAILED, format!("{} is missing from {netns}", req.ifname))
        }
        Err(e) => return err(codes::CHECK_FAILED, format!("{netns}: {e}")),
    }
    if !agent.ensure_dataplane() {
        return err(TRY_AGAIN, "the dataplane is not reachable");
    }
    match agent.dataplane.call(DpRequest::State) {
        Ok(Reply::State { endpoints, .. })
            if endpoints.iter().any(|e| e.spec.name == endpoint_name(&handle)) =>
        {
            CniResponse::Ok { result: None }
        }
        Ok(_) => err(codes::CHECK_FAILED, "the dataplane has no endpoint for this container"),
        Err(e) => err(TRY_AGAIN, format!("dataplane: {e}")),
    }
}

fn status(agent: &Agent) -> CniResponse {
    if !agent.ensure_dataplane() {
        return err(STATUS_UNAVAILABLE, "the dataplane is not reachable");
    }
    let c = agent.cluster.read().unwrap_or_else(|e| e.into_inner());
    let node = c.nodes.get(&agent.node);
    let host_local = node.and_then(|n| n.spec.pod_cidr.as_ref()).is_some();
    if super::pools::for_node(c.pools.values(), node).is_empty() && !host_local {
        return err(STATUS_NO_IPS, "no IP pool is enabled for this node");
    }
    CniResponse::Ok { result: None }
}

fn gc(agent: &Agent, req: &CniRequest) -> CniResponse {
    let Some(valid) = &req.valid_attachments else {
        return err(INVALID_CONFIG, "GC needs cni.dev/valid-attachments");
    };
    let keep: std::collections::HashSet<String> =
        valid.iter().map(|a| format!("{}/{}", a.container_id, a.ifname)).collect();
    let freed = match agent
        .ipam
        .transact(|st| Ipam { state: st, node: &agent.node }.release_unless(|h| keep.contains(h)))
    {
        Ok(f) => f,
        Err(e) => return err(TRY_AGAIN, format!("IPAM state: {e}")),
    };
    if !freed.is_empty() {
        tracing::info!(count = freed.len(), "GC released stale allocations");
        agent.resync();
    }
    CniResponse::Ok { result: None }
}
