//! The control API: HTTP/1.1 with JSON bodies on a Unix socket that only
//! root can open (mode 0600). Documented in docs/api.md.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{
        ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State, connect_info::Connected,
    },
    http::StatusCode,
    middleware,
    routing::{get, patch, post},
    serve::IncomingStream,
};
use serde::Deserialize;
use tokio::net::UnixListener;

use super::{
    errors::{ApiError, ApiResult, Body, json_errors, no_query},
    types::{Applied, Offender, PenaltyRequest, RulePatch},
};
use crate::{
    config::RuleConfig,
    rules::Change,
    service::{Requester, Service, ServiceError},
    shared::Shared,
};

/// Requests larger than this are refused: room for a batch of
/// `MAX_BATCH` changes of a few hundred bytes each.
pub(super) const MAX_BODY: usize = 32 * 1024 * 1024;
/// Changes in one `POST /v1/batch`: a whole rule set of 100,000 rules
/// (one validation, one flip and one save, where ten batches of 10,000
/// make ten).
pub(super) const MAX_BATCH: usize = 100_000;

/// Runs `f` on the service off the async runtime (map work is blocking).
async fn with_service<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut Service) -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ApiError> {
    let service = shared.service.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = service.lock().map_err(|_| ServiceError::Poisoned)?;
        f(&mut guard)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(ApiError::from)
}

fn applied(service: &Service, message: String) -> Applied {
    Applied {
        config_generation: service.config_generation,
        message,
    }
}

pub fn router(shared: Shared) -> Router {
    let routes = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/rules", get(list_rules).post(add_rule))
        .route(
            "/v1/rules/{name}",
            get(show_rule)
                .put(replace_rule)
                .patch(patch_rule)
                .delete(delete_rule),
        )
        .route("/v1/rules/{name}/revert", post(revert_rule))
        .route("/v1/revert", post(revert_all))
        .route("/v1/batch", post(batch))
        .route("/v1/fleet/rules/{name}", patch(fleet_change_rule))
        .route("/v1/penalties", post(penalize))
        .route("/v1/reload", post(reload))
        .route("/v1/detach", post(detach))
        // Every route above takes no query; those added after this layer
        // have their own (`FlowQuery`, `TopQuery`).
        .route_layer(middleware::from_fn(no_query))
        .route("/v1/sources/{address}", get(inspect))
        .route("/v1/top", get(top))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared);
    // Around the whole router rather than `routes.layer(...)`: a per-route
    // layer runs before axum sets the `Allow` header of a 405, which the
    // error message names.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(json_errors))
}

async fn status(State(s): State<Shared>) -> ApiResult<super::types::Status> {
    with_service(&s, |svc| Ok(svc.status())).await.map(Json)
}

async fn list_rules(State(s): State<Shared>) -> ApiResult<Vec<super::types::RuleView>> {
    with_service(&s, |svc| Ok(svc.rules())).await.map(Json)
}

async fn show_rule(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<super::types::RuleView> {
    with_service(&s, move |svc| svc.rule(&name)).await.map(Json)
}

async fn add_rule(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Body(rule): Body<RuleConfig>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        let name = rule.name.clone();
        svc.add_rule(rule, &peer.requester())?;
        Ok(applied(svc, format!("rule {name:?} added")))
    })
    .await
    .map(Json)
}

async fn replace_rule(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    Body(rule): Body<RuleConfig>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        svc.replace_rule(&name, rule, &peer.requester())?;
        Ok(applied(svc, format!("rule {name:?} replaced")))
    })
    .await
    .map(Json)
}

async fn patch_rule(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    Body(patch): Body<RulePatch>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        svc.patch_rule(&name, &patch, &peer.requester())?;
        Ok(applied(svc, format!("rule {name:?} changed")))
    })
    .await
    .map(Json)
}

/// A budget change made once for the whole fleet (docs/fleet.md, "Fleet
/// rule changes"): stored in Redis with the next version, in force here,
/// applied by every other gateway within a second.
async fn fleet_change_rule(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    Body(patch): Body<RulePatch>,
) -> ApiResult<Applied> {
    let (message, config_generation) =
        crate::fleet::rules::change(&s.service, &name, patch, &peer.requester()).await?;
    Ok(Json(Applied {
        config_generation,
        message,
    }))
}

async fn delete_rule(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        svc.delete_rule(&name, &peer.requester())?;
        Ok(applied(svc, format!("rule {name:?} deleted")))
    })
    .await
    .map(Json)
}

async fn revert_rule(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        svc.revert_rule(&name, &peer.requester())?;
        Ok(applied(
            svc,
            format!("rule {name:?} reverted to the config file"),
        ))
    })
    .await
    .map(Json)
}

async fn revert_all(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        let names = svc.revert_all(&peer.requester())?;
        let message = match names.as_slice() {
            [] => "no live changes: every rule is as the config file says".to_owned(),
            [one] => format!("rule {one:?} reverted to the config file"),
            many => format!(
                "{} rules reverted to the config file: {}",
                many.len(),
                many.join(", ")
            ),
        };
        Ok(applied(svc, message))
    })
    .await
    .map(Json)
}

async fn batch(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Body(changes): Body<Vec<Change>>,
) -> ApiResult<Applied> {
    if changes.len() > MAX_BATCH {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} changes in one batch; at most {MAX_BATCH}: split them into several",
                changes.len()
            ),
        ));
    }
    with_service(&s, move |svc| {
        let n = svc.apply_batch(&changes, &peer.requester())?;
        Ok(applied(svc, batch_message(n)))
    })
    .await
    .map(Json)
}

/// What a batch of `n` changes says once applied.
fn batch_message(n: usize) -> String {
    match n {
        0 => "an empty batch: nothing to change".to_owned(),
        1 => "1 change applied".to_owned(),
        n => format!("{n} changes applied together"),
    }
}

async fn penalize(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Body(request): Body<PenaltyRequest>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        let message = svc.penalize(&request, &peer.requester())?;
        Ok(applied(svc, message))
    })
    .await
    .map(Json)
}

async fn inspect(
    State(s): State<Shared>,
    UrlPath(address): UrlPath<String>,
    Query(flow): Query<super::types::FlowQuery>,
) -> ApiResult<super::types::SourceView> {
    with_service(&s, move |svc| svc.inspect(&address, &flow))
        .await
        .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopQuery {
    limit: Option<usize>,
}

async fn top(State(s): State<Shared>, Query(q): Query<TopQuery>) -> ApiResult<Vec<Offender>> {
    let limit = q.limit.unwrap_or(20).min(1000);
    let offenders = s.offenders.clone();
    with_service(&s, move |svc| {
        // Service, then offenders: the one order any task takes both in.
        let rows = offenders.lock().map_err(|_| ServiceError::Poisoned)?.top(
            limit,
            Instant::now(),
            |key| svc.offender_is_current(key),
        );
        Ok(rows
            .into_iter()
            .map(|r| Offender {
                rule: crate::rules::rule_label(svc.rule_name(r.key.rule_id), r.key.rule_id),
                source: r.key.source(),
                seconds_over: r.seconds_over,
                first_seen_secs_ago: r.first_seen.as_secs(),
                last_seen_secs_ago: r.last_seen.as_secs(),
                exceeded: r.exceeded.iter().map(|e| (*e).to_owned()).collect(),
            })
            .collect())
    })
    .await
    .map(Json)
}

async fn reload(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> ApiResult<Applied> {
    with_service(&s, move |svc| {
        svc.reload(&peer.requester())?;
        Ok(applied(
            svc,
            crate::service::reload_message(&svc.live_overrides()),
        ))
    })
    .await
    .map(Json)
}

async fn detach(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> ApiResult<Applied> {
    tracing::info!(
        target: "audit",
        who = %peer.requester(),
        action = "detach",
        "detach requested: detaching from every interface and removing pins"
    );
    let _ = s.detach.send(true);
    Ok(Json(Applied {
        config_generation: 0,
        message: "detaching from every interface and removing pins; the agent exits".into(),
    }))
}

/// Binds the control socket: a stale socket file is replaced; the socket is
/// made root-only before anything can connect meaningfully.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        // A live agent would answer; a dead one left its socket behind.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is serving {}; stop it first (or give this one another control_socket)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// The client at the other end of a control-socket connection, from the
/// kernel's credentials of the socket (SO_PEERCRED): who asked, for the
/// audit trail.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    uid: Option<u32>,
    pid: Option<i32>,
}

impl Peer {
    fn requester(self) -> Requester {
        // Only root can open the socket; a missing uid is reported as such.
        Requester::peer(self.uid.unwrap_or(u32::MAX), self.pid)
    }
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => Self {
                uid: Some(cred.uid()),
                pid: cred.pid(),
            },
            Err(_) => Self {
                uid: None,
                pid: None,
            },
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    shared: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(
        listener,
        router(shared).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("control API")
}

/// How long a blocking API call may take before a client gives up.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::batch_message;

    #[test]
    fn a_batch_counts_its_changes_in_words() {
        assert_eq!(batch_message(0), "an empty batch: nothing to change");
        assert_eq!(batch_message(1), "1 change applied");
        assert_eq!(batch_message(3), "3 changes applied together");
    }
}
