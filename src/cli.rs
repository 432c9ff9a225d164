//! The `understudy` command line: `run` starts the daemon; every other subcommand talks to a
//! running daemon over its control socket (or, like `check-config`, works offline).

mod events;
mod gen;
mod plots;
mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::control;
use crate::api::protocol::{render_status_text, Request, Response};
use crate::config::{Config, ConfigError, LogFormat};
use crate::profile::manager::{learner_params, render_accuracy};
use crate::profile::{backtest, LearnerParams};

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
    /// Every host of the cluster: alive or lost, active or draining, capacity, and the
    /// primaries and shadows on it (this host alone without a [cluster] table).
    Hosts {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover of a service to its shadow (`failover <service>`), or what the
    /// last failover did (`failover timeline <service> --svg FILE`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Failover {
        /// Service name.
        #[arg(required = true)]
        service: Option<String>,
        /// How long to wait for the switchover, e.g. `90s`.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// With a cluster: the host whose shadow takes over (run on the primary's host).
        #[arg(long, value_name = "HOST")]
        to_host: Option<String>,
        /// Something other than a switchover.
        #[command(subcommand)]
        action: Option<FailoverAction>,
    },
    /// What the daemon did recently (protection, shadows, failovers and their steps, fencing,
    /// drift, profile versions, reloads), and with --follow what it does next.
    Events {
        /// Only this service's events.
        service: Option<String>,
        /// Keep printing events as they happen, until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
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
    /// With a cluster: take a host out of service and back (`host drain|undrain <host>`).
    Host {
        /// What to do with the host.
        #[command(subcommand)]
        action: HostAction,
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
    /// Write man pages generated from this command line into DIR (for packaging).
    #[command(hide = true)]
    GenMan {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
    /// Write bash, zsh and fish completions into DIR (for packaging).
    #[command(hide = true)]
    GenCompletions {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

/// `understudy failover ...`
#[derive(Debug, Subcommand)]
pub enum FailoverAction {
    /// Draw the last failover's steps on a time axis as an SVG file.
    Timeline {
        /// Service name.
        service: String,
        /// The SVG file to write.
        #[arg(long)]
        svg: PathBuf,
    },
}

/// `understudy host ...`
#[derive(Debug, Subcommand)]
pub enum HostAction {
    /// Move every primary on the host to a shadow on another host and place no shadows there;
    /// shows progress until the host runs no primary.
    Drain {
        /// The host's name in the cluster.
        host: String,
        /// How long to wait for its primaries to move, e.g. `10m`.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Let the host take shadows and primaries again.
    Undrain {
        /// The host's name in the cluster.
        host: String,
    },
}

/// How a long operation is waited for.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Wait until the service is protected again (the default on a terminal).
    #[arg(long, conflicts_with = "no_wait")]
    wait: bool,
    /// Return as soon as the daemon has accepted the request (the default otherwise).
    #[arg(long)]
    no_wait: bool,
    /// Longest wait, e.g. `10m` or `90s`; exceeding it exits with status 3.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl WaitArgs {
    fn waits(&self) -> bool {
        use std::io::IsTerminal;
        self.wait || (!self.no_wait && std::io::stderr().is_terminal())
    }
}

/// `understudy shadow ...`
#[derive(Debug, Subcommand)]
pub enum ShadowAction {
    /// Destroy the service's shadows and provision fresh ones from the active primary.
    Rebuild {
        /// Service name.
        service: String,
        /// Waiting.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Re-initialise the shadows (from the class's golden image with --golden).
    Reinit {
        /// Service name.
        service: String,
        /// Start from the golden image named in the class.
        #[arg(long)]
        golden: bool,
        /// Waiting.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Dry run, before protecting a VM: the shadow spec that would be defined, each disk's
    /// role and whether a failover keeps its data, the NIC handling, or the refusal naming the
    /// device and why. Needs no daemon. Exit status: 0 protectable, 2 refused, 1 other error.
    Plan {
        /// Domain whose persistent definition is read from libvirt (the configuration's
        /// libvirt_uri).
        #[arg(required_unless_present = "xml", conflicts_with = "xml")]
        domain: Option<String>,
        /// Read the domain XML from this file instead; works without libvirt.
        #[arg(long, value_name = "FILE")]
        xml: Option<PathBuf>,
        /// Plan with this class instead of the one the [[protect]] rules give the domain.
        #[arg(long, value_name = "C")]
        class: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

impl ShadowAction {
    fn request(&self) -> Request {
        match self {
            ShadowAction::Rebuild { service, .. } => Request::ShadowRebuild {
                service: service.clone(),
            },
            ShadowAction::Reinit {
                service, golden, ..
            } => Request::ShadowReinit {
                service: service.clone(),
                golden: *golden,
            },
            ShadowAction::Plan { .. } => unreachable!("shadow plan runs locally, see main"),
        }
    }

    fn parts(&self) -> (&str, &WaitArgs) {
        match self {
            ShadowAction::Rebuild { service, wait }
            | ShadowAction::Reinit { service, wait, .. } => (service, wait),
            ShadowAction::Plan { .. } => unreachable!("shadow plan runs locally, see main"),
        }
    }
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
    /// Store the live profile as a new version now (reason `manual`).
    Save {
        /// Service name.
        service: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Draw observed use against the predicted envelope as an SVG file.
    Plot {
        /// Service name.
        service: String,
        /// The SVG file to write.
        #[arg(long)]
        svg: PathBuf,
        /// How far back, e.g. `30m` or `6h` (the daemon keeps six hours).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: Duration,
    },
    /// How well the live profiles predicted real usage since the daemon started.
    Accuracy {
        /// Only this service.
        service: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Replay a VM's history through the model and the baselines, locally (no daemon): coverage,
    /// under-prediction and waste at the configured settings, one step and one hour ahead.
    Backtest {
        /// The history: CSV (or gzip-compressed CSV) with the header
        /// `timestamp_unix_s,cpu_cores,mem_bytes,disk_bytes_per_s,net_bytes_per_s`.
        #[arg(long)]
        csv: PathBuf,
        /// Class whose coverage target applies.
        #[arg(long, default_value = crate::config::DEFAULT_CLASS)]
        class: String,
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
            ProfileAction::Save { service, .. } => Request::ProfileSave {
                service: service.clone(),
            },
            ProfileAction::Plot { service, .. } => Request::ProfileSeries {
                service: service.clone(),
                since_unix_ms: 0,
            },
            ProfileAction::Backtest { .. } => unreachable!("backtest runs locally, see main"),
        }
    }

    /// Whether the answer is wanted as JSON.
    fn json(&self) -> bool {
        match self {
            ProfileAction::Show { json, .. }
            | ProfileAction::History { json, .. }
            | ProfileAction::Diff { json, .. }
            | ProfileAction::Accuracy { json, .. }
            | ProfileAction::Save { json, .. }
            | ProfileAction::Backtest { json, .. } => *json,
            ProfileAction::Rollback { .. } | ProfileAction::Plot { .. } => false,
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
        Command::Profile {
            action:
                ProfileAction::Backtest {
                    ref csv,
                    ref class,
                    json,
                },
        } => backtest(&cli.config, csv, class, json),
        Command::Shadow {
            action:
                ShadowAction::Plan {
                    ref domain,
                    ref xml,
                    ref class,
                    json,
                },
        } => {
            let source = match (domain, xml) {
                (_, Some(file)) => PlanSource::File(file),
                (Some(name), None) => PlanSource::Libvirt(name),
                (None, None) => unreachable!("clap requires a domain or --xml"),
            };
            shadow_plan(&cli.config, source, class.as_deref(), json)
        }
        Command::Probe {
            addr,
            ref path,
            interval_ms,
            timeout_ms,
            seconds,
            json,
        } => probe(addr, path, interval_ms, timeout_ms, seconds, json),
        Command::GenMan { ref dir } => generated("man pages", gen::man_pages(dir)),
        Command::GenCompletions { ref dir } => generated("completions", gen::completions(dir)),
        ref other => {
            let socket = match socket_path(&cli) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("understudy: {e}");
                    return ExitCode::from(2);
                }
            };
            match other {
                Command::Events {
                    service,
                    follow,
                    json,
                } => events::events(&socket, service.clone(), *follow, *json),
                Command::Failover {
                    action: Some(FailoverAction::Timeline { service, svg }),
                    ..
                } => done(plots::failover_timeline(&socket, service, svg)),
                Command::Failover {
                    service,
                    timeout,
                    to_host,
                    ..
                } => switchover(
                    &socket,
                    service.as_deref().unwrap_or_default(),
                    *timeout,
                    to_host.as_deref(),
                ),
                Command::Host { action } => host(&socket, action),
                Command::Profile {
                    action:
                        ProfileAction::Plot {
                            service,
                            svg,
                            since,
                        },
                } => done(plots::profile_plot(&socket, service, *since, svg)),
                Command::Shadow { action } => shadow(&socket, action),
                Command::Status { json } => client(&socket, Request::Status, *json),
                Command::Hosts { json } => client(&socket, Request::Hosts, *json),
                Command::Stop { service } => client(
                    &socket,
                    Request::Stop {
                        service: service.clone(),
                    },
                    false,
                ),
                Command::Start { service } => client(
                    &socket,
                    Request::Start {
                        service: service.clone(),
                    },
                    false,
                ),
                Command::Profile { action } => client(&socket, action.request(), action.json()),
                Command::Reload => client(&socket, Request::ReloadConfig, false),
                Command::Run { .. }
                | Command::CheckConfig { .. }
                | Command::Probe { .. }
                | Command::GenMan { .. }
                | Command::GenCompletions { .. } => unreachable!("handled above"),
            }
        }
    }
}

/// Exit status of a wait that ran out of time.
const EXIT_TIMEOUT: u8 = 3;

/// Prints what a client-side command did, or why it failed.
fn done(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("understudy: {e}");
            ExitCode::from(1)
        }
    }
}

/// `understudy host drain|undrain <host>`: progress on stderr while the host's primaries move.
fn host(socket: &Path, action: &HostAction) -> ExitCode {
    let (req, timeout, doing) = match action {
        HostAction::Drain { host, timeout } => (
            Request::HostDrain {
                host: host.clone(),
                drain: true,
                wait_s: timeout.as_secs(),
            },
            *timeout + Duration::from_secs(10),
            format!("draining {host}: moving its primaries to shadows on other hosts"),
        ),
        HostAction::Undrain { host } => (
            Request::HostDrain {
                host: host.clone(),
                drain: false,
                wait_s: 0,
            },
            Duration::from_secs(30),
            format!("undraining {host}"),
        ),
    };
    let mut progress = progress::Progress::new();
    progress.update(&doing);
    match control::call(socket, &req, timeout) {
        Ok(Response::Ok { message }) => {
            progress.finish(&message);
            ExitCode::SUCCESS
        }
        Ok(Response::Error { kind, message }) => {
            progress.finish(&format!("{kind:?}: {message}"));
            ExitCode::from(1)
        }
        Ok(other) => {
            progress.finish(&format!("unexpected answer: {other:?}"));
            ExitCode::from(1)
        }
        Err(e) => {
            progress.finish(&format!("{e}"));
            ExitCode::from(2)
        }
    }
}

/// `understudy failover <service> [--to-host H]`: progress on stderr while the daemon switches
/// over, the record as JSON on stdout (with `--to-host`, the outcome line: the record is the
/// other host's).
fn switchover(socket: &Path, service: &str, timeout: Duration, to_host: Option<&str>) -> ExitCode {
    let mut progress = progress::Progress::new();
    progress.update(&match to_host {
        Some(h) => format!("handing {service} over to its shadow on host {h}"),
        None => format!("switching {service} over to a shadow"),
    });
    let req = Request::Failover {
        service: service.to_string(),
        to_host: to_host.map(str::to_string),
    };
    match control::call(socket, &req, timeout) {
        Ok(Response::Ok { message }) => {
            progress.finish(&message);
            ExitCode::SUCCESS
        }
        Ok(Response::Failover(r)) => {
            progress.finish(&format!(
                "{service}: {} -> {} in {:.1} ms ({} steps)",
                r.from,
                r.to,
                r.outage_ms,
                r.steps.len()
            ));
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(Response::Error { kind, message }) => {
            progress.finish(&format!("{service}: switchover failed"));
            eprintln!("understudy: {kind:?}: {message}");
            ExitCode::from(1)
        }
        Ok(other) => {
            progress.finish(&format!("{service}: unexpected answer"));
            eprintln!("understudy: unexpected answer: {other:?}");
            ExitCode::from(1)
        }
        Err(e @ control::ControlError::Timeout { .. }) => {
            progress.finish(&format!(
                "{service}: no answer within {}",
                humantime::format_duration(timeout)
            ));
            eprintln!("understudy: {e}; it may still complete: see `understudy status`");
            ExitCode::from(EXIT_TIMEOUT)
        }
        Err(e) => {
            progress.finish(&format!("{service}: switchover not confirmed"));
            eprintln!("understudy: {e}");
            ExitCode::from(2)
        }
    }
}

/// `understudy shadow rebuild|reinit`: the request, then (on a terminal or with --wait) the
/// wait until the service is protected again.
fn shadow(socket: &Path, action: &ShadowAction) -> ExitCode {
    let code = client(socket, action.request(), false);
    let (service, wait) = action.parts();
    if code != ExitCode::SUCCESS || !wait.waits() {
        return code;
    }
    let mut progress = progress::Progress::new();
    match progress::wait_protected(socket, service, wait.timeout, &mut progress) {
        Ok(line) => {
            progress.finish(&line);
            ExitCode::SUCCESS
        }
        Err(progress::WaitError::Timeout(line)) => {
            progress.finish(&format!(
                "still not protected after {}: {line}",
                humantime::format_duration(wait.timeout)
            ));
            ExitCode::from(EXIT_TIMEOUT)
        }
        Err(progress::WaitError::Failed(line)) => {
            progress.finish(&format!("not protected: {line}"));
            ExitCode::from(1)
        }
    }
}

fn generated(what: &str, result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("understudy: cannot write {what}: {e}");
            ExitCode::from(1)
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

fn client(path: &Path, req: Request, json: bool) -> ExitCode {
    /// Prints `v` as JSON, or as text through `text`.
    fn show<T: serde::Serialize>(v: &T, json: bool, text: impl FnOnce(&T) -> String) {
        if json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{}", text(v));
        }
    }
    match control::call(path, &req, Duration::from_secs(180)) {
        Ok(Response::Ok { message }) => println!("{message}"),
        Ok(Response::Status(r)) => show(&r, json, render_status_text),
        Ok(Response::Hosts(r)) => show(&r, json, crate::api::protocol::render_hosts_text),
        // A switchover's record is for scripts: always JSON.
        Ok(Response::Failover(r)) => show(&r, true, |_| String::new()),
        Ok(Response::ProfileShow(r)) => show(&r, json, |r| r.to_string()),
        Ok(Response::ProfileHistory(r)) => show(&r, json, |r| r.to_string()),
        Ok(Response::ProfileDiff(r)) => show(&r, json, |r| r.to_string()),
        Ok(Response::ProfileAccuracy(r)) => show(&r, json, |r| render_accuracy(r)),
        Ok(Response::ProfileSaved(v)) => show(&v, json, |v| {
            format!("profile saved as version v{} ({})\n", v.version, v.reason)
        }),
        Ok(r @ (Response::ProfileSeries(_) | Response::Event(_))) => {
            show(&r, true, |_| String::new())
        }
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

/// The learner parameters a backtest runs with: the configuration's `[profile]` settings and
/// the class's coverage target; built-in defaults when the configuration file does not exist.
fn backtest_params(config: &Path, class: &str) -> Result<LearnerParams, String> {
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(ConfigError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "understudy: {} does not exist: backtesting with the built-in defaults",
                config.display()
            );
            Config::default()
        }
        Err(e) => return Err(e.to_string()),
    };
    let Some(c) = cfg.class.get(class) else {
        let known: Vec<&str> = cfg.class.keys().map(String::as_str).collect();
        return Err(format!(
            "unknown class '{class}' (classes: {})",
            known.join(", ")
        ));
    };
    let mut params = learner_params(&cfg.profile);
    params.model.coverage_target = c.coverage_target;
    Ok(params)
}

fn backtest(config: &Path, csv: &Path, class: &str, json: bool) -> ExitCode {
    let params = match backtest_params(config, class) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("understudy: {e}");
            return ExitCode::from(2);
        }
    };
    let report = backtest::load(csv).and_then(|obs| Ok(backtest::run(&obs, None, &params)?));
    match report {
        Ok(r) if json => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            print!("{}: {r}", csv.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("understudy: {}", crate::error::report(&e));
            ExitCode::from(1)
        }
    }
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

/// Where `shadow plan` reads the primary's definition from.
#[derive(Debug, Clone, Copy)]
pub enum PlanSource<'a> {
    /// The persistent definition of this domain, from libvirt.
    Libvirt(&'a str),
    /// A domain XML file.
    File(&'a Path),
}

/// Exit status of `shadow plan` for a refused domain.
const PLAN_REFUSED: u8 = 2;

/// `understudy shadow plan`: prints the preview; exit 0 protectable, 2 refused, 1 other error.
pub fn shadow_plan(
    config: &Path,
    source: PlanSource<'_>,
    class: Option<&str>,
    json: bool,
) -> ExitCode {
    let result = plan_preview(config, source, class);
    match &result {
        Ok(preview) if json => println!(
            "{}",
            serde_json::to_string_pretty(preview).unwrap_or_default()
        ),
        Ok(preview) => print!("{preview}"),
        Err(e) => eprintln!("understudy: shadow plan: {e}"),
    }
    ExitCode::from(plan_exit_status(&result))
}

/// 0 protectable, 2 refused, 1 any other error.
pub fn plan_exit_status(result: &Result<crate::failover::plan::ShadowPreview, String>) -> u8 {
    match result {
        Ok(p) if p.protectable => 0,
        Ok(_) => PLAN_REFUSED,
        Err(_) => 1,
    }
}

/// The preview behind `shadow plan`, or the error that kept it from being made.
pub fn plan_preview(
    config_path: &Path,
    source: PlanSource<'_>,
    class: Option<&str>,
) -> Result<crate::failover::plan::ShadowPreview, String> {
    use crate::domain_xml::{DomainXml, DOMAIN_XML_MAX};
    use crate::failover::plan::{preview, PreviewInput};
    use crate::failover::shadow::{new_uuid, shadow_name};

    let config = match Config::load(config_path) {
        Ok(c) => c,
        // Without a configuration file (e.g. on a workstation with --xml), plan with the
        // built-in defaults; a file that exists but is broken is an error.
        Err(crate::config::ConfigError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            eprintln!(
                "understudy: {} not found; planning with the built-in defaults",
                config_path.display()
            );
            Config::default()
        }
        Err(e) => return Err(e.to_string()),
    };
    let text = match source {
        PlanSource::File(file) => {
            use std::io::Read;
            let f = std::fs::File::open(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let mut buf = Vec::new();
            f.take(DOMAIN_XML_MAX as u64 + 1)
                .read_to_end(&mut buf)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            String::from_utf8(buf).map_err(|_| format!("{} is not UTF-8 text", file.display()))?
        }
        PlanSource::Libvirt(name) => {
            let uri = &config.daemon.libvirt_uri;
            crate::libvirt::Hypervisor::open_oneshot(uri)
                .and_then(|hv| hv.xml(name, true))
                .map_err(|e| crate::error::report(&e))?
        }
    };
    let primary = DomainXml::parse(&text)
        .map_err(|e| format!("domain XML not understood: {}", crate::error::report(&e)))?;
    let name = primary.name().unwrap_or_default();
    let (class_name, class_cfg) = match class {
        Some(c) => match config.class.get_key_value(c) {
            Some((n, cfg)) => (n.clone(), cfg.clone()),
            None => {
                let known: Vec<&str> = config.class.keys().map(String::as_str).collect();
                return Err(format!(
                    "no class '{c}' in {} (classes: {})",
                    config_path.display(),
                    known.join(", ")
                ));
            }
        },
        None => match config.class_for(&name) {
            Some((n, cfg)) => (n.to_string(), cfg.clone()),
            None => {
                eprintln!(
                    "understudy: no [[protect]] rule matches '{name}'; planning with class '{}'",
                    crate::config::DEFAULT_CLASS
                );
                let d = crate::config::DEFAULT_CLASS;
                (
                    d.to_string(),
                    config.class.get(d).cloned().unwrap_or_default(),
                )
            }
        },
    };
    let service = if name.is_empty() { "domain" } else { &name };
    let input = PreviewInput {
        class_name: &class_name,
        class: &class_cfg,
        state_dir: &absolute(&config.daemon.state_dir),
        shadow_name: shadow_name(service, 1),
        shadow_uuid: new_uuid(),
    };
    Ok(preview(&primary, &input))
}

/// `p` made absolute against the current directory, as the daemon's relative paths resolve.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
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

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("understudy").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn operations_commands_parse() {
        match parse(&["failover", "web"]).unwrap() {
            Command::Failover {
                service: Some(s),
                action: None,
                timeout,
                to_host: None,
            } => assert_eq!((s.as_str(), timeout), ("web", Duration::from_secs(60))),
            other => panic!("{other:?}"),
        }
        match parse(&["failover", "web", "--to-host", "h2"]).unwrap() {
            Command::Failover {
                service: Some(s),
                to_host: Some(h),
                ..
            } => assert_eq!((s.as_str(), h.as_str()), ("web", "h2")),
            other => panic!("{other:?}"),
        }
        match parse(&["host", "drain", "h1", "--timeout", "2m"]).unwrap() {
            Command::Host {
                action: HostAction::Drain { host, timeout },
            } => assert_eq!((host.as_str(), timeout), ("h1", Duration::from_secs(120))),
            other => panic!("{other:?}"),
        }
        match parse(&["host", "undrain", "h1"]).unwrap() {
            Command::Host {
                action: HostAction::Undrain { host },
            } => assert_eq!(host, "h1"),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["host", "drain"]).is_err(), "the host is required");
        match parse(&["failover", "timeline", "web", "--svg", "t.svg"]).unwrap() {
            Command::Failover {
                action: Some(FailoverAction::Timeline { service, svg }),
                ..
            } => assert_eq!((service.as_str(), svg), ("web", PathBuf::from("t.svg"))),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["failover"]).is_err());
        assert!(
            parse(&["failover", "timeline", "web"]).is_err(),
            "--svg is required"
        );
        match parse(&["events", "web", "--follow", "--json"]).unwrap() {
            Command::Events {
                service,
                follow,
                json,
            } => assert_eq!(
                (service.as_deref(), follow, json),
                (Some("web"), true, true)
            ),
            other => panic!("{other:?}"),
        }
        match parse(&["profile", "plot", "web", "--svg", "p.svg", "--since", "30m"]).unwrap() {
            Command::Profile {
                action: ProfileAction::Plot { since, .. },
            } => assert_eq!(since, Duration::from_secs(1800)),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["profile", "plot", "web", "--svg", "p.svg", "--since", "soon"]).is_err());
        match parse(&["shadow", "rebuild", "web", "--wait", "--timeout", "90s"]).unwrap() {
            Command::Shadow { action } => {
                let (service, wait) = action.parts();
                assert_eq!(service, "web");
                assert!(wait.waits());
                assert_eq!(wait.timeout, Duration::from_secs(90));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["shadow", "rebuild", "web", "--wait", "--no-wait"]).is_err());
        match parse(&["shadow", "reinit", "web", "--no-wait"]).unwrap() {
            Command::Shadow { action } => assert!(!action.parts().1.waits()),
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
    fn backtest_runs_locally_with_the_configured_settings() {
        let cli = Cli::try_parse_from([
            "understudy",
            "profile",
            "backtest",
            "--csv",
            "h.csv",
            "--class",
            "db",
            "--json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Profile {
                action: ProfileAction::Backtest { ref csv, ref class, json: true }
            } if csv == Path::new("h.csv") && class == "db"
        ));
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/understudy.toml");
        let p = backtest_params(&shipped, "db").unwrap();
        assert_eq!(p.model.coverage_target, 0.99);
        assert_eq!(p.model.headroom, 0.0);
        let err = backtest_params(&shipped, "nope").unwrap_err();
        assert!(
            err.contains("unknown class 'nope' (classes: db, default)"),
            "{err}"
        );
        // No configuration file: the built-in defaults.
        let p = backtest_params(Path::new("/nonexistent/understudy.toml"), "default").unwrap();
        assert_eq!(p.model.coverage_target, 0.95);
    }

    #[test]
    fn an_empty_accuracy_report_says_so_in_text() {
        assert!(render_accuracy(&[]).contains("no service observed"));
    }
}
