//! `limiter-agent`: the daemon (`run`) and the CLI that talks to it.
//!
//! Exit codes: 0 done; 1 the agent or the system failed; 2 bad input (a bad
//! argument, or a request the agent refused); 3 the agent is unreachable.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use limiter_agent::{
    cli,
    config::{Config, defaults},
    daemon,
};

#[derive(Parser)]
#[command(
    name = "limiter-agent",
    version,
    about = "Kernel-level per-client traffic budgets"
)]
struct Cli {
    /// The running agent's control socket, for client commands (default:
    /// the `control_socket` of --config, else /run/limiter/control.sock)
    #[arg(long, global = true, env = "LIMITER_SOCKET")]
    socket: Option<PathBuf>,
    /// The configuration file: `run` enforces it (without one: the embedded,
    /// monitor-only default), `check` checks it, and client commands find
    /// the agent (its control socket and pin path) through it
    #[arg(long, short, global = true, env = "LIMITER_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, attach, and serve until SIGTERM/SIGINT (SIGHUP reloads)
    Run {
        /// Also attach to this interface (repeatable), in auto XDP mode
        #[arg(long = "interface", short = 'i')]
        interfaces: Vec<String>,
        /// Log format
        #[arg(long, value_enum, default_value_t = cli::LogFormat::Auto)]
        log_format: cli::LogFormat,
    },
    /// Validate a configuration file and print what it would enforce
    Check,
    /// Re-read the configuration file (like SIGHUP); a bad file changes nothing
    Reload,
    /// Interfaces, modes, program ids, rule and source counts
    Status,
    /// List, show, add, change or delete rules
    #[command(subcommand)]
    Rules(Box<RulesCommand>),
    /// Put a temporary budget (or a deny) on a prefix; it expires by itself
    Penalize(limiter_agent::api::types::PenaltyRequest),
    /// Which rule a flow from a source gets and why, its bucket, and whether
    /// it is over budget
    Inspect {
        address: String,
        #[command(flatten)]
        flow: limiter_agent::api::types::FlowQuery,
    },
    /// Sources most over budget (from the kernel's events)
    Top {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Refresh every second, like top (Ctrl-C to quit)
        #[arg(long)]
        watch: bool,
    },
    /// Detach from every interface and remove all pins (stops enforcement)
    Detach {
        /// Pin directory, when no agent is running (default: the `pin_path`
        /// of --config, else /sys/fs/bpf/limiter)
        #[arg(long)]
        pin_path: Option<PathBuf>,
    },
    /// Print the shell completion script, e.g. `limiter-agent completions
    /// bash > /usr/share/bash-completion/completions/limiter-agent`
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (limiter-agent.1 and one per command) into DIR
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// All rules in force with their counters
    List,
    /// One rule
    Show { name: String },
    /// Add a rule
    Add(cli::RuleArgs),
    /// Change fields of a rule (only those given); with --fleet, the
    /// budgets of a fleet-wide rule on every gateway of the fleet
    Change(cli::ChangeArgs),
    /// Delete a rule
    Delete { name: String },
    /// Drop a rule's live change: it is again what the config file says
    /// (a rule added live goes away)
    Revert {
        /// The rule to revert
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Revert every live change (penalties stay until they expire)
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // Client output piped into `head` or `grep -m1` ends quietly when
        // the reader goes, as with any Unix tool, instead of panicking on
        // EPIPE. (The daemon keeps SIGPIPE ignored: its sockets need it.)
        // SAFETY: signal(2) with a standard disposition, before any thread.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(dispatch(cli))
}

/// Where client commands find the agent: (control socket, pin path), from
/// the flags, else the config file, else the defaults.
fn agent_paths(cli: &Cli) -> Result<(PathBuf, PathBuf), String> {
    let from_file = match &cli.config {
        Some(path) => Some(Config::load_agent_section(path).map_err(|e| {
            format!("{e}\n(--config is read to find the agent's control socket and pins)")
        })?),
        None => None,
    };
    let socket = cli
        .socket
        .clone()
        .or_else(|| from_file.as_ref().map(|a| a.control_socket.clone()))
        .unwrap_or_else(|| PathBuf::from(defaults::CONTROL_SOCKET));
    let pins = from_file
        .map(|a| a.pin_path)
        .unwrap_or_else(|| PathBuf::from(defaults::PIN_PATH));
    Ok((socket, pins))
}

async fn dispatch(cli: Cli) -> ExitCode {
    let out = cli::Output { json: cli.json };
    if let Command::Run { .. } = cli.command
        && cli.socket.is_some()
    {
        eprintln!(
            "error: `run` serves the control socket its config names ([agent] control_socket); \
             --socket (or LIMITER_SOCKET) only tells client commands where to find it. Set \
             control_socket in the config file instead"
        );
        return ExitCode::from(2);
    }
    // Made from this binary's own definition; no agent involved.
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            cli::manual::completions(&mut command, *shell, &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            let command = <Cli as clap::CommandFactory>::command();
            return match cli::manual::write_man_pages(&command, dir) {
                Ok(pages) => {
                    println!("wrote {} man pages into {}", pages.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    // `run` and `check` use --config as the file to enforce or check.
    let is_client = !matches!(cli.command, Command::Run { .. } | Command::Check);
    let paths = if is_client {
        agent_paths(&cli)
    } else {
        Ok((PathBuf::new(), PathBuf::new()))
    };
    let (socket, config_pins) = match paths {
        Ok(paths) => paths,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let client = limiter_agent::api::client::Client::new(&socket);
    let config = cli.config;
    let result = match cli.command {
        Command::Run {
            interfaces,
            log_format,
        } => {
            cli::init_logging(log_format);
            return match daemon::run(daemon::RunOptions { config, interfaces }).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Check => {
            let Some(config) = config else {
                eprintln!("error: check needs the file to check: --config FILE");
                return ExitCode::from(2);
            };
            return match Config::load(&config) {
                Ok(c) => {
                    cli::print_check(&c, &out);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Reload => cli::reload(&client, &out).await,
        Command::Status => cli::status(&client, &out).await,
        Command::Rules(rules) => match *rules {
            RulesCommand::List => cli::list(&client, &out).await,
            RulesCommand::Show { name } => cli::show(&client, &out, &name).await,
            RulesCommand::Add(args) => cli::add(&client, &out, args).await,
            RulesCommand::Change(args) => cli::change(&client, &out, args).await,
            RulesCommand::Delete { name } => cli::delete(&client, &out, &name).await,
            RulesCommand::Revert { name, .. } => cli::revert(&client, &out, name.as_deref()).await,
        },
        Command::Penalize(request) => cli::penalize(&client, &out, &request).await,
        Command::Inspect { address, flow } => cli::inspect(&client, &out, &address, &flow).await,
        Command::Top { limit, watch } => cli::top(&client, &out, limit, watch).await,
        Command::Detach { pin_path } => {
            let pin_path = pin_path.unwrap_or(config_pins);
            cli::detach(&client, &out, &pin_path).await
        }
        Command::Completions { .. } | Command::Man { .. } => return ExitCode::SUCCESS,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every command, subcommand and long flag of the definition, with the
    /// command path each belongs to.
    fn everything(command: &clap::Command, path: &str) -> Vec<(String, Vec<String>)> {
        let flags = command
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        let mut out = vec![(path.to_owned(), flags)];
        for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
            out.extend(everything(sub, &format!("{path}-{}", sub.get_name())));
        }
        out
    }

    #[test]
    fn man_pages_cover_every_command_and_flag() {
        let command = super::Cli::command();
        let dir = std::env::temp_dir().join(format!("limiter-man-{}", std::process::id()));
        let pages = limiter_agent::cli::manual::write_man_pages(&command, &dir).unwrap();
        for (path, flags) in everything(&command, "limiter-agent") {
            let page = format!("{path}.1");
            assert!(pages.contains(&page), "no {page} in {pages:?}");
            let text = std::fs::read_to_string(dir.join(&page)).unwrap();
            for flag in flags {
                // roff escapes the dashes.
                let roff = flag.replace('-', "\\-");
                assert!(text.contains(&roff), "{page} does not document {flag}");
            }
        }
        assert!(pages.contains(&"limiter-agent-rules-add.1".to_owned()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_cover_every_command_and_flag() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut command = super::Cli::command();
            let mut script = Vec::new();
            limiter_agent::cli::manual::completions(&mut command, shell, &mut script);
            let script = String::from_utf8(script).unwrap();
            for (path, flags) in everything(&super::Cli::command(), "limiter-agent") {
                let name = path.rsplit('-').next().unwrap_or_default();
                assert!(script.contains(name), "{shell}: no {name}");
                for flag in flags {
                    // Fish writes `-l aggregate-packets`, the others `--...`.
                    let bare = flag.trim_start_matches('-');
                    assert!(script.contains(bare), "{shell}: no {flag} for {path}");
                }
            }
        }
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        use clap::Parser as _;
        for args in [
            &["limiter-agent", "rules", "add"][..],
            &["limiter-agent", "penalize", "198.18.0.1"],
            &[
                "limiter-agent",
                "penalize",
                "198.18.0.1",
                "--for",
                "5m",
                "--deny",
                "--packets",
                "1/s",
            ],
            &["limiter-agent", "rules", "add", "x", "--action", "explode"],
            &["limiter-agent", "frobnicate"],
        ] {
            let err = match super::Cli::try_parse_from(args) {
                Err(e) => e,
                Ok(_) => panic!("{args:?} parsed"),
            };
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
