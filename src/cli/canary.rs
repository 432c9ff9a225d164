//! The client side of `understudy canary`: start (with progress until the report is ready),
//! report, promote, abort.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;

use crate::api::control;
use crate::api::protocol::{Request, Response};
use crate::canary::change::MAX_CHANGE_BYTES;
use crate::canary::{CanaryPhase, CanaryRecord};
use crate::replay::CanaryVerdict;

/// `understudy canary ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum CanaryAction {
    /// Apply a change to an isolated clone of the service's primary, replay its recorded
    /// traffic against it and an unchanged clone, and report what differs. Waits for the
    /// report, showing progress; exit status 0 clean, 4 answers differ, 1 failed, 3 timed out.
    Start {
        /// Service name.
        service: String,
        /// The change: a TOML file of `[[file]]` (path, content) and `[[command]]` (argv,
        /// timeout_ms) entries.
        #[arg(long = "apply", value_name = "FILE")]
        apply: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Return once the canary is started.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the report, in seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// The service's canary: its phase, progress, and its report once ready.
    Report {
        /// Service name.
        service: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the canary's change part of the service's expected configuration (new shadows
    /// get it) and switch over to a shadow carrying it.
    Promote {
        /// Service name.
        service: String,
        /// Longest wait for a shadow carrying the change, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Discard the canary: its clones and data copies are removed.
    Abort {
        /// Service name.
        service: String,
    },
    /// Verify a standing-by shadow now: it is taken out (a replacement is provisioned),
    /// resumed off the service network on copies of the data, the recent recorded traffic
    /// replayed, its answers compared with the recorded ones; then it is removed. Exit
    /// status 0 passed, 4 failed.
    Verify {
        /// Service name.
        service: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("understudy: {msg}");
    ExitCode::from(1)
}

fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<CanaryRecord, ExitCode> {
    match control::call(socket, req, timeout) {
        Ok(Response::Canary(r)) => Ok(*r),
        Ok(Response::Error { kind, message }) => Err(fail(format!("{kind:?}: {message}"))),
        Ok(other) => Err(fail(format!("unexpected answer: {other:?}"))),
        Err(e) => {
            eprintln!("understudy: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// Runs a canary subcommand against the daemon at `socket`.
pub fn canary(socket: &Path, action: &CanaryAction) -> ExitCode {
    match action {
        CanaryAction::Start {
            service,
            apply,
            json,
            no_wait,
            timeout,
        } => {
            let mut text = String::new();
            let read = std::fs::File::open(apply).and_then(|f| {
                f.take(MAX_CHANGE_BYTES as u64 + 1)
                    .read_to_string(&mut text)
            });
            if let Err(e) = read {
                return fail(format!("cannot read {}: {e}", apply.display()));
            }
            let req = Request::CanaryStart {
                service: service.clone(),
                change: text,
            };
            let r = match call(socket, &req, Duration::from_secs(60)) {
                Ok(r) => r,
                Err(code) => return code,
            };
            if *no_wait {
                eprintln!(
                    "canary of '{service}' started; `understudy canary report {service}` shows it"
                );
                return ExitCode::SUCCESS;
            }
            wait(socket, service, r, *json, Duration::from_secs(*timeout))
        }
        CanaryAction::Report { service, json } => {
            match call(
                socket,
                &Request::CanaryReport {
                    service: service.clone(),
                },
                Duration::from_secs(30),
            ) {
                Ok(r) => {
                    show(&r, *json);
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        CanaryAction::Promote { service, timeout } => {
            let req = Request::CanaryPromote {
                service: service.clone(),
                wait_s: *timeout,
            };
            match control::call(socket, &req, Duration::from_secs(timeout + 120)) {
                Ok(Response::Failover(rec)) => {
                    println!("{}", serde_json::to_string_pretty(&rec).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(Response::Ok { message }) => {
                    println!("{message}");
                    ExitCode::SUCCESS
                }
                Ok(Response::Error { kind, message }) => fail(format!("{kind:?}: {message}")),
                Ok(other) => fail(format!("unexpected answer: {other:?}")),
                Err(e) => {
                    eprintln!("understudy: {e}");
                    ExitCode::from(2)
                }
            }
        }
        CanaryAction::Verify { service, json } => {
            let req = Request::ShadowVerify {
                service: service.clone(),
            };
            match control::call(socket, &req, Duration::from_secs(900)) {
                Ok(Response::Verify(r)) => {
                    if *json {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    } else {
                        print!("{}", render_verify(&r));
                    }
                    if r.passed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(4)
                    }
                }
                Ok(Response::Error { kind, message }) => fail(format!("{kind:?}: {message}")),
                Ok(other) => fail(format!("unexpected answer: {other:?}")),
                Err(e) => {
                    eprintln!("understudy: {e}");
                    ExitCode::from(2)
                }
            }
        }
        CanaryAction::Abort { service } => {
            let req = Request::CanaryAbort {
                service: service.clone(),
            };
            match control::call(socket, &req, Duration::from_secs(180)) {
                Ok(Response::Ok { message }) => {
                    println!("{message}");
                    ExitCode::SUCCESS
                }
                Ok(Response::Error { kind, message }) => fail(format!("{kind:?}: {message}")),
                Ok(other) => fail(format!("unexpected answer: {other:?}")),
                Err(e) => {
                    eprintln!("understudy: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Polls the report, printing each new progress line on stderr, until it is ready.
fn wait(
    socket: &Path,
    service: &str,
    mut r: CanaryRecord,
    json: bool,
    limit: Duration,
) -> ExitCode {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        if r.progress != last {
            eprintln!(
                "[{:>5.1}s] {}: {}",
                start.elapsed().as_secs_f64(),
                r.phase.as_str(),
                r.progress
            );
            last = r.progress.clone();
        }
        match r.phase {
            CanaryPhase::Done => {
                show(&r, json);
                let differs = r
                    .comparison
                    .as_ref()
                    .is_some_and(|c| c.verdict() == CanaryVerdict::Differs)
                    || r.costlier;
                return if differs {
                    ExitCode::from(4)
                } else {
                    ExitCode::SUCCESS
                };
            }
            CanaryPhase::Failed => {
                show(&r, json);
                return ExitCode::from(1);
            }
            _ => {}
        }
        if start.elapsed() > limit {
            eprintln!("understudy: no report after {limit:?}; the canary goes on (`canary report {service}`)");
            return ExitCode::from(3);
        }
        std::thread::sleep(Duration::from_millis(500));
        r = match call(
            socket,
            &Request::CanaryReport {
                service: service.to_string(),
            },
            Duration::from_secs(30),
        ) {
            Ok(r) => r,
            Err(code) => return code,
        };
    }
}

fn show(r: &CanaryRecord, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
    } else {
        print!("{}", render(r));
    }
}

/// The report as text.
pub fn render(r: &CanaryRecord) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "canary of {} (class {}, cloned from {}): {}",
        r.service,
        r.class,
        r.primary,
        r.phase.as_str()
    );
    let _ = writeln!(s, "  progress: {}", r.progress);
    let _ = writeln!(s, "  change:");
    for step in r.change.summary() {
        let _ = writeln!(s, "    {step}");
    }
    for a in &r.applied {
        let _ = writeln!(s, "  applied: {} -> {}", a.step, a.result);
    }
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  error: {e}");
    }
    if let Some(c) = &r.comparison {
        let _ = writeln!(
            s,
            "  verdict: {:?}: {} of {} replayed requests differ beyond the noise ({} noisy; answers missing: baseline {}, canary {})",
            c.verdict(),
            c.differing.len(),
            c.requests,
            c.noisy,
            c.baseline_errors,
            c.canary_errors
        );
        for d in &c.differing {
            let _ = writeln!(s, "    #{} {}: {}", d.seq, d.request, d.what.join("; "));
        }
        let _ = writeln!(
            s,
            "  latency ms: baseline p50 {:.1} p99 {:.1}, canary p50 {:.1} p99 {:.1}{}",
            c.baseline_latency.p50,
            c.baseline_latency.p99,
            c.canary_latency.p50,
            c.canary_latency.p99,
            if c.slower { " (slower)" } else { "" }
        );
    }
    if let Some(cpu) = &r.cpu {
        let _ = writeln!(
            s,
            "  CPU during the replay: baseline {:.0} ms, canary {:.0} ms{}",
            cpu.baseline_ms,
            cpu.canary_ms,
            if r.costlier { " (costlier)" } else { "" }
        );
    }
    let _ = writeln!(
        s,
        "  isolation: {} checks, {}",
        r.isolation.checks,
        if r.isolation.violations.is_empty() {
            "no violation".to_string()
        } else {
            r.isolation.violations.join("; ")
        }
    );
    s
}

/// A verification report as text.
pub fn render_verify(r: &crate::canary::verify::VerifyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "standby verification of {} (shadow {}): {}",
        r.service,
        r.shadow,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    if let Some(v) = &r.verdict {
        let _ = writeln!(
            s,
            "  {} of {} replayed requests answered as recorded",
            v.matched, v.requests
        );
        for m in &v.mismatches {
            let _ = writeln!(s, "    #{} {}: {}", m.seq, m.request, m.what.join("; "));
        }
    }
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  error: {e}");
    }
    let _ = writeln!(
        s,
        "  isolation: {} checks, {} violation(s); the shadow was replaced",
        r.isolation.checks,
        r.isolation.violations.len()
    );
    s
}
