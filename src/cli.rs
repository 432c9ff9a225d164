//! The `understudy` command line: `run` starts the daemon; every other subcommand talks to a
//! running daemon over its control socket (or, like `check-config`, works offline).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::control;
use crate::api::protocol::{render_status_text, Request, Response};
use crate::config::{Config, LogFormat};
use crate::profile::manager::render_accuracy;

/// Keeps a warm, paused shadow VM ready for every protected libvirt domain.
#[derive(Debug, Parser)]
#[command(name = "understudy", version, about)]
pub struct Cli {
    /// Configuration file (also tells client commands where the control socket is).
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/understudy/understudy.toml",
        env = "UNDERSTUDY_CONFIG"
    )]
    pub config: PathBuf,
    /// Control socket path, overriding the one in the configuration.
    #[arg(long, global = true, env = "UNDERSTUDY_SOCKET")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run {
        /// Log as JSON lines instead of text (overrides the configuration).
        #[arg(long)]
        json_logs: bool,
        /// Stop by itself after this many seconds (for demos and tests).
        #[arg(long)]
        exit_after: Option<u64>,
    },
    /// Validate a configuration file and print what it protects.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Show services, their active domains and shadows, and every domain.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover of a service to its shadow.
    Failover {
        /// Service name.
        service: String,
    },
    /// Stop a service deliberately (no failover).
    Stop {
        /// Service name.
        service: String,
    },
    /// Start a stopped service again.
    Start {
        /// Service name.
        service: String,
    },
    /// Shadow management.
    Shadow {
        /// What to do with the service's shadows.
        #[command(subcommand)]
        action: ShadowAction,
    },
    /// Deployment profiles: what each service needs, its versions, and how well it predicts.
    Profile {
        /// What to do.
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Re-read the configuration file; on errors the running configuration stays.
    Reload,
    /// Probe a service's HTTP address like a client would and report who answered and the
    /// longest gap between good answers.
    Probe {
        /// Address and port, e.g. 10.77.0.10:80.
        addr: std::net::SocketAddr,
        /// Path to request.
        #[arg(long, default_value = "/")]
        path: String,
        /// Milliseconds between requests.
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
        /// Per-request timeout in milliseconds.
        #[arg(long, default_value_t = 100)]
        timeout_ms: u64,
        /// How long to probe, in seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `understudy shadow ...`
#[derive(Debug, Subcommand)]
pub enum ShadowAction {
    /// Destroy the service's shadows and provision fresh ones from the active primary.
    Rebuild {
        /// Service name.
        service: String,
    },
    /// Re-initialise the shadows (from the class's golden image with --golden).
    Reinit {
        /// Service name.
        service: String,
        /// Start from the golden image named in the class.
        #[arg(long)]
        golden: bool,
    },
}

/// `understudy profile ...`
#[derive(Debug, Subcommand)]
pub enum ProfileAction {
    /// The current profile: envelopes expected now, what was observed, the shadow sizing,
    /// dependencies and configuration.
    Show {
        /// Service name.
        service: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The stored versions, oldest first, and version files that could not be read.
    History {
        /// Service name.
        service: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// What changed between two stored versions.
    Diff {
        /// Service name.
        service: String,
        /// Older version.
        a: u64,
        /// Newer version.
        b: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make an older version current again, stored as a new version (without --to: the one
    /// before the current).
    Rollback {
        /// Service name.
        service: String,
        /// Version to restore.
        #[arg(long)]
        to: Option<u64>,
    },
    /// How well the live profiles predicted real usage since the daemon started.
    Accuracy {
        /// Only this service.
        service: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

impl ProfileAction {
    fn request(&self) -> Request {
        match self {
            ProfileAction::Show { service, .. } => Request::ProfileShow {
                service: service.clone(),
            },
            ProfileAction::History { service, .. } => Request::ProfileHistory {
                service: service.clone(),
            },
            ProfileAction::Diff { service, a, b, .. } => Request::ProfileDiff {
                service: service.clone(),
                a: *a,
                b: *b,
            },
            ProfileAction::Rollback { service, to } => Request::ProfileRollback {
                service: service.clone(),
                to: *to,
            },
            ProfileAction::Accuracy { service, .. } => Request::ProfileAccuracy {
                service: service.clone(),
            },
        }
    }

    /// Whether the answer is wanted as JSON.
    fn json(&self) -> bool {
        match self {
            ProfileAction::Show { json, .. }
            | ProfileAction::History { json, .. }
            | ProfileAction::Diff { json, .. }
            | ProfileAction::Accuracy { json, .. } => *json,
            ProfileAction::Rollback { .. } => false,
        }
    }
}

/// Parses arguments and runs; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            json_logs,
            exit_after,
        } => run_daemon(&cli.config, json_logs, exit_after),
        Command::CheckConfig { ref file } => check_config(file),
        Command::Probe {
            addr,
            ref path,
            interval_ms,
            timeout_ms,
            seconds,
            json,
        } => probe(addr, path, interval_ms, timeout_ms, seconds, json),
        ref other => {
            let req = match other {
                Command::Status { .. } => Request::Status,
                Command::Failover { service } => Request::Failover {
                    service: service.clone(),
                },
                Command::Stop { service } => Request::Stop {
                    service: service.clone(),
                },
                Command::Start { service } => Request::Start {
                    service: service.clone(),
                },
                Command::Shadow {
                    action: ShadowAction::Rebuild { service },
                } => Request::ShadowRebuild {
                    service: service.clone(),
                },
                Command::Shadow {
                    action: ShadowAction::Reinit { service, golden },
                } => Request::ShadowReinit {
                    service: service.clone(),
                    golden: *golden,
                },
                Command::Profile { action } => action.request(),
                Command::Reload => Request::ReloadConfig,
                Command::Run { .. } | Command::CheckConfig { .. } | Command::Probe { .. } => {
                    unreachable!("handled above")
                }
            };
            let json = match other {
                Command::Status { json } => *json,
                Command::Profile { action } => action.json(),
                _ => false,
            };
            client(&cli, req, json)
        }
    }
}

fn socket_path(cli: &Cli) -> Result<PathBuf, String> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    Config::load(&cli.config)
        .map(|c| c.daemon.control_socket)
        .map_err(|e| {
            format!("cannot find the control socket: {e}\n(use --socket PATH or --config FILE)")
        })
}

fn client(cli: &Cli, req: Request, json: bool) -> ExitCode {
    let path = match socket_path(cli) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("understudy: {e}");
            return ExitCode::from(2);
        }
    };
    /// Prints `v` as JSON, or as text through `text`.
    fn show<T: serde::Serialize>(v: &T, json: bool, text: impl FnOnce(&T) -> String) {
        if json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{}", text(v));
        }
    }
    match control::call(&path, &req, Duration::from_secs(180)) {
        Ok(Response::Ok { message }) => println!("{message}"),
        Ok(Response::Status(r)) => show(&r, json, render_status_text),
        // A switchover's record is for scripts: always JSON.
        Ok(Response::Failover(r)) => show(&r, true, |_| String::new()),
        Ok(Response::ProfileShow(r)) => show(&r, json, |r| r.to_string()),
        Ok(Response::ProfileHistory(r)) => show(&r, json, |r| r.to_string()),
        Ok(Response::ProfileDiff(r)) => show(&r, json, |r| r.to_string()),
        Ok(Response::ProfileAccuracy(r)) => show(&r, json, |r| render_accuracy(r)),
        Ok(Response::Error { kind, message }) => {
            eprintln!("understudy: {kind:?}: {message}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("understudy: {e}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn check_config(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(cfg) => {
            println!("{}: OK", file.display());
            println!(
                "  libvirt: {}  accel: {:?}  state: {}",
                cfg.daemon.libvirt_uri,
                cfg.daemon.accel,
                cfg.daemon.state_dir.display()
            );
            for rule in &cfg.protect {
                println!(
                    "  protect '{}' as class '{}'",
                    rule.pattern.as_str(),
                    rule.class
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat, level: &str) {
    // `level` was validated with the configuration; a bad UNDERSTUDY_LOG falls back to it.
    let from_env = std::env::var("UNDERSTUDY_LOG").ok().and_then(|v| {
        crate::config::log_filter(&v)
            .map_err(|e| eprintln!("UNDERSTUDY_LOG ignored: {e}"))
            .ok()
    });
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn run_daemon(config: &Path, json_logs: bool, exit_after: Option<u64>) -> ExitCode {
    // Loaded once: logging settings come from the same file the daemon runs on.
    let loaded = crate::daemon::load_config(config);
    let (format, level) = match &loaded {
        Ok(c) => (c.daemon.log_format, c.daemon.log_level.clone()),
        Err(_) => (LogFormat::Text, "info".to_string()),
    };
    init_logging(if json_logs { LogFormat::Json } else { format }, &level);
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %crate::error::report(&e), "daemon not started");
            eprintln!("understudy: {}", crate::error::report(&e));
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("understudy: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let config = config.to_path_buf();
    let result = rt.block_on(async move {
        match exit_after {
            Some(secs) => {
                match tokio::time::timeout(
                    Duration::from_secs(secs),
                    crate::daemon::run(config, cfg),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::info!(secs, "--exit-after reached; stopping");
                        Ok(())
                    }
                }
            }
            None => crate::daemon::run(config, cfg).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %crate::error::report(&e), "daemon stopped");
            eprintln!("understudy: {}", crate::error::report(&e));
            ExitCode::from(1)
        }
    }
}

fn probe(
    addr: std::net::SocketAddr,
    path: &str,
    interval_ms: u64,
    timeout_ms: u64,
    seconds: f64,
    json: bool,
) -> ExitCode {
    let prober = match crate::probe::Prober::start(
        addr,
        path,
        Duration::from_millis(interval_ms.max(1)),
        Duration::from_millis(timeout_ms.max(1)),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("understudy: cannot start the probe: {e}");
            return ExitCode::from(1);
        }
    };
    std::thread::sleep(Duration::from_secs_f64(seconds.max(0.0)));
    let (start, sent) = (prober.started(), prober.sent());
    let answers = prober.finish();
    let s = crate::probe::summarize(&answers, start);
    if json {
        let v = serde_json::json!({
            "sent": sent,
            "answered": answers.len(),
            "max_gap_ms": s.max_gap.as_secs_f64() * 1000.0,
            "max_gap_end_ms": s.max_gap_end.as_secs_f64() * 1000.0,
            "changes": s.changes.iter().map(|(t, b)| serde_json::json!({"at_ms": t.as_secs_f64() * 1000.0, "body": b})).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        for (t, body) in &s.changes {
            println!("{:>9.1} ms  answered by: {body}", t.as_secs_f64() * 1000.0);
        }
        println!(
            "probe {addr}{path}: {sent} requests (one every {interval_ms} ms, overlapping), {} answered; longest gap between answers {:.1} ms (ended at {:.1} ms)",
            answers.len(),
            s.max_gap.as_secs_f64() * 1000.0,
            s.max_gap_end.as_secs_f64() * 1000.0
        );
    }
    if answers.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile_request(args: &[&str]) -> (Request, bool) {
        let cli = Cli::try_parse_from(std::iter::once("understudy").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Command::Profile { action } => (action.request(), !action.json()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn profile_subcommands_map_to_requests() {
        let s = || "web".to_string();
        assert_eq!(
            profile_request(&["profile", "show", "web"]),
            (Request::ProfileShow { service: s() }, true)
        );
        assert_eq!(
            profile_request(&["profile", "show", "web", "--json"]),
            (Request::ProfileShow { service: s() }, false)
        );
        assert_eq!(
            profile_request(&["profile", "history", "web"]).0,
            Request::ProfileHistory { service: s() }
        );
        assert_eq!(
            profile_request(&["profile", "diff", "web", "3", "7"]).0,
            Request::ProfileDiff {
                service: s(),
                a: 3,
                b: 7
            }
        );
        assert_eq!(
            profile_request(&["profile", "rollback", "web", "--to", "2"]).0,
            Request::ProfileRollback {
                service: s(),
                to: Some(2)
            }
        );
        assert_eq!(
            profile_request(&["profile", "rollback", "web"]).0,
            Request::ProfileRollback {
                service: s(),
                to: None
            }
        );
        assert_eq!(
            profile_request(&["profile", "accuracy", "--json"]),
            (Request::ProfileAccuracy { service: None }, false)
        );
        assert_eq!(
            profile_request(&["profile", "accuracy", "web"]),
            (Request::ProfileAccuracy { service: Some(s()) }, true)
        );
        for bad in [
            &["profile", "diff", "web", "1"][..],
            &["profile", "rollback", "web", "--to", "-1"],
            &["profile", "show"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("understudy").chain(bad.iter().copied()))
                    .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_empty_accuracy_report_says_so_in_text() {
        assert!(render_accuracy(&[]).contains("no service observed"));
    }
}
