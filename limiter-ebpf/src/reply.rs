//! The RST a `reject` rule sends back for an over-budget SYN, built in
//! place over the SYN itself: MACs swapped, VLAN tags kept where they are,
//! a fresh IP header (IPv4: TTL 64, id 0, DF, no options; IPv6: hop limit
//! 64, no extension headers, traffic class and flow label 0), and a 20-byte
//! TCP header RST|ACK with seq 0, ack = the SYN's seq + 1 + its payload
//! (+1 for FIN), window 0, no options. The frame is then cut to exactly
//! that by the program (XDP or TC), which sends it out where it came in.
//!
//! What is not answered (the caller drops it, counted as
//! `reject_unanswerable`): an IPv4 first fragment (its payload, hence the
//! ack, is not all here) and IPv6 with extension headers (a routing header
//! would make the reply's destination wrong, a fragment header its ack).
//! IPv4 options are not copied: the reply is a fresh header without them.
//!
//! Everything the reply needs is read first, in small pieces; the headers
//! are then written field by field into packet memory, never assembled in
//! a big stack buffer, by a function of its own ([`build`]): the program's
//! frame plus any function it calls must fit 512 bytes on 6.1.

use limiter_common::family;

use crate::parse::{IPPROTO_TCP, IPV6_HLEN, IpPacket, MAX_OFFSET, TCP_HLEN};

/// The deepest IP header: Ethernet and the two inline VLAN tags we parse.
const MAX_L3: usize = 14 + 2 * 4;
const IPV4_HLEN: usize = 20;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const IPV4_MORE_FRAGMENTS: u8 = 0x20;
const IPV4_DONT_FRAGMENT: u8 = 0x40;
const TTL: u8 = 64;

/// Reads `N` bytes at `off` of [data, end).
/// Keep `N >= 2` (see `parse::bytes`).
#[inline(always)]
fn read<const N: usize>(data: usize, end: usize, off: usize) -> Option<[u8; N]> {
    if off > MAX_OFFSET || data + off + N > end {
        return None;
    }
    // SAFETY: [off, off + N) was checked against end just above.
    Some(unsafe { core::ptr::read_unaligned((data + off) as *const [u8; N]) })
}

/// Writes `bytes` at `off` of [data, end).
#[inline(always)]
fn write<const N: usize>(data: usize, end: usize, off: usize, bytes: &[u8; N]) -> Option<()> {
    if off > MAX_OFFSET || data + off + N > end {
        return None;
    }
    // SAFETY: [off, off + N) was checked against end just above.
    unsafe { core::ptr::write_unaligned((data + off) as *mut [u8; N], *bytes) };
    Some(())
}

/// Whether an over-budget SYN can be answered, from what the parser found
/// (no packet reads: this runs for every parser state the verifier walks).
/// [`build`] checks again what it reads.
#[inline(always)]
pub fn answerable(ip: &IpPacket) -> bool {
    ip.syn
        && !ip.more_fragments
        && ip.l3 <= MAX_L3
        && (ip.family == family::IPV4 || ip.l4 == ip.l3 + IPV6_HLEN)
}

/// What the RST acknowledges: 1 << 32 | the ack number, or 0 if the SYN
/// cannot be answered (see the module's documentation). Reading and
/// writing are two functions, each with its own small stack frame (LLVM
/// spills every byte of an unaligned read): the program's frame plus any
/// one of them must fit 512 bytes on 6.1.
#[inline(never)]
pub fn ack_for(data: usize, end: usize, ip: &IpPacket) -> u64 {
    match read_ack(data, end, ip) {
        Some(ack) => 1 << 32 | u64::from(ack),
        None => 0,
    }
}

#[inline(always)]
fn read_ack(data: usize, end: usize, ip: &IpPacket) -> Option<u32> {
    let l3 = ip.l3;
    let l4 = ip.l4;
    if l3 > MAX_L3 {
        return None;
    }
    let seq = be32(data, end, l4 + 4)?;
    let offset_flags = be16(data, end, l4 + 12)?;
    let ip_end = if ip.family != family::IPV4 {
        let payload = usize::from(be16(data, end, l3 + 4)?);
        // Extension headers, or a jumbogram (payload length 0).
        if be16(data, end, l3 + 6)? >> 8 != u16::from(IPPROTO_TCP) || payload == 0 {
            return None;
        }
        l3 + IPV6_HLEN + payload
    } else {
        if be16(data, end, l3 + 6)? & (u16::from(IPV4_MORE_FRAGMENTS) << 8) != 0 {
            return None;
        }
        l3 + usize::from(be16(data, end, l3 + 2)?)
    };
    let data_offset = usize::from(offset_flags >> 12) * 4;
    // Options running past the IP packet: nothing sane to acknowledge.
    let payload = ip_end.checked_sub(l4 + data_offset)?;
    Some(
        seq.wrapping_add(1)
            .wrapping_add(payload as u32)
            .wrapping_add(u32::from(offset_flags & u16::from(TCP_FIN) != 0)),
    )
}

/// Turns the SYN in [data, end) into its RST acknowledging `ack`, in
/// place: the reply's length, or 0 if it could not be written. With
/// `tcp_checksum`, the TCP checksum is filled in; without, it is left 0
/// for the caller (TC: see `tc_reject`). Everything is read before it is
/// overwritten, and nothing it reads lies past the reply's end, so the
/// caller may cut the frame afterwards.
#[inline(always)]
pub fn build(data: usize, end: usize, ip: &IpPacket, ack: u32, tcp_checksum: bool) -> usize {
    // Two functions again, for their stack frames (see ack_for).
    let pseudo = write_l2_l3(data, end, ip);
    if pseudo == 0 {
        return 0;
    }
    write_tcp(data, end, ip, ack, if tcp_checksum { pseudo } else { 0 })
}

/// Swaps the MACs and writes the IP header: 1 << 32 | the pseudo-header's
/// sum, or 0.
#[inline(never)]
fn write_l2_l3(data: usize, end: usize, ip: &IpPacket) -> u64 {
    match l2_l3(data, end, ip) {
        Some(pseudo) => 1 << 32 | u64::from(pseudo),
        None => 0,
    }
}

/// Writes the TCP header (with its checksum if `pseudo` is 1 << 32 | the
/// pseudo-header's sum; 0 without): the reply's length, or 0. (Five
/// arguments at most: an `Option` would take two.)
#[inline(never)]
fn write_tcp(data: usize, end: usize, ip: &IpPacket, ack: u32, pseudo: u64) -> usize {
    let pseudo = (pseudo != 0).then_some(pseudo as u32);
    tcp(data, end, ip, ack, pseudo).unwrap_or(0)
}

#[inline(always)]
fn tcp(data: usize, end: usize, ip: &IpPacket, ack: u32, pseudo: Option<u32>) -> Option<usize> {
    let l3 = ip.l3;
    if l3 > MAX_L3 {
        return None;
    }
    let reply_l4 = l3
        + if ip.family != family::IPV4 {
            IPV6_HLEN
        } else {
            IPV4_HLEN
        };
    // Read before the TCP header is written over (it may start earlier:
    // IPv4 options are left out).
    let ports = be32(data, end, ip.l4)?.rotate_left(16);
    let flags = ((TCP_HLEN as u32 / 4) << 28) | (u32::from(TCP_RST | TCP_ACK) << 16);
    let check = match pseudo {
        Some(pseudo) => !fold(words(ports) + words(ack) + words(flags) + pseudo),
        None => 0,
    };
    put32(data, end, reply_l4, ports)?;
    put32(data, end, reply_l4 + 4, 0)?;
    put32(data, end, reply_l4 + 8, ack)?;
    put32(data, end, reply_l4 + 12, flags)?;
    put32(data, end, reply_l4 + 16, u32::from(check) << 16)?;
    Some(reply_l4 + TCP_HLEN)
}

#[inline(always)]
fn l2_l3(data: usize, end: usize, ip: &IpPacket) -> Option<u32> {
    let l3 = ip.l3;
    if l3 > MAX_L3 {
        return None;
    }
    let ipv6 = ip.family != family::IPV4;

    // MACs swapped.
    let (dst_hi, dst_lo) = (be32(data, end, 0)?, be16(data, end, 4)?);
    let (src_hi, src_lo) = (be32(data, end, 6)?, be16(data, end, 10)?);
    put32(data, end, 0, src_hi)?;
    put16(data, end, 4, src_lo)?;
    put32(data, end, 6, dst_hi)?;
    put16(data, end, 10, dst_lo)?;

    let tcp_len = TCP_HLEN as u32;
    let mut pseudo = u32::from(IPPROTO_TCP) + tcp_len;
    if ipv6 {
        put32(data, end, l3, 0x6000_0000)?;
        put32(
            data,
            end,
            l3 + 4,
            (tcp_len << 16) | (u32::from(IPPROTO_TCP) << 8) | u32::from(TTL),
        )?;
        // Source and destination swapped a word at a time, under one
        // bounds check: arrays would take stack, and a check per word in a
        // loop becomes arithmetic on the packet end, which the verifier
        // refuses.
        let addrs = data + l3 + 8;
        if addrs + 32 > end {
            return None;
        }
        for i in 0..4 {
            let (at_src, at_dst) = (
                (addrs + 4 * i) as *mut u32,
                (addrs + 16 + 4 * i) as *mut u32,
            );
            // SAFETY: both words lie in the 32 bytes checked above.
            let (src, dst) = unsafe { (at_src.read_unaligned(), at_dst.read_unaligned()) };
            // SAFETY: as above.
            unsafe {
                at_src.write_unaligned(dst);
                at_dst.write_unaligned(src);
            }
            pseudo += words(u32::from_be(src)) + words(u32::from_be(dst));
        }
    } else {
        let src = be32(data, end, l3 + 12)?;
        let dst = be32(data, end, l3 + 16)?;
        let first = 0x4500_0000 | (IPV4_HLEN as u32 + tcp_len);
        let second = u32::from(IPV4_DONT_FRAGMENT) << 8;
        let third = (u32::from(TTL) << 24) | (u32::from(IPPROTO_TCP) << 16);
        let check = !fold(words(first) + words(second) + words(third) + words(src) + words(dst));
        put32(data, end, l3, first)?;
        put32(data, end, l3 + 4, second)?;
        put32(data, end, l3 + 8, third | u32::from(check))?;
        put32(data, end, l3 + 12, dst)?;
        put32(data, end, l3 + 16, src)?;
        pseudo += words(src) + words(dst);
    }
    Some(pseudo)
}

#[inline(always)]
fn be16(data: usize, end: usize, off: usize) -> Option<u16> {
    read::<2>(data, end, off).map(u16::from_be_bytes)
}

#[inline(always)]
fn be32(data: usize, end: usize, off: usize) -> Option<u32> {
    read::<4>(data, end, off).map(u32::from_be_bytes)
}

#[inline(always)]
fn put16(data: usize, end: usize, off: usize, value: u16) -> Option<()> {
    write(data, end, off, &value.to_be_bytes())
}

#[inline(always)]
fn put32(data: usize, end: usize, off: usize, value: u32) -> Option<()> {
    write(data, end, off, &value.to_be_bytes())
}

/// The two 16-bit words of `value`, added.
#[inline(always)]
fn words(value: u32) -> u32 {
    (value >> 16) + (value & 0xffff)
}

/// One's-complement sums (before folding) of what the TCP checksum covers:
/// the reply's TCP header with its checksum zero, and the pseudo-header.
/// Big-endian 16-bit words.
pub struct Sums {
    pub tcp: u32,
    pub pseudo: u32,
}

/// The sums for the TCP checksum of a reply [`build`] wrote without one,
/// its IP header at `l3`; `None` if the reply is not there.
#[inline(never)]
pub fn sums(data: usize, end: usize, l3: usize, ipv6: bool) -> Option<Sums> {
    if l3 > MAX_L3 {
        return None;
    }
    let (l4, addrs) = if ipv6 {
        let addrs = read::<32>(data, end, l3 + 8)?;
        (l3 + IPV6_HLEN, sum(&addrs))
    } else {
        (l3 + IPV4_HLEN, sum(&read::<8>(data, end, l3 + 12)?))
    };
    let pseudo = addrs + u32::from(IPPROTO_TCP) + TCP_HLEN as u32;
    let tcp = sum(&read::<TCP_HLEN>(data, end, l4)?);
    Some(Sums { tcp, pseudo })
}

/// The sum of `bytes` as big-endian 16-bit words (`N` even and small: no
/// overflow).
#[inline(always)]
fn sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut total = 0u32;
    let mut i = 0;
    while i + 1 < N {
        total += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    total
}

/// Folds a one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut total: u32) -> u16 {
    total = (total & 0xffff) + (total >> 16);
    total = (total & 0xffff) + (total >> 16);
    total as u16
}
