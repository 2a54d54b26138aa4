//! Fleet-wide budgets: the sync task. Once per interval it publishes to
//! Redis what this kernel admitted into each fleet bucket and reads what
//! the rest of the fleet admitted, which the kernel then charges into this
//! gateway's bucket (docs/fleet.md). Enforcement never waits for it: it
//! runs in its own task, every Redis exchange has a timeout, and it takes
//! the agent's state lock only for a few memory reads and writes per sync.
//! While Redis cannot be reached, each bucket is held to its fallback share
//! (the budget over the last known number of gateways).

pub mod connection;
pub mod exchange;
pub mod rules;
pub mod sources;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use limiter_common::dimension::COUNT as DIMENSIONS;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::connection::Connector;
use self::{
    connection::Connection,
    exchange::{Exchange, FleetBucket, Keys, fallback_units, field},
    sources::{HeavySources, SourceRule},
};
use crate::{config::FleetConfig, datapath::FleetCounts, service::Service};

/// A gateway that has not synced for this many intervals (and at least
/// [`MIN_LIVENESS`]) no longer counts in the fleet's size.
const LIVENESS_INTERVALS: u32 = 10;
const MIN_LIVENESS: Duration = Duration::from_secs(3);
/// Keys live this long after their last sync (a fleet or rule gone away
/// leaves nothing behind for long).
const KEY_TTL: Duration = Duration::from_secs(3600);
/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Upper bounds of the sync latency histogram, in seconds.
pub const SYNC_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Whether this gateway exchanges usage with its fleet right now.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FleetState {
    /// Not yet connected since the agent started.
    #[default]
    Connecting,
    Connected,
    /// Redis cannot be reached: every fleet bucket is held to its fallback
    /// share.
    Disconnected,
}

/// The fleet part of `GET /v1/status`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct FleetView {
    pub state: FleetState,
    pub address: String,
    pub fleet: String,
    pub gateway: String,
    pub sync_interval_ms: u64,
    /// Gateways that synced recently, as last learned (the fallback share
    /// is the budget over this).
    pub gateways: u32,
    /// Fleet-wide buckets in force here.
    pub buckets: usize,
    /// Seconds since the last successful sync (`None`: none yet).
    pub last_sync_secs_ago: Option<f64>,
    /// Unix seconds of the last change of `state`.
    pub state_since: u64,
    /// Why the last exchange failed (no credentials in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub syncs: u64,
    pub redis_commands: u64,
}

/// What the sync task reports, for status and metrics.
#[derive(Clone, Debug)]
pub struct FleetStatus {
    pub state: FleetState,
    pub address: String,
    pub fleet: String,
    pub gateway: String,
    pub sync_interval: Duration,
    pub gateways: u32,
    pub buckets: usize,
    pub started: Instant,
    pub last_sync: Option<Instant>,
    pub state_since: u64,
    pub last_error: Option<String>,
    /// Successful syncs, by latency: counts per [`SYNC_BUCKETS`] bound
    /// (and one more for beyond), their sum in seconds.
    pub sync_latency: [u64; SYNC_BUCKETS.len() + 1],
    pub sync_latency_sum: f64,
    pub syncs: u64,
    /// Bucket keys published and read, summed over syncs.
    pub keys_exchanged: u64,
    pub redis_commands: u64,
}

/// The status shared between the sync task and its readers.
pub type FleetHandle = Arc<Mutex<FleetStatus>>;

impl FleetStatus {
    pub fn new(config: &FleetConfig) -> Self {
        Self {
            state: FleetState::Connecting,
            address: config.address.clone(),
            fleet: config.name.clone(),
            gateway: config.gateway.clone(),
            sync_interval: config.sync_interval,
            gateways: 1,
            buckets: 0,
            started: Instant::now(),
            last_sync: None,
            state_since: unix_secs(),
            last_error: None,
            sync_latency: [0; SYNC_BUCKETS.len() + 1],
            sync_latency_sum: 0.0,
            syncs: 0,
            keys_exchanged: 0,
            redis_commands: 0,
        }
    }

    pub fn view(&self) -> FleetView {
        FleetView {
            state: self.state,
            address: self.address.clone(),
            fleet: self.fleet.clone(),
            gateway: self.gateway.clone(),
            sync_interval_ms: self.sync_interval.as_millis() as u64,
            gateways: self.gateways,
            buckets: self.buckets,
            last_sync_secs_ago: self.last_sync.map(|t| t.elapsed().as_secs_f64()),
            state_since: self.state_since,
            last_error: self.last_error.clone(),
            syncs: self.syncs,
            redis_commands: self.redis_commands,
        }
    }

    /// Seconds since the last successful sync, or since the start if none.
    pub fn last_sync_age(&self) -> f64 {
        self.last_sync
            .unwrap_or(self.started)
            .elapsed()
            .as_secs_f64()
    }

    fn record_sync(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        let slot = SYNC_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(SYNC_BUCKETS.len());
        self.sync_latency[slot] += 1;
        self.sync_latency_sum += secs;
        self.syncs += 1;
        self.last_sync = Some(Instant::now());
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fleet bucket and what its kernel slot holds now.
pub type BucketCounts = (FleetBucket, FleetCounts);

/// What the service holds of the fleet at one sync.
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    /// Every fleet-wide bucket in force: rules' shared buckets and
    /// aggregates, and heavy sources.
    pub buckets: Vec<BucketCounts>,
    /// The rules whose per-source buckets are fleet-wide.
    pub source_rules: Vec<SourceRule>,
}

/// A rule's heavy sources that admitted something since the last sync
/// (added to its set), by the set's key.
struct HeavySet {
    key: String,
    active: Vec<String>,
}

/// What one exchange with Redis brought back.
struct Synced {
    gateways: u32,
    /// Each bucket's hash, in the order of the buckets sent.
    hashes: Vec<HashMap<String, String>>,
    /// Each heavy set's members, in the order of the sets sent.
    heavy: Vec<Vec<String>>,
    commands: u64,
}

/// One pipeline: this gateway's heartbeat and the fleet's size, then per
/// bucket what this gateway admitted (HINCRBY on its own fields only) and
/// the bucket's whole hash, then per rule with fleet-wide per-source
/// buckets its heavy sources (those active here added, the stale ones
/// dropped, the rest read).
async fn sync(
    conn: &mut Connection,
    keys: &Keys,
    gateway: &str,
    liveness: Duration,
    buckets: &[(String, [u64; DIMENSIONS])],
    heavy: &[HeavySet],
) -> redis::RedisResult<Synced> {
    let now_ms = unix_millis();
    let ttl_ms = KEY_TTL.as_millis() as u64;
    let gateways_key = keys.gateways();
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&gateways_key)
        .arg(now_ms)
        .arg(gateway)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&gateways_key)
        .arg("-inf")
        .arg(now_ms.saturating_sub(liveness.as_millis() as u64))
        .ignore()
        .cmd("ZCARD")
        .arg(&gateways_key)
        .cmd("PEXPIRE")
        .arg(&gateways_key)
        .arg(ttl_ms)
        .ignore();
    let mut commands = 4;
    for (key, admitted) in buckets {
        for (dim, units) in admitted.iter().enumerate() {
            if *units > 0 {
                pipe.cmd("HINCRBY")
                    .arg(key)
                    .arg(field(dim, gateway))
                    .arg(*units)
                    .ignore();
                commands += 1;
            }
        }
        pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
        pipe.cmd("HGETALL").arg(key);
        commands += 2;
    }
    let heavy_since = now_ms.saturating_sub(sources::HEAVY_LIVENESS.as_millis() as u64);
    for set in heavy {
        // Only a gateway with something to add maintains the set; every
        // gateway reads its recent members (one command per rule when
        // idle).
        if !set.active.is_empty() {
            let zadd = pipe.cmd("ZADD").arg(&set.key);
            for member in &set.active {
                zadd.arg(now_ms).arg(member);
            }
            zadd.ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&set.key)
                .arg("-inf")
                .arg(format!("({heavy_since}"))
                .ignore()
                .cmd("PEXPIRE")
                .arg(&set.key)
                .arg(ttl_ms)
                .ignore();
            commands += 3;
        }
        pipe.cmd("ZRANGE")
            .arg(&set.key)
            .arg(heavy_since)
            .arg("+inf")
            .arg("BYSCORE");
        commands += 1;
    }
    let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let mut rest = replies.split_off(1.min(replies.len()));
    let sets = rest.split_off(buckets.len().min(rest.len()));
    let hashes = rest
        .into_iter()
        .map(|v| redis::from_redis_value::<HashMap<String, String>>(v).map_err(Into::into))
        .collect::<redis::RedisResult<Vec<_>>>()?;
    let heavy_members = sets
        .into_iter()
        .map(|v| redis::from_redis_value::<Vec<String>>(v).map_err(Into::into))
        .collect::<redis::RedisResult<Vec<_>>>()?;
    let gateways = match replies.pop() {
        Some(v) => redis::from_redis_value::<u32>(v)?,
        None => 1,
    };
    if hashes.len() != buckets.len() || heavy_members.len() != heavy.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "pipeline answered fewer replies than commands",
        )));
    }
    Ok(Synced {
        gateways: gateways.max(1),
        hashes,
        heavy: heavy_members,
        commands,
    })
}

/// Sets `state` and logs the change (once per change).
fn change_state(status: &FleetHandle, state: FleetState, gateways: u32, error: Option<String>) {
    let Ok(mut s) = status.lock() else { return };
    s.last_error = error.clone();
    if s.state == state {
        return;
    }
    let was = s.state;
    s.state = state;
    s.state_since = unix_secs();
    match state {
        FleetState::Connected => tracing::info!(
            redis = %s.address,
            fleet = %s.fleet,
            gateway = %s.gateway,
            gateways,
            "fleet: exchanging usage with the fleet"
        ),
        FleetState::Disconnected => tracing::warn!(
            redis = %s.address,
            fleet = %s.fleet,
            was = ?was,
            gateways,
            error = error.as_deref().unwrap_or("-"),
            "fleet: Redis cannot be reached; each fleet bucket is held to its fallback share \
             (its budget / {gateways} gateways) until it can"
        ),
        FleetState::Connecting => {}
    }
}

/// Runs the sync until `stop`, connecting with `redis` (its secrets read
/// at start, never logged).
pub async fn run(
    config: FleetConfig,
    redis: Connector,
    service: Arc<Mutex<Service>>,
    status: FleetHandle,
    mut stop: watch::Receiver<bool>,
) {
    let keys = Keys::new(&config.name);
    let liveness = (config.sync_interval * LIVENESS_INTERVALS).max(MIN_LIVENESS);
    let mut tick = tokio::time::interval(config.sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut exchange = Exchange::new(&config.gateway);
    let mut conn: Option<Connection> = None;
    let mut backoff = BACKOFF_FIRST;
    let mut next_attempt = Instant::now();
    let mut gateways: u32 = 1;
    let mut carry: HashMap<(String, usize), u128> = HashMap::new();
    let mut heavy = HeavySources::default();
    let mut first_round = true;
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            _ = crate::daemon::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let elapsed = last_tick.elapsed();
        last_tick = Instant::now();
        let elsewhere = heavy.elsewhere.clone();
        let known_gateways = gateways;
        let Some(FleetSnapshot {
            buckets: snapshot,
            source_rules,
        }) = blocking(&service, move |s| {
            s.fleet_snapshot(&elsewhere, known_gateways)
        })
        .await
        else {
            return;
        };
        heavy.retain_rules(&source_rules.iter().map(|r| r.id).collect::<Vec<_>>());
        let bucket_keys: Vec<String> = snapshot.iter().map(|(b, _)| keys.bucket(b)).collect();
        exchange.retain(&bucket_keys);
        carry.retain(|(key, _), _| bucket_keys.contains(key));
        if let Ok(mut s) = status.lock() {
            s.buckets = snapshot.len();
        }
        if conn.is_none() && Instant::now() >= next_attempt {
            match tokio::time::timeout(redis.timeout(), redis.connect()).await {
                Ok(Ok(c)) => {
                    conn = Some(c);
                    backoff = BACKOFF_FIRST;
                    // Nothing of before is exchanged: the fallback share
                    // covered it (or the agent just started).
                    exchange.rebaseline();
                    first_round = true;
                }
                Ok(Err(e)) => {
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    change_state(
                        &status,
                        FleetState::Disconnected,
                        gateways,
                        Some(redis.explain(&e)),
                    );
                }
                Err(_) => {
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    let error = format!("no connection within {:?}", redis.timeout());
                    change_state(&status, FleetState::Disconnected, gateways, Some(error));
                }
            }
        }
        let mut published: Vec<(String, [u64; DIMENSIONS])> = Vec::new();
        let units: Vec<[u64; DIMENSIONS]> = match conn.as_mut() {
            Some(c) => {
                published = snapshot
                    .iter()
                    .zip(&bucket_keys)
                    .map(|((bucket, counts), key)| {
                        // A heavy source's totals start at its promotion:
                        // all of it is news, except in the first round
                        // after (re)connecting, which the fallback covered.
                        let units = if bucket.source.is_some() && !first_round {
                            exchange.publish_from_zero(key, counts.admitted)
                        } else {
                            exchange.publish(key, counts.admitted)
                        };
                        (key.clone(), units)
                    })
                    .collect();
                first_round = false;
                let sets = heavy_sets(&keys, &source_rules, &snapshot, &published);
                let started = Instant::now();
                let outcome = tokio::time::timeout(
                    redis.timeout(),
                    sync(c, &keys, &config.gateway, liveness, &published, &sets),
                )
                .await;
                match outcome {
                    Ok(Ok(synced)) => {
                        gateways = synced.gateways;
                        if let Ok(mut s) = status.lock() {
                            s.record_sync(started.elapsed());
                            s.gateways = gateways;
                            s.keys_exchanged += bucket_keys.len() as u64;
                            s.redis_commands += synced.commands;
                        }
                        change_state(&status, FleetState::Connected, gateways, None);
                        heavy.elsewhere = source_rules
                            .iter()
                            .zip(&synced.heavy)
                            .flat_map(|(rule, members)| {
                                members
                                    .iter()
                                    .filter_map(|m| sources::parse_member(rule, m))
                            })
                            .collect();
                        bucket_keys
                            .iter()
                            .zip(&synced.hashes)
                            .map(|(key, hash)| exchange.remote(key, hash))
                            .collect()
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => redis.explain(&e),
                            _ => format!("no answer within {:?}", redis.timeout()),
                        };
                        conn = None;
                        next_attempt = Instant::now() + backoff;
                        change_state(&status, FleetState::Disconnected, gateways, Some(error));
                        fallback(&snapshot, &bucket_keys, elapsed, gateways, &mut carry)
                    }
                }
            }
            None => fallback(&snapshot, &bucket_keys, elapsed, gateways, &mut carry),
        };
        // Heavy sources that moved (here or elsewhere) stay; quiet ones
        // are forgotten.
        let now = Instant::now();
        for (i, ((bucket, _), units)) in snapshot.iter().zip(&units).enumerate() {
            if let Some((key, _)) = &bucket.source {
                let here = published
                    .get(i)
                    .is_some_and(|(_, p)| p.iter().any(|u| *u > 0));
                heavy.touch(*key, here || units.iter().any(|u| *u > 0), now);
            }
        }
        let forget = heavy.demote(now);
        let writes: Vec<(FleetBucket, [u64; DIMENSIONS])> = snapshot
            .into_iter()
            .map(|(bucket, _)| bucket)
            .zip(units)
            .collect();
        if blocking(&service, move |s| s.charge_fleet(&writes, &forget))
            .await
            .is_none()
        {
            return;
        }
    }
}

/// Each per-source rule's heavy set, with the sources that admitted
/// something here since the last sync.
fn heavy_sets(
    keys: &Keys,
    rules: &[SourceRule],
    snapshot: &[BucketCounts],
    published: &[(String, [u64; DIMENSIONS])],
) -> Vec<HeavySet> {
    rules
        .iter()
        .map(|rule| HeavySet {
            key: keys.heavy(&rule.name),
            active: snapshot
                .iter()
                .zip(published)
                .filter(|((b, _), (_, units))| b.id == rule.id && units.iter().any(|u| *u > 0))
                .filter_map(|((b, _), _)| b.source.as_ref().map(|(_, m)| m.clone()))
                .collect(),
        })
        .collect()
}

/// Units to charge each bucket while Redis cannot be reached.
fn fallback(
    snapshot: &[BucketCounts],
    keys: &[String],
    elapsed: Duration,
    gateways: u32,
    carry: &mut HashMap<(String, usize), u128>,
) -> Vec<[u64; DIMENSIONS]> {
    let elapsed_ns = elapsed.as_nanos().min(u128::from(u64::MAX)) as u64;
    snapshot
        .iter()
        .zip(keys)
        .map(|((bucket, _), key)| {
            std::array::from_fn(|dim| match bucket.rates[dim] {
                Some(rate) => {
                    let c = carry.entry((key.clone(), dim)).or_default();
                    fallback_units(rate, elapsed_ns, gateways, c)
                }
                None => 0,
            })
        })
        .collect()
}

/// Runs `f` on the service on a blocking thread (it takes the state lock,
/// which a rule change may hold for a while); `None` if the service is
/// gone.
async fn blocking<T: Send + 'static>(
    service: &Arc<Mutex<Service>>,
    f: impl FnOnce(&mut Service) -> T + Send + 'static,
) -> Option<T> {
    let service = service.clone();
    tokio::task::spawn_blocking(move || service.lock().ok().map(|mut s| f(&mut s)))
        .await
        .ok()
        .flatten()
}
