//! Arbitrary bytes as each body the control API decodes, decoded the way
//! axum's `Json` extractor does, then checked the way the service checks a
//! change before it touches the kernel. The same bytes are also tried as a
//! URL path segment: a rule name, and a source address for `inspect`.
#![no_main]

use std::{collections::BTreeMap, net::IpAddr};

use axum::Json;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use limiter_agent::{
    api::{
        decode,
        types::{PenaltyRequest, RulePatch},
    },
    config::RuleConfig,
    service::Change,
};
use limiter_fuzz::{EXAMPLE, apply_rule, apply_rule_set, compose};

fuzz_target!(|data: &[u8]| {
    // POST /v1/rules, PUT /v1/rules/{name}
    if let Ok(Json(rule)) = Json::<RuleConfig>::from_bytes(data) {
        apply_rule(&rule);
        apply_rule_set(&compose(&BTreeMap::new(), [rule]), max_rules(), |_| 1);
    }
    // PATCH /v1/rules/{name}: applied to each rule of the example.
    if let Ok(Json(patch)) = Json::<RulePatch>::from_bytes(data) {
        for rule in &EXAMPLE.file.rules {
            let mut patched = rule.clone();
            if patch.apply_to(&mut patched).is_ok() {
                apply_rule(&patched);
            }
        }
    }
    // POST /v1/batch
    if let Ok(Json(changes)) = Json::<Vec<Change>>::from_bytes(data) {
        batch(&changes);
    }
    // POST /v1/penalties
    if let Ok(Json(request)) = Json::<PenaltyRequest>::from_bytes(data) {
        if let Ok(penalty) = decode::penalty(&request) {
            assert!(penalty.duration.as_secs() >= 1);
            apply_rule(&penalty.rule);
        }
    }
    // Path segments arrive percent-decoded and must be UTF-8.
    if let Ok(segment) = std::str::from_utf8(data) {
        inspect(segment);
        let _ = EXAMPLE.file.rules.iter().find(|r| r.name == segment);
    }
});

fn max_rules() -> u32 {
    EXAMPLE.file.capacity.rules
}

/// A batch as `Service::apply_batch` stages it over the example's rules:
/// each change checked on its own, then the result as one rule set.
fn batch(changes: &[Change]) {
    let mut overrides: BTreeMap<String, Option<RuleConfig>> = BTreeMap::new();
    let current =
        |overrides: &BTreeMap<String, Option<RuleConfig>>, name: &str| match overrides.get(name) {
            Some(rule) => rule.clone(),
            None => EXAMPLE.file.rules.iter().find(|r| r.name == name).cloned(),
        };
    for change in changes {
        match change {
            Change::Add(rule) => {
                if current(&overrides, &rule.name).is_some() || rule.validate().is_err() {
                    return;
                }
                overrides.insert(rule.name.clone(), Some(rule.clone()));
            }
            Change::Replace(rule) => {
                if current(&overrides, &rule.name).is_none() || rule.validate().is_err() {
                    return;
                }
                overrides.insert(rule.name.clone(), Some(rule.clone()));
            }
            Change::Patch { name, patch } => {
                let Some(mut rule) = current(&overrides, name) else {
                    return;
                };
                if patch.apply_to(&mut rule).is_err() || rule.validate().is_err() {
                    return;
                }
                overrides.insert(name.clone(), Some(rule));
            }
            Change::Delete(name) => {
                if current(&overrides, name).is_none() {
                    return;
                }
                overrides.insert(name.clone(), None);
            }
        }
    }
    let rules = compose(&overrides, []);
    apply_rule_set(&rules, max_rules(), |name| {
        rules
            .iter()
            .position(|r| r.name == name)
            .map_or(0, |i| i as u32 + 1)
    });
}

/// `GET /v1/sources/{address}` up to the map lookups: the address, and the
/// bucket it would be charged to under each rule of the example.
fn inspect(address: &str) {
    let Ok(addr) = address.parse::<IpAddr>() else {
        return;
    };
    for def in &EXAMPLE.rules {
        let (mut bytes, len) = match addr {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (b, def.source_prefix_v4)
            }
            IpAddr::V6(a) => (a.octets(), def.source_prefix_v6),
        };
        limiter_common::mask_addr(&mut bytes, len);
        let masked = match addr {
            IpAddr::V4(_) => IpNet::new(
                IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
                len as u8,
            ),
            IpAddr::V6(_) => IpNet::new(IpAddr::from(bytes), len as u8),
        };
        assert!(
            masked.is_ok_and(|net| net.contains(&addr)),
            "{addr} under {def:?}"
        );
    }
}
