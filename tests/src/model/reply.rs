//! The RST the model expects for an over-budget SYN of a `reject` rule,
//! from docs/datapath.md ("reject"): MACs swapped, VLAN tags kept, a fresh
//! IP header (IPv4: TTL 64, id 0, DF, no options; IPv6: hop limit 64, no
//! extension headers), TCP RST|ACK, seq 0, ack = seq + 1 + payload (+1 for
//! FIN), window 0, no options; nothing after it.

use super::parse::IpInfo;

/// The reply to `frame`, or `None` for a SYN that is not answered: an IPv4
/// packet with more fragments, IPv6 with extension headers (or a
/// jumbogram), or TCP options running past the IP packet.
pub fn rst(frame: &[u8], ip: &IpInfo) -> Option<Vec<u8>> {
    let l3 = ip.l3_offset;
    let v6 = frame.get(l3)? >> 4 == 6;
    let (l4, ip_end, src, dst) = if v6 {
        let hdr = frame.get(l3..l3 + 40)?;
        let payload = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
        if hdr[6] != 6 || payload == 0 {
            return None;
        }
        (l3 + 40, l3 + 40 + payload, &hdr[8..24], &hdr[24..40])
    } else {
        let hdr = frame.get(l3..l3 + 20)?;
        if hdr[6] & 0x20 != 0 {
            return None;
        }
        let ihl = usize::from(hdr[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        (l3 + ihl, l3 + total, &hdr[12..16], &hdr[16..20])
    };
    let tcp = frame.get(l4..l4 + 20)?;
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    let payload = ip_end.checked_sub(l4 + data_offset)?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let fin = u32::from(tcp[13] & 0x01);
    let ack = seq
        .wrapping_add(1)
        .wrapping_add(payload as u32)
        .wrapping_add(fin);

    let mut out = Vec::with_capacity(l3 + 60);
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..l3]);
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&tcp[2..4]);
    seg.extend_from_slice(&tcp[0..2]);
    seg.extend_from_slice(&[0; 4]);
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[0x50, 0x14, 0, 0, 0, 0, 0, 0]);
    let mut pseudo = [dst, src].concat();
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&seg);
    let check = checksum(&pseudo);
    seg[16..18].copy_from_slice(&check.to_be_bytes());
    if v6 {
        out.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
        out.extend_from_slice(dst);
        out.extend_from_slice(src);
    } else {
        let mut hdr = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        hdr.extend_from_slice(dst);
        hdr.extend_from_slice(src);
        let check = checksum(&hdr);
        hdr[10..12].copy_from_slice(&check.to_be_bytes());
        out.extend_from_slice(&hdr);
    }
    out.extend_from_slice(&seg);
    Some(out)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
