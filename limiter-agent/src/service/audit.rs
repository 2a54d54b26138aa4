//! The audit trail: one log line at info for every change to the rules in
//! force (and every refused one), saying who asked, what changed (the rule
//! before and after, as JSON) and how it ended.

use std::fmt;

use crate::config::RuleConfig;

/// Who asked for a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requester {
    /// A client of the control socket, from its credentials (SO_PEERCRED).
    Peer {
        uid: u32,
        pid: Option<i32>,
        /// The client's command name (`/proc/<pid>/comm`), if still known.
        command: Option<String>,
    },
    /// A SIGHUP to the agent.
    Sighup,
    /// The agent itself (penalty expiry, repairs).
    Agent,
    /// A change made once for the whole fleet, with its version: `who`
    /// asked through `gateway` (as that gateway's audit line says).
    Fleet {
        version: u64,
        who: String,
        gateway: String,
    },
}

impl Requester {
    pub fn peer(uid: u32, pid: Option<i32>) -> Self {
        let command = pid.and_then(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim().to_owned())
        });
        Self::Peer { uid, pid, command }
    }
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Peer { uid, pid, command } => {
                write!(f, "uid {uid}")?;
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                match command {
                    Some(command) => write!(f, " ({command})"),
                    None => Ok(()),
                }
            }
            Self::Sighup => f.write_str("SIGHUP"),
            Self::Agent => f.write_str("the agent itself"),
            Self::Fleet {
                version,
                who,
                gateway,
            } => write!(f, "fleet change v{version} by {who} via {gateway}"),
        }
    }
}

/// A rule as the audit line shows it: its JSON, or `none`.
pub fn rule_text(rule: Option<&RuleConfig>) -> String {
    rule.and_then(|r| serde_json::to_string(r).ok())
        .unwrap_or_else(|| "none".into())
}

/// Logs one change: `action` on `subject` by `who`, the rule before and
/// after, and the outcome (`Ok(generation)` or the refusal).
pub fn record(
    who: &Requester,
    action: &str,
    subject: &str,
    before: Option<&RuleConfig>,
    after: Option<&RuleConfig>,
    outcome: Result<u64, &dyn fmt::Display>,
) {
    let before = rule_text(before);
    let after = rule_text(after);
    match outcome {
        Ok(generation) => tracing::info!(
            target: "audit",
            who = %who,
            action,
            what = subject,
            before,
            after,
            generation,
            "change applied"
        ),
        Err(reason) => tracing::info!(
            target: "audit",
            who = %who,
            action,
            what = subject,
            before,
            after,
            reason = %reason,
            "change refused"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requester_reads_as_who_asked() {
        let peer = Requester::Peer {
            uid: 0,
            pid: Some(42),
            command: Some("limiter-agent".into()),
        };
        assert_eq!(peer.to_string(), "uid 0 pid 42 (limiter-agent)");
        let unknown = Requester::Peer {
            uid: 1000,
            pid: None,
            command: None,
        };
        assert_eq!(unknown.to_string(), "uid 1000");
        assert_eq!(Requester::Sighup.to_string(), "SIGHUP");
        assert_eq!(Requester::Agent.to_string(), "the agent itself");
        let fleet = Requester::Fleet {
            version: 7,
            who: "uid 0".into(),
            gateway: "gw1".into(),
        };
        assert_eq!(fleet.to_string(), "fleet change v7 by uid 0 via gw1");
    }

    #[test]
    fn an_absent_rule_reads_as_none() {
        assert_eq!(rule_text(None), "none");
    }
}
