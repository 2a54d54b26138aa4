//! Generated frames: valid ones across every header combination the parser
//! knows, then padded, lied about, bit-flipped or cut.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use limiter_tests::frame::{ETH_P_8021AD, ETH_P_8021Q, Ext, Frame, L3, L4};
use proptest::{prelude::*, sample::Index};

/// One frame of a case, and which program it goes through.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub body: Body,
    pub trailer: Trailer,
    pub mutation: Mutation,
    /// Through the TC program (else XDP).
    pub via_tc: bool,
    /// Wait [`PAUSE`] before sending: budgets refill, a bucket reports again.
    pub pause_before: bool,
}

/// Longer than the one-event-per-bucket-per-second interval.
pub const PAUSE: std::time::Duration = std::time::Duration::from_millis(1_050);

#[derive(Clone, Debug)]
pub enum Body {
    /// An IP frame; `source` picks from the table's sources of `l3`'s family.
    Ip {
        vlans: Vec<u16>,
        source: Index,
        l3: L3Spec,
        l4: L4,
        payload: usize,
        /// Sent outside the destinations rules name (else inside them).
        elsewhere: bool,
        /// TCP's and UDP's destination port; `None`: 80 and 9.
        dst_port: Option<u16>,
    },
    NonIp {
        vlans: Vec<u16>,
        ethertype: u16,
        len: usize,
    },
}

#[derive(Clone, Debug)]
pub enum L3Spec {
    V4 {
        tos: u8,
        options: usize,
        fragment_offset: u16,
        more_fragments: bool,
    },
    V6 {
        traffic_class: u8,
        hop_limit: u8,
        ext: Vec<Ext>,
    },
}

/// Bytes after the IP packet.
#[derive(Clone, Debug)]
pub enum Trailer {
    None,
    /// Zeros up to the 60-byte Ethernet minimum, as a NIC pads.
    EthernetPadding,
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug)]
pub enum Mutation {
    None,
    /// Cut to a length between 14 and the frame's length.
    Truncate(Index),
    /// XOR bytes: (position, value, within the first 96 bytes only).
    Flip(Vec<(Index, u8, bool)>),
    /// A header field set to a wrong value.
    Lie(Field, Lie),
}

#[derive(Clone, Copy, Debug)]
pub enum Field {
    Ipv4TotalLength,
    Ipv4Ihl,
    IpVersion,
    Ipv6PayloadLength,
    /// The length byte of one extension header.
    ExtLength(Index),
}

#[derive(Clone, Copy, Debug)]
pub enum Lie {
    Value(u16),
    /// The true value plus this.
    Off(i8),
}

impl FrameSpec {
    pub fn render(&self, sources: &[IpAddr]) -> Vec<u8> {
        let mut bytes = match &self.body {
            Body::Ip { .. } => self.ip_frame(sources).build(),
            Body::NonIp {
                vlans,
                ethertype,
                len,
            } => {
                let mut out = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
                for tpid in vlans {
                    out.extend_from_slice(&tpid.to_be_bytes());
                    out.extend_from_slice(&100u16.to_be_bytes());
                }
                out.extend_from_slice(&ethertype.to_be_bytes());
                out.extend((0..*len).map(|i| i as u8));
                out
            }
        };
        match &self.trailer {
            Trailer::None => {}
            Trailer::EthernetPadding => bytes.resize(bytes.len().max(60), 0),
            Trailer::Bytes(extra) => bytes.extend_from_slice(extra),
        }
        match &self.mutation {
            Mutation::None => {}
            Mutation::Truncate(at) => {
                if bytes.len() > 14 {
                    bytes.truncate(14 + at.index(bytes.len() - 14));
                }
            }
            Mutation::Flip(flips) => {
                for (at, value, near_start) in flips {
                    let span = if *near_start {
                        bytes.len().min(96)
                    } else {
                        bytes.len()
                    };
                    bytes[at.index(span)] ^= value;
                }
            }
            Mutation::Lie(field, lie) => self.lie(&mut bytes, *field, *lie),
        }
        bytes
    }

    fn ip_frame(&self, sources: &[IpAddr]) -> Frame {
        let Body::Ip {
            vlans,
            source,
            l3,
            l4,
            payload,
            elsewhere,
            dst_port,
        } = &self.body
        else {
            unreachable!("only IP bodies make a Frame")
        };
        let pick = |v4: bool| {
            let of_family: Vec<_> = sources.iter().filter(|s| s.is_ipv4() == v4).collect();
            **source.get(&of_family)
        };
        let l3 = match l3 {
            L3Spec::V4 {
                tos,
                options,
                fragment_offset,
                more_fragments,
            } => L3::V4 {
                src: match pick(true) {
                    IpAddr::V4(a) => a,
                    IpAddr::V6(_) => unreachable!("filtered on family"),
                },
                tos: *tos,
                options: *options,
                fragment_offset: *fragment_offset,
                more_fragments: *more_fragments,
            },
            L3Spec::V6 {
                traffic_class,
                hop_limit,
                ext,
            } => L3::V6 {
                src: match pick(false) {
                    IpAddr::V6(a) => a,
                    IpAddr::V4(_) => unreachable!("filtered on family"),
                },
                traffic_class: *traffic_class,
                hop_limit: *hop_limit,
                ext: ext.clone(),
            },
        };
        let dst = elsewhere.then(|| match l3 {
            L3::V4 { .. } => IpAddr::V4(Ipv4Addr::new(198, 19, 1, 1)),
            L3::V6 { .. } => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xfffe, 0, 0, 0, 0, 1)),
        });
        Frame {
            vlan_tpids: vlans.clone(),
            l3,
            l4: l4.clone(),
            payload: *payload,
            dst,
            dst_port: *dst_port,
        }
    }

    /// Writes a wrong value into a header field, if the frame has it.
    fn lie(&self, bytes: &mut [u8], field: Field, lie: Lie) {
        let Body::Ip { vlans, l3, .. } = &self.body else {
            return;
        };
        let l3_at = 14 + 4 * vlans.len();
        let (at, wide) = match (field, l3) {
            (Field::Ipv4TotalLength, L3Spec::V4 { .. }) => (l3_at + 2, true),
            (Field::Ipv4Ihl, L3Spec::V4 { .. }) => (l3_at, false),
            (Field::IpVersion, _) => (l3_at, false),
            (Field::Ipv6PayloadLength, L3Spec::V6 { .. }) => (l3_at + 4, true),
            (Field::ExtLength(which), L3Spec::V6 { ext, .. }) if !ext.is_empty() => {
                let k = which.index(ext.len());
                let before: usize = ext[..k].iter().map(Ext::byte_len).sum();
                (l3_at + 40 + before + 1, false)
            }
            _ => return,
        };
        if at + usize::from(wide) >= bytes.len() {
            return;
        }
        let old = if wide {
            u16::from_be_bytes([bytes[at], bytes[at + 1]])
        } else {
            u16::from(bytes[at])
        };
        let new = match lie {
            Lie::Value(v) => v,
            Lie::Off(d) => old.wrapping_add_signed(i16::from(d)),
        };
        match field {
            _ if wide => bytes[at..at + 2].copy_from_slice(&new.to_be_bytes()),
            // IHL: low nibble; version: high nibble.
            Field::Ipv4Ihl => bytes[at] = (bytes[at] & 0xf0) | (new as u8 & 0x0f),
            Field::IpVersion => bytes[at] = (bytes[at] & 0x0f) | ((new as u8 & 0x0f) << 4),
            _ => bytes[at] = new as u8,
        }
    }
}

/// Hex dump, 16 bytes a line.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "\n    {:04x}:", i * 16);
        for b in line {
            let _ = write!(out, " {b:02x}");
        }
    }
    out
}

pub fn frame() -> impl Strategy<Value = FrameSpec> {
    (
        body(),
        trailer(),
        mutation(),
        prop::bool::weighted(0.25),
        // About one pause in 20,000 frames: 5 s of a 100,000-frame run.
        prop::bool::weighted(0.000_05),
    )
        .prop_map(
            |(body, trailer, mutation, via_tc, pause_before)| FrameSpec {
                body,
                trailer,
                mutation,
                via_tc,
                pause_before,
            },
        )
}

fn body() -> impl Strategy<Value = Body> {
    // Ports in and out of the rule services' (tests/differential/rules.rs).
    let dst_port = prop_oneof![
        3 => Just(None),
        1 => prop_oneof![
            Just(22u16), Just(53), Just(80), Just(85), Just(90), Just(91), Just(443),
            Just(5000), Just(5010), Just(5011), any::<u16>(),
        ]
        .prop_map(Some),
    ];
    let ip = (
        vlans(),
        any::<Index>(),
        l3_and_l4(),
        payload(),
        prop::bool::weighted(0.3),
        dst_port,
    )
        .prop_map(
            |(vlans, source, (l3, l4), payload, elsewhere, dst_port)| Body::Ip {
                vlans,
                source,
                l3,
                l4,
                payload,
                elsewhere,
                dst_port,
            },
        );
    let ethertype = prop_oneof![
        Just(0x0806u16), // ARP
        Just(0x88cc),    // LLDP
        Just(0x8847),    // MPLS
        Just(0x88e5),    // MACsec
        any::<u16>(),
    ];
    let non_ip = (vlans(), ethertype, 0usize..64).prop_map(|(vlans, ethertype, len)| Body::NonIp {
        vlans,
        ethertype,
        len,
    });
    prop_oneof![9 => ip, 1 => non_ip]
}

/// 0, 1, 2 or 3 tags, 802.1Q or 802.1ad in any order.
fn vlans() -> impl Strategy<Value = Vec<u16>> {
    let tpid = prop_oneof![Just(ETH_P_8021Q), Just(ETH_P_8021AD)];
    prop_oneof![
        4 => Just(Vec::new()),
        2 => prop::collection::vec(tpid.clone(), 1),
        2 => prop::collection::vec(tpid.clone(), 2),
        1 => prop::collection::vec(tpid, 3),
    ]
}

fn payload() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..64, 1 => 64usize..1200]
}

fn l3_and_l4() -> impl Strategy<Value = (L3Spec, L4)> {
    let fragment = prop_oneof![
        6 => Just((0u16, false)),
        1 => Just((0u16, true)),                   // first
        1 => Just((1u16, true)),                   // at 8 bytes: RFC 1858
        1 => (1u16..0x1fff).prop_map(|o| (o, true)),  // middle
        1 => (1u16..0x1fff).prop_map(|o| (o, false)), // last
    ];
    let v4 =
        (any::<u8>(), 0usize..=10, fragment).prop_map(|(tos, words, (offset, more))| L3Spec::V4 {
            tos,
            options: words * 4,
            fragment_offset: offset,
            more_fragments: more,
        });
    let hop_limit = prop_oneof![Just(255u8), Just(64), Just(1), any::<u8>()];
    let v6 = (
        any::<u8>(),
        hop_limit,
        prop::collection::vec(extension(), 0..=8),
    )
        .prop_map(|(traffic_class, hop_limit, ext)| L3Spec::V6 {
            traffic_class,
            hop_limit,
            ext,
        });
    prop_oneof![(v4, l4(false)), (v6, l4(true))]
}

fn extension() -> impl Strategy<Value = Ext> {
    // Offset 1 (8 bytes) is the tiny-fragment attack of RFC 1858.
    let fragment_offset = prop_oneof![3 => Just(0u16), 1 => Just(1u16), 1 => 2u16..0x1fff];
    prop_oneof![
        (prop_oneof![Just(0u8), Just(43), Just(60), Just(51)], 0u8..6)
            .prop_map(|(code, len_field)| Ext::Sized { code, len_field }),
        (fragment_offset, any::<bool>())
            .prop_map(|(offset, more)| Ext::FragmentWithFlags { offset, more }),
    ]
}

fn l4(v6: bool) -> impl Strategy<Value = L4> {
    let flags = prop_oneof![
        Just(0x02u8), // SYN
        Just(0x12),   // SYN-ACK
        Just(0x10),   // ACK
        any::<u8>(),
    ];
    let icmpv6 = if v6 {
        prop_oneof![133u8..=137, any::<u8>()].boxed()
    } else {
        any::<u8>().boxed()
    };
    let other = prop_oneof![
        Just(1u8), // ICMP
        Just(17),  // UDP header as "other"
        Just(47),  // GRE
        Just(50),  // ESP
        Just(58),  // ICMPv6
        Just(59),  // no next header
        Just(132), // SCTP
        any::<u8>(),
    ];
    prop_oneof![
        4 => flags.clone().prop_map(|flags| L4::Tcp { flags }),
        // Data offsets below 5 (malformed) and above (options the frame lacks).
        1 => (flags, 0u8..16).prop_map(|(flags, data_offset)| L4::TcpDataOffset { flags, data_offset }),
        1 => (0usize..20).prop_map(|len| L4::TruncatedTcp { len }),
        3 => Just(L4::Udp),
        2 => icmpv6.prop_map(|kind| L4::Icmpv6 { kind }),
        2 => (other, 0usize..24).prop_map(|(proto, len)| L4::Other { proto, len }),
    ]
}

fn trailer() -> impl Strategy<Value = Trailer> {
    prop_oneof![
        6 => Just(Trailer::None),
        3 => Just(Trailer::EthernetPadding),
        1 => prop::collection::vec(any::<u8>(), 1..32).prop_map(Trailer::Bytes),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let field = prop_oneof![
        Just(Field::Ipv4TotalLength),
        Just(Field::Ipv4Ihl),
        Just(Field::IpVersion),
        Just(Field::Ipv6PayloadLength),
        any::<Index>().prop_map(Field::ExtLength),
    ];
    let lie = prop_oneof![
        // Payload length 0: a jumbogram's, or a lie (with or without a
        // hop-by-hop header in the chain).
        Just(Lie::Value(0)),
        any::<u16>().prop_map(Lie::Value),
        (-8i8..=8).prop_map(Lie::Off),
    ];
    prop_oneof![
        11 => Just(Mutation::None),
        3 => any::<Index>().prop_map(Mutation::Truncate),
        3 => prop::collection::vec((any::<Index>(), 1u8..=255, any::<bool>()), 1..4)
            .prop_map(Mutation::Flip),
        3 => (field, lie).prop_map(|(f, l)| Mutation::Lie(f, l)),
    ]
}
