//! The uplink's XDP program (`xdp/uplink.bpf.c`, compiled by `build.rs`
//! and embedded here), loaded and attached with aya.
//!
//! Attaching prefers driver (native) mode and falls back to generic (SKB)
//! mode. aya attaches through a BPF link where the kernel has them (5.9 and
//! later): the attachment belongs to the link's file descriptor, so it goes
//! away with the dataplane process, also on `kill -9`; nothing stays on the
//! uplink redirecting into sockets that no longer exist. On older kernels
//! aya falls back to a netlink attachment, which outlives the process; even
//! then a leftover program only passes traffic to the kernel (its sockets
//! left the XSKMAP when they closed, and `bpf_redirect_map` falls back to
//! `XDP_PASS`), and the next start removes it: before attaching, an
//! attached program named [`PROGRAM_NAME`] is detached, while anybody
//! else's is left alone and reported.

use super::XdpError;
use crate::sys::netlink;
use aya::maps::{Array, MapData, XskMap};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

/// The compiled program (an ELF object for the BPF target).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/uplink.bpf.o"));

/// The program's name in the kernel (its function's name): how a leftover
/// from an earlier run is recognised.
pub const PROGRAM_NAME: &str = "ocelot_uplink";
const CONFIG_MAP: &str = "ocelot_config";
const XSK_MAP: &str = "ocelot_xsks";
/// Entries of the XSKMAP: receive queues with a socket at most.
pub const MAX_QUEUES: u32 = 64;

/// Redirect VXLAN to the configured port.
pub const FLAG_VXLAN: u16 = 0x1;
/// Redirect IP in IP.
pub const FLAG_IPIP: u16 = 0x2;

/// The program's configuration, as its array map holds it (`struct config`
/// in the C source): address and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpConfig {
    local_ip: u32,
    vxlan_port: u16,
    flags: u16,
    max_len: u32,
}

// SAFETY: repr(C) with integer fields only and no padding (4 + 2 + 2 + 4
// bytes, each at its natural alignment): every bit pattern is valid.
unsafe impl aya::Pod for XdpConfig {}

impl XdpConfig {
    /// Redirect what is addressed to `local_ip` (VXLAN to `vxlan_port`
    /// when `flags` has [`FLAG_VXLAN`], IPIP with [`FLAG_IPIP`]), in frames
    /// of at most `max_len` bytes. No flags: pass everything.
    pub fn new(local_ip: Ipv4Addr, vxlan_port: u16, flags: u16, max_len: u32) -> XdpConfig {
        XdpConfig {
            local_ip: u32::from_ne_bytes(local_ip.octets()),
            vxlan_port: u16::from_ne_bytes(vxlan_port.to_be_bytes()),
            flags,
            max_len,
        }
    }
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// By the driver (native XDP).
    Driver,
    /// By the kernel's generic path (SKB mode), for drivers without XDP.
    Skb,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Driver => "driver",
            AttachMode::Skb => "skb",
        })
    }
}

/// The loaded program and its maps; attached once [`Program::attach`]
/// succeeded, detached by [`Program::detach`] or on drop.
pub struct Program {
    ebpf: aya::Ebpf,
    config: Array<MapData, XdpConfig>,
    xsks: XskMap<MapData>,
    link: Option<(XdpLinkId, u32, AttachMode)>,
}

fn load_err(e: impl std::fmt::Display) -> XdpError {
    XdpError::Load(e.to_string())
}

impl Program {
    /// Load the program and create its maps (nothing is attached yet).
    pub fn load() -> Result<Program, XdpError> {
        let mut ebpf = aya::EbpfLoader::new().load(OBJECT).map_err(load_err)?;
        let config = ebpf.take_map(CONFIG_MAP).ok_or_else(|| load_err("no config map"))?;
        let config = Array::try_from(config).map_err(load_err)?;
        let xsks = ebpf.take_map(XSK_MAP).ok_or_else(|| load_err("no XSKMAP"))?;
        let xsks = XskMap::try_from(xsks).map_err(load_err)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| load_err("no program"))?
            .try_into()
            .map_err(load_err)?;
        prog.load().map_err(load_err)?;
        Ok(Program { ebpf, config, xsks, link: None })
    }

    /// Receive queue `queue`'s tunnel traffic goes to the AF_XDP socket `fd`.
    pub fn set_socket(&mut self, queue: u32, fd: RawFd) -> Result<(), XdpError> {
        self.xsks
            .set(queue, fd, 0)
            .map_err(|e| XdpError::Load(format!("XSKMAP entry for queue {queue}: {e}")))
    }

    /// Replace the configuration; the program sees it at the next packet.
    pub fn configure(&mut self, cfg: XdpConfig) -> Result<(), XdpError> {
        self.config.set(0, cfg, 0).map_err(|e| XdpError::Load(format!("configuration map: {e}")))
    }

    /// Attach to interface `ifindex`: driver mode, else generic mode.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> Result<AttachMode, XdpError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| load_err("no program"))?
            .try_into()
            .map_err(load_err)?;
        let (id, mode) = match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => (id, AttachMode::Driver),
            Err(driver) => match prog.attach_to_if_index(ifindex, XdpMode::Skb) {
                Ok(id) => {
                    tracing::info!(%ifname, "XDP driver mode refused ({driver}); generic mode");
                    (id, AttachMode::Skb)
                }
                Err(skb) => {
                    return Err(XdpError::Attach {
                        ifname: ifname.into(),
                        reason: format!("driver mode: {driver}; generic mode: {skb}"),
                    })
                }
            },
        };
        self.link = Some((id, ifindex, mode));
        Ok(mode)
    }

    /// Detach from the interface (the program unloads on drop).
    pub fn detach(&mut self) {
        let Some((id, ifindex, mode)) = self.link.take() else { return };
        let prog: Option<&mut Xdp> =
            self.ebpf.program_mut(PROGRAM_NAME).and_then(|p| p.try_into().ok());
        match prog.map(|p| p.detach(id)) {
            Some(Ok(())) => tracing::info!(ifindex, %mode, "XDP program detached"),
            Some(Err(e)) => tracing::warn!(ifindex, "detaching the XDP program: {e}"),
            None => {}
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The name of the loaded BPF program with kernel id `id`, if it exists.
fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| p.name_as_str().unwrap_or("").to_string())
}

/// Before attaching: detach an Ocelot program left on the interface by an
/// earlier run (a netlink attachment survives its process); refuse to
/// touch anybody else's. Returns the id of what was removed.
pub fn remove_stale(ifindex: u32, ifname: &str) -> Result<Option<u32>, XdpError> {
    let att = netlink::xdp_attached(None, ifindex).map_err(XdpError::System)?;
    let Some(att) = att else { return Ok(None) };
    let name = program_name(att.prog_id).unwrap_or_default();
    if name != PROGRAM_NAME {
        return Err(XdpError::Foreign { ifname: ifname.into(), name, id: att.prog_id });
    }
    netlink::xdp_detach(None, ifindex, att.skb_mode).map_err(|e| XdpError::Stale {
        ifname: ifname.into(),
        id: att.prog_id,
        // A program attached through a BPF link belongs to a live process.
        source: if e.kind() == std::io::ErrorKind::ResourceBusy {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{e} (attached by a running process: another dataplane in this namespace?)"
                ),
            )
        } else {
            e
        },
    })?;
    tracing::warn!(%ifname, id = att.prog_id, "removed a leftover Ocelot XDP program");
    Ok(Some(att.prog_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_in_network_byte_order() {
        let c = XdpConfig::new(Ipv4Addr::new(192, 0, 2, 11), 4789, FLAG_VXLAN, 3840);
        assert_eq!(c.local_ip.to_ne_bytes(), [192, 0, 2, 11]);
        assert_eq!(c.vxlan_port.to_ne_bytes(), 4789u16.to_be_bytes());
        assert_eq!((c.flags, c.max_len), (FLAG_VXLAN, 3840));
        assert_eq!(std::mem::size_of::<XdpConfig>(), 12, "no padding");
    }

    #[test]
    fn the_embedded_program_loads() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let mut p = Program::load().expect("the XDP program passes the verifier");
        p.configure(XdpConfig::new(Ipv4Addr::LOCALHOST, 4789, FLAG_VXLAN | FLAG_IPIP, 3840))
            .expect("configure");
    }
}
