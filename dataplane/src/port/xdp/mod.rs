//! The underlay through AF_XDP: an XDP program on the uplink redirects only
//! this node's tunnel traffic (VXLAN to our port, IP in IP, both for our
//! underlay address) into AF_XDP sockets, one per receive queue, and passes
//! everything else to the kernel untouched; the host's own connectivity
//! never depends on the dataplane. One port, of kind
//! [`crate::tables::PortKind::Uplink`], carries both encapsulations:
//!
//! ```text
//!  uplink NIC ─ XDP ─┬─ tunnel traffic ──> AF_XDP socket per queue ──> XdpRx (a worker each)
//!                    └─ everything else ──> kernel (host traffic, fragments, ...)
//!  XdpTx (any worker) ──> AF_XDP tx ring ──> uplink
//!        └─ no neighbour yet / too long ──> the tunnel's socket port ──> kernel
//! ```
//!
//! * [`program`]: the XDP program, its maps, attaching and detaching;
//! * [`rx`], [`tx`]: the port's two sides;
//! * [`neigh`]: next-hop MACs from the kernel's neighbour table;
//! * `sys::xsk`: the sockets and their shared memory.
//!
//! Native-routed traffic to local pods is left to the kernel (the program
//! passes it, and the host port carries it into the dataplane), as in the
//! socket mode.

pub mod neigh;
pub mod program;
pub mod rx;
pub mod tx;

use crate::counters::PortStats;
use crate::sys::{ethtool, xsk};
use crate::wire::MacAddr;
use program::{AttachMode, Program, XdpConfig, FLAG_IPIP, FLAG_VXLAN, MAX_QUEUES};
use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use tx::{Fallback, TxConfig, TxQueue, XdpTx};

/// Why the AF_XDP uplink could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// Somebody else's XDP program is on the uplink: never replaced.
    #[error("{ifname} already runs XDP program {name:?} (id {id}), which is not Ocelot's; not replacing it")]
    Foreign { ifname: String, name: String, id: u32 },
    /// An earlier run's program is attached and could not be removed.
    #[error("a leftover Ocelot XDP program (id {id}) on {ifname} could not be removed: {source}")]
    Stale { ifname: String, id: u32, source: io::Error },
    /// The program or its maps did not load (no BPF, verifier, ...).
    #[error("loading the XDP program: {0}")]
    Load(String),
    /// Neither driver nor generic mode attached.
    #[error("attaching the XDP program to {ifname}: {reason}")]
    Attach { ifname: String, reason: String },
    /// An AF_XDP socket could not be opened or bound.
    #[error("AF_XDP socket on {ifname} queue {queue}: {source}")]
    Socket { ifname: String, queue: u32, source: io::Error },
    /// Asking the kernel about the interface failed.
    #[error("{0}")]
    System(io::Error),
}

/// The uplink and what crosses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkConfig {
    pub ifname: String,
    pub ifindex: u32,
    pub mac: MacAddr,
    pub mtu: u32,
    pub local_ip: Ipv4Addr,
    pub vxlan_port: u16,
    pub vni: u32,
    /// Which encapsulations to redirect (those some route uses).
    pub vxlan: bool,
    pub ipip: bool,
}

impl UplinkConfig {
    /// The longest frame on the uplink that one AF_XDP buffer takes.
    fn max_frame(&self) -> usize {
        (self.mtu as usize + crate::wire::outer::ETH_LEN).min(xsk::MAX_RX_PACKET as usize)
    }

    fn program(&self) -> XdpConfig {
        let mut flags = 0;
        if self.vxlan {
            flags |= FLAG_VXLAN;
        }
        if self.ipip {
            flags |= FLAG_IPIP;
        }
        XdpConfig::new(self.local_ip, self.vxlan_port, flags, xsk::MAX_RX_PACKET)
    }

    fn tx(&self, vxlan: Option<Fallback>, ipip: Option<Fallback>) -> TxConfig {
        TxConfig {
            local_ip: self.local_ip,
            src_mac: self.mac,
            vxlan_port: self.vxlan_port,
            vni: self.vni,
            max_frame: self.max_frame(),
            vxlan,
            ipip,
        }
    }

    /// Whether the sockets and program of `self` serve `other` as they
    /// are (only what [`XdpUplink::configure`] changes differs).
    pub fn same_uplink(&self, other: &UplinkConfig) -> bool {
        (self.ifindex, &self.ifname, self.local_ip, self.vxlan_port)
            == (other.ifindex, &other.ifname, other.local_ip, other.vxlan_port)
    }
}

/// The XDP program attached to the uplink, its sockets' transmit side and
/// the neighbour resolver. Dropping it detaches the program.
pub struct XdpUplink {
    pub config: UplinkConfig,
    pub mode: AttachMode,
    pub queues: u32,
    tx: Arc<XdpTx>,
    // Dropped in this order: the resolver stops, then the program detaches.
    _resolver: neigh::Resolver,
    program: Program,
}

/// Buffers per direction and queue: 16 MiB of UMEM per queue for a few
/// queues, less for many.
fn frames_per_queue(queues: u32) -> u32 {
    if queues <= 4 {
        2048
    } else {
        512
    }
}

impl XdpUplink {
    /// Set up AF_XDP on the uplink: remove a leftover Ocelot program, load
    /// ours, open a socket per receive queue, attach (driver mode, else
    /// generic). The receive queues are spread over at most `rx_ports`
    /// receive ports (one per worker). Nothing stays behind on failure.
    pub fn open(
        cfg: &UplinkConfig,
        rx_ports: usize,
        stats: Arc<PortStats>,
        vxlan: Option<Fallback>,
        ipip: Option<Fallback>,
    ) -> Result<(XdpUplink, Vec<rx::XdpRx>), XdpError> {
        program::remove_stale(cfg.ifindex, &cfg.ifname)?;
        let mut program = Program::load()?;
        let queues = ethtool::rx_queues(&cfg.ifname).map_err(|e| {
            XdpError::System(io::Error::new(
                e.kind(),
                format!("receive queues of {}: {e}", cfg.ifname),
            ))
        })?;
        if queues > MAX_QUEUES {
            tracing::warn!(uplink = %cfg.ifname, queues, "only the first {MAX_QUEUES} receive queues get an AF_XDP socket; the others' traffic takes the kernel path");
        }
        let queues = queues.min(MAX_QUEUES);
        let frames = frames_per_queue(queues);
        let groups = rx_ports.clamp(1, queues as usize);
        let mut rx_groups: Vec<Vec<xsk::XskRx>> = (0..groups).map(|_| Vec::new()).collect();
        let mut tx_queues = Vec::new();
        for q in 0..queues {
            let xcfg = xsk::XskConfig {
                ifindex: cfg.ifindex,
                queue: q,
                rx_frames: frames,
                tx_frames: frames,
            };
            let (r, t) = xsk::open(&xcfg).map_err(|source| XdpError::Socket {
                ifname: cfg.ifname.clone(),
                queue: q,
                source,
            })?;
            program.set_socket(q, r.fd())?;
            rx_groups[q as usize % groups].push(r);
            tx_queues.push(TxQueue::new(t));
        }
        program.configure(cfg.program())?;
        let mode = program.attach(cfg.ifindex, &cfg.ifname)?;
        let (table, requests) = neigh::Neighbours::new();
        let resolver = neigh::Resolver::start(table.clone(), requests, cfg.ifindex)
            .map_err(XdpError::System)?;
        let rx = rx_groups
            .into_iter()
            .map(|g| rx::XdpRx::new(g, cfg.local_ip, cfg.vxlan_port, stats.clone()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(XdpError::System)?;
        let tx = Arc::new(XdpTx::new(tx_queues, cfg.tx(vxlan, ipip), table));
        tracing::info!(uplink = %cfg.ifname, %mode, queues, "AF_XDP uplink attached");
        Ok((XdpUplink { config: cfg.clone(), mode, queues, tx, _resolver: resolver, program }, rx))
    }

    /// The port's transmit side, for the tables.
    pub fn tx(&self) -> Arc<XdpTx> {
        self.tx.clone()
    }

    /// Apply what changes without new sockets (see
    /// [`UplinkConfig::same_uplink`]): the encapsulations redirected, the
    /// VNI, MAC, MTU and the socket ports to fall back to.
    pub fn configure(
        &mut self,
        cfg: &UplinkConfig,
        vxlan: Option<Fallback>,
        ipip: Option<Fallback>,
    ) -> Result<(), XdpError> {
        self.program.configure(cfg.program())?;
        self.tx.configure(cfg.tx(vxlan, ipip));
        self.config = cfg.clone();
        Ok(())
    }

    /// Detach the program now (also done on drop).
    pub fn close(mut self) {
        self.program.detach();
    }
}
