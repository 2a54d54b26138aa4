//! The agent's change path in process, on real kernel maps: a change of one
//! rule that keeps its shape is put in force in place (one map write,
//! nothing else planned), and leaves the rules, the state and the kernel
//! exactly as staging a whole new rule set would.

use std::{path::Path, sync::Arc};

use limiter_agent::{
    config::{ActionConfig, Config, PortField, ProtocolField, RuleConfig, RuleFields, RulePatch},
    datapath::{Capacities, Datapath},
    enforcer::Enforcer,
    rules::{self, Change},
    service::{Requester, Service},
    state::State,
};

const RULES: &str = r#"
[capacity]
rules = 64

[[rule]]
name = "clients"
prefixes = ["198.18.0.0/16", "2001:db8::/32"]
action = "drop"
packets = "100/s"

[[rule]]
name = "api"
prefixes = ["198.19.0.0/24"]
protocol = "tcp"
ports = [443]
action = "mark"
dscp = 10
bytes = "10Mbit/s"
"#;

fn start(state_path: &Path) -> Service {
    let config = Config::parse(RULES, Path::new("rules.toml")).unwrap_or_else(|e| panic!("{e}"));
    let dp = Datapath::load(Capacities {
        max_rules: 64,
        ..Capacities::default()
    })
    .unwrap_or_else(|e| panic!("loading: {e}"));
    let enforcer = Enforcer::new(dp, false).unwrap_or_else(|e| panic!("{e}"));
    // A state file not written yet: no live changes.
    let state = State::load(state_path).unwrap_or_else(|e| panic!("{e}"));
    let plan = rules::plan(&config, state).unwrap_or_else(|e| panic!("{e}"));
    Service::start(Arc::new(config), plan, state_path.to_owned(), enforcer)
        .unwrap_or_else(|e| panic!("starting: {e}"))
}

fn patch(name: &str, fields: RulePatch) -> Change {
    Change::Patch {
        name: name.into(),
        patch: fields,
    }
}

fn packets(rate: &str) -> RulePatch {
    RulePatch {
        packets: Some(rate.into()),
        ..RulePatch::default()
    }
}

fn agrees(service: &Service, after: &str) {
    if let Err(e) = service.agrees_with_a_fresh_plan() {
        panic!("after {after}: {e}");
    }
}

#[test]
fn a_change_that_keeps_a_rules_shape_is_made_in_place_as_a_whole_plan_would() {
    let dir = std::env::temp_dir().join(format!(
        "limiter-test-{}",
        limiter_tests::netns::unique_tag()
    ));
    let state_dir = dir.join("state");
    let state_path = state_dir.join("state.json");
    let mut service = start(&state_path);
    agrees(&service, "the start");
    let who = Requester::Agent;
    let in_place: Vec<(&str, Change)> = vec![
        ("a file rule's budget", patch("clients", packets("200/s"))),
        ("the same budget again", patch("clients", packets("200/s"))),
        (
            "its marks",
            patch(
                "api",
                RulePatch {
                    dscp: Some(20),
                    ..RulePatch::default()
                },
            ),
        ),
        (
            "a whole rule replaced, same prefixes and service",
            Change::Replace(RuleConfig::new(
                "api",
                ActionConfig::Monitor,
                RuleFields {
                    prefixes: Some(vec!["198.19.0.0/24".into()]),
                    protocol: Some(ProtocolField::Name("tcp".into())),
                    ports: Some(vec![PortField::Number(443)]),
                    packets: Some("5/s".into()),
                    ..RuleFields::default()
                },
            )),
        ),
    ];
    for (what, change) in &in_place {
        match service.change_in_place(change) {
            Some(Ok(())) => agrees(&service, what),
            Some(Err(e)) => panic!("{what}: refused: {e}"),
            None => panic!("{what}: not made in place"),
        }
    }
    let saved = State::load(&state_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        saved.overrides.len(),
        2,
        "both changed rules are live changes in the state file"
    );
    assert!(
        ["clients", "api"]
            .iter()
            .all(|name| saved.override_since.contains_key(*name)),
        "each live change has its time: {:?}",
        saved.override_since
    );

    // Changes of shape, and refusals, are left to the general path, and it
    // gives them their usual answer.
    let general: Vec<(&str, Change)> = vec![
        (
            "new prefixes",
            patch(
                "clients",
                RulePatch {
                    prefixes: Some(vec!["198.18.0.0/15".into()]),
                    ..RulePatch::default()
                },
            ),
        ),
        ("an unknown rule", patch("nosuch", packets("1/s"))),
        (
            "a budget that does not parse",
            patch("clients", packets("fast")),
        ),
        (
            "an added rule",
            Change::Add(RuleConfig::new(
                "new",
                ActionConfig::Drop,
                RuleFields {
                    prefixes: Some(vec!["198.18.9.0/24".into()]),
                    ..RuleFields::default()
                },
            )),
        ),
    ];
    for (what, change) in &general {
        assert!(
            service.change_in_place(change).is_none(),
            "{what}: made in place"
        );
        let _ = service.apply_batch(std::slice::from_ref(change), &who);
        agrees(&service, what);
    }

    // A change that cannot be saved is taken back from the kernel too.
    std::fs::remove_dir_all(&state_dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&state_dir, "not a directory").unwrap_or_else(|e| panic!("{e}"));
    match service.change_in_place(&patch("clients", packets("300/s"))) {
        Some(Err(e)) => assert!(e.to_string().contains("state"), "{e}"),
        other => panic!("an unsaved change: {other:?}"),
    }
    agrees(&service, "a change that could not be saved");
    let _ = std::fs::remove_dir_all(&dir);
}
