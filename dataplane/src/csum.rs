//! Internet checksum (RFC 1071), its incremental update (RFC 1624), and the
//! completion of partial checksums that offloading kernels hand us.

use crate::wire::VnetHdr;

/// One's-complement sum of `data` folded into 32 bits (not yet complemented).
/// Sums 32-bit big-endian words into a 64-bit accumulator and folds at the
/// end (RFC 1071 section 2: any word size gives the same folded result):
/// eight bytes per step, which the packet path needs for 64 KiB frames.
pub fn sum(data: &[u8], acc: u32) -> u32 {
    let mut a = u64::from(acc);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        a = a.wrapping_add(w >> 32).wrapping_add(w & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        a += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        a += u64::from(*last) << 8;
    }
    let a = (a & 0xffff_ffff) + (a >> 32);
    let a = (a & 0xffff_ffff) + (a >> 32);
    a as u32
}

/// Fold a 32-bit sum into 16 bits.
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum of `data`: the complement of its folded sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word changed from
/// `old` to `new`.
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(acc)
}

/// Why a partial checksum could not be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("partial checksum offsets outside the frame")]
pub struct BadCsumOffsets;

/// Finish a `NEEDS_CSUM` frame: the field at `csum_start + csum_offset`
/// holds the pseudo-header sum; sum from `csum_start` to the end of the
/// frame and store the result there. Clears the flag.
pub fn finish_partial(frame: &mut [u8], vnet: &mut VnetHdr) -> Result<(), BadCsumOffsets> {
    if !vnet.needs_csum() {
        return Ok(());
    }
    let start = usize::from(vnet.csum_start);
    let field = start + usize::from(vnet.csum_offset);
    if start >= frame.len() || field + 2 > frame.len() {
        return Err(BadCsumOffsets);
    }
    let c = checksum(&frame[start..]);
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    vnet.flags &= !crate::wire::vnet::F_NEEDS_CSUM;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example: sum of these words is 0xddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&d, 0)), 0xddf2);
        assert_eq!(checksum(&d), !0xddf2);
    }

    /// The plain 16-bit loop of RFC 1071, as the reference.
    fn sum16(data: &[u8], mut acc: u64) -> u16 {
        for c in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn wide_sum_matches_the_16_bit_reference() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in (0..200).chain([1499, 1500, 9000, 65_535]) {
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let acc = (next() & 0x3_ffff) as u32;
            assert_eq!(fold(sum(&data, acc)), sum16(&data, u64::from(acc)), "len {len}");
        }
        let ones = vec![0xffu8; 65_535];
        assert_eq!(fold(sum(&ones, 0)), sum16(&ones, 0));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(sum(&[0x12, 0x34, 0x56], 0)), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_matches_full() {
        // A real IPv4 header (ping from 10.65.0.2 to 10.65.0.3, TTL 64).
        let mut h = [
            0x45, 0x00, 0x00, 0x54, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 0x0a, 0x41,
            0x00, 0x02, 0x0a, 0x41, 0x00, 0x03,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&h), 0);
        let old = u16::from_be_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_be_bytes([h[8], h[9]]);
        let c2 = update16(c, old, new);
        h[10..12].copy_from_slice(&c2.to_be_bytes());
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn finish_rejects_offsets_past_end() {
        let mut v = VnetHdr { flags: 1, csum_start: 30, csum_offset: 16, ..Default::default() };
        let mut f = [0u8; 40];
        assert_eq!(finish_partial(&mut f, &mut v), Err(BadCsumOffsets));
        assert!(v.needs_csum());
    }
}
