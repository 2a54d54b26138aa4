//! Health for supervisors and probes, on the metrics listener:
//! `/healthz` (the process serves) and `/readyz` (it enforces what its
//! configuration asks for).

use axum::{extract::State, http::StatusCode, response::IntoResponse};
use limiter_common::map_names;

use crate::{attach::Attached, shared::Shared};

/// Why the agent is not ready, one line each; empty when it is.
///
/// Ready means: every configured interface has its programs attached (none
/// is gone), every map is pinned (so enforcement outlives a restart), and
/// the kernel holds this agent's rule set. Supervision repairs the last two
/// within a second or so; readiness says so meanwhile.
pub fn not_ready(
    interfaces: &[Attached],
    maps_dir: Option<&std::path::Path>,
    rules_in_kernel: Result<bool, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for a in interfaces.iter().filter(|a| a.gone) {
        let netns = a
            .netns
            .as_deref()
            .map(|ns| format!(" in netns {ns}"))
            .unwrap_or_default();
        problems.push(format!(
            "interface {}{netns} is gone: nothing is enforced on it until it comes back",
            a.interface
        ));
    }
    if let Some(dir) = maps_dir {
        for name in map_names::ALL {
            if !dir.join(name).exists() {
                problems.push(format!(
                    "map {name} is not pinned under {}: being pinned again",
                    dir.display()
                ));
            }
        }
    }
    match rules_in_kernel {
        Ok(true) => {}
        Ok(false) => problems.push(
            "the kernel's rule set was changed by something other than this agent: \
             being written back"
                .into(),
        ),
        Err(e) => problems.push(format!("the kernel's rule set cannot be read: {e}")),
    }
    problems
}

/// `GET /healthz`: the process is up and serving.
pub async fn healthz() -> impl IntoResponse {
    "ok\n"
}

/// `GET /readyz`: 200 when ready, else 503 with the reasons.
pub async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    let problems = match shared.service.lock() {
        Ok(service) => not_ready(
            &service.attached(),
            service
                .attachments
                .as_ref()
                .map(|a| a.pins().maps_dir())
                .as_deref(),
            service.rules_in_kernel().map_err(|e| e.to_string()),
        ),
        Err(_) => vec!["the agent's state is poisoned by a crashed task".into()],
    };
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        let mut body = String::from("not ready:\n");
        for p in problems {
            body.push_str(&format!("- {p}\n"));
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached(name: &str, netns: Option<&str>, gone: bool) -> Attached {
        Attached {
            interface: name.into(),
            netns: netns.map(Into::into),
            xdp_mode: Some("native".into()),
            tc: false,
            tc_refused: None,
            adopted: false,
            gone,
        }
    }

    #[test]
    fn ready_only_with_every_interface_map_and_rule_in_place() {
        let dir = std::env::temp_dir().join(format!("limiter-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in map_names::ALL {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let up = [
            attached("veth0", None, false),
            attached("veth1", Some("edge"), false),
        ];
        assert!(not_ready(&up, Some(&dir), Ok(true)).is_empty());
        // No interface configured and no pins yet: nothing to wait for.
        assert!(not_ready(&[], None, Ok(true)).is_empty());

        let gone = [
            attached("veth0", None, false),
            attached("veth1", Some("edge"), true),
        ];
        assert_eq!(
            not_ready(&gone, Some(&dir), Ok(true)),
            [
                "interface veth1 in netns edge is gone: nothing is enforced on it until it comes back"
            ]
        );
        std::fs::remove_file(dir.join(map_names::RULES)).unwrap();
        let problems = not_ready(&up, Some(&dir), Ok(false));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with(&format!("map {} is not pinned", map_names::RULES)));
        assert!(problems[1].contains("changed by something other than this agent"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
