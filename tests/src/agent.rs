//! The real `limiter-agent` binary on a namespace pair: start it with a
//! config, drive it with its own CLI, kill it, and clean up everything it
//! pinned when the test ends.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Pair, unique_tag};

/// The agent binary: `$LIMITER_AGENT_BIN`, or `limiter-agent` in the cargo
/// target directory this executable was built into (`./x test` and
/// `./x demo` build it first).
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LIMITER_AGENT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // A test runs from target/<profile>/deps/, the demo from target/<profile>/.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("limiter-agent"))
        .collect();
    match candidates.iter().find(|c| c.exists()) {
        Some(bin) => bin.clone(),
        None => panic!(
            "limiter-agent not found (looked at {candidates:?}): build it first \
             (`cargo build -p limiter-agent`; ./x test does) or set LIMITER_AGENT_BIN"
        ),
    }
}

/// A namespace pair, a working directory, and a pin directory of our own.
pub struct AgentEnv {
    pub pair: Pair,
    pub dir: PathBuf,
    pub pin_path: PathBuf,
    pub socket: PathBuf,
    pub state_file: PathBuf,
    pub config: PathBuf,
    /// Loopback port of the agent's metrics endpoint.
    pub metrics_port: u16,
    /// `[metrics] top_k` written by `header`.
    pub top_k: usize,
    /// `[capacity] rules` written by `header`.
    pub max_rules: u32,
    /// `[capacity] sources` written by `header`.
    pub max_sources: u32,
    /// The interface the agent attaches to and its namespace: the pair's
    /// gateway side unless a test points it elsewhere.
    pub interface: String,
    pub interface_netns: String,
    /// Whether the interface also gets the TC program (`tc = true`).
    pub tc: bool,
    /// The interface's `xdp` setting ("native" unless a test changes it).
    pub xdp: &'static str,
    agent: Option<Child>,
}

impl AgentEnv {
    pub fn new() -> Result<Self> {
        let pair = Pair::create()?;
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("limiter-test-{tag}"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            interface: pair.gw_if.clone(),
            interface_netns: pair.gateway.name.clone(),
            tc: false,
            xdp: "native",
            pin_path: PathBuf::from(format!("/sys/fs/bpf/limiter-test-{tag}")),
            socket: dir.join("control.sock"),
            state_file: dir.join("state.json"),
            config: dir.join("limiter.toml"),
            dir,
            pair,
            metrics_port: free_port()?,
            top_k: 20,
            max_rules: 256,
            max_sources: 65_536,
            agent: None,
        })
    }

    /// The `[agent]`, `[capacity]` and `[[interface]]` parts for this
    /// environment, to put before a test's rules.
    pub fn header(&self) -> String {
        format!(
            "[agent]\npin_path = {:?}\nstate_file = {:?}\ncontrol_socket = {:?}\n\
             [metrics]\naddress = \"127.0.0.1:{}\"\ntop_k = {}\n\
             [capacity]\nrules = {}\nsources = {}\n\
             [[interface]]\nname = {:?}\nnetns = {:?}\nxdp = {:?}\ntc = {}\n",
            self.pin_path,
            self.state_file,
            self.socket,
            self.metrics_port,
            self.top_k,
            self.max_rules,
            self.max_sources,
            self.interface,
            self.interface_netns,
            self.xdp,
            self.tc
        )
    }

    pub fn write_config(&self, rules: &str) -> Result<()> {
        std::fs::write(&self.config, format!("{}{rules}", self.header()))?;
        Ok(())
    }

    /// Starts the agent on the config file and waits for its socket.
    pub fn start(&mut self) -> Result<()> {
        self.start_with(&[])
    }

    /// [`AgentEnv::start`] with extra environment variables for the agent
    /// (e.g. `LIMITER_CRASH_AT` for a fault-injection build).
    pub fn start_with(&mut self, vars: &[(&str, &str)]) -> Result<()> {
        self.start_under(&[], vars)
    }

    /// [`AgentEnv::start_with`] with the agent run by `wrapper`, a command
    /// that execs it (e.g. `ip netns exec <ns>`), so signals still reach it.
    pub fn start_under(&mut self, wrapper: &[&str], vars: &[(&str, &str)]) -> Result<()> {
        let runs = std::fs::read_dir(&self.dir)?.count();
        let log = std::fs::File::create(self.dir.join(format!("agent-{runs}.log")))?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        let child = command
            .args(["run", "--log-format", "text", "--config"])
            .arg(&self.config)
            .env("LIMITER_LOG", "info")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting limiter-agent")?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.agent.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("limiter-agent exited early ({status}):\n{}", self.logs());
            }
            if self
                .cli(&["status"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("limiter-agent did not answer within 30 s:\n{}", self.logs())
    }

    /// What the state file holds, its journal replayed (as the next agent
    /// would read it); panics on a file the agent would refuse.
    pub fn saved_state(&self) -> limiter_agent::state::State {
        limiter_agent::state::State::load(&self.state_file)
            .unwrap_or_else(|e| panic!("reading the state file: {e}"))
    }

    /// Everything the agents of this environment logged.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.filter_map(std::result::Result::ok) {
                if e.file_name().to_string_lossy().starts_with("agent-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    pub fn pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Sends `signal` to the agent we started (and only to it).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("no agent running");
        };
        // SAFETY: kill(2) on the pid of our own child process.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.agent.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Waits for the agent to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.agent.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.agent = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent still running after {timeout:?}")
    }

    /// Runs the CLI against this environment's agent.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(agent_binary())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running the limiter-agent CLI")
    }

    /// Runs the CLI and fails unless it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        match self.cli(args) {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            Ok(out) => panic!(
                "limiter-agent {args:?} failed ({}): {}{}\nagent log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            ),
            Err(e) => panic!("limiter-agent {args:?}: {e:#}"),
        }
    }

    /// `--json` output of the CLI, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.cli_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `GET http://127.0.0.1:{port}{path}`: the body, or an error.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    let (code, body) = http_status(port, path)?;
    if code != 200 {
        bail!("GET {path}: status {code}: {body}");
    }
    Ok(body)
}

/// `GET http://127.0.0.1:{port}{path}`: the status code and the body.
pub fn http_status(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header in the answer")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// One HTTP/1.0 request on the agent's control socket: the status code
/// and the body.
pub fn api_call(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let answer = api_exchange(socket, method, path, Some("application/json"), body)?;
    Ok((answer.code, answer.body))
}

/// An answer of the control API.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    /// The status line and the headers, as sent.
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// One HTTP/1.0 request on the agent's control socket with the given
/// `Content-Type` header (none when `None`).
pub fn api_exchange(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<&str>,
) -> Result<Answer> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    let content_type = content_type
        .map(|t| format!("Content-Type: {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: limiter\r\n{content_type}\
         Content-Length: {}\r\n\r\n",
        body.len()
    )?;
    // A refused oversized body may close the socket before all of it is
    // written: the answer still counts.
    let _ = stream.write_all(body.as_bytes());
    // A server that refused the body unread resets the connection after its
    // answer (AF_UNIX reports ECONNRESET once the queued data is read):
    // that ends the answer like EOF does.
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !response.is_empty() => {
                break;
            }
            Err(e) => return Err(e).context("reading the answer"),
        }
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header in the answer")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok(Answer {
        code,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

impl AgentEnv {
    /// A request on this environment's control socket.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        api_call(&self.socket, method, path, body)
    }

    /// A request on this environment's control socket with the given
    /// `Content-Type` (none when `None`), answered with its headers.
    pub fn api_with(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
    ) -> Result<Answer> {
        api_exchange(&self.socket, method, path, content_type, body)
    }

    /// The rules in force in the kernel, read from the pinned maps (not
    /// through the agent): the active generation's slots in use.
    pub fn kernel_rules(&self) -> Result<Vec<limiter_common::Rule>> {
        use aya::maps::{Array, Map, MapData};
        use limiter_common::map_names;
        let open = |name: &str| -> Result<Map> {
            let data = MapData::from_pin(self.pin_path.join("maps").join(name))
                .with_context(|| format!("opening pinned map {name}"))?;
            Ok(Map::Array(data))
        };
        let active: Array<_, u32> = open(map_names::ACTIVE)?.try_into()?;
        let rules: Array<_, limiter_common::Rule> = open(map_names::RULES)?.try_into()?;
        let generation = active.get(&0, 0)? & limiter_common::active::GENERATION;
        let mut out = Vec::new();
        for id in 0..self.max_rules {
            let rule = rules.get(&(generation * self.max_rules + id), 0)?;
            if rule.in_use != 0 {
                out.push(rule);
            }
        }
        Ok(out)
    }

    /// The agent's current `/metrics` text.
    pub fn scrape(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics")
            .with_context(|| format!("scraping the agent; its log:\n{}", self.logs()))
    }
}

impl Drop for AgentEnv {
    fn drop(&mut self) {
        let _ = self.kill9();
        // Remove whatever an agent pinned for this environment.
        let _ = Command::new(agent_binary())
            .args(["--socket"])
            .arg(&self.socket)
            .args(["detach", "--pin-path"])
            .arg(&self.pin_path)
            .output();
        let _ = std::fs::remove_dir_all(&self.pin_path);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
