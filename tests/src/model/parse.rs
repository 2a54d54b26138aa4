//! Parsing as docs/datapath.md describes it: is the frame IP, where is its
//! source, does it open a TCP connection, what is wrong with it.
//!
//! Written as a reading of the standards rather than as a cursor: each layer
//! is a slice that ends where the layer below says it ends. An IP packet ends
//! at its own length (IPv4 total length, IPv6 payload length), so bytes after
//! it (Ethernet padding, trailers) are never read as extension headers or L4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use limiter_common::Reason;

/// What parsing decided about a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Passed untouched, before any rule is looked at.
    Pass(Reason),
    /// Dropped as malformed IP.
    Drop(Reason),
    /// An IP packet to classify.
    Ip(IpInfo),
}

/// What classification needs to know about an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpInfo {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The upper-layer protocol; `None` where the IPv6 chain hides it.
    pub protocol: Option<u8>,
    /// TCP's, UDP's and SCTP's destination port, when the packet holds it
    /// (not in a non-first fragment, not cut before it).
    pub dst_port: Option<u16>,
    /// Where the IP header starts in the frame.
    pub l3_offset: usize,
    /// A TCP SYN without ACK.
    pub new_connection: bool,
    /// A condition that is counted but still charged (fragment, truncated
    /// TCP, extension chain too long).
    pub note: Option<Reason>,
}

const ETHERTYPE_AT: usize = 12;
const VLAN_TAG_LEN: usize = 4;
const VLAN_TPIDS: [u16; 2] = [0x8100, 0x88a8];
/// VLAN tags looked through; one more is "too many".
const VLAN_TAGS_PARSED: usize = 2;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_SCTP: u8 = 132;
const PROTO_ICMPV6: u8 = 58;
/// "No next header": the one payload that may be empty.
const PROTO_NONE: u8 = 59;
/// What a payload length field can state; 0 means more only for a
/// jumbogram (RFC 2675).
const IPV6_MAX_PAYLOAD: usize = 65_535;
const TCP_MIN_HEADER: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Type, code and checksum: the part every ICMPv6 message has.
const ICMPV6_HEADER: usize = 4;
/// Router/neighbour solicitation and advertisement, redirect (RFC 4861).
const ND_TYPES: std::ops::RangeInclusive<u8> = 133..=137;
/// Real neighbour discovery is never forwarded (RFC 4861 7.1.1).
const ND_HOP_LIMIT: u8 = 255;
/// Extension headers walked before L4 counts as unknown.
const IPV6_EXT_WALKED: usize = 6;
/// Frame offset past which the chain counts as too long.
const CURSOR_LIMIT: usize = 2048;

pub fn parse(frame: &[u8]) -> Parsed {
    let mut ethertype_at = ETHERTYPE_AT;
    let mut tags = 0;
    let ethertype = loop {
        let Some(ethertype) = be16(frame, ethertype_at) else {
            return Parsed::Pass(Reason::TruncatedL2);
        };
        if !VLAN_TPIDS.contains(&ethertype) {
            break ethertype;
        }
        if tags == VLAN_TAGS_PARSED {
            return Parsed::Pass(Reason::TooManyVlanTags);
        }
        tags += 1;
        ethertype_at += VLAN_TAG_LEN;
    };
    let l3 = ethertype_at + 2;
    match ethertype {
        ETHERTYPE_IPV4 => ipv4(frame, l3),
        ETHERTYPE_IPV6 => ipv6(frame, l3),
        _ => Parsed::Pass(Reason::NotIp),
    }
}

fn ipv4(frame: &[u8], l3: usize) -> Parsed {
    let malformed = Parsed::Drop(Reason::MalformedIpv4);
    let on_wire = frame.get(l3..).unwrap_or_default();
    if on_wire.len() < IPV4_MIN_HEADER {
        return malformed;
    }
    let version = on_wire[0] >> 4;
    let header_len = usize::from(on_wire[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([on_wire[2], on_wire[3]]));
    if version != 4
        || header_len < IPV4_MIN_HEADER
        || header_len > on_wire.len()
        || total_len < header_len
        || total_len > on_wire.len()
    {
        return malformed;
    }
    let packet = &on_wire[..total_len];
    let s = &packet[12..16];
    let d = &packet[16..20];
    let mut ip = IpInfo {
        source: IpAddr::V4(Ipv4Addr::new(s[0], s[1], s[2], s[3])),
        destination: IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3])),
        protocol: Some(packet[9]),
        dst_port: None,
        l3_offset: l3,
        new_connection: false,
        note: None,
    };
    let flags_and_offset = u16::from_be_bytes([packet[6], packet[7]]);
    let fragment_offset = flags_and_offset & 0x1fff;
    let more_fragments = flags_and_offset & 0x2000 != 0;
    if fragment_offset != 0 {
        // RFC 1858: a TCP fragment at offset 8 bytes rewrites the flags.
        if fragment_offset == 1 && packet[9] == PROTO_TCP {
            return Parsed::Drop(Reason::TinyFragment);
        }
        ip.note = Some(Reason::Fragment);
        return Parsed::Ip(ip);
    }
    upper_layer(packet[9], &packet[header_len..], more_fragments, ip)
}

/// The upper-layer header of an unfragmented packet or a first fragment.
fn upper_layer(protocol: u8, segment: &[u8], first_fragment: bool, mut ip: IpInfo) -> Parsed {
    if matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        // All three start with the source port, then the destination port.
        ip.dst_port = be16(segment, 2);
    }
    if protocol == PROTO_TCP {
        return tcp(segment, first_fragment, ip);
    }
    Parsed::Ip(ip)
}

/// The TCP header of an unfragmented packet or of a first fragment.
fn tcp(segment: &[u8], first_fragment: bool, mut ip: IpInfo) -> Parsed {
    if segment.len() < TCP_MIN_HEADER {
        // RFC 1858: a first fragment must carry the whole TCP header.
        if first_fragment {
            return Parsed::Drop(Reason::TinyFragment);
        }
        ip.note = Some(Reason::TruncatedTcp);
        return Parsed::Ip(ip);
    }
    let data_offset = usize::from(segment[12] >> 4) * 4;
    if data_offset < TCP_MIN_HEADER {
        ip.note = Some(Reason::MalformedTcp);
        return Parsed::Ip(ip);
    }
    let flags = segment[13];
    ip.new_connection = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
    Parsed::Ip(ip)
}

fn ipv6(frame: &[u8], l3: usize) -> Parsed {
    let on_wire = frame.get(l3..).unwrap_or_default();
    if on_wire.len() < IPV6_HEADER || on_wire[0] >> 4 != 6 {
        return Parsed::Drop(Reason::MalformedIpv6);
    }
    let room = on_wire.len() - IPV6_HEADER;
    let payload_len = usize::from(u16::from_be_bytes([on_wire[4], on_wire[5]]));
    if payload_len > room {
        return Parsed::Drop(Reason::MalformedIpv6);
    }
    // 0 says "empty", true only with no next header, unless the payload is
    // too large for the field: a jumbogram, bounded by the frame.
    let jumbo = payload_len == 0 && room > IPV6_MAX_PAYLOAD;
    if payload_len == 0 && !jumbo && on_wire[6] != PROTO_NONE {
        return Parsed::Drop(Reason::MalformedIpv6);
    }
    let end = IPV6_HEADER + if jumbo { room } else { payload_len };
    let packet = &on_wire[..end];
    let mut source = [0u8; 16];
    source.copy_from_slice(&packet[8..24]);
    let mut destination = [0u8; 16];
    destination.copy_from_slice(&packet[24..40]);
    let mut ip = IpInfo {
        source: IpAddr::V6(Ipv6Addr::from(source)),
        destination: IpAddr::V6(Ipv6Addr::from(destination)),
        protocol: None,
        dst_port: None,
        l3_offset: l3,
        new_connection: false,
        note: None,
    };
    let hop_limit = packet[7];
    let mut first_fragment = false;
    let mut next = packet[6];
    let mut at = IPV6_HEADER;
    let mut walked = 0;
    while is_extension(next) {
        if walked == IPV6_EXT_WALKED {
            ip.note = Some(Reason::Ipv6ExtChainTooLong);
            return Parsed::Ip(ip);
        }
        // The whole header must be in the packet, not only its first bytes.
        let Some(len) = extension_len(next, packet.get(at..).unwrap_or_default()) else {
            return Parsed::Drop(Reason::MalformedIpv6Ext);
        };
        if at + len > packet.len() {
            return Parsed::Drop(Reason::MalformedIpv6Ext);
        }
        let header = &packet[at..at + len];
        if next == EXT_FRAGMENT {
            let offset_units = u16::from_be_bytes([header[2], header[3]]) >> 3;
            if offset_units == 1 && header[0] == PROTO_TCP {
                return Parsed::Drop(Reason::TinyFragment);
            }
            if offset_units != 0 {
                // What follows is no header: only its kind is known.
                ip.protocol = Some(header[0]);
                ip.note = Some(Reason::Fragment);
                return Parsed::Ip(ip);
            }
            first_fragment = header[3] & 1 != 0;
        }
        next = header[0];
        at += len;
        walked += 1;
        if l3 + at > CURSOR_LIMIT {
            ip.note = Some(Reason::Ipv6ExtChainTooLong);
            return Parsed::Ip(ip);
        }
    }
    let upper = &packet[at..];
    ip.protocol = Some(next);
    match next {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            return upper_layer(next, upper, first_fragment, ip);
        }
        PROTO_ICMPV6
            if upper.len() >= ICMPV6_HEADER
                && ND_TYPES.contains(&upper[0])
                && hop_limit == ND_HOP_LIMIT =>
        {
            return Parsed::Pass(Reason::NeighborDiscovery);
        }
        _ => {}
    }
    Parsed::Ip(ip)
}

const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

fn is_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        EXT_HOP_BY_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_AUTH | EXT_DEST_OPTS
    )
}

/// Length of an extension header from its own length field (RFC 8200 4.3-4.5,
/// RFC 4302 2.2), or `None` if even that field is missing.
fn extension_len(kind: u8, rest: &[u8]) -> Option<usize> {
    if kind == EXT_FRAGMENT {
        return Some(8);
    }
    let len_field = usize::from(*rest.get(1)?);
    Some(if kind == EXT_AUTH {
        (len_field + 2) * 4
    } else {
        (len_field + 1) * 8
    })
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    let bytes = frame.get(at..at + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}
