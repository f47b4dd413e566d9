//! Topologies to measure on: RAII guards that build namespaces, links and
//! processes, and remove them all when dropped (namespaces are deleted with
//! every process still inside, which also removes their veth/TAP devices).
//!
//! One node: [`OcelotSameNode`], [`KernelSameNode`]. Two nodes: the kernel
//! overlays in [`overlay`], Ocelot's through the lab in [`lab`].

pub mod lab;
pub mod overlay;

use anyhow::{bail, Result};
use ocelot_tests::{sh, sh_out, wait_until, DataplaneNode, Netns};
use std::time::Duration;

/// Run a shell command; its stdout, or an error carrying its output.
pub fn cmd(c: &str) -> Result<String> {
    let out = sh_out(c);
    if !out.status.success() {
        bail!(
            "`{c}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two pods to measure between: the client sends to the server.
pub trait PodPair {
    /// Short name of the path, e.g. `ocelot` or `kernel`.
    fn label(&self) -> &str;
    /// The client's and the server's namespace and address.
    fn ends(&self) -> [(&Netns, &str); 2];

    fn client(&self) -> &Netns {
        self.ends()[0].0
    }
    fn server(&self) -> &Netns {
        self.ends()[1].0
    }
    fn client_ip(&self) -> &str {
        self.ends()[0].1
    }
    fn server_ip(&self) -> &str {
        self.ends()[1].1
    }

    /// Fail unless the client reaches the server (ARP for the gateway,
    /// forwarding and the way back all work).
    fn check_connectivity(&self) -> Result<()> {
        let ok = wait_until(Duration::from_secs(5), || self.client().ping(self.server_ip()));
        if !ok {
            bail!(
                "{}: pod {} cannot ping pod {}",
                self.label(),
                self.client_ip(),
                self.server_ip()
            );
        }
        Ok(())
    }
}

/// A pod namespace and its address.
pub struct Pod {
    pub ns: Netns,
    pub ip: String,
}

/// One node running Ocelot's dataplane, with two pods attached to it by
/// TAP devices (the same calls the CNI plugin makes).
pub struct OcelotSameNode {
    // Fields drop in order: pods first, then the node (dataplane and its
    // namespace).
    pub client: Pod,
    pub server: Pod,
    pub node: DataplaneNode,
}

impl OcelotSameNode {
    /// `node_ip` goes on the node's `lo`; `pool` is routed to the dataplane;
    /// `dp_args` are extra `ocelot-dataplane run` flags (`--cores 1`...).
    pub fn start(
        node_ip: &str,
        pool: &str,
        client_ip: &str,
        server_ip: &str,
        dp_args: &str,
    ) -> OcelotSameNode {
        let node = DataplaneNode::start("pfo-n", node_ip, pool, dp_args);
        let client = Pod { ns: node.add_pod("pfo-a", client_ip), ip: client_ip.into() };
        let server = Pod { ns: node.add_pod("pfo-b", server_ip), ip: server_ip.into() };
        OcelotSameNode { client, server, node }
    }

    /// PID of the dataplane process. The toolkit starts it with
    /// `ip netns exec NS sh -c "exec ..."`: both exec, so the PID of the
    /// child is the dataplane's; checked against its name anyway.
    pub fn dataplane_pid(&self) -> Result<u32> {
        let pid = self.node.proc.pid();
        match crate::procfs::comm(pid) {
            Some(c) if c.starts_with("ocelot-datap") => Ok(pid),
            other => bail!(
                "process {pid} is {other:?}, not the dataplane; log:\n{}",
                self.node.proc.log_text()
            ),
        }
    }
}

impl PodPair for OcelotSameNode {
    fn label(&self) -> &str {
        "ocelot"
    }
    fn ends(&self) -> [(&Netns, &str); 2] {
        [(&self.client.ns, &self.client.ip), (&self.server.ns, &self.server.ip)]
    }
}

/// MAC of the node side of every pod veth, as Calico sets it.
pub const CALICO_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// One node whose kernel forwards between two pods the way Calico programs
/// it: each pod joined to the node by a veth pair; in the pod, `eth0` with
/// the pod's /32 and routes via 169.254.1.1; on the node side, no address,
/// proxy ARP (without delay) so the node answers for 169.254.1.1, and a /32
/// route to the pod through its veth; IPv4 forwarding on.
///
/// Proxy ARP only answers when the node has a route to the asked address
/// out of another interface. On a real node that is the default route
/// through the uplink; here the uplink is a stub veth pair inside the node
/// namespace, carrying the node IP and the default route.
pub struct KernelSameNode {
    pub client: Pod,
    pub server: Pod,
    pub node: Netns,
}

impl KernelSameNode {
    pub fn start(node_ip: &str, client_ip: &str, server_ip: &str) -> KernelSameNode {
        let node = Netns::new("pfk-n");
        let n = &node.name;
        node.exec("sysctl -qw net.ipv4.ip_forward=1");
        sh(&format!("ip -n {n} link add uplink0 type veth peer name uplink1"));
        sh(&format!("ip -n {n} addr add {node_ip}/32 dev uplink0"));
        sh(&format!("ip -n {n} link set uplink1 up"));
        sh(&format!("ip -n {n} link set uplink0 up"));
        sh(&format!("ip -n {n} route add default dev uplink0"));
        let client = Pod { ns: Netns::new("pfk-a"), ip: client_ip.into() };
        let server = Pod { ns: Netns::new("pfk-b"), ip: server_ip.into() };
        let k = KernelSameNode { client, server, node };
        for (pod, host_if) in [(&k.client, "cali0"), (&k.server, "cali1")] {
            if let Err(e) = attach_calico_pod(&k.node, pod, host_if, None) {
                panic!("{e:#}");
            }
        }
        k
    }
}

/// Attach `pod` to `node` as Calico does: a veth pair, `eth0` in the pod
/// with the pod's /32, a link route to 169.254.1.1 and the default route
/// through it; on the node, `host_if` with [`CALICO_MAC`], proxy ARP
/// without delay (the node answers for 169.254.1.1; it needs a route to it
/// out of another interface, e.g. a default route) and a /32 route to the
/// pod. `mtu` goes on both ends (Calico sets the overlay's).
pub fn attach_calico_pod(node: &Netns, pod: &Pod, host_if: &str, mtu: Option<u32>) -> Result<()> {
    let (n, p, ip) = (&node.name, &pod.ns.name, &pod.ip);
    cmd(&format!("ip -n {n} link add {host_if} type veth peer name eth0 netns {p}"))?;
    cmd(&format!("ip -n {n} link set {host_if} address {CALICO_MAC}"))?;
    if let Some(mtu) = mtu {
        cmd(&format!("ip -n {n} link set {host_if} mtu {mtu}"))?;
        cmd(&format!("ip -n {p} link set eth0 mtu {mtu}"))?;
    }
    cmd(&format!(
        "ip netns exec {n} sysctl -qw net.ipv4.conf.{host_if}.proxy_arp=1 \
         net.ipv4.neigh.{host_if}.proxy_delay=0"
    ))?;
    cmd(&format!("ip -n {n} link set {host_if} up"))?;
    cmd(&format!("ip -n {n} route add {ip}/32 dev {host_if}"))?;
    cmd(&format!("ip -n {p} addr add {ip}/32 dev eth0"))?;
    cmd(&format!("ip -n {p} link set eth0 up"))?;
    cmd(&format!("ip -n {p} route add 169.254.1.1 dev eth0 scope link"))?;
    cmd(&format!("ip -n {p} route add default via 169.254.1.1 dev eth0"))?;
    Ok(())
}

impl PodPair for KernelSameNode {
    fn label(&self) -> &str {
        "kernel"
    }
    fn ends(&self) -> [(&Netns, &str); 2] {
        [(&self.client.ns, &self.client.ip), (&self.server.ns, &self.server.ip)]
    }
}
