//! The virtio-net header (`struct virtio_net_hdr`, 10 bytes) that a TAP
//! opened with `IFF_VNET_HDR` puts before every frame. It carries the
//! offload state of the frame: a partial checksum still to be finished
//! (`NEEDS_CSUM`) and, for a GSO frame, how to cut it into segments.
//!
//! Fields are little-endian: we set `TUNSETVNETLE`-free defaults, which on
//! the little-endian hosts we run on is the native (and virtio 1.0) order.

use std::fmt;

/// Length of the header on the wire (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
}

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was already verified.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_ECN` bit of `gso_type`.
pub const GSO_ECN: u8 = 0x80;

/// The kind of segmentation a GSO frame asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GsoType {
    #[default]
    None,
    TcpV4,
    TcpV6,
    /// UFO (IPv4 fragmentation offload); never produced by the kernel for us.
    Udp,
    /// USO: UDP segmentation (`VIRTIO_NET_HDR_GSO_UDP_L4`).
    UdpL4,
}

impl GsoType {
    fn from_wire(v: u8) -> Option<GsoType> {
        Some(match v & !GSO_ECN {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            3 => GsoType::Udp,
            4 => GsoType::TcpV6,
            5 => GsoType::UdpL4,
            _ => return None,
        })
    }
    fn to_wire(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::Udp => 3,
            GsoType::TcpV6 => 4,
            GsoType::UdpL4 => 5,
        }
    }
}

/// Parsed virtio-net header.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: GsoType,
    pub ecn: bool,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Why a header could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    /// virtio-net header truncated
    #[error("virtio-net header truncated")]
    Truncated,
    /// unknown GSO type
    #[error("unknown virtio-net GSO type {0:#x}")]
    UnknownGso(u8),
}

impl VnetHdr {
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type != GsoType::None
    }

    /// Parse the first `VNET_HDR_LEN` bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<VnetHdr, VnetError> {
        if buf.len() < VNET_HDR_LEN {
            return Err(VnetError::Truncated);
        }
        let u16_at =
            |r: std::ops::Range<usize>| u16::from_le_bytes([buf[r.start], buf[r.start + 1]]);
        let raw = buf[field::GSO_TYPE];
        let gso_type = GsoType::from_wire(raw).ok_or(VnetError::UnknownGso(raw))?;
        Ok(VnetHdr {
            flags: buf[field::FLAGS],
            gso_type,
            ecn: raw & GSO_ECN != 0,
            hdr_len: u16_at(field::HDR_LEN),
            gso_size: u16_at(field::GSO_SIZE),
            csum_start: u16_at(field::CSUM_START),
            csum_offset: u16_at(field::CSUM_OFFSET),
        })
    }

    /// Write the header into the first `VNET_HDR_LEN` bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than `VNET_HDR_LEN` (a caller bug, never input).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[field::FLAGS] = self.flags;
        buf[field::GSO_TYPE] = self.gso_type.to_wire() | if self.ecn { GSO_ECN } else { 0 };
        buf[field::HDR_LEN].copy_from_slice(&self.hdr_len.to_le_bytes());
        buf[field::GSO_SIZE].copy_from_slice(&self.gso_size.to_le_bytes());
        buf[field::CSUM_START].copy_from_slice(&self.csum_start.to_le_bytes());
        buf[field::CSUM_OFFSET].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        self.emit(&mut b);
        b
    }
}

impl fmt::Debug for VnetHdr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vnet{{flags={:#x} gso={:?}{} hdr_len={} gso_size={} csum={}+{}}}",
            self.flags,
            self.gso_type,
            if self.ecn { "+ecn" } else { "" },
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The header the kernel writes for a TSO4 frame of a TCP stream with
    // timestamps (Ethernet 14 + IPv4 20 + TCP 32 = hdr_len 66, MSS 1448):
    // NEEDS_CSUM, TCPV4, csum_start 34 (the TCP header), csum_offset 16.
    const CAPTURED_TSO4: [u8; 10] = [0x01, 0x01, 0x42, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00];

    #[test]
    fn parse_captured_tso4() {
        let h = VnetHdr::parse(&CAPTURED_TSO4).unwrap();
        assert!(h.needs_csum());
        assert_eq!(h.gso_type, GsoType::TcpV4);
        assert_eq!((h.hdr_len, h.gso_size, h.csum_start, h.csum_offset), (66, 1448, 34, 16));
        assert_eq!(h.to_bytes(), CAPTURED_TSO4);
    }

    #[test]
    fn truncated_and_unknown() {
        assert_eq!(VnetHdr::parse(&CAPTURED_TSO4[..9]), Err(VnetError::Truncated));
        let mut b = CAPTURED_TSO4;
        b[1] = 0x07;
        assert_eq!(VnetHdr::parse(&b), Err(VnetError::UnknownGso(7)));
    }

    #[test]
    fn ecn_bit_roundtrips() {
        let mut b = CAPTURED_TSO4;
        b[1] = 0x84;
        let h = VnetHdr::parse(&b).unwrap();
        assert_eq!(h.gso_type, GsoType::TcpV6);
        assert!(h.ecn);
        assert_eq!(h.to_bytes(), b);
    }
}
