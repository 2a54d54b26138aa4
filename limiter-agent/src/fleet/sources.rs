//! Fleet-wide per-source buckets: which sources are exchanged, and how they
//! are named in Redis. Pure, no Redis and no kernel (docs/fleet.md,
//! "Per-source buckets").
//!
//! A source far below its fair share on every gateway cannot break a fleet
//! budget, so only *heavy* sources are exchanged: the programs promote a
//! source once it sends [`threshold`] units in a window (half its fair
//! share, `budget / gateways / 2`), and the agent then exchanges it like a
//! rule's bucket, one Redis hash per heavy source. Each rule has a sorted
//! set of its heavy sources, scored by when a gateway last saw one admit
//! something, so the gateways where a source is light learn of it and
//! charge what it admitted elsewhere.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use limiter_common::{
    SourceKey, dimension::COUNT as DIMENSIONS, family, fleet_window, mask_addr, rate::Rate,
};

/// A heavy source no gateway saw admit anything for this long leaves the
/// rule's set.
pub const HEAVY_LIVENESS: Duration = Duration::from_secs(30);
/// A heavy source quiet here and elsewhere for this long is forgotten here
/// (its bucket local again, until it is heavy again).
pub const DEMOTE_AFTER: Duration = Duration::from_secs(60);

/// A rule whose per-source buckets are fleet-wide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRule {
    pub name: String,
    pub id: u32,
    pub source_prefix_v4: u32,
    pub source_prefix_v6: u32,
    /// Each source's budget by dimension.
    pub rates: [Option<Rate>; DIMENSIONS],
}

impl SourceRule {
    /// The prefix length sources of `family_tag` are masked to.
    pub fn prefix_len(&self, family_tag: u32) -> u32 {
        if family_tag == family::IPV4 {
            self.source_prefix_v4
        } else {
            self.source_prefix_v6
        }
    }
}

/// Units of the rule's lead dimension (the first it limits, as the
/// programs count it) a source must send in one window to be heavy: half
/// its fair share of the budget, `rate x window / gateways / 2`, at least
/// one; 0 (nobody is heavy) for a rule without budgets.
pub fn threshold(rates: &[Option<Rate>; DIMENSIONS], gateways: u32) -> u64 {
    let Some(rate) = rates.iter().flatten().next() else {
        return 0;
    };
    if rate.per_ns == 0 {
        return 0;
    }
    let per_window = u128::from(rate.count) * u128::from(fleet_window::WINDOW_NS)
        / u128::from(rate.per_ns)
        / (2 * u128::from(gateways.max(1)));
    u64::try_from(per_window).unwrap_or(u64::MAX).max(1)
}

/// A source as the rule's set and its hash name it: `198.18.0.7/32`,
/// `2001:db8::/64`.
pub fn member(key: &SourceKey, prefix_len: u32) -> String {
    let addr = if key.family == family::IPV4 {
        IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    };
    format!("{addr}/{prefix_len}")
}

/// The kernel key of `member` for `rule`, if it names a source of that
/// rule's prefix length (anything else in the set is not ours: skipped).
pub fn parse_member(rule: &SourceRule, member: &str) -> Option<SourceKey> {
    let (addr, len) = member.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let (family_tag, bytes) = match addr {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (family::IPV4, b)
        }
        IpAddr::V6(v6) => (family::IPV6, v6.octets()),
    };
    if len != rule.prefix_len(family_tag) {
        return None;
    }
    // A member with host bits set is not one the kernel would key.
    let mut masked = bytes;
    mask_addr(&mut masked, len);
    if masked != bytes {
        return None;
    }
    Some(SourceKey {
        rule_id: rule.id,
        family: family_tag,
        addr: bytes,
    })
}

/// The heavy sources this gateway exchanges, and when each last moved.
#[derive(Debug, Default)]
pub struct HeavySources {
    /// Heard heavy from the fleet (the rules' sets at the last sync).
    pub elsewhere: HashSet<SourceKey>,
    /// When each exchanged source last admitted something, here or
    /// elsewhere.
    last_active: HashMap<SourceKey, Instant>,
}

impl HeavySources {
    /// Notes that `key` admitted units (here if `here`, or elsewhere) or
    /// not at `now`.
    pub fn touch(&mut self, key: SourceKey, moved: bool, now: Instant) {
        let last = self.last_active.entry(key).or_insert(now);
        if moved {
            *last = now;
        }
    }

    /// Sources quiet for [`DEMOTE_AFTER`]: forgotten here (and returned,
    /// for the kernel to forget).
    pub fn demote(&mut self, now: Instant) -> Vec<SourceKey> {
        let quiet: Vec<SourceKey> = self
            .last_active
            .iter()
            .filter(|(_, last)| now.duration_since(**last) >= DEMOTE_AFTER)
            .map(|(k, _)| *k)
            .collect();
        for key in &quiet {
            self.last_active.remove(key);
            self.elsewhere.remove(key);
        }
        quiet
    }

    /// Forgets sources of rules no longer fleet-wide per source.
    pub fn retain_rules(&mut self, ids: &[u32]) {
        self.elsewhere.retain(|k| ids.contains(&k.rule_id));
        self.last_active.retain(|k, _| ids.contains(&k.rule_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> SourceRule {
        SourceRule {
            name: "clients".into(),
            id: 7,
            source_prefix_v4: 32,
            source_prefix_v6: 64,
            rates: [Some(Rate::per_second(300)), None, None],
        }
    }

    #[test]
    fn a_source_is_heavy_at_half_its_fair_share_of_a_window() {
        // 300/s over 3 gateways: 100/s each, half is 50/s, times the
        // window (1.074 s): 53.
        let rates = [Some(Rate::per_second(300)), None, None];
        assert_eq!(threshold(&rates, 3), 53);
        // Alone: half the budget.
        assert_eq!(threshold(&rates, 1), 161);
        // A slow budget: every unit matters.
        let slow = Rate {
            count: 100,
            per_ns: 86_400_000_000_000,
        };
        assert_eq!(threshold(&[Some(slow), None, None], 4), 1);
        // The lead dimension is the first limited one: bytes here.
        let bytes = [None, Some(Rate::per_second(1_000_000)), None];
        assert_eq!(threshold(&bytes, 2), 268_435);
        assert_eq!(threshold(&[None, None, None], 3), 0);
    }

    #[test]
    fn members_name_masked_sources_and_round_trip() {
        let r = rule();
        let v4 = SourceKey {
            rule_id: 7,
            family: family::IPV4,
            addr: [198, 18, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        assert_eq!(member(&v4, 32), "198.18.0.7/32");
        assert_eq!(parse_member(&r, "198.18.0.7/32"), Some(v4));
        let v6 = parse_member(&r, "2001:db8:1:2::/64").map(|k| member(&k, 64));
        assert_eq!(v6.as_deref(), Some("2001:db8:1:2::/64"));
        // Not this rule's length, not masked, not an address: not ours.
        assert_eq!(parse_member(&r, "198.18.0.0/24"), None);
        assert_eq!(parse_member(&r, "2001:db8:1:2::1/64"), None);
        assert_eq!(parse_member(&r, "gw1"), None);
        assert_eq!(parse_member(&r, "198.18.0.7"), None);
    }

    #[test]
    fn quiet_sources_are_demoted_busy_ones_kept() {
        let mut heavy = HeavySources::default();
        let key = |n: u8| SourceKey {
            rule_id: 7,
            family: family::IPV4,
            addr: [198, 18, 0, n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let t0 = Instant::now();
        heavy.touch(key(1), true, t0);
        heavy.touch(key(2), true, t0);
        heavy.elsewhere.insert(key(2));
        let later = t0 + DEMOTE_AFTER / 2;
        heavy.touch(key(1), true, later);
        heavy.touch(key(2), false, later);
        assert!(heavy.demote(later).is_empty());
        let end = t0 + DEMOTE_AFTER;
        assert_eq!(heavy.demote(end), vec![key(2)]);
        assert!(!heavy.elsewhere.contains(&key(2)));
        assert_eq!(heavy.demote(later + DEMOTE_AFTER), vec![key(1)]);
    }
}
