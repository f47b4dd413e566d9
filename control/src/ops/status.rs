//! `ocelot status`: one node's state, like `calicoctl node status` — the
//! agent's view (through its `/status` endpoint) and the dataplane's
//! (through its socket): peers and their tunnels, pools, blocks and routes,
//! endpoints, policy, dataplane health, drops by reason.

use super::http;
use super::view::AgentView;
use ocelot_dataplane::api::client::Client;
use ocelot_dataplane::api::{Reply, Request};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `ocelot status` flags.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Exit status: 0 when the agent is ready and the dataplane answers, \
1 otherwise (the report is printed either way). Run it on the node (or in the \
ocelot-node pod: kubectl -n ocelot-system exec ds/ocelot-node -c agent -- ocelot status).")]
pub struct StatusArgs {
    /// The agent's HTTP endpoint (its --metrics-addr), host:port.
    #[arg(long, env = "OCELOT_AGENT_ADDR", default_value = "127.0.0.1:9099")]
    pub agent: String,
    /// The dataplane's control socket.
    #[arg(long, default_value = "/run/ocelot/dataplane.sock")]
    pub dataplane_socket: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// The report (`-o json` prints it as is).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The agent's view; `None` when it could not be read (see `agent_error`).
    pub agent: Option<AgentView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_error: Option<String>,
    pub dataplane: DataplaneReport,
    /// The other nodes this node tunnels or routes to.
    pub peers: Vec<Peer>,
    /// True when the agent is ready and the dataplane answers.
    pub healthy: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DataplaneReport {
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub tables_version: u64,
    pub endpoints: Vec<DpEndpoint>,
    pub pools: Vec<String>,
    /// The uplink's interface and MTU, and what carries tunnel traffic.
    pub uplink: Option<String>,
    pub uplink_mtu: Option<u32>,
    pub uplink_mode: Option<String>,
    pub routes: Vec<Route>,
    /// Traffic on the tunnel ports (`vxlan`, `ipip`, `xdp`).
    pub tunnels: Vec<Tunnel>,
    pub workers: usize,
    pub conntrack_entries: u64,
    /// Drops summed over the workers, by reason (non-zero ones).
    pub drops: BTreeMap<String, u64>,
    /// The overlay's nodes (name, underlay address), for the peer list.
    #[serde(skip)]
    overlay_nodes: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DpEndpoint {
    pub name: String,
    pub ips: Vec<String>,
    pub port: u32,
    pub worker: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Route {
    pub cidr: String,
    pub node: String,
    pub encap: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tunnel {
    pub port: String,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    pub address: String,
    pub encap: String,
    pub routes: usize,
    /// Whether the peer's tunnel answers: the dataplane counts tunnel
    /// packets per encapsulation, not per peer, so this is `unknown` for
    /// one peer — with the totals in `tunnels`.
    pub tunnel: String,
    /// The kernel's view of the way to the peer's underlay address: the
    /// next hop and its neighbour (ARP) state — `reachable` means it
    /// answered recently, `stale` that it did once, `unresolved` that it
    /// does not answer. Says the underlay works, not the tunnel.
    pub next_hop: String,
}

/// The next hop toward `ip` and its ARP state, from the kernel of the
/// namespace `ocelot status` runs in (the node's).
fn next_hop(nl: &ocelot_dataplane::sys::netlink::Session, ip: std::net::Ipv4Addr) -> String {
    use ocelot_dataplane::sys::netlink::{neighbour, route_to, NeighState};
    let (gw, oif) = match nl.run(|h| route_to(h, ip)) {
        Ok(Some(r)) => r,
        Ok(None) => return "no route".into(),
        Err(e) => return format!("unknown ({e})"),
    };
    let hop = gw.unwrap_or(ip);
    let via = if gw.is_some() { format!("gateway {hop}") } else { format!("{hop} on-link") };
    match nl.run(|h| neighbour(h, oif, hop)) {
        Ok(Some((NeighState::Valid, _))) => format!("{via}: reachable"),
        Ok(Some((NeighState::Stale, _))) => format!("{via}: stale"),
        Ok(Some((NeighState::Unresolved, _))) => format!("{via}: unresolved"),
        Ok(None) => format!("{via}: no ARP entry"),
        Err(e) => format!("{via}: unknown ({e})"),
    }
}

fn encap_name<T: Serialize>(e: &T) -> String {
    match serde_json::to_value(e) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => "?".into(),
    }
}

/// Read the dataplane's state and counters into the report.
fn dataplane(socket: &std::path::Path) -> Result<DataplaneReport, String> {
    let mut c = Client::connect(socket, "ocelot-status")
        .map_err(|e| format!("cannot connect to the dataplane at {}: {e}", socket.display()))?;
    let mut r = DataplaneReport { reachable: true, ..Default::default() };
    match c.call(Request::State).map_err(|e| format!("dataplane state: {e}"))? {
        Reply::State { tables_version, endpoints, pools, overlay, .. } => {
            r.tables_version = tables_version;
            r.pools = pools.iter().map(|p| p.to_string()).collect();
            r.endpoints = endpoints
                .iter()
                .map(|e| DpEndpoint {
                    name: e.spec.name.clone(),
                    ips: e.spec.ips.iter().map(|i| i.to_string()).collect(),
                    port: e.port,
                    worker: e.worker,
                })
                .collect();
            if let Some(o) = overlay {
                r.uplink = Some(o.uplink.clone());
                r.uplink_mtu = Some(o.uplink_mtu);
                r.uplink_mode = Some(o.uplink_mode.clone());
                r.routes = o
                    .spec
                    .routes
                    .iter()
                    .map(|rt| Route {
                        cidr: rt.cidr.to_string(),
                        node: rt.node.clone(),
                        encap: encap_name(&rt.encap),
                    })
                    .collect();
                // Peers come from the overlay: what the dataplane really has.
                r.overlay_nodes =
                    o.spec.nodes.iter().map(|n| (n.name.clone(), n.ip.to_string())).collect();
            }
        }
        other => return Err(format!("dataplane answered state with {other:?}")),
    }
    match c.call(Request::Counters).map_err(|e| format!("dataplane counters: {e}"))? {
        Reply::Counters { ports, workers, .. } => {
            r.workers = workers.len();
            r.conntrack_entries = workers.iter().map(|w| w.ct_entries).sum();
            for w in &workers {
                for (k, n) in &w.counters.drops {
                    *r.drops.entry(k.clone()).or_default() += n;
                }
            }
            r.tunnels = ports
                .iter()
                .filter(|p| {
                    matches!(
                        p.kind,
                        ocelot_dataplane::tables::PortKind::Tunnel(_)
                            | ocelot_dataplane::tables::PortKind::Uplink
                    )
                })
                .map(|p| Tunnel {
                    port: p.name.clone(),
                    rx_packets: p.counters.rx_packets,
                    tx_packets: p.counters.tx_packets,
                })
                .collect();
        }
        other => return Err(format!("dataplane answered counters with {other:?}")),
    }
    Ok(r)
}

/// The peers: the overlay's nodes (from the dataplane's state), named and
/// addressed; else the agent's list of nodes.
fn peers(dp: &DataplaneReport, agent: Option<&AgentView>) -> Vec<Peer> {
    let nodes: Vec<(String, String)> = if dp.uplink.is_some() {
        dp.overlay_nodes.clone()
    } else {
        agent
            .map(|a| {
                a.nodes
                    .iter()
                    .map(|n| (n.name.clone(), n.internal_ip.clone().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let rx: u64 = dp.tunnels.iter().map(|t| t.rx_packets).sum();
    let nl = ocelot_dataplane::sys::netlink::Session::new().ok();
    nodes
        .into_iter()
        .map(|(name, address)| {
            let routes: Vec<&Route> = dp.routes.iter().filter(|r| r.node == name).collect();
            let mut encaps: Vec<String> = routes.iter().map(|r| r.encap.clone()).collect();
            encaps.sort();
            encaps.dedup();
            let encap = if encaps.is_empty() { "-".into() } else { encaps.join(",") };
            let tunnel = if routes.is_empty() {
                "no routes to it".to_string()
            } else if routes.iter().all(|r| r.encap == "native") {
                "n/a (routed natively)".to_string()
            } else if rx == 0 {
                "unknown: no tunnel packet received from any peer yet".to_string()
            } else {
                "unknown: tunnel packets are counted per encapsulation, not per peer".to_string()
            };
            let next_hop = match (&nl, address.parse()) {
                (Some(nl), Ok(ip)) => next_hop(nl, ip),
                (None, _) => "unknown (no netlink)".into(),
                (_, Err(_)) => "unknown (no IPv4 address)".into(),
            };
            Peer { name, address, encap, routes: routes.len(), tunnel, next_hop }
        })
        .collect()
}

/// Gather the whole report; never fails (what could not be read is said).
pub fn gather(a: &StatusArgs) -> Report {
    let t = Duration::from_secs(a.timeout.max(1));
    let (agent, agent_error) = match http::get(&a.agent, "/status", t) {
        Ok((200, body)) => match serde_json::from_str::<AgentView>(&body) {
            Ok(v) => (Some(v), None),
            Err(e) => {
                (None, Some(format!("the agent's /status is not what this ocelot reads: {e}")))
            }
        },
        Ok((code, body)) => (None, Some(format!("the agent answered {code}: {}", body.trim()))),
        Err(e) => (None, Some(e)),
    };
    let dp = dataplane(&a.dataplane_socket).unwrap_or_else(|e| DataplaneReport {
        reachable: false,
        error: Some(e),
        ..Default::default()
    });
    let peers = peers(&dp, agent.as_ref());
    let healthy = dp.reachable && agent.as_ref().is_some_and(|v| v.ready);
    Report { agent, agent_error, dataplane: dp, peers, healthy }
}

/// Columns padded to their widest cell.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.to_vec()));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
}

/// The human-readable report.
pub fn render_table(r: &Report) -> String {
    let mut o = String::new();
    match &r.agent {
        Some(a) => {
            o += &format!("Ocelot on node {} (agent {}, up {}s)\n", a.node, a.version, a.uptime_s);
            if a.ready {
                o +=
                    "Agent:      ready (datastore synced, dataplane connected, endpoints synced)\n";
            } else {
                o += &format!("Agent:      NOT READY: {}\n", a.not_ready.join("; "));
            }
            if let Some(e) = &a.datastore_error {
                o += &format!("Datastore:  {e}\n");
            }
            if let Some(e) = &a.ipam_error {
                o += &format!("IPAM:       {e}\n");
            }
        }
        None => {
            o += &format!(
                "Agent:      unreachable: {}\n",
                r.agent_error.as_deref().unwrap_or("no answer")
            )
        }
    }
    let d = &r.dataplane;
    if d.reachable {
        o += &format!(
            "Dataplane:  reachable, tables version {}, {} worker(s), {} conntrack entries\n",
            d.tables_version, d.workers, d.conntrack_entries
        );
        match (&d.uplink, d.uplink_mtu, &d.uplink_mode) {
            (Some(u), Some(m), Some(mode)) => {
                o += &format!("Uplink:     {u}, MTU {m}, tunnels through {mode}\n")
            }
            _ => o += "Uplink:     no overlay set (single node, or no InternalIP yet)\n",
        }
    } else {
        o += &format!("Dataplane:  UNREACHABLE: {}\n", d.error.as_deref().unwrap_or("no answer"));
    }

    o += &format!("\nPeers ({}):\n", r.peers.len());
    if !r.peers.is_empty() {
        let rows: Vec<Vec<String>> = r
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.address.clone(),
                    p.encap.clone(),
                    p.routes.to_string(),
                    p.next_hop.clone(),
                    p.tunnel.clone(),
                ]
            })
            .collect();
        table(&mut o, &["NAME", "ADDRESS", "ENCAP", "ROUTES", "NEXT HOP", "TUNNEL"], &rows);
    }
    if !d.tunnels.is_empty() {
        let t: Vec<String> = d
            .tunnels
            .iter()
            .map(|t| format!("{} rx {} tx {}", t.port, t.rx_packets, t.tx_packets))
            .collect();
        o += &format!("  tunnel packets: {}\n", t.join(", "));
    }

    if let Some(a) = &r.agent {
        o += "\nPools:\n";
        let rows: Vec<Vec<String>> = a
            .pools
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.cidr.clone(),
                    p.encapsulation.clone(),
                    format!("{}/{}", p.blocks_here, p.blocks),
                    format!("{}/{}", p.allocated_here, p.allocated),
                    p.capacity.to_string(),
                ]
            })
            .collect();
        table(
            &mut o,
            &["NAME", "CIDR", "ENCAP", "BLOCKS here/all", "ADDRESSES here/all", "CAPACITY"],
            &rows,
        );
        o += "\nBlocks of this node:\n";
        let rows: Vec<Vec<String>> = a
            .blocks
            .iter()
            .map(|b| {
                vec![
                    b.cidr.clone(),
                    b.pool.clone(),
                    b.affinity.clone().unwrap_or_else(|| "-".into()),
                    format!("{}/{}", b.allocated_here, b.allocated),
                ]
            })
            .collect();
        table(&mut o, &["CIDR", "POOL", "AFFINITY", "ADDRESSES here/all"], &rows);
    }
    o += &format!("\nRoutes to other nodes ({}):\n", d.routes.len());
    if !d.routes.is_empty() {
        let rows: Vec<Vec<String>> = d
            .routes
            .iter()
            .map(|r| vec![r.cidr.clone(), r.node.clone(), r.encap.clone()])
            .collect();
        table(&mut o, &["CIDR", "NODE", "ENCAP"], &rows);
    }

    let pods: BTreeMap<String, String> = r
        .agent
        .iter()
        .flat_map(|a| a.endpoints.iter().map(|e| (e.name.clone(), e.pod.clone())))
        .collect();
    o += &format!("\nEndpoints ({} in the dataplane):\n", d.endpoints.len());
    if !d.endpoints.is_empty() {
        let rows: Vec<Vec<String>> = d
            .endpoints
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    pods.get(&e.name).cloned().unwrap_or_else(|| "?".into()),
                    e.ips.join(","),
                    e.worker.to_string(),
                ]
            })
            .collect();
        table(&mut o, &["NAME", "POD", "IPS", "WORKER"], &rows);
    }
    if let Some(a) = &r.agent {
        let wanted = a.endpoints.len();
        if d.reachable && wanted != d.endpoints.len() {
            o += &format!("  (the agent wants {wanted}: not converged yet)\n");
        }
        o += &format!(
            "\nPolicy:     {} NetworkPolicies ({} in namespaces with pods here); {} calculations, last {:.3} ms\n",
            a.policies.network_policies,
            a.policies.local_namespaces,
            a.policy_calc_count,
            a.policy_calc_last_s * 1000.0
        );
        for p in &a.problems {
            o += &format!("Problem:    {p}\n");
        }
        let errs: Vec<String> = a.sync_errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        o += &format!(
            "Sync errors: {}\n",
            if errs.is_empty() { "none".into() } else { errs.join(", ") }
        );
    }
    if d.reachable {
        let drops: Vec<String> = d.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        o += &format!(
            "Drops:      {}\n",
            if drops.is_empty() { "none".into() } else { drops.join(", ") }
        );
    }
    o
}

/// The subcommand.
pub fn run(a: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let r = gather(&a);
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Format::Table => print!("{}", render_table(&r)),
    }
    Ok(if r.healthy { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_reachable_is_reported_not_fatal() {
        let a = StatusArgs {
            agent: "127.0.0.1:1".into(),
            dataplane_socket: "/nonexistent/ocelot/dp.sock".into(),
            output: Format::Table,
            timeout: 1,
        };
        let r = gather(&a);
        assert!(!r.healthy);
        assert!(r.agent_error.as_deref().unwrap().contains("cannot reach the agent"));
        assert!(r.dataplane.error.as_deref().unwrap().contains("cannot connect to the dataplane"));
        let t = render_table(&r);
        assert!(
            t.contains("Agent:      unreachable") && t.contains("Dataplane:  UNREACHABLE"),
            "{t}"
        );
    }
}
