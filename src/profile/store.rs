//! Profile versions on disk.
//!
//! Every material change of a service's profile is a new, numbered, immutable version, written
//! atomically ([`crate::state::write_atomic`]) as `<state_dir>/profiles/<service>/v<N>.json`.
//! The *current* version is the highest-numbered readable one.
//!
//! Numbers are monotonic per service and never reused: the next number is one more than the
//! highest of (a) every `v<N>.json` present, readable or not, and (b) a high-water mark kept in
//! `<service>/next_version`, so even a corrupt or deleted file's number is not handed out again.
//!
//! A corrupt version file (bad or truncated JSON, wrong service or number, oversized) is skipped
//! with a warning and listed by [`ProfileStore::skipped`]; the other versions stay usable.
//!
//! # Synchronisation
//!
//! [`ProfileStore::sync`] meets a central [`ProfileRepository`]: it pushes every local version
//! whose number the repository lacks, then pulls the repository's latest version if its number is
//! higher than the local current one. The conflict rule is *the higher version number wins*: the
//! current profile, on every host, is the highest-numbered one. The local high-water mark is then
//! raised past every number the repository holds, so the next local commit outranks them all. Two
//! hosts that committed different content under the same number both keep their own copy; the
//! collision is reported in [`ServiceSync::conflicts`] and resolved by the next commit on either
//! host, which gets a higher number.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::layout::{self, VersionFileError};
use super::learner::Profile;
use super::model::{Model, WEEK_BUCKETS};
use super::repo::{ProfileRepository, RepoError};
use super::Metric;
use crate::state::write_atomic;

/// Directory under the state directory that holds the profiles.
pub const PROFILES_DIR: &str = "profiles";
/// File holding a service's next version number.
const NEXT_VERSION_FILE: &str = "next_version";
/// A bucket's limit must move by more than this share to count as changed in a diff.
pub const ENVELOPE_CHANGE_THRESHOLD: f64 = 0.10;

/// Errors of the profile store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The service name cannot be used as a directory name.
    #[error("invalid service name {name:?}: {reason}")]
    InvalidService {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A directory could not be created or listed.
    #[error("cannot access directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A version could not be serialised.
    #[error("cannot serialise version {version} of service {service}")]
    Serialize {
        /// Service.
        service: String,
        /// Version number.
        version: u64,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The requested version does not exist.
    #[error("service {service} has no version {version}")]
    NotFound {
        /// Service.
        service: String,
        /// Version number.
        version: u64,
    },
    /// The requested version exists but cannot be used.
    #[error("version file {path} is unusable")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: VersionFileError,
    },
    /// The service has no readable version at all.
    #[error("service {service} has no profile version")]
    NoVersions {
        /// Service.
        service: String,
    },
    /// A rollback without a target found no version before the current one.
    #[error("service {service} has no version before {current} to roll back to")]
    NoPrevious {
        /// Service.
        service: String,
        /// Current version.
        current: u64,
    },
    /// The central repository failed.
    #[error("repository failed while syncing service {service}")]
    Repo {
        /// Service.
        service: String,
        /// Underlying error.
        #[source]
        source: RepoError,
    },
    /// The store's lock was poisoned by a panic in another thread.
    #[error("profile store lock poisoned")]
    Poisoned,
}

/// Why a version was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// First version of a service.
    Initial,
    /// Periodic refresh of the learned profile.
    Scheduled,
    /// The primary drifted from its profile.
    Drift {
        /// What drifted.
        detail: String,
    },
    /// An operator asked for it.
    Manual,
    /// Copy of an earlier version.
    Rollback {
        /// The version restored.
        to: u64,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Initial => f.write_str("initial"),
            Reason::Scheduled => f.write_str("scheduled"),
            Reason::Drift { detail } => write!(f, "drift: {detail}"),
            Reason::Manual => f.write_str("manual"),
            Reason::Rollback { to } => write!(f, "rollback to v{to}"),
        }
    }
}

/// One stored version of a service's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileVersion {
    /// Version number, monotonic per service.
    pub version: u64,
    /// When it was committed, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Why it was committed.
    pub reason: Reason,
    /// The service it describes.
    pub service: String,
    /// Model snapshot, expected configuration and dependencies.
    pub profile: Profile,
}

/// A version without its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// Version number.
    pub version: u64,
    /// When it was committed.
    pub created_unix_ms: u64,
    /// Why it was committed.
    pub reason: Reason,
}

/// A version file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedFile {
    /// The file.
    pub path: PathBuf,
    /// Why it was skipped (the full error chain).
    pub error: String,
}

/// How one bucket's limit moved between two versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketChange {
    /// Hour of the week, 0 = Monday 00:00 UTC.
    pub hour_of_week: usize,
    /// Readable hour, e.g. `Mon 09:00`.
    pub label: String,
    /// Limit in the older version.
    pub from_limit: f64,
    /// Limit in the newer version.
    pub to_limit: f64,
    /// Relative change, `to / from - 1`.
    pub change: f64,
}

/// Envelope changes of one metric, summarised over the 168 hour-of-week buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeChange {
    /// The metric.
    pub metric: Metric,
    /// Buckets known in both versions whose limit moved by more than
    /// [`ENVELOPE_CHANGE_THRESHOLD`].
    pub changed: usize,
    /// Buckets known only in the newer version.
    pub learned: usize,
    /// Buckets known only in the older version.
    pub forgotten: usize,
    /// The largest increase, if any bucket grew.
    pub largest_increase: Option<BucketChange>,
    /// The largest decrease, if any bucket shrank.
    pub largest_decrease: Option<BucketChange>,
}

/// What changed between two profile versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileDiff {
    /// Older version.
    pub from: u64,
    /// Newer version.
    pub to: u64,
    /// Metrics whose envelopes changed materially.
    pub envelopes: Vec<EnvelopeChange>,
    /// Configuration items added.
    pub config_added: Vec<String>,
    /// Configuration items removed.
    pub config_removed: Vec<String>,
    /// Configuration items whose hash changed.
    pub config_changed: Vec<String>,
    /// Dependencies added.
    pub deps_added: Vec<String>,
    /// Dependencies removed.
    pub deps_removed: Vec<String>,
}

impl ProfileDiff {
    /// Compares two profiles (numbered `from` and `to` for the report).
    pub fn between(from: u64, a: &Profile, to: u64, b: &Profile) -> ProfileDiff {
        let keys = |m: &std::collections::BTreeMap<String, _>| -> BTreeSet<String> {
            m.keys().cloned().collect()
        };
        let (ca, cb) = (&a.expected_config, &b.expected_config);
        let (da, db) = (keys(&a.dependencies), keys(&b.dependencies));
        ProfileDiff {
            from,
            to,
            envelopes: Metric::ALL
                .iter()
                .filter_map(|m| envelope_change(*m, &a.model, &b.model))
                .collect(),
            config_added: cb
                .keys()
                .filter(|k| !ca.contains_key(*k))
                .cloned()
                .collect(),
            config_removed: ca
                .keys()
                .filter(|k| !cb.contains_key(*k))
                .cloned()
                .collect(),
            config_changed: cb
                .iter()
                .filter(|(k, v)| ca.get(*k).is_some_and(|old| old != *v))
                .map(|(k, _)| k.clone())
                .collect(),
            deps_added: db.difference(&da).cloned().collect(),
            deps_removed: da.difference(&db).cloned().collect(),
        }
    }

    /// True when nothing material changed.
    pub fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
            && self.config_added.is_empty()
            && self.config_removed.is_empty()
            && self.config_changed.is_empty()
            && self.deps_added.is_empty()
            && self.deps_removed.is_empty()
    }
}

fn envelope_change(metric: Metric, a: &Model, b: &Model) -> Option<EnvelopeChange> {
    let mut c = EnvelopeChange {
        metric,
        changed: 0,
        learned: 0,
        forgotten: 0,
        largest_increase: None,
        largest_decrease: None,
    };
    for h in 0..WEEK_BUCKETS {
        match (a.bucket_envelope(metric, h), b.bucket_envelope(metric, h)) {
            (None, None) => {}
            (None, Some(_)) => c.learned += 1,
            (Some(_), None) => c.forgotten += 1,
            (Some(ea), Some(eb)) => {
                let change = if ea.limit > 0.0 {
                    eb.limit / ea.limit - 1.0
                } else if eb.limit > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                };
                if change.abs() <= ENVELOPE_CHANGE_THRESHOLD {
                    continue;
                }
                c.changed += 1;
                let bc = BucketChange {
                    hour_of_week: h,
                    label: hour_label(h),
                    from_limit: ea.limit,
                    to_limit: eb.limit,
                    change,
                };
                let slot = if change > 0.0 {
                    &mut c.largest_increase
                } else {
                    &mut c.largest_decrease
                };
                if slot.as_ref().is_none_or(|s| change.abs() > s.change.abs()) {
                    *slot = Some(bc);
                }
            }
        }
    }
    (c.changed + c.learned + c.forgotten > 0).then_some(c)
}

/// `Mon 09:00` for hour-of-week 9.
pub fn hour_label(hour_of_week: usize) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    format!(
        "{} {:02}:00",
        DAYS[(hour_of_week / 24) % 7],
        hour_of_week % 24
    )
}

impl fmt::Display for ProfileDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "v{} -> v{}", self.from, self.to)?;
        if self.is_empty() {
            return writeln!(f, "  no material change");
        }
        for e in &self.envelopes {
            write!(
                f,
                "  {}: {} of {WEEK_BUCKETS} hour-of-week buckets changed by more than {:.0}%",
                e.metric,
                e.changed,
                ENVELOPE_CHANGE_THRESHOLD * 100.0
            )?;
            if e.learned > 0 {
                write!(f, ", {} newly learned", e.learned)?;
            }
            if e.forgotten > 0 {
                write!(f, ", {} forgotten", e.forgotten)?;
            }
            for c in [&e.largest_increase, &e.largest_decrease]
                .into_iter()
                .flatten()
            {
                write!(
                    f,
                    "; {} {:+.0}% ({:.3} -> {:.3})",
                    c.label,
                    c.change * 100.0,
                    c.from_limit,
                    c.to_limit
                )?;
            }
            writeln!(f)?;
        }
        let lists = [
            ("config added", &self.config_added),
            ("config removed", &self.config_removed),
            ("config changed", &self.config_changed),
            ("dependencies added", &self.deps_added),
            ("dependencies removed", &self.deps_removed),
        ];
        for (label, items) in lists {
            if !items.is_empty() {
                writeln!(f, "  {label}: {}", items.join(", "))?;
            }
        }
        Ok(())
    }
}

/// What a sync did for one service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSync {
    /// The service.
    pub service: String,
    /// Local versions pushed to the repository.
    pub pushed: Vec<u64>,
    /// Repository version imported locally (it became current).
    pub pulled: Option<u64>,
    /// Numbers held with different content on both sides.
    pub conflicts: Vec<u64>,
}

/// What a sync of all services did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Services synchronised.
    pub services: Vec<ServiceSync>,
    /// Services that could not be synchronised, with why.
    pub failures: Vec<(String, StoreError)>,
}

/// The versioned profiles of all services on this host.
#[derive(Debug)]
pub struct ProfileStore {
    root: PathBuf,
    /// Versions kept per service (`None`: all).
    keep: Option<usize>,
    /// Serialises number allocation and writes within this process.
    lock: Mutex<()>,
}

/// The readable versions of a service and the files that were not.
struct Scan {
    versions: Vec<ProfileVersion>,
    skipped: Vec<SkippedFile>,
}

fn check_service(service: &str) -> Result<(), StoreError> {
    layout::check_service(service).map_err(|reason| StoreError::InvalidService {
        name: service.to_string(),
        reason,
    })
}

impl ProfileStore {
    /// Opens (creating if needed) the store under `<state_dir>/profiles`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let root = state_dir.join(PROFILES_DIR);
        fs::create_dir_all(&root).map_err(|source| StoreError::Dir {
            path: root.clone(),
            source,
        })?;
        Ok(ProfileStore {
            root,
            keep: None,
            lock: Mutex::new(()),
        })
    }

    /// Keeps at most `keep` versions per service (`0`: all): each commit deletes the oldest
    /// version files beyond that. Numbers stay monotonic (the high-water mark is untouched).
    pub fn with_retention(mut self, keep: usize) -> Self {
        self.keep = (keep > 0).then_some(keep);
        self
    }

    /// Deletes the oldest version files of `service` beyond the retention, unreadable ones
    /// included. A failed delete is logged and retried at the next commit.
    fn prune(&self, service: &str) -> Result<(), StoreError> {
        let Some(keep) = self.keep else {
            return Ok(());
        };
        let dir = self.service_dir(service)?;
        let files = layout::scan(&dir).map_err(|source| StoreError::Dir {
            path: dir.clone(),
            source,
        })?;
        let excess = files.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for (n, path) in files.into_iter().take(excess) {
            match fs::remove_file(&path) {
                Ok(()) => removed.push(n),
                Err(e) => {
                    tracing::warn!(service, version = n, path = %path.display(), error = %e, "cannot delete an old profile version");
                }
            }
        }
        if let (Some(first), Some(last)) = (removed.first(), removed.last()) {
            tracing::info!(
                service,
                keep,
                first,
                last,
                count = removed.len(),
                "old profile versions deleted"
            );
        }
        Ok(())
    }

    /// The `profiles` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn service_dir(&self, service: &str) -> Result<PathBuf, StoreError> {
        check_service(service)?;
        Ok(self.root.join(service))
    }

    fn guard(&self) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        self.lock.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Services with a directory in the store.
    pub fn services(&self) -> Result<Vec<String>, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: self.root.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            let is_dir = entry.file_type().map_err(dir_err)?.is_dir();
            if let Some(name) = entry.file_name().to_str() {
                if is_dir && layout::check_service(name).is_ok() {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn scan(&self, service: &str) -> Result<Scan, StoreError> {
        let dir = self.service_dir(service)?;
        let files = layout::scan(&dir).map_err(|source| StoreError::Dir {
            path: dir.clone(),
            source,
        })?;
        let mut versions = Vec::with_capacity(files.len());
        let mut skipped = Vec::new();
        for (n, path) in files {
            match layout::read(&path, service, n) {
                Ok(v) => versions.push(v),
                Err(e) => {
                    let error = crate::error::report(&e);
                    tracing::warn!(path = %path.display(), %error, "skipping unusable profile version");
                    skipped.push(SkippedFile { path, error });
                }
            }
        }
        Ok(Scan { versions, skipped })
    }

    /// The current (highest-numbered readable) version, `None` if there is none.
    pub fn current(&self, service: &str) -> Result<Option<ProfileVersion>, StoreError> {
        let dir = self.service_dir(service)?;
        let files = layout::scan(&dir).map_err(|source| StoreError::Dir {
            path: dir.clone(),
            source,
        })?;
        for (n, path) in files.into_iter().rev() {
            match layout::read(&path, service, n) {
                Ok(v) => return Ok(Some(v)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %crate::error::report(&e), "skipping unusable profile version");
                }
            }
        }
        Ok(None)
    }

    /// Summaries of every readable version, oldest first. Unusable files are skipped (see
    /// [`ProfileStore::skipped`]).
    pub fn history(&self, service: &str) -> Result<Vec<VersionSummary>, StoreError> {
        Ok(self
            .scan(service)?
            .versions
            .into_iter()
            .map(|v| VersionSummary {
                version: v.version,
                created_unix_ms: v.created_unix_ms,
                reason: v.reason,
            })
            .collect())
    }

    /// Version files of `service` that could not be used, with why.
    pub fn skipped(&self, service: &str) -> Result<Vec<SkippedFile>, StoreError> {
        Ok(self.scan(service)?.skipped)
    }

    /// Version `version` of `service`.
    pub fn get(&self, service: &str, version: u64) -> Result<ProfileVersion, StoreError> {
        let path = self.service_dir(service)?.join(layout::file_name(version));
        layout::read(&path, service, version).map_err(|source| match source {
            VersionFileError::Io(e) if e.kind() == io::ErrorKind::NotFound => {
                StoreError::NotFound {
                    service: service.to_string(),
                    version,
                }
            }
            source => StoreError::Corrupt { path, source },
        })
    }

    /// The next number for `service`: above every file present and the high-water mark.
    fn next_number(&self, service: &str, scan_max: Option<u64>) -> Result<u64, StoreError> {
        let path = self.service_dir(service)?.join(NEXT_VERSION_FILE);
        let mark = match fs::read_to_string(&path) {
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable version high-water mark");
                    0
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable version high-water mark");
                0
            }
        };
        Ok(mark.max(scan_max.map_or(1, |m| m.saturating_add(1))).max(1))
    }

    fn raise_mark(&self, service: &str, next: u64) -> Result<(), StoreError> {
        let path = self.service_dir(service)?.join(NEXT_VERSION_FILE);
        write_atomic(&path, next.to_string().as_bytes())
            .map_err(|source| StoreError::Write { path, source })
    }

    fn write_version(&self, v: &ProfileVersion) -> Result<(), StoreError> {
        let path = self
            .service_dir(&v.service)?
            .join(layout::file_name(v.version));
        let bytes = serde_json::to_vec(v).map_err(|source| StoreError::Serialize {
            service: v.service.clone(),
            version: v.version,
            source,
        })?;
        write_atomic(&path, &bytes).map_err(|source| StoreError::Write { path, source })
    }

    fn highest_on_disk(&self, service: &str) -> Result<Option<u64>, StoreError> {
        let dir = self.service_dir(service)?;
        let files = layout::scan(&dir).map_err(|source| StoreError::Dir { path: dir, source })?;
        Ok(files.last().map(|(n, _)| *n))
    }

    /// Stores `profile` as the new current version of `service`; returns its number.
    pub fn commit(
        &self,
        service: &str,
        profile: &Profile,
        reason: Reason,
    ) -> Result<u64, StoreError> {
        self.commit_at(service, profile, reason, crate::clock::now_unix_ms())
    }

    /// [`ProfileStore::commit`] with an explicit creation time.
    pub fn commit_at(
        &self,
        service: &str,
        profile: &Profile,
        reason: Reason,
        created_unix_ms: u64,
    ) -> Result<u64, StoreError> {
        let _g = self.guard()?;
        let max = self.highest_on_disk(service)?;
        let version = self.next_number(service, max)?;
        let v = ProfileVersion {
            version,
            created_unix_ms,
            reason,
            service: service.to_string(),
            profile: profile.clone(),
        };
        self.write_version(&v)?;
        self.raise_mark(service, version.saturating_add(1))?;
        tracing::info!(service, version, reason = %v.reason, "profile version committed");
        self.prune(service)?;
        Ok(version)
    }

    /// Makes an earlier version current again by committing a copy of it (content equal, new
    /// number, reason `Rollback`). `to = None` restores the readable version just before the
    /// current one. Returns the new number.
    pub fn rollback(&self, service: &str, to: Option<u64>) -> Result<u64, StoreError> {
        let target = match to {
            Some(n) => self.get(service, n)?,
            None => {
                let mut versions = self.scan(service)?.versions;
                let current = versions.pop().ok_or_else(|| StoreError::NoVersions {
                    service: service.to_string(),
                })?;
                versions.pop().ok_or(StoreError::NoPrevious {
                    service: service.to_string(),
                    current: current.version,
                })?
            }
        };
        self.commit(
            service,
            &target.profile,
            Reason::Rollback { to: target.version },
        )
    }

    /// What changed from version `a` to version `b`.
    pub fn diff(&self, service: &str, a: u64, b: u64) -> Result<ProfileDiff, StoreError> {
        let va = self.get(service, a)?;
        let vb = self.get(service, b)?;
        Ok(ProfileDiff::between(a, &va.profile, b, &vb.profile))
    }

    /// Synchronises every local service with `repo` (see the module documentation for the
    /// rules). A failing service does not stop the others.
    pub fn sync(&self, repo: &dyn ProfileRepository) -> Result<SyncReport, StoreError> {
        let mut report = SyncReport::default();
        for service in self.services()? {
            match self.sync_service(&service, repo) {
                Ok(s) => report.services.push(s),
                Err(e) => {
                    tracing::warn!(service, error = %crate::error::report(&e), "profile sync failed");
                    report.failures.push((service, e));
                }
            }
        }
        Ok(report)
    }

    /// Synchronises one service with `repo`; also fetches a service this host has never seen.
    pub fn sync_service(
        &self,
        service: &str,
        repo: &dyn ProfileRepository,
    ) -> Result<ServiceSync, StoreError> {
        check_service(service)?;
        let repo_err = |source| StoreError::Repo {
            service: service.to_string(),
            source,
        };
        let _g = self.guard()?;
        let dir = self.service_dir(service)?;
        // Names only: a version file is read when it has to be pushed or compared.
        let files = layout::scan(&dir).map_err(|source| StoreError::Dir {
            path: dir.clone(),
            source,
        })?;
        let read = |n: u64, path: &Path| match layout::read(path, service, n) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %crate::error::report(&e), "skipping unusable profile version");
                None
            }
        };
        let remote: BTreeSet<u64> = repo.list(service).map_err(repo_err)?.into_iter().collect();
        let mut out = ServiceSync {
            service: service.to_string(),
            ..ServiceSync::default()
        };

        for (n, path) in files.iter().filter(|(n, _)| !remote.contains(n)) {
            let Some(v) = read(*n, path) else { continue };
            match repo.push(service, &v) {
                Ok(()) => out.pushed.push(v.version),
                Err(RepoError::VersionExists { version, .. }) => out.conflicts.push(version),
                Err(e) => return Err(repo_err(e)),
            }
        }

        if let Some(latest) = repo.pull_latest(service).map_err(repo_err)? {
            if latest.service != service {
                return Err(repo_err(RepoError::ServiceMismatch {
                    expected: service.to_string(),
                    found: latest.service,
                }));
            }
            let local_current = files
                .iter()
                .rev()
                .find_map(|(n, path)| layout::read(path, service, *n).ok().map(|_| *n));
            match files.iter().find(|(n, _)| *n == latest.version) {
                Some((n, path)) => match read(*n, path) {
                    Some(local) if local == latest => {}
                    // Different content, or an unreadable local file kept for inspection.
                    _ => out.conflicts.push(latest.version),
                },
                None if local_current.is_some_and(|c| c >= latest.version) => {}
                None => {
                    self.write_version(&latest)?;
                    out.pulled = Some(latest.version);
                    tracing::info!(
                        service,
                        version = latest.version,
                        "profile version pulled from repository"
                    );
                }
            }
        }

        // Future local commits must outrank everything either side holds.
        let remote_max = remote.iter().next_back().copied();
        let highest = [files.last().map(|(n, _)| *n), remote_max, out.pulled]
            .into_iter()
            .flatten()
            .max();
        let next = self.next_number(service, highest)?;
        self.raise_mark(service, next)?;
        out.conflicts.sort_unstable();
        out.conflicts.dedup();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::profile::learner::Dependency;
    use crate::profile::model::{ModelParams, HOUR_MS};
    use crate::profile::repo::DirectoryRepository;
    use crate::profile::synthetic::TRACE_START_UNIX_MS;
    use crate::profile::{Observation, Proto};

    /// A profile that learned `hours` flat hours at `cpu` cores, with one config item and one
    /// dependency named after `tag`.
    fn profile(cpu: f64, hours: u64, tag: &str) -> Profile {
        let mut p = Profile::new(ModelParams::default()).unwrap();
        for i in 0..hours * 60 + 1 {
            p.model.observe(&Observation {
                ts_unix_ms: TRACE_START_UNIX_MS + i * 60_000,
                cpu_cores: cpu,
                mem_bytes: 1 << 30,
                disk_bytes_per_s: 1e6,
                net_bytes_per_s: 2e6,
                config: BTreeMap::new(),
                peers: Vec::new(),
            });
        }
        p.expected_config
            .insert(format!("{tag}.conf"), format!("hash-{tag}"));
        p.expected_config
            .insert("common.conf".into(), format!("hash-{cpu}"));
        p.dependencies.insert(
            format!("tcp://10.0.0.1:{}", tag.len()),
            Dependency {
                addr: "10.0.0.1".into(),
                port: tag.len() as u16,
                proto: Proto::Tcp,
                first_seen_unix_ms: 1,
                last_seen_unix_ms: 2,
                bytes: 3,
                count: 4,
            },
        );
        p
    }

    fn file(store: &ProfileStore, service: &str, n: u64) -> PathBuf {
        store.root().join(service).join(layout::file_name(n))
    }

    #[test]
    fn commit_history_get_and_current() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::open(dir.path()).unwrap();
        assert!(store.current("web").unwrap().is_none());
        assert!(store.history("web").unwrap().is_empty());

        let p1 = profile(1.0, 2, "a");
        let p2 = profile(2.0, 3, "b");
        assert_eq!(
            store.commit_at("web", &p1, Reason::Initial, 100).unwrap(),
            1
        );
        let drift = Reason::Drift {
            detail: "cpu: running at 2.00x".into(),
        };
        assert_eq!(store.commit_at("web", &p2, drift.clone(), 200).unwrap(), 2);
        assert!(file(&store, "web", 2).exists());

        let h = store.history("web").unwrap();
        assert_eq!(
            h,
            vec![
                VersionSummary {
                    version: 1,
                    created_unix_ms: 100,
                    reason: Reason::Initial
                },
                VersionSummary {
                    version: 2,
                    created_unix_ms: 200,
                    reason: drift
                },
            ]
        );
        assert_eq!(store.get("web", 1).unwrap().profile, p1);
        assert_eq!(store.current("web").unwrap().unwrap().profile, p2);
        assert!(matches!(
            store.get("web", 9),
            Err(StoreError::NotFound { version: 9, .. })
        ));
        assert_eq!(store.services().unwrap(), vec!["web"]);
        assert!(matches!(
            store.commit("../etc", &p1, Reason::Manual),
            Err(StoreError::InvalidService { .. })
        ));
    }

    #[test]
    fn rollback_restores_content_under_a_new_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.rollback("db", None),
            Err(StoreError::NoVersions { .. })
        ));
        store
            .commit("db", &profile(1.0, 2, "a"), Reason::Initial)
            .unwrap();
        assert!(matches!(
            store.rollback("db", None),
            Err(StoreError::NoPrevious { current: 1, .. })
        ));
        store
            .commit("db", &profile(2.0, 2, "b"), Reason::Scheduled)
            .unwrap();
        store
            .commit("db", &profile(3.0, 2, "c"), Reason::Manual)
            .unwrap();

        // Default: the version before the current one.
        assert_eq!(store.rollback("db", None).unwrap(), 4);
        let v4 = store.get("db", 4).unwrap();
        assert_eq!(v4.reason, Reason::Rollback { to: 2 });
        assert_eq!(v4.profile, store.get("db", 2).unwrap().profile);
        // Bit for bit: the serialised content is identical too.
        assert_eq!(
            serde_json::to_string(&v4.profile).unwrap(),
            serde_json::to_string(&store.get("db", 2).unwrap().profile).unwrap()
        );

        assert_eq!(store.rollback("db", Some(1)).unwrap(), 5);
        assert_eq!(
            store.current("db").unwrap().unwrap().profile,
            store.get("db", 1).unwrap().profile
        );
        assert!(matches!(
            store.rollback("db", Some(42)),
            Err(StoreError::NotFound { version: 42, .. })
        ));
    }

    #[test]
    fn corrupt_versions_are_skipped_and_reported_others_intact() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::open(dir.path()).unwrap();
        for (i, tag) in ["a", "b", "c", "d"].iter().enumerate() {
            store
                .commit("api", &profile(i as f64 + 1.0, 2, tag), Reason::Scheduled)
                .unwrap();
        }
        // v2: garbage; v4 (the newest): truncated mid-way.
        std::fs::write(file(&store, "api", 2), b"{ not json").unwrap();
        let v4 = std::fs::read(file(&store, "api", 4)).unwrap();
        std::fs::write(file(&store, "api", 4), &v4[..v4.len() / 2]).unwrap();
        // A file claiming to be v5 but holding v3's content.
        std::fs::copy(file(&store, "api", 3), file(&store, "api", 5)).unwrap();

        let versions: Vec<u64> = store
            .history("api")
            .unwrap()
            .iter()
            .map(|s| s.version)
            .collect();
        assert_eq!(versions, vec![1, 3]);
        let skipped = store.skipped("api").unwrap();
        let names: Vec<_> = skipped
            .iter()
            .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["v2.json", "v4.json", "v5.json"]);
        assert!(skipped[0].error.contains("JSON"), "{}", skipped[0].error);
        assert!(
            skipped[2].error.contains("version 3"),
            "{}",
            skipped[2].error
        );

        assert!(matches!(
            store.get("api", 2),
            Err(StoreError::Corrupt { .. })
        ));
        // Current is the newest readable one.
        assert_eq!(store.current("api").unwrap().unwrap().version, 3);
        assert_eq!(store.get("api", 3).unwrap().profile, profile(3.0, 2, "c"));
        // Numbers of unreadable files are never reused.
        let n = store
            .commit("api", &profile(9.0, 1, "e"), Reason::Manual)
            .unwrap();
        assert_eq!(n, 6);
    }

    #[test]
    fn retention_deletes_the_oldest_versions_and_keeps_numbers_monotonic() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::open(dir.path()).unwrap().with_retention(3);
        let numbers = |s: &ProfileStore| -> Vec<u64> {
            s.history("svc")
                .unwrap()
                .iter()
                .map(|v| v.version)
                .collect()
        };
        for i in 1..=5 {
            store
                .commit("svc", &profile(f64::from(i), 1, "a"), Reason::Scheduled)
                .unwrap();
        }
        assert_eq!(numbers(&store), [3, 4, 5]);
        assert_eq!(store.get("svc", 3).unwrap().profile, profile(3.0, 1, "a"));
        assert!(matches!(
            store.get("svc", 2),
            Err(StoreError::NotFound { .. })
        ));
        // A corrupt old file counts against the retention and goes first.
        std::fs::write(file(&store, "svc", 1), b"{").unwrap();
        // Rollback to the previous version still works, and gets a fresh number.
        assert_eq!(store.rollback("svc", None).unwrap(), 6);
        assert_eq!(numbers(&store), [4, 5, 6]);
        assert!(!file(&store, "svc", 1).exists());
        assert_eq!(
            store.current("svc").unwrap().unwrap().profile,
            profile(4.0, 1, "a")
        );
        // Other services are not touched; 0 keeps everything.
        let all = ProfileStore::open(dir.path()).unwrap().with_retention(0);
        for _ in 0..4 {
            all.commit("other", &profile(1.0, 1, "a"), Reason::Manual)
                .unwrap();
        }
        assert_eq!(all.history("other").unwrap().len(), 4);
        assert_eq!(all.history("svc").unwrap().len(), 3);
    }

    #[test]
    fn numbers_stay_monotonic_across_reopen_even_if_files_vanish() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ProfileStore::open(dir.path()).unwrap();
            for _ in 0..3 {
                store
                    .commit("svc", &profile(1.0, 1, "a"), Reason::Scheduled)
                    .unwrap();
            }
        }
        let store = ProfileStore::open(dir.path()).unwrap();
        std::fs::remove_file(file(&store, "svc", 3)).unwrap();
        assert_eq!(
            store
                .commit("svc", &profile(1.0, 1, "a"), Reason::Scheduled)
                .unwrap(),
            4
        );
        // Without the high-water mark, the files alone still prevent reuse.
        std::fs::write(store.root().join("svc").join(NEXT_VERSION_FILE), b"garbage").unwrap();
        drop(store);
        let store = ProfileStore::open(dir.path()).unwrap();
        assert_eq!(
            store
                .commit("svc", &profile(1.0, 1, "a"), Reason::Scheduled)
                .unwrap(),
            5
        );
    }

    #[test]
    fn diff_summarises_envelopes_config_and_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::open(dir.path()).unwrap();
        store
            .commit("web", &profile(1.0, 2, "a"), Reason::Initial)
            .unwrap();
        store
            .commit("web", &profile(2.0, 3, "bb"), Reason::Scheduled)
            .unwrap();
        let d = store.diff("web", 1, 2).unwrap();
        assert_eq!((d.from, d.to), (1, 2));
        assert_eq!(d.config_added, vec!["bb.conf"]);
        assert_eq!(d.config_removed, vec!["a.conf"]);
        assert_eq!(d.config_changed, vec!["common.conf"]);
        assert_eq!(d.deps_added, vec!["tcp://10.0.0.1:2"]);
        assert_eq!(d.deps_removed, vec!["tcp://10.0.0.1:1"]);
        // CPU doubled in Monday 00:00 and 01:00, and Monday 02:00 was learned.
        let cpu = d
            .envelopes
            .iter()
            .find(|e| e.metric == Metric::Cpu)
            .unwrap();
        assert_eq!((cpu.changed, cpu.learned, cpu.forgotten), (2, 1, 0));
        let up = cpu.largest_increase.as_ref().unwrap();
        assert!((up.change - 1.0).abs() < 1e-9, "{up:?}");
        // Memory only gained a bucket.
        let mem = d
            .envelopes
            .iter()
            .find(|e| e.metric == Metric::Mem)
            .unwrap();
        assert_eq!((mem.changed, mem.learned), (0, 1));

        let text = d.to_string();
        assert!(
            text.contains("cpu: 2 of 168 hour-of-week buckets changed"),
            "{text}"
        );
        assert!(text.contains("Mon 0"), "{text}");
        assert!(
            text.contains("dependencies added: tcp://10.0.0.1:2"),
            "{text}"
        );

        let same = store.diff("web", 2, 2).unwrap();
        assert!(same.is_empty());
        assert!(same.to_string().contains("no material change"));
    }

    #[test]
    fn sync_pushes_pulls_and_resolves_by_higher_number() {
        let dir = tempfile::tempdir().unwrap();
        let repo = DirectoryRepository::new(dir.path().join("central"));
        let a = ProfileStore::open(&dir.path().join("host-a")).unwrap();
        let b = ProfileStore::open(&dir.path().join("host-b")).unwrap();

        a.commit("web", &profile(1.0, 1, "a"), Reason::Initial)
            .unwrap();
        a.commit("web", &profile(2.0, 1, "a"), Reason::Scheduled)
            .unwrap();
        let r = a.sync(&repo).unwrap();
        assert!(r.failures.is_empty());
        assert_eq!(r.services[0].pushed, vec![1, 2]);
        assert_eq!(repo.list("web").unwrap(), vec![1, 2]);

        // A host that never saw the service fetches it.
        let s = b.sync_service("web", &repo).unwrap();
        assert_eq!(s.pulled, Some(2));
        assert_eq!(b.current("web").unwrap().unwrap(), a.get("web", 2).unwrap());
        // Its next commit outranks everything in the repository.
        assert_eq!(
            b.commit(
                "web",
                &profile(3.0, 1, "b"),
                Reason::Drift { detail: "x".into() }
            )
            .unwrap(),
            3
        );
        let s = b.sync_service("web", &repo).unwrap();
        assert_eq!((s.pushed.clone(), s.pulled), (vec![3], None));
        let s = a.sync_service("web", &repo).unwrap();
        assert_eq!(s.pulled, Some(3));
        assert_eq!(
            a.current("web").unwrap().unwrap().profile,
            profile(3.0, 1, "b")
        );

        // Both commit v4 before syncing: the repository keeps the first, the other side
        // reports the conflict and its next commit wins.
        a.commit("web", &profile(4.0, 1, "a"), Reason::Manual)
            .unwrap();
        b.commit("web", &profile(5.0, 1, "b"), Reason::Manual)
            .unwrap();
        assert_eq!(a.sync_service("web", &repo).unwrap().pushed, vec![4]);
        let s = b.sync_service("web", &repo).unwrap();
        assert_eq!(s.conflicts, vec![4]);
        assert!(s.pushed.is_empty());
        assert_eq!(
            b.commit("web", &profile(6.0, 1, "b"), Reason::Manual)
                .unwrap(),
            5
        );
        assert_eq!(b.sync_service("web", &repo).unwrap().pushed, vec![5]);
        assert_eq!(a.sync_service("web", &repo).unwrap().pulled, Some(5));
        assert_eq!(
            a.current("web").unwrap().unwrap().profile,
            profile(6.0, 1, "b")
        );
        // Nothing left to do.
        let s = a.sync_service("web", &repo).unwrap();
        assert_eq!(
            s,
            ServiceSync {
                service: "web".into(),
                ..ServiceSync::default()
            }
        );
    }

    #[test]
    fn sync_skips_unreadable_local_versions() {
        let dir = tempfile::tempdir().unwrap();
        let repo = DirectoryRepository::new(dir.path().join("central"));
        let a = ProfileStore::open(&dir.path().join("host-a")).unwrap();
        for i in 0..3 {
            a.commit("web", &profile(i as f64 + 1.0, 1, "a"), Reason::Scheduled)
                .unwrap();
        }
        std::fs::write(file(&a, "web", 2), b"").unwrap();
        let s = a.sync_service("web", &repo).unwrap();
        assert_eq!(s.pushed, vec![1, 3]);
        assert_eq!(repo.list("web").unwrap(), vec![1, 3]);
        // The repository's latest is the local current: nothing to pull, no conflict.
        assert_eq!((s.pulled, s.conflicts.len()), (None, 0));

        // A new host pulls v3; its own commits then continue after 3.
        let b = ProfileStore::open(&dir.path().join("host-b")).unwrap();
        assert_eq!(b.sync_service("web", &repo).unwrap().pulled, Some(3));
        assert_eq!(
            b.commit("web", &profile(7.0, 1, "b"), Reason::Manual)
                .unwrap(),
            4
        );
    }

    #[test]
    fn hour_labels() {
        assert_eq!(hour_label(0), "Mon 00:00");
        assert_eq!(hour_label(24 * 6 + 23), "Sun 23:00");
        let _ = HOUR_MS;
    }
}
