//! Packet parsing: one cursor over one bounds-checked read.
//!
//! Covers Ethernet, up to two VLAN tags (802.1Q / 802.1ad, counting a tag the
//! stack already moved out of the frame), IPv4 with options, IPv6 with a
//! bounded chain of extension headers, fragments (refusing the tiny ones of
//! RFC 1858), TCP flags and ICMPv6 neighbour discovery. Never reads at fixed
//! offsets past L2.

use limiter_common::{Reason, family};

/// Packet memory as both program types see it.
pub trait Packet {
    /// The program's context, for kernel log records.
    type Ctx: aya_ebpf::EbpfContext;
    fn ctx(&self) -> &Self::Ctx;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length charged to byte budgets: the L2 frame without FCS.
    fn wire_len(&self) -> u32;
    /// VLAN tags already taken out of the frame (0 or 1): TC sees the outer
    /// tag in `skb->vlan_tci`, since the stack untags before TC runs.
    fn offloaded_vlan_tags(&self) -> usize;
}

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;

pub(crate) const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_ICMPV6: u8 = 58;
/// "No next header": the only payload that can be empty (payload length 0)
/// without being a jumbogram.
const IPPROTO_NONE: u8 = 59;
pub(crate) const IPV6_HLEN: usize = 40;
/// The largest payload a payload length field can state; a payload length
/// of 0 is a jumbogram's (RFC 2675) only when the payload is larger.
const IPV6_MAX_PAYLOAD: usize = 65_535;
pub(crate) const TCP_HLEN: usize = 20;
/// Extension headers walked before giving up on finding L4.
const MAX_IPV6_EXT: usize = 6;
/// Cursor limit: keeps every offset bounded for the verifier. No header we
/// need lies further in (6 extension headers of at most 2 KiB each would, but
/// such a chain is reported as too long).
pub(crate) const MAX_OFFSET: usize = 2048;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// The protocol of a packet whose L4 header was not found (IANA reserves
/// 255; the agent refuses it in rules).
pub const PROTO_UNKNOWN: u8 = 255;

/// What the enforcement code needs to know about an IP packet.
#[derive(Clone, Copy)]
pub struct IpPacket {
    pub family: u32,
    pub src: [u8; 16],
    /// Offset of the IP header (the destination address is read from
    /// there; the mark rewrite too).
    pub l3: usize,
    /// The L4 protocol ([`PROTO_UNKNOWN`] past too long an IPv6 chain).
    pub proto: u8,
    /// Offset of the L4 header; 0 where there is none to read (a non-first
    /// fragment, an unknown protocol).
    pub l4: usize,
    /// The destination port of TCP, UDP and SCTP, where the packet has one
    /// (not a non-first fragment, not truncated before it).
    pub dst_port: Option<u16>,
    /// A TCP SYN without ACK: a new connection attempt.
    pub syn: bool,
    /// A first fragment with more to come (IPv4 MF, IPv6 fragment header
    /// M): its payload is not all here (a `reject` reply needs it).
    pub more_fragments: bool,
    /// A noteworthy but charged condition (fragment, truncated TCP...).
    pub note: Option<Reason>,
}

pub enum Parsed {
    /// An IP packet to classify.
    Ip(IpPacket),
    /// Passed untouched, counted under this reason.
    Pass(Reason),
    /// Dropped, counted under this reason (malformed IP).
    Drop(Reason),
}

/// Reads `N` bytes at `off`, or `None` past the end of the packet.
/// Keep `N >= 2`: for one byte LLVM rewrites `p + 1 > end` into `p >= end`,
/// a form the verifier does not accept as a bounds check.
#[inline(always)]
pub fn read<const N: usize, P: Packet>(pkt: &P, off: usize) -> Option<[u8; N]> {
    if off > MAX_OFFSET {
        return None;
    }
    let start = pkt.data();
    if start + off + N > pkt.data_end() {
        return None;
    }
    // SAFETY: the range [off, off + N) was checked against data_end above;
    // read_unaligned because headers have no alignment guarantee.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

/// [`read`], also refusing bytes at or past `end`: the end of the IP
/// packet, which comes before the frame's when Ethernet padding or a trailer
/// follows it. Padding is not part of the packet and must not parse as L4.
#[inline(always)]
fn bytes_before<const N: usize, P: Packet>(pkt: &P, off: usize, end: usize) -> Option<[u8; N]> {
    if off + N > end {
        return None;
    }
    read::<N, P>(pkt, off)
}

/// 16 address bytes from two native-endian words, stored as words. A
/// zero-filled byte array (`[0u8; 16]`) compiles to a call to a
/// byte-at-a-time `memset` on this target (three instructions a byte, on
/// every packet); volatile stores cannot be merged back into one.
#[inline(always)]
pub fn addr16(low: u64, high: u64) -> [u8; 16] {
    let mut words = core::mem::MaybeUninit::<[u64; 2]>::uninit();
    let word = words.as_mut_ptr() as *mut u64;
    // SAFETY: the array's two aligned words, both written before it is
    // read; any bytes are a valid [u8; 16].
    unsafe {
        core::ptr::write_volatile(word, low);
        core::ptr::write_volatile(word.add(1), high);
        core::mem::transmute::<[u64; 2], [u8; 16]>(words.assume_init())
    }
}

/// An IPv4 address in the first 4 of 16 bytes, the rest zero.
#[inline(always)]
pub fn ipv4_in_16(addr: [u8; 4]) -> [u8; 16] {
    addr16(u64::from(u32::from_ne_bytes(addr)), 0)
}

#[inline(always)]
fn be16<P: Packet>(pkt: &P, off: usize) -> Option<u16> {
    read::<2, P>(pkt, off).map(u16::from_be_bytes)
}

#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Parsed {
    let Some(mut ethertype) = be16(pkt, 12) else {
        return Parsed::Pass(Reason::TruncatedL2);
    };
    let mut off = ETH_HLEN;
    // A tag held outside the frame counts toward the two we look through.
    let inline_tags = MAX_VLAN_TAGS - pkt.offloaded_vlan_tags().min(1);
    for tag in 0..MAX_VLAN_TAGS {
        if tag == inline_tags || (ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD) {
            break;
        }
        // A tag is TCI (2 bytes) then the inner EtherType (2 bytes).
        let Some(inner) = be16(pkt, off + 2) else {
            return Parsed::Pass(Reason::TruncatedL2);
        };
        ethertype = inner;
        off += 4;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(pkt, off),
        ETH_P_IPV6 => parse_ipv6(pkt, off),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Pass(Reason::TooManyVlanTags),
        _ => Parsed::Pass(Reason::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet>(pkt: &P, l3: usize) -> Parsed {
    let Some(hdr) = read::<20, P>(pkt, l3) else {
        return Parsed::Drop(Reason::MalformedIpv4);
    };
    let version = hdr[0] >> 4;
    let header_len = usize::from(hdr[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let on_wire = (pkt.wire_len() as usize).saturating_sub(l3);
    if version != 4 || header_len < 20 || total_len < header_len || total_len > on_wire {
        return Parsed::Drop(Reason::MalformedIpv4);
    }
    // Options are part of the header: it must be all there.
    if pkt.data() + l3 + header_len > pkt.data_end() {
        return Parsed::Drop(Reason::MalformedIpv4);
    }
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&hdr[12..16]);
    let flags_and_offset = u16::from_be_bytes([hdr[6], hdr[7]]);
    let fragment_offset = flags_and_offset & 0x1fff;
    let more_fragments = flags_and_offset & 0x2000 != 0;
    let mut ip = IpPacket {
        family: family::IPV4,
        src,
        l3,
        proto: hdr[9],
        l4: 0,
        dst_port: None,
        syn: false,
        more_fragments,
        note: None,
    };
    if fragment_offset != 0 {
        // Offset 1 (8 bytes) can only serve to overwrite the TCP flags.
        if fragment_offset == 1 && hdr[9] == IPPROTO_TCP {
            return Parsed::Drop(Reason::TinyFragment);
        }
        ip.note = Some(Reason::Fragment);
        return Parsed::Ip(ip);
    }
    transport(pkt, l3 + header_len, l3 + total_len, more_fragments, ip)
}

/// The L4 header of an unfragmented packet or a first fragment: the
/// destination port of TCP, UDP and SCTP (all three start with the source
/// and destination ports), and TCP's flags.
#[inline(always)]
fn transport<P: Packet>(
    pkt: &P,
    l4: usize,
    end: usize,
    first_fragment: bool,
    mut ip: IpPacket,
) -> Parsed {
    ip.l4 = l4;
    if matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        ip.dst_port = bytes_before::<4, P>(pkt, l4, end).map(|p| u16::from_be_bytes([p[2], p[3]]));
    }
    if ip.proto == IPPROTO_TCP {
        return tcp(pkt, l4, end, first_fragment, ip);
    }
    Parsed::Ip(ip)
}

/// The TCP header of an unfragmented packet or a first fragment.
#[inline(always)]
fn tcp<P: Packet>(
    pkt: &P,
    l4: usize,
    end: usize,
    first_fragment: bool,
    mut ip: IpPacket,
) -> Parsed {
    // The whole 20-byte fixed header must be in the packet for the flags to
    // count.
    match bytes_before::<TCP_HLEN, P>(pkt, l4, end) {
        // A data offset below 5 overlaps the header with data: Linux drops
        // it, and its "flags" mean nothing.
        Some(tcp) if usize::from(tcp[12] >> 4) * 4 < TCP_HLEN => {
            ip.note = Some(Reason::MalformedTcp);
        }
        Some(tcp) => ip.syn = tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN,
        // A first fragment that leaves the flags to a later one hides a SYN.
        None if first_fragment => return Parsed::Drop(Reason::TinyFragment),
        None => ip.note = Some(Reason::TruncatedTcp),
    }
    Parsed::Ip(ip)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P, l3: usize) -> Parsed {
    let Some(hdr) = read::<IPV6_HLEN, P>(pkt, l3) else {
        return Parsed::Drop(Reason::MalformedIpv6);
    };
    let payload_len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    let on_wire = (pkt.wire_len() as usize).saturating_sub(l3 + IPV6_HLEN);
    if hdr[0] >> 4 != 6 || payload_len > on_wire {
        return Parsed::Drop(Reason::MalformedIpv6);
    }
    // Payload length 0 states an empty payload, which only "no next header"
    // can have, or a jumbogram, whose payload is larger than the field can
    // state (RFC 2675; also the stack's own GRO packets with BIG TCP). Any
    // other packet that says 0 hides its payload: Linux never delivers it.
    let jumbo = payload_len == 0 && on_wire > IPV6_MAX_PAYLOAD;
    if payload_len == 0 && !jumbo && hdr[6] != IPPROTO_NONE {
        return Parsed::Drop(Reason::MalformedIpv6);
    }
    // Where the packet ends: a jumbogram's end is the frame's.
    let end = l3 + IPV6_HLEN + if jumbo { on_wire } else { payload_len };
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let mut ip = IpPacket {
        family: family::IPV6,
        src,
        l3,
        proto: PROTO_UNKNOWN,
        l4: 0,
        dst_port: None,
        syn: false,
        more_fragments: false,
        note: None,
    };
    let hop_limit = hdr[7];
    let mut first_fragment = false;
    let mut next = hdr[6];
    let mut off = l3 + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let Some(ext) = bytes_before::<2, P>(pkt, off, end) else {
                    return Parsed::Drop(Reason::MalformedIpv6Ext);
                };
                next = ext[0];
                off += (usize::from(ext[1]) + 1) * 8;
            }
            // Fragment header: 8 bytes; only the first fragment has L4.
            44 => {
                let Some(ext) = bytes_before::<8, P>(pkt, off, end) else {
                    return Parsed::Drop(Reason::MalformedIpv6Ext);
                };
                let offset_bytes = u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8;
                if offset_bytes != 0 {
                    // Offset 8 can only serve to overwrite the TCP flags.
                    if offset_bytes == 8 && ext[0] == IPPROTO_TCP {
                        return Parsed::Drop(Reason::TinyFragment);
                    }
                    ip.proto = ext[0];
                    ip.note = Some(Reason::Fragment);
                    return Parsed::Ip(ip);
                }
                // The M flag: more fragments follow this first one.
                first_fragment = ext[3] & 1 != 0;
                ip.more_fragments = first_fragment;
                next = ext[0];
                off += 8;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let Some(ext) = bytes_before::<2, P>(pkt, off, end) else {
                    return Parsed::Drop(Reason::MalformedIpv6Ext);
                };
                next = ext[0];
                off += (usize::from(ext[1]) + 2) * 4;
            }
            _ => return l4_ipv6(pkt, next, off, end, hop_limit, first_fragment, ip),
        }
        // The whole header must be in the packet, not only its first bytes.
        if off > end {
            return Parsed::Drop(Reason::MalformedIpv6Ext);
        }
        if off > MAX_OFFSET {
            ip.note = Some(Reason::Ipv6ExtChainTooLong);
            return Parsed::Ip(ip);
        }
    }
    match next {
        0 | 43 | 44 | 51 | 60 => {
            ip.note = Some(Reason::Ipv6ExtChainTooLong);
            Parsed::Ip(ip)
        }
        _ => l4_ipv6(pkt, next, off, end, hop_limit, first_fragment, ip),
    }
}

#[inline(always)]
fn l4_ipv6<P: Packet>(
    pkt: &P,
    proto: u8,
    l4: usize,
    end: usize,
    hop_limit: u8,
    first_fragment: bool,
    mut ip: IpPacket,
) -> Parsed {
    ip.proto = proto;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            return transport(pkt, l4, end, first_fragment, ip);
        }
        IPPROTO_ICMPV6 => {
            // Router/neighbour solicitation/advertisement, redirect: 133..=137.
            // Real ND always has hop limit 255 (RFC 4861 7.1.1), so it cannot
            // come from off-link; anything else is charged like other traffic.
            // Type, code, checksum: 4 bytes any ICMPv6 message has.
            if let Some([icmp_type, ..]) = bytes_before::<4, P>(pkt, l4, end)
                && (133..=137).contains(&icmp_type)
                && hop_limit == 255
            {
                return Parsed::Pass(Reason::NeighborDiscovery);
            }
        }
        _ => {}
    }
    ip.l4 = l4;
    Parsed::Ip(ip)
}
