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
            let msg = route_msg(*dst, *prefix, l.index, None, RouteScope::Universe)?;
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
