//! The `mark` rewrite: DSCP in the IPv4 TOS byte (with the header checksum
//! updated incrementally, RFC 1624) or in the IPv6 traffic class. ECN bits are
//! kept. Computed here, written by each program in its own way.

use limiter_common::family;

/// Bytes to write at `offset`: `len` of `bytes` (1..=2), plus for IPv4 the new
/// header checksum at `offset + 9` (the checksum sits 10 bytes into the
/// header, the TOS byte 1 byte in).
pub struct Rewrite {
    pub offset: usize,
    pub bytes: [u8; 2],
    pub len: usize,
    pub ipv4_checksum: Option<[u8; 2]>,
}

/// Reads the first bytes of the IP header at `l3` and works out the rewrite.
/// `hdr` holds the IP header's first 12 bytes.
#[inline(always)]
pub fn plan(ip_family: u32, l3: usize, hdr: &[u8; 12], dscp: u8) -> Rewrite {
    let dscp = dscp & 0x3f;
    if ip_family == family::IPV4 {
        let old_tos = hdr[1];
        let new_tos = (dscp << 2) | (old_tos & 0x03);
        let old_word = u16::from_be_bytes([hdr[0], old_tos]);
        let new_word = u16::from_be_bytes([hdr[0], new_tos]);
        let old_sum = u16::from_be_bytes([hdr[10], hdr[11]]);
        let new_sum = checksum_update(old_sum, old_word, new_word);
        Rewrite {
            offset: l3 + 1,
            bytes: [new_tos, 0],
            len: 1,
            ipv4_checksum: Some(new_sum.to_be_bytes()),
        }
    } else {
        // Version (4 bits) | traffic class (8) | flow label (20).
        let old_tc = (hdr[0] << 4) | (hdr[1] >> 4);
        let new_tc = (dscp << 2) | (old_tc & 0x03);
        Rewrite {
            offset: l3,
            bytes: [
                (hdr[0] & 0xf0) | (new_tc >> 4),
                (new_tc << 4) | (hdr[1] & 0x0f),
            ],
            len: 2,
            ipv4_checksum: None,
        }
    }
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
#[inline(always)]
fn checksum_update(old_sum: u16, old_word: u16, new_word: u16) -> u16 {
    let mut sum = u32::from(!old_sum) + u32::from(!old_word) + u32::from(new_word);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
