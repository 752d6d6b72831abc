//! Owns the command line (SPEC §1): parsing with clap and running each command.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::scope::{Scope, Scopes};
use crate::token::{new_token, KeyStanza};

/// Exit code for an invalid config (EX_USAGE), as SPEC §1 fixes for `check`.
pub const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key gateway: team tokens in, the real upstream key out, with shared quotas"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run the gateway with a stand-in upstream and in-memory quotas, offline.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
    /// Validate a config and print every problem; exit 0 when valid, 64 otherwise.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Internal tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Read a usage log (JSON lines, as `usage_log.path` writes them).
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Per-team and per-key totals: requests, 429s, errors, p50/p95 latency.
    Report {
        #[arg(long)]
        log: PathBuf,
    },
    /// Offline anomaly detection (the live detectors); one finding a line.
    Anomalies {
        #[arg(long)]
        log: PathBuf,
        /// Take the `[anomalies]` settings from this config (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new token; prints it once, with the `[[keys]]` stanza holding its hash.
    New {
        #[arg(long)]
        team: String,
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "generate,read", value_delimiter = ',')]
        scopes: Vec<String>,
        #[arg(long, default_value = "prod")]
        env: String,
        /// RFC 3339 time after which the token answers 401, e.g. 2027-06-01T00:00:00Z.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Print the SHA-256 hex of a token (from the argument, or stdin).
    Hash { token: Option<String> },
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Demo {
            listen,
            admin_listen,
        } => {
            crate::telemetry::init();
            runtime_block_on(async move { crate::demo::run(listen, admin_listen).await })
        }
        Command::Check { config } => check(&config),
        Command::Token { command } => token(command),
        Command::Usage { command } => usage(command),
    }
}

fn runtime_block_on<F>(future: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    runtime_block_on_with(None, future)
}

/// Threads of the shared runtime: `worker_threads` when set; one when shards serve the
/// proxy connections (what is left, the admin listener and background work, is light);
/// otherwise tokio's default.
fn shared_workers(server: &crate::config::ServerConfig) -> Option<usize> {
    server.worker_threads.or(server.shards.map(|_| 1))
}

/// The runtime `serve` runs on: `worker_threads` of them, or tokio's default (one per CPU
/// this process may use).
fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder.enable_all().build()
}

fn runtime_block_on_with<F>(worker_threads: Option<usize>, future: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let runtime = match runtime(worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keygate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    crate::telemetry::init();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprint!("keygate: invalid config {e}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let path = path.to_path_buf();
    runtime_block_on_with(shared_workers(&config.server), async move {
        crate::server::serve_until_signal(config, path)
            .await
            .map_err(|e| e.to_string())
    })
}

fn check(path: &std::path::Path) -> ExitCode {
    // A config can be well-formed and still useless: every env needs a readable key. Those
    // problems are reported with the others, not after they are fixed.
    let config = match Config::load_checked(path, unreadable_upstream_keys) {
        Ok(config) => config,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    println!(
        "{}: valid ({} teams, {} keys, {} routes, store {})",
        path.display(),
        config.teams.len(),
        config.keys.len(),
        config.routes.len(),
        match &config.store.url {
            crate::config::StoreUrl::Memory => "memory",
            crate::config::StoreUrl::Redis(_) => "redis",
            crate::config::StoreUrl::Cluster(_) => "redis-cluster",
        }
    );
    ExitCode::SUCCESS
}

fn unreadable_upstream_keys(config: &Config) -> Vec<String> {
    config
        .upstream
        .keys
        .iter()
        .filter_map(|(env, source)| {
            let problem = crate::upstream_keys::read_source(source).err()?;
            Some(format!("upstream.keys.{env}: {problem}"))
        })
        .collect()
}

fn token(command: TokenCommand) -> ExitCode {
    match command {
        TokenCommand::New {
            team,
            id,
            scopes,
            env,
            expires,
        } => {
            let mut parsed = Scopes::default();
            for name in &scopes {
                match Scope::parse(name.trim()) {
                    Some(scope) => parsed.insert(scope),
                    None => {
                        eprintln!("keygate: unknown scope {name:?} (known: read, generate, admin)");
                        return ExitCode::from(EXIT_INVALID_CONFIG);
                    }
                }
            }
            if let Some(expires) = &expires {
                if expires.parse::<jiff::Timestamp>().is_err() {
                    eprintln!("keygate: --expires {expires:?} is not an RFC 3339 time like 2027-06-01T00:00:00Z");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            }
            let token = match new_token(&env) {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("keygate: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let stanza = KeyStanza {
                id: &id,
                team: &team,
                token: &token,
                scopes: parsed,
                env: &env,
                expires: expires.as_deref(),
            };
            println!("# The token, shown this once. Give it to team {team:?}; keygate keeps only its hash.");
            println!("{token}");
            println!();
            println!("# Add to the config:");
            print!("{}", stanza.render());
            ExitCode::SUCCESS
        }
        TokenCommand::Hash { token } => {
            let token = match token {
                Some(token) => token,
                None => {
                    let mut input = String::new();
                    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
                        eprintln!("keygate: cannot read stdin: {e}");
                        return ExitCode::FAILURE;
                    }
                    input.trim().to_string()
                }
            };
            println!("{}", crate::auth::sha256_hex(token.as_bytes()));
            ExitCode::SUCCESS
        }
    }
}

fn usage(command: UsageCommand) -> ExitCode {
    let (log, settings) = match command {
        UsageCommand::Report { log } => (log, None),
        UsageCommand::Anomalies { log, config } => {
            let settings = match config {
                None => crate::config::AnomalyConfig::default(),
                Some(path) => match Config::load(&path) {
                    Ok(config) => config.anomalies,
                    Err(e) => {
                        eprint!("keygate: invalid config {e}");
                        return ExitCode::from(EXIT_INVALID_CONFIG);
                    }
                },
            };
            (log, Some(settings))
        }
    };
    let file = match std::fs::File::open(&log) {
        Ok(file) => std::io::BufReader::new(file),
        Err(e) => {
            eprintln!("keygate: cannot read {}: {e}", log.display());
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let read = match settings {
        None => {
            let mut report = crate::usage_report::Report::default();
            let read = crate::usage_log::for_each_record(file, |r| report.add(r));
            let _ = write!(stdout, "{}", report.render());
            read
        }
        Some(settings) => {
            let mut detector = crate::anomaly::Detector::new(settings);
            let mut findings = Vec::new();
            crate::usage_log::for_each_record(file, |record| {
                detector.observe(record, &mut findings);
                for finding in findings.drain(..) {
                    let _ = writeln!(stdout, "{finding}");
                }
            })
        }
    };
    match read {
        Ok(0) => ExitCode::SUCCESS,
        Ok(skipped) => {
            eprintln!("keygate: skipped {skipped} lines that are not usage records");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keygate: cannot read {}: {e}", log.display());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_runs_on_the_configured_number_of_worker_threads() {
        for n in [1, 3] {
            let runtime = runtime(Some(n)).unwrap();
            assert_eq!(runtime.metrics().num_workers(), n);
        }
        let default = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(runtime(None).unwrap().metrics().num_workers(), default);
    }

    #[test]
    fn with_shards_the_shared_runtime_has_one_thread_unless_told_otherwise() {
        let config = |server: &str| {
            let text = include_str!("../config/keygate.toml").replacen(
                "[server]\n",
                &format!("[server]\n{server}\n"),
                1,
            );
            crate::config::Config::from_toml(&text).unwrap().server
        };
        assert_eq!(shared_workers(&config("")), None);
        assert_eq!(shared_workers(&config("shards = 4")), Some(1));
        assert_eq!(
            shared_workers(&config("shards = 4\nworker_threads = 2")),
            Some(2)
        );
        assert_eq!(shared_workers(&config("worker_threads = 3")), Some(3));
    }
}
