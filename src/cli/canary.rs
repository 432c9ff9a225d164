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
use crate::canary::envelope;
use crate::canary::{CanaryPhase, CanaryRecord, EnvelopeReport};
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
    /// Verify a standing-by shadow now, on a copy of it (the shadow stands by throughout):
    /// the copy is resumed off the service network on copies of the data, the recent
    /// recorded traffic replayed, its answers compared with the recorded ones; then it is
    /// removed, and a shadow whose copy failed is replaced. Exit status 0 passed, 4 failed.
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
                    || r.costlier
                    || r.envelope
                        .as_ref()
                        .is_some_and(|e| !e.findings().is_empty());
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
    match &r.envelope {
        None => {}
        Some(EnvelopeReport::Unavailable { why }) => {
            let _ = writeln!(s, "  profile envelope: not compared: {why}");
        }
        Some(
            e @ EnvelopeReport::Compared {
                envelope,
                used,
                checks,
                ..
            },
        ) => {
            let findings = e.findings();
            let _ = writeln!(
                s,
                "  profile envelope (profile {}, CPU at the recorded pace: {:.1} s of traffic replayed in {:.1} s): {}",
                envelope
                    .version
                    .map_or_else(|| "not stored yet".to_string(), |v| format!("v{v}")),
                used.recorded_span_ms as f64 / 1000.0,
                used.replay_ms / 1000.0,
                if findings.is_empty() {
                    "within it"
                } else {
                    "BEYOND IT"
                }
            );
            for c in checks {
                let _ = writeln!(
                    s,
                    "    {}{}",
                    envelope::describe(c),
                    if c.finding() {
                        ": beyond the envelope"
                    } else if c.canary_beyond() && c.baseline_beyond() {
                        ": beyond, as is the unchanged baseline (not the change's doing)"
                    } else if c.canary_beyond() {
                        ": beyond, by no more than the baseline's noise margin"
                    } else {
                        ""
                    }
                );
            }
        }
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
        "  isolation: {} checks, {} violation(s)",
        r.isolation.checks,
        r.isolation.violations.len()
    );
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    let _ = writeln!(
        s,
        "  copy {}: shadow held {} (its memory written), run {} to settle, copy ready after {}, {} ms in all",
        r.copy,
        ms(r.hold_ms),
        ms(r.settle_ms),
        ms(r.copy_ms),
        r.total_ms
    );
    let _ = writeln!(
        s,
        "  {}",
        match (r.passed, r.replaced) {
            (true, _) => "the shadow stands by as it was",
            (false, true) => "the shadow was replaced",
            (false, false) =>
                "the shadow was not replaced (its copy never ran, or it no longer stands by)",
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::envelope::{compare, CloneUse, ProfileEnvelope, ReplayUse};
    use crate::canary::Change;
    use crate::profile::{Envelope, Source};

    fn limit(limit: f64) -> Envelope {
        Envelope {
            p50: limit / 2.0,
            p95: limit / 1.2,
            limit,
            source: Source::HourOfDay,
        }
    }

    #[test]
    fn the_report_shows_the_envelope_finding_in_text_and_json() {
        let used = ReplayUse {
            baseline: CloneUse {
                cpu_ms: 500.0,
                mem_bytes: Some(30 << 20),
            },
            canary: CloneUse {
                cpu_ms: 600.0,
                mem_bytes: Some(90 << 20),
            },
            recorded_span_ms: 10_000,
            replay_ms: 2_500.0,
        };
        let env = ProfileEnvelope {
            version: Some(4),
            at_unix_ms: 1,
            cpu: limit(0.5),
            mem: limit((48 << 20) as f64),
        };
        let r = CanaryRecord {
            service: "web1".into(),
            class: "web".into(),
            primary: "web1".into(),
            change: Change::parse("[[command]]\nargv = [\"/bin/true\"]\n").unwrap(),
            phase: CanaryPhase::Done,
            progress: "report ready".into(),
            started_unix_ms: 1,
            finished_unix_ms: Some(2),
            baseline: None,
            canary: None,
            applied: vec![],
            comparison: None,
            cpu: None,
            replay_ms: Some(2_500.0),
            costlier: false,
            envelope: Some(compare(Ok(env), used)),
            isolation: Default::default(),
            error: None,
        };
        let text = render(&r);
        assert!(
            text.contains("profile envelope (profile v4, CPU at the recorded pace: 10.0 s of traffic replayed in 2.5 s): BEYOND IT"),
            "{text}"
        );
        assert!(
            text.contains("    mem canary 90.0 MiB (limit 48.0 MiB, p95 40.0 MiB; baseline 30.0 MiB): beyond the envelope"),
            "{text}"
        );
        assert!(
            text.contains("    cpu canary 0.06 cores (limit 0.50 cores, p95 0.42 cores; baseline 0.05 cores)\n"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["envelope"]["status"], "compared");
        assert_eq!(
            json["envelope"]["checks"][1]["canary"],
            (90u64 << 20) as f64
        );
        let young = CanaryRecord {
            envelope: Some(compare(Err("too young".into()), used)),
            ..r
        };
        assert!(render(&young).contains("  profile envelope: not compared: too young\n"));
    }
}
