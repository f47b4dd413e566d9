//! Steering replies of translated flows into the dataplane.
//!
//! Flows the dataplane translates to one of the node's own addresses
//! (natOutgoing, NodePort to another node) get replies addressed to the
//! node, which the kernel owns in socket uplink mode: it would answer them
//! with a reset. Their destination ports come from a range outside the
//! kernel's ephemeral range (61440-65535 by default), so an ingress
//! filter on the uplink can tell them apart without state: `u32` matches
//! on the destination address and the port (TCP, UDP, SCTP: the L4
//! destination port; ICMP echo replies: the identifier; ICMP errors: the
//! quoted source port), and `mirred egress redirect` hands them to the
//! host TAP, where the dataplane reads them. NodePort requests are steered
//! the same way, port by port.
//!
//! Everything is set through netlink (`rtnetlink`), in the dataplane's own
//! namespace (the node's), at one filter priority of ours
//! ([`PRIORITY`]): installing first removes what a previous run left
//! there; removing deletes exactly that priority, and the ingress qdisc
//! if we created it. Nothing else on the interface is touched.

use rtnetlink::packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

/// The filter priority (preference) all of Ocelot's steering filters use.
pub const PRIORITY: u16 = 0x0c17;
const ETH_P_IP: u16 = 0x0800;

/// One match: (offset from the IPv4 header, mask, value), big-endian words.
type Key = (i32, u32, u32);

/// What steering was installed for: the address, the host interface, the
/// translated ports and the node ports.
pub type SteerKey = (Ipv4Addr, String, (u16, u16), Vec<u16>);

/// Steering installed on an uplink; removed with [`Steering::remove`].
pub struct Steering {
    key: SteerKey,
    uplink: String,
    uplink_index: u32,
    created_qdisc: bool,
    /// The host interface's `accept_local` before we set it, to restore.
    accept_local: Option<(String, String)>,
}

/// `net.ipv4.conf.<iface>.accept_local` of the calling thread's namespace.
fn accept_local_path(iface: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"))
}

fn nl(ctx: &str, e: rtnetlink::Error) -> io::Error {
    io::Error::other(format!("{ctx}: {e}"))
}

/// Aligned power-of-two blocks covering `lo..=hi`: (first port, mask).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let (mut a, b) = (u32::from(lo), u32::from(hi));
    while a <= b {
        let mut size = 1u32;
        while a % (size * 2) == 0 && a + size * 2 - 1 <= b && size < 0x10000 {
            size *= 2;
        }
        out.push((a as u16, !(size - 1) as u16));
        a += size;
    }
    out
}

/// The u32 key sets: one filter each.
fn filters(addr: Ipv4Addr, snat: (u16, u16), node_ports: &[u16]) -> Vec<Vec<Key>> {
    let dst: Key = (16, 0xffff_ffff, u32::from(addr));
    // No IP options (IHL 5): the L4 header is at offset 20.
    let ihl5: Key = (0, 0x0f00_0000, 0x0500_0000);
    let not_fragment: Key = (4, 0x0000_1fff, 0);
    let icmp: Key = (8, 0x00ff_0000, 0x0001_0000);
    let mut out = Vec::new();
    for (first, mask) in port_blocks(snat.0, snat.1) {
        let (m, v) = (u32::from(mask), u32::from(first));
        // TCP, UDP, SCTP: the destination port (low half of word 20).
        out.push(vec![dst, ihl5, not_fragment, (20, m, v)]);
        // ICMP echo reply (type 0): the identifier (high half of word 24).
        out.push(vec![dst, ihl5, icmp, (20, 0xff00_0000, 0), (24, m << 16, v << 16)]);
        // ICMP errors: the quoted packet's source port (IHL 5 inside too).
        out.push(vec![dst, ihl5, icmp, (28, 0x0f00_0000, 0x0500_0000), (48, m << 16, v << 16)]);
    }
    for p in node_ports {
        out.push(vec![dst, ihl5, not_fragment, (20, 0xffff, u32::from(*p))]);
    }
    out
}

fn u32_redirect(keys: &[Key], to: u32) -> Vec<TcFilterU32Option> {
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = keys.len() as u8;
    sel.keys = keys
        .iter()
        .map(|&(off, mask, val)| {
            let mut k = TcU32Key::default();
            k.off = off;
            k.mask = mask;
            k.val = val & mask;
            k
        })
        .collect();
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    vec![TcFilterU32Option::Selector(sel), TcFilterU32Option::Action(vec![action])]
}

async fn delete_ours(h: &mut Handle, index: u32) -> io::Result<()> {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle { major: 0xffff, minor: TcHandle::MIN_INGRESS };
    m.header.info = (u32::from(PRIORITY) << 16) | u32::from(ETH_P_IP.to_be());
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(m));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut resp = h.request(req).map_err(|e| nl("delete steering filters", e))?;
    while let Some(msg) = futures::StreamExt::next(&mut resp).await {
        if let rtnetlink::packet_core::NetlinkPayload::Error(e) = msg.payload {
            let code = e.raw_code();
            // Gone already (no such filter, or no ingress qdisc).
            if code != 0 && code != -libc::ENOENT && code != -libc::EINVAL {
                return Err(io::Error::other(format!("delete steering filters: {e}")));
            }
        }
    }
    Ok(())
}

impl Steering {
    /// Steer replies to `addr` on the translated ports `snat` (and the
    /// NodePort requests to `node_ports`) from the interface holding `addr`
    /// to `host_iface`.
    pub fn install(
        addr: Ipv4Addr,
        host_iface: &str,
        snat: (u16, u16),
        node_ports: &[u16],
    ) -> io::Result<Steering> {
        let owner = super::netlink::owner_of(None, IpAddr::V4(addr))?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface holds {addr}"))
        })?;
        if owner.link.name == "lo" {
            return Err(io::Error::other(format!(
                "{addr} is on lo: no uplink to steer replies from"
            )));
        }
        let host = super::netlink::link(None, host_iface)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no host interface {host_iface}"))
        })?;
        let index = owner.link.index;
        let sets = filters(addr, snat, node_ports);
        let to = host.index;
        let created = super::netns::run_in(None, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
            rt.block_on(async move {
                let (conn, mut h, _) = rtnetlink::new_connection()?;
                let task = tokio::spawn(conn);
                let r = async {
                    let created = match h.qdisc().add(index as i32).ingress().execute().await {
                        Ok(()) => true,
                        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {
                            false
                        }
                        Err(e) => return Err(nl("add the ingress qdisc", e)),
                    };
                    delete_ours(&mut h, index).await?;
                    for keys in &sets {
                        h.traffic_filter(index as i32)
                            .add()
                            .ingress()
                            .priority(PRIORITY)
                            .protocol(ETH_P_IP.to_be())
                            .u32(&u32_redirect(keys, to))
                            .map_err(|e| nl("build a steering filter", e))?
                            .execute()
                            .await
                            .map_err(|e| nl("add a steering filter", e))?;
                    }
                    Ok(created)
                }
                .await;
                task.abort();
                r
            })
        })?;
        // Translated packets leave through the host interface with the
        // node's own address as their source: without accept_local the
        // kernel drops them as martians before forwarding them out.
        let path = accept_local_path(host_iface);
        let old = std::fs::read_to_string(&path).map(|s| s.trim().to_string()).ok();
        if let Err(e) = std::fs::write(&path, "1") {
            tracing::warn!(iface = host_iface, "cannot set accept_local: {e}");
        }
        let accept_local = old.map(|o| (host_iface.to_string(), o));
        tracing::info!(uplink = %owner.link.name, %addr, filters = filters(addr, snat, node_ports).len(), "steering replies of translated flows into the dataplane");
        Ok(Steering {
            key: (addr, host_iface.to_string(), snat, node_ports.to_vec()),
            uplink: owner.link.name,
            uplink_index: index,
            created_qdisc: created,
            accept_local,
        })
    }

    /// What it was installed for.
    pub fn key(&self) -> &SteerKey {
        &self.key
    }

    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    /// Remove our filters (and the ingress qdisc if we created it).
    pub fn remove(self) {
        let (index, created) = (self.uplink_index, self.created_qdisc);
        let r = super::netns::run_in(None, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
            rt.block_on(async move {
                let (conn, mut h, _) = rtnetlink::new_connection()?;
                let task = tokio::spawn(conn);
                let r = async {
                    delete_ours(&mut h, index).await?;
                    if created {
                        let mut req = h.qdisc().del(index as i32);
                        req.message_mut().header.parent = TcHandle::INGRESS;
                        req.message_mut().header.handle = TcHandle::from(0xffff_0000);
                        // Gone already when the interface went.
                        let _ = req.execute().await;
                    }
                    Ok::<_, io::Error>(())
                }
                .await;
                task.abort();
                r
            })
        });
        if let Some((iface, old)) = &self.accept_local {
            let _ = std::fs::write(accept_local_path(iface), old);
        }
        match r {
            Ok(()) => tracing::info!(uplink = %self.uplink, "steering removed"),
            Err(e) => tracing::warn!(uplink = %self.uplink, "cannot remove steering: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_blocks(61440, 65535), vec![(61440, 0xf000)]);
        assert_eq!(port_blocks(80, 80), vec![(80, 0xffff)]);
        let b = port_blocks(30000, 32767);
        let covered: u32 = b.iter().map(|(_, m)| u32::from(!*m) + 1).sum();
        assert_eq!(covered, 32767 - 30000 + 1);
        for (first, mask) in &b {
            assert_eq!(first & !mask, 0, "block {first} not aligned to its size");
        }
        assert_eq!(filters("192.0.2.10".parse().unwrap(), (61440, 65535), &[30080]).len(), 4);
    }
}
