//! Two nodes whose kernels carry pod-to-pod traffic across an underlay the
//! way Calico programs Linux, with VXLAN (`vxlan.calico`) or IPIP (`tunl0`).
//!
//! ```text
//!  pod A netns           node 1 netns                       node 2 netns            pod B netns
//!  eth0 ═══veth═══ cali0   vxlan.calico   uplink0 ═══veth═══ uplink0   vxlan.calico   cali0 ═══veth═══ eth0
//!  10.65.0.1/32            (or tunl0)     192.0.2.11/24      192.0.2.12/24 (or tunl0)            10.65.0.65/32
//! ```
//!
//! Each node owns one block of the pool (`10.65.0.0/26`, `10.65.0.64/26`),
//! routes it to a blackhole, and takes its first address as the tunnel's
//! own (as Calico allocates it); the pod gets the next one. Routes to the
//! other node's block:
//!
//! * VXLAN: `<block> via <remote tunnel ip> dev vxlan.calico onlink`, a
//!   permanent neighbour `<remote tunnel ip> → <remote VTEP MAC>` and a
//!   permanent FDB entry `<remote VTEP MAC> → dst <remote node ip>`;
//!   `vxlan.calico` is VNI 4096, port 4789, `nolearning`, MTU uplink − 50.
//! * IPIP: `<block> via <remote node ip> dev tunl0 onlink` through the
//!   kernel's fallback device `tunl0`, MTU uplink − 20.
//!
//! Pods are attached by [`attach_calico_pod`] with the tunnel's MTU.

use super::{attach_calico_pod, cmd, Pod, PodPair};
use crate::tools;
use anyhow::{bail, Context, Result};
use ocelot_tests::{sh_out, wait_until, Netns};
use std::net::Ipv4Addr;
use std::time::Duration;

/// The encapsulation between the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Encap {
    Vxlan,
    Ipip,
}

impl Encap {
    pub fn name(self) -> &'static str {
        match self {
            Encap::Vxlan => "vxlan",
            Encap::Ipip => "ipip",
        }
    }

    /// Bytes the encapsulation adds: outer IPv4 (20), plus UDP (8), VXLAN
    /// (8) and the inner Ethernet header (14) for VXLAN.
    pub fn overhead(self) -> u32 {
        match self {
            Encap::Vxlan => 50,
            Encap::Ipip => 20,
        }
    }

    /// The pods' (and the tunnel device's) MTU over an uplink of `uplink`.
    pub fn mtu(self, uplink: u32) -> u32 {
        uplink - self.overhead()
    }

    /// The tunnel device Calico uses.
    pub fn device(self) -> &'static str {
        match self {
            Encap::Vxlan => "vxlan.calico",
            Encap::Ipip => "tunl0",
        }
    }
}

/// MTU of the underlay links (the lab's fabric has the same).
pub const UPLINK_MTU: u32 = 1500;
/// The node's underlay interface.
pub const UPLINK: &str = "uplink0";
/// Calico's VXLAN network identifier and UDP port.
pub const VXLAN_VNI: u32 = 4096;
pub const VXLAN_PORT: u16 = 4789;

/// The addresses of one node and its pod.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodePlan {
    /// Underlay address and prefix length.
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// The node's block of the pool.
    pub block: Ipv4Addr,
    pub block_size: u8,
    /// The tunnel device's address: the block's first.
    pub tunnel_ip: Ipv4Addr,
    /// The pod's address: the block's second.
    pub pod_ip: Ipv4Addr,
    /// The VXLAN device's MAC (locally administered, fixed per node).
    pub vtep_mac: String,
}

impl NodePlan {
    pub fn block_cidr(&self) -> String {
        format!("{}/{}", self.block, self.block_size)
    }
}

/// `a.b.c.d/n` with no host bits set.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, n) = s.split_once('/').with_context(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
    let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?}: bad address"))?;
    let len: u8 =
        n.parse().ok().filter(|n| *n <= 32).with_context(|| format!("{s:?}: bad prefix"))?;
    if u32::from(addr) & !mask(len) != 0 {
        bail!("{s:?} has host bits set");
    }
    Ok((addr, len))
}

fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

/// The two nodes' addresses: node `i` (0, 1) gets underlay address `.11 +
/// i` (as the lab numbers its nodes), block `i` of `pool`, its first
/// address for the tunnel and the next for the pod.
pub fn plan(pool: &str, block_size: u8, underlay: &str) -> Result<[NodePlan; 2]> {
    let (pool_base, pool_len) = parse_cidr(pool)?;
    let (net, net_len) = parse_cidr(underlay)?;
    if !(pool_len..=30).contains(&block_size) || block_size == pool_len {
        bail!(
            "block size /{block_size} must be longer than the pool's /{pool_len} and at most /30"
        );
    }
    if net_len > 27 {
        bail!("underlay {underlay}: needs room for .11 and .12 (a /27 or wider)");
    }
    let node = |i: u32| {
        let block = u32::from(pool_base) + (i << (32 - u32::from(block_size)));
        NodePlan {
            ip: Ipv4Addr::from(u32::from(net) + 11 + i),
            prefix: net_len,
            block: Ipv4Addr::from(block),
            block_size,
            tunnel_ip: Ipv4Addr::from(block),
            pod_ip: Ipv4Addr::from(block + 1),
            vtep_mac: format!("66:0c:e1:07:00:{:02x}", i + 1),
        }
    };
    Ok([node(0), node(1)])
}

/// Two nodes, a pod on each, and the kernel's overlay between them.
pub struct KernelCrossNode {
    label: String,
    pub encap: Encap,
    // Fields drop in order: the pods, then the nodes.
    pub client: Pod,
    pub server: Pod,
    pub nodes: [Netns; 2],
    pub plan: [NodePlan; 2],
}

impl KernelCrossNode {
    /// Build it all; on error, everything made so far is removed.
    pub fn start(encap: Encap, plan: &[NodePlan; 2]) -> Result<KernelCrossNode> {
        let pre = match encap {
            Encap::Vxlan => "pfxv",
            Encap::Ipip => "pfxi",
        };
        let k = KernelCrossNode {
            label: format!("kernel-{}", encap.name()),
            encap,
            client: Pod { ns: Netns::new(&format!("{pre}-a-")), ip: plan[0].pod_ip.to_string() },
            server: Pod { ns: Netns::new(&format!("{pre}-b-")), ip: plan[1].pod_ip.to_string() },
            nodes: [Netns::new(&format!("{pre}-n1-")), Netns::new(&format!("{pre}-n2-"))],
            plan: plan.clone(),
        };
        k.underlay()?;
        for i in 0..2 {
            match encap {
                Encap::Vxlan => k.vxlan(i)?,
                Encap::Ipip => k.ipip(i)?,
            }
        }
        let mtu = encap.mtu(UPLINK_MTU);
        attach_calico_pod(&k.nodes[0], &k.client, "cali0", Some(mtu))?;
        attach_calico_pod(&k.nodes[1], &k.server, "cali0", Some(mtu))?;
        Ok(k)
    }

    /// The veth between the nodes, their addresses, forwarding, and a
    /// default route out of the uplink (proxy ARP for 169.254.1.1 needs it).
    fn underlay(&self) -> Result<()> {
        let [a, b] = &self.nodes;
        cmd(&format!(
            "ip -n {} link add {UPLINK} type veth peer name {UPLINK} netns {}",
            a.name, b.name
        ))?;
        for (ns, p) in self.nodes.iter().zip(&self.plan) {
            let n = &ns.name;
            cmd(&format!("ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1"))?;
            cmd(&format!("ip -n {n} link set {UPLINK} mtu {UPLINK_MTU} up"))?;
            cmd(&format!("ip -n {n} addr add {}/{} dev {UPLINK}", p.ip, p.prefix))?;
            cmd(&format!("ip -n {n} route add default dev {UPLINK}"))?;
            cmd(&format!("ip -n {n} route add blackhole {}", p.block_cidr()))?;
        }
        Ok(())
    }

    /// Node `i`'s `vxlan.calico` and its routes to the other node's block.
    fn vxlan(&self, i: usize) -> Result<()> {
        let (n, me, peer) = (&self.nodes[i].name, &self.plan[i], &self.plan[1 - i]);
        let dev = Encap::Vxlan.device();
        cmd(&format!(
            "ip -n {n} link add {dev} address {} type vxlan id {VXLAN_VNI} dstport {VXLAN_PORT} \
             local {} dev {UPLINK} nolearning",
            me.vtep_mac, me.ip
        ))?;
        cmd(&format!("ip -n {n} link set {dev} mtu {} up", Encap::Vxlan.mtu(UPLINK_MTU)))?;
        cmd(&format!("ip -n {n} addr add {}/32 dev {dev}", me.tunnel_ip))?;
        cmd(&format!(
            "ip -n {n} neigh add {} lladdr {} dev {dev} nud permanent",
            peer.tunnel_ip, peer.vtep_mac
        ))?;
        cmd(&format!(
            "bridge -n {n} fdb add {} dev {dev} dst {} self permanent",
            peer.vtep_mac, peer.ip
        ))?;
        cmd(&format!(
            "ip -n {n} route add {} via {} dev {dev} onlink",
            peer.block_cidr(),
            peer.tunnel_ip
        ))?;
        Ok(())
    }

    /// Node `i`'s `tunl0` and its route to the other node's block.
    fn ipip(&self, i: usize) -> Result<()> {
        let (ns, me, peer) = (&self.nodes[i], &self.plan[i], &self.plan[1 - i]);
        let (n, dev) = (&ns.name, Encap::Ipip.device());
        ensure_tunl0(ns)?;
        cmd(&format!("ip -n {n} link set {dev} mtu {} up", Encap::Ipip.mtu(UPLINK_MTU)))?;
        cmd(&format!("ip -n {n} addr add {}/32 dev {dev}", me.tunnel_ip))?;
        cmd(&format!(
            "ip -n {n} route add {} via {} dev {dev} onlink",
            peer.block_cidr(),
            peer.ip
        ))?;
        Ok(())
    }

    /// Packets node 1's tunnel device has sent.
    fn tunnel_tx_packets(&self) -> Result<u64> {
        tools::link_counter(&self.nodes[0], self.encap.device(), "tx", "packets")
    }
}

fn link_exists(ns: &Netns, dev: &str) -> bool {
    sh_out(&format!("ip -n {} link show dev {dev}", ns.name)).status.success()
}

/// Make sure the namespace has `tunl0`, the IPIP fallback device Calico
/// uses. The kernel creates it in every namespace once the `ipip` driver is
/// loaded; creating an ipip link loads the driver where modules can be
/// loaded, else `modprobe ipip` does.
fn ensure_tunl0(ns: &Netns) -> Result<()> {
    if link_exists(ns, "tunl0") {
        return Ok(());
    }
    // Fails with "File exists" once loading the driver made tunl0.
    let add = sh_out(&format!("ip -n {} link add name tunl0 type ipip", ns.name));
    if link_exists(ns, "tunl0") {
        return Ok(());
    }
    if tools::which("modprobe").is_some() {
        let _ = sh_out("modprobe ipip");
        if link_exists(ns, "tunl0") {
            return Ok(());
        }
    }
    bail!(
        "this kernel has no IPIP tunnel driver: `ip link add name tunl0 type ipip` says {:?} \
         and `modprobe ipip` did not help (needs CONFIG_NET_IPIP, built in or as the ipip module)",
        String::from_utf8_lossy(&add.stderr).trim()
    )
}

impl PodPair for KernelCrossNode {
    fn label(&self) -> &str {
        &self.label
    }
    fn ends(&self) -> [(&Netns, &str); 2] {
        [(&self.client.ns, &self.client.ip), (&self.server.ns, &self.server.ip)]
    }

    /// The pods reach each other, through the tunnel device.
    fn check_connectivity(&self) -> Result<()> {
        let before = self.tunnel_tx_packets()?;
        if !wait_until(Duration::from_secs(5), || self.client().ping(self.server_ip())) {
            bail!(
                "pod {} on node {} cannot ping pod {} on node {}",
                self.client.ip,
                self.plan[0].ip,
                self.server.ip,
                self.plan[1].ip
            );
        }
        if self.tunnel_tx_packets()? == before {
            bail!("the ping did not go through {} on node 1", self.encap.device());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calico_mtus() {
        assert_eq!(Encap::Vxlan.mtu(1500), 1450);
        assert_eq!(Encap::Ipip.mtu(1500), 1480);
        assert_eq!(Encap::Vxlan.mtu(9000), 8950);
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.65.0.0/16").unwrap(), (Ipv4Addr::new(10, 65, 0, 0), 16));
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), (Ipv4Addr::UNSPECIFIED, 0));
        for bad in ["10.65.0.0", "10.65.0.1/16", "10.65.0.0/33", "10.65.0/16", "x/8", "10.0.0.0/"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn two_nodes_two_blocks() {
        let [a, b] = plan("10.65.0.0/16", 26, "192.0.2.0/24").unwrap();
        assert_eq!((a.ip, a.prefix), (Ipv4Addr::new(192, 0, 2, 11), 24));
        assert_eq!(b.ip, Ipv4Addr::new(192, 0, 2, 12));
        assert_eq!(a.block_cidr(), "10.65.0.0/26");
        assert_eq!(b.block_cidr(), "10.65.0.64/26");
        assert_eq!(
            (a.tunnel_ip, a.pod_ip),
            (Ipv4Addr::new(10, 65, 0, 0), Ipv4Addr::new(10, 65, 0, 1))
        );
        assert_eq!(
            (b.tunnel_ip, b.pod_ip),
            (Ipv4Addr::new(10, 65, 0, 64), Ipv4Addr::new(10, 65, 0, 65))
        );
        assert_ne!(a.vtep_mac, b.vtep_mac);
        // Unicast and locally administered.
        let first = u8::from_str_radix(&a.vtep_mac[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10);

        let [_, b] = plan("172.16.0.0/12", 24, "198.18.0.0/15").unwrap();
        assert_eq!(b.block_cidr(), "172.16.1.0/24");
        assert_eq!(b.ip, Ipv4Addr::new(198, 18, 0, 12));
    }

    #[test]
    fn plans_that_do_not_fit() {
        assert!(plan("10.65.0.0/16", 16, "192.0.2.0/24").is_err(), "block = pool");
        assert!(plan("10.65.0.0/16", 12, "192.0.2.0/24").is_err(), "block wider than pool");
        assert!(plan("10.65.0.0/16", 31, "192.0.2.0/24").is_err(), "no room for tunnel + pod");
        assert!(plan("10.65.0.0/16", 26, "192.0.2.0/28").is_err(), "no .12");
        assert!(plan("10.65.0.1/16", 26, "192.0.2.0/24").is_err());
    }
}
