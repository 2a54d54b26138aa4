//! Arbitrary bytes as each body the control API decodes, decoded the way
//! axum's `Json` extractor does, then through the agent's own rules core as
//! the service runs it before it touches the kernel (`rules::stage`, then
//! `rules::plan`). The same bytes are also tried as a URL path segment: a
//! rule name, and a source address for `inspect`.
#![no_main]

use std::net::IpAddr;

use axum::Json;
use libfuzzer_sys::fuzz_target;
use limiter_agent::{
    api::types::{PenaltyRequest, RulePatch},
    config::RuleConfig,
    rules::{self, Change},
    state::State,
};
use limiter_fuzz::{EXAMPLE, apply_rule, check_plan};

fuzz_target!(|data: &[u8]| {
    // POST /v1/rules, PUT /v1/rules/{name}
    if let Ok(Json(rule)) = Json::<RuleConfig>::from_bytes(data) {
        apply_rule(&rule);
        batch(&[Change::Add(rule.clone())]);
        batch(&[Change::Replace(rule)]);
    }
    // PATCH /v1/rules/{name}: applied to each rule of the example.
    if let Ok(Json(patch)) = Json::<RulePatch>::from_bytes(data) {
        for rule in &EXAMPLE.file.rules {
            batch(&[Change::Patch {
                name: rule.name.clone(),
                patch: patch.clone(),
            }]);
        }
    }
    // POST /v1/batch
    if let Ok(Json(changes)) = Json::<Vec<Change>>::from_bytes(data) {
        batch(&changes);
    }
    // POST /v1/penalties
    if let Ok(Json(request)) = Json::<PenaltyRequest>::from_bytes(data)
        && let Ok(penalty) = request.decode(EXAMPLE.max_penalty)
    {
        assert!(penalty.duration.as_secs() >= 1 && penalty.duration <= EXAMPLE.max_penalty);
        apply_rule(&penalty.rule);
        let (state, staged) = rules::add_penalty(&State::default(), penalty, 0);
        let name = staged.name;
        assert!(name.starts_with(rules::PENALTY_PREFIX), "{name}");
        check_plan(&EXAMPLE, state);
    }
    // Path segments arrive percent-decoded and must be UTF-8.
    if let Ok(segment) = std::str::from_utf8(data) {
        inspect(segment);
        batch(&[Change::Delete(segment.to_owned())]);
    }
});

/// A batch as `Service::apply_batch` runs it over the example's rules.
fn batch(changes: &[Change]) {
    if let Ok(state) = rules::stage(&EXAMPLE, &State::default(), changes, 0) {
        check_plan(&EXAMPLE, state);
    }
}

/// `GET /v1/sources/{address}` up to the map lookups: the address, and the
/// bucket it would be charged to under each rule of the example.
fn inspect(address: &str) {
    let Ok(addr) = address.parse::<IpAddr>() else {
        return;
    };
    for def in &EXAMPLE.rules {
        let bucket = rules::source_bucket(addr, def);
        assert!(bucket.prefix.contains(&addr), "{addr} under {def:?}");
    }
}
