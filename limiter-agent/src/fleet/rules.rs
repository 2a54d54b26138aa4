//! Budget changes made once for the whole fleet (`rules change --fleet`,
//! `PATCH /v1/fleet/rules/{name}`; docs/fleet.md, "Fleet rule changes").
//!
//! Redis keeps, in one hash per fleet ([`Keys::rules`]), the fleet's
//! counter `version` and, per rule, the version of its last fleet change
//! (`v:<rule>`) and what that change set (`r:<rule>`: the rule's whole
//! budget as JSON, who asked, through which gateway, when). A change takes
//! the next version in one Lua script, which also publishes the version on
//! the fleet's channel. Every agent applies a stored change whose version
//! is newer than the one it applied for that rule: at once when notified,
//! and by a check of the counter every sync interval, so a lost message
//! heals within an interval. What an agent applied is kept in its state
//! file; an agent that finds Redis behind it (flushed, restarted empty)
//! offers its own changes back, the newer version winning per rule.
//!
//! The pure part (what a change may set, which stored changes to apply or
//! offer) is unit-tested here; the task and the Redis calls are below it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::exchange::Keys;
use crate::{
    config::{
        AggregateFields, FieldError, FleetConfig, Quantity, RuleConfig, RuleFields, RulePatch,
    },
    service::{Requester, Service, ServiceError},
};

/// How long one exchange with Redis may take (connecting, a script, a
/// read): rule changes are rare and not on the sync's clock.
const TIMEOUT: Duration = Duration::from_secs(1);
/// The fields of a rule a fleet change sets: its budgets, as the API and
/// the file name them. Every other field is each gateway's own.
pub const BUDGET_FIELDS: [&str; 7] = [
    "packets",
    "packet_burst",
    "bytes",
    "byte_burst",
    "new_connections",
    "connection_burst",
    "aggregate",
];

/// A rule's budgets: what a fleet change sets on every gateway, as a
/// whole (a budget it does not give is removed).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetBudget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_burst: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_burst: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_burst: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateFields>,
}

impl FleetBudget {
    /// The budgets of `rule`.
    pub fn of(rule: &RuleConfig) -> Self {
        let f = rule.fields();
        Self {
            packets: f.packets.clone(),
            packet_burst: f.packet_burst.clone(),
            bytes: f.bytes.clone(),
            byte_burst: f.byte_burst.clone(),
            new_connections: f.new_connections.clone(),
            connection_burst: f.connection_burst.clone(),
            aggregate: f.aggregate.clone(),
        }
    }

    /// `rule` with these budgets instead of its own; its other fields kept.
    pub fn apply_to(&self, rule: &RuleConfig) -> Result<RuleConfig, FieldError> {
        let mut fields = RuleFields::from(rule.clone());
        fields.packets = self.packets.clone();
        fields.packet_burst = self.packet_burst.clone();
        fields.bytes = self.bytes.clone();
        fields.byte_burst = self.byte_burst.clone();
        fields.new_connections = self.new_connections.clone();
        fields.connection_burst = self.connection_burst.clone();
        fields.aggregate = self.aggregate.clone();
        RuleConfig::try_from(fields)
    }
}

/// The fields `patch` gives that a fleet change cannot set (not budgets),
/// as the API names them.
pub fn not_budget_fields(patch: &RulePatch) -> Vec<String> {
    let Ok(serde_json::Value::Object(given)) = serde_json::to_value(patch) else {
        return Vec::new();
    };
    given
        .keys()
        .filter(|k| !BUDGET_FIELDS.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// One fleet change as stored in Redis (`r:<rule>`), without its version
/// (`v:<rule>`, which the script gives).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct FleetRecord {
    /// The rule's budgets after the change, whole.
    pub budget: FleetBudget,
    /// Who asked, as the audit line of the gateway it was made on says.
    pub who: String,
    /// The gateway it was made through.
    pub gateway: String,
    /// Unix seconds.
    pub at: u64,
}

/// A fleet change this agent applied: kept in the state file by rule name.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetApplied {
    pub version: u64,
    pub record: FleetRecord,
}

/// A stored change of rule `rule`, read from Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetChange {
    pub rule: String,
    pub version: u64,
    pub record: FleetRecord,
}

/// A fleet's rules hash as read (`HGETALL`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// The fleet's counter: the highest version given out.
    pub version: u64,
    /// By rule: its version and its record, or why the record cannot be
    /// read (written by a newer agent, or by hand).
    pub rules: BTreeMap<String, (u64, Result<FleetRecord, String>)>,
}

/// Reads a rules hash. Fields that are not ours are skipped; a rule's
/// record without a readable version is skipped too (a change half
/// written by hand).
pub fn parse_stored(hash: &HashMap<String, String>) -> Stored {
    let mut stored = Stored {
        version: hash
            .get("version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ..Stored::default()
    };
    for (field, value) in hash {
        let Some(rule) = field.strip_prefix("r:") else {
            continue;
        };
        let Some(version) = hash
            .get(&format!("v:{rule}"))
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        let record = serde_json::from_str::<FleetRecord>(value).map_err(|e| e.to_string());
        stored.rules.insert(rule.to_owned(), (version, record));
    }
    stored
}

/// What an agent does after reading the stored changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconcile {
    /// Changes newer than the one applied here, oldest first.
    pub apply: Vec<FleetChange>,
    /// Newer changes this agent cannot read: (rule, version, why).
    pub unreadable: Vec<(String, u64, String)>,
    /// Changes applied here that Redis has lost or holds older (it was
    /// flushed): offered back, the newer version winning per rule.
    pub offer: Vec<(String, FleetApplied)>,
}

/// Compares the stored changes with those `applied` here. A version in
/// `refused` (refused here already, with a log line) is not tried again.
pub fn reconcile(
    stored: &Stored,
    applied: &BTreeMap<String, FleetApplied>,
    refused: &BTreeMap<String, u64>,
) -> Reconcile {
    let mut out = Reconcile::default();
    for (rule, (version, record)) in &stored.rules {
        let done = applied.get(rule).map_or(0, |a| a.version);
        let skipped = refused.get(rule).copied().unwrap_or(0);
        if *version <= done || *version <= skipped {
            continue;
        }
        match record {
            Ok(record) => out.apply.push(FleetChange {
                rule: rule.clone(),
                version: *version,
                record: record.clone(),
            }),
            Err(why) => out.unreadable.push((rule.clone(), *version, why.clone())),
        }
    }
    out.apply.sort_by_key(|c| c.version);
    for (rule, a) in applied {
        let stored_version = stored.rules.get(rule).map_or(0, |(v, _)| *v);
        if a.version > stored_version {
            out.offer.push((rule.clone(), a.clone()));
        }
    }
    out
}

/// The highest version applied here (0: none).
pub fn highest(applied: &BTreeMap<String, FleetApplied>) -> u64 {
    applied.values().map(|a| a.version).max().unwrap_or(0)
}

/// Why a fleet change is refused before anything is written anywhere.
#[derive(Debug, thiserror::Error)]
pub enum FleetRuleError {
    #[error(
        "this agent has no [fleet] section, so there is no fleet to change rules for: \
         change the rule without --fleet (here only), or add [fleet] to the config and restart"
    )]
    NoFleet,
    #[error(
        "nothing to change: give at least one budget (packets, bytes, new_connections, their bursts, or aggregate)"
    )]
    Empty,
    #[error(
        "a fleet change sets only budgets ({}); `{}` is each gateway's own: \
         change it without --fleet on each gateway",
        BUDGET_FIELDS.join(", "),
        .0.join("`, `")
    )]
    NotBudget(Vec<String>),
    #[error(
        "rule {0:?} is not fleet-wide here (fleet = true), so its budget is not the fleet's: \
         make it fleet-wide on every gateway first (`fleet = true` in the file, or \
         `rules change {0} --fleet-wide true`), or change it without --fleet"
    )]
    NotFleetWide(String),
    #[error(
        "a fleet change must keep rule {0:?} fleet-wide (fleet = true): to make it local, change \
         it without --fleet on each gateway"
    )]
    LeavesFleet(String),
    #[error(
        "rule {0:?} is not in force on this gateway: the fleet's gateways must have the same fleet rules"
    )]
    NotHere(String),
    #[error(
        "the fleet's Redis at {address} cannot be reached ({reason}): nothing was changed on any \
         gateway. Retry once it is back, or change the rule without --fleet (this gateway only)"
    )]
    Unreachable { address: String, reason: String },
}

/// The atomic change: the next version (above every version the caller
/// applied, so a flushed Redis cannot hand out a version already used),
/// the rule's version and record, then a notification.
/// KEYS[1] the rules hash; ARGV: channel, rule, record JSON, floor.
const CHANGE: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
local floor = tonumber(ARGV[4]) or 0
if floor > v then v = floor end
v = v + 1
redis.call('HSET', KEYS[1], 'version', v, 'v:' .. ARGV[2], v, 'r:' .. ARGV[2], ARGV[3])
redis.call('PUBLISH', ARGV[1], v)
return v
";

/// Changes an agent offers back: each stored where Redis has none of its
/// rule or an older one; the counter raised to the highest. KEYS[1] the
/// rules hash; ARGV: channel, then (rule, version, record JSON) triples.
const OFFER: &str = r"
local top = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
local stored = 0
for i = 2, #ARGV, 3 do
  local v = tonumber(ARGV[i + 1])
  local have = tonumber(redis.call('HGET', KEYS[1], 'v:' .. ARGV[i]) or '0') or 0
  if v > have then
    redis.call('HSET', KEYS[1], 'v:' .. ARGV[i], v, 'r:' .. ARGV[i], ARGV[i + 2])
    stored = stored + 1
  end
  if v > top then top = v end
end
redis.call('HSET', KEYS[1], 'version', top)
if stored > 0 then redis.call('PUBLISH', ARGV[1], top) end
return stored
";

/// Stores a change of `rule`; its version.
async fn store<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    rule: &str,
    record: &str,
    floor: u64,
) -> redis::RedisResult<u64> {
    redis::cmd("EVAL")
        .arg(CHANGE)
        .arg(1)
        .arg(keys.rules())
        .arg(keys.rules_channel())
        .arg(rule)
        .arg(record)
        .arg(floor)
        .query_async(conn)
        .await
}

/// Offers changes applied here back; how many Redis took.
async fn offer<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    changes: &[(String, FleetApplied)],
) -> redis::RedisResult<u64> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(OFFER)
        .arg(1)
        .arg(keys.rules())
        .arg(keys.rules_channel());
    for (rule, applied) in changes {
        let record = serde_json::to_string(&applied.record).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "encoding", e.to_string()))
        })?;
        cmd.arg(rule).arg(applied.version).arg(record);
    }
    cmd.query_async(conn).await
}

/// The fleet's counter (0: none yet).
async fn read_version<C: ConnectionLike>(conn: &mut C, keys: &Keys) -> redis::RedisResult<u64> {
    let v: Option<u64> = redis::cmd("HGET")
        .arg(keys.rules())
        .arg("version")
        .query_async(conn)
        .await?;
    Ok(v.unwrap_or(0))
}

async fn read_all<C: ConnectionLike>(conn: &mut C, keys: &Keys) -> redis::RedisResult<Stored> {
    let hash: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.rules())
        .query_async(conn)
        .await?;
    Ok(parse_stored(&hash))
}

/// A fleet change this agent refused: logged once, shown in `status`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Refusal {
    pub rule: String,
    pub version: u64,
    pub reason: String,
}

/// What the rules task reports, for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct RulesStatus {
    /// Subscribed to the fleet's channel now.
    pub listening: bool,
    /// The fleet's counter as last read.
    pub stored_version: Option<u64>,
    pub last_error: Option<String>,
    pub applied: u64,
    pub refused_total: u64,
    /// Change notifications received.
    pub notifications: u64,
    /// The last refusal of each rule.
    pub refused: BTreeMap<String, Refusal>,
}

/// One applied fleet change as `status` shows it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct FleetRuleView {
    pub rule: String,
    pub version: u64,
    pub who: String,
    pub gateway: String,
    pub at: u64,
}

/// The fleet rules part of `GET /v1/status`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct FleetRulesView {
    /// The highest fleet change version applied here (0: none).
    pub version: u64,
    /// The fleet's counter as last read from Redis (absent: not yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_version: Option<u64>,
    /// Whether change notifications arrive now (without, the check every
    /// sync interval still applies changes).
    pub listening: bool,
    pub changes: Vec<FleetRuleView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refusal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Fleet changes applied and refused here since the agent started.
    pub changes_applied: u64,
    pub changes_refused: u64,
    /// Change notifications received since the agent started.
    pub notifications: u64,
}

/// The fleet's rule changes on this agent: where they are stored, and
/// what the task last saw.
pub struct FleetRules {
    redis: super::Connector,
    /// `fleet.address`, for messages (no credentials: refused in it).
    address: String,
    keys: Keys,
    gateway: String,
    interval: Duration,
    pub status: Mutex<RulesStatus>,
}

impl FleetRules {
    /// `redis` is the fleet's Redis, as the sync task reaches it.
    pub fn new(config: &FleetConfig, redis: &super::Connector) -> Self {
        Self {
            redis: redis.with_timeout(TIMEOUT),
            address: config.address.clone(),
            keys: Keys::new(&config.name),
            gateway: config.gateway.clone(),
            interval: config.sync_interval,
            status: Mutex::new(RulesStatus::default()),
        }
    }

    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// The view for `status`, with the changes applied here.
    pub fn view(&self, applied: &BTreeMap<String, FleetApplied>) -> FleetRulesView {
        let status = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        FleetRulesView {
            version: highest(applied),
            stored_version: status.stored_version,
            listening: status.listening,
            changes: applied
                .iter()
                .map(|(rule, a)| FleetRuleView {
                    rule: rule.clone(),
                    version: a.version,
                    who: a.record.who.clone(),
                    gateway: a.record.gateway.clone(),
                    at: a.record.at,
                })
                .collect(),
            refused: status.refused.values().cloned().collect(),
            last_error: status.last_error,
            changes_applied: status.applied,
            changes_refused: status.refused_total,
            notifications: status.notifications,
        }
    }

    async fn connect(&self) -> Result<super::connection::Connection, String> {
        match tokio::time::timeout(TIMEOUT, self.redis.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {TIMEOUT:?}")),
        }
    }

    /// Stores a change; its version. Nothing is stored on an error.
    async fn store(
        &self,
        rule: &str,
        record: &FleetRecord,
        floor: u64,
    ) -> Result<u64, FleetRuleError> {
        let unreachable = |reason: String| FleetRuleError::Unreachable {
            address: self.address.clone(),
            reason,
        };
        let json = serde_json::to_string(record).map_err(|e| unreachable(e.to_string()))?;
        let mut conn = self.connect().await.map_err(unreachable)?;
        match tokio::time::timeout(TIMEOUT, store(&mut conn, &self.keys, rule, &json, floor)).await
        {
            Ok(Ok(version)) => Ok(version),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable(format!("no answer within {TIMEOUT:?}"))),
        }
    }

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.last_error = error;
        }
    }
}

/// How a fleet change ended on this gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now, in generation `generation`.
    Applied { generation: u64 },
    /// A change of the same rule with this version or a newer one was
    /// applied here already.
    Superseded { by: u64 },
}

/// `PATCH /v1/fleet/rules/{name}`: checks the change here, stores it in
/// Redis (the next version), then applies it here through the same path
/// as a change from another gateway. The answer's message says which
/// version and what happened here.
pub async fn change(
    service: &Arc<Mutex<Service>>,
    name: &str,
    patch: RulePatch,
    who: &Requester,
) -> Result<(String, u64), ServiceError> {
    let n = name.to_owned();
    let checked = blocking(service, move |svc| svc.fleet_change_budget(&n, &patch))
        .await
        .ok_or(ServiceError::Poisoned)??;
    let (rules, budget, floor) = checked;
    let record = FleetRecord {
        budget,
        who: who.to_string(),
        gateway: rules.gateway.clone(),
        at: crate::service::now_unix(),
    };
    let version = match rules.store(name, &record, floor).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                target: "audit",
                who = %who,
                action = "fleet change",
                what = name,
                reason = %e,
                "change refused"
            );
            return Err(e.into());
        }
    };
    let change = FleetChange {
        rule: name.to_owned(),
        version,
        record,
    };
    let applied = blocking(service, move |svc| {
        let outcome = svc.apply_fleet_change(&change);
        (outcome, svc.config_generation)
    })
    .await
    .ok_or(ServiceError::Poisoned)?;
    match applied {
        (Ok(Outcome::Applied { generation }), _) => {
            count(&rules, true);
            Ok((
                format!(
                    "rule {name:?} changed for the whole fleet: version {version}, in force here; \
                     every gateway of the fleet applies it within a second"
                ),
                generation,
            ))
        }
        // This gateway's own task applied it first, on its notification.
        (Ok(Outcome::Superseded { by }), generation) if by == version => Ok((
            format!(
                "rule {name:?} changed for the whole fleet: version {version}, in force here; \
                 every gateway of the fleet applies it within a second"
            ),
            generation,
        )),
        (Ok(Outcome::Superseded { by }), generation) => Ok((
            format!(
                "rule {name:?} changed for the whole fleet as version {version}, but version {by} \
                 of a concurrent change is newer and is the one in force (the highest version wins)"
            ),
            generation,
        )),
        (Err(e), _) => {
            count(&rules, false);
            Err(ServiceError::FleetStoredNotApplied {
                version,
                reason: e.to_string(),
            })
        }
    }
}

fn count(rules: &FleetRules, applied: bool) {
    if let Ok(mut s) = rules.status.lock() {
        if applied {
            s.applied += 1;
        } else {
            s.refused_total += 1;
        }
    }
}

/// Applies the stored changes newer than those applied here, and offers
/// back what Redis lost. `Err` only for Redis errors.
async fn reconcile_once<C: ConnectionLike>(
    rules: &FleetRules,
    service: &Arc<Mutex<Service>>,
    conn: &mut C,
) -> Result<u64, String> {
    let stored = match tokio::time::timeout(TIMEOUT, read_all(conn, &rules.keys)).await {
        Ok(Ok(stored)) => stored,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer within {TIMEOUT:?}")),
    };
    let refused: BTreeMap<String, u64> = rules
        .status
        .lock()
        .map(|s| {
            s.refused
                .iter()
                .map(|(k, r)| (k.clone(), r.version))
                .collect()
        })
        .unwrap_or_default();
    let Some(applied) = blocking(service, |svc| svc.fleet_applied().clone()).await else {
        return Err("the agent is stopping".into());
    };
    let plan = reconcile(&stored, &applied, &refused);
    for (rule, version, why) in plan.unreadable {
        refuse(
            rules,
            &rule,
            version,
            format!("its record cannot be read: {why}"),
        );
    }
    for change in plan.apply {
        let c = change.clone();
        let Some(outcome) = blocking(service, move |svc| svc.apply_fleet_change(&c)).await else {
            return Err("the agent is stopping".into());
        };
        match outcome {
            Ok(Outcome::Applied { .. }) => count(rules, true),
            Ok(Outcome::Superseded { .. }) => {}
            Err(e) => refuse(rules, &change.rule, change.version, e.to_string()),
        }
    }
    let mut version = stored.version;
    if !plan.offer.is_empty() {
        let names: Vec<String> = plan
            .offer
            .iter()
            .map(|(r, a)| format!("{r} v{}", a.version))
            .collect();
        match tokio::time::timeout(TIMEOUT, offer(conn, &rules.keys, &plan.offer)).await {
            Ok(Ok(taken)) => {
                tracing::info!(
                    changes = names.join(", "),
                    taken,
                    "fleet rules: Redis had lost fleet changes this gateway applied; offered them back"
                );
                version = version.max(highest(&applied));
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no answer within {TIMEOUT:?}")),
        }
    }
    Ok(version)
}

/// Logs a refused fleet change once and keeps it for `status`.
fn refuse(rules: &FleetRules, rule: &str, version: u64, reason: String) {
    tracing::warn!(
        rule,
        version,
        reason = %reason,
        "fleet rules: a fleet change was refused on this gateway; the rule in force is unchanged"
    );
    if let Ok(mut s) = rules.status.lock() {
        s.refused_total += 1;
        s.refused.insert(
            rule.to_owned(),
            Refusal {
                rule: rule.to_owned(),
                version,
                reason,
            },
        );
    }
}

/// Subscribes to the fleet's channel on a connection of its own.
async fn subscribe(rules: &FleetRules) -> Result<redis::aio::PubSubStream, String> {
    let connect = async {
        let mut pubsub = rules.redis.pubsub().await?;
        pubsub.subscribe(rules.keys.rules_channel()).await?;
        Ok::<_, redis::RedisError>(pubsub.into_on_message())
    };
    match tokio::time::timeout(TIMEOUT, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no subscription within {TIMEOUT:?}")),
    }
}

async fn next_message(stream: &mut Option<redis::aio::PubSubStream>) -> Option<redis::Msg> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Applies the fleet's rule changes until `stop`: on each notification,
/// and whenever the counter read every sync interval moved (or fell
/// behind what this gateway applied: Redis lost data).
pub async fn run(
    rules: Arc<FleetRules>,
    service: Arc<Mutex<Service>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(rules.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = None;
    let mut messages: Option<redis::aio::PubSubStream> = None;
    // The counter last reconciled against (`None`: reconcile at once).
    let mut reconciled: Option<u64> = None;
    let mut backoff = super::BACKOFF_FIRST;
    let mut next_attempt = Instant::now();
    loop {
        let notified = tokio::select! {
            _ = crate::daemon::stopped(&mut stop) => return,
            _ = tick.tick() => false,
            message = next_message(&mut messages) => match message {
                Some(_) => {
                    if let Ok(mut s) = rules.status.lock() {
                        s.notifications += 1;
                    }
                    true
                }
                None => {
                    messages = None;
                    if let Ok(mut s) = rules.status.lock() {
                        s.listening = false;
                    }
                    false
                }
            },
        };
        if (conn.is_none() || messages.is_none()) && Instant::now() >= next_attempt {
            let connected = async {
                let stream = match messages.take() {
                    Some(s) => s,
                    None => subscribe(&rules).await?,
                };
                messages = Some(stream);
                if conn.is_none() {
                    conn = Some(rules.connect().await?);
                }
                Ok::<(), String>(())
            }
            .await;
            match connected {
                Ok(()) => {
                    backoff = super::BACKOFF_FIRST;
                    // Anything may have changed while not listening.
                    reconciled = None;
                    if let Ok(mut s) = rules.status.lock() {
                        s.listening = true;
                    }
                }
                Err(e) => {
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(super::BACKOFF_MAX);
                    rules.set_error(Some(e));
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let result = async {
            let counter = if notified || reconciled.is_none() {
                None
            } else {
                match tokio::time::timeout(TIMEOUT, read_version(c, &rules.keys)).await {
                    Ok(Ok(v)) => Some(v),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err(format!("no answer within {TIMEOUT:?}")),
                }
            };
            let behind = match counter {
                // Below what was applied here: Redis lost changes.
                Some(v) => {
                    let applied = blocking(&service, |svc| highest(svc.fleet_applied()))
                        .await
                        .unwrap_or(0);
                    v < applied
                }
                None => false,
            };
            if counter.is_some() && counter == reconciled && !behind {
                return Ok(reconciled);
            }
            reconcile_once(&rules, &service, c).await.map(Some)
        }
        .await;
        match result {
            Ok(version) => {
                reconciled = version;
                if let Ok(mut s) = rules.status.lock() {
                    s.stored_version = version;
                    s.last_error = None;
                }
            }
            Err(e) => {
                tracing::warn!("fleet rules: {e}; retrying (changes stored meanwhile apply then)");
                conn = None;
                next_attempt = Instant::now() + backoff;
                rules.set_error(Some(e));
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    service: &Arc<Mutex<Service>>,
    f: impl FnOnce(&mut Service) -> T + Send + 'static,
) -> Option<T> {
    super::blocking(service, f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(packets: &str) -> FleetRecord {
        FleetRecord {
            budget: FleetBudget {
                packets: Some(packets.into()),
                ..FleetBudget::default()
            },
            who: "uid 0".into(),
            gateway: "gw1".into(),
            at: 1,
        }
    }

    fn applied(entries: &[(&str, u64, &str)]) -> BTreeMap<String, FleetApplied> {
        entries
            .iter()
            .map(|(rule, version, packets)| {
                (
                    (*rule).to_owned(),
                    FleetApplied {
                        version: *version,
                        record: record(packets),
                    },
                )
            })
            .collect()
    }

    fn hash(fields: &[(&str, String)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn json(packets: &str) -> String {
        serde_json::to_string(&record(packets)).unwrap()
    }

    #[test]
    fn a_stored_hash_reads_as_versions_and_records() {
        let stored = parse_stored(&hash(&[
            ("version", "7".into()),
            ("v:api", "7".into()),
            ("r:api", json("300/s")),
            ("v:web", "3".into()),
            ("r:web", "{not json".into()),
            // A record without a version, a version without a record, and
            // fields that are not ours: skipped.
            ("r:half", json("1/s")),
            ("v:lonely", "4".into()),
            ("other", "x".into()),
        ]));
        assert_eq!(stored.version, 7);
        assert_eq!(stored.rules.len(), 2, "{stored:?}");
        assert_eq!(stored.rules["api"], (7, Ok(record("300/s"))));
        assert!(stored.rules["web"].1.is_err());
        assert_eq!(parse_stored(&HashMap::new()), Stored::default());
    }

    #[test]
    fn only_changes_newer_than_the_one_applied_are_applied_oldest_first() {
        let stored = parse_stored(&hash(&[
            ("version", "9".into()),
            ("v:api", "9".into()),
            ("r:api", json("300/s")),
            ("v:web", "4".into()),
            ("r:web", json("50/s")),
            ("v:db", "6".into()),
            ("r:db", json("5/s")),
        ]));
        let here = applied(&[("api", 5, "200/s"), ("web", 4, "50/s")]);
        let plan = reconcile(&stored, &here, &BTreeMap::new());
        let versions: Vec<(&str, u64)> = plan
            .apply
            .iter()
            .map(|c| (c.rule.as_str(), c.version))
            .collect();
        assert_eq!(versions, [("db", 6), ("api", 9)]);
        assert!(plan.offer.is_empty());
        // Applied already (same version): nothing to do; an older stored
        // version never replaces a newer applied one.
        let newer_here = applied(&[("api", 9, "300/s"), ("web", 4, "50/s"), ("db", 8, "1/s")]);
        let plan = reconcile(&stored, &newer_here, &BTreeMap::new());
        assert!(plan.apply.is_empty(), "{plan:?}");
        assert_eq!(plan.offer.len(), 1, "db v8 is newer here: offered back");
        assert_eq!(plan.offer[0].0, "db");
    }

    #[test]
    fn a_refused_version_is_not_tried_again_but_a_newer_one_is() {
        let stored = parse_stored(&hash(&[("v:api", "5".into()), ("r:api", json("1/s"))]));
        let refused: BTreeMap<String, u64> = [("api".to_owned(), 5)].into();
        assert!(
            reconcile(&stored, &BTreeMap::new(), &refused)
                .apply
                .is_empty()
        );
        let refused: BTreeMap<String, u64> = [("api".to_owned(), 4)].into();
        assert_eq!(
            reconcile(&stored, &BTreeMap::new(), &refused).apply.len(),
            1
        );
    }

    #[test]
    fn a_flushed_redis_gets_back_what_each_gateway_applied() {
        let here = applied(&[("api", 7, "300/s"), ("web", 2, "9/s")]);
        let plan = reconcile(&Stored::default(), &here, &BTreeMap::new());
        assert!(plan.apply.is_empty());
        let offered: Vec<(&str, u64)> = plan
            .offer
            .iter()
            .map(|(r, a)| (r.as_str(), a.version))
            .collect();
        assert_eq!(offered, [("api", 7), ("web", 2)]);
        assert_eq!(highest(&here), 7);
        assert_eq!(highest(&BTreeMap::new()), 0);
    }

    #[test]
    fn an_unreadable_newer_record_is_reported_not_applied() {
        let stored = parse_stored(&hash(&[
            ("v:api", "3".into()),
            (
                "r:api",
                r#"{"budget":{"packets":"1/s","colour":"red"},"who":"x","gateway":"g","at":1}"#
                    .into(),
            ),
        ]));
        let plan = reconcile(&stored, &BTreeMap::new(), &BTreeMap::new());
        assert!(plan.apply.is_empty());
        assert_eq!(plan.unreadable.len(), 1);
        assert!(
            plan.unreadable[0].2.contains("colour"),
            "{:?}",
            plan.unreadable
        );
    }

    #[test]
    fn a_budget_replaces_the_rules_budgets_whole_and_keeps_the_rest() {
        let rule: RuleConfig = serde_json::from_str(
            r#"{"name":"api","action":"drop","prefixes":["198.18.0.0/15"],"scope":"shared",
                "packets":"200/s","packet_burst":20,"bytes":"1Mbit/s","fleet":true}"#,
        )
        .unwrap();
        assert_eq!(
            FleetBudget::of(&rule),
            FleetBudget {
                packets: Some("200/s".into()),
                packet_burst: Some(Quantity::Number(20)),
                bytes: Some("1Mbit/s".into()),
                ..FleetBudget::default()
            }
        );
        let budget = FleetBudget {
            packets: Some("300/s".into()),
            ..FleetBudget::default()
        };
        let changed = budget.apply_to(&rule).unwrap();
        assert_eq!(changed.fields().packets.as_deref(), Some("300/s"));
        assert_eq!(
            changed.fields().bytes,
            None,
            "a budget not given is removed"
        );
        assert_eq!(changed.fields().packet_burst, None);
        assert_eq!(changed.fields().fleet, Some(true));
        assert_eq!(changed.prefixes(), rule.prefixes());
    }

    #[test]
    fn a_fleet_patch_names_the_fields_that_are_not_budgets() {
        let patch: RulePatch =
            serde_json::from_str(r#"{"packets":"1/s","prefixes":["198.18.0.0/15"],"dscp":4}"#)
                .unwrap();
        assert_eq!(not_budget_fields(&patch), ["dscp", "prefixes"]);
        let budgets: RulePatch =
            serde_json::from_str(r#"{"packets":"1/s","aggregate":{"bytes":"1Gbit/s"}}"#).unwrap();
        assert!(not_budget_fields(&budgets).is_empty());
        let text = FleetRuleError::NotBudget(vec!["dscp".into(), "prefixes".into()]).to_string();
        assert!(
            text.contains("`dscp`, `prefixes` is each gateway's own"),
            "{text}"
        );
    }

    #[test]
    fn every_budget_field_is_a_rule_field() {
        let all = serde_json::to_value(RuleFields {
            packets: Some(String::new()),
            packet_burst: Some(Quantity::Number(1)),
            bytes: Some(String::new()),
            byte_burst: Some(Quantity::Number(1)),
            new_connections: Some(String::new()),
            connection_burst: Some(Quantity::Number(1)),
            aggregate: Some(AggregateFields::default()),
            ..RuleFields::default()
        })
        .unwrap();
        let names: Vec<&str> = all
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = BUDGET_FIELDS.to_vec();
        expected.sort_unstable();
        assert_eq!(names, expected);
    }
}
