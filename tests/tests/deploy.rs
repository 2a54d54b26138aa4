//! The Kubernetes manifest (deploy/kubernetes/limiter.yaml): valid against
//! the Kubernetes schema, and running the agent as the systemd unit does
//! (same capabilities, probes on the agent's health endpoints, a config the
//! agent accepts). No cluster here: what a cluster would do with it is not
//! covered. The container image (deploy/container/Containerfile) is not
//! built here: these machines reach no container registry for its base
//! image (docs/testing.md says more).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use limiter_tests::agent::agent_binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_manifest_validates_against_the_kubernetes_schema() {
    let tool = repo().join("target/tools/kubernetes-validate/bin/kubernetes-validate");
    let out = Command::new(&tool)
        .arg("--strict")
        .arg(repo().join("deploy/kubernetes/limiter.yaml"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (`./x setup` installs it)", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for resource in [
        "namespace/limiter",
        "configmap/limiter-config",
        "daemonset/limiter",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource}")),
            "{resource} not validated:\n{text}"
        );
    }
}

#[test]
fn the_daemonset_runs_the_agent_as_the_unit_does() {
    let manifest = read("deploy/kubernetes/limiter.yaml");
    let unit = read("deploy/systemd/limiter.service");

    // The same capabilities as the unit's bounding set.
    let unit_caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("no CapabilityBoundingSet in the unit"))
        .split_whitespace()
        .map(|c| format!("{:?}", c.trim_start_matches("CAP_")))
        .collect();
    let add = format!("add: [{}]", unit_caps.join(", "));
    assert!(manifest.contains(&add), "the DaemonSet does not {add}");
    assert!(manifest.contains("drop: [\"ALL\"]"));

    // Probes on the agent's own endpoints, on its metrics port.
    for probe in ["path: /readyz", "path: /healthz"] {
        assert!(manifest.contains(probe), "no probe with {probe}");
    }
    assert!(manifest.contains("containerPort: 9464"));
    assert!(manifest.contains("prometheus.io/port: \"9464\""));

    // The ConfigMap's config: the agent accepts it, and it listens where
    // the probes and Prometheus look.
    let config: String = manifest
        .lines()
        .skip_while(|l| l.trim() != "limiter.toml: |")
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or("")))
        .collect();
    assert!(
        config.contains("address = \"0.0.0.0:9464\""),
        "the config in the ConfigMap does not listen on :9464:\n{config}"
    );
    let file = std::env::temp_dir().join(format!("limiter-configmap-{}.toml", std::process::id()));
    std::fs::write(&file, &config).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(agent_binary())
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "the ConfigMap's config is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{e}"));

    // The container it runs starts the agent the way the unit does.
    let containerfile = read("deploy/container/Containerfile");
    assert!(containerfile.contains("ENTRYPOINT [\"/usr/bin/limiter-agent\"]"));
    assert!(manifest.contains("args: [\"run\", \"--config\", \"/etc/limiter/limiter.toml\"]"));
    assert!(
        unit.contains("ExecStart=/usr/bin/limiter-agent run --config /etc/limiter/limiter.toml")
    );
}
