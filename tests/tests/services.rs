//! Which rule a packet gets, through the real programs (BPF_PROG_TEST_RUN):
//! rules installed from config text as the agent installs them, frames of
//! every protocol, port, destination and fragment case, and the rule each
//! one was counted under.

use std::net::{Ipv4Addr, Ipv6Addr};

use limiter_common::{Reason, verdict};
use limiter_tests::{
    frame::{Ext, Frame, L3, L4, TCP_SYN, ipv4_checksum},
    harness::{Harness, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS},
};

const L3_AT: usize = 14;

fn v4(text: &str) -> Ipv4Addr {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn v6(text: &str) -> Ipv6Addr {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A frame from `src` to `dst`, its destination port (if L4 has one) set
/// to `port`.
fn frame4(src: &str, l4: L4, dst: &str, port: u16) -> Vec<u8> {
    let mut f = Frame::v4(v4(src), l4).build();
    f[L3_AT + 16..L3_AT + 20].copy_from_slice(&v4(dst).octets());
    f[L3_AT + 10..L3_AT + 12].fill(0);
    let sum = ipv4_checksum(&f[L3_AT..L3_AT + 20]);
    f[L3_AT + 10..L3_AT + 12].copy_from_slice(&sum.to_be_bytes());
    let l4_at = L3_AT + 20;
    f[l4_at + 2..l4_at + 4].copy_from_slice(&port.to_be_bytes());
    f
}

fn tcp4(src: &str, dst: &str, port: u16) -> Vec<u8> {
    frame4(src, L4::Tcp { flags: TCP_SYN }, dst, port)
}

fn udp4(src: &str, dst: &str, port: u16) -> Vec<u8> {
    frame4(src, L4::Udp, dst, port)
}

fn tcp6(src: &str, dst: &str, port: u16) -> Vec<u8> {
    let mut f = Frame::v6(v6(src), L4::Tcp { flags: TCP_SYN }).build();
    f[L3_AT + 24..L3_AT + 40].copy_from_slice(&v6(dst).octets());
    let l4_at = L3_AT + 40;
    f[l4_at + 2..l4_at + 4].copy_from_slice(&port.to_be_bytes());
    f
}

/// Packets counted for each rule (any verdict), by name.
fn counted(h: &Harness, ids: &std::collections::HashMap<String, u32>, name: &str) -> u64 {
    h.packets(ids[name]).iter().sum()
}

/// Runs `frame` and says which rule counted it (`None`: no rule).
fn rule_of(
    h: &mut Harness,
    ids: &std::collections::HashMap<String, u32>,
    frame: &[u8],
) -> Option<String> {
    let before: Vec<(String, u64)> = ids
        .keys()
        .map(|n| (n.clone(), counted(h, ids, n)))
        .collect();
    let (action, _) = h.xdp(frame);
    assert!(action == XDP_PASS || action == XDP_DROP, "action {action}");
    let mut grew = before
        .into_iter()
        .filter(|(n, was)| counted(h, ids, n) > *was)
        .map(|(n, _)| n);
    let rule = grew.next();
    assert_eq!(grew.next(), None, "one packet counted for two rules");
    rule
}

const SERVICES: &str = r#"
[[rule]]
name = "ssh"
protocol = "tcp"
ports = [22]
action = "drop"
new_connections = "3/min"

[[rule]]
name = "ssh-partners"
prefixes = ["198.18.7.0/24"]
protocol = "tcp"
ports = [22]
action = "allow"

[[rule]]
name = "api"
protocol = "tcp"
ports = [443, "8000-8080"]
destinations = ["198.19.0.0/24", "2001:db8:ffff::/48"]
action = "drop"
packets = "200/s"

[[rule]]
name = "any-tcp"
protocol = "tcp"
prefixes = ["198.18.0.0/15", "2001:db8::/32"]
action = "monitor"
packets = "1k/s"

[[rule]]
name = "dns"
protocol = "udp"
ports = [53]
action = "drop"
packets = "50/s"

[[rule]]
name = "icmp"
protocol = "icmp"
action = "drop"
packets = "10/s"

[[rule]]
name = "default"
prefixes = ["198.18.0.0/15", "2001:db8::/32"]
action = "monitor"
packets = "10k/s"
"#;

#[test]
fn each_packet_gets_the_rule_of_its_most_specific_service() {
    let mut h = Harness::new();
    let ids = h.rule_set(SERVICES);
    let cases: [(&str, Vec<u8>, Option<&str>); 12] = [
        // A service rule beats a rule without one.
        ("tcp/22", tcp4("198.18.0.5", "198.19.9.9", 22), Some("ssh")),
        // Same service: the longest source prefix.
        (
            "tcp/22 partner",
            tcp4("198.18.7.5", "198.19.9.9", 22),
            Some("ssh-partners"),
        ),
        // tcp/443 to the API's addresses: ports and destinations.
        (
            "api 443",
            tcp4("198.18.0.5", "198.19.0.7", 443),
            Some("api"),
        ),
        (
            "api range",
            tcp4("198.18.0.5", "198.19.0.7", 8080),
            Some("api"),
        ),
        (
            "api v6",
            tcp6("2001:db8::5", "2001:db8:ffff::1", 8000),
            Some("api"),
        ),
        // ... not elsewhere: the wider tcp service takes them.
        (
            "443 elsewhere",
            tcp4("198.18.0.5", "198.19.1.7", 443),
            Some("any-tcp"),
        ),
        (
            "api, port 8081",
            tcp4("198.18.0.5", "198.19.0.7", 8081),
            Some("any-tcp"),
        ),
        (
            "tcp/80",
            tcp4("198.18.0.5", "198.19.0.7", 80),
            Some("any-tcp"),
        ),
        ("udp/53", udp4("198.18.0.5", "198.19.0.7", 53), Some("dns")),
        (
            "udp/54",
            udp4("198.18.0.5", "198.19.0.7", 54),
            Some("default"),
        ),
        // The tcp service holds only its prefixes; ssh holds every source.
        (
            "tcp/80 outsider",
            tcp4("203.0.113.5", "198.19.0.7", 80),
            None,
        ),
        (
            "tcp/22 outsider",
            tcp4("203.0.113.5", "198.19.0.7", 22),
            Some("ssh"),
        ),
    ];
    for (what, frame, want) in cases {
        assert_eq!(rule_of(&mut h, &ids, &frame).as_deref(), want, "{what}");
    }
    let icmp = Frame::v4(v4("198.18.0.5"), L4::Other { proto: 1, len: 8 }).build();
    assert_eq!(rule_of(&mut h, &ids, &icmp).as_deref(), Some("icmp"));
    let gre = Frame::v4(v4("198.18.0.5"), L4::Other { proto: 47, len: 8 }).build();
    assert_eq!(rule_of(&mut h, &ids, &gre).as_deref(), Some("default"));
}

#[test]
fn a_service_rule_enforces_its_own_budget() {
    let mut h = Harness::new();
    let ids = h.rule_set(SERVICES);
    let ssh = tcp4("198.18.0.5", "198.19.9.9", 22);
    // 3 new connections a minute, then drop; other ports stay open.
    assert_eq!(h.xdp_many(&ssh, 5), (3, 2));
    assert_eq!(h.packets(ids["ssh"])[verdict::DROPPED], 2);
    let web = tcp4("198.18.0.5", "198.19.9.9", 80);
    assert_eq!(h.xdp_many(&web, 5), (5, 0));
}

#[test]
fn non_first_fragments_have_no_port_and_get_a_rule_that_names_none() {
    let mut h = Harness::new();
    let ids = h.rule_set(SERVICES);
    let mut fragment = Frame::v4(v4("198.18.0.5"), L4::Tcp { flags: 0 });
    if let L3::V4 {
        fragment_offset, ..
    } = &mut fragment.l3
    {
        *fragment_offset = 100;
    }
    // Its bytes at the port's place are payload: whatever they say, the
    // fragment is in no service with ports.
    let mut bytes = fragment.build();
    bytes[L3_AT + 22..L3_AT + 24].copy_from_slice(&22u16.to_be_bytes());
    assert_eq!(rule_of(&mut h, &ids, &bytes).as_deref(), Some("any-tcp"));
    let mut fragment6 = Frame::v6(v6("2001:db8::5"), L4::Tcp { flags: 0 });
    if let L3::V6 { ext, .. } = &mut fragment6.l3 {
        ext.push(Ext::Fragment { offset: 100 });
    }
    assert_eq!(
        rule_of(&mut h, &ids, &fragment6.build()).as_deref(),
        Some("any-tcp")
    );
    // The first fragment has the ports: it gets the port's rule.
    let mut first = Frame::v4(v4("198.18.0.5"), L4::Tcp { flags: TCP_SYN });
    if let L3::V4 { more_fragments, .. } = &mut first.l3 {
        *more_fragments = true;
    }
    let mut bytes = first.build();
    bytes[L3_AT + 22..L3_AT + 24].copy_from_slice(&22u16.to_be_bytes());
    assert_eq!(rule_of(&mut h, &ids, &bytes).as_deref(), Some("ssh"));
}

#[test]
fn a_packet_no_service_holds_passes_as_no_rule() {
    let mut h = Harness::new();
    h.rule_set(
        r#"
[[rule]]
name = "ssh"
protocol = "tcp"
ports = [22]
action = "deny"
"#,
    );
    let before = h.reason(Reason::NoRule);
    assert_eq!(h.xdp(&udp4("198.18.0.5", "198.19.0.1", 22)).0, XDP_PASS);
    assert_eq!(h.xdp(&tcp4("198.18.0.5", "198.19.0.1", 23)).0, XDP_PASS);
    assert_eq!(h.reason(Reason::NoRule), before + 2);
    assert_eq!(h.xdp(&tcp4("198.18.0.5", "198.19.0.1", 22)).0, XDP_DROP);
    // The TC program classifies alike.
    assert_eq!(
        h.tc(&tcp4("198.18.0.5", "198.19.0.1", 22)).action,
        TC_ACT_SHOT
    );
    assert_eq!(
        h.tc(&tcp4("198.18.0.5", "198.19.0.1", 23)).action,
        TC_ACT_OK
    );
}

#[test]
fn destinations_alone_make_a_service() {
    let mut h = Harness::new();
    let ids = h.rule_set(
        r#"
[[rule]]
name = "partner-link"
destinations = ["198.19.0.0/24"]
action = "deny"

[[rule]]
name = "rest"
action = "allow"
"#,
    );
    assert_eq!(
        rule_of(&mut h, &ids, &udp4("198.18.0.5", "198.19.0.3", 9)).as_deref(),
        Some("partner-link")
    );
    assert_eq!(
        rule_of(&mut h, &ids, &udp4("198.18.0.5", "198.19.1.3", 9)).as_deref(),
        Some("rest")
    );
    // IPv6 packets are in no IPv4 destination: `rest` for every source.
    assert_eq!(
        rule_of(&mut h, &ids, &tcp6("2001:db8::5", "2001:db8:ffff::1", 1)).as_deref(),
        Some("rest")
    );
}
