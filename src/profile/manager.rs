//! The profile manager: one [`Learner`] per protected service, fed by the collectors, and the
//! policy of when a profile becomes a stored version.
//!
//! - At the first observation of a service its learner resumes from the store's current version
//!   (or starts empty).
//! - A fresh service gets its first version ([`Reason::Initial`]) once it has been observed for
//!   [`INITIAL_COMMIT_AFTER_MS`], so a restart soon after protection does not lose what was
//!   learned.
//! - Drift ([`DriftEvent`]) commits a version ([`Reason::Drift`]) at once, then at most once per
//!   [`DRIFT_COMMIT_COOLDOWN_MS`]: drift arriving during the cool-down is gathered into the next
//!   commit, so a burst of new dependencies is one version, not fifty.
//! - Every [`SCHEDULED_COMMIT_EVERY_MS`] (an hour) the live profile is compared with the last
//!   stored one and committed ([`Reason::Scheduled`]) only if the difference is material
//!   ([`ProfileDiff::is_empty`]).
//! - Rollback stores a new version equal to the old one, and the live learner adopts it.
//! - [`ProfileManager::sync`] exchanges versions with the central repository; a version pulled
//!   from it is adopted by the live learner.
//!
//! Times come from the observations (and the caller for reports), never from a clock here, so
//! the policy is testable with synthetic time. Drift and accuracy are exported to [`Metrics`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::accuracy::AccuracyReport;
use super::apply::{resource_plan, ResourceLimits, ResourcePlan};
use super::drift::{DriftEvent, DriftKind, DriftParams};
use super::layout::Reason;
use super::learner::{Dependency, Learner, LearnerError, LearnerParams, Profile};
use super::model::{ModelParams, Prediction, Source, HOUR_MS};
use super::repo::ProfileRepository;
use super::store::{
    ProfileDiff, ProfileStore, SkippedFile, StoreError, SyncReport, VersionSummary,
};
use super::{Metric, Observation};
use crate::api::metrics::Metrics;
use crate::config::ProfileConfig;
use crate::events::{EventKind, EventLog};

/// Observation time after which a service without any stored version gets its first one.
pub const INITIAL_COMMIT_AFTER_MS: u64 = 5 * 60_000;
/// Period of the scheduled comparison with the stored version.
pub const SCHEDULED_COMMIT_EVERY_MS: u64 = HOUR_MS;
/// Shortest time between two drift commits of one service.
pub const DRIFT_COMMIT_COOLDOWN_MS: u64 = 5 * 60_000;
/// Observations a profile needs before it may size a shadow.
pub const MIN_PLAN_OBSERVATIONS: u64 = 30;
/// Least memory a plan gives a shadow, KiB: below this no general-purpose guest boots.
pub const MEM_FLOOR_KIB: u64 = 64 * 1024;
/// Observations kept per service for the `observed` part of reports.
pub const RECENT_OBSERVATIONS: usize = 120;
/// Observations kept with their predicted limits for plots: six hours at one a second.
pub const TRACE_POINTS: usize = 6 * 3600;
/// Longest drift detail stored in a version's reason.
const MAX_REASON_DETAIL: usize = 1024;

/// Limits for plans made without knowing the shadow: the floor only. The promotion clamps the
/// plan to the maxima the shadow was created with.
pub const OPEN_LIMITS: ResourceLimits = ResourceLimits {
    vcpu_max: 4096,
    mem_max_kib: 1 << 40,
    vcpu_min: 1,
    mem_min_kib: MEM_FLOOR_KIB,
};

/// Errors of the profile manager.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The `[profile]` settings make invalid learner parameters.
    #[error("invalid profile parameters")]
    Params(#[source] LearnerError),
    /// The store failed (its error names the service, version or file).
    #[error("profile store failed")]
    Store(#[from] StoreError),
    /// Nothing is known about the service: no observation since start, no stored version.
    #[error("no profile for service '{service}': nothing observed or stored yet (profiles exist for: {known})")]
    UnknownService {
        /// The service asked for.
        service: String,
        /// Services with a profile, comma-separated, or `(none)`.
        known: String,
    },
    /// A stored version could not seed a learner.
    #[error("profile v{version} of service '{service}' cannot be resumed")]
    Resume {
        /// The service.
        service: String,
        /// The version.
        version: u64,
        /// Why.
        #[source]
        source: LearnerError,
    },
    /// The service has stored versions but is not observed by this daemon, so there is no
    /// live profile (accuracy, recent use, a profile to save).
    #[error("service '{service}' is not observed by this daemon since it started; accuracy, plots and saves need the live profile")]
    NotLive {
        /// The service.
        service: String,
    },
    /// A thread panicked while holding the manager's lock.
    #[error("profile manager lock poisoned")]
    Poisoned,
}

/// Learner parameters from the `[profile]` section.
pub fn learner_params(cfg: &ProfileConfig) -> LearnerParams {
    LearnerParams {
        model: ModelParams {
            headroom: f64::from(cfg.headroom_pct) / 100.0,
            min_samples_per_bucket: cfg.min_samples_per_bucket,
            ..ModelParams::default()
        },
        drift: DriftParams {
            window: cfg.drift_window as usize,
            coverage_threshold: cfg.drift_coverage_threshold,
            ..DriftParams::default()
        },
        ..LearnerParams::default()
    }
}

/// The `kind` label of a drift event in metrics.
/// Every [`drift_label`], for metrics that export each kind from the start.
pub const DRIFT_LABELS: [&str; 4] = [
    "coverage_drop",
    "level_shift",
    "new_dependency",
    "config_change",
];

pub fn drift_label(kind: &DriftKind) -> &'static str {
    match kind {
        DriftKind::CoverageDrop { .. } => "coverage_drop",
        DriftKind::LevelShift { .. } => "level_shift",
        DriftKind::NewDependency { .. } => "new_dependency",
        DriftKind::ConfigChange { .. } => "config_change",
    }
}

/// The stored version a live profile descends from.
#[derive(Debug, Clone)]
struct Base {
    summary: VersionSummary,
    profile: Profile,
}

/// Live state of one service.
#[derive(Debug)]
struct Live {
    learner: Learner,
    base: Option<Base>,
    /// Bumped whenever the profile is replaced (rollback, pulled version).
    generation: u64,
    first_seen_unix_ms: Option<u64>,
    last_scheduled_unix_ms: Option<u64>,
    last_drift_commit_unix_ms: Option<u64>,
    pending_drift: Vec<String>,
    observations: u64,
    /// `(ts, cpu cores, memory bytes)` of the latest observations.
    recent: VecDeque<(u64, f64, u64)>,
    /// Each observation with the limits the profile had for it, for `profile plot`.
    trace: VecDeque<SeriesPoint>,
}

/// One observation and the envelope limits predicted for its time, before it was learned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Unix ms.
    pub ts_unix_ms: u64,
    /// CPU used, in cores.
    pub cpu_cores: f64,
    /// The CPU limit predicted for this time, in cores.
    pub cpu_limit: f64,
    /// Memory used, in bytes.
    pub mem_bytes: f64,
    /// The memory limit predicted for this time, in bytes.
    pub mem_limit: f64,
}

/// Answer to `profile plot`: observed use against the predicted envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSeries {
    /// The service.
    pub service: String,
    /// The points, oldest first (at most [`TRACE_POINTS`], the newest ones).
    pub points: Vec<SeriesPoint>,
}

/// What one observation led to.
#[derive(Debug, Default)]
pub struct ObserveOutcome {
    /// Drift detected in this observation.
    pub drift: Vec<DriftEvent>,
    /// The version committed because of it, with its reason.
    pub committed: Option<(u64, Reason)>,
}

/// A summary of one observed quantity over the recent window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// Latest value.
    pub last: f64,
    /// Largest value.
    pub max: f64,
    /// Mean value.
    pub mean: f64,
}

/// What the primary actually used recently, to compare with the envelopes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedSummary {
    /// Observations summarised.
    pub samples: usize,
    /// Time of the oldest one, Unix ms.
    pub since_unix_ms: u64,
    /// Busy CPU, cores.
    pub cpu_cores: Observed,
    /// Memory in use, bytes.
    pub mem_bytes: Observed,
}

/// The vCPU and memory sizing a profile asks for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, KiB.
    pub mem_kib: u64,
}

/// Answer to `profile show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileReport {
    /// The service.
    pub service: String,
    /// When the prediction is for, Unix ms.
    pub at_unix_ms: u64,
    /// Whether this daemon observes the service (otherwise the stored version is shown).
    pub live: bool,
    /// The stored version the profile descends from.
    pub version: Option<VersionSummary>,
    /// Observations the model has learned from, in total.
    pub observations: u64,
    /// Envelopes expected now.
    pub prediction: Prediction,
    /// Shadow sizing from the prediction, once the profile is mature enough to size shadows.
    pub plan: Option<PlanSummary>,
    /// What the primary used recently (live services only).
    pub observed: Option<ObservedSummary>,
    /// Configuration items and their content hashes.
    pub expected_config: BTreeMap<String, String>,
    /// Network dependencies, by key (`tcp://10.0.0.5:5432`).
    pub dependencies: BTreeMap<String, Dependency>,
    /// How well the live profile predicted since the daemon started.
    pub accuracy: Option<AccuracyReport>,
}

/// Answer to `profile history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryReport {
    /// The service.
    pub service: String,
    /// Readable versions, oldest first.
    pub versions: Vec<VersionSummary>,
    /// Version files that could not be read, with why.
    pub skipped: Vec<SkippedFile>,
}

/// Answer to `profile rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackReport {
    /// The service.
    pub service: String,
    /// The version rolled back to.
    pub to: u64,
    /// The new version, equal to `to`.
    pub version: u64,
    /// Whether a live learner adopted it.
    pub live: bool,
}

/// One service's entry in `profile accuracy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyEntry {
    /// The service.
    pub service: String,
    /// The stored version the live profile descends from.
    pub version: Option<u64>,
    /// Scores since the daemon started.
    pub report: AccuracyReport,
}

/// Owns the learners, the store and the repository.
pub struct ProfileManager {
    store: ProfileStore,
    repo: Option<Arc<dyn ProfileRepository>>,
    params: LearnerParams,
    metrics: Arc<Metrics>,
    events: Option<EventLog>,
    live: Mutex<BTreeMap<String, Live>>,
    /// Coverage target per service (its class's), applied to its learner when it is loaded.
    targets: Mutex<BTreeMap<String, f64>>,
    commits: Mutex<()>,
    repo_missing_reported: AtomicBool,
}

impl fmt::Debug for ProfileManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProfileManager")
            .field("store", &self.store.root())
            .field("repo", &self.repo.as_ref().map(|r| r.location()))
            .finish()
    }
}

fn bounded_detail(details: &[String]) -> String {
    let mut s = details.join("; ");
    if s.len() > MAX_REASON_DETAIL {
        let mut end = MAX_REASON_DETAIL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn observed(values: impl Iterator<Item = f64> + Clone) -> Observed {
    let n = values.clone().count().max(1) as f64;
    Observed {
        last: values.clone().last().unwrap_or(0.0),
        max: values.clone().fold(0.0, f64::max),
        mean: values.sum::<f64>() / n,
    }
}

/// Whether a profile has seen enough to size a shadow.
fn mature(profile: &Profile, prediction: &Prediction) -> bool {
    profile.model.observations() >= MIN_PLAN_OBSERVATIONS
        && prediction.envelopes.cpu.source != Source::Empty
        && prediction.envelopes.mem.source != Source::Empty
}

impl ProfileManager {
    /// Opens the store under `state_dir` and, when `repository` is given, uses it as the
    /// central repository.
    pub fn open(
        state_dir: &Path,
        cfg: &ProfileConfig,
        repository: Option<Arc<dyn ProfileRepository>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ManagerError> {
        let params = learner_params(cfg);
        params.validate().map_err(ManagerError::Params)?;
        Ok(ProfileManager {
            store: ProfileStore::open(state_dir)?.with_retention(cfg.keep_versions as usize),
            repo: repository,
            params,
            metrics,
            events: None,
            live: Mutex::new(BTreeMap::new()),
            targets: Mutex::new(BTreeMap::new()),
            commits: Mutex::new(()),
            repo_missing_reported: AtomicBool::new(false),
        })
    }

    /// Reports drift and stored versions to `events` too.
    pub fn with_events(mut self, events: EventLog) -> Self {
        self.events = Some(events);
        self
    }

    fn emit(&self, service: &str, kind: EventKind) {
        if let Some(e) = &self.events {
            e.emit(Some(service), kind);
        }
    }

    /// The version store.
    pub fn store(&self) -> &ProfileStore {
        &self.store
    }

    /// The live state. Never held across file I/O: a promotion reads plans under it.
    fn lock(&self) -> Result<MutexGuard<'_, BTreeMap<String, Live>>, ManagerError> {
        self.live.lock().map_err(|_| ManagerError::Poisoned)
    }

    /// Serialises whatever writes versions and moves a live profile's base with it (commits,
    /// rollbacks, adoption of pulled versions), so a commit never lands on top of a rollback.
    fn commit_lock(&self) -> Result<MutexGuard<'_, ()>, ManagerError> {
        self.commits.lock().map_err(|_| ManagerError::Poisoned)
    }

    /// Sets the coverage `service`'s profile calibrates to (its class's `coverage_target`), now
    /// if it is live and whenever its learner is loaded.
    pub fn set_coverage_target(&self, service: &str, target: f64) -> Result<(), ManagerError> {
        if let Some(st) = self.lock()?.get_mut(service) {
            st.learner
                .set_coverage_target(target)
                .map_err(|e| ManagerError::Params(e.into()))?;
        }
        self.targets
            .lock()
            .map_err(|_| ManagerError::Poisoned)?
            .insert(service.to_string(), target);
        Ok(())
    }

    /// A learner for `service`, resumed from its current stored version if it has one.
    fn load(&self, service: &str) -> Result<Live, ManagerError> {
        let (mut learner, base) = match self.store.current(service)? {
            Some(v) => {
                let learner =
                    Learner::resume(v.profile.clone(), self.params.clone()).map_err(|source| {
                        ManagerError::Resume {
                            service: service.to_string(),
                            version: v.version,
                            source,
                        }
                    })?;
                tracing::info!(
                    service,
                    version = v.version,
                    "profile resumed from stored version"
                );
                let summary = VersionSummary {
                    version: v.version,
                    created_unix_ms: v.created_unix_ms,
                    reason: v.reason,
                };
                (
                    learner,
                    Some(Base {
                        summary,
                        profile: v.profile,
                    }),
                )
            }
            None => (
                Learner::new(self.params.clone()).map_err(ManagerError::Params)?,
                None,
            ),
        };
        let target = self
            .targets
            .lock()
            .map_err(|_| ManagerError::Poisoned)?
            .get(service)
            .copied();
        if let Some(t) = target {
            learner
                .set_coverage_target(t)
                .map_err(|e| ManagerError::Params(e.into()))?;
        }
        Ok(Live {
            learner,
            base,
            generation: 0,
            first_seen_unix_ms: None,
            last_scheduled_unix_ms: None,
            last_drift_commit_unix_ms: None,
            pending_drift: Vec::new(),
            observations: 0,
            recent: VecDeque::new(),
            trace: VecDeque::new(),
        })
    }

    fn unknown(&self, service: &str) -> ManagerError {
        let mut names: Vec<String> = self
            .live
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names.extend(self.store.services().unwrap_or_default());
        names.sort();
        names.dedup();
        ManagerError::UnknownService {
            service: service.to_string(),
            known: if names.is_empty() {
                "(none)".into()
            } else {
                names.join(", ")
            },
        }
    }

    fn is_live(&self, service: &str) -> Result<bool, ManagerError> {
        Ok(self.lock()?.contains_key(service))
    }

    fn has_versions(&self, service: &str) -> Result<bool, ManagerError> {
        Ok(!self.store.history(service)?.is_empty() || !self.store.skipped(service)?.is_empty())
    }

    /// Errs unless `service` is observed or has stored versions.
    fn require_known(&self, service: &str) -> Result<(), ManagerError> {
        if self.is_live(service)? || self.has_versions(service)? {
            Ok(())
        } else {
            Err(self.unknown(service))
        }
    }

    /// Learns one observation of `service`'s primary; commits a version when the policy says
    /// so (see the module documentation).
    pub fn observe(
        &self,
        service: &str,
        obs: &Observation,
    ) -> Result<ObserveOutcome, ManagerError> {
        if !self.is_live(service)? {
            // Read the stored version without holding the live lock.
            let loaded = self.load(service)?;
            self.lock()?.entry(service.to_string()).or_insert(loaded);
        }
        let (drift, pending) = {
            let mut map = self.lock()?;
            let Some(st) = map.get_mut(service) else {
                return Err(self.unknown(service));
            };
            let drift = self.learn(service, st, obs);
            let pending = self
                .due_commit(st, obs.ts_unix_ms)
                .map(|reason| (reason, st.learner.profile().clone(), st.generation));
            (drift, pending)
        };
        let mut committed = None;
        if let Some((reason, profile, generation)) = pending {
            let now = obs.ts_unix_ms;
            let _commits = self.commit_lock()?;
            // A rollback or a pulled version replaced the profile meanwhile: this one is stale.
            let current = self
                .lock()?
                .get(service)
                .is_some_and(|st| st.generation == generation);
            if current {
                match self.store.commit_at(service, &profile, reason.clone(), now) {
                    Ok(version) => {
                        if let Some(st) = self.lock()?.get_mut(service) {
                            st.base = Some(Base {
                                summary: VersionSummary {
                                    version,
                                    created_unix_ms: now,
                                    reason: reason.clone(),
                                },
                                profile,
                            });
                        }
                        self.emit(
                            service,
                            EventKind::ProfileVersion {
                                version,
                                reason: reason.to_string(),
                            },
                        );
                        committed = Some((version, reason));
                    }
                    // The next occasion (drift cool-down, schedule) tries again.
                    Err(e) => {
                        tracing::warn!(service, error = %crate::error::report(&e), "profile version not committed")
                    }
                }
            }
        }
        Ok(ObserveOutcome { drift, committed })
    }

    /// Feeds the learner, exports drift and accuracy.
    fn learn(&self, service: &str, st: &mut Live, obs: &Observation) -> Vec<DriftEvent> {
        let now = obs.ts_unix_ms;
        st.observations += 1;
        st.first_seen_unix_ms.get_or_insert(now);
        st.last_scheduled_unix_ms.get_or_insert(now);
        if st.recent.len() >= RECENT_OBSERVATIONS {
            st.recent.pop_front();
        }
        st.recent
            .push_back((now, obs.value(Metric::Cpu), obs.value(Metric::Mem) as u64));
        // What the profile expected for this moment, before it learns from it.
        let limits = st.learner.profile().model.predict(now).envelopes;
        if st.trace.len() >= TRACE_POINTS {
            st.trace.pop_front();
        }
        st.trace.push_back(SeriesPoint {
            ts_unix_ms: now,
            cpu_cores: obs.value(Metric::Cpu),
            cpu_limit: limits.cpu.limit,
            mem_bytes: obs.value(Metric::Mem),
            mem_limit: limits.mem.limit,
        });
        let drift = st.learner.observe(obs);
        for e in &drift {
            self.metrics.inc_drift_event(service, drift_label(&e.kind));
            tracing::info!(service, drift = %e.detail, "profile drift");
            self.emit(
                service,
                EventKind::Drift {
                    drift: drift_label(&e.kind).to_string(),
                    detail: e.detail.clone(),
                },
            );
            st.pending_drift.push(e.detail.clone());
        }
        let report = st.learner.accuracy();
        for (m, a) in report.metrics.iter() {
            self.metrics.set_profile_accuracy(
                service,
                m.name(),
                a.coverage,
                a.under_rate,
                a.mean_waste,
            );
        }
        drift
    }

    /// The reason to commit the live profile now, if there is one.
    fn due_commit(&self, st: &mut Live, now: u64) -> Option<Reason> {
        if !st.pending_drift.is_empty()
            && st
                .last_drift_commit_unix_ms
                .is_none_or(|t| now.saturating_sub(t) >= DRIFT_COMMIT_COOLDOWN_MS)
        {
            st.last_drift_commit_unix_ms = Some(now);
            return Some(Reason::Drift {
                detail: bounded_detail(&std::mem::take(&mut st.pending_drift)),
            });
        }
        if st.base.is_none() {
            return st
                .first_seen_unix_ms
                .is_some_and(|t| now.saturating_sub(t) >= INITIAL_COMMIT_AFTER_MS)
                .then_some(Reason::Initial);
        }
        if st
            .last_scheduled_unix_ms
            .is_some_and(|t| now.saturating_sub(t) >= SCHEDULED_COMMIT_EVERY_MS)
        {
            st.last_scheduled_unix_ms = Some(now);
            let changed = st.base.as_ref().is_none_or(|b| {
                !ProfileDiff::between(
                    b.summary.version,
                    &b.profile,
                    b.summary.version,
                    st.learner.profile(),
                )
                .is_empty()
            });
            return changed.then_some(Reason::Scheduled);
        }
        None
    }

    /// The current profile of `service` and what it predicts at `now_unix_ms`.
    pub fn show(&self, service: &str, now_unix_ms: u64) -> Result<ProfileReport, ManagerError> {
        {
            let map = self.lock()?;
            if let Some(st) = map.get(service) {
                let profile = st.learner.profile();
                let observed = (!st.recent.is_empty()).then(|| ObservedSummary {
                    samples: st.recent.len(),
                    since_unix_ms: st.recent.front().map_or(0, |r| r.0),
                    cpu_cores: observed(st.recent.iter().map(|r| r.1)),
                    mem_bytes: observed(st.recent.iter().map(|r| r.2 as f64)),
                });
                return Ok(report(
                    service,
                    now_unix_ms,
                    true,
                    st.base.as_ref().map(|b| b.summary.clone()),
                    profile,
                    observed,
                    Some(st.learner.accuracy()),
                ));
            }
        }
        match self.store.current(service)? {
            Some(v) => {
                let summary = VersionSummary {
                    version: v.version,
                    created_unix_ms: v.created_unix_ms,
                    reason: v.reason.clone(),
                };
                Ok(report(
                    service,
                    now_unix_ms,
                    false,
                    Some(summary),
                    &v.profile,
                    None,
                    None,
                ))
            }
            None => Err(self.unknown(service)),
        }
    }

    /// Stores the live profile of `service` as a new version with reason `manual`, at once
    /// (a new service otherwise waits minutes for its first version).
    pub fn save(&self, service: &str, now_unix_ms: u64) -> Result<VersionSummary, ManagerError> {
        let _commits = self.commit_lock()?;
        // Bound first: the live lock must be released before `unknown` takes it again.
        let live = self
            .lock()?
            .get(service)
            .map(|st| st.learner.profile().clone());
        let profile = match live {
            Some(p) => p,
            None if self.has_versions(service)? => {
                return Err(ManagerError::NotLive {
                    service: service.to_string(),
                })
            }
            None => return Err(self.unknown(service)),
        };
        let version = self
            .store
            .commit_at(service, &profile, Reason::Manual, now_unix_ms)?;
        let summary = VersionSummary {
            version,
            created_unix_ms: now_unix_ms,
            reason: Reason::Manual,
        };
        if let Some(st) = self.lock()?.get_mut(service) {
            st.base = Some(Base {
                summary: summary.clone(),
                profile,
            });
        }
        tracing::info!(service, version, "profile saved on request");
        self.emit(
            service,
            EventKind::ProfileVersion {
                version,
                reason: Reason::Manual.to_string(),
            },
        );
        Ok(summary)
    }

    /// What `service`'s primary used since `since_unix_ms`, with the limits predicted for each
    /// moment.
    pub fn series(&self, service: &str, since_unix_ms: u64) -> Result<ProfileSeries, ManagerError> {
        // Bound first: the live lock must be released before `unknown` takes it again.
        let live: Option<Vec<_>> = self.lock()?.get(service).map(|st| {
            st.trace
                .iter()
                .filter(|p| p.ts_unix_ms >= since_unix_ms)
                .copied()
                .collect()
        });
        let points = match live {
            Some(points) => points,
            None if self.has_versions(service)? => {
                return Err(ManagerError::NotLive {
                    service: service.to_string(),
                })
            }
            None => return Err(self.unknown(service)),
        };
        Ok(ProfileSeries {
            service: service.to_string(),
            points,
        })
    }

    /// The stored versions of `service`, and the files that could not be read.
    pub fn history(&self, service: &str) -> Result<HistoryReport, ManagerError> {
        let versions = self.store.history(service)?;
        let skipped = self.store.skipped(service)?;
        if versions.is_empty() && skipped.is_empty() && !self.is_live(service)? {
            return Err(self.unknown(service));
        }
        Ok(HistoryReport {
            service: service.to_string(),
            versions,
            skipped,
        })
    }

    /// What changed from version `a` to version `b` of `service`.
    pub fn diff(&self, service: &str, a: u64, b: u64) -> Result<ProfileDiff, ManagerError> {
        self.require_known(service)?;
        Ok(self.store.diff(service, a, b)?)
    }

    /// Makes version `to` (the previous readable one when `None`) current again as a new
    /// version; the live learner, if any, continues from it.
    pub fn rollback(&self, service: &str, to: Option<u64>) -> Result<RollbackReport, ManagerError> {
        self.require_known(service)?;
        let _commits = self.commit_lock()?;
        let version = self.store.rollback(service, to)?;
        let v = self.store.get(service, version)?;
        let target = match v.reason {
            Reason::Rollback { to } => to,
            _ => version,
        };
        let live = match self.lock()?.get_mut(service) {
            Some(st) => {
                st.learner.replace_profile(v.profile.clone());
                st.generation += 1;
                st.pending_drift.clear();
                st.base = Some(Base {
                    summary: VersionSummary {
                        version,
                        created_unix_ms: v.created_unix_ms,
                        reason: v.reason.clone(),
                    },
                    profile: v.profile,
                });
                true
            }
            None => false,
        };
        tracing::info!(service, to = target, version, live, "profile rolled back");
        Ok(RollbackReport {
            service: service.to_string(),
            to: target,
            version,
            live,
        })
    }

    /// Live accuracy of one service, or of every observed service.
    pub fn accuracy(&self, service: Option<&str>) -> Result<Vec<AccuracyEntry>, ManagerError> {
        let entry = |name: &str, st: &Live| AccuracyEntry {
            service: name.to_string(),
            version: st.base.as_ref().map(|b| b.summary.version),
            report: st.learner.accuracy(),
        };
        let found = {
            let map = self.lock()?;
            match service {
                None => return Ok(map.iter().map(|(n, st)| entry(n, st)).collect()),
                Some(name) => map.get(name).map(|st| vec![entry(name, st)]),
            }
        };
        match (found, service) {
            (Some(v), _) => Ok(v),
            (None, Some(name)) if self.has_versions(name)? => Err(ManagerError::NotLive {
                service: name.to_string(),
            }),
            (None, name) => Err(self.unknown(name.unwrap_or_default())),
        }
    }

    /// The shadow sizing `service`'s live profile asks for at `at_unix_ms`, within `limits`;
    /// `None` while the profile is too young to size anything (or the service is unknown).
    /// Cheap and free of I/O: promotions call it.
    pub fn resource_plan(
        &self,
        service: &str,
        at_unix_ms: u64,
        limits: ResourceLimits,
    ) -> Option<ResourcePlan> {
        let map = self.live.lock().ok()?;
        let profile = map.get(service)?.learner.profile();
        mature(profile, &profile.model.predict(at_unix_ms))
            .then(|| resource_plan(profile, at_unix_ms, limits))
    }

    /// The stored version the live profile of `service` descends from.
    pub fn live_version(&self, service: &str) -> Option<u64> {
        let map = self.live.lock().ok()?;
        map.get(service)?.base.as_ref().map(|b| b.summary.version)
    }

    /// Exchanges versions with the central repository and lets live learners adopt versions
    /// pulled from it. `Ok(None)` when no repository is configured or its directory does not
    /// exist (a missing mount is reported once, never created over).
    pub fn sync(&self) -> Result<Option<SyncReport>, ManagerError> {
        let Some(repo) = &self.repo else {
            return Ok(None);
        };
        if !repo.ready() {
            if !self.repo_missing_reported.swap(true, Ordering::Relaxed) {
                tracing::warn!(repository = %repo.location(), "profile repository directory does not exist; versions stay local until it does");
            }
            return Ok(None);
        }
        self.repo_missing_reported.store(false, Ordering::Relaxed);
        let _commits = self.commit_lock()?;
        let report = self.store.sync(repo.as_ref())?;
        for s in &report.services {
            let Some(pulled) = s.pulled else { continue };
            let v = match self.store.get(&s.service, pulled) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(service = %s.service, version = pulled, error = %e, "pulled version unreadable");
                    continue;
                }
            };
            let mut map = self.lock()?;
            let Some(st) = map.get_mut(&s.service) else {
                continue;
            };
            if st
                .base
                .as_ref()
                .is_some_and(|b| b.summary.version >= pulled)
            {
                continue;
            }
            st.learner.replace_profile(v.profile.clone());
            st.generation += 1;
            st.base = Some(Base {
                summary: VersionSummary {
                    version: v.version,
                    created_unix_ms: v.created_unix_ms,
                    reason: v.reason,
                },
                profile: v.profile,
            });
            tracing::info!(service = %s.service, version = pulled, "live profile follows the version pulled from the repository");
        }
        Ok(Some(report))
    }
}

fn report(
    service: &str,
    now_unix_ms: u64,
    live: bool,
    version: Option<VersionSummary>,
    profile: &Profile,
    observed: Option<ObservedSummary>,
    accuracy: Option<AccuracyReport>,
) -> ProfileReport {
    let prediction = profile.model.predict(now_unix_ms);
    let plan = mature(profile, &prediction).then(|| {
        let p = resource_plan(profile, now_unix_ms, OPEN_LIMITS);
        PlanSummary {
            vcpus: p.vcpus,
            mem_kib: p.mem_kib,
        }
    });
    ProfileReport {
        service: service.to_string(),
        at_unix_ms: now_unix_ms,
        live,
        version,
        observations: profile.model.observations(),
        prediction,
        plan,
        observed,
        expected_config: profile.expected_config.clone(),
        dependencies: profile.dependencies.clone(),
        accuracy,
    }
}

const MIB: f64 = 1024.0 * 1024.0;

impl fmt::Display for ProfileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = match &self.version {
            Some(v) => format!("v{} ({})", v.version, v.reason),
            None => "not stored yet".into(),
        };
        writeln!(
            f,
            "service {}: profile {version}, {} observations{}",
            self.service,
            self.observations,
            if self.live {
                ""
            } else {
                " (not observed by this daemon)"
            }
        )?;
        let e = &self.prediction.envelopes;
        writeln!(
            f,
            "  now: cpu p50 {:.2} p95 {:.2} limit {:.2} cores; mem p50 {:.0} p95 {:.0} limit {:.0} MiB (from {:?})",
            e.cpu.p50,
            e.cpu.p95,
            e.cpu.limit,
            e.mem.p50 / MIB,
            e.mem.p95 / MIB,
            e.mem.limit / MIB,
            e.cpu.source
        )?;
        if let Some(o) = &self.observed {
            writeln!(
                f,
                "  observed (last {}): cpu mean {:.2} max {:.2} cores; mem mean {:.0} max {:.0} MiB",
                o.samples,
                o.cpu_cores.mean,
                o.cpu_cores.max,
                o.mem_bytes.mean / MIB,
                o.mem_bytes.max / MIB
            )?;
        }
        match &self.plan {
            Some(p) => writeln!(
                f,
                "  shadow plan: {} vCPU, {} MiB",
                p.vcpus,
                p.mem_kib / 1024
            )?,
            None => writeln!(
                f,
                "  shadow plan: none yet (needs {MIN_PLAN_OBSERVATIONS} observations)"
            )?,
        }
        if !self.dependencies.is_empty() {
            writeln!(f, "  dependencies:")?;
            for (k, d) in &self.dependencies {
                writeln!(f, "    {k} (seen {} times)", d.count)?;
            }
        }
        if !self.expected_config.is_empty() {
            writeln!(f, "  configuration:")?;
            for (k, h) in &self.expected_config {
                writeln!(f, "    {k} {h}")?;
            }
        }
        if let Some(a) = &self.accuracy {
            writeln!(
                f,
                "  accuracy: {} samples, coverage {:.1}%, under {:.1}%, waste {:.1}%, {} drift events",
                a.samples,
                a.coverage * 100.0,
                a.under_rate * 100.0,
                a.mean_waste * 100.0,
                a.drift_events
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for HistoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.versions.is_empty() {
            writeln!(f, "service {}: no stored version", self.service)?;
        }
        for v in &self.versions {
            writeln!(
                f,
                "v{:<5} {}  {}",
                v.version,
                format_unix_ms(v.created_unix_ms),
                v.reason
            )?;
        }
        for s in &self.skipped {
            writeln!(f, "SKIPPED {}: {}", s.path.display(), s.error)?;
        }
        Ok(())
    }
}

/// Renders accuracy entries as a table.
pub fn render_accuracy(entries: &[AccuracyEntry]) -> String {
    let mut out = String::from("SERVICE  VERSION  SAMPLES  COVERAGE  UNDER  WASTE  DRIFT\n");
    for e in entries {
        let r = &e.report;
        out.push_str(&format!(
            "{}  {}  {}  {:.1}%  {:.1}%  {:.1}%  {}\n",
            e.service,
            e.version.map_or("-".into(), |v| format!("v{v}")),
            r.samples,
            r.coverage * 100.0,
            r.under_rate * 100.0,
            r.mean_waste * 100.0,
            r.drift_events
        ));
    }
    if entries.is_empty() {
        out.push_str("(no service observed yet)\n");
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time in ms.
pub(crate) fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::repo::DirectoryRepository;
    use crate::profile::synthetic::TRACE_START_UNIX_MS;
    use crate::profile::{PeerUse, Proto};

    const MIN: u64 = 60_000;

    fn manager(dir: &Path) -> ProfileManager {
        ProfileManager::open(
            dir,
            &ProfileConfig::default(),
            Some(Arc::new(DirectoryRepository::new(dir.join("repo")))),
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    fn obs(ts: u64, cpu: f64, config: &[(&str, &str)], peers: &[(&str, u16)]) -> Observation {
        Observation {
            ts_unix_ms: ts,
            cpu_cores: cpu,
            mem_bytes: 512 << 20,
            disk_bytes_per_s: 0.0,
            net_bytes_per_s: 1e3,
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            peers: peers
                .iter()
                .map(|(a, p)| PeerUse {
                    addr: a.to_string(),
                    port: *p,
                    proto: Proto::Tcp,
                    bytes: 0,
                })
                .collect(),
        }
    }

    fn versions(m: &ProfileManager, service: &str) -> Vec<(u64, Reason)> {
        m.history(service)
            .unwrap()
            .versions
            .into_iter()
            .map(|v| (v.version, v.reason))
            .collect()
    }

    #[test]
    fn initial_then_scheduled_commits_only_when_the_profile_changed() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        // Constant load, one observation every 10 minutes, for eight days.
        let per_day = 24 * 6;
        let mut committed_on_day = vec![0usize; 8];
        for i in 0..8 * per_day {
            let o = m
                .observe(
                    "web",
                    &obs(TRACE_START_UNIX_MS + i * 10 * MIN, 1.0, &[], &[]),
                )
                .unwrap();
            if let Some((_, reason)) = o.committed {
                assert!(
                    matches!(reason, Reason::Initial | Reason::Scheduled),
                    "{reason:?}"
                );
                committed_on_day[(i / per_day) as usize] += 1;
            }
        }
        let v = versions(&m, "web");
        assert_eq!(v[0], (1, Reason::Initial));
        assert!(v[1..].iter().all(|(_, r)| *r == Reason::Scheduled));
        // The first week learns a new hour-of-week bucket every hour: a version per hour.
        assert!(committed_on_day[0] >= 20, "{committed_on_day:?}");
        // The second week repeats the first exactly: once the last hour of the first week is
        // learned (its version is made in the first hour of day 8) nothing material changes and
        // nothing more is stored.
        assert_eq!(committed_on_day[7], 1, "{committed_on_day:?}");
        let last = m.store().get("web", v.last().unwrap().0).unwrap();
        assert!(
            last.created_unix_ms <= TRACE_START_UNIX_MS + 7 * 24 * HOUR_MS + HOUR_MS,
            "a version was stored in the second week although nothing changed"
        );
    }

    #[test]
    fn drift_commits_at_once_then_coalesces_during_the_cooldown() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let m = ProfileManager::open(dir.path(), &ProfileConfig::default(), None, metrics.clone())
            .unwrap();
        let t = TRACE_START_UNIX_MS;
        m.observe("db", &obs(t, 1.0, &[("file:/etc/a", "1")], &[]))
            .unwrap();
        let o = m
            .observe("db", &obs(t + MIN, 1.0, &[("file:/etc/a", "2")], &[]))
            .unwrap();
        assert_eq!(o.drift.len(), 1);
        let (v1, r1) = o.committed.unwrap();
        assert!(
            matches!(&r1, Reason::Drift { detail } if detail.contains("file:/etc/a")),
            "{r1:?}"
        );
        // Two more changes inside the cool-down: no version yet.
        for (i, h) in ["3", "4"].iter().enumerate() {
            let o = m
                .observe(
                    "db",
                    &obs(t + (2 + i as u64) * MIN, 1.0, &[("file:/etc/a", h)], &[]),
                )
                .unwrap();
            assert!(o.committed.is_none());
        }
        // After the cool-down they are one version.
        let o = m
            .observe(
                "db",
                &obs(
                    t + 2 * MIN + DRIFT_COMMIT_COOLDOWN_MS,
                    1.0,
                    &[("file:/etc/a", "4")],
                    &[],
                ),
            )
            .unwrap();
        let (v2, r2) = o.committed.unwrap();
        assert_eq!(v2, v1 + 1);
        let Reason::Drift { detail } = r2 else {
            panic!("{r2:?}")
        };
        assert_eq!(
            detail.matches("configuration changed").count(),
            2,
            "{detail}"
        );
        let text = metrics.encode();
        assert!(
            text.lines()
                .any(|l| l.contains("drift") && l.contains("config_change") && l.ends_with(" 3")),
            "{text}"
        );
        assert!(text.contains("service=\"db\""), "{text}");
    }

    #[test]
    fn resumes_from_the_stored_version_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t = TRACE_START_UNIX_MS;
        {
            let m = manager(dir.path());
            for i in 0..10 {
                m.observe("web", &obs(t + i * MIN, 2.0, &[], &[("10.0.0.5", 5432)]))
                    .unwrap();
            }
            assert_eq!(versions(&m, "web")[0].1, Reason::Initial);
        }
        let m = manager(dir.path());
        // Before any observation the stored profile is shown.
        let r = m.show("web", t + 10 * MIN).unwrap();
        assert!(!r.live);
        assert_eq!(r.version.as_ref().unwrap().version, 1);
        assert!(r.dependencies.contains_key("tcp://10.0.0.5:5432"));
        m.observe("web", &obs(t + 11 * MIN, 2.0, &[], &[])).unwrap();
        let r = m.show("web", t + 11 * MIN).unwrap();
        assert!(r.live);
        assert_eq!(r.version.unwrap().version, 1);
        let stored = m
            .store()
            .get("web", 1)
            .unwrap()
            .profile
            .model
            .observations();
        assert_eq!(
            r.observations,
            stored + 1,
            "the resumed model keeps its observations"
        );
        assert!(r.dependencies.contains_key("tcp://10.0.0.5:5432"));
        let o = r.observed.unwrap();
        assert_eq!(o.samples, 1);
        assert!(r.prediction.envelopes.cpu.limit >= o.cpu_cores.max);
    }

    #[test]
    fn rollback_restores_an_earlier_version_exactly_and_the_learner_follows() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let t = TRACE_START_UNIX_MS;
        let mut i = 0;
        let mut step = |m: &ProfileManager, cpu: f64, n: u64| {
            for _ in 0..n {
                m.observe("web", &obs(t + i * MIN, cpu, &[], &[])).unwrap();
                i += 1;
            }
        };
        step(&m, 1.0, 130); // v1 initial after 5 min, then one scheduled version per hour
        step(&m, 3.0, 61); // a different load
        let n = versions(&m, "web").len() as u64;
        assert!(n >= 3, "{n}");
        let v1 = m.store().get("web", 1).unwrap();
        let r = m.rollback("web", Some(1)).unwrap();
        assert_eq!((r.to, r.version, r.live), (1, n + 1, true));
        let back = m.store().get("web", n + 1).unwrap();
        assert_eq!(back.profile, v1.profile, "rollback must restore v1 exactly");
        assert_eq!(back.reason, Reason::Rollback { to: 1 });
        // The live learner continues from v1: same profile, reported as the new version.
        let shown = m.show("web", t + i * MIN).unwrap();
        assert_eq!(shown.version.unwrap().version, n + 1);
        assert_eq!(shown.observations, v1.profile.model.observations());
        // Without --to: back to the version before the newest.
        let r = m.rollback("web", None).unwrap();
        assert_eq!((r.to, r.version), (n, n + 2));
        // Errors name what is missing.
        let e = m.rollback("web", Some(99)).unwrap_err();
        assert!(
            e.to_string().contains("store") && crate::error::report(&e).contains("no version 99"),
            "{e}: {}",
            crate::error::report(&e)
        );
        let e = m.rollback("nope", Some(1)).unwrap_err();
        assert!(
            e.to_string().contains("no profile for service 'nope'")
                && e.to_string().contains("web"),
            "{e}"
        );
        let e = m.diff("web", 1, 42).unwrap_err();
        assert!(
            crate::error::report(&e).contains("no version 42"),
            "{}",
            crate::error::report(&e)
        );
        assert!(m.diff("web", 1, n + 1).unwrap().is_empty());
        assert!(!m.diff("web", 1, n).unwrap().is_empty());
    }

    #[test]
    fn save_pins_the_live_profile_as_a_manual_version_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::new();
        let m = manager(dir.path()).with_events(events.clone());
        let t = TRACE_START_UNIX_MS;
        // Two minutes in: far from the five minutes of the first automatic version.
        for i in 0..120 {
            m.observe("web", &obs(t + i * 1000, 1.0, &[], &[])).unwrap();
        }
        assert!(versions(&m, "web").is_empty());
        let saved = m.save("web", t + 120_000).unwrap();
        assert_eq!((saved.version, saved.reason.clone()), (1, Reason::Manual));
        assert_eq!(versions(&m, "web"), [(1, Reason::Manual)]);
        assert_eq!(m.live_version("web"), Some(1));
        let stored = m.store().get("web", 1).unwrap();
        assert_eq!(stored.profile.model.observations(), 120);
        // Reported as an event.
        assert!(events.recent().iter().any(|e| matches!(
            &e.kind,
            EventKind::ProfileVersion { version: 1, reason } if reason == "manual"
        )));
        // Only a live profile can be saved; unknown services are named.
        let e = m.save("nope", t).unwrap_err();
        assert!(
            e.to_string().contains("no profile for service 'nope'"),
            "{e}"
        );
        let other = manager(dir.path());
        let e = other.save("web", t).unwrap_err();
        assert!(matches!(e, ManagerError::NotLive { .. }), "{e}");
    }

    #[test]
    fn series_pairs_each_observation_with_the_limit_predicted_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let t = TRACE_START_UNIX_MS;
        for i in 0..200u64 {
            m.observe("web", &obs(t + i * MIN, 1.0 + (i % 2) as f64, &[], &[]))
                .unwrap();
        }
        let all = m.series("web", 0).unwrap();
        assert_eq!(all.points.len(), 200);
        assert_eq!(all.points[1].cpu_cores, 2.0);
        // A model that has learned covers what follows (95% of samples: it is calibrated to
        // that, so an occasional miss is expected).
        let covered = all.points[100..]
            .iter()
            .filter(|p| p.cpu_cores <= p.cpu_limit)
            .count();
        assert!(covered >= 90, "{covered} of 100: {:?}", &all.points[100..]);
        let last = all.points.last().unwrap();
        assert_eq!(last.mem_bytes, (512u64 << 20) as f64);
        let recent = m.series("web", t + 150 * MIN).unwrap();
        assert_eq!(recent.points.len(), 50);
        assert!(m.series("nope", 0).is_err());
    }

    #[test]
    fn corrupt_version_is_reported_and_skipped_without_losing_others() {
        let dir = tempfile::tempdir().unwrap();
        let t = TRACE_START_UNIX_MS;
        {
            let m = manager(dir.path());
            for i in 0..200 {
                m.observe("web", &obs(t + i * MIN, 1.0 + (i / 60) as f64, &[], &[]))
                    .unwrap();
            }
            assert_eq!(versions(&m, "web").len(), 4);
        }
        let file = dir.path().join("profiles/web/v4.json");
        std::fs::write(&file, b"{\"version\": 4, \"trunc").unwrap();
        let m = manager(dir.path());
        let h = m.history("web").unwrap();
        assert_eq!(
            h.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(h.skipped.len(), 1);
        assert_eq!(h.skipped[0].path, file);
        assert!(h.to_string().contains("SKIPPED"), "{h}");
        // The corrupt file is left for inspection, the others are intact and usable.
        assert!(file.exists());
        let shown = m.show("web", t).unwrap();
        assert_eq!(
            shown.version.unwrap().version,
            3,
            "current is the newest readable"
        );
        let r = m.rollback("web", None).unwrap();
        assert_eq!((r.to, r.version), (2, 5), "v4's number is never reused");
        assert_eq!(versions(&m, "web").len(), 4);
    }

    #[test]
    fn accuracy_and_plan_need_a_live_mature_profile() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let t = TRACE_START_UNIX_MS;
        assert!(matches!(
            m.accuracy(Some("web")),
            Err(ManagerError::UnknownService { .. })
        ));
        for i in 0..MIN_PLAN_OBSERVATIONS - 1 {
            m.observe("web", &obs(t + i * MIN, 1.5, &[], &[])).unwrap();
            assert!(m.resource_plan("web", t + i * MIN, OPEN_LIMITS).is_none());
        }
        let at = t + MIN_PLAN_OBSERVATIONS * MIN;
        m.observe("web", &obs(at, 1.5, &[], &[])).unwrap();
        let plan = m.resource_plan("web", at, OPEN_LIMITS).unwrap();
        assert_eq!(plan.vcpus, 2, "1.5 cores with headroom");
        assert!(plan.mem_kib >= 512 * 1024, "{}", plan.mem_kib);
        let a = m.accuracy(None).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].report.samples, MIN_PLAN_OBSERVATIONS);
        assert!(render_accuracy(&a).contains("web"));
        // A service known only from the store has no live accuracy.
        let m2 = manager(dir.path());
        m.observe("web", &obs(at + 10 * MIN, 1.5, &[], &[]))
            .unwrap();
        assert!(matches!(
            m2.accuracy(Some("web")),
            Err(ManagerError::NotLive { .. })
        ));
    }

    #[test]
    fn sync_pushes_and_adopts_pulled_versions_and_skips_a_missing_repository() {
        let dir = tempfile::tempdir().unwrap();
        let t = TRACE_START_UNIX_MS;
        let m = manager(dir.path());
        for i in 0..10 {
            m.observe("web", &obs(t + i * MIN, 1.0, &[], &[])).unwrap();
        }
        // No repository directory yet: nothing happens, nothing is created.
        assert!(m.sync().unwrap().is_none());
        assert!(!dir.path().join("repo").exists());
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        let r = m.sync().unwrap().unwrap();
        assert_eq!(r.services[0].pushed, [1]);
        // Another host publishes v2 with a different profile: this host adopts it.
        let other = tempfile::tempdir().unwrap();
        let m2 = ProfileManager::open(
            other.path(),
            &ProfileConfig::default(),
            Some(Arc::new(DirectoryRepository::new(dir.path().join("repo")))),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        m2.sync().unwrap();
        for i in 0..200 {
            m2.observe("web", &obs(t + i * MIN, 4.0, &[], &[("10.9.9.9", 443)]))
                .unwrap();
        }
        m2.sync().unwrap();
        let r = m.sync().unwrap().unwrap();
        assert!(r.services[0].pulled.is_some(), "{:?}", r.services);
        let shown = m.show("web", t + 300 * MIN).unwrap();
        assert!(shown.dependencies.contains_key("tcp://10.9.9.9:443"));
        assert_eq!(m.live_version("web"), r.services[0].pulled);
    }

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(format_unix_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_ms(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
