//! The connection to the fleet's Redis: one node or a Redis Cluster, over
//! plain TCP or TLS, behind one type the sync code sends its pipeline
//! through (docs/fleet.md, "The client").
//!
//! Everything secret or file-based (the password, the CA, the client
//! certificate and key) is read once, at start, by [`Connector::prepare`]:
//! a file that cannot be read or holds no PEM stops the start with the
//! field named, before anything is attached. The password goes into the
//! client from code, never through a URL, and is never printed (the
//! `Connector` has no `Debug`).

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionAddr, ConnectionInfo,
    IntoConnectionInfo as _, RedisConnectionInfo, RedisFuture, TlsCertificates, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use crate::config::{FleetConfig, FleetTls, RedisNode};

/// How often the cluster client retries a command itself (a MOVED or ASK
/// redirect, a node that just went away) before the sync sees the error;
/// the sync's own timeout of one interval bounds it anyway.
const CLUSTER_RETRIES: u32 = 2;
/// The cluster client's wait between those retries, in milliseconds.
const CLUSTER_RETRY_WAIT_MS: (u64, u64) = (10, 100);

/// A connection to the fleet's Redis: the sync code is the same for both.
#[derive(Clone)]
pub enum Connection {
    /// One Redis node (multiplexed: one socket).
    Single(MultiplexedConnection),
    /// A Redis Cluster: the client keeps a connection per master and
    /// routes the fleet's pipeline to the master of its keys' slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The client of one node or of a cluster.
#[derive(Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per agent, made once at start: its size does not matter"
)]
enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// Makes connections to the fleet's Redis as `[fleet]` says, with the
/// secrets read at start.
#[derive(Clone)]
pub struct Connector {
    client: Client,
    /// For subscribing to notifications: the node itself, or a cluster's
    /// first seed node (a Redis Cluster passes every PUBLISH to every
    /// node, so any one hears them all).
    subscriber: redis::Client,
    /// For connecting and for every answer: one sync interval (a sync that
    /// takes longer is late anyway, and the next one is due).
    timeout: Duration,
    /// Whether the nodes are reached over TLS (errors then name the files).
    tls: bool,
}

impl Connector {
    /// Reads `password_file` and the TLS files and builds the client; any
    /// problem names its field and what to do.
    pub fn prepare(config: &FleetConfig) -> anyhow::Result<Self> {
        let password = read_password(config)?;
        let certificates = match &config.tls {
            Some(tls) => {
                // redis's rustls comes without a crypto provider: ring. An
                // error only says one is installed already.
                let _ = rustls::crypto::ring::default_provider().install_default();
                Some(read_tls_files(tls)?)
            }
            None => None,
        };
        let timeout = config.sync_interval;
        let (client, subscriber) = build_client(config, password.as_deref(), certificates, timeout)
            .map_err(|e| anyhow::anyhow!("fleet.address {}: {e}", config.address))?;
        Ok(Self {
            client,
            subscriber,
            timeout,
            tls: config.tls.is_some(),
        })
    }

    /// The longest a connection attempt or an answer may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same Redis, with connections (to one node) bounded by
    /// `timeout` instead.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }

    /// A connection of its own for subscribing to notifications.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        self.subscriber.get_async_pubsub().await
    }

    /// Connects (a cluster: to a seed node, then learns the slots and
    /// connects to the masters), within the connection timeout per node;
    /// the caller bounds the whole with [`Connector::timeout`].
    pub async fn connect(&self) -> redis::RedisResult<Connection> {
        match &self.client {
            Client::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Connection::Single)
            }
            Client::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
        }
    }

    /// `error` as an operator reads it: a certificate the client refused
    /// says which setting decides what is trusted.
    pub fn explain(&self, error: &redis::RedisError) -> String {
        let text = error.to_string();
        let certificate = [
            "certificate",
            "UnknownIssuer",
            "NotValidForName",
            "tls handshake",
        ]
        .iter()
        .any(|w| text.contains(w));
        if self.tls && certificate {
            format!(
                "{text} (TLS: fleet.ca_file must hold the CA that signed the Redis server's \
                 certificate, whose names must include the host in fleet.address)"
            )
        } else {
            text
        }
    }
}

/// The node's address as redis-rs takes it.
fn node_info(node: &RedisNode, tls: bool) -> redis::RedisResult<ConnectionInfo> {
    let addr = if tls {
        ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(node.host.clone(), node.port)
    };
    addr.into_connection_info()
}

fn build_client(
    config: &FleetConfig,
    password: Option<&str>,
    certificates: Option<TlsCertificates>,
    timeout: Duration,
) -> redis::RedisResult<(Client, redis::Client)> {
    let tls = certificates.is_some();
    let nodes = config
        .nodes
        .iter()
        .map(|node| node_info(node, tls))
        .collect::<redis::RedisResult<Vec<_>>>()?;
    let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    let Some(first) = nodes.first().cloned() else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "no Redis address",
        )));
    };
    let info = first.set_redis_settings(settings);
    let single = match certificates.clone() {
        Some(certificates) => redis::Client::build_with_tls(info, certificates),
        None => redis::Client::open(info),
    }?;
    if !config.cluster {
        return Ok((Client::Single(single.clone()), single));
    }
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_RETRY_WAIT_MS.0)
        .max_retry_wait(CLUSTER_RETRY_WAIT_MS.1);
    if let Some(user) = &config.username {
        builder = builder.username(user);
    }
    if let Some(password) = password {
        builder = builder.password(password);
    }
    if let Some(certificates) = certificates {
        builder = builder.certs(certificates);
    }
    Ok((Client::Cluster(builder.build()?), single))
}

/// The password in `fleet.password_file` (its first line), if one is named.
fn read_password(config: &FleetConfig) -> anyhow::Result<Option<String>> {
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
        bail!(
            "fleet.password_file {} is empty: write the Redis password on its first line, \
             or remove password_file",
            path.display()
        );
    }
    Ok(Some(password.to_owned()))
}

/// The CA and client certificate files, read and checked: each must hold
/// what its field says, in PEM.
fn read_tls_files(tls: &FleetTls) -> anyhow::Result<TlsCertificates> {
    let root_cert = match &tls.ca_file {
        Some(path) => {
            let pem = read_file("ca_file", path, "the CA certificates, PEM")?;
            check_certificates("ca_file", path, &pem)?;
            Some(pem)
        }
        None => None,
    };
    let client_tls = match &tls.client {
        Some((cert, key)) => {
            let client_cert = read_file("cert_file", cert, "this gateway's certificate, PEM")?;
            check_certificates("cert_file", cert, &client_cert)?;
            let client_key = read_file("key_file", key, "this gateway's private key, PEM")?;
            PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                anyhow::anyhow!(
                    "fleet.key_file {}: no private key in it ({e}): write the key of \
                     fleet.cert_file's certificate, PEM (-----BEGIN PRIVATE KEY-----)",
                    key.display()
                )
            })?;
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        None => None,
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}

fn read_file(field: &str, path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "reading fleet.{field} {}: it holds {what}, readable by the agent",
            path.display()
        )
    })
}

/// Checks that `pem` holds at least one certificate and nothing broken.
fn check_certificates(field: &str, path: &Path, pem: &[u8]) -> anyhow::Result<()> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| {
            anyhow::anyhow!(
                "fleet.{field} {}: a certificate in it cannot be read ({e}): write \
                 certificates in PEM (-----BEGIN CERTIFICATE-----)",
                path.display()
            )
        })?;
        count += 1;
    }
    if count == 0 {
        bail!(
            "fleet.{field} {} holds no certificate: write certificates in PEM \
             (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config(address: &str, cluster: bool, tls: Option<FleetTls>) -> FleetConfig {
        FleetConfig {
            address: address.into(),
            nodes: vec![RedisNode {
                host: "127.0.0.1".into(),
                port: 6379,
            }],
            cluster,
            tls,
            name: "edge".into(),
            gateway: "gw1".into(),
            sync_interval: Duration::from_millis(250),
            username: Some("limiter".into()),
            password_file: None,
        }
    }

    fn temp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("limiter-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn single_and_cluster_clients_build_without_connecting() {
        let single = Connector::prepare(&config("redis://127.0.0.1:6379", false, None)).unwrap();
        assert!(matches!(single.client, Client::Single(_)));
        let cluster = Connector::prepare(&config("redis://127.0.0.1:6379", true, None)).unwrap();
        assert!(matches!(cluster.client, Client::Cluster(_)));
        assert_eq!(cluster.timeout(), Duration::from_millis(250));
    }

    #[test]
    fn tls_files_are_read_at_start_and_named_when_wrong() {
        let missing = FleetTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            client: None,
        };
        let err = Connector::prepare(&config("rediss://h", false, Some(missing)))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("fleet.ca_file /nonexistent/ca.pem"), "{err}");
        let empty = FleetTls {
            ca_file: Some(temp("empty.pem", "not a certificate\n")),
            client: None,
        };
        let err = Connector::prepare(&config("rediss://h", true, Some(empty)))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("fleet.ca_file") && err.contains("holds no certificate"),
            "{err}"
        );
    }

    #[test]
    fn a_password_file_must_hold_a_password() {
        let mut c = config("redis://h", false, None);
        c.password_file = Some(temp("empty-password", "\n"));
        let err = Connector::prepare(&c).err().unwrap().to_string();
        assert!(
            err.contains("fleet.password_file") && err.contains("empty"),
            "{err}"
        );
        c.password_file = Some(temp("password", "hunter2\nignored\n"));
        assert_eq!(read_password(&c).unwrap().as_deref(), Some("hunter2"));
    }
}
