//! `limiter-agent run`: load or adopt, attach, serve the control API, apply
//! reloads and expiries, until SIGTERM/SIGINT (or a detach request).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    api::server,
    attach,
    attachments::Attachments,
    config::{Config, InterfaceConfig, XdpModeConfig},
    datapath::{Capacities, Datapath, DatapathError, TcPrograms},
    enforcer::Enforcer,
    events::{Offenders, parse_event},
    kernel, metrics,
    pins::{PinScope, Pins},
    rules,
    service::{Service, now_unix},
    shared::Shared,
    state::State,
};

pub struct RunOptions {
    pub config: Option<PathBuf>,
    /// Extra interfaces (`--interface`), attached in `auto` mode.
    pub interfaces: Vec<String>,
}

/// Offenders remembered, and for how long an event counts in `top`.
const OFFENDER_CAPACITY: usize = 100_000;
const OFFENDER_WINDOW: Duration = Duration::from_secs(60);
/// How often interfaces and pins are checked (and repaired).
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);
/// How often expired penalties are looked for (they have 1 s resolution).
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// At most this many "went over budget" log lines per second.
const OFFENDER_LOG_PER_SEC: u32 = 10;

/// What `run` warns of at start in a config that enforces nothing: no rules
/// (an empty file, or one naming only interfaces), no interface.
fn idle_warnings(config: &Config) -> Vec<&'static str> {
    let mut warnings = Vec::new();
    if config.rules.is_empty() {
        warnings.push(
            "the config has no rules: nothing is limited or counted per rule (every packet passes \
             as no_rule) until rules are added",
        );
    }
    if config.file.interfaces.is_empty() {
        warnings.push(
            "no interface configured: nothing is enforced until one is (--interface or [[interface]])",
        );
    }
    warnings
}

pub async fn run(options: RunOptions) -> Result<()> {
    if let Some(version) = kernel::running() {
        kernel::check_supported(version)?;
    }
    let started = Instant::now();
    let mut config = match &options.config {
        Some(path) => Config::load(path)?,
        None => {
            tracing::info!("no --config: running on the embedded default (monitor only)");
            Config::embedded_default()?
        }
    };
    let config_read = started.elapsed();
    for name in &options.interfaces {
        config.file.interfaces.push(InterfaceConfig {
            name: name.clone(),
            xdp: XdpModeConfig::Auto,
            tc: false,
            netns: None,
        });
    }
    for warning in idle_warnings(&config) {
        tracing::warn!("{warning}");
    }
    // Read first: a password or TLS file that cannot be read stops the
    // start before anything is attached.
    let fleet_redis = match &config.fleet {
        Some(fleet) => Some(crate::fleet::Connector::prepare(fleet)?),
        None => None,
    };
    let agent = config.file.agent.clone();
    let pins = Pins::new(&agent.pin_path);
    let pin_scope = pins.prepare()?;
    // First, before anything is loaded, adopted or attached: a second
    // agent on the same pins must leave the kernel alone.
    let _pin_lock = pins.lock()?;
    warn_unless_pins_persist(pin_scope, &pins);
    let adopted = pins.has_maps();
    let capacities = Capacities {
        max_rules: config.file.capacity.rules,
        max_sources: config.file.capacity.sources,
        // Only a fleet has fleet-wide per-source rules to find heavy
        // sources for.
        fleet_windows: if config.file.fleet.is_some() {
            config.file.capacity.sources
        } else {
            0
        },
    };
    // Kernel log records: in debug builds, or when asked for.
    let kernel_log =
        cfg!(debug_assertions) || std::env::var_os("LIMITER_KERNEL_LOG").is_some_and(|v| v == "1");
    // The rules are planned while the verifier checks the programs (the
    // longest part of a start): planning needs no kernel.
    let (dp, plan) = std::thread::scope(|scope| {
        let planning = scope.spawn(|| {
            // A corrupt state file stops the start before any rule is written.
            let state = State::load(&agent.state_file)?;
            rules::plan(&config, state).context("applying the rules")
        });
        let tc = if config.file.interfaces.iter().any(|i| i.tc) {
            TcPrograms::Now
        } else {
            TcPrograms::WhenNeeded
        };
        let dp = Datapath::load_pinned(capacities, &pins.maps_dir(), kernel_log, tc);
        let plan = planning
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (dp, plan)
    });
    let dp = dp.map_err(|e| match e {
        DatapathError::Load(aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap { name, property, expected, actual })) => anyhow!(
            "the maps pinned under {} were made with another [capacity] ({name}: {property} {actual}, this config needs {expected}). \
             Set [capacity] back, or run `limiter-agent detach` to start afresh (this drops per-source state)",
            pins.root.display()
        ),
        e => anyhow::Error::new(e).context("loading the kernel programs"),
    })?;
    if adopted {
        tracing::info!(pins = %pins.root.display(), "adopting pinned maps: per-source state and counters carry over");
    }
    let programs_loaded = started.elapsed();
    let plan = plan?;
    let enforcer = Enforcer::new(dp, adopted)?;
    let config = Arc::new(config);
    let mut service = Service::start(
        Arc::clone(&config),
        plan,
        agent.state_file.clone(),
        enforcer,
    )
    .context("applying the rules")?;
    let rules_in_force = started.elapsed();
    let service_rules = service.rule_count();
    let held = service.live_overrides();
    if !held.is_empty() {
        let names: Vec<String> = held
            .iter()
            .map(|o| format!("{} ({})", o.name, o.change))
            .collect();
        tracing::info!(
            state_file = %agent.state_file.display(),
            "live changes from the state file are in force over the config: {}; \
             `limiter-agent rules revert NAME` (or --all) returns a rule to the file",
            names.join(", ")
        );
    }
    let attachments = Attachments::attach(
        service.datapath_mut(),
        pins.clone(),
        pin_scope,
        &config.file.interfaces,
    )?;
    service.attachments = Some(attachments);
    let interfaces_attached = started.elapsed();
    let fleet_status = config
        .fleet
        .as_ref()
        .map(|fleet| Arc::new(Mutex::new(crate::fleet::FleetStatus::new(fleet))));
    service.fleet = fleet_status.clone();
    let fleet_rules = match (&config.fleet, &fleet_redis) {
        (Some(fleet), Some(redis)) => {
            Some(Arc::new(crate::fleet::rules::FleetRules::new(fleet, redis)))
        }
        _ => None,
    };
    service.fleet_rules = fleet_rules.clone();
    // The programs just replaced held the maps of an older layout.
    match pins.remove_stale_maps() {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => tracing::info!(
            pins = %pins.maps_dir().display(),
            "removed the pins of maps an older version used: {}",
            removed.join(", ")
        ),
        Err(e) => tracing::warn!("could not remove the pins of an older version's maps: {e:#}"),
    }
    for a in service.attached() {
        tracing::info!(
            interface = %a.interface,
            netns = a.netns.as_deref().unwrap_or("-"),
            xdp = a.xdp_mode.as_deref().unwrap_or("off"),
            tc = a.tc,
            adopted = a.adopted,
            "attached"
        );
    }
    let events = service.datapath_mut().take_events()?;
    let kernel_logger = if kernel_log {
        match service.datapath_mut().kernel_logger() {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("kernel log records unavailable: {e}");
                None
            }
        }
    } else {
        None
    };
    let (detach_tx, mut detach_rx) = watch::channel(false);
    let shared = Shared {
        service: Arc::new(Mutex::new(service)),
        offenders: Arc::new(Mutex::new(Offenders::new(
            OFFENDER_WINDOW,
            OFFENDER_CAPACITY,
        ))),
        detach: detach_tx,
    };
    let listener = server::bind(&agent.control_socket)?;
    tracing::info!(socket = %agent.control_socket.display(), "control API listening");
    // Where a slow start went, in the order it happened (the rules are
    // planned while the programs load).
    let ms = |d: Duration| d.as_millis();
    tracing::info!(
        "started in {} ms: configuration read in {} ms, programs loaded and verified by {} ms, \
         {} in force by {} ms, interfaces attached by {} ms",
        ms(started.elapsed()),
        ms(config_read),
        ms(programs_loaded),
        crate::plural::count(service_rules, "rule", "rules"),
        ms(rules_in_force),
        ms(interfaces_attached),
    );
    let metrics_listener = match config.file.metrics.address.as_str() {
        "" => None,
        address => {
            let listener = metrics::bind(address).await?;
            let counters = metrics::KernelCounters::open(&pins.maps_dir())?;
            tracing::info!(address, "metrics at /metrics");
            Some((listener, counters))
        }
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut stop_api = stop_rx.clone();
    let api = tokio::spawn(server::serve(listener, shared.clone(), async move {
        stopped(&mut stop_api).await;
    }));
    let metrics_task = metrics_listener.map(|(listener, counters)| {
        let mut stop = stop_rx.clone();
        tokio::spawn(metrics::serve(
            listener,
            shared.clone(),
            counters,
            async move {
                stopped(&mut stop).await;
            },
        ))
    });
    let events_task = tokio::spawn(consume_events(events, shared.clone(), stop_rx.clone()));
    let fleet_task = match (config.fleet.clone(), fleet_redis, fleet_status) {
        (Some(fleet), Some(redis), Some(status)) => {
            tracing::info!(
                redis = %fleet.address,
                fleet = %fleet.name,
                gateway = %fleet.gateway,
                interval = ?fleet.sync_interval,
                "fleet: exchanging the usage of fleet-wide buckets"
            );
            Some(tokio::spawn(crate::fleet::run(
                fleet,
                redis,
                shared.service.clone(),
                status,
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    // Fleet rule changes: applied as they are announced, checked every
    // sync interval (docs/fleet.md, "Fleet rule changes").
    let fleet_rules_task = fleet_rules.map(|rules| {
        tokio::spawn(crate::fleet::rules::run(
            rules,
            shared.service.clone(),
            stop_rx.clone(),
        ))
    });
    let log_task =
        kernel_logger.map(|logger| tokio::spawn(forward_kernel_logs(logger, stop_rx.clone())));
    let expiry = tokio::spawn(every_tick(
        shared.clone(),
        stop_rx.clone(),
        EXPIRE_EVERY,
        "removing expired penalties",
        expire_penalties,
    ));
    // Re-attaches to interfaces that came back and re-pins removed pins.
    let supervision = tokio::spawn(every_tick(
        shared.clone(),
        stop_rx.clone(),
        SUPERVISE_EVERY,
        "supervising the attachments",
        Service::supervise,
    ));

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // Every interface attached, the API and the metrics listening.
    let interfaces = shared
        .service
        .lock()
        .map(|s| s.attached().len())
        .unwrap_or_default();
    crate::notify::send(&format!(
        "READY=1\nSTATUS=enforcing on {}",
        crate::plural::count(interfaces, "interface", "interfaces")
    ));
    let detach = loop {
        tokio::select! {
            _ = term.recv() => break false,
            _ = int.recv() => break false,
            _ = detach_rx.wait_for(|d| *d) => break true,
            _ = hup.recv() => {
                crate::notify::reloading();
                let svc = shared.service.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let mut guard = svc.lock().map_err(|_| anyhow!("agent state lock poisoned"))?;
                    guard.reload(&crate::service::Requester::Sighup)?;
                    Ok::<_, anyhow::Error>(crate::service::reload_message(&guard.live_overrides()))
                })
                .await;
                let status = match result {
                    Ok(Ok(message)) => {
                        tracing::info!("SIGHUP: {message}");
                        format!("reloaded: {message}")
                    }
                    Ok(Err(e)) => {
                        tracing::error!("SIGHUP: reload refused, the rules in force are unchanged: {e}");
                        format!("reload refused, the rules in force are unchanged: {e}")
                    }
                    Err(e) => {
                        tracing::error!("SIGHUP: reload failed: {e}");
                        format!("reload failed: {e}")
                    }
                };
                crate::notify::send(&format!(
                    "READY=1\nSTATUS={}",
                    crate::notify::status_line(&status)
                ));
            }
        }
    };
    crate::notify::send("STOPPING=1");
    let _ = stop_tx.send(true);
    let _ = api.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = events_task.await;
    if let Some(task) = fleet_task {
        let _ = task.await;
    }
    if let Some(task) = fleet_rules_task {
        let _ = task.await;
    }
    if let Some(task) = log_task {
        let _ = task.await;
    }
    let _ = expiry.await;
    let _ = supervision.await;
    let _ = std::fs::remove_file(&agent.control_socket);
    if detach {
        drop(shared);
        let links = attach::detach_all(&pins)?;
        tracing::info!(links, pins = %pins.root.display(), "detached and removed every pin");
    } else {
        match pin_scope {
            PinScope::Host => {
                tracing::info!("stopping; the programs stay attached and enforcing (pinned)");
            }
            PinScope::Private => tracing::error!(
                "stopping; the programs do NOT stay attached: their pins under {} are in this \
                 agent's private mount namespace, which goes away when the agent exits (or the \
                 last process sharing it does), and with it the kernel detaches the programs and \
                 drops counters and per-source state. To keep enforcing across restarts, run the \
                 agent in the host's namespaces and set each [[interface]]'s `netns` field instead \
                 of `ip netns exec`",
                pins.root.display()
            ),
            PinScope::Unknown => tracing::warn!(
                "stopping; the programs stay attached only as long as the pins under {} exist: \
                 this agent runs in a mount namespace other than the host's, and if that namespace \
                 is private (as under `ip netns exec`) they go away with it",
                pins.root.display()
            ),
        }
    }
    Ok(())
}

/// Says at start when the pins will not outlive this process: everything
/// else about restarts (adoption, enforcement without an agent) then fails
/// silently.
fn warn_unless_pins_persist(scope: PinScope, pins: &Pins) {
    match scope {
        PinScope::Host => {}
        PinScope::Private => tracing::error!(
            "pins under {} are private to this agent and will not survive this process: it runs \
             in a mount namespace other than the host's (as under `ip netns exec`, which gives it \
             its own /sys) on a bpffs the host does not see. When it exits the programs are \
             detached, counters and per-source state are lost, and a restart starts from zero. \
             Run the agent in the host's namespaces instead and name each interface's network \
             namespace with the `netns` field of its [[interface]] entry",
            pins.root.display()
        ),
        PinScope::Unknown => tracing::warn!(
            "this agent runs in a mount namespace other than the host's and could not check \
             whether the host sees the pins under {}: if that namespace is private (as under \
             `ip netns exec`), the pins will not survive this process. Run the agent in the \
             host's namespaces and use the `netns` field of each [[interface]] entry instead",
            pins.root.display()
        ),
    }
}

/// Resolves once `stop` is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn consume_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
) {
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
    // owns the ring buffer, and always reports that same fd.
    let mut ring =
        match unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!("watching the event ring buffer: {e}; `top` will stay empty");
                return;
            }
        };
    let mut logged_this_second = 0u32;
    let mut second = Instant::now();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            guard = ring.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                let mut events = Vec::new();
                {
                    let rb = guard.get_inner_mut();
                    while let Some(item) = rb.next() {
                        events.extend(parse_event(&item));
                    }
                }
                guard.clear_ready();
                let Some(attributed) = attribute(&shared, events) else { return };
                let mut new_offenders = Vec::new();
                {
                    let Ok(mut offenders) = shared.offenders.lock() else { return };
                    let now = Instant::now();
                    for (event, epoch) in attributed {
                        if offenders.record(&event, epoch, now) {
                            new_offenders.push((event, epoch));
                        }
                    }
                }
                if second.elapsed() >= Duration::from_secs(1) {
                    second = Instant::now();
                    logged_this_second = 0;
                }
                // Names only for the few lines logged, not for every event.
                let room = OFFENDER_LOG_PER_SEC.saturating_sub(logged_this_second) as usize;
                let logged: Vec<_> = new_offenders.into_iter().take(room).collect();
                logged_this_second += logged.len() as u32;
                let names: Vec<String> = match shared.service.lock() {
                    Ok(service) => logged
                        .iter()
                        .map(|(e, _)| crate::rules::rule_label(service.rule_name(e.rule_id), e.rule_id))
                        .collect(),
                    Err(_) => return,
                };
                for ((event, epoch), rule) in logged.iter().zip(names) {
                    let key = crate::events::OffenderKey::of(event, *epoch);
                    tracing::info!(rule, source = key.source(), "source went over budget");
                }
            }
        }
    }
}

/// Each event with the time its rule got its id; events of rules deleted
/// since, or raised before their id was given to the rule now holding it,
/// are dropped. `None` if the service is gone.
fn attribute(
    shared: &Shared,
    events: Vec<limiter_common::OverBudgetEvent>,
) -> Option<Vec<(limiter_common::OverBudgetEvent, u64)>> {
    let service = shared.service.lock().ok()?;
    Some(
        events
            .into_iter()
            .filter_map(|event| {
                let epoch = service.rule_epoch(event.rule_id)?;
                (event.timestamp_ns >= epoch).then_some((event, epoch))
            })
            .collect(),
    )
}

/// Kernel log records (aya-log) into the agent's log.
async fn forward_kernel_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    mut stop: watch::Receiver<bool>,
) {
    // SAFETY: the logger owns its ring buffer fd for its whole life and
    // always reports that same fd.
    let mut logger =
        match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("watching kernel log records: {e}");
                return;
            }
        };
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            guard = logger.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
}

fn expire_penalties(service: &mut Service) {
    match service.expire(now_unix()) {
        Ok(expired) => {
            for name in expired {
                tracing::info!(penalty = name, "penalty expired and removed");
            }
        }
        Err(e) => tracing::error!("removing expired penalties: {e}"),
    }
}

/// Runs `round` on the service every `every` until `stop`: on a blocking
/// thread, since it takes the service lock and may touch the kernel.
async fn every_tick(
    shared: Shared,
    mut stop: watch::Receiver<bool>,
    every: Duration,
    what: &'static str,
    round: fn(&mut Service),
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => {
                let service = shared.service.clone();
                let done = tokio::task::spawn_blocking(move || match service.lock() {
                    Ok(mut guard) => round(&mut guard),
                    Err(_) => tracing::error!("{what}: agent state lock poisoned"),
                })
                .await;
                if let Err(e) = done {
                    tracing::error!("{what}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Config, idle_warnings};

    #[test]
    fn an_empty_config_is_warned_of_at_start() {
        let empty = Config::parse("", Path::new("empty.toml")).unwrap();
        let warnings = idle_warnings(&empty);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("the config has no rules"));
        assert!(warnings[1].starts_with("no interface configured"));
        let only_interfaces =
            Config::parse("[[interface]]\nname = \"eth1\"\n", Path::new("a.toml")).unwrap();
        assert_eq!(
            idle_warnings(&only_interfaces),
            [warnings[0]],
            "rules added live later: still nothing limited at start"
        );
        let default = Config::embedded_default().unwrap();
        assert_eq!(idle_warnings(&default), [warnings[1]]);
    }
}
