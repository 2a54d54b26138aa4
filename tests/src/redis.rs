//! A `redis-server` of the test's own: on a free loopback port, in a
//! directory of its own, persisting nothing (a restart is a flushed Redis),
//! with the ACL docs/fleet.md gives the agents' user. Stopped by its PID
//! when dropped, its directory removed.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

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
    // Fleet rule changes: the scripts (and the commands they run), the
    // counter check, the notifications.
    "+eval",
    "+hget",
    "+hset",
    "+publish",
    "+subscribe",
    "&limiter:*",
];

pub struct Redis {
    pub port: u16,
    pub dir: PathBuf,
    /// A file holding the password, for `fleet.password_file`.
    pub password_file: PathBuf,
    password: String,
    child: Option<Child>,
}

impl Redis {
    /// Starts a Redis whose only user is [`USER`] with [`ACL`].
    pub fn start() -> Result<Self> {
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("limiter-redis-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let password = format!("pw-{tag}-{}", std::process::id());
        let password_file = dir.join("password");
        std::fs::write(&password_file, format!("{password}\n"))?;
        let mut redis = Self {
            port: free_port()?,
            dir,
            password_file,
            password,
            child: None,
        };
        redis.restart()?;
        Ok(redis)
    }

    /// The address for `fleet.address`.
    pub fn address(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, after [`Redis::kill`]) and waits until it
    /// accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("redis.log"))?;
        let mut user = vec![
            "--user".to_owned(),
            USER.to_owned(),
            "on".to_owned(),
            format!(">{}", self.password),
        ];
        user.extend(ACL.iter().map(|r| (*r).to_owned()));
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--user", "default", "off"])
            .args(&user)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context(
                "starting redis-server (Debian package redis-server; ./x setup installs it)",
            )?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server exited ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server did not listen within 10 s: {}", self.log())
    }

    /// Kills the server we started (SIGKILL, by its PID) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Runs `redis-cli` as [`USER`] against this server; its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &self.port.to_string(),
                "--user",
                USER,
                "--no-auth-warning",
            ])
            .env("REDISCLI_AUTH", &self.password)
            .args(args)
            .output()
            .context("running redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
