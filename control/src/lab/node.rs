//! Lab nodes: a network namespace joined to its subnet's bridge in the
//! fabric by a veth, routed through the fabric, running `ocelot-dataplane`
//! and `ocelot agent`.

use crate::lab::cluster::{progress, stop_all, Lab};
use crate::lab::names;
use crate::lab::state::{NodeState, Resource};
use crate::lab::sys::{self, ProcRef};
use crate::lab::underlay;
use crate::model::{Node, Object};
use anyhow::{bail, Context};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A node process just started, with its handle (to see it exit early).
struct Started {
    node: String,
    what: &'static str,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Child,
}

impl Lab {
    /// Write a node's object with its address as `InternalIP` and as
    /// `ocelot.dev/underlay-cidr` (with its subnet's prefix).
    pub fn write_node(&self, n: Node) -> anyhow::Result<()> {
        let st = &self.state.nodes[&n.metadata.name];
        self.write_object(&Object::Node(underlay::node_object(n, st)))
    }

    /// Build, start and wait for new nodes.
    pub fn add_nodes(&mut self, nodes: Vec<Node>, ready_timeout: Duration) -> anyhow::Result<()> {
        for n in &nodes {
            self.create_node(&n.metadata.name, underlay::node_subnet(n)?)?;
            self.write_node(n.clone())?;
        }
        let mut started = Vec::new();
        for n in &nodes {
            started.extend(self.start_node(&n.metadata.name)?);
        }
        progress!(
            "waiting for {} node(s): dataplane and agent sockets (up to {:?})",
            nodes.len(),
            ready_timeout
        );
        wait_ready(started, ready_timeout, &self.state.name)
    }

    /// The namespace, its link to its subnet's bridge, its address and
    /// default route (via the fabric router), its directories and conflist.
    fn create_node(&mut self, name: &str, subnet: u32) -> anyhow::Result<()> {
        let lab = self.state.name.clone();
        let index = self.state.free_node_index();
        let sn = self.ensure_subnet(subnet)?;
        let ip = sn.node_address(index).with_context(|| format!("node {name}"))?;
        let prefix = sn.prefix;
        let netns = names::node_netns(&lab, name);
        let dir = self.state.dir.join("nodes").join(name);
        let st = NodeState {
            name: name.to_string(),
            index,
            netns: netns.clone(),
            subnet,
            fabric_ip: ip.to_string(),
            fabric_prefix: prefix,
            dir: dir.clone(),
            dataplane: None,
            agent: None,
        };
        for sock in [st.cni_socket(), st.dataplane_socket()] {
            if sock.as_os_str().len() > names::MAX_SOCKET_PATH {
                bail!(
                    "node {name}: socket path {} is longer than {} bytes; use a shorter --run-dir, lab or node name",
                    sock.display(),
                    names::MAX_SOCKET_PATH
                );
            }
        }
        progress!(
            "node {name}: namespace {netns}, subnet {subnet}, address {ip}/{prefix}, \
             default via {}",
            sn.gateway()
        );
        self.state.nodes.insert(name.to_string(), st.clone());
        self.state.record(Resource::Netns { name: netns.clone() })?;
        sys::netns_add(&netns)?;
        sys::sysctl_in(&names::netns_path(&netns), "net.ipv4.ip_forward", "1")?;
        let fabric = names::fabric_netns(&lab);
        let port = names::bridge_port(index);
        // Both ends are created straight inside lab namespaces.
        self.state.record(Resource::Link { netns: fabric.clone(), name: port.clone() })?;
        sys::ip(&[
            "-n",
            &netns,
            "link",
            "add",
            names::NODE_UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &fabric,
        ])?;
        sys::ip(&["-n", &fabric, "link", "set", &port, "master", &sn.bridge, "up"])?;
        sys::ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/{prefix}"),
            "dev",
            names::NODE_UPLINK,
        ])?;
        sys::ip(&["-n", &netns, "link", "set", names::NODE_UPLINK, "up"])?;
        // Inside the node's namespace only; it goes with the namespace.
        let gw = sn.gateway().to_string();
        sys::ip(&["-n", &netns, "route", "add", "default", "via", &gw, "dev", names::NODE_UPLINK])?;
        std::fs::create_dir_all(dir.join("dp"))?;
        std::fs::create_dir_all(dir.join("cni"))?;
        let list = crate::lab::cni::render(&self.state.conflist, &st.cni_socket(), self.state.mtu)?;
        std::fs::write(st.conflist(), serde_json::to_string_pretty(&list)? + "\n")?;
        Ok(())
    }

    /// Start the dataplane, then the agent, in the node's namespace.
    fn start_node(&mut self, name: &str) -> anyhow::Result<Vec<Started>> {
        let st = self.state.nodes[name].clone();
        let ns = names::netns_path(&st.netns);
        progress!("node {name}: starting dataplane and agent");
        let mut dp = Command::new(self.state.bin_dir.join("ocelot-dataplane"));
        dp.arg("run")
            .arg("--state-dir")
            .arg(st.dir.join("dp"))
            .arg("--socket")
            .arg(st.dataplane_socket());
        let dp_log = st.dir.join("dataplane.log");
        let dp_child = sys::spawn_daemon(dp, &ns, &dp_log)?;
        let dp_ref = ProcRef::of(dp_child.id(), format!("dataplane {name}"));
        self.state.record(Resource::Process { proc: dp_ref.clone() })?;
        self.state.nodes.get_mut(name).expect("node").dataplane = Some(dp_ref);
        let mut agent = Command::new(self.agent_binary());
        agent
            .arg("agent")
            .arg("--node")
            .arg(name)
            .arg("--datastore")
            .arg(self.state.datastore())
            .arg("--dataplane-socket")
            .arg(st.dataplane_socket())
            .arg("--cni-socket")
            .arg(st.cni_socket())
            .arg("--service-cidr")
            .arg(&self.state.service_cidr)
            .arg("--node-port-range")
            .arg(format!("{}-{}", self.state.node_port_range.0, self.state.node_port_range.1));
        let agent_log = st.dir.join("agent.log");
        let agent_child = sys::spawn_daemon(agent, &ns, &agent_log)?;
        let agent_ref = ProcRef::of(agent_child.id(), format!("agent {name}"));
        self.state.record(Resource::Process { proc: agent_ref.clone() })?;
        self.state.nodes.get_mut(name).expect("node").agent = Some(agent_ref);
        self.state.save()?;
        Ok(vec![
            Started {
                node: name.into(),
                what: "dataplane",
                socket: st.dataplane_socket(),
                log: dp_log,
                child: dp_child,
            },
            Started {
                node: name.into(),
                what: "agent",
                socket: st.cni_socket(),
                log: agent_log,
                child: agent_child,
            },
        ])
    }

    /// `ocelot` beside the other binaries, else the one running.
    fn agent_binary(&self) -> std::path::PathBuf {
        let p = self.state.bin_dir.join("ocelot");
        if p.is_file() {
            return p;
        }
        std::env::current_exe().unwrap_or(p)
    }

    /// Stop a node's processes and remove its namespace and link.
    pub fn remove_node(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(st) = self.state.nodes.get(name).cloned() else {
            eprintln!("note: node {name} is not in the lab");
            return Ok(());
        };
        progress!("node {name}: stopping and removing");
        let procs: Vec<ProcRef> =
            [st.agent.clone(), st.dataplane.clone()].into_iter().flatten().collect();
        stop_all(&procs, Duration::from_secs(3));
        for p in procs {
            self.state.forget(&Resource::Process { proc: p })?;
        }
        sys::kill_all_in_netns(&names::netns_path(&st.netns), Duration::from_secs(2));
        let link = Resource::Link {
            netns: names::fabric_netns(&self.state.name),
            name: names::bridge_port(st.index),
        };
        sys::netns_del(&st.netns)?;
        self.state.forget(&Resource::Netns { name: st.netns.clone() })?;
        // The veth went with the namespace; make sure.
        if let Resource::Link { netns, name } = &link {
            sys::link_del(netns, name)?;
        }
        self.state.forget(&link)?;
        self.state.nodes.remove(name);
        self.state.save()?;
        let _ = std::fs::remove_dir_all(&st.dir);
        let obj = Object::Node(Node {
            metadata: crate::model::ObjectMeta { name: name.into(), ..Default::default() },
            ..Default::default()
        });
        self.remove_object(&obj)
    }
}

/// True when something accepts connections on the unix socket.
pub fn socket_ready(p: &Path) -> bool {
    UnixStream::connect(p).is_ok()
}

/// Wait until every started process accepts connections on its socket; an
/// early exit or the timeout is an error carrying the end of its log.
fn wait_ready(mut started: Vec<Started>, timeout: Duration, lab: &str) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        let mut pending = Vec::new();
        for s in &mut started {
            if socket_ready(&s.socket) {
                continue;
            }
            if let Some(status) = s.child.try_wait().context("waiting for a node process")? {
                bail!(
                    "node {}: the {} exited ({status}) before opening {}; end of {}:\n{}\
                     (`ocelot lab down --name {lab}` removes the half-built lab)",
                    s.node,
                    s.what,
                    s.socket.display(),
                    s.log.display(),
                    sys::tail(&s.log, 15)
                );
            }
            pending.push(format!("{} {}", s.what, s.node));
        }
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= end {
            let logs: String = started
                .iter()
                .filter(|s| !socket_ready(&s.socket))
                .map(|s| format!("  end of {}:\n{}", s.log.display(), sys::tail(&s.log, 8)))
                .collect();
            bail!(
                "not ready after {timeout:?}: {}\n{logs}(`ocelot lab down --name {lab}` removes the half-built lab)",
                pending.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
