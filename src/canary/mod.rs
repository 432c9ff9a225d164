//! Canaries and standby verification on isolated shadows.
//!
//! `isolated` starts a clone of a service's primary off the service network, on copies of its
//! data; `change` is what a canary tries (files and commands through the guest agent); `run`
//! replays recorded traffic against a changed clone and an unchanged one (the noise baseline)
//! and compares them, or against one clone and the recording (standby verification);
//! `envelope` compares the canary's resources with the service's profile.
//! [`Canaries`] owns every canary's record: one per service, kept as an atomic JSON file
//! under `<state_dir>/canary/` so that a restarted daemon can still report or abort it.

pub mod change;
pub mod envelope;
pub mod isolated;
pub mod run;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use change::{Change, ChangeError};
pub use envelope::{EnvelopeReport, ProfileEnvelope};
pub use isolated::{IsolatedDomain, IsolatedRequest, IsolationCheck};

use crate::replay::Comparison;

/// Errors of canaries and isolated runs.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    /// The service already has a canary.
    #[error(
        "service '{service}' already has a canary ({phase}); report, promote or abort it first"
    )]
    Busy {
        /// The service.
        service: String,
        /// Its phase.
        phase: String,
    },
    /// The service has no canary.
    #[error("service '{0}' has no canary")]
    NoCanary(String),
    /// The canary cannot do what was asked in its phase.
    #[error("the canary of '{service}' is {phase}: {why}")]
    WrongPhase {
        /// The service.
        service: String,
        /// Its phase.
        phase: String,
        /// What is needed.
        why: String,
    },
    /// The change file is refused.
    #[error("change refused")]
    Change(#[from] ChangeError),
    /// Something the isolated clone needs is not supported.
    #[error("{0}")]
    Unsupported(String),
    /// Making the clone's definition failed.
    #[error("cannot make the isolated clone")]
    Clone(#[from] crate::failover::FailoverError),
    /// A libvirt call failed.
    #[error("libvirt")]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    /// A netlink change failed.
    #[error("network")]
    Net(#[from] crate::net::NetError),
    /// A domain's XML could not be read.
    #[error("unreadable XML of {domain}")]
    Xml {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: crate::domain_xml::XmlError,
    },
    /// A guest agent call failed.
    #[error("guest agent of {domain}")]
    Agent {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: crate::monitor::agent::AgentError,
    },
    /// A command in the guest failed.
    #[error("{argv:?} failed in {domain}: {detail}")]
    Command {
        /// The domain.
        domain: String,
        /// The command.
        argv: Vec<String>,
        /// Exit status and stderr.
        detail: String,
    },
    /// Replay could not run.
    #[error("replay")]
    Replay(#[from] crate::replay::ReplayError),
    /// Recorded traffic could not be read.
    #[error("recorded traffic")]
    Capture(#[from] crate::capture::CaptureError),
    /// A file could not be read or written.
    #[error("cannot {what}")]
    Io {
        /// What was attempted, naming the file.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A shadow's memory image could not be read or given the copy's identity.
    #[error("memory image of the shadow")]
    SaveImage(#[from] crate::libvirt::saveimage::SaveImageError),
    /// A shadow cannot be copied for verification.
    #[error("cannot copy {domain} for verification")]
    Copy {
        /// The shadow.
        domain: String,
        /// What stands in the way.
        #[source]
        source: crate::domain_xml::CloneError,
    },
}

/// Where a canary stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryPhase {
    /// Its clones are being started.
    Starting,
    /// The change is being applied.
    Applying,
    /// Recorded traffic is being replayed.
    Replaying,
    /// The report is ready; the clones stand paused until promote or abort.
    Done,
    /// It could not finish (the error says why); its clones are removed.
    Failed,
    /// Being removed.
    Aborting,
    /// Its change went into the service's expected configuration.
    Promoting,
}

impl CanaryPhase {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CanaryPhase::Starting => "starting",
            CanaryPhase::Applying => "applying",
            CanaryPhase::Replaying => "replaying",
            CanaryPhase::Done => "done",
            CanaryPhase::Failed => "failed",
            CanaryPhase::Aborting => "aborting",
            CanaryPhase::Promoting => "promoting",
        }
    }

    /// Whether the canary is still working (start must not be asked again).
    pub fn busy(self) -> bool {
        !matches!(self, CanaryPhase::Failed)
    }
}

/// How one step of the change went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutcome {
    /// The step (`file /etc/x`, `command [...]`).
    pub step: String,
    /// `ok`, or what failed.
    pub result: String,
}

/// CPU time the two clones' QEMUs used while the traffic was replayed, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ReplayCpu {
    /// The baseline.
    pub baseline_ms: f64,
    /// The canary.
    pub canary_ms: f64,
}

/// Everything known of one service's canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryRecord {
    /// The service.
    pub service: String,
    /// Its class.
    pub class: String,
    /// The primary its clones were made from.
    pub primary: String,
    /// The change tried.
    pub change: Change,
    /// Where it stands.
    pub phase: CanaryPhase,
    /// The last progress line.
    pub progress: String,
    /// When it was started, Unix ms.
    pub started_unix_ms: u64,
    /// When its report was ready (or it failed), Unix ms.
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
    /// The unchanged clone.
    #[serde(default)]
    pub baseline: Option<IsolatedDomain>,
    /// The changed clone.
    #[serde(default)]
    pub canary: Option<IsolatedDomain>,
    /// How each step of the change went.
    #[serde(default)]
    pub applied: Vec<StepOutcome>,
    /// The comparison of answers.
    #[serde(default)]
    pub comparison: Option<Comparison>,
    /// CPU time used during the replay.
    #[serde(default)]
    pub cpu: Option<ReplayCpu>,
    /// How long the replay against both clones took, in ms.
    #[serde(default)]
    pub replay_ms: Option<f64>,
    /// The canary used more CPU than `latency_factor` x the baseline's plus 100 ms.
    #[serde(default)]
    pub costlier: bool,
    /// The canary's CPU and memory against the profile's envelope.
    #[serde(default)]
    pub envelope: Option<EnvelopeReport>,
    /// Isolation as checked all along.
    #[serde(default)]
    pub isolation: IsolationCheck,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// Every service's canary, and the files they are kept in.
#[derive(Debug)]
pub struct Canaries {
    dir: PathBuf,
    records: Mutex<BTreeMap<String, CanaryRecord>>,
}

impl Canaries {
    /// The records kept under `<state_dir>/canary/` (unreadable ones are reported and left).
    pub fn load(state_dir: &Path) -> Self {
        let dir = state_dir.join("canary");
        let mut records = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "json") {
                    match std::fs::read(&p)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<CanaryRecord>(&b).ok())
                    {
                        Some(mut r) => {
                            // Its task died with the previous daemon: what it made is
                            // removed by `canary abort`, which a failed canary allows.
                            if !matches!(r.phase, CanaryPhase::Done | CanaryPhase::Failed) {
                                r.error = Some(format!(
                                    "interrupted by a daemon restart while {}",
                                    r.phase.as_str()
                                ));
                                r.phase = CanaryPhase::Failed;
                            }
                            records.insert(r.service.clone(), r);
                        }
                        None => {
                            tracing::warn!(file = %p.display(), "unreadable canary record; left as is")
                        }
                    }
                }
            }
        }
        Self {
            dir,
            records: Mutex::new(records),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CanaryRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, r: &CanaryRecord) {
        let path = self.dir.join(format!("{}.json", r.service));
        let tmp = self.dir.join(format!(".{}.json.tmp", r.service));
        let res = std::fs::create_dir_all(&self.dir)
            .and_then(|_| std::fs::write(&tmp, serde_json::to_vec_pretty(r).unwrap_or_default()))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            tracing::error!(file = %path.display(), error = %e, "canary record not saved");
        }
    }

    /// Records a new canary; refused while the service has one that is not failed.
    pub fn begin(&self, r: CanaryRecord) -> Result<(), CanaryError> {
        let mut m = self.lock();
        if let Some(cur) = m.get(&r.service) {
            if cur.phase.busy() {
                return Err(CanaryError::Busy {
                    service: r.service.clone(),
                    phase: cur.phase.as_str().into(),
                });
            }
        }
        self.save(&r);
        m.insert(r.service.clone(), r);
        Ok(())
    }

    /// Changes a canary's record (and saves it); None if the service has none.
    pub fn update<T>(&self, service: &str, f: impl FnOnce(&mut CanaryRecord) -> T) -> Option<T> {
        let mut m = self.lock();
        let r = m.get_mut(service)?;
        let out = f(r);
        self.save(r);
        Some(out)
    }

    /// A canary's record.
    pub fn get(&self, service: &str) -> Option<CanaryRecord> {
        self.lock().get(service).cloned()
    }

    /// Forgets a canary (and deletes its file).
    pub fn remove(&self, service: &str) -> Option<CanaryRecord> {
        let r = self.lock().remove(service);
        let _ = std::fs::remove_file(self.dir.join(format!("{service}.json")));
        r
    }

    /// Moves a canary from one of `from` to `to`, atomically; the error names its phase.
    pub fn transition(
        &self,
        service: &str,
        from: &[CanaryPhase],
        to: CanaryPhase,
        why: &str,
    ) -> Result<CanaryRecord, CanaryError> {
        let mut m = self.lock();
        let r = m
            .get_mut(service)
            .ok_or_else(|| CanaryError::NoCanary(service.to_string()))?;
        if !from.contains(&r.phase) {
            return Err(CanaryError::WrongPhase {
                service: service.to_string(),
                phase: r.phase.as_str().into(),
                why: why.to_string(),
            });
        }
        r.phase = to;
        let out = r.clone();
        self.save(&out);
        Ok(out)
    }

    /// Every record.
    pub fn all(&self) -> Vec<CanaryRecord> {
        self.lock().values().cloned().collect()
    }

    /// The change files promoted for `service`, oldest first: what its new shadows get.
    pub fn promoted_changes(&self, service: &str) -> Vec<Change> {
        let path = self.dir.join("promoted").join(format!("{service}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The golden image promoted last for `service`: what its new shadows' system disk boots
    /// an overlay of.
    pub fn promoted_golden_image(&self, service: &str) -> Option<PathBuf> {
        self.promoted_changes(service)
            .into_iter()
            .rev()
            .find_map(|c| c.golden_image)
    }

    /// Adds `change` to the changes promoted for `service` (atomically).
    pub fn promote_change(&self, service: &str, change: &Change) -> Result<(), CanaryError> {
        let mut all = self.promoted_changes(service);
        all.push(change.clone());
        let dir = self.dir.join("promoted");
        let path = dir.join(format!("{service}.json"));
        let tmp = dir.join(format!(".{service}.json.tmp"));
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&tmp, serde_json::to_vec_pretty(&all).unwrap_or_default()))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| CanaryError::Io {
                what: format!("write {}", path.display()),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str) -> CanaryRecord {
        CanaryRecord {
            service: service.into(),
            class: "web".into(),
            primary: "web1".into(),
            change: Change::parse("[[command]]\nargv = [\"/bin/true\"]\n").unwrap(),
            phase: CanaryPhase::Starting,
            progress: String::new(),
            started_unix_ms: 1,
            finished_unix_ms: None,
            baseline: None,
            canary: None,
            applied: vec![],
            comparison: None,
            cpu: None,
            replay_ms: None,
            costlier: false,
            envelope: None,
            isolation: IsolationCheck::default(),
            error: None,
        }
    }

    #[test]
    fn one_canary_per_service_and_records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = Canaries::load(dir.path());
        c.begin(record("web1")).unwrap();
        assert!(matches!(
            c.begin(record("web1")),
            Err(CanaryError::Busy { .. })
        ));
        let e = c
            .transition(
                "web1",
                &[CanaryPhase::Done],
                CanaryPhase::Promoting,
                "promote needs a finished report",
            )
            .unwrap_err();
        assert!(e.to_string().contains("is starting"), "{e}");
        c.update("web1", |r| r.phase = CanaryPhase::Done);
        let again = Canaries::load(dir.path());
        assert_eq!(again.get("web1").unwrap().phase, CanaryPhase::Done);
        c.update("web1", |r| r.phase = CanaryPhase::Failed);
        c.begin(record("web1")).unwrap();
        c.remove("web1");
        assert!(Canaries::load(dir.path()).get("web1").is_none());
        c.promote_change("web1", &record("x").change).unwrap();
        assert_eq!(c.promoted_changes("web1").len(), 1);
        assert_eq!(c.promoted_golden_image("web1"), None);
        for image in ["/images/a.qcow2", "/images/b.qcow2"] {
            let g = Change::parse(&format!("golden_image = \"{image}\"\n")).unwrap();
            c.promote_change("web1", &g).unwrap();
        }
        c.promote_change("web1", &record("x").change).unwrap();
        // The last image promoted wins; a later change without one keeps it.
        assert_eq!(
            Canaries::load(dir.path()).promoted_golden_image("web1"),
            Some(PathBuf::from("/images/b.qcow2"))
        );
    }
}
