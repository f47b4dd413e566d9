//! `ocelot lab`: a cluster without Kubernetes, on one machine.
//!
//! Each Node is a network namespace running `ocelot-dataplane` and
//! `ocelot agent`, joined to a fabric namespace (a bridge per underlay
//! subnet, and a router between them, see `underlay.rs`) by a veth; each
//! Pod is a network namespace attached by the real CNI chain (the
//! `ocelot-cni` plugin, then portmap and bandwidth), executed the way
//! containerd executes it, from the node's namespace; in each pod a small
//! server answers on its containerPorts with the pod's name. The datastore
//! is a directory of YAML shared by every node's agent.
//!
//! ```text
//!  fabric netns: bridge ocl-br0 ── ocl-n1 ═veth═ ocl-fab (192.0.2.11) node-1 netns
//!   (routes      (192.0.2.1)    └─ ocl-n2 ═veth═ ocl-fab (192.0.2.12) node-2 netns
//!   between      bridge ocl-br1 ── ocl-n3 ═veth═ ocl-fab (198.51.100.13) node-3 netns
//!   subnets)     (198.51.100.1)     (a Node annotated lab.ocelot.dev/subnet: "1")
//!  node netns: ocelot-dataplane (dp.sock), ocelot agent (cni.sock), runs the CNI plugins
//!  pod netns:  eth0 (a TAP of the node's dataplane), `ocelot lab serve`
//! ```
//!
//! Everything lives under `<run-dir>/<lab>/` (default `/run/ocelot-lab/default`):
//! `state.json` (what was made, recorded before making it), `datastore/`,
//! `nodes/<node>/` (sockets, logs, rendered conflist, dataplane state),
//! `pods/<ns>.<name>/` (CNI and server logs), `cni-bin/`.

pub mod cluster;
pub mod cni;
pub mod connect;
pub mod dns;
pub mod external;
pub mod names;
pub mod node;
pub mod pod;
pub mod probe;
pub mod sctp;
pub mod sctp_wire;
pub mod serve;
pub mod services;
pub mod state;
pub mod sys;
pub mod underlay;

use anyhow::{bail, Context};
use clap::ValueEnum;
use cluster::{Lab, Objects, UpOptions};
use probe::{Peer, Protocol};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// Which lab.
#[derive(clap::Args, Debug, Clone)]
pub struct LabRef {
    /// Name of the lab (several can run side by side).
    #[arg(long, env = "OCELOT_LAB", default_value = "default", global = true)]
    pub name: String,
    /// Where labs keep their state, datastore, sockets and logs.
    #[arg(long, env = "OCELOT_LAB_DIR", default_value = "/run/ocelot-lab", global = true)]
    pub run_dir: PathBuf,
}

/// `ocelot lab up` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub lab: LabRef,
    /// Multi-document Kubernetes YAML: Nodes, Namespaces, Pods, IPPools (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Where `ocelot-dataplane`, `ocelot-cni` and `ocelot` are [default: the
    /// directory of this executable].
    #[arg(long, env = "OCELOT_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Where the standard CNI plugins (portmap, bandwidth) are.
    #[arg(long, env = "OCELOT_CNI_PLUGIN_DIR", default_value = "/usr/lib/cni")]
    pub cni_plugin_dir: PathBuf,
    /// Conflist template [default: the shipped manifests/cni/10-ocelot.conflist].
    #[arg(long)]
    pub conflist: Option<PathBuf>,
    /// MTU written into each node's conflist for the pods' interfaces;
    /// 0 (the default) leaves it out, and the agent picks the uplink's MTU
    /// minus the encapsulation overhead.
    #[arg(long, default_value_t = 0)]
    pub mtu: u32,
    /// Subnet of the fabric joining the nodes (nodes get .11, .12, ...):
    /// underlay subnet 0, bridge ocl-br0, router at .1.
    #[arg(long, default_value = "192.0.2.0/24")]
    pub fabric_cidr: String,
    /// Underlay subnets 1, 2, ..., for Nodes annotated
    /// `lab.ocelot.dev/subnet: "<k>"`; the fabric routes between all subnets
    /// (each bridge holds its subnet's .1, every node's default route).
    #[arg(long, value_delimiter = ',', default_value = underlay::DEFAULT_SUBNET_CIDRS)]
    pub subnet_cidrs: Vec<String>,
    /// Seconds to wait for every node's dataplane and agent sockets.
    #[arg(long, default_value_t = 30)]
    pub ready_timeout: u64,
    /// The Service cluster-IP range: Services without `clusterIP` get one
    /// from it, and the agents forward it.
    #[arg(long, default_value = crate::services::DEFAULT_SERVICE_CIDR,
          value_parser = crate::agent::services::parse_service_cidr)]
    pub service_cidr: ocelot_dataplane::api::Cidr,
    /// The NodePort range, FIRST-LAST.
    #[arg(long, default_value = "30000-32767", value_parser = crate::services::parse_port_range)]
    pub node_port_range: (u16, u16),
}

/// `ocelot lab apply` / `delete` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct FileArgs {
    #[command(flatten)]
    pub lab: LabRef,
    /// Multi-document Kubernetes YAML (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Seconds to wait for new nodes' sockets.
    #[arg(long, default_value_t = 30)]
    pub ready_timeout: u64,
}

/// `ocelot lab down` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DownArgs {
    #[command(flatten)]
    pub lab: LabRef,
    /// Skip the CNI DEL of every pod (faster; everything is removed anyway).
    #[arg(long)]
    pub no_cni_del: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GetKind {
    #[value(alias = "pod", alias = "po")]
    Pods,
    #[value(alias = "node", alias = "no")]
    Nodes,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "external", alias = "ext")]
    Externals,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Wide,
    Json,
}

/// `ocelot lab get` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct GetArgs {
    #[command(flatten)]
    pub lab: LabRef,
    /// What to list.
    #[arg(value_enum)]
    pub kind: GetKind,
    #[arg(short, long, value_enum)]
    pub output: Option<Output>,
}

/// `ocelot lab exec` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ExecArgs {
    #[command(flatten)]
    pub lab: LabRef,
    /// The pod, `namespace/name` (`name` alone means namespace `default`).
    pub pod: String,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// `ocelot lab probe` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub lab: LabRef,
    /// Port to probe [default: every declared containerPort].
    #[arg(long)]
    pub port: Option<u16>,
    /// Protocol to probe [default: as declared for the port, else TCP].
    #[arg(long, value_parser = Protocol::parse)]
    pub protocol: Option<Protocol>,
    /// `json`: one object per port and protocol (`{"port", "protocol", "matrix"}`), in an array.
    #[arg(short, long)]
    pub output: Option<ProbeOutput>,
    /// Per-probe timeout, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Also list every pair that was not reached, and why.
    #[arg(short, long)]
    pub verbose: bool,
    /// Reach each pod through the cluster IP of a Service of its own (one
    /// whose EndpointSlices list that pod alone, on the same port) rather
    /// than at its address; a pod without one is not probed.
    #[arg(long)]
    pub via_services: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProbeOutput {
    Json,
}

/// `ocelot lab external` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ExternalArgs {
    #[command(flatten)]
    pub lab: LabRef,
    #[command(subcommand)]
    pub cmd: ExternalCmd,
}

/// `ocelot lab external` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ExternalCmd {
    /// Attach a namespace outside the cluster to an underlay subnet (a
    /// client of NodePorts, a server for pods leaving the cluster).
    Add(ExternalAddArgs),
    /// Remove it.
    Delete(ExternalDeleteArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ExternalAddArgs {
    /// Its name (namespace `ocl-<lab>-ext-<name>`; it answers as `external/<name>`).
    #[arg(value_name = "NAME")]
    pub external: String,
    /// The underlay subnet it joins (0 is the fabric CIDR).
    #[arg(long, default_value_t = 0)]
    pub subnet: u32,
    /// A port to serve, `PORT[/PROTOCOL]`; repeatable.
    #[arg(long = "port", value_parser = serve::parse_port)]
    pub ports: Vec<(u16, Protocol)>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ExternalDeleteArgs {
    #[arg(value_name = "NAME")]
    pub external: String,
}

/// `ocelot lab connect` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub lab: LabRef,
    /// Where from: a pod (`namespace/name`), `node/<node>` or `external/<name>`.
    pub from: String,
    /// Where to: `IP:PORT`.
    pub to: std::net::SocketAddr,
    #[arg(long, value_parser = Protocol::parse, default_value = "TCP")]
    pub protocol: Protocol,
    /// How many connections (or datagrams).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// How many at a time.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Per attempt, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// UDP: ask a DNS question (TXT) instead of the lab's probe datagram.
    #[arg(long)]
    pub dns: bool,
    #[arg(short, long)]
    pub output: Option<ProbeOutput>,
}

/// Lab subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum LabCmd {
    /// Build a lab from a YAML file: nodes (namespaces with a dataplane and
    /// an agent), pods (namespaces attached through the CNI chain), pools.
    Up(UpArgs),
    /// Add or change objects in a running lab (new pods are attached, new
    /// nodes started; label changes only rewrite the datastore).
    Apply(FileArgs),
    /// Remove the objects of a file from a running lab (pods get CNI DEL).
    Delete(FileArgs),
    /// Remove everything the lab made: processes, namespaces, links, files.
    Down(DownArgs),
    /// List pods or nodes.
    Get(GetArgs),
    /// Run a command inside a pod's network namespace; its exit code is ours.
    Exec(ExecArgs),
    /// Connect from every pod to every pod and print the reachability matrix.
    Probe(ProbeArgs),
    /// Many connections from one pod, node or external to one address:
    /// who answered, what was refused, what timed out.
    Connect(ConnectArgs),
    /// Namespaces outside the cluster, on the fabric.
    External(ExternalArgs),
    /// The server run in each pod (internal).
    #[command(hide = true)]
    Serve(serve::ServeArgs),
}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up(a) => up(a),
        LabCmd::Apply(a) => {
            let objs = Objects::read(&a.file)?;
            let mut lab = Lab::open(&a.lab.run_dir, &a.lab.name)?;
            lab.apply_objects(objs, Duration::from_secs(a.ready_timeout))
        }
        LabCmd::Delete(a) => {
            let objs = Objects::read(&a.file)?;
            let mut lab = Lab::open(&a.lab.run_dir, &a.lab.name)?;
            lab.delete_objects(objs)
        }
        LabCmd::Down(a) => cluster::down(&a.lab.run_dir, &a.lab.name, !a.no_cni_del),
        LabCmd::Get(a) => get(a),
        LabCmd::Exec(a) => exec(a),
        LabCmd::Probe(a) => probe_cmd(a),
        LabCmd::Connect(a) => connect_cmd(a),
        LabCmd::External(ExternalArgs { lab: r, cmd: ExternalCmd::Add(a) }) => {
            let mut lab = Lab::open(&r.run_dir, &r.name)?;
            let ports = a
                .ports
                .iter()
                .map(|(p, pr)| state::PortSpec { port: *p, protocol: pr.as_str().into() })
                .collect();
            let e = lab.add_external(&a.external, a.subnet, ports)?;
            println!("{}", serde_json::to_string_pretty(&e)?);
            Ok(())
        }
        LabCmd::External(ExternalArgs { lab: r, cmd: ExternalCmd::Delete(a) }) => {
            Lab::open(&r.run_dir, &r.name)?.remove_external(&a.external)
        }
        LabCmd::Serve(a) => serve::run(a),
    }
}

fn up(a: UpArgs) -> anyhow::Result<()> {
    let objs = Objects::read(&a.file)?;
    let bin_dir = match a.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .context("finding this executable")?
            .parent()
            .context("the executable has no directory")?
            .to_path_buf(),
    };
    let opts = UpOptions {
        bin_dir,
        cni_plugin_dir: a.cni_plugin_dir,
        conflist: a.conflist,
        mtu: a.mtu,
        fabric_cidr: a.fabric_cidr,
        subnet_cidrs: a.subnet_cidrs,
        ready_timeout: Duration::from_secs(a.ready_timeout),
        service_cidr: a.service_cidr.to_string(),
        node_port_range: a.node_port_range,
    };
    let lab = Lab::up(&a.lab.run_dir, &a.lab.name, &opts, objs)?;
    eprintln!(
        "==> lab {} is up: {} nodes, {} pods (state in {})",
        lab.state.name,
        lab.state.nodes.len(),
        lab.state.pods.len(),
        lab.state.dir.display()
    );
    print!("{}", pods_table(&lab.state, false));
    Ok(())
}

/// `get pods` as a table.
pub fn pods_table(s: &state::LabState, wide: bool) -> String {
    let mut rows = vec![if wide {
        vec!["NAMESPACE", "NAME", "NODE", "IP", "STATUS", "PORTS", "CONTAINER", "NETNS"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    } else {
        ["NAMESPACE", "NAME", "NODE", "IP", "STATUS"].into_iter().map(String::from).collect()
    }];
    for p in s.pods.values() {
        let ip = if p.ips.is_empty() { "<none>".to_string() } else { p.ips.join(",") };
        let mut r =
            vec![p.namespace.clone(), p.name.clone(), p.node.clone(), ip, p.phase.name().into()];
        if wide {
            let ports: Vec<String> =
                p.ports.iter().map(|x| format!("{}/{}", x.port, x.protocol)).collect();
            r.push(if ports.is_empty() { "-".into() } else { ports.join(",") });
            r.push(p.container_id.chars().take(12).collect());
            r.push(p.netns.clone());
        }
        rows.push(r);
    }
    let mut out = table(&rows);
    if wide {
        for p in s.pods.values() {
            if let state::PodPhase::Failed { reason } = &p.phase {
                out.push_str(&format!("{}: {}\n", p.key(), reason.lines().next().unwrap_or("")));
            }
        }
    }
    out
}

fn nodes_table(s: &state::LabState, wide: bool) -> String {
    let mut rows: Vec<Vec<String>> =
        vec![["NAME", "INTERNAL-IP", "SUBNET", "DATAPLANE", "AGENT", "PODS"]
            .into_iter()
            .map(String::from)
            .collect()];
    if wide {
        rows[0].push("NETNS".into());
        rows[0].push("DIR".into());
    }
    let status = |p: &Option<sys::ProcRef>| match p {
        Some(p) if p.alive() => format!("running ({})", p.pid),
        Some(p) => format!("dead ({})", p.pid),
        None => "-".into(),
    };
    for n in s.nodes.values() {
        let pods = s.pods.values().filter(|p| p.node == n.name).count();
        let mut r = vec![
            n.name.clone(),
            n.fabric_ip.clone(),
            format!("{} ({})", n.subnet, subnet_cidr(n)),
            status(&n.dataplane),
            status(&n.agent),
            pods.to_string(),
        ];
        if wide {
            r.push(n.netns.clone());
            r.push(n.dir.display().to_string());
        }
        rows.push(r);
    }
    table(&rows)
}

/// The network of a node's subnet, from its address and prefix.
fn subnet_cidr(n: &state::NodeState) -> String {
    match underlay::parse_cidr(&n.underlay_cidr()) {
        Ok((base, prefix)) => format!("{base}/{prefix}"),
        Err(_) => "?".into(),
    }
}

/// Left-aligned columns separated by three spaces, like kubectl.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> =
            r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn get(a: GetArgs) -> anyhow::Result<()> {
    let s = Lab::read(&a.lab.run_dir, &a.lab.name)?;
    match (a.kind, a.output) {
        (GetKind::Pods, Some(Output::Json)) => {
            let v: Vec<serde_json::Value> = s
                .pods
                .values()
                .map(|p| {
                    serde_json::json!({
                        "namespace": p.namespace, "name": p.name, "node": p.node,
                        "ip": p.ips.first(), "ips": p.ips, "status": p.phase.name(),
                        "reason": match &p.phase { state::PodPhase::Failed { reason } => Some(reason), _ => None },
                        "ports": p.ports, "containerID": p.container_id, "uid": p.uid,
                        "netns": p.netns_path(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        (GetKind::Pods, o) => print!("{}", pods_table(&s, o == Some(Output::Wide))),
        (GetKind::Nodes, Some(Output::Json)) => {
            let v: Vec<serde_json::Value> = s
                .nodes
                .values()
                .map(|n| {
                    serde_json::json!({
                        "name": n.name, "internalIP": n.fabric_ip, "netns": names::netns_path(&n.netns),
                        "subnet": n.subnet, "subnetCIDR": subnet_cidr(n),
                        "underlayCIDR": n.underlay_cidr(),
                        "dataplaneSocket": n.dataplane_socket(), "cniSocket": n.cni_socket(),
                        "dataplane": n.dataplane, "agent": n.agent, "dir": n.dir,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        (GetKind::Nodes, o) => print!("{}", nodes_table(&s, o == Some(Output::Wide))),
        (GetKind::Services, o) => {
            let ds = crate::datastore::DirDatastore::open(&s.datastore())?;
            let c = crate::datastore::Datastore::cluster(&ds);
            if o == Some(Output::Json) {
                let v: Vec<serde_json::Value> = c
                    .services
                    .values()
                    .map(|svc| {
                        let eps = service_endpoints(c, svc);
                        serde_json::json!({
                            "namespace": svc.namespace(), "name": svc.metadata.name,
                            "type": svc.spec.kind.as_deref().unwrap_or("ClusterIP"),
                            "clusterIP": svc.spec.cluster_ip, "clusterIPs": svc.spec.cluster_ips,
                            "externalIPs": svc.spec.external_ips, "ports": svc.spec.ports,
                            "endpoints": eps,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", services_table(c));
            }
        }
        (GetKind::Externals, Some(Output::Json)) => {
            println!("{}", serde_json::to_string_pretty(&s.externals.values().collect::<Vec<_>>())?)
        }
        (GetKind::Externals, _) => {
            let mut rows = vec![["NAME", "IP", "SUBNET", "NETNS", "PORTS"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()];
            for e in s.externals.values() {
                let ports: Vec<String> =
                    e.ports.iter().map(|x| format!("{}/{}", x.port, x.protocol)).collect();
                rows.push(vec![
                    e.name.clone(),
                    e.ip.clone(),
                    e.subnet.to_string(),
                    e.netns.clone(),
                    if ports.is_empty() { "-".into() } else { ports.join(",") },
                ]);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(())
}

/// The ready endpoints of a Service, `ip:port` (from its EndpointSlices).
fn service_endpoints(c: &crate::datastore::Cluster, svc: &crate::model::Service) -> Vec<String> {
    let mut v = Vec::new();
    for sl in c.endpoint_slices.values().filter(|sl| sl.service_key() == Some(svc.key())) {
        for e in sl.endpoints.iter().filter(|e| e.conditions.ready != Some(false)) {
            for a in &e.addresses {
                match sl.ports.first().and_then(|p| p.port) {
                    Some(p) => v.push(format!("{a}:{p}")),
                    None => v.push(a.clone()),
                }
            }
        }
    }
    v.sort();
    v
}

/// Each pod that is the only endpoint of some Service, with that Service's
/// cluster IP (the first such Service by name). Services that map ports
/// elsewhere are not used: a probe keeps its port.
fn own_services(
    s: &state::LabState,
) -> anyhow::Result<std::collections::BTreeMap<String, std::net::IpAddr>> {
    let ds = crate::datastore::DirDatastore::open(&s.datastore())?;
    let c = crate::datastore::Datastore::cluster(&ds);
    let mut out = std::collections::BTreeMap::new();
    for svc in c.services.values() {
        let Some(ip) = svc.spec.cluster_ip.as_deref().and_then(|a| a.parse().ok()) else {
            continue;
        };
        let same_ports = svc.spec.ports.iter().all(|p| match &p.target_port {
            None => true,
            Some(crate::model::IntOrString::Int(n)) => *n == p.port,
            Some(crate::model::IntOrString::Str(_)) => false,
        });
        let pods: BTreeSet<String> = c
            .endpoint_slices
            .values()
            .filter(|sl| sl.service_key() == Some(svc.key()))
            .flat_map(|sl| sl.endpoints.iter())
            .filter_map(|e| e.target_ref.as_ref().filter(|r| r.kind == "Pod"))
            .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or(svc.namespace()), r.name))
            .collect();
        if same_ports && pods.len() == 1 {
            let pod = pods.into_iter().next().expect("one");
            out.entry(pod).or_insert(ip);
        }
    }
    Ok(out)
}

/// `get services` as kubectl prints it.
fn services_table(c: &crate::datastore::Cluster) -> String {
    let mut rows: Vec<Vec<String>> =
        vec![["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "ENDPOINTS"]
            .into_iter()
            .map(String::from)
            .collect()];
    for svc in c.services.values() {
        let ports: Vec<String> = svc
            .spec
            .ports
            .iter()
            .map(|p| match p.node_port {
                Some(np) => format!("{}:{np}/{}", p.port, p.protocol),
                None => format!("{}/{}", p.port, p.protocol),
            })
            .collect();
        let eps = service_endpoints(c, svc);
        let eps = match eps.len() {
            0 => "<none>".to_string(),
            n if n > 3 => format!("{} + {} more", eps[..3].join(","), n - 3),
            _ => eps.join(","),
        };
        let ext = if svc.spec.external_ips.is_empty() {
            "<none>".to_string()
        } else {
            svc.spec.external_ips.join(",")
        };
        rows.push(vec![
            svc.namespace().to_string(),
            svc.metadata.name.clone(),
            svc.spec.kind.clone().unwrap_or_else(|| "ClusterIP".into()),
            svc.spec.cluster_ip.clone().unwrap_or_else(|| "<none>".into()),
            ext,
            ports.join(","),
            eps,
        ]);
    }
    table(&rows)
}

/// The namespace of a pod, `node/<node>` or `external/<name>`.
fn source_netns(s: &state::LabState, from: &str) -> anyhow::Result<PathBuf> {
    if let Some(n) = from.strip_prefix("node/") {
        let node = s.nodes.get(n).with_context(|| format!("no node {n} in lab {:?}", s.name))?;
        return Ok(names::netns_path(&node.netns));
    }
    if let Some(e) = from.strip_prefix("external/") {
        if let Some(x) = s.externals.get(e) {
            return Ok(names::netns_path(&x.netns));
        }
    }
    let key = pod_key(from);
    let p = s.pods.get(&key).with_context(|| {
        format!("no pod {key} in lab {:?} (nor node/<name>, external/<name>)", s.name)
    })?;
    Ok(p.netns_path())
}

fn connect_cmd(a: ConnectArgs) -> anyhow::Result<()> {
    let s = Lab::read(&a.lab.run_dir, &a.lab.name)?;
    let ns = source_netns(&s, &a.from)?;
    let sum = connect::run(
        &ns,
        a.to,
        a.protocol,
        a.dns,
        a.count,
        a.parallel,
        Duration::from_millis(a.timeout_ms),
    )?;
    if a.output == Some(ProbeOutput::Json) {
        println!("{}", serde_json::to_string_pretty(&sum)?);
    } else {
        print!("{}", sum.render());
    }
    Ok(())
}

/// `ns/name`, or `name` in `default`.
fn pod_key(s: &str) -> String {
    if s.contains('/') {
        s.to_string()
    } else {
        format!("default/{s}")
    }
}

fn exec(a: ExecArgs) -> anyhow::Result<()> {
    let s = Lab::read(&a.lab.run_dir, &a.lab.name)?;
    let key = pod_key(&a.pod);
    let Some(p) = s.pods.get(&key) else {
        bail!("no pod {key} in lab {:?} (`ocelot lab get pods` lists them)", s.name);
    };
    let ns = p.netns_path();
    if !ns.exists() {
        bail!("pod {key} has no network namespace ({}; status {})", ns.display(), p.phase.name());
    }
    let mut cmd = std::process::Command::new(&a.command[0]);
    cmd.args(&a.command[1..]);
    let _ns = sys::enter_on_spawn(&mut cmd, &ns, false)?;
    let status =
        cmd.status().with_context(|| format!("running {:?} in pod {key}", a.command[0]))?;
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    std::process::exit(code);
}

/// The (port, protocol) pairs to probe.
pub fn probe_targets(
    declared: &BTreeSet<(u16, Protocol)>,
    port: Option<u16>,
    protocol: Option<Protocol>,
) -> Vec<(u16, Protocol)> {
    match (port, protocol) {
        (Some(p), Some(pr)) => vec![(p, pr)],
        (Some(p), None) => {
            let v: Vec<_> = declared.iter().filter(|(dp, _)| *dp == p).copied().collect();
            if v.is_empty() {
                vec![(p, Protocol::Tcp)]
            } else {
                v
            }
        }
        (None, Some(pr)) => declared.iter().filter(|(_, dpr)| *dpr == pr).copied().collect(),
        (None, None) => declared.iter().copied().collect(),
    }
}

fn probe_cmd(a: ProbeArgs) -> anyhow::Result<()> {
    let s = Lab::read(&a.lab.run_dir, &a.lab.name)?;
    let running: Vec<&state::PodState> =
        s.pods.values().filter(|p| p.phase == state::PodPhase::Running).collect();
    let skipped: Vec<String> =
        s.pods.values().filter(|p| p.phase != state::PodPhase::Running).map(|p| p.key()).collect();
    if !skipped.is_empty() {
        eprintln!("note: not probing pods that are not running: {}", skipped.join(", "));
    }
    if running.is_empty() {
        bail!("no running pods to probe");
    }
    let declared: BTreeSet<(u16, Protocol)> = running
        .iter()
        .flat_map(|p| p.ports.iter())
        .filter_map(|x| Protocol::parse(&x.protocol).ok().map(|pr| (x.port, pr)))
        .collect();
    let targets = probe_targets(&declared, a.port, a.protocol);
    if targets.is_empty() {
        bail!("no pod declares a containerPort to probe (give --port)");
    }
    let own = if a.via_services { own_services(&s)? } else { Default::default() };
    let peers: Vec<Peer> = running
        .iter()
        .map(|p| Peer {
            key: p.key(),
            netns: p.netns_path(),
            ip: if a.via_services {
                own.get(&p.key()).copied()
            } else {
                p.ips.first().and_then(|ip| ip.parse().ok())
            },
        })
        .collect();
    let t0 = std::time::Instant::now();
    let ms = probe::run_many(&peers, &targets, Duration::from_millis(a.timeout_ms));
    if a.output == Some(ProbeOutput::Json) {
        println!("{}", serde_json::to_string_pretty(&probe::to_json(&ms))?);
        return Ok(());
    }
    for m in &ms {
        print!("{}", m.render());
        if a.verbose {
            for f in m.failures() {
                println!("  {f}");
            }
        }
        println!();
    }
    println!("{}", probe::LEGEND);
    eprintln!(
        "probed {} pairs on {} port(s) in {:.1}s",
        peers.len() * peers.len(),
        ms.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_target_selection() {
        let declared: BTreeSet<(u16, Protocol)> =
            [(80, Protocol::Tcp), (81, Protocol::Udp), (80, Protocol::Udp)].into_iter().collect();
        assert_eq!(probe_targets(&declared, None, None).len(), 3);
        assert_eq!(
            probe_targets(&declared, Some(80), None),
            [(80, Protocol::Tcp), (80, Protocol::Udp)]
        );
        assert_eq!(probe_targets(&declared, Some(9000), None), [(9000, Protocol::Tcp)]);
        assert_eq!(
            probe_targets(&declared, None, Some(Protocol::Udp)),
            [(80, Protocol::Udp), (81, Protocol::Udp)]
        );
        assert_eq!(
            probe_targets(&declared, Some(82), Some(Protocol::Sctp)),
            [(82, Protocol::Sctp)]
        );
    }

    #[test]
    fn pod_keys() {
        assert_eq!(pod_key("x/a"), "x/a");
        assert_eq!(pod_key("a"), "default/a");
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["NAME".to_string(), "IP".to_string()],
            vec!["long-name".to_string(), "10.0.0.1".to_string()],
        ];
        assert_eq!(table(&rows), "NAME        IP\nlong-name   10.0.0.1\n");
    }

    #[test]
    fn cli_parses() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(subcommand)]
            cmd: LabCmd,
        }
        let t =
            T::try_parse_from(["lab", "exec", "x/a", "--", "iperf3", "-c", "10.65.0.2"]).unwrap();
        let LabCmd::Exec(e) = t.cmd else { panic!() };
        assert_eq!(e.pod, "x/a");
        assert_eq!(e.command, ["iperf3", "-c", "10.65.0.2"]);
        let t =
            T::try_parse_from(["lab", "probe", "--port", "81", "--protocol", "udp", "-o", "json"])
                .unwrap();
        let LabCmd::Probe(p) = t.cmd else { panic!() };
        assert_eq!(
            (p.port, p.protocol, p.output),
            (Some(81), Some(Protocol::Udp), Some(ProbeOutput::Json))
        );
        let t = T::try_parse_from(["lab", "get", "po", "-o", "wide", "--name", "e2e"]).unwrap();
        let LabCmd::Get(g) = t.cmd else { panic!() };
        assert_eq!(
            (g.kind, g.output, g.lab.name.as_str()),
            (GetKind::Pods, Some(Output::Wide), "e2e")
        );
        let t = T::try_parse_from([
            "lab", "serve", "--pod", "x/a", "--port", "80/TCP", "--port", "81/UDP",
        ])
        .unwrap();
        let LabCmd::Serve(s) = t.cmd else { panic!() };
        assert_eq!(s.ports, [(80, Protocol::Tcp), (81, Protocol::Udp)]);
        let t = T::try_parse_from([
            "lab", "external", "add", "outside", "--name", "e2e", "--port", "80", "--subnet", "1",
        ])
        .unwrap();
        let LabCmd::External(ExternalArgs { lab, cmd: ExternalCmd::Add(e) }) = t.cmd else {
            panic!()
        };
        assert_eq!((e.external.as_str(), lab.name.as_str(), e.subnet), ("outside", "e2e", 1));
        let t = T::try_parse_from([
            "lab",
            "external",
            "--name",
            "e2e",
            "--run-dir",
            "/tmp/x",
            "add",
            "outside",
        ])
        .unwrap();
        let LabCmd::External(ExternalArgs { lab, .. }) = t.cmd else { panic!() };
        assert_eq!(lab.name, "e2e");
        let t = T::try_parse_from([
            "lab",
            "connect",
            "svc/client",
            "10.96.0.2:53",
            "--protocol",
            "udp",
            "--dns",
            "--count",
            "5",
        ])
        .unwrap();
        let LabCmd::Connect(c) = t.cmd else { panic!() };
        assert_eq!((c.protocol, c.dns, c.count), (Protocol::Udp, true, 5));
        assert!(T::try_parse_from(["lab", "get", "svc"]).is_ok());
        assert!(T::try_parse_from(["lab", "external", "delete", "outside"]).is_ok());
        let t = T::try_parse_from(["lab", "up", "-f", "x.yaml"]).unwrap();
        let LabCmd::Up(u) = t.cmd else { panic!() };
        assert_eq!(u.subnet_cidrs, ["198.51.100.0/24", "203.0.113.0/24"]);
        let t =
            T::try_parse_from(["lab", "up", "-f", "x", "--subnet-cidrs", "10.9.0.0/24"]).unwrap();
        let LabCmd::Up(u) = t.cmd else { panic!() };
        assert_eq!(u.subnet_cidrs, ["10.9.0.0/24"]);
    }
}
