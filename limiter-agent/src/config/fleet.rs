//! `[fleet]` validated: where the fleet exchanges usage, who this gateway
//! is, how often. The section as written is `file::FleetSection`.

use std::{path::PathBuf, time::Duration};

use super::{FleetSection, error::FleetProblem, units};

/// The shortest and longest sync interval taken (docs/fleet.md: shorter
/// loads Redis for little accuracy, longer lets the fleet overshoot more).
pub const MIN_SYNC_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// One Redis node to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisNode {
    pub host: String,
    pub port: u16,
}

/// TLS to Redis (`rediss://`): whom to trust, and who this gateway is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetTls {
    /// CA certificates (PEM) trusted instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// This gateway's certificate chain and private key (PEM), for mutual
    /// TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// A validated `[fleet]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// As written, the addresses joined by ", " (no credentials: those are
    /// refused in it), for logs and status.
    pub address: String,
    /// One node, or a Redis Cluster's seed nodes.
    pub nodes: Vec<RedisNode>,
    /// The nodes are a Redis Cluster's.
    pub cluster: bool,
    /// `Some`: every node is reached over TLS (`rediss://`).
    pub tls: Option<FleetTls>,
    /// The key namespace.
    pub name: String,
    /// This gateway's name in the fleet.
    pub gateway: String,
    pub sync_interval: Duration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl FleetConfig {
    /// Validates `section`; the field at fault and why, on error.
    pub fn from_section(section: &FleetSection) -> Result<Self, (&'static str, FleetProblem)> {
        let written = section.address.all();
        let mut nodes = Vec::with_capacity(written.len());
        let mut schemes = Vec::with_capacity(written.len());
        for address in written {
            let (tls, node) = parse_address(address).map_err(|p| ("address", p))?;
            schemes.push(tls);
            nodes.push(node);
        }
        let tls = match schemes.as_slice() {
            [] => return Err(("address", FleetProblem::NoAddress)),
            [first, rest @ ..] if rest.iter().any(|t| t != first) => {
                return Err(("address", FleetProblem::MixedTls));
            }
            [first, ..] => *first,
        };
        if nodes.len() > 1 && !section.cluster {
            return Err(("address", FleetProblem::SeveralAddresses(nodes.len())));
        }
        let tls = fleet_tls(section, tls)?;
        check_name("name", &section.name)?;
        let gateway = match &section.gateway {
            Some(gateway) => gateway.clone(),
            None => host_name().ok_or(("gateway", FleetProblem::NoHostName))?,
        };
        check_name("gateway", &gateway)?;
        let sync_interval = units::parse_duration(&section.sync_interval)
            .ok()
            .filter(|d| (MIN_SYNC_INTERVAL..=MAX_SYNC_INTERVAL).contains(d))
            .ok_or_else(|| {
                (
                    "sync_interval",
                    FleetProblem::SyncInterval(section.sync_interval.clone()),
                )
            })?;
        if let Some(user) = &section.username {
            check_name("username", user)?;
        }
        Ok(Self {
            address: written.join(", "),
            nodes,
            cluster: section.cluster,
            tls,
            name: section.name.clone(),
            gateway,
            sync_interval,
            username: section.username.clone(),
            password_file: section.password_file.clone(),
        })
    }
}

/// The TLS files, which only `rediss://` takes; a certificate and its key
/// go together.
fn fleet_tls(
    section: &FleetSection,
    tls: bool,
) -> Result<Option<FleetTls>, (&'static str, FleetProblem)> {
    let files = [
        ("ca_file", &section.ca_file),
        ("cert_file", &section.cert_file),
        ("key_file", &section.key_file),
    ];
    if !tls {
        return match files.iter().find(|(_, file)| file.is_some()) {
            Some((field, _)) => Err((field, FleetProblem::TlsFileWithoutTls(field))),
            None => Ok(None),
        };
    }
    let client = match (&section.cert_file, &section.key_file) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        (Some(_), None) => {
            return Err((
                "cert_file",
                FleetProblem::ClientCertHalf {
                    given: "cert_file",
                    missing: "key_file",
                },
            ));
        }
        (None, Some(_)) => {
            return Err((
                "key_file",
                FleetProblem::ClientCertHalf {
                    given: "key_file",
                    missing: "cert_file",
                },
            ));
        }
    };
    Ok(Some(FleetTls {
        ca_file: section.ca_file.clone(),
        client,
    }))
}

/// `redis://host[:port]` (or `rediss://`, TLS) to whether it is TLS and
/// the node; IPv6 hosts in brackets.
fn parse_address(address: &str) -> Result<(bool, RedisNode), FleetProblem> {
    let bad = || FleetProblem::Address(address.to_owned());
    let (tls, rest) = match address.strip_prefix("rediss://") {
        Some(rest) => (true, rest),
        None => (false, address.strip_prefix("redis://").ok_or_else(bad)?),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err(FleetProblem::CredentialsInAddress);
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => 6379,
    };
    let plain = |c: char| c.is_ascii_alphanumeric() || "-.:".contains(c);
    if host.is_empty() || !host.chars().all(plain) {
        return Err(bad());
    }
    Ok((
        tls,
        RedisNode {
            host: host.to_owned(),
            port,
        },
    ))
}

/// Fleet, gateway and user names end up in Redis keys and metrics: plain.
fn check_name(field: &'static str, name: &str) -> Result<(), (&'static str, FleetProblem)> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err((
            field,
            FleetProblem::Name {
                field,
                given: name.to_owned(),
            },
        ))
    }
}

/// This host's name (the default gateway name).
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0)?;
    let name = std::str::from_utf8(&buf[..end]).ok()?;
    // The short name: "gw1.example.net" is "gw1" to its fleet.
    let short = name.split('.').next().unwrap_or(name);
    (!short.is_empty()).then(|| short.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FleetAddress;

    fn section(address: &str) -> FleetSection {
        FleetSection {
            address: FleetAddress::One(address.into()),
            cluster: false,
            name: "edge".into(),
            gateway: Some("gw1".into()),
            sync_interval: "250ms".into(),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    fn node(fleet: &FleetConfig) -> (&str, u16) {
        (fleet.nodes[0].host.as_str(), fleet.nodes[0].port)
    }

    #[test]
    fn addresses_are_host_and_port_with_redis_s_default_port() {
        for (address, host, port) in [
            ("redis://127.0.0.1:6379", "127.0.0.1", 6379),
            ("redis://redis.internal", "redis.internal", 6379),
            ("redis://[::1]:7000/", "::1", 7000),
        ] {
            let fleet = FleetConfig::from_section(&section(address)).unwrap();
            assert_eq!(node(&fleet), (host, port), "{address}");
            assert_eq!((fleet.tls, fleet.cluster), (None, false));
        }
    }

    #[test]
    fn bad_addresses_say_what_to_write() {
        for address in [
            "127.0.0.1:6379",
            "redis://",
            "rediss://",
            "redis://h:0",
            "redis://h:x",
            "http://h",
        ] {
            let (field, problem) = FleetConfig::from_section(&section(address)).unwrap_err();
            assert_eq!(field, "address");
            assert!(
                problem.to_string().contains("redis://127.0.0.1:6379"),
                "{address}: {problem}"
            );
        }
        let (_, secret) =
            FleetConfig::from_section(&section("redis://user:hunter2@h:6379")).unwrap_err();
        let text = secret.to_string();
        assert!(
            text.contains("password_file") && !text.contains("hunter2"),
            "{text}"
        );
        let (_, secret) =
            FleetConfig::from_section(&section("rediss://:hunter2@h:6379")).unwrap_err();
        assert!(!secret.to_string().contains("hunter2"), "{secret}");
    }

    #[test]
    fn tls_is_rediss_with_an_optional_ca_and_client_certificate() {
        let mut s = section("rediss://redis.internal:6380");
        let fleet = FleetConfig::from_section(&s).unwrap();
        assert_eq!(node(&fleet), ("redis.internal", 6380));
        assert_eq!(fleet.tls, Some(FleetTls::default()), "the system's roots");
        s.ca_file = Some("/etc/limiter/redis-ca.pem".into());
        s.cert_file = Some("/etc/limiter/gw1.pem".into());
        s.key_file = Some("/etc/limiter/gw1.key".into());
        let tls = FleetConfig::from_section(&s).unwrap().tls.unwrap();
        assert_eq!(tls.ca_file, s.ca_file);
        assert_eq!(
            tls.client,
            Some(("/etc/limiter/gw1.pem".into(), "/etc/limiter/gw1.key".into()))
        );
        // A certificate without its key, or the other way round.
        s.key_file = None;
        let (field, problem) = FleetConfig::from_section(&s).unwrap_err();
        assert_eq!(field, "cert_file");
        assert!(problem.to_string().contains("key_file"), "{problem}");
        s.cert_file = None;
        s.key_file = Some("/k".into());
        assert_eq!(FleetConfig::from_section(&s).unwrap_err().0, "key_file");
        // TLS files without TLS: named, and what to write instead.
        for field in ["ca_file", "cert_file", "key_file"] {
            let mut s = section("redis://h");
            let file = Some(PathBuf::from("/f"));
            match field {
                "ca_file" => s.ca_file = file,
                "cert_file" => s.cert_file = file,
                _ => s.key_file = file,
            }
            let (at, problem) = FleetConfig::from_section(&s).unwrap_err();
            assert_eq!(at, field);
            let text = problem.to_string();
            assert!(
                text.contains(&format!("fleet.{field}")) && text.contains("rediss://"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_cluster_is_a_list_of_seed_nodes_and_says_so() {
        let nodes = ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"];
        let mut s = section("");
        s.address = FleetAddress::List(nodes.iter().map(|a| (*a).to_owned()).collect());
        // Several addresses are a cluster's: cluster = true is asked for.
        let (field, problem) = FleetConfig::from_section(&s).unwrap_err();
        assert_eq!(field, "address");
        assert!(problem.to_string().contains("cluster = true"), "{problem}");
        s.cluster = true;
        let fleet = FleetConfig::from_section(&s).unwrap();
        assert!(fleet.cluster);
        assert_eq!(fleet.nodes.len(), 2);
        assert_eq!(fleet.nodes[1].host, "10.0.0.2");
        assert_eq!(
            fleet.address,
            "redis://10.0.0.1:7000, redis://10.0.0.2:7000"
        );
        // One seed node is enough for a cluster.
        let mut one = section("rediss://10.0.0.1:7000");
        one.cluster = true;
        let fleet = FleetConfig::from_section(&one).unwrap();
        assert!(fleet.cluster && fleet.tls.is_some());
        // All TLS or none; never empty.
        s.address = FleetAddress::List(vec!["redis://a".into(), "rediss://b".into()]);
        let (field, problem) = FleetConfig::from_section(&s).unwrap_err();
        assert_eq!(field, "address");
        assert!(problem.to_string().contains("rediss://"), "{problem}");
        s.address = FleetAddress::List(vec![]);
        let (field, problem) = FleetConfig::from_section(&s).unwrap_err();
        assert_eq!(field, "address");
        assert!(problem.to_string().contains("empty list"), "{problem}");
    }

    #[test]
    fn names_and_intervals_are_checked() {
        let mut s = section("redis://h");
        s.name = "edge fleet".into();
        assert_eq!(FleetConfig::from_section(&s).unwrap_err().0, "name");
        let mut s = section("redis://h");
        s.gateway = Some(String::new());
        assert_eq!(FleetConfig::from_section(&s).unwrap_err().0, "gateway");
        for interval in ["50ms", "2s", "250"] {
            let mut s = section("redis://h");
            s.sync_interval = interval.into();
            let (field, problem) = FleetConfig::from_section(&s).unwrap_err();
            assert_eq!(field, "sync_interval", "{interval}");
            assert!(problem.to_string().contains("100ms to 1s"), "{problem}");
        }
        let mut s = section("redis://h");
        s.sync_interval = "1s".into();
        assert_eq!(
            FleetConfig::from_section(&s).unwrap().sync_interval,
            MAX_SYNC_INTERVAL
        );
    }

    #[test]
    fn the_gateway_defaults_to_the_host_name() {
        let mut s = section("redis://h");
        s.gateway = None;
        let fleet = FleetConfig::from_section(&s).unwrap();
        assert!(!fleet.gateway.is_empty() && !fleet.gateway.contains('.'));
    }
}
