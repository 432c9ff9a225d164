//! The daemon's side of capture and canaries: captures follow each recording service's active
//! primary tap, and the control socket's `canary` requests start, report, promote and abort
//! canaries (see [`crate::canary`]).

use std::sync::Arc;
use std::time::Duration;

use crate::api::protocol::{ErrorKind, Response};
use crate::canary::envelope;
use crate::canary::run::{run_canary, Plan};
use crate::canary::verify::{verify_shadow, StandbyGuard, VerifyReport, VerifyRequest};
use crate::canary::{
    isolated, CanaryError, CanaryPhase, CanaryRecord, Change, IsolatedRequest, ProfileEnvelope,
};
use crate::capture::CaptureStore;
use crate::events::EventKind;
use crate::failover::plan::DiskPolicy;

use super::{ServiceState, Shared};

/// Longest `canary abort` waits for a running canary to stop.
const ABORT_WAIT: Duration = Duration::from_secs(120);

/// Starts, moves or stops captures so that each service whose class records runs one on its
/// active primary's tap. Run from housekeeping.
pub(super) fn sync_captures(d: &Shared) {
    let cfg = d.cfg();
    let mut keep = Vec::new();
    let wanted: Vec<(String, String, String)> = d
        .table()
        .iter()
        .filter(|s| {
            matches!(
                s.state,
                ServiceState::Protected | ServiceState::Provisioning
            )
        })
        .filter_map(|s| {
            let tap = s.active_taps.first()?.tap.clone();
            Some((s.name.clone(), s.class.clone(), tap))
        })
        .collect();
    for (service, class, tap) in wanted {
        let c = d.class(&class).capture;
        if !c.enabled {
            continue;
        }
        keep.push(service.clone());
        match d.captures.ensure(&service, &tap, &c, &cfg.daemon.state_dir) {
            Ok(true) => d.metrics.set_capture_running(&service, true),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%service, %tap, error = %crate::error::report(&e), "capture not started")
            }
        }
    }
    d.captures.retain(&keep);
    for s in d.table().names() {
        if !keep.contains(&s) {
            d.metrics.set_capture_running(&s, false);
        }
    }
    for (service, s) in d.captures.stats() {
        d.metrics.set_capture_stats(&service, &s);
    }
}

fn canary_error(e: CanaryError) -> Response {
    let kind = match e {
        CanaryError::NoCanary(_) => ErrorKind::NotFound,
        CanaryError::Busy { .. } | CanaryError::WrongPhase { .. } => ErrorKind::Conflict,
        CanaryError::Change(_) | CanaryError::Unsupported(_) => ErrorKind::BadRequest,
        _ => ErrorKind::Failed,
    };
    Response::error(kind, crate::error::report(&e))
}

fn event(d: &Shared, service: &str, what: &str, detail: String) {
    d.events.emit(
        Some(service),
        EventKind::Replay {
            what: what.into(),
            detail,
        },
    );
}

/// The settings of an isolated clone of `service`'s primary (name and bridge set by caller):
/// its disks as the service's new shadows get them (a promoted golden image included).
fn template(d: &Shared, service: &str, class: &str, primary: &str) -> IsolatedRequest {
    let cfg = d.cfg();
    let c = d.class(class);
    IsolatedRequest {
        service: service.to_string(),
        class: class.to_string(),
        primary: primary.to_string(),
        name: String::new(),
        bridge: String::new(),
        state_dir: cfg.daemon.state_dir.clone(),
        boot_timeout: Duration::from_secs(c.shadow_boot_timeout_s),
        agent_timeout: Duration::from_millis(cfg.monitor.agent_timeout_ms),
        agent_max_reply: cfg.monitor.agent_max_reply_bytes,
        disks: super::profiles::shadow_disks(d, service, &c),
        promote_commands: c.promote_commands.clone(),
        promote_timeout: c.promote_command_timeout(),
    }
}

/// Refuses a golden image the canary cannot boot from: not a file, or a primary without a
/// system disk to put it under (only data, read-only or shared disks).
async fn check_golden(
    d: &Shared,
    service: &str,
    class: &str,
    primary: &str,
    image: &std::path::Path,
) -> Result<(), Response> {
    let bad = |why: String| Response::error(ErrorKind::BadRequest, why);
    match std::fs::metadata(image) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(bad(format!(
                "golden image {} is not a file",
                image.display()
            )))
        }
        Err(e) => {
            return Err(bad(format!(
                "golden image {} is unusable: {e}",
                image.display()
            )))
        }
    }
    let policy = super::profiles::shadow_disks(d, service, &d.class(class))
        .booting_from(image.to_path_buf());
    let name = primary.to_string();
    let xml = d
        .hv()
        .run("read primary XML", move |hv| hv.xml(&name, true))
        .await
        .map_err(|e| canary_error(e.into()))?;
    let dom = crate::domain_xml::DomainXml::parse(&xml).map_err(|source| {
        canary_error(CanaryError::Xml {
            domain: primary.to_string(),
            source,
        })
    })?;
    match policy.golden_disk(&dom) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(bad(format!(
            "primary '{primary}' of '{service}' has no writable system disk for golden image {} \
             to replace (a golden image replaces the first system disk; data disks are never \
             replaced)",
            image.display()
        ))),
        Err(e) => Err(bad(format!(
            "disks of primary '{primary}': {}",
            crate::error::report(&e)
        ))),
    }
}

/// What `service`'s live profile predicts it needs now (the canary runs in the minutes after),
/// as promotions size shadows; `Err` says why it predicts nothing.
fn profile_envelope(d: &Shared, service: &str) -> Result<ProfileEnvelope, String> {
    use crate::profile::manager::{MIN_PLAN_OBSERVATIONS, OPEN_LIMITS};
    let m = d
        .prof
        .manager()
        .ok_or_else(|| "profiling is not running in this daemon".to_string())?;
    let at_unix_ms = crate::clock::now_unix_ms();
    let plan = m
        .resource_plan(service, at_unix_ms, OPEN_LIMITS)
        .ok_or_else(|| {
            format!("the live profile of '{service}' predicts no envelope yet (it needs {MIN_PLAN_OBSERVATIONS} observations)")
        })?;
    Ok(ProfileEnvelope {
        version: m.live_version(service),
        at_unix_ms,
        cpu: plan.cpu,
        mem: plan.mem,
    })
}

/// `canary start`: checks the request, records the canary and runs it in the background.
pub(super) async fn start(d: &Shared, service: &str, change: &str) -> Response {
    let change = match Change::parse(change) {
        Ok(c) => c,
        Err(e) => return canary_error(e.into()),
    };
    let (class, primary) = match d.table().require(service) {
        Ok(s) if matches!(s.state, ServiceState::Protected) => (s.class.clone(), s.active.clone()),
        Ok(s) => {
            return Response::error(
                ErrorKind::Conflict,
                format!(
                    "service '{service}' is not protected and running (state {:?})",
                    s.state
                ),
            )
        }
        Err(e) => return super::requests::refused(e),
    };
    let c = d.class(&class);
    let records_dir = CaptureStore::dir_of(&d.cfg().daemon.state_dir, service);
    if let Err(e) = crate::canary::run::recorded(&records_dir, service, 1) {
        return canary_error(e);
    }
    if let Some(image) = &change.golden_image {
        if let Err(resp) = check_golden(d, service, &class, &primary, image).await {
            return resp;
        }
    }
    let record = CanaryRecord {
        service: service.to_string(),
        class: class.clone(),
        primary: primary.clone(),
        change: change.clone(),
        phase: CanaryPhase::Starting,
        progress: "queued".into(),
        started_unix_ms: crate::clock::now_unix_ms(),
        finished_unix_ms: None,
        baseline: None,
        canary: None,
        applied: Vec::new(),
        comparison: None,
        cpu: None,
        replay_ms: None,
        costlier: false,
        envelope: None,
        isolation: Default::default(),
        error: None,
    };
    if let Err(e) = d.canaries.begin(record.clone()) {
        return canary_error(e);
    }
    event(d, service, "canary_started", change.summary().join("; "));
    d.metrics.inc_canary(service, "started");
    let plan = Plan {
        service: service.to_string(),
        change,
        replay: c.replay.clone(),
        records_dir,
        template: template(d, service, &class, &primary),
        envelope: profile_envelope(d, service),
    };
    let d2 = d.clone();
    let svc = service.to_string();
    tokio::spawn(async move {
        run_canary(&d2.hv(), &d2.net, d2.canaries.clone(), plan).await;
        match d2.canaries.get(&svc) {
            Some(r) if r.phase == CanaryPhase::Done => {
                let cmp = r.comparison.as_ref();
                let verdict = cmp.map_or("-".to_string(), |c| {
                    format!("{:?}", c.verdict()).to_lowercase()
                });
                let differing: Vec<String> = cmp
                    .map(|c| c.differing.iter().map(|x| x.request.clone()).collect())
                    .unwrap_or_default();
                let beyond: Vec<String> = r
                    .envelope
                    .as_ref()
                    .map(|e| e.findings().into_iter().map(envelope::describe).collect())
                    .unwrap_or_default();
                d2.metrics.inc_canary(&svc, &verdict);
                if let Some(c) = cmp {
                    d2.metrics.set_canary_result(&svc, c);
                }
                if let Some(e) = &r.envelope {
                    d2.metrics.set_canary_envelope(&svc, e);
                }
                event(
                    &d2,
                    &svc,
                    "canary_finished",
                    format!("{verdict}; differing: {differing:?}; beyond the profile's envelope: {beyond:?}"),
                );
            }
            Some(r) if r.phase == CanaryPhase::Failed => {
                d2.metrics.inc_canary(&svc, "failed");
                event(&d2, &svc, "canary_failed", r.error.unwrap_or_default());
            }
            _ => {}
        }
    });
    Response::Canary(Box::new(record))
}

/// `canary report`.
pub(super) fn report(d: &Shared, service: &str) -> Response {
    match d.canaries.get(service) {
        Some(r) => Response::Canary(Box::new(r)),
        None => canary_error(CanaryError::NoCanary(service.to_string())),
    }
}

/// `canary abort`: a finished or failed canary's clones are removed now; a running one is
/// told to stop, and the answer waits until it has.
pub(super) async fn abort(d: &Shared, service: &str) -> Response {
    let all = [
        CanaryPhase::Starting,
        CanaryPhase::Applying,
        CanaryPhase::Replaying,
        CanaryPhase::Done,
        CanaryPhase::Failed,
    ];
    let before = match d.canaries.get(service) {
        Some(r) => r.phase,
        None => return canary_error(CanaryError::NoCanary(service.to_string())),
    };
    let r = match d.canaries.transition(
        service,
        &all,
        CanaryPhase::Aborting,
        "it is being aborted or promoted",
    ) {
        Ok(r) => r,
        Err(e) => return canary_error(e),
    };
    if matches!(before, CanaryPhase::Done | CanaryPhase::Failed) {
        teardown(d, &r).await;
        d.canaries.remove(service);
    } else {
        let deadline = tokio::time::Instant::now() + ABORT_WAIT;
        while d.canaries.get(service).is_some() {
            if tokio::time::Instant::now() > deadline {
                return Response::error(
                    ErrorKind::Timeout,
                    format!("the canary of '{service}' is still stopping"),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    d.metrics.inc_canary(service, "aborted");
    event(
        d,
        service,
        "canary_aborted",
        format!("was {}", before.as_str()),
    );
    Response::ok(format!(
        "canary of '{service}' aborted; its clones and data copies are removed"
    ))
}

async fn teardown(d: &Shared, r: &CanaryRecord) {
    let state_dir = d.cfg().daemon.state_dir.clone();
    for dom in [&r.baseline, &r.canary].into_iter().flatten() {
        isolated::teardown(&d.hv(), &d.net, dom, &state_dir).await;
    }
}

/// Commands that give a new shadow of `service` the changes promoted for it.
pub(super) fn promoted_steps(d: &Shared, service: &str) -> Vec<Vec<String>> {
    d.canaries
        .promoted_changes(service)
        .iter()
        .flat_map(|c| c.steps().into_iter().map(|(argv, _)| argv))
        .collect()
}

/// `canary promote`: the change joins the service's expected configuration (every new shadow
/// gets it), the shadows are rebuilt with it, and a planned switchover makes one of them the
/// primary. The canary's own clones ran on copies of the data and are removed: the promoted
/// shadow takes over the live data disk as any promotion does.
pub(super) async fn promote(d: &Shared, service: &str, wait: Duration) -> Response {
    let r = match d.canaries.transition(
        service,
        &[CanaryPhase::Done],
        CanaryPhase::Promoting,
        "promote needs a finished report (see `canary report`)",
    ) {
        Ok(r) => r,
        Err(e) => return canary_error(e),
    };
    if let Err(e) = d.canaries.promote_change(service, &r.change) {
        d.canaries.update(service, |x| x.phase = CanaryPhase::Done);
        return canary_error(e);
    }
    teardown(d, &r).await;
    d.canaries.remove(service);
    event(d, service, "canary_promoted", r.change.summary().join("; "));
    d.metrics.inc_canary(service, "promoted");
    // New shadows carry the change; the switchover then makes one of them the primary.
    if let Err(e) = super::requests::rebuild(d, service).await {
        return super::requests::refused(e);
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ready = d.table().require(service).is_ok_and(|s| {
            s.shadows
                .iter()
                .any(|x| x.state == crate::failover::ShadowState::PAUSED)
        });
        if ready {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Response::error(
                ErrorKind::Timeout,
                format!("the change of '{service}' is promoted, but no shadow carrying it was ready in {wait:?}; the switchover is not done"),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    super::requests::switchover(d, service).await
}

/// Keeps an Arc'd reference alive for tasks (the book is shared with them).
pub(super) fn book(state_dir: &std::path::Path) -> Arc<crate::canary::Canaries> {
    Arc::new(crate::canary::Canaries::load(state_dir))
}

/// `canary verify` and the schedule: a standby verification of `service` now. A copy of its
/// oldest paused shadow is verified; the shadow stands by throughout. One whose copy failed
/// is replaced and reported (event, metric, `canary verify` answer, status).
pub(super) async fn verify(d: &Shared, service: &str) -> Response {
    match verify_now(d, service).await {
        Ok(r) => Response::Verify(Box::new(r)),
        Err(resp) => resp,
    }
}

async fn verify_now(d: &Shared, service: &str) -> Result<VerifyReport, Response> {
    let (class, primary) = match d.table().require(service) {
        Ok(s) => (s.class.clone(), s.active.clone()),
        Err(e) => return Err(super::requests::refused(e)),
    };
    let cfg = d.cfg();
    let c = d.class(&class);
    let records_dir = CaptureStore::dir_of(&cfg.daemon.state_dir, service);
    if let Err(e) = crate::canary::run::recorded(&records_dir, service, 1) {
        return Err(canary_error(e));
    }
    if !d.verifications.begin(service) {
        return Err(Response::error(
            ErrorKind::Conflict,
            format!("a shadow of '{service}' is being verified already"),
        ));
    }
    let begun = d.table().begin_verify(service);
    let shadow = match begun {
        Ok(x) => x,
        Err(e) => {
            d.verifications.cancel(service);
            return Err(super::requests::refused(e));
        }
    };
    tracing::info!(%service, %shadow, "standby verification: a copy of the shadow is verified; the shadow stands by");
    let req = VerifyRequest {
        service: service.to_string(),
        class: class.clone(),
        primary,
        shadow: shadow.clone(),
        bridge: isolated::bridge_name(service, 'v'),
        state_dir: cfg.daemon.state_dir.clone(),
        agent_timeout: Duration::from_millis(cfg.monitor.agent_timeout_ms),
        agent_max_reply: cfg.monitor.agent_max_reply_bytes,
        disks: DiskPolicy::of_class(&c, false),
        promote_commands: c.promote_commands.clone(),
        promote_timeout: c.promote_command_timeout(),
        records_dir,
        replay: c.replay.clone(),
    };
    let guard = Arc::new(TableGuard {
        d: d.clone(),
        service: service.to_string(),
        shadow: shadow.clone(),
        rt: tokio::runtime::Handle::current(),
    });
    let mut report = verify_shadow(&d.hv(), &d.net, &req, guard).await;
    // A copy that ran and failed proves the shadow broken; one that could not be made proves
    // nothing about it.
    let broken = !report.passed && report.copy_ran;
    let ended = d.table().end_verify(service, &shadow, broken);
    match ended {
        Ok(actions) => {
            report.replaced = !actions.is_empty();
            super::execute(d, actions).await;
        }
        Err(e) => {
            tracing::warn!(%service, %shadow, error = %crate::error::report(&e), "standby verification failed, but the shadow no longer stands by: not replaced")
        }
    }
    let detail = match (&report.verdict, &report.error) {
        (Some(v), _) => format!(
            "{shadow}: {} of {} replayed requests answered as recorded{}",
            v.matched,
            v.requests,
            v.mismatches
                .first()
                .map(|m| format!("; first mismatch {}: {}", m.request, m.what.join("; ")))
                .unwrap_or_default()
        ),
        (None, Some(e)) => format!("{shadow}: {e}"),
        (None, None) => shadow.clone(),
    };
    let outcome = match (report.passed, report.replaced) {
        (true, _) => "the shadow stands by as it was",
        (false, true) => "the shadow is replaced",
        (false, false) => "the shadow is not replaced",
    };
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let timing = format!(
        "copy {} ({} ms held, {} ms run to settle, {} ms to the copy, {} ms in all)",
        report.copy,
        ms(report.hold_ms),
        ms(report.settle_ms),
        ms(report.copy_ms),
        report.total_ms
    );
    let what = if report.passed {
        "verify_passed"
    } else {
        tracing::warn!(%service, %shadow, %detail, outcome, "standby verification failed");
        "verify_failed"
    };
    event(d, service, what, format!("{detail}; {outcome}; {timing}"));
    d.metrics
        .inc_verify(service, if report.passed { "passed" } else { "failed" });
    d.verifications.end(report.clone());
    Ok(report)
}

/// The table's side of the moment a verified shadow runs (see [`StandbyGuard`]).
struct TableGuard {
    d: Shared,
    service: String,
    shadow: String,
    rt: tokio::runtime::Handle,
}

impl StandbyGuard for TableGuard {
    fn hold(&self) -> bool {
        self.d
            .table()
            .begin_settle(&self.service, &self.shadow)
            .is_ok()
    }

    fn release(&self, paused: bool) {
        let done = if paused {
            self.d.table().settled(&self.service, &self.shadow)
        } else {
            tracing::error!(service = %self.service, shadow = %self.shadow, "shadow could not be paused again after its memory was written; replaced");
            self.d.table().shadow_lost(&self.service, &self.shadow)
        };
        match done {
            Ok(actions) if !actions.is_empty() => {
                let d = self.d.clone();
                self.rt
                    .spawn(async move { super::execute(&d, actions).await });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(service = %self.service, shadow = %self.shadow, error = %crate::error::report(&e), "verified shadow not returned to standby")
            }
        }
    }
}

/// Starts the standby verification that is due, if any: one at a time, per class period
/// (`replay.verify_interval_s`), the first one period after the daemon started.
pub(super) fn schedule_verifications(d: &Shared) {
    if d.verifications.any_running() {
        return;
    }
    let now = crate::clock::now_unix_ms();
    let due = d
        .table()
        .iter()
        .filter(|s| matches!(s.state, ServiceState::Protected))
        .find(|s| {
            let c = d.class(&s.class);
            let every = c.replay.verify_interval_s * 1000;
            let last = d
                .verifications
                .last(&s.name)
                .map_or(d.started_unix_ms, |r| r.at_unix_ms);
            c.capture.enabled && every > 0 && now.saturating_sub(last) >= every
        })
        .map(|s| s.name.clone());
    if let Some(service) = due {
        let d = d.clone();
        tokio::spawn(async move {
            let _ = verify(&d, &service).await;
        });
    }
}
