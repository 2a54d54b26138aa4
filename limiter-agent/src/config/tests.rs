use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("test.toml")).map_err(|e| e.to_string())
}

/// Rate per second (for rates that are whole per second) and burst.
fn rate_burst(budget: &Option<Budget>) -> Option<(u64, u64)> {
    budget.as_ref().map(|b| {
        let second = limiter_common::rate::NANOS_PER_SEC;
        assert_eq!(second % b.rate.per_ns, 0, "{b:?}");
        (b.rate.count * (second / b.rate.per_ns), b.burst)
    })
}

fn rule(body: &str) -> String {
    format!("[[rule]]\nname = \"r\"\nprefixes = [\"198.18.0.0/15\"]\n{body}\n")
}

#[test]
fn the_embedded_default_only_observes() {
    let config = Config::embedded_default().unwrap();
    assert_eq!(config.rules.len(), 1);
    let rule = &config.rules[0];
    assert_eq!(rule.action, ActionConfig::Monitor);
    assert_eq!(rule.prefixes.len(), 2);
    assert!(config.file.interfaces.is_empty());
}

#[test]
fn the_documented_example_parses() {
    let text = include_str!("../../../docs/limiter.example.toml");
    let config = parse(text).unwrap();
    assert!(config.rules.len() >= 5);
    assert!(!config.file.interfaces.is_empty());
}

/// The metric names the example's comments point operators at.
fn metrics_named_in(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '*')))
        .filter(|word| word.starts_with("limiter_"))
        .collect()
}

#[test]
fn the_example_names_only_metrics_the_agent_exports() {
    let example = include_str!("../../../docs/limiter.example.toml");
    let exported = include_str!("../metrics.rs");
    let named = metrics_named_in(example);
    assert!(named.len() >= 3, "{named:?}");
    for name in named {
        assert!(
            exported.contains(&format!("\"{name}\"")),
            "docs/limiter.example.toml names {name}, which the agent does not export"
        );
    }
}

#[test]
fn the_example_says_what_a_per_minute_rate_really_is() {
    let example = include_str!("../../../docs/limiter.example.toml");
    let c = parse(&rule("action = \"drop\"\npackets = \"3/min\"")).unwrap();
    let budget = c.rules[0].packets.as_ref().unwrap();
    // "one every 20 s", and a burst of 3.
    assert_eq!(
        (budget.rate.count, budget.rate.per_ns, budget.burst),
        (1, 20 * limiter_common::rate::NANOS_PER_SEC, 3)
    );
    assert!(
        example.contains("(`3/min` is one every 20 s)")
            && example.contains("A burst left out is the amount written")
            && example.contains("3 for `3/min`"),
        "the example's comment no longer says what 3/min is"
    );
}

#[test]
fn a_full_rule_parses_with_units() {
    let c = parse(&rule(
        "action = \"mark\"\npackets = \"10k/s\"\npacket_burst = \"20k\"\nbytes = \"100Mbit/s\"\n\
         byte_burst = \"2MiB\"\nnew_connections = \"100/s\"\nconnection_burst = 50\n\
         scope = \"shared\"\ndscp = 46\nskb_mark = 119",
    ))
    .unwrap();
    let r = &c.rules[0];
    assert_eq!(rate_burst(&r.packets), Some((10_000, 20_000)));
    assert_eq!(rate_burst(&r.bytes), Some((12_500_000, 2 << 20)));
    assert_eq!(rate_burst(&r.new_connections), Some((100, 50)));
    assert_eq!(
        (r.scope, r.dscp, r.skb_mark),
        (ScopeConfig::Shared, 46, 119)
    );
}

#[test]
fn bursts_default_to_the_amount_written_for_one_interval() {
    let burst = |body: &str| -> Vec<Option<u64>> {
        let c = parse(&rule(&format!("action = \"drop\"\n{body}"))).unwrap();
        let r = &c.rules[0];
        [&r.packets, &r.bytes, &r.new_connections]
            .map(|b| b.as_ref().map(|b| b.burst))
            .to_vec()
    };
    // Never below one full-size frame.
    assert_eq!(
        burst("packets = \"500/s\"\nbytes = \"1000B/s\""),
        [Some(500), Some(1514), None]
    );
    // "3 new connections a minute": 3 at once, then one every 20 s.
    assert_eq!(
        burst("new_connections = \"3/min\"\nbytes = \"10GB/day\""),
        [None, Some(10_000_000_000), Some(3)]
    );
    assert_eq!(burst("packets = \"0.5/s\""), [Some(1), None, None]);
}

#[test]
fn an_aggregate_reaches_the_kernel_beside_the_per_source_budget() {
    let c = parse(&rule(
        "action = \"drop\"\npackets = \"200/s\"\n\
         aggregate = { packets = \"20k/s\", packet_burst = \"40k\", bytes = \"1GB/day\" }",
    ))
    .unwrap();
    let r = &c.rules[0];
    let agg = r.aggregate.as_ref().unwrap();
    assert_eq!(rate_burst(&agg.packets), Some((20_000, 40_000)));
    assert_eq!(agg.bytes.as_ref().map(|b| b.burst), Some(1_000_000_000));
    let limits = r.aggregate_limits();
    assert_eq!(limits[0].burst(), 40_000);
    assert!(limits[2].is_unlimited());
    assert_eq!(r.limits()[0].burst(), 200);
    // `{}` is no aggregate.
    let c = parse(&rule(
        "action = \"drop\"\npackets = \"200/s\"\naggregate = {}",
    ))
    .unwrap();
    assert_eq!(c.rules[0].aggregate, None);
}

#[test]
fn rates_with_any_interval_reach_the_kernel_exactly() {
    use limiter_common::rate::{FINE_SHIFT, NANOS_PER_SEC};
    let c = parse(&rule(
        "action = \"drop\"\npackets = \"90/min\"\nbytes = \"10GB/day\"\n\
         byte_burst = \"10GB\"\nnew_connections = \"0.5/s\"",
    ))
    .unwrap();
    let r = &c.rules[0];
    let limits = r.limits();
    // 90/min: one packet every 2/3 s, rounded up to the next fine unit.
    let fine_sec = u128::from(NANOS_PER_SEC) << FINE_SHIFT;
    assert_eq!(u128::from(limits[0].interval), (fine_sec * 2).div_ceil(3));
    assert_eq!(
        r.packets.as_ref().map(|b| b.written.as_str()),
        Some("90/min")
    );
    // A day's bytes at once.
    assert_eq!(limits[1].burst(), 10_000_000_000);
    assert_eq!(
        u128::from(limits[1].interval),
        (fine_sec * 86_400).div_ceil(10_000_000_000)
    );
    // 0.5/s: one every 2 s exactly.
    assert_eq!(u128::from(limits[2].interval), fine_sec * 2);
}

/// Each bad input is refused with the file, the line of the field at fault
/// and a reason that says what to do.
#[test]
fn bad_inputs_are_refused_with_line_field_and_reason() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "[agent]\nunknown_key = 1\n",
            2,
            "unknown field `unknown_key`",
        ),
        (
            "[[rule]]\nname = \"r\"\nprefixes = [\"198.18.0.0/15\"]\naction = \"explode\"\n",
            4,
            "unknown variant `explode`",
        ),
        (
            &rule("action = \"drop\"\npackets = \"10k\""),
            5,
            "needs a time unit",
        ),
        (
            &rule("action = \"drop\"\npackets = \"10/s\"\npacket_burst = 0"),
            6,
            "smaller than one packet",
        ),
        (
            &rule("action = \"drop\"\nbytes = \"1Mbit/s\"\nbyte_burst = 1000"),
            6,
            "smaller than one packet (1514)",
        ),
        (
            &rule("action = \"drop\"\npackets = \"100000000000000/s\""),
            5,
            "100000000000000/s is more than the kernel's clock holds (at most 16384000000000/s)",
        ),
        (
            &rule("action = \"drop\"\nbytes = \"2000TB/min\""),
            5,
            "2000TB/min is more than the kernel's clock holds (at most 983040000000000B/min)",
        ),
        (
            &rule("action = \"drop\"\npackets = \"1/s\"\nbytes = \"1kB/day\""),
            6,
            "`bytes`: 1kB/day is slower than the kernel's clock holds: write at least 1 byte every 4 s, e.g. 25kB/day",
        ),
        (
            &rule("action = \"drop\"\nnew_connections = \"1/day\"\nconnection_burst = 4"),
            6,
            "`connection_burst`: 4 is more than the kernel can hold at 1/day: at most 3 at that rate",
        ),
        (
            &rule(
                "action = \"drop\"\nscope = \"shared\"\npackets = \"1/s\"\naggregate = { packets = \"5/s\" }",
            ),
            7,
            "`aggregate`: a shared rule is already one budget for all its sources",
        ),
        (
            &rule("action = \"drop\"\naggregate = { packets = \"5/s\" }"),
            5,
            "`aggregate`: an aggregate is on top of each source's own budget",
        ),
        (
            &rule(
                "action = \"drop\"\npackets = \"1/s\"\naggregate = { packets = \"5/fortnight\" }",
            ),
            6,
            "`aggregate.packets`: \"5/fortnight\": unknown time unit",
        ),
        (
            &rule("action = \"drop\"\npackets = \"1/s\"\naggregate = { pakets = \"5/s\" }"),
            6,
            "unknown field `pakets`",
        ),
        (
            &rule("action = \"drop\"\npackets = \"-5/s\""),
            5,
            "`packets`: \"-5/s\" is negative: write a positive number, e.g. 100/s, 3/min or 10k/day",
        ),
        (
            &rule("action = \"drop\"\npackets = \"1/s\"\npacket_burst = \"9000000000000T\""),
            6,
            "count out of range",
        ),
        (
            &rule("action = \"drop\"\npackets = \"1/s\"\npacket_burst = 5000000000"),
            6,
            "is more than the kernel can hold at 1/s: at most 281474 at that rate",
        ),
        (&rule("action = \"drop\""), 4, "needs a budget"),
        (
            &rule("action = \"deny\"\npackets = \"1/s\""),
            4,
            "take no budget",
        ),
        (
            &rule("action = \"mark\"\npackets = \"1/s\""),
            1,
            "need the DSCP",
        ),
        (
            &rule("action = \"mark\"\npackets = \"1/s\"\ndscp = 64"),
            6,
            "not a DSCP",
        ),
        (
            &rule("action = \"drop\"\npackets = \"1/s\"\ndscp = 4"),
            6,
            "only mark rules",
        ),
        (
            &rule("action = \"drop\"\npackets = \"1/s\"\nsource_prefix_v4 = 33"),
            6,
            "longer than 32",
        ),
        (
            &rule("action = \"drop\"\npackets = \"1/s\"\nsource_prefix_v6 = 129"),
            6,
            "longer than 128",
        ),
        (
            &rule("action = \"drop\"\npacket_burst = 5"),
            5,
            "needs `packets` too",
        ),
        (
            "[[rule]]\nname = \"bad name!\"\nprefixes = [\"198.18.0.0/15\"]\naction = \"deny\"\n",
            2,
            "letters, digits",
        ),
        (
            "[[rule]]\nname = \"r\"\nprefixes = [\"198.18.0.1/15\"]\naction = \"deny\"\n",
            3,
            "did you mean 198.18.0.0/15",
        ),
        (
            "[[rule]]\nname = \"r\"\nprefixes = [\"banana\"]\naction = \"deny\"\n",
            3,
            "is not a prefix",
        ),
        (
            "[[rule]]\nname = \"r\"\nprefixes = []\naction = \"deny\"\n",
            3,
            "leave `prefixes` out to match them all",
        ),
        (
            "[[rule]]\nname = \"r\"\nprefixes = [\"198.18.0.0/15\", \"198.18.0.0/15\"]\naction = \"deny\"\n",
            3,
            "listed twice",
        ),
        (
            "[[rule]]\nname = \"a\"\nprefixes = [\"198.18.0.0/15\"]\naction = \"deny\"\n\
             [[rule]]\nname = \"b\"\nprefixes = [\"198.18.0.0/15\"]\naction = \"allow\"\n",
            7,
            "already in rule \"a\"",
        ),
        (
            "[[rule]]\nname = \"a\"\nprefixes = [\"198.18.0.0/16\"]\naction = \"deny\"\n\
             [[rule]]\nname = \"a\"\nprefixes = [\"198.19.0.0/16\"]\naction = \"allow\"\n",
            6,
            "another rule has this name",
        ),
        (
            "[capacity]\nrules = 1\n[[rule]]\nname = \"a\"\nprefixes = [\"198.18.0.0/16\"]\naction = \"deny\"\n[[rule]]\nname = \"b\"\nprefixes = [\"198.19.0.0/16\"]\naction = \"deny\"\n",
            8,
            "capacity.rules is 1",
        ),
        (
            "[capacity]\nsources = 0\n",
            2,
            "capacity.sources is 0: set it to at least 1",
        ),
        (
            "[[interface]]\nname = \"averyveryverylongname\"\n",
            2,
            "1-15 bytes",
        ),
        (
            "[[interface]]\nname = \"veth0\"\nxdp = \"off\"\n",
            3,
            "nothing to attach",
        ),
        (
            "[[interface]]\nname = \"veth0\"\n[[interface]]\nname = \"veth0\"\n",
            4,
            "listed twice",
        ),
        (
            "[[interface]]\nname = \"veth0\"\nxdp = \"turbo\"\n",
            3,
            "unknown variant `turbo`",
        ),
        ("this is not toml", 1, "expected"),
        (
            "[metrics]\naddress = \"localhost\"\n",
            2,
            "not an address:port",
        ),
        ("[metrics]\ntop_k = 100000\n", 2, "too many series"),
    ];
    for (text, line, reason) in cases {
        let err = parse(text).expect_err(text);
        assert!(
            err.starts_with(&format!("test.toml:{line}: ")),
            "{text:?}\n -> {err}"
        );
        assert!(
            err.contains(reason),
            "{text:?}\n -> {err}\n (wanted {reason:?})"
        );
    }
}

#[test]
fn a_missing_file_says_which() {
    let err = Config::load(Path::new("/nonexistent/limiter.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/limiter.toml: cannot read")
    );
}

#[test]
fn client_commands_read_the_agent_section_alone() {
    let dir = std::env::temp_dir().join(format!("limiter-agent-section-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("limiter.toml");
    let agent = "[agent]\ncontrol_socket = \"/run/x.sock\"\n";
    // A rule that would not validate does not matter to finding the agent.
    std::fs::write(
        &path,
        format!("{agent}[[rule]]\nname = \"a\"\npackets = \"1/fortnight\"\n"),
    )
    .unwrap();
    assert!(Config::load(&path).is_err());
    let section = Config::load_agent_section(&path).unwrap();
    assert_eq!(section.control_socket, Path::new("/run/x.sock"));
    assert_eq!(section.pin_path, AgentSection::default().pin_path);
    // The agent section itself is checked, and errors name their line.
    for (text, line, words) in [
        ("[agent]\ncontrol_sockt = \"/x\"\n", 2, "control_sockt"),
        ("[agent]\ncontrol_socket = \"/x\"\n[[rule]\n", 3, ""),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = Config::load_agent_section(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("limiter.toml:{line}:")) && err.contains(words),
            "{text:?} -> {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The line an error names, from the spans toml reports.
fn line(text: &str) -> usize {
    match Config::parse(text, Path::new("t.toml")) {
        Err(ConfigError::At { line, .. }) => line,
        other => panic!("{text:?}: {other:?}"),
    }
}

#[test]
fn a_wrong_type_points_at_its_field() {
    assert_eq!(
        line(&rule("action = \"mark\"\npackets = \"1/s\"\ndscp = \"ef\"")),
        6
    );
}

#[test]
fn a_missing_field_points_at_its_table() {
    let text = "[[rule]]\nname = \"a\"\nprefixes = [\"198.18.0.0/16\"]\naction = \"deny\"\n\n\
                [[rule]]\nname = \"b\"\nprefixes = [\"198.19.0.0/16\"]\n";
    assert_eq!(line(text), 6);
    assert!(parse(text).unwrap_err().contains("`action`"));
}

#[test]
fn a_validation_error_points_at_the_field_of_the_rule_at_fault() {
    let text = "[[rule]]\nname = \"a\"\nprefixes = [\"198.18.0.0/16\"]\naction = \"deny\"\n\
                [[rule]]\nname = \"b\"\n# a comment\nprefixes = [\"198.19.0.0/16\"]\n\
                action = \"drop\"\npackets = \"10/s\"\nbytes = \"1 parsec/s\"\n";
    assert_eq!(line(text), 11);
}

#[test]
fn fields_in_inline_tables_and_dotted_keys_are_found() {
    assert_eq!(line("capacity.rules = 0\n"), 1);
    assert_eq!(line("\n\n[metrics]\n\n\ntop_k = 5000\n"), 6);
}

/// Capacity is checked where the rules are: the error points at the first
/// rule beyond it and says what to raise.
#[test]
fn too_many_prefixes_in_the_file_name_the_family_and_what_to_raise() {
    let text = "[capacity]\nrules = 2\n[[rule]]\nname = \"a\"\n\
                prefixes = [\"2001:db8::/48\", \"2001:db8:1::/48\", \"2001:db8:2::/48\"]\naction = \"deny\"\n";
    let err = parse(text).unwrap_err();
    assert!(
        err.starts_with("test.toml:5: 3 IPv6 prefixes") && err.contains("[capacity]"),
        "{err}"
    );
}

#[test]
fn errors_keep_their_cause() {
    let Err(err) = Config::parse("[metrics]\naddress = \"nowhere\"\n", Path::new("t.toml")) else {
        panic!("accepted");
    };
    assert!(std::error::Error::source(&err).is_some(), "{err}");
}

#[test]
fn numbers_out_of_their_field_s_range_name_the_field_and_the_range() {
    let rule = |extra: &str| {
        format!(
            "[[rule]]\nname = \"a\"\nprefixes = [\"198.18.0.0/16\"]\naction = \"mark\"\npackets = \"10/s\"\n{extra}\n"
        )
    };
    let error = |text: &str| match Config::parse(text, Path::new("t.toml")) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    };
    let negative = error(&rule("source_prefix_v4 = -1"));
    assert_eq!(
        negative,
        "t.toml:6: `source_prefix_v4`: -1 is out of range: write a whole number from 0 to 32"
    );
    let byte = error(&rule("dscp = 300"));
    assert!(
        byte.ends_with("`dscp`: 300 is out of range: write a whole number from 0 to 63"),
        "{byte}"
    );
    let huge = error(&rule("packet_burst = 99999999999999999999"));
    assert!(
        huge.contains("`packet_burst`: 99999999999999999999 is too large"),
        "{huge}"
    );
    let capacity = error("[capacity]\nrules = -3\n");
    assert!(
        capacity.contains("`rules`: -3 is out of range"),
        "{capacity}"
    );
    // Nothing about i128 or u32: types the user never wrote.
    for text in [negative, byte, huge, capacity] {
        assert!(
            !text.contains("i128") && !text.contains("u32") && !text.contains("u8"),
            "{text}"
        );
    }
}

#[test]
fn max_penalty_defaults_to_a_week_and_is_read_with_units() {
    let config = parse(&rule("action = \"deny\"")).unwrap();
    assert_eq!(
        config.max_penalty,
        std::time::Duration::from_secs(7 * 86_400)
    );
    let config = parse(&format!(
        "[agent]\nmax_penalty = \"12h\"\n{}",
        rule("action = \"deny\"")
    ))
    .unwrap();
    assert_eq!(
        config.max_penalty,
        std::time::Duration::from_secs(12 * 3_600)
    );
}

#[test]
fn a_bad_max_penalty_names_its_field_line_and_what_to_write() {
    for bad in ["\"soon\"", "\"0s\"", "\"30\""] {
        let text = format!(
            "[agent]\n\nmax_penalty = {bad}\n{}",
            rule("action = \"deny\"")
        );
        let err = parse(&text).unwrap_err();
        assert!(
            err.starts_with("test.toml:3: agent.max_penalty") && err.contains("\"7d\""),
            "{bad}: {err}"
        );
    }
}

const FLEET: &str = "[fleet]\nname = \"edge\"\ngateway = \"gw1\"\n";

#[test]
fn a_fleet_section_has_its_defaults_and_a_fleet_rule_needs_it() {
    let fleet_rule =
        rule("action = \"drop\"\nscope = \"shared\"\npackets = \"1k/s\"\nfleet = true");
    let config = parse(&format!("{FLEET}{fleet_rule}")).unwrap();
    let fleet = config.fleet.unwrap();
    assert_eq!(fleet.nodes[0].host, "127.0.0.1");
    assert_eq!(fleet.nodes[0].port, 6379);
    assert!(!fleet.cluster && fleet.tls.is_none());
    assert_eq!(fleet.sync_interval, std::time::Duration::from_millis(250));
    assert_eq!(fleet.gateway, "gw1");
    assert!(config.rules[0].fleet);

    let err = parse(&fleet_rule).unwrap_err();
    assert!(
        err.starts_with("test.toml:7: rule \"r\": `fleet`: fleet = true needs a [fleet] section"),
        "{err}"
    );
    assert!(parse("").unwrap().fleet.is_none());
}

#[test]
fn fleet_section_errors_point_at_their_field() {
    let err = parse(&format!("{FLEET}sync_interval = \"5s\"\n")).unwrap_err();
    assert!(
        err.starts_with(
            "test.toml:4: fleet.sync_interval \"5s\" is not a duration from 100ms to 1s"
        ),
        "{err}"
    );
    let err = parse("[fleet]\nname = \"edge\"\naddress = \"redis://u:secret@h\"\n").unwrap_err();
    assert!(
        err.starts_with("test.toml:3: fleet.address holds credentials"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
    let err = parse("[fleet]\naddress = \"redis://h\"\n").unwrap_err();
    assert!(err.contains("name"), "the fleet's name is required: {err}");
    let err = parse(&format!("{FLEET}password = \"x\"\n")).unwrap_err();
    assert!(err.contains("unknown field `password`"), "{err}");
    // A Redis Cluster: a list of nodes and cluster = true, or a line that
    // says to add it; a wrong type says what to write.
    let cluster = "address = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n";
    let err = parse(&format!("{FLEET}{cluster}")).unwrap_err();
    assert!(
        err.starts_with("test.toml:4: fleet.address lists 2 addresses")
            && err.contains("cluster = true"),
        "{err}"
    );
    let fleet = parse(&format!("{FLEET}{cluster}cluster = true\n"))
        .unwrap()
        .fleet
        .unwrap();
    assert_eq!((fleet.cluster, fleet.nodes.len()), (true, 2));
    let err = parse(&format!("{FLEET}address = 6379\n")).unwrap_err();
    assert!(err.contains("redis://127.0.0.1:6379"), "{err}");
    let err = parse(&format!("{FLEET}ca_file = \"/ca.pem\"\n")).unwrap_err();
    assert!(
        err.starts_with("test.toml:4: fleet.ca_file is set but fleet.address is redis://"),
        "{err}"
    );
}

#[test]
fn the_documented_fleet_section_parses_once_uncommented() {
    let text = include_str!("../../../docs/limiter.example.toml");
    let start = text.find("# [fleet]").unwrap();
    let section: String = text[start..]
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| !l.starts_with('#') && !l.starts_with("A rule") && l.contains(['[', '=']))
        .map(|l| format!("{l}\n"))
        .collect();
    let fleet_rule =
        rule("action = \"drop\"\nscope = \"shared\"\npackets = \"1k/s\"\nfleet = true");
    let config = parse(&format!("{section}{fleet_rule}")).unwrap();
    let fleet = config.fleet.unwrap();
    assert_eq!(fleet.name, "edge");
    assert_eq!(fleet.sync_interval, std::time::Duration::from_millis(250));
    assert_eq!(fleet.username.as_deref(), Some("limiter"));
}
