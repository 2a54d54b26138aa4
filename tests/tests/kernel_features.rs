//! What the agent does with the running kernel's features. TC marking needs
//! TCX links (Linux 6.6): on such a kernel it attaches; on an older one that
//! feature alone is refused, naming the version it needs, and XDP keeps
//! enforcing. Runs on the host and, through `./x vm-test`, on every kernel
//! of the matrix (6.1 takes the refusal branch).

use aya::util::KernelVersion;
use limiter_tests::{
    agent::AgentEnv,
    scenario::{RULES, blast, sources},
};

#[test]
fn tc_marking_attaches_with_tcx_and_is_refused_alone_without() {
    let kernel = KernelVersion::current().unwrap_or_else(|e| panic!("kernel version: {e}"));
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    env.tc = true;
    env.write_config(RULES).unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    let status = env.cli_json(&["status"]);
    let interface = &status["interfaces"][0];
    if kernel >= KernelVersion::new(6, 6, 0) {
        assert_eq!(interface["tc"], true, "{status}");
        assert!(interface["tc_refused"].is_null(), "{status}");
    } else {
        assert_eq!(interface["tc"], false, "{status}");
        let refused = interface["tc_refused"].as_str().unwrap_or_default();
        assert!(refused.contains("6.6.0"), "on {kernel}: {status}");
        assert!(env.logs().contains("needs Linux 6.6.0"), "{}", env.logs());
    }
    assert_eq!(interface["xdp_mode"], "native", "{status}");
    // XDP enforces either way: no source beyond its burst plus one second
    // of budget (40/s, burst 10), and every source gets through.
    let got = blast(&env, 200, 1.0);
    for (addr, _) in sources() {
        let n = got.get(&addr).copied().unwrap_or(0);
        assert!(
            (1..=10 + 40 + 8).contains(&n),
            "source {addr:?} got {n}: {got:?}"
        );
    }
}
