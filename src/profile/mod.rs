//! Predictive deployment profiles.
//!
//! The daemon feeds a [`Learner`] one [`Observation`] of a protected primary at a time. The learner
//! keeps a [`Profile`] per service: a resource [`model::Model`] (seasonal buckets, and the
//! calibrated [`forecast`] layer whose coverage converges on the class's target), the expected
//! configuration and the expected network dependencies.
//! It reports [`drift::DriftEvent`]s when the primary stops looking like its profile; the caller
//! then commits a new version to the [`store::ProfileStore`] (versioned, atomically written JSON
//! files, with rollback and diff), which can be synchronised with a central
//! [`repo::ProfileRepository`] ([`layout`] is the on-disk format both share). [`accuracy`] scores predictions against what really happened and
//! [`apply::resource_plan`] turns a profile into the vCPU and memory sizing of a shadow.
//!
//! [`manager::ProfileManager`] owns the live learners of a daemon and decides when a profile
//! becomes a stored version (first observations, drift, hourly), answers the `profile` control
//! requests and sizes shadows.
//!
//! Everything here is pure logic apart from the store's files: no libvirt, no clock (timestamps
//! come with the observations).
//!
//! Judging the model: [`baseline`] holds what a user would run instead (rolling window, last
//! value, static peak), [`replay`] replays a history through any [`Predictor`] and scores it at
//! any headroom, [`backtest`] reads an operator's history (CSV) and runs the comparison behind
//! `understudy profile backtest` and the benchmark (`cargo bench --bench profile`), and
//! [`synthetic`] generates the deterministic traces of the benchmark and the tests.

pub mod accuracy;
pub mod apply;
pub mod backtest;
pub mod baseline;
pub mod conditional;
pub mod drift;
pub mod forecast;
pub mod layout;
pub mod learner;
pub mod manager;
pub mod model;
pub mod replay;
pub mod repo;
pub mod store;
pub mod synthetic;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use accuracy::{AccuracyReport, AccuracyTracker, MetricAccuracy};
pub use apply::{resource_plan, ResourceLimits, ResourcePlan};
pub use drift::{DriftDetector, DriftError, DriftEvent, DriftKind, DriftParams};
pub use layout::{ProfileVersion, Reason, VersionFileError};
pub use learner::{Dependency, Learner, LearnerError, LearnerParams, Profile};
pub use manager::{ManagerError, ProfileManager, ProfileReport};
pub use model::{Envelope, Model, ModelError, ModelParams, Prediction, Source};
pub use repo::{DirectoryRepository, ProfileRepository, RepoError};
pub use store::{
    BucketChange, EnvelopeChange, ProfileDiff, ProfileStore, ServiceSync, SkippedFile, StoreError,
    SyncReport, VersionSummary,
};

/// One observation of a protected primary, as converted by the monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// When the sample was taken, milliseconds since the Unix epoch (UTC).
    pub ts_unix_ms: u64,
    /// Busy CPU, in cores (0.5 = half a core busy on average over the sample period).
    pub cpu_cores: f64,
    /// Memory in use, in bytes.
    pub mem_bytes: u64,
    /// Disk throughput, read plus write, in bytes per second.
    pub disk_bytes_per_s: f64,
    /// Network throughput, received plus sent, in bytes per second.
    pub net_bytes_per_s: f64,
    /// Configuration items of the guest: item name -> content hash.
    pub config: BTreeMap<String, String>,
    /// Network peers the primary talked to since the previous observation.
    pub peers: Vec<PeerUse>,
}

/// Largest value a metric reading may take (1e14: 100 TB of memory, 100 TB/s); larger readings
/// are clamped.
pub const MAX_VALUE: f64 = 1e14;

impl Observation {
    /// The value of one resource metric. Non-finite or negative readings count as 0 and huge ones
    /// are clamped to [`MAX_VALUE`], so a broken collector cannot poison the model.
    pub fn value(&self, metric: Metric) -> f64 {
        let v = match metric {
            Metric::Cpu => self.cpu_cores,
            Metric::Mem => self.mem_bytes as f64,
            Metric::Disk => self.disk_bytes_per_s,
            Metric::Net => self.net_bytes_per_s,
        };
        if v.is_finite() && v > 0.0 {
            v.min(MAX_VALUE)
        } else {
            0.0
        }
    }
}

/// Traffic between the primary and one remote endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerUse {
    /// Remote IP address, as text (IPv4 or IPv6).
    pub addr: String,
    /// Remote port.
    pub port: u16,
    /// Transport protocol.
    pub proto: Proto,
    /// Bytes exchanged since the previous observation.
    pub bytes: u64,
}

impl PeerUse {
    /// The stable key of this endpoint, e.g. `tcp://10.0.0.5:5432` or `udp://[fd00::1]:53`.
    pub fn key(&self) -> String {
        if self.addr.contains(':') {
            format!("{}://[{}]:{}", self.proto, self.addr, self.port)
        } else {
            format!("{}://{}:{}", self.proto, self.addr, self.port)
        }
    }
}

/// Transport protocol of a dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A resource metric the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Busy CPU cores.
    Cpu,
    /// Memory in use, bytes.
    Mem,
    /// Disk throughput, bytes per second.
    Disk,
    /// Network throughput, bytes per second.
    Net,
}

impl Metric {
    /// All metrics, in a fixed order.
    pub const ALL: [Metric; 4] = [Metric::Cpu, Metric::Mem, Metric::Disk, Metric::Net];

    /// Short lowercase name, as used in JSON and reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Mem => "mem",
            Metric::Disk => "disk",
            Metric::Net => "net",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One value per [`Metric`], with named fields so the JSON stays readable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerMetric<T> {
    /// CPU.
    pub cpu: T,
    /// Memory.
    pub mem: T,
    /// Disk.
    pub disk: T,
    /// Network.
    pub net: T,
}

impl<T> PerMetric<T> {
    /// Builds each entry from its metric.
    pub fn from_fn(mut f: impl FnMut(Metric) -> T) -> Self {
        PerMetric {
            cpu: f(Metric::Cpu),
            mem: f(Metric::Mem),
            disk: f(Metric::Disk),
            net: f(Metric::Net),
        }
    }

    /// The entry of `metric`.
    pub fn get(&self, metric: Metric) -> &T {
        match metric {
            Metric::Cpu => &self.cpu,
            Metric::Mem => &self.mem,
            Metric::Disk => &self.disk,
            Metric::Net => &self.net,
        }
    }

    /// The entry of `metric`, mutable.
    pub fn get_mut(&mut self, metric: Metric) -> &mut T {
        match metric {
            Metric::Cpu => &mut self.cpu,
            Metric::Mem => &mut self.mem,
            Metric::Disk => &mut self.disk,
            Metric::Net => &mut self.net,
        }
    }

    /// `(metric, entry)` pairs in [`Metric::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Metric, &T)> {
        Metric::ALL.into_iter().map(move |m| (m, self.get(m)))
    }
}

/// Anything that predicts a resource envelope before seeing the sample: the learned model and the
/// baselines it is benchmarked against ([`baseline`]).
pub trait Predictor {
    /// Display name used in reports.
    fn name(&self) -> &str;
    /// The envelope expected at `ts_unix_ms`, from what has been observed so far.
    fn predict(&self, ts_unix_ms: u64) -> Prediction;
    /// Learns from one observation (always after [`Predictor::predict`] for the same time).
    fn observe(&mut self, obs: &Observation);
    /// Drift events raised so far (0 for predictors without drift detection).
    fn drift_events(&self) -> u64 {
        0
    }
}
