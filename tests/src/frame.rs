//! Builds Ethernet frames for packet-level tests: VLAN tags, IPv4 with
//! options and fragments, IPv6 with extension headers, TCP/UDP/ICMPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Layer 4 of a frame.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    /// A 20-byte TCP header whose data offset field says `data_offset`
    /// 32-bit words (5 is the truth; below 5 is malformed).
    TcpDataOffset {
        flags: u8,
        data_offset: u8,
    },
    /// A TCP header cut to `len` bytes (the IP length says so too).
    TruncatedTcp {
        len: usize,
    },
    Udp,
    Icmpv6 {
        kind: u8,
    },
    /// Any other protocol number, with a `len`-byte header of 0x5a bytes.
    Other {
        proto: u8,
        len: usize,
    },
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } | L4::TcpDataOffset { .. } | L4::TruncatedTcp { .. } => 6,
            L4::Udp => 17,
            L4::Icmpv6 { .. } => 58,
            L4::Other { proto, .. } => *proto,
        }
    }

    /// The L4 bytes; `dst_port` replaces TCP's 80 and UDP's 9.
    fn bytes(&self, payload: usize, dst_port: Option<u16>) -> Vec<u8> {
        let mut out = match self {
            L4::Tcp { flags } => tcp_header(*flags, 5, dst_port),
            L4::TcpDataOffset { flags, data_offset } => tcp_header(*flags, *data_offset, dst_port),
            L4::TruncatedTcp { len } => return vec![0u8; *len],
            L4::Udp => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&40000u16.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.unwrap_or(9).to_be_bytes());
                h[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
                h
            }
            L4::Icmpv6 { kind } => vec![*kind, 0, 0, 0, 0, 0, 0, 0],
            L4::Other { len, .. } => vec![0x5a; *len],
        };
        out.extend(std::iter::repeat_n(0xab, payload));
        out
    }
}

fn tcp_header(flags: u8, data_offset: u8, dst_port: Option<u16>) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&40000u16.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.unwrap_or(80).to_be_bytes());
    h[12] = (data_offset & 0x0f) << 4;
    h[13] = flags;
    h
}

/// An IPv6 extension header: (next-header code of this header, length in
/// bytes, fragment offset for fragment headers).
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts {
        len_units: u8,
    },
    Fragment {
        offset: u16,
    },
    Auth,
    /// Hop-by-hop (0), routing (43), destination options (60) or
    /// authentication (51) with its length field set to `len_field`:
    /// (len + 1) * 8 bytes, or (len + 2) * 4 for authentication.
    Sized {
        code: u8,
        len_field: u8,
    },
    /// A fragment header with its more-fragments flag.
    FragmentWithFlags {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    fn code(&self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::DestOpts { .. } => 60,
            Ext::Fragment { .. } => 44,
            Ext::Auth => 51,
            Ext::Sized { code, .. } => *code,
            Ext::FragmentWithFlags { .. } => 44,
        }
    }

    /// Length in bytes of this header.
    pub fn byte_len(&self) -> usize {
        self.bytes(0).len()
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop | Ext::Routing => {
                let mut h = vec![0u8; 8];
                h[0] = next;
                h
            }
            Ext::DestOpts { len_units } => {
                let mut h = vec![0u8; (usize::from(*len_units) + 1) * 8];
                h[0] = next;
                h[1] = *len_units;
                h
            }
            Ext::Fragment { offset } => {
                let mut h = vec![0u8; 8];
                h[0] = next;
                h[2..4].copy_from_slice(&(offset << 3).to_be_bytes());
                h
            }
            Ext::Auth => {
                // (len + 2) * 4 = 16 bytes.
                let mut h = vec![0u8; 16];
                h[0] = next;
                h[1] = 2;
                h
            }
            Ext::Sized { code, len_field } => {
                let len = if *code == 51 {
                    (usize::from(*len_field) + 2) * 4
                } else {
                    (usize::from(*len_field) + 1) * 8
                };
                let mut h = vec![0u8; len];
                h[0] = next;
                h[1] = *len_field;
                h
            }
            Ext::FragmentWithFlags { offset, more } => {
                let mut h = vec![0u8; 8];
                h[0] = next;
                let flags = (offset << 3) | u16::from(*more);
                h[2..4].copy_from_slice(&flags.to_be_bytes());
                h
            }
        }
    }
}

/// A frame description; `build` renders it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub vlan_tpids: Vec<u16>,
    pub l3: L3,
    pub l4: L4,
    pub payload: usize,
    /// The destination address: [`DST_V4`] / [`DST_V6`] when `None` (of
    /// the source's family; one of the other family is ignored).
    pub dst: Option<IpAddr>,
    /// TCP's and UDP's destination port: 80 and 9 when `None`.
    pub dst_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub enum L3 {
    V4 {
        src: Ipv4Addr,
        tos: u8,
        options: usize,
        fragment_offset: u16,
        more_fragments: bool,
    },
    V6 {
        src: Ipv6Addr,
        traffic_class: u8,
        hop_limit: u8,
        ext: Vec<Ext>,
    },
}

pub const DST_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const DST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

impl Frame {
    pub fn v4(src: Ipv4Addr, l4: L4) -> Self {
        Self {
            vlan_tpids: Vec::new(),
            l3: L3::V4 {
                src,
                tos: 0,
                options: 0,
                fragment_offset: 0,
                more_fragments: false,
            },
            l4,
            payload: 18,
            dst: None,
            dst_port: None,
        }
    }

    pub fn v6(src: Ipv6Addr, l4: L4) -> Self {
        Self {
            vlan_tpids: Vec::new(),
            l3: L3::V6 {
                src,
                traffic_class: 0,
                hop_limit: 64,
                ext: Vec::new(),
            },
            l4,
            payload: 18,
            dst: None,
            dst_port: None,
        }
    }

    pub fn vlans(mut self, tpids: &[u16]) -> Self {
        self.vlan_tpids = tpids.to_vec();
        self
    }

    pub fn payload(mut self, bytes: usize) -> Self {
        self.payload = bytes;
        self
    }

    /// Sent to `dst` (of the source's family).
    pub fn to(mut self, dst: IpAddr) -> Self {
        self.dst = Some(dst);
        self
    }

    /// Sent to destination port `port` (TCP and UDP).
    pub fn port(mut self, port: u16) -> Self {
        self.dst_port = Some(port);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        for tpid in &self.vlan_tpids {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&100u16.to_be_bytes()); // TCI: VLAN 100
        }
        let l4 = self.l4.bytes(self.payload, self.dst_port);
        match &self.l3 {
            L3::V4 {
                src,
                tos,
                options,
                fragment_offset,
                more_fragments,
            } => {
                out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let dst = match self.dst {
                    Some(IpAddr::V4(dst)) => dst,
                    _ => DST_V4,
                };
                out.extend(ipv4_header(
                    *src,
                    dst,
                    *tos,
                    *options,
                    *fragment_offset,
                    *more_fragments,
                    self.l4.proto(),
                    l4.len(),
                ));
            }
            L3::V6 {
                src,
                traffic_class,
                hop_limit,
                ext,
            } => {
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let mut chain = Vec::new();
                for (i, e) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map_or(self.l4.proto(), Ext::code);
                    chain.extend(e.bytes(next));
                }
                let first = ext.first().map_or(self.l4.proto(), Ext::code);
                let dst = match self.dst {
                    Some(IpAddr::V6(dst)) => dst,
                    _ => DST_V6,
                };
                out.extend(ipv6_header(
                    *src,
                    dst,
                    *traffic_class,
                    *hop_limit,
                    first,
                    chain.len() + l4.len(),
                ));
                out.extend(chain);
            }
        }
        out.extend(l4);
        out
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one per header field a test sets"
)]
fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tos: u8,
    options: usize,
    fragment_offset: u16,
    more_fragments: bool,
    proto: u8,
    l4_len: usize,
) -> Vec<u8> {
    assert!(options.is_multiple_of(4) && options <= 40);
    let header_len = 20 + options;
    let mut h = vec![0u8; header_len];
    h[0] = 0x40 | (header_len / 4) as u8;
    h[1] = tos;
    h[2..4].copy_from_slice(&((header_len + l4_len) as u16).to_be_bytes());
    let flags = if more_fragments { 0x2000 } else { 0 };
    h[6..8].copy_from_slice(&(flags | fragment_offset).to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    // Options: NOPs then end-of-list.
    for b in &mut h[20..] {
        *b = 1;
    }
    if options > 0 {
        h[header_len - 1] = 0;
    }
    let sum = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

fn ipv6_header(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    tc: u8,
    hop_limit: u8,
    next: u8,
    payload: usize,
) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60 | (tc >> 4);
    h[1] = (tc << 4) | 0x0a; // flow label high nibble, kept by the rewrite
    h[2] = 0xbc;
    h[3] = 0xde;
    h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    h[6] = next;
    h[7] = hop_limit;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

/// The Internet checksum of an IPv4 header whose checksum field is zero; on
/// a header with its checksum filled in, a correct one gives 0.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in header.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request frame (non-IP).
pub fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&[0u8; 20]);
    out
}
