//! The CLI's side of the control API.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use super::{server::CLIENT_TIMEOUT, types::ErrorBody};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent is not there (exit code 3).
    #[error(
        "cannot reach the agent at {socket}: {reason}. Is `limiter-agent run` running (as root)?"
    )]
    Unreachable { socket: PathBuf, reason: String },
    /// The agent refused the request as wrong (exit code 2).
    #[error("{0}")]
    Rejected(String),
    /// The agent failed (exit code 1).
    #[error("the agent failed: {0}")]
    Failed(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } => 3,
            ClientError::Rejected(_) => 2,
            ClientError::Failed(_) => 1,
        }
    }
}

pub struct Client {
    socket: PathBuf,
}

/// Percent-encodes a path segment (rule names may hold '/').
pub fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, Option::<&()>::None).await
    }

    pub async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            socket: self.socket.clone(),
            reason,
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let bytes = match body {
            Some(body) => serde_json::to_vec(body)
                .map_err(|e| ClientError::Rejected(format!("encoding the request: {e}")))?,
            None => Vec::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "limiter")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Rejected(e.to_string()))?;
        let response = tokio::time::timeout(CLIENT_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| ClientError::Failed(format!("no answer within {CLIENT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Failed(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| ClientError::Failed(format!("unexpected answer: {e}")));
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
        if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT {
            Err(ClientError::Rejected(message))
        } else {
            Err(ClientError::Failed(message))
        }
    }
}
