//! Services: how they are written and refused, which comes first, the
//! rule sets refused as ambiguous, and the kernel tables they become.

use std::{net::IpAddr, path::Path};

use ipnet::IpNet;

use super::{
    Config, ConfigError, Flow, PortField, ProtocolField, Service, ServiceTable, precedence_order,
};

fn service(protocol: Option<&str>, ports: &[&str], dests: &[&str]) -> Service {
    let protocol = protocol.map(|p| ProtocolField::Name(p.into()));
    let ports: Vec<PortField> = ports.iter().map(|p| PortField::Text((*p).into())).collect();
    let dests: Vec<String> = dests.iter().map(|d| (*d).into()).collect();
    Service::from_fields(
        protocol.as_ref(),
        (!ports.is_empty()).then_some(ports.as_slice()),
        (!dests.is_empty()).then_some(dests.as_slice()),
    )
    .unwrap_or_else(|(field, problem)| panic!("{field}: {problem}"))
}

fn refused(protocol: Option<ProtocolField>, ports: Option<Vec<PortField>>) -> (String, String) {
    match Service::from_fields(protocol.as_ref(), ports.as_deref(), None) {
        Ok(s) => panic!("accepted: {s}"),
        Err((field, problem)) => (field.to_owned(), problem.to_string()),
    }
}

#[test]
fn protocols_are_names_or_numbers_below_255() {
    for (given, number) in [
        ("tcp", 6),
        ("UDP", 17),
        ("sctp", 132),
        ("icmp", 1),
        ("icmpv6", 58),
        ("47", 47),
    ] {
        assert_eq!(
            service(Some(given), &[], &[]).protocol,
            Some(number),
            "{given}"
        );
    }
    for bad in [
        ProtocolField::Name("ftp".into()),
        ProtocolField::Number(255),
        ProtocolField::Number(300),
    ] {
        let (field, text) = refused(Some(bad), None);
        assert_eq!(field, "protocol");
        assert!(
            text.contains("write tcp, udp, sctp, icmp, icmpv6 or a number 0-254"),
            "{text}"
        );
    }
}

#[test]
fn ports_need_a_protocol_with_ports_and_say_how_to_write_them() {
    let (field, text) = refused(None, Some(vec![PortField::Number(22)]));
    assert_eq!(field, "ports");
    assert!(text.contains("add protocol = \"tcp\""), "{text}");
    let icmp = Some(ProtocolField::Name("icmp".into()));
    let (_, text) = refused(icmp, Some(vec![PortField::Number(8)]));
    assert!(text.contains("icmp packets have no ports"), "{text}");
    let tcp = || Some(ProtocolField::Name("tcp".into()));
    for bad in [
        PortField::Number(70_000),
        PortField::Text("90-80".into()),
        PortField::Text("ssh".into()),
    ] {
        let (field, text) = refused(tcp(), Some(vec![bad]));
        assert_eq!(field, "ports");
        assert!(text.contains("write e.g. 22 or \"8000-8080\""), "{text}");
    }
    let (_, text) = refused(tcp(), Some(vec![]));
    assert!(text.contains("leave `ports` out"), "{text}");
}

#[test]
fn one_set_of_packets_has_one_form() {
    let a = service(
        Some("tcp"),
        &["80", "81-90", "22"],
        &["198.19.0.0/25", "198.19.0.128/25"],
    );
    let b = service(Some("6"), &["22", "80-90"], &["198.19.0.0/24"]);
    assert_eq!(a, b);
    assert_eq!(a.to_string(), "tcp port 22, 80-90 to 198.19.0.0/24");
}

#[test]
fn narrower_services_come_first_and_every_packet_last() {
    let every = Service::ANY;
    let tcp = service(Some("tcp"), &[], &[]);
    let ssh = service(Some("tcp"), &["22"], &[]);
    let ssh_here = service(Some("tcp"), &["22"], &["198.19.0.0/24"]);
    let order = precedence_order([
        every.clone(),
        tcp.clone(),
        Service::penalty(),
        ssh.clone(),
        ssh_here.clone(),
    ]);
    assert_eq!(order, [Service::penalty(), ssh_here, ssh, tcp, every]);
}

#[test]
fn a_service_holds_the_packets_it_names() {
    let web = service(Some("tcp"), &["443"], &["198.19.0.0/24"]);
    let flow = |port: Option<u16>, dst: &str| Flow {
        protocol: Some(6),
        port,
        destination: Some(dst.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"))),
    };
    assert!(web.matches(&flow(Some(443), "198.19.0.9")));
    assert!(!web.matches(&flow(Some(80), "198.19.0.9")));
    assert!(!web.matches(&flow(Some(443), "198.18.0.9")));
    // A non-first fragment shows no port: no service with ports holds it.
    assert!(!web.matches(&flow(None, "198.19.0.9")));
    assert!(service(Some("tcp"), &[], &[]).matches(&flow(None, "198.19.0.9")));
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

const SSH_AND_API: &str = r#"
[[rule]]
name = "ssh"
protocol = "tcp"
ports = [22]
action = "drop"
new_connections = "3/min"

[[rule]]
name = "api"
destinations = ["198.19.0.0/24"]
action = "drop"
packets = "200/s"
"#;

#[test]
fn two_services_that_share_packets_and_sources_are_refused_with_an_example() {
    let err = parse(SSH_AND_API)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains(
            "rule \"api\" and rule \"ssh\" both match a tcp packet from 0.0.0.0 to 198.19.0.0 \
             port 22, and neither's protocol, ports and destinations hold the other's"
        ),
        "{err}"
    );
    // The error points at the later rule.
    assert!(err.starts_with("test.toml:10:"), "{err}");
}

#[test]
fn services_that_share_packets_but_no_source_are_fine() {
    let apart = SSH_AND_API.replace(
        "name = \"api\"\n",
        "name = \"api\"\nprefixes = [\"2001:db8::/32\"]\n",
    );
    // api's destinations are IPv4 and its sources IPv6: no packet is both.
    assert!(
        parse(&apart).is_ok(),
        "{:?}",
        parse(&apart).err().map(|e| e.to_string())
    );
    let disjoint = SSH_AND_API
        .replace(
            "name = \"ssh\"\n",
            "name = \"ssh\"\nprefixes = [\"198.18.0.0/24\"]\n",
        )
        .replace(
            "name = \"api\"\n",
            "name = \"api\"\nprefixes = [\"198.18.1.0/24\"]\n",
        );
    assert!(parse(&disjoint).is_ok());
    let overlapping = disjoint.replace("198.18.1.0/24", "198.18.0.128/25");
    let err = parse(&overlapping)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("from 198.18.0.128 to 198.19.0.0 port 22"),
        "{err}"
    );
}

#[test]
fn one_prefix_may_be_in_one_rule_per_service() {
    let two = r#"
[[rule]]
name = "dns"
prefixes = ["198.18.0.0/15"]
protocol = "udp"
ports = [53]
action = "drop"
packets = "50/s"

[[rule]]
name = "rest"
prefixes = ["198.18.0.0/15"]
action = "monitor"
packets = "1k/s"
"#;
    assert!(parse(two).is_ok());
    let same = two.replace(
        "name = \"rest\"\n",
        "name = \"rest\"\nprotocol = \"udp\"\nports = [\"53\"]\n",
    );
    let err = parse(&same)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("198.18.0.0/15 is already in rule \"dns\""),
        "{err}"
    );
}

/// A deterministic xorshift: many cases without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// The kernel's port lookup over a table: the longest entry holding the
/// packet (a port-less packet matches entries of its protocol alone).
fn kernel_ports(table: &ServiceTable, protocol: u8, port: Option<u16>) -> u64 {
    table
        .ports
        .iter()
        .filter(|(b, _)| match b.protocol {
            None => true,
            Some(p) if p != protocol => false,
            Some(_) if b.port_bits == 0 => true,
            Some(_) => port.is_some_and(|port| {
                let shift = 16 - u32::from(b.port_bits);
                u32::from(port) >> shift == u32::from(b.first_port) >> shift
            }),
        })
        .max_by_key(|(b, _)| (b.protocol.is_some(), b.port_bits))
        .map_or(0, |(_, services)| *services)
}

fn kernel_destinations(table: &ServiceTable, dst: IpAddr) -> u64 {
    table
        .destinations
        .iter()
        .filter(|(net, _)| net.contains(&dst))
        .max_by_key(|(net, _)| net.prefix_len())
        .map_or(0, |(_, services)| *services)
}

#[test]
fn the_kernel_tables_give_every_packet_exactly_the_services_holding_it() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..40 {
        let mut services = vec![Service::ANY];
        for _ in 0..rng.next(6) + 1 {
            let protocol = ["tcp", "udp", "icmp"][rng.next(3) as usize];
            let mut ports = Vec::new();
            if protocol != "icmp" && rng.next(3) > 0 {
                for _ in 0..rng.next(3) + 1 {
                    let first = rng.next(200) as u16;
                    ports.push(format!("{first}-{}", first + rng.next(40) as u16));
                }
            }
            let mut dests = Vec::new();
            if rng.next(2) == 0 {
                let len = 24 + rng.next(9) as u8;
                let net = IpNet::new(IpAddr::from([198, 19, 0, rng.next(4) as u8 * 64]), len)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .trunc();
                dests.push(net.to_string());
            }
            let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
            let dests: Vec<&str> = dests.iter().map(String::as_str).collect();
            services.push(service(Some(protocol), &ports, &dests));
        }
        let table = ServiceTable::build(precedence_order(services));
        for _ in 0..400 {
            let protocol = [6, 17, 1, 47][rng.next(4) as usize];
            let port =
                (protocol != 1 && protocol != 47 && rng.next(8) > 0).then(|| rng.next(260) as u16);
            let dst = IpAddr::from([198, 19, 0, rng.next(256) as u8]);
            let flow = Flow {
                protocol: Some(protocol),
                port,
                destination: Some(dst),
            };
            let expected = table
                .order
                .iter()
                .enumerate()
                .filter(|(_, s)| s.matches(&flow))
                .fold(0u64, |m, (i, _)| m | 1 << i);
            let mut got = kernel_ports(&table, protocol, port);
            if table.by_destination {
                got &= kernel_destinations(&table, dst);
            }
            assert_eq!(got, expected, "case {case}: {flow:?} in {:?}", table.order);
        }
    }
}

#[test]
fn more_services_than_the_kernel_tells_apart_are_refused_at_the_first_beyond() {
    let mut text = String::new();
    for port in 1..=65 {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{port}\"\nprotocol = \"tcp\"\nports = [{port}]\naction = \"deny\"\n\n"
        ));
    }
    let err = parse(&text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("65 distinct services"), "{err}");
    assert!(err.contains("at most 64 apart"), "{err}");
    // The 65th rule, by the line of its name.
    assert!(err.starts_with("test.toml:386:"), "{err}");
}
