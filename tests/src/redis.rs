//! A Redis of the test's own: one `redis-server`, or a Redis Cluster of
//! three masters, over plain TCP or TLS, on free loopback ports, in a
//! directory of its own, persisting nothing (a restart is a flushed Redis),
//! with the ACL docs/fleet.md gives the agents' user. Stopped by its PIDs
//! when dropped, its directory removed.
//!
//! Besides the agents' user there is an `admin` user for what the agents
//! must not be able to do (creating the cluster, looking keys up by slot);
//! the `default` user is off.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{agent::free_port, netns::unique_tag};

/// The ACL user the agents log in as, and what it may run: the rules of
/// docs/fleet.md ("The Redis user"), word for word.
pub const USER: &str = "limiter";
pub const ACL: &[&str] = &[
    "~limiter:*",
    "-@all",
    "+hincrby",
    "+hgetall",
    "+pexpire",
    "+zadd",
    "+zremrangebyscore",
    "+zcard",
    "+zrange",
    // Fleet rule changes: the scripts (and the commands they run), the
    // counter check, the notifications.
    "+eval",
    "+hget",
    "+hset",
    "+publish",
    "+subscribe",
    "&limiter:*",
];
/// What a Redis Cluster's client needs besides [`ACL`] (docs/fleet.md):
/// the slot map, and the PING each new node connection starts with.
pub const CLUSTER_ACL: &[&str] = &["+cluster|slots", "+ping"];
/// The user the fixture sets the cluster up with (all commands).
const ADMIN: &str = "admin";

/// How the Redis is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One `redis-server`.
    Single,
    /// A Redis Cluster of three masters, no replicas.
    Cluster,
}

/// How the agents reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Plain,
    /// TLS with a CA of the test's own; Redis asks for no client
    /// certificate.
    Tls,
    /// TLS, and Redis asks every client for a certificate signed by the
    /// test's CA (`tls-auth-clients yes`).
    MutualTls,
}

/// What to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedisKind {
    pub topology: Topology,
    pub transport: Transport,
}

impl RedisKind {
    pub const SINGLE: Self = Self {
        topology: Topology::Single,
        transport: Transport::Plain,
    };
    pub const CLUSTER: Self = Self {
        topology: Topology::Cluster,
        transport: Transport::Plain,
    };
}

/// The files of the test's own CA, in the Redis's directory.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate and key signed by the CA.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Another CA, which signed nothing here: trusting it must fail.
    pub other_ca: PathBuf,
}

/// One `redis-server` process.
struct Node {
    port: u16,
    /// The cluster bus port (cluster only).
    bus_port: u16,
    child: Option<Child>,
}

pub struct Redis {
    pub kind: RedisKind,
    /// The (first) node's port.
    pub port: u16,
    pub dir: PathBuf,
    /// A file holding the password, for `fleet.password_file`.
    pub password_file: PathBuf,
    /// With TLS: the certificates, for `fleet.ca_file` and the rest.
    pub tls: Option<TlsFiles>,
    password: String,
    admin_password: String,
    nodes: Vec<Node>,
}

impl Redis {
    /// Starts a single Redis over plain TCP whose only user (besides the
    /// fixture's admin) is [`USER`] with [`ACL`].
    pub fn start() -> Result<Self> {
        Self::start_kind(RedisKind::SINGLE)
    }

    /// Starts a Redis of `kind`; a cluster is created and waited for until
    /// every node says `cluster_state:ok`.
    pub fn start_kind(kind: RedisKind) -> Result<Self> {
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("limiter-redis-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let password = format!("pw-{tag}-{}", std::process::id());
        let password_file = dir.join("password");
        std::fs::write(&password_file, format!("{password}\n"))?;
        let tls = match kind.transport {
            Transport::Plain => None,
            Transport::Tls | Transport::MutualTls => Some(make_certificates(&dir)?),
        };
        let count = match kind.topology {
            Topology::Single => 1,
            Topology::Cluster => 3,
        };
        let nodes = (0..count)
            .map(|_| {
                Ok(Node {
                    port: free_port()?,
                    bus_port: free_port()?,
                    child: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut redis = Self {
            kind,
            port: nodes[0].port,
            dir,
            password_file,
            tls,
            admin_password: format!("admin-{password}"),
            password,
            nodes,
        };
        redis.restart()?;
        if kind.topology == Topology::Cluster {
            redis.create_cluster()?;
        }
        Ok(redis)
    }

    /// The addresses for `fleet.address`, one per node.
    pub fn addresses(&self) -> Vec<String> {
        let scheme = match self.kind.transport {
            Transport::Plain => "redis",
            Transport::Tls | Transport::MutualTls => "rediss",
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The (first) node's address.
    pub fn address(&self) -> String {
        self.addresses().swap_remove(0)
    }

    /// The `[fleet]` lines that say how to reach this Redis: the address
    /// (a cluster: every node, and `cluster = true`) and the TLS files.
    pub fn fleet_lines(&self) -> String {
        let mut lines = match self.kind.topology {
            Topology::Single => format!("address = {:?}\n", self.address()),
            Topology::Cluster => format!("address = {:?}\ncluster = true\n", self.addresses()),
        };
        if let Some(tls) = &self.tls {
            lines += &format!("ca_file = {:?}\n", tls.ca);
            if self.kind.transport == Transport::MutualTls {
                lines += &format!(
                    "cert_file = {:?}\nkey_file = {:?}\n",
                    tls.client_cert, tls.client_key
                );
            }
        }
        lines
    }

    /// Starts every node (again, after [`Redis::kill`]) and waits until
    /// each accepts connections. A cluster's nodes keep their slots across
    /// a restart (their `nodes.conf`), not their data.
    pub fn restart(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.start_node(i)?;
            }
        }
        Ok(())
    }

    /// Starts node `i` and waits until it accepts connections.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let node_dir = self.node_dir(i);
        std::fs::create_dir_all(&node_dir)?;
        let log = std::fs::File::create(node_dir.join("redis.log"))?;
        let mut user = vec![
            "--user".to_owned(),
            USER.to_owned(),
            "on".to_owned(),
            format!(">{}", self.password),
        ];
        user.extend(ACL.iter().map(|r| (*r).to_owned()));
        if self.kind.topology == Topology::Cluster {
            user.extend(CLUSTER_ACL.iter().map(|r| (*r).to_owned()));
        }
        let port = self.nodes[i].port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&node_dir)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--user", "default", "off"])
            .args(["--user", ADMIN, "on"])
            .arg(format!(">{}", self.admin_password))
            .args(["~*", "&*", "+@all"])
            .args(&user);
        match &self.tls {
            None => {
                cmd.args(["--port", &port]);
            }
            Some(tls) => {
                let auth = match self.kind.transport {
                    Transport::MutualTls => "yes",
                    _ => "no",
                };
                cmd.args(["--port", "0", "--tls-port", &port])
                    .arg("--tls-cert-file")
                    .arg(&tls.server_cert)
                    .arg("--tls-key-file")
                    .arg(&tls.server_key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", auth]);
                if self.kind.topology == Topology::Cluster {
                    cmd.args(["--tls-cluster", "yes"]);
                }
            }
        }
        if self.kind.topology == Topology::Cluster {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-port", &self.nodes[i].bus_port.to_string()])
                .args(["--cluster-node-timeout", "2000"]);
        }
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context(
                "starting redis-server (Debian package redis-server; ./x setup installs it)",
            )?;
        self.nodes[i].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server exited ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server did not listen within 10 s: {}", self.log())
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        match self.kind.topology {
            Topology::Single => self.dir.clone(),
            Topology::Cluster => self.dir.join(format!("node{i}")),
        }
    }

    /// `redis-cli --cluster create` over the three nodes, as the admin;
    /// waits until every node says the cluster is ok.
    fn create_cluster(&self) -> Result<()> {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(nodes.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = self
            .cli_command(self.port, ADMIN, &self.admin_password, &args)
            .output()?;
        ensure!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ok = (0..self.nodes.len()).all(|i| {
                self.admin_cli_at(i, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the cluster did not reach cluster_state:ok within 20 s: {}",
            self.log()
        )
    }

    /// Kills every node we started (SIGKILL, by its PID) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.kill_node(i)?;
        }
        Ok(())
    }

    /// Kills node `i` (SIGKILL, by its PID) and reaps it.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// `redis-cli` against the node at `port` as `user`, over TLS if this
    /// Redis is (with the client certificate); the password from the
    /// environment, never argv.
    fn cli_command(&self, port: u16, user: &str, password: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &port.to_string(), "--user", user, "--no-auth-warning"])
            .env("REDISCLI_AUTH", password);
        if let Some(tls) = &self.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        cmd.args(args);
        cmd
    }

    /// Runs `redis-cli` as [`USER`] against this Redis (a cluster: its
    /// first node, following redirects); its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut all = Vec::new();
        if self.kind.topology == Topology::Cluster {
            all.push("-c");
        }
        all.extend_from_slice(args);
        let out = self
            .cli_command(self.port, USER, &self.password, &all)
            .output()
            .context("running redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `redis-cli` as the fixture's admin against node `i`, without
    /// following redirects; its output.
    pub fn admin_cli_at(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self
            .cli_command(self.nodes[i].port, ADMIN, &self.admin_password, args)
            .output()
            .context("running redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// How many nodes there are.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Every node's log.
    pub fn log(&self) -> String {
        (0..self.nodes.len())
            .map(|i| {
                std::fs::read_to_string(self.node_dir(i).join("redis.log")).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA of the test's own, a server certificate for 127.0.0.1 and a client
/// certificate signed by it, and a second CA that signed neither: with
/// `openssl` (Debian package openssl), EC P-256 keys (fast to make).
fn make_certificates(dir: &Path) -> Result<TlsFiles> {
    let path = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (Debian package openssl; ./x setup installs it)")?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (ca, name) in [("ca", "limiter test CA"), ("other-ca", "limiter other CA")] {
        let (subject, key, cert) = (
            format!("/CN={name}"),
            format!("{ca}.key"),
            format!("{ca}.pem"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout", &key, "-out", &cert, "-days", "2", "-subj", &subject,
        ]);
        openssl(&args)?;
    }
    std::fs::write(path("server.ext"), "subjectAltName = IP:127.0.0.1\n")?;
    std::fs::write(path("client.ext"), "extendedKeyUsage = clientAuth\n")?;
    for (who, subject) in [
        ("server", "/CN=127.0.0.1"),
        ("client", "/CN=limiter-gateway"),
    ] {
        let key = format!("{who}.key");
        let csr = format!("{who}.csr");
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(&args)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
            "-out",
            &format!("{who}.pem"),
        ])?;
    }
    Ok(TlsFiles {
        ca: path("ca.pem"),
        server_cert: path("server.pem"),
        server_key: path("server.key"),
        client_cert: path("client.pem"),
        client_key: path("client.key"),
        other_ca: path("other-ca.pem"),
    })
}
