//! `[fleet]` validated: where the fleet exchanges usage, who this gateway
//! is, how often. The section as written is `file::FleetSection`.

use std::{path::PathBuf, time::Duration};

use super::{FleetSection, error::FleetProblem, units};

/// The shortest and longest sync interval taken (docs/fleet.md: shorter
/// loads Redis for little accuracy, longer lets the fleet overshoot more).
pub const MIN_SYNC_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// A validated `[fleet]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// As written (no credentials: those are refused in it).
    pub address: String,
    pub host: String,
    pub port: u16,
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
        let (host, port) = parse_address(&section.address).map_err(|p| ("address", p))?;
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
            address: section.address.clone(),
            host,
            port,
            name: section.name.clone(),
            gateway,
            sync_interval,
            username: section.username.clone(),
            password_file: section.password_file.clone(),
        })
    }
}

/// `redis://host[:port]` to (host, port); IPv6 hosts in brackets.
fn parse_address(address: &str) -> Result<(String, u16), FleetProblem> {
    let bad = || FleetProblem::Address(address.to_owned());
    if address.starts_with("rediss://") {
        return Err(FleetProblem::Tls(address.to_owned()));
    }
    let rest = address.strip_prefix("redis://").ok_or_else(bad)?;
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
    Ok((host.to_owned(), port))
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

    fn section(address: &str) -> FleetSection {
        FleetSection {
            address: address.into(),
            name: "edge".into(),
            gateway: Some("gw1".into()),
            sync_interval: "250ms".into(),
            username: None,
            password_file: None,
        }
    }

    #[test]
    fn addresses_are_host_and_port_with_redis_s_default_port() {
        for (address, host, port) in [
            ("redis://127.0.0.1:6379", "127.0.0.1", 6379),
            ("redis://redis.internal", "redis.internal", 6379),
            ("redis://[::1]:7000/", "::1", 7000),
        ] {
            let fleet = FleetConfig::from_section(&section(address)).unwrap();
            assert_eq!((fleet.host.as_str(), fleet.port), (host, port), "{address}");
        }
    }

    #[test]
    fn bad_addresses_say_what_to_write() {
        for address in [
            "127.0.0.1:6379",
            "redis://",
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
        let (_, tls) = FleetConfig::from_section(&section("rediss://h:6380")).unwrap_err();
        assert!(tls.to_string().contains("TLS"), "{tls}");
        let (_, secret) =
            FleetConfig::from_section(&section("redis://user:hunter2@h:6379")).unwrap_err();
        let text = secret.to_string();
        assert!(
            text.contains("password_file") && !text.contains("hunter2"),
            "{text}"
        );
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
