//! How the control API refuses: one JSON body, `{"error": ...}`, for every
//! refusal, ours (`ApiError`) or axum's own (unknown path, wrong method, bad
//! query or path parameter, a body that cannot be read).

use axum::{
    Json,
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use super::types::ErrorBody;
use crate::service::{ErrorKind, ServiceError};

pub(super) struct ApiError(pub(super) StatusCode, pub(super) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let code = match e.kind() {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(code, e.to_string())
    }
}

pub(super) type ApiResult<T> = Result<Json<T>, ApiError>;

/// A JSON request body. Unlike axum's `Json`, a body that cannot be read
/// (too large, not JSON, the wrong shape) is refused with the same JSON
/// error body as every other refusal, and the status axum chose (400, 413,
/// 415 or 422).
pub(super) struct Body<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::MissingJsonContentType(rejection)) => Err(ApiError(
                rejection.status(),
                "this call takes a JSON body: send it with the header \
                 `Content-Type: application/json`"
                    .to_owned(),
            )),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError(
                rejection.status(),
                format!(
                    "the request body is over {} MiB: send the changes in several calls \
                     (`POST /v1/batch` takes up to {} changes)",
                    super::server::MAX_BODY / (1024 * 1024),
                    super::server::MAX_BATCH
                ),
            )),
            Err(rejection) => Err(ApiError(rejection.status(), rejection.body_text())),
        }
    }
}

/// Refuses a query on a route that takes none, rather than ignoring it: a
/// client that sends one expects it to mean something.
pub(super) async fn no_query(request: Request, next: Next) -> Response {
    match request.uri().query() {
        Some(query) if !query.is_empty() => ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} takes no query parameters; remove `?{query}`",
                request.uri().path()
            ),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

/// Error bodies axum writes itself are not JSON: an unknown path (404, empty),
/// a wrong method (405, empty), a bad query or path parameter (400, plain
/// text). This gives them the API's `{"error": ...}` body, keeping the status
/// and headers (`Allow` among them). Errors the handlers answer are JSON
/// already and pass unchanged.
pub(super) async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // axum's own error texts are a line or two; an unreadable one is dropped.
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let allow = parts
        .headers
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let error = error_message(status, &method, &path, allow.as_deref(), &text);
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    (parts, Json(ErrorBody { error })).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The message for an error axum answered without one of ours.
fn error_message(
    status: StatusCode,
    method: &Method,
    path: &str,
    allow: Option<&str>,
    text: &str,
) -> String {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allow.map_or_else(String::new, |a| {
                format!(
                    "; it accepts {}",
                    a.split(',').map(str::trim).collect::<Vec<_>>().join(", ")
                )
            });
            format!("{method} is not allowed on {path}{allowed}")
        }
        StatusCode::NOT_FOUND if text.is_empty() => {
            format!("no such route: {method} {path}; the routes are listed in docs/api.md")
        }
        _ if text.is_empty() => format!(
            "{method} {path}: {}",
            status.canonical_reason().unwrap_or("refused")
        ),
        _ => format!("{method} {path}: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_method_names_the_methods_the_route_accepts() {
        let m = error_message(
            StatusCode::METHOD_NOT_ALLOWED,
            &Method::PUT,
            "/v1/status",
            Some("GET,HEAD"),
            "",
        );
        assert_eq!(m, "PUT is not allowed on /v1/status; it accepts GET, HEAD");
    }

    #[test]
    fn an_unknown_path_is_named() {
        let m = error_message(StatusCode::NOT_FOUND, &Method::GET, "/v2/x", None, "");
        assert!(m.contains("no such route: GET /v2/x"), "{m}");
    }

    #[test]
    fn axums_own_text_is_kept() {
        let m = error_message(
            StatusCode::BAD_REQUEST,
            &Method::GET,
            "/v1/top",
            None,
            "Failed to deserialize query string: unknown field `x`",
        );
        assert!(m.ends_with("unknown field `x`"), "{m}");
        let m = error_message(StatusCode::BAD_REQUEST, &Method::GET, "/v1/top", None, "");
        assert_eq!(m, "GET /v1/top: Bad Request");
    }
}
