//! Standby verification: a standing-by shadow is proven before it is needed. It is taken out
//! of its service (a replacement is provisioned at once), its taps are put on an isolated
//! bridge, it is resumed on copies of the data, the recent recorded traffic is replayed
//! against it, and its answers are compared with the recorded ones. Either way it is then
//! removed: it has run, so it no longer stands by as it was; one that failed is reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::isolated::{self, IsolatedDomain, IsolationCheck};
use super::run::{recorded, replay_all, Watch};
use super::CanaryError;
use crate::config::ReplayConfig;
use crate::domain_xml::{DomainXml, MemberState, Role};
use crate::failover::plan::{data_disks, DiskPolicy};
use crate::failover::shadow::{member_meta, wait_for_agent, write_meta};
use crate::libvirt::Hypervisor;
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
    /// The shadow verified (already taken out of the service).
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
        if !self.passed {
            out.push_str("; the shadow was replaced");
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

/// Verifies the shadow of `req` and removes it; never fails: what went wrong is in the report.
pub async fn verify_shadow(hv: &Hypervisor, net: &Netlink, req: &VerifyRequest) -> VerifyReport {
    let mut dom = IsolatedDomain {
        name: req.shadow.clone(),
        bridge: req.bridge.clone(),
        taps: Vec::new(),
        macs: Vec::new(),
        service_bridges: Vec::new(),
        copies: Vec::new(),
        live_sources: Vec::new(),
        qemu_pid: crate::libvirt::qemu_pid(Path::new("/run/libvirt/qemu"), &req.shadow).ok(),
    };
    let mut iso = IsolationCheck::default();
    let result = run(hv, net, req, &mut dom, &mut iso).await;
    isolated::teardown(hv, net, &dom, &req.state_dir).await;
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
    }
}

async fn run(
    hv: &Hypervisor,
    net: &Netlink,
    req: &VerifyRequest,
    dom: &mut IsolatedDomain,
    iso: &mut IsolationCheck,
) -> Result<VerifyVerdict, CanaryError> {
    let records = recorded(&req.records_dir, &req.service, req.replay.max_requests)?;
    let norm = Normalizer::new(&req.replay.ignore)?;
    let r = req.clone();
    let (taps, bridges, data, live) = hv
        .blocking("prepare shadow verification", move |hv| {
            // Its record says isolated from now on: a restarted daemon never adopts it again.
            write_meta(
                hv,
                &r.shadow,
                &member_meta(&r.service, &r.class, Role::Isolated, 0, MemberState::Paused),
            )?;
            let live = DomainXml::parse(&hv.xml(&r.shadow, false)?).map_err(|source| {
                CanaryError::Xml {
                    domain: r.shadow.clone(),
                    source,
                }
            })?;
            let spec =
                DomainXml::parse(&hv.xml(&r.shadow, true)?).map_err(|source| CanaryError::Xml {
                    domain: r.shadow.clone(),
                    source,
                })?;
            let bridges: Vec<String> = spec
                .interfaces()
                .into_iter()
                .filter_map(|i| i.bridge)
                .collect();
            let primary = DomainXml::parse(&hv.xml(&r.primary, true)?).map_err(|source| {
                CanaryError::Xml {
                    domain: r.primary.clone(),
                    source,
                }
            })?;
            let disks = data_disks(&primary, &r.disks).map_err(|e| {
                CanaryError::Unsupported(format!("data disks of {}: {e}", r.primary))
            })?;
            let (data, live_sources) = isolated::data_plan(hv, &r.primary, disks)?;
            Ok::<_, CanaryError>((live.live_interface_taps(), bridges, data, live_sources))
        })
        .await??;
    dom.service_bridges = bridges;
    dom.live_sources = live;
    isolated::make_bridge(net, &req.bridge, &dom.service_bridges).await?;
    for (mac, tap) in taps {
        net.enslave_and_up(&tap, &req.bridge).await?;
        dom.macs.push(mac);
        dom.taps.push(tap);
    }
    let watch = Watch::start(net, vec![dom.clone()]);
    let name = req.shadow.clone();
    hv.run("resume shadow for verification", move |hv| hv.resume(&name))
        .await?;
    wait_for_agent(
        hv,
        &req.shadow,
        Duration::from_secs(30),
        req.agent_timeout,
        req.agent_max_reply,
    )
    .await?;
    dom.copies = isolated::attach_copies(hv, &req.shadow, data, &req.state_dir).await?;
    if !dom.copies.is_empty() {
        isolated::run_commands(
            hv,
            &req.shadow,
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
