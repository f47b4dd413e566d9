//! SCTP packets (RFC 9260) for the lab's user-space SCTP, used when the
//! kernel has none (see `sctp.rs`), and the two roles played with them,
//! without I/O: the responder's answer to an INIT, and the prober's
//! recognition of the INIT ACK (or ABORT) that answers its own INIT.
//!
//! ```text
//!  common header:  source port(16) | destination port(16)
//!                  verification tag(32)
//!                  checksum(32): CRC32c of the packet with this field zero,
//!                                stored least significant byte first
//!  chunk:          type(8) | flags(8) | length(16) | value, padded to 4
//!  INIT, INIT ACK: initiate tag(32) | a_rwnd(32) | outbound streams(16) |
//!                  inbound streams(16) | initial TSN(32) | parameters
//!  parameter:      type(16) | length(16) | value, padded to 4
//! ```
//!
//! The exchange the lab makes is the first half of the four-way handshake:
//! INIT (verification tag 0, our initiate tag), INIT ACK (verification tag
//! = our initiate tag, with a State Cookie whose value is the pod's answer,
//! `namespace/name`), then an ABORT from the prober so nothing is left
//! half-open. The responder keeps no state per association (as RFC 9260
//! intends: everything is in the cookie), so it needs none of the rest.
//!
//! The contract, as in `dataplane/src/wire/`: untrusted bytes go through
//! [`Packet::new_checked`] or [`Datagram::parse`]; after that no accessor
//! panics, and every malformed packet is an [`SctpError`].

use std::net::{Ipv4Addr, SocketAddrV4};

/// SCTP's IP protocol number.
pub const PROTOCOL: u8 = 132;
/// Length of the common header.
pub const HEADER_LEN: usize = 12;
/// Length of a chunk's type, flags and length.
pub const CHUNK_HEADER_LEN: usize = 4;
/// An INIT or INIT ACK chunk without parameters.
pub const INIT_LEN: usize = 20;
/// Length of a parameter's type and length.
pub const PARAM_HEADER_LEN: usize = 4;
/// An IPv4 header without options, as the responder writes it.
pub const IPV4_HEADER_LEN: usize = 20;
/// The longest State Cookie the responder sends (longer answers are cut).
pub const MAX_COOKIE_LEN: usize = 1024;
/// The TTL of the responder's packets.
pub const TTL: u8 = 64;

/// Chunk types (RFC 9260 §3.2).
pub mod chunk_type {
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    pub const ABORT: u8 = 6;
}

/// The ABORT chunk's T bit: the verification tag is reflected (§3.3.7).
pub const ABORT_FLAG_T: u8 = 0x01;
/// The State Cookie parameter of an INIT ACK (§3.3.3).
pub const PARAM_STATE_COOKIE: u16 = 7;

mod field {
    use std::ops::Range;
    // The common header.
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const VERIFICATION_TAG: Range<usize> = 4..8;
    pub const CHECKSUM: Range<usize> = 8..12;
    // A chunk, from its start.
    pub const CHUNK_TYPE: usize = 0;
    pub const CHUNK_FLAGS: usize = 1;
    pub const CHUNK_LENGTH: Range<usize> = 2..4;
    // INIT and INIT ACK, from the chunk's start.
    pub const INITIATE_TAG: Range<usize> = 4..8;
    pub const A_RWND: Range<usize> = 8..12;
    pub const OUTBOUND_STREAMS: Range<usize> = 12..14;
    pub const INBOUND_STREAMS: Range<usize> = 14..16;
    pub const INITIAL_TSN: Range<usize> = 16..20;
    // A parameter, from its start.
    pub const PARAM_TYPE: Range<usize> = 0..2;
    pub const PARAM_LENGTH: Range<usize> = 2..4;
}

mod ipv4_field {
    use std::ops::Range;
    pub const VERSION_IHL: usize = 0;
    pub const TOTAL_LENGTH: Range<usize> = 2..4;
    pub const FLAGS_FRAGMENT: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

/// Why bytes are not an acceptable SCTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SctpError {
    /// Shorter than its headers or lengths say.
    #[error("truncated")]
    Truncated,
    /// The CRC32c does not match.
    #[error("bad CRC32c checksum")]
    BadChecksum,
    /// A chunk length below 4 or past the end of the packet.
    #[error("bad chunk length")]
    BadChunkLength,
    /// A parameter length below 4 or past the end of its chunk.
    #[error("bad parameter length")]
    BadParamLength,
    /// A packet with no chunk.
    #[error("no chunk")]
    NoChunk,
    /// An INIT or INIT ACK with a zero initiate tag or zero streams.
    #[error("INIT with a zero initiate tag or stream count")]
    BadInit,
    /// An INIT ACK without a State Cookie.
    #[error("INIT ACK without a State Cookie")]
    NoCookie,
    /// Not an IPv4 packet, or an IPv4 header that disagrees with the bytes.
    #[error("not a well-formed IPv4 packet")]
    NotIpv4,
    /// The IPv4 header checksum does not match.
    #[error("bad IPv4 header checksum")]
    BadIpChecksum,
    /// IPv4, but not protocol 132.
    #[error("not SCTP")]
    NotSctp,
    /// A fragment (the kernel reassembles before raw sockets see it).
    #[error("IPv4 fragment")]
    Fragment,
}

/// The CRC32c (Castagnoli, RFC 9260 Appendix A) of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The checksum of an SCTP packet: the CRC32c of all of it with the
/// checksum field taken as zero. `packet` must be at least [`HEADER_LEN`].
fn packet_checksum(packet: &[u8]) -> u32 {
    let c = crc32c::crc32c(&packet[..field::CHECKSUM.start]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &packet[field::CHECKSUM.end..])
}

fn be16(b: &[u8], r: std::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([b[r.start], b[r.start + 1]])
}

fn be32(b: &[u8], r: std::ops::Range<usize>) -> u32 {
    u32::from_be_bytes([b[r.start], b[r.start + 1], b[r.start + 2], b[r.start + 3]])
}

/// `n` rounded up to a multiple of 4.
fn padded(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// A view of an SCTP packet (common header and chunks).
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// A view without checks: accessors may panic on short buffers.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// A view whose accessors cannot panic: at least a common header.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, SctpError> {
        let p = Packet::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    pub fn check_len(&self) -> Result<(), SctpError> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            return Err(SctpError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    pub fn verification_tag(&self) -> u32 {
        be32(self.buffer.as_ref(), field::VERIFICATION_TAG)
    }

    /// The checksum as carried (the CRC32c's bytes are little-endian).
    pub fn checksum(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::CHECKSUM];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// True when the checksum is right.
    pub fn verify_checksum(&self) -> bool {
        self.checksum() == packet_checksum(self.buffer.as_ref())
    }

    /// The chunks, in order; the walk ends at the first malformed one.
    pub fn chunks(&self) -> Chunks<'_> {
        Chunks { rest: &self.buffer.as_ref()[HEADER_LEN..], failed: false }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, v: u16) {
        self.buffer.as_mut()[field::SRC_PORT].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_dst_port(&mut self, v: u16) {
        self.buffer.as_mut()[field::DST_PORT].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_verification_tag(&mut self, v: u32) {
        self.buffer.as_mut()[field::VERIFICATION_TAG].copy_from_slice(&v.to_be_bytes());
    }

    /// Compute and store the checksum; the rest of the packet must be final.
    pub fn fill_checksum(&mut self) {
        let c = packet_checksum(self.buffer.as_ref());
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&c.to_le_bytes());
    }
}

/// One chunk: its type, flags and value (without padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub kind: u8,
    pub flags: u8,
    /// The bytes after the chunk header, as many as its length says.
    pub value: &'a [u8],
}

/// The chunks of a packet; see [`Packet::chunks`].
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Result<Chunk<'a>, SctpError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let b = self.rest;
        if b.len() < CHUNK_HEADER_LEN {
            self.failed = true;
            return Some(Err(SctpError::BadChunkLength));
        }
        let len = usize::from(be16(b, field::CHUNK_LENGTH));
        if len < CHUNK_HEADER_LEN || len > b.len() {
            self.failed = true;
            return Some(Err(SctpError::BadChunkLength));
        }
        // The last chunk's padding may be missing from a sloppy sender.
        self.rest = &b[padded(len).min(b.len())..];
        Some(Ok(Chunk {
            kind: b[field::CHUNK_TYPE],
            flags: b[field::CHUNK_FLAGS],
            value: &b[CHUNK_HEADER_LEN..len],
        }))
    }
}

/// The fixed fields of an INIT or INIT ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitRepr {
    /// The tag the peer must put in every packet it sends us (never 0).
    pub initiate_tag: u32,
    /// Advertised receiver window credit.
    pub a_rwnd: u32,
    pub outbound_streams: u16,
    pub inbound_streams: u16,
    pub initial_tsn: u32,
}

impl InitRepr {
    /// The fixed fields of an INIT/INIT ACK chunk (the whole chunk, header
    /// included).
    fn parse(chunk: &[u8]) -> Result<InitRepr, SctpError> {
        if chunk.len() < INIT_LEN {
            return Err(SctpError::Truncated);
        }
        let r = InitRepr {
            initiate_tag: be32(chunk, field::INITIATE_TAG),
            a_rwnd: be32(chunk, field::A_RWND),
            outbound_streams: be16(chunk, field::OUTBOUND_STREAMS),
            inbound_streams: be16(chunk, field::INBOUND_STREAMS),
            initial_tsn: be32(chunk, field::INITIAL_TSN),
        };
        if r.initiate_tag == 0 || r.outbound_streams == 0 || r.inbound_streams == 0 {
            return Err(SctpError::BadInit);
        }
        Ok(r)
    }

    fn emit(&self, chunk: &mut [u8]) {
        chunk[field::INITIATE_TAG].copy_from_slice(&self.initiate_tag.to_be_bytes());
        chunk[field::A_RWND].copy_from_slice(&self.a_rwnd.to_be_bytes());
        chunk[field::OUTBOUND_STREAMS].copy_from_slice(&self.outbound_streams.to_be_bytes());
        chunk[field::INBOUND_STREAMS].copy_from_slice(&self.inbound_streams.to_be_bytes());
        chunk[field::INITIAL_TSN].copy_from_slice(&self.initial_tsn.to_be_bytes());
    }
}

/// The first chunk of a packet, as far as the lab cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRepr<'a> {
    Init(InitRepr),
    InitAck {
        init: InitRepr,
        /// The State Cookie's value.
        cookie: &'a [u8],
    },
    Abort {
        /// The T bit: the verification tag is the receiver's own peer's tag.
        reflected: bool,
    },
    /// Any other chunk type.
    Other {
        kind: u8,
    },
}

impl<'a> ChunkRepr<'a> {
    fn parse(c: Chunk<'a>) -> Result<ChunkRepr<'a>, SctpError> {
        // InitRepr::parse reads offsets from the chunk's start: rebuild a
        // view with a dummy header in front of the value.
        let fixed = INIT_LEN - CHUNK_HEADER_LEN;
        let init = |v: &[u8]| -> Result<InitRepr, SctpError> {
            let mut whole = [0u8; INIT_LEN];
            let v = v.get(..fixed).ok_or(SctpError::Truncated)?;
            whole[CHUNK_HEADER_LEN..].copy_from_slice(v);
            InitRepr::parse(&whole)
        };
        Ok(match c.kind {
            chunk_type::INIT => ChunkRepr::Init(init(c.value)?),
            chunk_type::INIT_ACK => {
                let init = init(c.value)?;
                let cookie = find_param(&c.value[fixed..], PARAM_STATE_COOKIE)?
                    .ok_or(SctpError::NoCookie)?;
                ChunkRepr::InitAck { init, cookie }
            }
            chunk_type::ABORT => ChunkRepr::Abort { reflected: c.flags & ABORT_FLAG_T != 0 },
            kind => ChunkRepr::Other { kind },
        })
    }

    /// The chunk's length without its final padding.
    fn len(&self) -> usize {
        match self {
            ChunkRepr::Init(_) => INIT_LEN,
            ChunkRepr::InitAck { cookie, .. } => INIT_LEN + PARAM_HEADER_LEN + cookie.len(),
            ChunkRepr::Abort { .. } | ChunkRepr::Other { .. } => CHUNK_HEADER_LEN,
        }
    }

    /// Write the chunk (and its padding, zero) into `b`, `padded(len)` long.
    fn emit(&self, b: &mut [u8]) {
        b.fill(0);
        let len = self.len() as u16;
        b[field::CHUNK_LENGTH].copy_from_slice(&len.to_be_bytes());
        match self {
            ChunkRepr::Init(init) => {
                b[field::CHUNK_TYPE] = chunk_type::INIT;
                init.emit(b);
            }
            ChunkRepr::InitAck { init, cookie } => {
                b[field::CHUNK_TYPE] = chunk_type::INIT_ACK;
                init.emit(b);
                let p = &mut b[INIT_LEN..];
                p[field::PARAM_TYPE].copy_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
                let plen = (PARAM_HEADER_LEN + cookie.len()) as u16;
                p[field::PARAM_LENGTH].copy_from_slice(&plen.to_be_bytes());
                p[PARAM_HEADER_LEN..PARAM_HEADER_LEN + cookie.len()].copy_from_slice(cookie);
            }
            ChunkRepr::Abort { reflected } => {
                b[field::CHUNK_TYPE] = chunk_type::ABORT;
                b[field::CHUNK_FLAGS] = if *reflected { ABORT_FLAG_T } else { 0 };
            }
            ChunkRepr::Other { kind } => b[field::CHUNK_TYPE] = *kind,
        }
    }
}

/// The value of the first parameter of type `kind` in `params`.
fn find_param(mut params: &[u8], kind: u16) -> Result<Option<&[u8]>, SctpError> {
    while !params.is_empty() {
        if params.len() < PARAM_HEADER_LEN {
            return Err(SctpError::BadParamLength);
        }
        let len = usize::from(be16(params, field::PARAM_LENGTH));
        if len < PARAM_HEADER_LEN || len > params.len() {
            return Err(SctpError::BadParamLength);
        }
        if be16(params, field::PARAM_TYPE) == kind {
            return Ok(Some(&params[PARAM_HEADER_LEN..len]));
        }
        // The chunk's length leaves out the last parameter's padding.
        params = &params[padded(len).min(params.len())..];
    }
    Ok(None)
}

/// An SCTP packet as the lab sends it: one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SctpRepr<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub verification_tag: u32,
    pub chunk: ChunkRepr<'a>,
}

impl<'a> SctpRepr<'a> {
    /// Check the checksum and every chunk's length, and interpret the first
    /// chunk (INIT and INIT ACK must travel alone, RFC 9260 §6.10, and the
    /// lab's peers send nothing else bundled).
    pub fn parse(p: &Packet<&'a [u8]>) -> Result<SctpRepr<'a>, SctpError> {
        p.check_len()?;
        if !p.verify_checksum() {
            return Err(SctpError::BadChecksum);
        }
        let buf: &'a [u8] = p.buffer;
        let mut first = None;
        for c in (Chunks { rest: &buf[HEADER_LEN..], failed: false }) {
            let c = c?;
            first.get_or_insert(c);
        }
        let first = first.ok_or(SctpError::NoChunk)?;
        Ok(SctpRepr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            verification_tag: p.verification_tag(),
            chunk: ChunkRepr::parse(first)?,
        })
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + padded(self.chunk.len())
    }

    /// Write the packet, checksum included, into the first
    /// [`buffer_len`](Self::buffer_len) bytes of `b`.
    pub fn emit(&self, b: &mut [u8]) -> Result<(), SctpError> {
        let n = self.buffer_len();
        let b = b.get_mut(..n).ok_or(SctpError::Truncated)?;
        if let ChunkRepr::InitAck { cookie, .. } = self.chunk {
            if PARAM_HEADER_LEN + cookie.len() > usize::from(u16::MAX) - INIT_LEN {
                return Err(SctpError::BadParamLength);
            }
        }
        self.chunk.emit(&mut b[HEADER_LEN..]);
        let mut p = Packet::new_unchecked(b);
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_verification_tag(self.verification_tag);
        p.fill_checksum();
        Ok(())
    }

    /// The packet as a new buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, SctpError> {
        let mut v = vec![0; self.buffer_len()];
        self.emit(&mut v)?;
        Ok(v)
    }
}

/// The IPv4 header checksum of `header` (its checksum field included).
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An SCTP packet in an IPv4 packet, as a raw IPv4 socket reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sctp: SctpRepr<'a>,
}

impl<'a> Datagram<'a> {
    /// The IPv4 header, then [`SctpRepr::parse`] of what it carries.
    pub fn parse(b: &'a [u8]) -> Result<Datagram<'a>, SctpError> {
        let (src, dst, payload) = parse_ipv4(b)?;
        let sctp = SctpRepr::parse(&Packet::new_checked(payload)?)?;
        Ok(Datagram { src, dst, sctp })
    }

    /// The whole IPv4 packet (no options, DF set, the header checksum
    /// computed), for a socket with `IP_HDRINCL`.
    pub fn to_vec(&self) -> Result<Vec<u8>, SctpError> {
        let n = IPV4_HEADER_LEN + self.sctp.buffer_len();
        let total = u16::try_from(n).map_err(|_| SctpError::Truncated)?;
        let mut v = vec![0; n];
        let h = &mut v[..IPV4_HEADER_LEN];
        h[ipv4_field::VERSION_IHL] = 0x45;
        h[ipv4_field::TOTAL_LENGTH].copy_from_slice(&total.to_be_bytes());
        h[ipv4_field::FLAGS_FRAGMENT].copy_from_slice(&0x4000u16.to_be_bytes());
        h[ipv4_field::TTL] = TTL;
        h[ipv4_field::PROTOCOL] = PROTOCOL;
        h[ipv4_field::SRC].copy_from_slice(&self.src.octets());
        h[ipv4_field::DST].copy_from_slice(&self.dst.octets());
        let c = ipv4_checksum(h);
        h[ipv4_field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
        self.sctp.emit(&mut v[IPV4_HEADER_LEN..])?;
        Ok(v)
    }
}

/// Source, destination and payload of an IPv4 packet carrying SCTP.
fn parse_ipv4(b: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr, &[u8]), SctpError> {
    if b.len() < IPV4_HEADER_LEN || b[ipv4_field::VERSION_IHL] >> 4 != 4 {
        return Err(SctpError::NotIpv4);
    }
    let ihl = usize::from(b[ipv4_field::VERSION_IHL] & 0x0f) * 4;
    let total = usize::from(be16(b, ipv4_field::TOTAL_LENGTH));
    if ihl < IPV4_HEADER_LEN || total < ihl || total > b.len() {
        return Err(SctpError::NotIpv4);
    }
    if ipv4_checksum(&b[..ihl]) != 0 {
        return Err(SctpError::BadIpChecksum);
    }
    if b[ipv4_field::PROTOCOL] != PROTOCOL {
        return Err(SctpError::NotSctp);
    }
    // More-fragments set, or a fragment offset.
    if be16(b, ipv4_field::FLAGS_FRAGMENT) & 0x3fff != 0 {
        return Err(SctpError::Fragment);
    }
    let addr = |r: std::ops::Range<usize>| {
        Ipv4Addr::new(b[r.start], b[r.start + 1], b[r.start + 2], b[r.start + 3])
    };
    Ok((addr(ipv4_field::SRC), addr(ipv4_field::DST), &b[ihl..total]))
}

/// Random values a role needs for one packet: never zero tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fresh {
    /// Our initiate tag (0 is replaced by 1: 0 is not a valid tag).
    pub tag: u32,
    /// Our initial TSN.
    pub tsn: u32,
}

/// Streams we offer and accept: the lab sends no data.
const STREAMS: u16 = 1;
/// The receive window we advertise.
const A_RWND: u32 = 65_535;

/// The responder: what to answer to one IPv4 packet `b` read from a raw
/// socket. An INIT (verification tag 0, alone, valid checksum) to a port
/// `serves` accepts gets an INIT ACK from that port, carrying `answer` in
/// its State Cookie (cut at [`MAX_COOKIE_LEN`]); the result is where to
/// send it (the INIT's source) and the whole IPv4 packet, from the address
/// the INIT was sent to.
///
/// Everything else gets nothing: other chunks, and INITs to ports not
/// served. A kernel stack would ABORT the latter, but every raw socket of
/// a namespace sees every SCTP packet, so a second responder there (a pod
/// serving several ports from several processes, a restarted server) would
/// ABORT the INITs the first one answers, and the prober would see
/// whichever came first. Silence keeps any number of responders exact; a
/// probe to a port nobody serves times out, which is the same `X`.
pub fn respond(
    b: &[u8],
    serves: impl Fn(u16) -> bool,
    answer: &[u8],
    fresh: Fresh,
) -> Option<(Ipv4Addr, Vec<u8>)> {
    let d = Datagram::parse(b).ok()?;
    let ChunkRepr::Init(init) = d.sctp.chunk else { return None };
    // §8.5.1: a packet carrying INIT has verification tag 0.
    if d.sctp.verification_tag != 0 || !serves(d.sctp.dst_port) {
        return None;
    }
    let reply = Datagram {
        src: d.dst,
        dst: d.src,
        sctp: SctpRepr {
            src_port: d.sctp.dst_port,
            dst_port: d.sctp.src_port,
            verification_tag: init.initiate_tag,
            chunk: ChunkRepr::InitAck {
                init: InitRepr {
                    initiate_tag: fresh.tag.max(1),
                    a_rwnd: A_RWND,
                    // §5.1.1: no more outbound streams than the peer's inbound.
                    outbound_streams: STREAMS.min(init.inbound_streams),
                    inbound_streams: STREAMS,
                    initial_tsn: fresh.tsn,
                },
                cookie: &answer[..answer.len().min(MAX_COOKIE_LEN)],
            },
        },
    };
    Some((d.src, reply.to_vec().ok()?))
}

/// The prober's side of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Whom we ask.
    pub peer: SocketAddrV4,
    /// Our source port.
    pub local_port: u16,
    /// Our initiate tag (never 0) and initial TSN.
    pub fresh: Fresh,
}

/// What answered a probe's INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// An INIT ACK: the peer's tag (for our ABORT) and its State Cookie.
    Accepted { peer_tag: u32, cookie: &'a [u8] },
    /// An ABORT carrying our tag: the peer refused.
    Aborted,
}

impl Probe {
    fn tag(&self) -> u32 {
        self.fresh.tag.max(1)
    }

    /// The INIT, as SCTP bytes (the kernel adds the IPv4 header).
    pub fn init(&self) -> Vec<u8> {
        let r = SctpRepr {
            src_port: self.local_port,
            dst_port: self.peer.port(),
            verification_tag: 0,
            chunk: ChunkRepr::Init(InitRepr {
                initiate_tag: self.tag(),
                a_rwnd: A_RWND,
                outbound_streams: STREAMS,
                inbound_streams: STREAMS,
                initial_tsn: self.fresh.tsn,
            }),
        };
        r.to_vec().expect("an INIT always fits")
    }

    /// The ABORT that ends the exchange, tagged with the peer's tag (§8.5.1).
    pub fn abort(&self, peer_tag: u32) -> Vec<u8> {
        let r = SctpRepr {
            src_port: self.local_port,
            dst_port: self.peer.port(),
            verification_tag: peer_tag,
            chunk: ChunkRepr::Abort { reflected: false },
        };
        r.to_vec().expect("an ABORT always fits")
    }

    /// Whether the IPv4 packet `b` answers our INIT: from the peer's address
    /// and port to our port, carrying our tag, with a good checksum. Every
    /// other packet (the raw socket sees all of the namespace's SCTP) is
    /// `None`.
    pub fn reply<'a>(&self, b: &'a [u8]) -> Option<Reply<'a>> {
        let d = Datagram::parse(b).ok()?;
        let s = d.sctp;
        if d.src != *self.peer.ip()
            || s.src_port != self.peer.port()
            || s.dst_port != self.local_port
            || s.verification_tag != self.tag()
        {
            return None;
        }
        match s.chunk {
            ChunkRepr::InitAck { init, cookie } => {
                Some(Reply::Accepted { peer_tag: init.initiate_tag, cookie })
            }
            // §8.5.1 B: an ABORT with our own tag has the T bit clear.
            ChunkRepr::Abort { reflected: false } => Some(Reply::Aborted),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3720 §B.4 (iSCSI, the same CRC32c SCTP uses), and the usual
    /// check value of "123456789".
    #[test]
    fn crc32c_test_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let up: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&up), 0x46dd_794e);
        let down: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&down), 0x113f_db5c);
        let iscsi_read: [u8; 48] = [
            0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14,
            0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(crc32c(&iscsi_read), 0xd996_3a56);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        // RFC 3720 prints the CRC as the bytes sent: aa 36 91 8a for the
        // zeros, i.e. least significant first, as SCTP carries it.
        assert_eq!(crc32c(&[0u8; 32]).to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
    }

    /// Packets built by an independent implementation (scapy 2.7's SCTP
    /// layer and its CRC32c): an INIT with a Supported Address Types
    /// parameter we never send, and an INIT ACK with cookie "x/a" (scapy
    /// counts the last parameter's padding in the chunk length, which
    /// RFC 9260 says not to do; we accept both).
    const SCAPY_INIT: &str = "8e3c0050 00000000 713088e1 0100001c 3a8e0a9b 0001a000 000affff \
                              1c6f72d6 000c0006 00050000";
    const SCAPY_INIT_ACK: &str = "0050c350 deadbeef 1caf8bd9 0200001c 00000007 000005dc \
                                  00010002 00000063 00070007 782f6100";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn agrees_with_scapy() {
        let b = hex(SCAPY_INIT);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(p.verify_checksum(), "checksum {:08x}", packet_checksum(&b));
        let r = SctpRepr::parse(&p).unwrap();
        assert_eq!((r.src_port, r.dst_port, r.verification_tag), (36412, 80, 0));
        let ChunkRepr::Init(init) = r.chunk else { panic!("{r:?}") };
        assert_eq!(init.initiate_tag, 0x3a8e_0a9b);
        assert_eq!(init.a_rwnd, 0x0001_a000);
        assert_eq!((init.outbound_streams, init.inbound_streams), (10, 0xffff));
        assert_eq!(init.initial_tsn, 0x1c6f_72d6);

        let b = hex(SCAPY_INIT_ACK);
        let r = SctpRepr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap();
        assert_eq!(r, init_ack(b"x/a"));
        // Ours differs only in the chunk length (27, not 28) and so the CRC.
        let ours = init_ack(b"x/a").to_vec().unwrap();
        assert_eq!(ours.len(), b.len());
        let differ: Vec<usize> = (0..b.len()).filter(|&i| ours[i] != b[i]).collect();
        assert!(differ.iter().all(|&i| (8..12).contains(&i) || i == 15), "{differ:?}");
        assert_eq!(ours[15], 27);
    }

    fn init_ack(cookie: &[u8]) -> SctpRepr<'_> {
        SctpRepr {
            src_port: 80,
            dst_port: 50_000,
            verification_tag: 0xdead_beef,
            chunk: ChunkRepr::InitAck {
                init: InitRepr {
                    initiate_tag: 7,
                    a_rwnd: 1500,
                    outbound_streams: 1,
                    inbound_streams: 2,
                    initial_tsn: 99,
                },
                cookie,
            },
        }
    }

    #[test]
    fn round_trips() {
        for cookie in [&b""[..], b"x", b"x/a", b"x/ab", b"namespace-1/pod-12345\n"] {
            let r = init_ack(cookie);
            let b = r.to_vec().unwrap();
            assert_eq!(b.len() % 4, 0, "padded");
            assert_eq!(b.len(), HEADER_LEN + padded(INIT_LEN + 4 + cookie.len()));
            let p = Packet::new_checked(&b[..]).unwrap();
            assert!(p.verify_checksum());
            assert_eq!(SctpRepr::parse(&p).unwrap(), r);
        }
        for chunk in [
            ChunkRepr::Init(InitRepr {
                initiate_tag: 1,
                a_rwnd: 0,
                outbound_streams: 3,
                inbound_streams: 4,
                initial_tsn: 0,
            }),
            ChunkRepr::Abort { reflected: true },
            ChunkRepr::Abort { reflected: false },
            ChunkRepr::Other { kind: 10 },
        ] {
            let r = SctpRepr { src_port: 1, dst_port: 2, verification_tag: 3, chunk };
            let b = r.to_vec().unwrap();
            assert_eq!(SctpRepr::parse(&Packet::new_checked(&b[..]).unwrap()).unwrap(), r);
        }
        let d = Datagram {
            src: Ipv4Addr::new(10, 65, 0, 2),
            dst: Ipv4Addr::new(10, 65, 1, 3),
            sctp: init_ack(b"x/a"),
        };
        let b = d.to_vec().unwrap();
        assert_eq!(b[9], PROTOCOL);
        assert_eq!(ipv4_checksum(&b[..20]), 0);
        assert_eq!(Datagram::parse(&b).unwrap(), d);
    }

    #[test]
    fn abort_bits() {
        let p = Probe {
            peer: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80),
            local_port: 50_000,
            fresh: Fresh { tag: 5, tsn: 6 },
        };
        let b = p.abort(0x0102_0304);
        assert_eq!(hex("c3500050 01020304"), b[..8]);
        assert_eq!(b[12..], [chunk_type::ABORT, 0, 0, 4]);
        assert!(Packet::new_checked(&b[..]).unwrap().verify_checksum());
    }

    #[test]
    fn refuses_truncated_and_garbled() {
        let d = Datagram {
            src: Ipv4Addr::new(10, 65, 0, 2),
            dst: Ipv4Addr::new(10, 65, 1, 3),
            sctp: init_ack(b"x/abc"),
        };
        let good = d.to_vec().unwrap();
        // Every truncation: refused (the IPv4 total length no longer fits),
        // and so is every truncation of the bare SCTP packet.
        for n in 0..good.len() {
            assert!(Datagram::parse(&good[..n]).is_err(), "cut at {n}");
        }
        let sctp = &good[IPV4_HEADER_LEN..];
        for n in 0..sctp.len() {
            if let Ok(p) = Packet::new_checked(&sctp[..n]) {
                assert!(SctpRepr::parse(&p).is_err(), "cut at {n}");
            }
        }
        // Every single-bit flip in the SCTP part: the CRC catches it.
        for i in IPV4_HEADER_LEN * 8..good.len() * 8 {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Datagram::parse(&b).is_err(), "bit {i}");
        }
        // In the IPv4 header: the header checksum (or a length or version
        // check before it) catches it.
        for i in 0..IPV4_HEADER_LEN * 8 {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Datagram::parse(&b).is_err(), "bit {i}");
        }
        // Lengths that lie, with a correct checksum: refused.
        let mut chunk_long = sctp.to_vec();
        chunk_long[HEADER_LEN + 2..HEADER_LEN + 4].copy_from_slice(&200u16.to_be_bytes());
        let mut chunk_short = sctp.to_vec();
        chunk_short[HEADER_LEN + 2..HEADER_LEN + 4].copy_from_slice(&3u16.to_be_bytes());
        let mut init_short = sctp[..HEADER_LEN + 12].to_vec();
        init_short[HEADER_LEN + 2..HEADER_LEN + 4].copy_from_slice(&12u16.to_be_bytes());
        let mut param_long = sctp.to_vec();
        param_long[HEADER_LEN + INIT_LEN + 2..HEADER_LEN + INIT_LEN + 4]
            .copy_from_slice(&100u16.to_be_bytes());
        let mut no_cookie = sctp.to_vec();
        no_cookie[HEADER_LEN + INIT_LEN..HEADER_LEN + INIT_LEN + 2]
            .copy_from_slice(&5u16.to_be_bytes());
        let mut zero_tag = sctp.to_vec();
        zero_tag[HEADER_LEN + 4..HEADER_LEN + 8].fill(0);
        let header_only = sctp[..HEADER_LEN].to_vec();
        for (mut b, want) in [
            (chunk_long, SctpError::BadChunkLength),
            (chunk_short, SctpError::BadChunkLength),
            (init_short, SctpError::Truncated),
            (param_long, SctpError::BadParamLength),
            (no_cookie, SctpError::NoCookie),
            (zero_tag, SctpError::BadInit),
            (header_only, SctpError::NoChunk),
        ] {
            Packet::new_unchecked(&mut b[..]).fill_checksum();
            let p = Packet::new_checked(&b[..]).unwrap();
            assert_eq!(SctpRepr::parse(&p), Err(want));
        }
        // Not SCTP, not IPv4, a fragment.
        let mut udp = good.clone();
        udp[9] = 17;
        udp[10..12].fill(0);
        let c = ipv4_checksum(&udp[..20]);
        udp[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(Datagram::parse(&udp), Err(SctpError::NotSctp));
        let mut frag = good.clone();
        frag[6] = 0x20; // MF
        frag[10..12].fill(0);
        let c = ipv4_checksum(&frag[..20]);
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(Datagram::parse(&frag), Err(SctpError::Fragment));
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(Datagram::parse(&v6), Err(SctpError::NotIpv4));
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic, no dependency.
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let base = Datagram {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            sctp: init_ack(b"x/a"),
        }
        .to_vec()
        .unwrap();
        let probe = Probe {
            peer: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80),
            local_port: 50_000,
            fresh: Fresh { tag: 0xdead_beef, tsn: 1 },
        };
        for round in 0..20_000 {
            let mut b: Vec<u8> = if round % 2 == 0 {
                (0..next() % 120).map(|_| next() as u8).collect()
            } else {
                // A valid packet with random bytes changed, checksums fixed,
                // so the chunk and parameter walks see the garbage.
                let mut b = base.clone();
                for _ in 0..1 + next() % 4 {
                    let i = IPV4_HEADER_LEN + HEADER_LEN + (next() as usize) % (b.len() - 32);
                    b[i] = next() as u8;
                }
                let n = (next() as usize) % (b.len() + 1);
                b.truncate(n.max(IPV4_HEADER_LEN + HEADER_LEN));
                let total = b.len() as u16;
                b[2..4].copy_from_slice(&total.to_be_bytes());
                b[10..12].fill(0);
                let c = ipv4_checksum(&b[..20]);
                b[10..12].copy_from_slice(&c.to_be_bytes());
                Packet::new_unchecked(&mut b[IPV4_HEADER_LEN..]).fill_checksum();
                b
            };
            if round % 7 == 0 && b.len() > 12 {
                b[0] = 0x45;
            }
            let _ = Datagram::parse(&b);
            let _ = respond(&b, |_| true, b"x/a", Fresh { tag: 1, tsn: 1 });
            let _ = probe.reply(&b);
            if let Ok(p) = Packet::new_checked(&b[..]) {
                let _ = SctpRepr::parse(&p);
                let _ = p.chunks().count();
            }
        }
    }

    fn probe() -> Probe {
        Probe {
            peer: SocketAddrV4::new(Ipv4Addr::new(10, 65, 1, 3), 80),
            local_port: 51_234,
            fresh: Fresh { tag: 0x1234_5678, tsn: 42 },
        }
    }

    /// The probe's INIT in the IPv4 header the kernel would add.
    fn sent(p: &Probe, from: Ipv4Addr) -> Vec<u8> {
        let init = p.init();
        let r = SctpRepr::parse(&Packet::new_checked(&init[..]).unwrap()).unwrap();
        Datagram { src: from, dst: *p.peer.ip(), sctp: r }.to_vec().unwrap()
    }

    #[test]
    fn responder_answers_served_inits_only() {
        let p = probe();
        let client = Ipv4Addr::new(10, 65, 0, 2);
        let init = sent(&p, client);
        let fresh = Fresh { tag: 0xaaaa_bbbb, tsn: 7 };
        let (to, reply) = respond(&init, |port| port == 80, b"x/b\n", fresh).expect("an INIT ACK");
        assert_eq!(to, client);
        let d = Datagram::parse(&reply).unwrap();
        assert_eq!((d.src, d.dst), (*p.peer.ip(), client));
        assert_eq!((d.sctp.src_port, d.sctp.dst_port), (80, 51_234));
        assert_eq!(d.sctp.verification_tag, 0x1234_5678);
        let ChunkRepr::InitAck { init: fixed, cookie } = d.sctp.chunk else { panic!() };
        assert_eq!(fixed.initiate_tag, 0xaaaa_bbbb);
        assert_eq!(cookie, b"x/b\n");
        // The prober takes it, and the answer out of it.
        assert_eq!(p.reply(&reply), Some(Reply::Accepted { peer_tag: 0xaaaa_bbbb, cookie }));
        // A port not served, an INIT with a non-zero verification tag, an
        // INIT ACK, an ABORT, a bad checksum: no answer.
        assert_eq!(respond(&init, |port| port == 81, b"x/b", fresh), None);
        let mut tagged = init.clone();
        tagged[IPV4_HEADER_LEN + 4..IPV4_HEADER_LEN + 8].copy_from_slice(&[0, 0, 0, 1]);
        Packet::new_unchecked(&mut tagged[IPV4_HEADER_LEN..]).fill_checksum();
        assert_eq!(respond(&tagged, |_| true, b"x/b", fresh), None);
        assert_eq!(respond(&reply, |_| true, b"x/b", fresh), None);
        let abort_bytes = p.abort(1);
        let abort = Datagram {
            src: client,
            dst: *p.peer.ip(),
            sctp: SctpRepr::parse(&Packet::new_checked(&abort_bytes[..]).unwrap()).unwrap(),
        };
        assert_eq!(respond(&abort.to_vec().unwrap(), |_| true, b"x/b", fresh), None);
        let mut bad = init.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(respond(&bad, |_| true, b"x/b", fresh), None);
        // A long answer is cut to fit.
        let long = vec![b'a'; 5000];
        let (_, r) = respond(&init, |_| true, &long, fresh).unwrap();
        let ChunkRepr::InitAck { cookie, .. } = Datagram::parse(&r).unwrap().sctp.chunk else {
            panic!()
        };
        assert_eq!(cookie.len(), MAX_COOKIE_LEN);
    }

    #[test]
    fn prober_ignores_what_is_not_its_answer() {
        let p = probe();
        let client = Ipv4Addr::new(10, 65, 0, 2);
        let fresh = Fresh { tag: 3, tsn: 7 };
        let (_, reply) = respond(&sent(&p, client), |_| true, b"x/b", fresh).unwrap();
        let d = Datagram::parse(&reply).unwrap();
        for what in ["address", "source port", "destination port", "tag"] {
            let mut o = d;
            match what {
                "address" => o.src = Ipv4Addr::new(10, 65, 1, 4),
                "source port" => o.sctp.src_port = 81,
                "destination port" => o.sctp.dst_port = 51_235,
                _ => o.sctp.verification_tag ^= 1,
            }
            assert_eq!(p.reply(&o.to_vec().unwrap()), None, "another {what}");
        }
        // Our own INIT (a probe of our own pod passes the raw socket too).
        assert_eq!(p.reply(&sent(&p, client)), None);
        // An ABORT with our tag and the T bit clear is a refusal; with the T
        // bit set it is not ours to accept.
        let mut a = d;
        a.sctp.chunk = ChunkRepr::Abort { reflected: false };
        assert_eq!(p.reply(&a.to_vec().unwrap()), Some(Reply::Aborted));
        a.sctp.chunk = ChunkRepr::Abort { reflected: true };
        assert_eq!(p.reply(&a.to_vec().unwrap()), None);
    }

    #[test]
    fn zero_tags_are_never_sent() {
        let mut p = probe();
        p.fresh.tag = 0;
        let init = p.init();
        let r = SctpRepr::parse(&Packet::new_checked(&init[..]).unwrap()).unwrap();
        assert!(matches!(r.chunk, ChunkRepr::Init(i) if i.initiate_tag == 1));
        let (_, reply) =
            respond(&sent(&p, Ipv4Addr::LOCALHOST), |_| true, b"x", Fresh { tag: 0, tsn: 0 })
                .unwrap();
        assert!(matches!(p.reply(&reply), Some(Reply::Accepted { peer_tag: 1, .. })));
    }
}
