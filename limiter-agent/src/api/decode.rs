//! What a decoded request body means, checked without the kernel: the
//! parts of request handling that need no maps, so the service and the fuzz
//! targets (fuzz/) share one definition.

use std::time::Duration;

use crate::{
    api::types::PenaltyRequest,
    config::{self, ActionConfig, RuleConfig, RuleFields, ScopeConfig, units},
    service::PENALTY_PREFIX,
};

/// A valid `POST /v1/penalties` request: the rule it puts in force (named
/// `penalty:<prefix>`) and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Penalty {
    pub rule: RuleConfig,
    pub duration: Duration,
}

/// Checks a penalty request and builds its rule; the error is the message
/// for a 400 answer.
pub fn penalty(request: &PenaltyRequest) -> Result<Penalty, String> {
    let prefix = config::parse_prefix(&request.prefix).map_err(|e| e.to_string())?;
    let duration = units::parse_duration(&request.duration).map_err(|e| e.to_string())?;
    if duration.as_secs() == 0 {
        return Err("a penalty lasts at least 1s".into());
    }
    let has_budget = request.packets.is_some() || request.bytes.is_some();
    if request.deny == has_budget {
        return Err("give either --deny or a budget (packets and/or bytes), not both".into());
    }
    let action = if request.deny {
        ActionConfig::Deny
    } else {
        ActionConfig::Drop
    };
    let fields = RuleFields {
        prefixes: Some(vec![prefix.to_string()]),
        scope: Some(ScopeConfig::PerSource),
        packets: request.packets.clone(),
        packet_burst: request.packet_burst.clone(),
        bytes: request.bytes.clone(),
        byte_burst: request.byte_burst.clone(),
        ..RuleFields::default()
    };
    let rule = RuleConfig::new(format!("{PENALTY_PREFIX}{prefix}"), action, fields);
    rule.validate()
        .map_err(|e| format!("penalty for {prefix}: {e}"))?;
    Ok(Penalty { rule, duration })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prefix: &str, duration: &str) -> PenaltyRequest {
        PenaltyRequest {
            prefix: prefix.into(),
            duration: duration.into(),
            deny: true,
            packets: None,
            packet_burst: None,
            bytes: None,
            byte_burst: None,
        }
    }

    #[test]
    fn a_deny_penalty_is_a_deny_rule_named_after_its_prefix() {
        let p = penalty(&request("198.18.0.1", "5m")).unwrap();
        assert_eq!(p.rule.name, "penalty:198.18.0.1/32");
        assert_eq!(p.rule.action, ActionConfig::Deny);
        assert_eq!(p.duration, Duration::from_secs(300));
    }

    #[test]
    fn bad_penalties_are_refused_with_the_reason() {
        let err = |r: PenaltyRequest| penalty(&r).unwrap_err();
        assert!(err(request("198.18.0.1/8", "5m")).contains("host bits"));
        assert!(err(request("198.18.0.1", "0s")).contains("at least 1s"));
        assert!(err(request("198.18.0.1", "soon")).contains("30s, 5m"));
        let mut both = request("198.18.0.1", "5m");
        both.packets = Some("10/s".into());
        assert!(err(both).contains("not both"));
    }
}
