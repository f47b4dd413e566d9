//! Links, addresses and routes through netlink (the `rtnetlink` crate).
//!
//! Changes are described as a list of [`Op`]s and applied in order inside
//! one network namespace, on a helper thread with a small single-threaded
//! runtime (see [`super::netns`]): callers stay synchronous and never
//! change namespace themselves. Adds are idempotent (replace), deletes of
//! things already gone succeed, so a repeated request converges.

use crate::wire::MacAddr;
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// One change to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set the MAC, MTU and admin state of a link (each when given).
    SetLink { name: String, mac: Option<MacAddr>, mtu: Option<u32>, up: Option<bool> },
    /// Move a link into the namespace at `netns`, renamed to `new_name`.
    MoveLink { name: String, netns: PathBuf, new_name: String },
    /// Add (or keep) an address on a link.
    AddAddr { dev: String, addr: IpAddr, prefix: u8 },
    /// Add (or replace) a route through a link, optionally via a gateway.
    AddRoute { dst: IpAddr, prefix: u8, dev: String, via: Option<IpAddr>, link_scope: bool },
    /// Delete a route if it exists.
    DelRoute { dst: IpAddr, prefix: u8, dev: String },
    /// Delete a link if it exists.
    DelLink { name: String },
}

/// What a pod's interface needs inside the pod (Calico's convention): its
/// addresses as host routes (/32, /128), an on-link route to the gateway
/// 169.254.1.1, and the default route via it.
pub fn pod_addressing(ifname: &str, ips: &[IpAddr]) -> Vec<Op> {
    let gw = IpAddr::V4(crate::pipeline::GATEWAY_IP);
    let mut ops: Vec<Op> = ips
        .iter()
        .map(|ip| Op::AddAddr {
            dev: ifname.into(),
            addr: *ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
        })
        .collect();
    if ips.iter().any(IpAddr::is_ipv4) {
        ops.push(Op::AddRoute {
            dst: gw,
            prefix: 32,
            dev: ifname.into(),
            via: None,
            link_scope: true,
        });
        ops.push(Op::AddRoute {
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 0,
            dev: ifname.into(),
            via: Some(gw),
            link_scope: false,
        });
    }
    ops
}

/// What we know of an existing link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    pub up: bool,
}

fn nl_err(ctx: impl std::fmt::Display, e: rtnetlink::Error) -> io::Error {
    let kind = match &e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV => {
            io::ErrorKind::NotFound
        }
        rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST => {
            io::ErrorKind::AlreadyExists
        }
        rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EBUSY => {
            io::ErrorKind::ResourceBusy
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{ctx}: {e}"))
}

fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if matches!(-m.raw_code(), libc::ENODEV | libc::ESRCH | libc::ENOENT | libc::EADDRNOTAVAIL))
}

/// Apply `ops` in order inside the namespace at `netns` (the caller's when
/// `None`). Stops at the first failure and says which op failed.
pub fn apply(netns: Option<&Path>, ops: Vec<Op>) -> io::Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    with_handle(netns, move |h| async move {
        for op in ops {
            apply_one(&h, &op).await?;
        }
        Ok(())
    })
}

/// Look a link up by name in the namespace at `netns`.
pub fn link(netns: Option<&Path>, name: &str) -> io::Result<Option<LinkInfo>> {
    let name = name.to_string();
    with_handle(netns, move |h| async move { get_link(&h, &name).await })
}

/// The interface that holds `addr`, with the address's prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrOwner {
    pub link: LinkInfo,
    pub prefix: u8,
}

/// Find the interface holding `addr` in the namespace at `netns` (the
/// uplink, given the node's underlay address).
pub fn owner_of(netns: Option<&Path>, addr: IpAddr) -> io::Result<Option<AddrOwner>> {
    with_handle(netns, move |h| async move {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut s = h.address().get().execute();
        let mut found = None;
        while let Some(m) = s.try_next().await.map_err(|e| nl_err("list addresses", e))? {
            let has = m.attributes.iter().any(|a| match a {
                AddressAttribute::Address(a) | AddressAttribute::Local(a) => *a == addr,
                _ => false,
            });
            if has {
                found = Some((m.header.index, m.header.prefix_len));
                break;
            }
        }
        drop(s);
        let Some((index, prefix)) = found else { return Ok(None) };
        let mut s = h.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(AddrOwner { link: link_info(&m), prefix })),
            Ok(None) => Ok(None),
            Err(e) => Err(nl_err(format!("get link {index}"), e)),
        }
    })
}

fn with_handle<T, F, Fut>(netns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    super::netns::run_in(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            let task = tokio::spawn(conn);
            let out = f(handle).await;
            task.abort();
            out
        })
    })
}

async fn get_link(h: &Handle, name: &str) -> io::Result<Option<LinkInfo>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(link_info(&m))),
        Ok(None) => Ok(None),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(nl_err(format!("get link {name}"), e)),
    }
}

fn link_info(m: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Mtu(v) => info.mtu = Some(*v),
            LinkAttribute::Address(b) if b.len() == 6 => {
                info.mac = Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            _ => {}
        }
    }
    info
}

async fn index_of(h: &Handle, name: &str) -> io::Result<u32> {
    get_link(h, name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link named {name}")))
}

async fn apply_one(h: &Handle, op: &Op) -> io::Result<()> {
    match op {
        Op::SetLink { name, mac, mtu, up } => {
            let idx = index_of(h, name).await?;
            let mut b = LinkUnspec::new_with_index(idx);
            if let Some(m) = mac {
                b = b.address(m.0.to_vec());
            }
            if let Some(m) = mtu {
                b = b.mtu(*m);
            }
            match up {
                Some(true) => b = b.up(),
                Some(false) => b = b.down(),
                None => {}
            }
            h.link()
                .set(b.build())
                .execute()
                .await
                .map_err(|e| nl_err(format!("set link {name}"), e))
        }
        Op::MoveLink { name, netns, new_name } => {
            let idx = index_of(h, name).await?;
            let ns = std::fs::File::open(netns).map_err(|e| {
                io::Error::new(e.kind(), format!("network namespace {}: {e}", netns.display()))
            })?;
            let msg = LinkUnspec::new_with_index(idx)
                .setns_by_fd(ns.as_raw_fd())
                .name(new_name.clone())
                .build();
            h.link().set(msg).execute().await.map_err(|e| {
                nl_err(format!("move link {name} to {} as {new_name}", netns.display()), e)
            })
        }
        Op::AddAddr { dev, addr, prefix } => {
            let idx = index_of(h, dev).await?;
            match h.address().add(idx, *addr, *prefix).replace().execute().await {
                Ok(()) => Ok(()),
                Err(e) => Err(nl_err(format!("add address {addr}/{prefix} on {dev}"), e)),
            }
        }
        Op::AddRoute { dst, prefix, dev, via, link_scope } => {
            let idx = index_of(h, dev).await?;
            let scope = if *link_scope { RouteScope::Link } else { RouteScope::Universe };
            let msg = route_msg(*dst, *prefix, idx, *via, scope)?;
            h.route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| nl_err(format!("add route {dst}/{prefix} dev {dev}"), e))
        }
        Op::DelRoute { dst, prefix, dev } => {
            let Some(l) = get_link(h, dev).await? else { return Ok(()) };
            // Scope "nowhere" matches a route of any scope (as `ip route
            // del` does); "universe" would miss link-scope routes.
            let msg = route_msg(*dst, *prefix, l.index, None, RouteScope::NoWhere)?;
            match h.route().del(msg).execute().await {
                Ok(()) => Ok(()),
                Err(e) if is_missing(&e) => Ok(()),
                Err(e) => Err(nl_err(format!("delete route {dst}/{prefix}"), e)),
            }
        }
        Op::DelLink { name } => {
            let Some(l) = get_link(h, name).await? else { return Ok(()) };
            match h.link().del(l.index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if is_missing(&e) => Ok(()),
                Err(e) => Err(nl_err(format!("delete link {name}"), e)),
            }
        }
    }
}

fn route_msg(
    dst: IpAddr,
    prefix: u8,
    oif: u32,
    via: Option<IpAddr>,
    scope: RouteScope,
) -> io::Result<rtnetlink::packet_route::route::RouteMessage> {
    Ok(match (dst, via) {
        (IpAddr::V4(d), via) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, prefix)
                .output_interface(oif)
                .scope(scope);
            match via {
                Some(IpAddr::V4(g)) => b = b.gateway(g),
                Some(IpAddr::V6(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "IPv6 gateway for an IPv4 route",
                    ))
                }
                None => {}
            }
            b.build()
        }
        (IpAddr::V6(d), via) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, prefix)
                .output_interface(oif)
                .scope(scope);
            match via {
                Some(IpAddr::V6(g)) => b = b.gateway(g),
                Some(IpAddr::V4(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "IPv4 gateway for an IPv6 route",
                    ))
                }
                None => {}
            }
            b.build()
        }
    })
}

/// A netlink connection kept for many requests, for a thread that asks
/// often (the AF_XDP uplink's neighbour resolver): one runtime and one
/// socket instead of a helper thread per request. It lives in the network
/// namespace of the thread that creates it.
pub struct Session {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Session {
    pub fn new() -> io::Result<Session> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, io::Error>(handle)
        })?;
        Ok(Session { rt, handle })
    }

    /// Run one request (the connection makes progress while it runs).
    pub fn run<T, F, Fut>(&self, f: F) -> T
    where
        F: FnOnce(Handle) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        self.rt.block_on(f(self.handle.clone()))
    }
}

/// The kernel's route to `dst`: its gateway (`None` when on-link) and its
/// output interface.
pub async fn route_to(h: Handle, dst: Ipv4Addr) -> io::Result<Option<(Option<Ipv4Addr>, u32)>> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
    use rtnetlink::packet_route::AddressFamily;
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = 32;
    msg.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    let mut s = h.route().get(msg).execute();
    let m = match s.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(nl_err(format!("route to {dst}"), e)),
    };
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Ok(oif.map(|i| (gw, i)))
}

/// A neighbour entry's state, as far as sending to it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighState {
    /// Confirmed recently, or configured (permanent, no ARP).
    Valid,
    /// Known but unconfirmed for a while (stale, delay, probe): usable, and
    /// the kernel re-confirms it when asked.
    Stale,
    /// Being resolved, or resolution failed: no usable address.
    Unresolved,
}

/// What the kernel's neighbour table says about `ip` on `ifindex`: its
/// state and link-layer address, `None` when there is no entry.
pub async fn neighbour(
    h: Handle,
    ifindex: u32,
    ip: Ipv4Addr,
) -> io::Result<Option<(NeighState, Option<MacAddr>)>> {
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourState,
    };
    use rtnetlink::packet_route::AddressFamily;
    let mut s = h.neighbours().get().set_address_family(AddressFamily::Inet).execute();
    while let Some(m) = s.try_next().await.map_err(|e| nl_err("list neighbours", e))? {
        if m.header.ifindex != ifindex {
            continue;
        }
        let mut dst = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(*d),
                NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                    mac = Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
                }
                _ => {}
            }
        }
        if dst != Some(ip) {
            continue;
        }
        let state = match m.header.state {
            NeighbourState::Reachable | NeighbourState::Permanent | NeighbourState::Noarp => {
                NeighState::Valid
            }
            NeighbourState::Stale | NeighbourState::Delay | NeighbourState::Probe => {
                NeighState::Stale
            }
            _ => NeighState::Unresolved,
        };
        return Ok(Some((state, mac)));
    }
    Ok(None)
}

/// Ask the kernel to resolve `ip` on `ifindex`, or to re-confirm a stale
/// entry, as if it were about to send to it (`NTF_USE`): an ARP request
/// goes out, and the neighbour table has the answer shortly after.
pub async fn neighbour_use(h: Handle, ifindex: u32, ip: Ipv4Addr) -> io::Result<()> {
    use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
    h.neighbours()
        .add(ifindex, IpAddr::V4(ip))
        .state(NeighbourState::None)
        .flags(NeighbourFlags::Use)
        .replace()
        .execute()
        .await
        .map_err(|e| nl_err(format!("resolve neighbour {ip}"), e))
}

/// An XDP program attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpAttachment {
    pub prog_id: u32,
    /// Attached in generic (SKB) mode rather than by the driver.
    pub skb_mode: bool,
}

/// The XDP program attached to interface `ifindex` in the namespace at
/// `netns`, if any.
pub fn xdp_attached(netns: Option<&Path>, ifindex: u32) -> io::Result<Option<XdpAttachment>> {
    with_handle(netns, move |h| async move {
        use rtnetlink::packet_route::link::{LinkXdp, XdpAttached};
        let mut s = h.link().get().match_index(ifindex).execute();
        let m = match s.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(nl_err(format!("get link {ifindex}"), e)),
        };
        let mut mode = None;
        let mut id = None;
        for a in &m.attributes {
            if let LinkAttribute::Xdp(xs) = a {
                for x in xs {
                    match x {
                        LinkXdp::Attached(XdpAttached::None) => {}
                        LinkXdp::Attached(att) => mode = Some(*att),
                        LinkXdp::ProgId(p) | LinkXdp::DrvProgId(p) | LinkXdp::SkbProgId(p) => {
                            id = id.or(Some(*p))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(match (mode, id) {
            (Some(m), Some(prog_id)) if prog_id != 0 => {
                Some(XdpAttachment { prog_id, skb_mode: m == XdpAttached::SocketBuffer })
            }
            _ => None,
        })
    })
}

/// Detach the XDP program attached (through netlink, not a BPF link) to
/// interface `ifindex` in the given mode.
pub fn xdp_detach(netns: Option<&Path>, ifindex: u32, skb_mode: bool) -> io::Result<()> {
    with_handle(netns, move |h| async move {
        use rtnetlink::packet_route::link::LinkXdp;
        // XDP_FLAGS_SKB_MODE / XDP_FLAGS_DRV_MODE.
        let flags = if skb_mode { 1 << 1 } else { 1 << 2 };
        let msg = LinkUnspec::new_with_index(ifindex)
            .append_extra_attribute(LinkAttribute::Xdp(vec![
                LinkXdp::Fd(-1),
                LinkXdp::Flags(flags),
            ]))
            .build();
        h.link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_err(format!("detach the XDP program of link {ifindex}"), e))
    })
}
