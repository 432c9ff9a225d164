//! Standby verification: a standing-by shadow is proven before it is needed, on a copy of it,
//! so that it stands by throughout. Its memory is written to an image (an external memory
//! snapshot: the shadow's QEMU stays as it was, paused), its writable disks (overlays) are
//! copied, and the image is restored as a copy under another name and UUID (written into the
//! image, see [`crate::libvirt::saveimage`]), its NICs on an isolated bridge. The copy is
//! resumed on copies of the data, the recent recorded traffic is replayed against it, its
//! answers are compared with the recorded ones, and it is removed. The daemon replaces a
//! shadow whose copy answered wrongly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::isolated::{self, IsolatedDomain, IsolationCheck};
use super::run::{recorded, replay_all, Watch};
use super::CanaryError;
use crate::config::ReplayConfig;
use crate::domain_xml::{verify_copy_spec, CopyPlan, DiskKind, DomainXml, MemberState, Role};
use crate::failover::plan::{data_disks, DiskPolicy};
use crate::failover::shadow::{member_meta, new_uuid, wait_for_agent};
use crate::libvirt::saveimage::SaveImage;
use crate::libvirt::{Hypervisor, RunState};
use crate::net::Netlink;
use crate::replay::{compare, Normalizer, Target, VerifyVerdict};

/// What a verification needs.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    /// The service.
    pub service: String,
    /// Its class.
    pub class: String,
    /// Its active primary (the data copied is its).
    pub primary: String,
    /// The shadow verified (standing by: it is copied, never resumed).
    pub shadow: String,
    /// The isolated bridge.
    pub bridge: String,
    /// The daemon's state directory.
    pub state_dir: PathBuf,
    /// Per-call agent timeout.
    pub agent_timeout: Duration,
    /// Bound on agent replies.
    pub agent_max_reply: usize,
    /// The class's disk roles.
    pub disks: DiskPolicy,
    /// The class's promote commands.
    pub promote_commands: Vec<Vec<String>>,
    /// Longest one may run.
    pub promote_timeout: Duration,
    /// The service's capture store.
    pub records_dir: PathBuf,
    /// The class's replay settings.
    pub replay: ReplayConfig,
}

/// The daemon's side of the one moment the shadow itself runs: QEMU 7.2 leaves a domain whose
/// memory was written out unable to write it out again (a later verification, a move to the
/// saved tier) until it has run, so the shadow is resumed and paused again right after, off
/// the network as it stands by. Meanwhile it must not be promoted.
pub trait StandbyGuard: Send + Sync {
    /// Takes the shadow out of promotion; false: it no longer stands by paused (leave it).
    fn hold(&self) -> bool;
    /// Gives it back (`paused`), or reports it lost (it could not be paused again).
    fn release(&self, paused: bool);
}

/// The outcome of one verification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The service.
    pub service: String,
    /// The shadow verified.
    pub shadow: String,
    /// When it finished, Unix ms.
    pub at_unix_ms: u64,
    /// Its answers judged against the recorded ones.
    pub verdict: Option<VerifyVerdict>,
    /// Isolation as checked while it ran.
    pub isolation: IsolationCheck,
    /// Why it could not be judged.
    pub error: Option<String>,
    /// It answered as the primary did (at least `verify_min_match` of the requests).
    pub passed: bool,
    /// The copy that ran (`<shadow>-verify`).
    #[serde(default)]
    pub copy: String,
    /// The copy was restored and resumed: a failure after that is the shadow's.
    #[serde(default)]
    pub copy_ran: bool,
    /// How long the shadow's memory took to write, ms: a resume of the shadow in that time
    /// (a failover) waits for it. The shadow is not touched otherwise.
    #[serde(default)]
    pub hold_ms: Option<u64>,
    /// From the start to the copy restored (memory written, disks copied, restored), ms.
    #[serde(default)]
    pub copy_ms: Option<u64>,
    /// How long the shadow ran (resumed and paused again, off the network) after its memory
    /// was written, ms: it was not promotable meanwhile. None: it was not run.
    #[serde(default)]
    pub settle_ms: Option<u64>,
    /// The whole verification, ms.
    #[serde(default)]
    pub total_ms: u64,
    /// The shadow was taken out of the service and a replacement provisioned (set by the
    /// daemon when its copy failed and it still stood by).
    #[serde(default)]
    pub replaced: bool,
}

impl VerifyReport {
    /// `passed`/`FAILED`, how many requests were answered as recorded or why none could be
    /// judged, and isolation violations if any.
    pub fn describe(&self) -> String {
        let mut out = if self.passed { "passed" } else { "FAILED" }.to_string();
        match (&self.verdict, &self.error) {
            (Some(v), _) => out.push_str(&format!(
                ": {} of {} replayed requests answered as recorded",
                v.matched, v.requests
            )),
            (None, Some(e)) => out.push_str(&format!(": {e}")),
            (None, None) => {}
        }
        if !self.isolation.violations.is_empty() {
            out.push_str(&format!(
                "; isolation violated: {}",
                self.isolation.violations.join("; ")
            ));
        }
        if self.replaced {
            out.push_str("; the shadow was replaced");
        } else if self.passed {
            out.push_str("; the shadow stands by as it was");
        } else {
            out.push_str("; the shadow was not replaced");
        }
        out
    }
}

/// The last verification of each service.
#[derive(Debug, Default)]
pub struct Verifications {
    last: Mutex<BTreeMap<String, VerifyReport>>,
    running: Mutex<BTreeMap<String, u64>>,
}

impl Verifications {
    /// None yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `service` as being verified; false if it already is.
    pub fn begin(&self, service: &str) -> bool {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if r.contains_key(service) {
            return false;
        }
        r.insert(service.to_string(), crate::clock::now_unix_ms());
        true
    }

    /// Records the outcome and ends the run.
    pub fn end(&self, report: VerifyReport) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&report.service);
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(report.service.clone(), report);
    }

    /// Ends a run that never started (no shadow could be taken).
    pub fn cancel(&self, service: &str) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(service);
    }

    /// The last report of `service`.
    pub fn last(&self, service: &str) -> Option<VerifyReport> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned()
    }

    /// Whether any service is being verified (one at a time: each costs a guest's CPU).
    pub fn any_running(&self) -> bool {
        !self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// Where the copy's memory image, disk copies and console go.
fn copy_file(req: &VerifyRequest, copy: &str, what: &str) -> PathBuf {
    isolated::copy_dir(&req.state_dir).join(format!("{copy}-{what}"))
}

/// The name of `shadow`'s verification copy.
fn copy_name(shadow: &str) -> String {
    format!("{shadow}-verify")
}

/// Whether `domain` is a verification copy (its role is `isolated` too).
pub fn is_copy(domain: &str) -> bool {
    domain.ends_with("-verify")
}

/// Removes a verification copy of `service` an interrupted run left: the domain, the
/// isolated bridge, its files.
pub async fn remove_copy(
    hv: &Hypervisor,
    net: &Netlink,
    service: &str,
    copy: &str,
    state_dir: &Path,
) {
    let dom = IsolatedDomain::new(copy.to_string(), isolated::bridge_name(service, 'v'));
    isolated::teardown(hv, net, &dom, state_dir).await;
    remove_files(state_dir, copy);
}

/// Removes every file of the copy `copy` (memory image, disk and data copies, console log).
fn remove_files(state_dir: &Path, copy: &str) {
    let (dash, dot) = (format!("{copy}-"), format!("{copy}."));
    if let Ok(it) = std::fs::read_dir(isolated::copy_dir(state_dir)) {
        for e in it.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&dash) || n.starts_with(&dot) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Verifies the shadow of `req` on a copy of it, then removes the copy; never fails: what
/// went wrong is in the report. Of the shadow, its memory is written out while it stays
/// paused, its disks are copied, and it runs for a moment off the network (see
/// [`StandbyGuard`]).
pub async fn verify_shadow(
    hv: &Hypervisor,
    net: &Netlink,
    req: &VerifyRequest,
    guard: Arc<dyn StandbyGuard>,
) -> VerifyReport {
    let started = Instant::now();
    let copy = copy_name(&req.shadow);
    let mut dom = IsolatedDomain::new(copy.clone(), req.bridge.clone());
    let mut iso = IsolationCheck::default();
    let mut times = Times::default();
    let result = run(hv, net, req, guard, &mut dom, &mut iso, &mut times).await;
    isolated::teardown(hv, net, &dom, &req.state_dir).await;
    remove_files(&req.state_dir, &copy);
    let (verdict, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(crate::error::report(&e))),
    };
    let passed = verdict.as_ref().is_some_and(|v| v.passed) && iso.violations.is_empty();
    VerifyReport {
        service: req.service.clone(),
        shadow: req.shadow.clone(),
        at_unix_ms: crate::clock::now_unix_ms(),
        verdict,
        isolation: iso,
        error,
        passed,
        copy,
        copy_ran: times.copy_ran,
        hold_ms: times.hold_ms,
        copy_ms: times.copy_ms,
        settle_ms: times.settle_ms,
        total_ms: started.elapsed().as_millis() as u64,
        replaced: false,
    }
}

/// Timings of one verification, filled as it goes.
#[derive(Debug, Default)]
struct Times {
    hold_ms: Option<u64>,
    copy_ms: Option<u64>,
    settle_ms: Option<u64>,
    copy_ran: bool,
}

/// What the shadow's definitions say a copy needs.
struct Prepared {
    /// Every disk target of the shadow (none is snapshotted).
    targets: Vec<String>,
    /// Writable disk targets and the shadow's file for each (its overlays).
    overlays: Vec<(String, PathBuf)>,
    /// The service's bridges.
    bridges: Vec<String>,
    data: isolated::CopyPlan,
    live: Vec<String>,
}

fn xml_of(hv: &Hypervisor, name: &str, inactive: bool) -> Result<DomainXml, CanaryError> {
    DomainXml::parse(&hv.xml(name, inactive)?).map_err(|source| CanaryError::Xml {
        domain: name.to_string(),
        source,
    })
}

fn prepare(hv: &Hypervisor, r: &VerifyRequest) -> Result<Prepared, CanaryError> {
    let state = hv.state(&r.shadow)?;
    if state != RunState::Paused {
        return Err(CanaryError::Unsupported(format!(
            "shadow {} is {}, not paused: only a paused shadow is copied",
            r.shadow,
            state.as_str()
        )));
    }
    let live = xml_of(hv, &r.shadow, false)?;
    let mut overlays = Vec::new();
    for d in live.disks() {
        if d.readonly || d.shareable {
            continue;
        }
        match (&d.kind, &d.source) {
            (DiskKind::File, Some(src)) => overlays.push((d.target_dev.clone(), src.into())),
            (DiskKind::File, None) => {}
            _ => {
                return Err(CanaryError::Unsupported(format!(
                    "shadow {} has a writable {} disk {}: only file disks can be copied",
                    r.shadow,
                    d.kind.as_str(),
                    d.target_dev
                )))
            }
        }
    }
    let bridges = xml_of(hv, &r.shadow, true)?
        .interfaces()
        .into_iter()
        .filter_map(|i| i.bridge)
        .collect();
    let primary = xml_of(hv, &r.primary, true)?;
    let disks = data_disks(&primary, &r.disks)
        .map_err(|e| CanaryError::Unsupported(format!("data disks of {}: {e}", r.primary)))?;
    let (data, live_sources) = isolated::data_plan(hv, &r.primary, disks)?;
    Ok(Prepared {
        targets: live.disks().into_iter().map(|d| d.target_dev).collect(),
        overlays,
        bridges,
        data,
        live: live_sources,
    })
}

/// Writes the shadow's memory out, copies its disks, and restores the copy paused; the
/// copy's taps. The shadow stays paused throughout.
fn make_copy(
    hv: &Hypervisor,
    r: &VerifyRequest,
    copy: &str,
    p: &Prepared,
    image: &Path,
    disk_copies: &BTreeMap<String, PathBuf>,
    guard: &dyn StandbyGuard,
) -> Result<Copied, CanaryError> {
    let io = |what: String| move |source| CanaryError::Io { what, source };
    let dir = isolated::copy_dir(&r.state_dir);
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let _ = std::fs::remove_file(image);
    isolated::remove_domain(hv, copy);
    // Checked again right before: libvirt would pause a running domain (a shadow a failover
    // has just resumed) for as long as its memory takes to write.
    let state = hv.state(&r.shadow)?;
    if state != RunState::Paused {
        return Err(CanaryError::Unsupported(format!(
            "shadow {} is {} now (promoted?): not copied",
            r.shadow,
            state.as_str()
        )));
    }
    let t = Instant::now();
    hv.snapshot_memory(&r.shadow, &image.to_string_lossy(), &p.targets)?;
    let hold_ms = t.elapsed().as_millis() as u64;
    // The paused QEMU flushed its disks when it paused and wrote nothing since.
    for (target, src) in &p.overlays {
        let dst = &disk_copies[target];
        std::fs::copy(src, dst).map_err(io(format!(
            "copy {} to {}",
            src.display(),
            dst.display()
        )))?;
    }
    let settle_ms = settle(hv, &r.shadow, guard)?;
    let saved = SaveImage::read(image)?;
    let saved = DomainXml::parse(&saved.xml).map_err(|source| CanaryError::Xml {
        domain: format!("{} (memory image)", r.shadow),
        source,
    })?;
    let plan = CopyPlan {
        name: copy.to_string(),
        uuid: new_uuid(),
        bridge: r.bridge.clone(),
        disks: disk_copies.clone(),
        console_dir: dir.clone(),
        meta: member_meta(&r.service, &r.class, Role::Isolated, 0, MemberState::Paused),
    };
    let spec = verify_copy_spec(&saved, &plan).map_err(|source| CanaryError::Copy {
        domain: r.shadow.clone(),
        source,
    })?;
    SaveImage::rewrite_xml(image, &spec.to_xml())?;
    hv.restore_paused(&image.to_string_lossy())?;
    // QEMU has read the whole image: it is not needed again.
    let _ = std::fs::remove_file(image);
    Ok(Copied {
        hold_ms,
        settle_ms,
        taps: xml_of(hv, copy, false)?.live_interface_taps(),
    })
}

/// What [`make_copy`] made.
struct Copied {
    hold_ms: u64,
    settle_ms: Option<u64>,
    taps: Vec<(String, String)>,
}

/// Runs the shadow for a moment and pauses it again (see [`StandbyGuard`]); how long it was
/// out of promotion, or None if it no longer stood by paused.
fn settle(
    hv: &Hypervisor,
    shadow: &str,
    guard: &dyn StandbyGuard,
) -> Result<Option<u64>, CanaryError> {
    if !guard.hold() {
        return Ok(None);
    }
    let t = Instant::now();
    let ran = hv.resume(shadow);
    let paused = ran.as_ref().map_or(Ok(()), |_| hv.suspend(shadow));
    guard.release(paused.is_ok());
    ran?;
    paused?;
    Ok(Some(t.elapsed().as_millis() as u64))
}

async fn run(
    hv: &Hypervisor,
    net: &Netlink,
    req: &VerifyRequest,
    guard: Arc<dyn StandbyGuard>,
    dom: &mut IsolatedDomain,
    iso: &mut IsolationCheck,
    times: &mut Times,
) -> Result<VerifyVerdict, CanaryError> {
    let started = Instant::now();
    let records = recorded(&req.records_dir, &req.service, req.replay.max_requests)?;
    let norm = Normalizer::new(&req.replay.ignore)?;
    let r = req.clone();
    let p = hv
        .blocking("prepare shadow verification", move |hv| prepare(hv, &r))
        .await??;
    dom.service_bridges = p.bridges.clone();
    // Neither the live data disks nor the shadow's own disks are ever opened by the copy.
    dom.live_sources = p.live.clone();
    dom.live_sources.extend(
        p.overlays
            .iter()
            .map(|(_, s)| s.to_string_lossy().into_owned()),
    );
    let image = copy_file(req, &dom.name, "memory.img");
    let disk_copies: BTreeMap<String, PathBuf> = p
        .overlays
        .iter()
        .map(|(t, _)| (t.clone(), copy_file(req, &dom.name, &format!("{t}.qcow2"))))
        .collect();
    // Recorded before they exist: teardown removes whatever was made.
    dom.copies.push(image.clone());
    dom.copies.extend(disk_copies.values().cloned());
    // The copy's NICs join this bridge as it is restored.
    isolated::make_bridge(net, &req.bridge, &dom.service_bridges).await?;
    let (r, copy, data) = (req.clone(), dom.name.clone(), p.data.clone());
    let Copied {
        hold_ms,
        settle_ms,
        taps,
    } = hv
        .blocking("copy shadow for verification", move |hv| {
            make_copy(hv, &r, &copy, &p, &image, &disk_copies, guard.as_ref())
        })
        .await??;
    times.hold_ms = Some(hold_ms);
    times.settle_ms = settle_ms;
    times.copy_ms = Some(started.elapsed().as_millis() as u64);
    dom.qemu_pid = crate::libvirt::qemu_pid(Path::new("/run/libvirt/qemu"), &dom.name).ok();
    for (mac, tap) in taps {
        // Libvirt put it there; set again so it is known up and on the bridge before it runs.
        net.enslave_and_up(&tap, &req.bridge).await?;
        dom.macs.push(mac);
        dom.taps.push(tap);
    }
    tracing::info!(service = %req.service, shadow = %req.shadow, copy = %dom.name, hold_ms, ?settle_ms, taps = ?dom.taps, "standby verification: shadow copied, it stands by as it was");
    let watch = Watch::start(net, vec![dom.clone()]);
    let name = dom.name.clone();
    hv.run("resume verification copy", move |hv| hv.resume(&name))
        .await?;
    times.copy_ran = true;
    wait_for_agent(
        hv,
        &dom.name,
        Duration::from_secs(30),
        req.agent_timeout,
        req.agent_max_reply,
    )
    .await?;
    let copies = isolated::attach_copies(hv, &dom.name, data, &req.state_dir).await?;
    let attached = !copies.is_empty();
    dom.copies.extend(copies);
    if attached {
        isolated::run_commands(
            hv,
            &dom.name,
            &req.promote_commands,
            req.promote_timeout,
            req.agent_max_reply,
        )
        .await?;
    }
    let targets = vec![Target {
        device: req.bridge.clone(),
    }];
    let timeout = Duration::from_millis(req.replay.timeout_ms);
    let recs = records.clone();
    let answers = tokio::task::spawn_blocking(move || replay_all(&recs, &targets, timeout, |_| {}))
        .await
        .map_err(|e| CanaryError::Io {
            what: "run the replay".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    *iso = watch.found();
    isolated::check(net, dom, iso).await;
    Ok(compare::verify(
        &records,
        &answers[0],
        &norm,
        req.replay.verify_min_match,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(passed: bool, replaced: bool) -> VerifyReport {
        VerifyReport {
            service: "web".into(),
            shadow: "web-shadow-2".into(),
            at_unix_ms: 0,
            verdict: None,
            isolation: IsolationCheck::default(),
            error: Some("the copy's agent did not answer".into()),
            passed,
            copy: copy_name("web-shadow-2"),
            copy_ran: true,
            hold_ms: Some(640),
            copy_ms: Some(1900),
            settle_ms: Some(60),
            total_ms: 9000,
            replaced,
        }
    }

    #[test]
    fn the_report_says_what_became_of_the_shadow() {
        assert!(report(true, false)
            .describe()
            .ends_with("the shadow stands by as it was"));
        assert!(report(false, true)
            .describe()
            .ends_with("the shadow was replaced"));
        let kept = report(false, false).describe();
        assert!(kept.starts_with("FAILED: the copy's agent"), "{kept}");
        assert!(kept.ends_with("the shadow was not replaced"), "{kept}");
        assert!(is_copy(&report(true, false).copy));
        assert!(!is_copy("web-shadow-2"));
    }

    #[test]
    fn reports_of_an_older_daemon_still_read() {
        let old = r#"{"service":"web","shadow":"web-shadow-1","at_unix_ms":1,"verdict":null,
            "isolation":{"checks":3,"violations":[]},"error":null,"passed":true}"#;
        let r: VerifyReport = serde_json::from_str(old).unwrap();
        assert!(r.passed && !r.replaced && r.hold_ms.is_none());
    }
}
