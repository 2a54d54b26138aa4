//! Fleet-wide budgets: the sync task. Once per interval it publishes to
//! Redis what this kernel admitted into each fleet bucket and reads what
//! the rest of the fleet admitted, which the kernel then charges into this
//! gateway's bucket (docs/fleet.md). Enforcement never waits for it: it
//! runs in its own task, every Redis exchange has a timeout, and it takes
//! the agent's state lock only for a few memory reads and writes per sync.
//! While Redis cannot be reached, each bucket is held to its fallback share
//! (the budget over the last known number of gateways).

pub mod exchange;
pub mod rules;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use limiter_common::dimension::COUNT as DIMENSIONS;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo as _,
    RedisConnectionInfo, aio::MultiplexedConnection,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use self::exchange::{Exchange, FleetBucket, Keys, fallback_units, field};
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

/// What one exchange with Redis brought back.
struct Synced {
    gateways: u32,
    /// Each bucket's hash, in the order of the buckets sent.
    hashes: Vec<HashMap<String, String>>,
    commands: u64,
}

/// The connection to the fleet's Redis.
struct Redis {
    info: ConnectionInfo,
    timeout: Duration,
}

impl Redis {
    fn new(config: &FleetConfig, password: Option<&str>) -> redis::RedisResult<Self> {
        let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(user) = &config.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
        let info = ConnectionAddr::Tcp(config.host.clone(), config.port)
            .into_connection_info()?
            .set_redis_settings(settings);
        Ok(Self {
            info,
            // One interval: a sync that takes longer is late anyway, and
            // the next one is due.
            timeout: config.sync_interval,
        })
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let client = redis::Client::open(self.info.clone())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

/// One pipeline: this gateway's heartbeat and the fleet's size, then per
/// bucket what this gateway admitted (HINCRBY on its own fields only) and
/// the bucket's whole hash.
async fn sync(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    gateway: &str,
    liveness: Duration,
    buckets: &[(String, [u64; DIMENSIONS])],
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
    let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let hashes = replies
        .split_off(1.min(replies.len()))
        .into_iter()
        .map(|v| redis::from_redis_value::<HashMap<String, String>>(v).map_err(Into::into))
        .collect::<redis::RedisResult<Vec<_>>>()?;
    let gateways = match replies.pop() {
        Some(v) => redis::from_redis_value::<u32>(v)?,
        None => 1,
    };
    if hashes.len() != buckets.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "pipeline answered fewer replies than commands",
        )));
    }
    Ok(Synced {
        gateways: gateways.max(1),
        hashes,
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

/// The password in `fleet.password_file` (its first line), if one is named.
pub fn read_password(config: &FleetConfig) -> anyhow::Result<Option<String>> {
    let Some(path) = &config.password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "reading fleet.password_file {}: {e} (the file holds the Redis password on its \
             first line, readable by the agent)",
            path.display()
        )
    })?;
    let password = text.lines().next().unwrap_or("").trim_end();
    if password.is_empty() {
        anyhow::bail!(
            "fleet.password_file {} is empty: write the Redis password on its first line, \
             or remove password_file",
            path.display()
        );
    }
    Ok(Some(password.to_owned()))
}

/// Runs the sync until `stop`. `password` is the content of
/// `fleet.password_file`, never logged.
pub async fn run(
    config: FleetConfig,
    password: Option<String>,
    service: Arc<Mutex<Service>>,
    status: FleetHandle,
    mut stop: watch::Receiver<bool>,
) {
    let redis = match Redis::new(&config, password.as_deref()) {
        Ok(redis) => redis,
        Err(e) => {
            tracing::error!("fleet: {e}; fleet buckets stay at their full budget on this gateway");
            return;
        }
    };
    let keys = Keys::new(&config.name);
    let liveness = (config.sync_interval * LIVENESS_INTERVALS).max(MIN_LIVENESS);
    let mut tick = tokio::time::interval(config.sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut exchange = Exchange::new(&config.gateway);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = BACKOFF_FIRST;
    let mut next_attempt = Instant::now();
    let mut gateways: u32 = 1;
    let mut carry: HashMap<(String, usize), u128> = HashMap::new();
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            _ = crate::daemon::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let elapsed = last_tick.elapsed();
        last_tick = Instant::now();
        let Some(snapshot) = blocking(&service, |s| s.fleet_buckets()).await else {
            return;
        };
        let bucket_keys: Vec<String> = snapshot.iter().map(|(b, _)| keys.bucket(b)).collect();
        exchange.retain(&bucket_keys);
        carry.retain(|(key, _), _| bucket_keys.contains(key));
        if let Ok(mut s) = status.lock() {
            s.buckets = snapshot.len();
        }
        if conn.is_none() && Instant::now() >= next_attempt {
            match tokio::time::timeout(redis.timeout, redis.connect()).await {
                Ok(Ok(c)) => {
                    conn = Some(c);
                    backoff = BACKOFF_FIRST;
                    // Nothing of before is exchanged: the fallback share
                    // covered it (or the agent just started).
                    exchange.rebaseline();
                }
                Ok(Err(e)) => {
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    change_state(
                        &status,
                        FleetState::Disconnected,
                        gateways,
                        Some(e.to_string()),
                    );
                }
                Err(_) => {
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    let error = format!("no connection within {:?}", redis.timeout);
                    change_state(&status, FleetState::Disconnected, gateways, Some(error));
                }
            }
        }
        let units: Vec<[u64; DIMENSIONS]> = match conn.as_mut() {
            Some(c) => {
                let published: Vec<(String, [u64; DIMENSIONS])> = snapshot
                    .iter()
                    .zip(&bucket_keys)
                    .map(|((_, counts), key)| (key.clone(), exchange.publish(key, counts.admitted)))
                    .collect();
                let started = Instant::now();
                let outcome = tokio::time::timeout(
                    redis.timeout,
                    sync(c, &keys, &config.gateway, liveness, &published),
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
                        bucket_keys
                            .iter()
                            .zip(&synced.hashes)
                            .map(|(key, hash)| exchange.remote(key, hash))
                            .collect()
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {:?}", redis.timeout),
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
        let writes: Vec<(FleetBucket, [u64; DIMENSIONS])> = snapshot
            .into_iter()
            .map(|(bucket, _)| bucket)
            .zip(units)
            .collect();
        if blocking(&service, move |s| s.charge_fleet(&writes))
            .await
            .is_none()
        {
            return;
        }
    }
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
