//! The learner: turns a stream of observations into a [`Profile`] and reports drift.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::accuracy::{AccuracyReport, AccuracyTracker};
use super::drift::{self, DriftDetector, DriftError, DriftEvent, DriftKind, DriftParams};
use super::model::{Model, ModelError, ModelParams, Prediction, DAY_MS};
use super::{Observation, PeerUse, Predictor, Proto};

/// Bounds on what one observation may add to a profile, so a chatty or hostile primary cannot grow
/// the profile (and every version file) without limit.
const MAX_CONFIG_ITEMS: usize = 4096;
const MAX_CONFIG_KEY_LEN: usize = 1024;
const MAX_CONFIG_HASH_LEN: usize = 256;
const MAX_PEERS_PER_OBSERVATION: usize = 4096;

/// Errors building a learner.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// The model parameters are invalid.
    #[error("invalid model parameters")]
    Model(#[from] ModelError),
    /// The drift parameters are invalid.
    #[error("invalid drift parameters")]
    Drift(#[from] DriftError),
    /// A learner parameter is outside its valid range.
    #[error("learner parameter {name} = {value} is invalid: {expected}")]
    InvalidParam {
        /// Parameter name.
        name: &'static str,
        /// The rejected value, as text.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
}

/// A network endpoint the primary depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// Remote IP address.
    pub addr: String,
    /// Remote port.
    pub port: u16,
    /// Transport protocol.
    pub proto: Proto,
    /// First observation that saw it.
    pub first_seen_unix_ms: u64,
    /// Last observation that saw it.
    pub last_seen_unix_ms: u64,
    /// Bytes exchanged over all observations.
    pub bytes: u64,
    /// Observations that saw it.
    pub count: u64,
}

/// What a service is expected to look like: the resource model, its configuration and its network
/// dependencies. This is the content of a profile version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The seasonal resource model.
    pub model: Model,
    /// Latest observed configuration: item -> content hash.
    pub expected_config: BTreeMap<String, String>,
    /// Endpoints seen and not aged out, keyed by [`PeerUse::key`].
    pub dependencies: BTreeMap<String, Dependency>,
}

impl Profile {
    /// An empty profile.
    pub fn new(params: ModelParams) -> Result<Self, ModelError> {
        Ok(Profile {
            model: Model::new(params)?,
            expected_config: BTreeMap::new(),
            dependencies: BTreeMap::new(),
        })
    }
}

/// Tuning of the learner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnerParams {
    /// Model parameters (used for new profiles; a resumed profile keeps its own).
    pub model: ModelParams,
    /// Drift detection.
    pub drift: DriftParams,
    /// Dependencies not seen for this many days are dropped from the profile.
    pub peer_max_age_days: u32,
    /// At most this many dependencies are kept; beyond it the least recently seen is dropped.
    pub max_dependencies: usize,
}

impl Default for LearnerParams {
    fn default() -> Self {
        LearnerParams {
            model: ModelParams::default(),
            drift: DriftParams::default(),
            peer_max_age_days: 14,
            max_dependencies: 1024,
        }
    }
}

impl LearnerParams {
    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), LearnerError> {
        self.model.validate()?;
        self.drift.validate()?;
        if !(1..=3650).contains(&self.peer_max_age_days) {
            return Err(LearnerError::InvalidParam {
                name: "peer_max_age_days",
                value: self.peer_max_age_days.to_string(),
                expected: "between 1 and 3650",
            });
        }
        if !(1..=65_536).contains(&self.max_dependencies) {
            return Err(LearnerError::InvalidParam {
                name: "max_dependencies",
                value: self.max_dependencies.to_string(),
                expected: "between 1 and 65536",
            });
        }
        Ok(())
    }
}

/// Learns one service's profile from observations.
#[derive(Debug, Clone)]
pub struct Learner {
    profile: Profile,
    detector: DriftDetector,
    accuracy: AccuracyTracker,
    peer_max_age_ms: u64,
    max_dependencies: usize,
}

impl Learner {
    /// A learner with an empty profile.
    pub fn new(params: LearnerParams) -> Result<Self, LearnerError> {
        let profile = Profile::new(params.model.clone())?;
        Self::resume(profile, params)
    }

    /// A learner continuing from a stored profile (its model keeps its own parameters).
    pub fn resume(profile: Profile, params: LearnerParams) -> Result<Self, LearnerError> {
        params.validate()?;
        Ok(Learner {
            profile,
            detector: DriftDetector::new(params.drift)?,
            accuracy: AccuracyTracker::new(),
            peer_max_age_ms: u64::from(params.peer_max_age_days) * DAY_MS,
            max_dependencies: params.max_dependencies,
        })
    }

    /// The profile learned so far.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Replaces the profile (after a rollback or a pull from the repository), keeping the
    /// coverage target; the drift windows restart, the accuracy figures carry on.
    pub fn replace_profile(&mut self, profile: Profile) {
        // The coverage target is this service's class's, whatever the version was made with.
        let target = self.profile.model.params().coverage_target;
        self.profile = profile;
        // Both targets passed validation, so this cannot fail.
        let _ = self.profile.model.set_coverage_target(target);
        for m in super::Metric::ALL {
            self.detector.reset(m);
        }
    }

    /// The envelope expected at `ts_unix_ms`.
    pub fn predict(&self, ts_unix_ms: u64) -> Prediction {
        self.profile.model.predict(ts_unix_ms)
    }

    /// Sets the coverage the model calibrates to (the service's class target).
    pub fn set_coverage_target(&mut self, target: f64) -> Result<(), ModelError> {
        self.profile.model.set_coverage_target(target)
    }

    /// Accuracy of the predictions made before each observation so far.
    pub fn accuracy(&self) -> AccuracyReport {
        self.accuracy.report()
    }

    /// Learns one observation and returns the drift it revealed. The profile has already adapted
    /// when this returns (buckets that no longer fit are renewed, a new configuration or
    /// dependency is recorded); the caller commits a new version with reason `Drift` when the list is not
    /// empty.
    pub fn observe(&mut self, obs: &Observation) -> Vec<DriftEvent> {
        let prediction = self.profile.model.predict(obs.ts_unix_ms);
        self.accuracy.record(&prediction, obs);
        let model = &self.profile.model;
        let mut events = self.detector.check_resources(
            &prediction,
            obs,
            |m| model.level_shift(m),
            model.observations(),
        );
        let warm = model.observations() >= self.detector.params().warmup_observations;

        self.profile.model.observe(obs);
        for e in &events {
            // A level shift renews buckets by itself as the shifted hours complete; a coverage
            // drop renews the buckets of the hour it was seen in.
            if let DriftKind::CoverageDrop { metric, .. } = e.kind {
                self.profile.model.renew_current(metric);
            }
        }

        let config = bounded_config(&obs.config);
        // An empty map means the collector could not read the configuration this time.
        if !config.is_empty() {
            if !self.profile.expected_config.is_empty() {
                events.extend(drift::check_config(&self.profile.expected_config, &config));
            }
            self.profile.expected_config = config;
        }

        if obs.peers.len() > MAX_PEERS_PER_OBSERVATION {
            tracing::warn!(
                peers = obs.peers.len(),
                "only the first {MAX_PEERS_PER_OBSERVATION} peers of the observation are learned"
            );
        }
        for peer in obs.peers.iter().take(MAX_PEERS_PER_OBSERVATION) {
            if peer.addr.parse::<IpAddr>().is_err() {
                tracing::warn!(addr = %peer.addr, "ignoring peer with an invalid IP address");
                continue;
            }
            let key = peer.key();
            if warm && !self.profile.dependencies.contains_key(&key) {
                events.push(DriftEvent {
                    detail: format!("new dependency {key}"),
                    kind: DriftKind::NewDependency { key: key.clone() },
                });
            }
            self.record_peer(key, peer, obs.ts_unix_ms);
        }
        self.age_out(obs.ts_unix_ms);
        self.accuracy.record_drift(events.len() as u64);
        events
    }

    fn record_peer(&mut self, key: String, peer: &PeerUse, ts: u64) {
        let deps = &mut self.profile.dependencies;
        if !deps.contains_key(&key) && deps.len() >= self.max_dependencies {
            let oldest = deps
                .iter()
                .min_by_key(|(_, d)| d.last_seen_unix_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                deps.remove(&k);
            }
        }
        let d = deps.entry(key).or_insert_with(|| Dependency {
            addr: peer.addr.clone(),
            port: peer.port,
            proto: peer.proto,
            first_seen_unix_ms: ts,
            last_seen_unix_ms: ts,
            bytes: 0,
            count: 0,
        });
        d.last_seen_unix_ms = d.last_seen_unix_ms.max(ts);
        d.bytes = d.bytes.saturating_add(peer.bytes);
        d.count = d.count.saturating_add(1);
    }

    /// Drops dependencies not seen for `peer_max_age_days`; returns their keys.
    pub fn age_out(&mut self, now_unix_ms: u64) -> Vec<String> {
        let max_age = self.peer_max_age_ms;
        let stale: Vec<String> = self
            .profile
            .dependencies
            .iter()
            .filter(|(_, d)| now_unix_ms.saturating_sub(d.last_seen_unix_ms) > max_age)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            self.profile.dependencies.remove(k);
        }
        stale
    }
}

/// The configuration with oversized entries dropped and at most [`MAX_CONFIG_ITEMS`] items.
fn bounded_config(config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    if config.len() > MAX_CONFIG_ITEMS {
        tracing::warn!(
            items = config.len(),
            "configuration truncated to {MAX_CONFIG_ITEMS} items"
        );
    }
    config
        .iter()
        .filter(|(k, v)| k.len() <= MAX_CONFIG_KEY_LEN && v.len() <= MAX_CONFIG_HASH_LEN)
        .take(MAX_CONFIG_ITEMS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Predictor for Learner {
    fn name(&self) -> &str {
        "model"
    }

    fn predict(&self, ts_unix_ms: u64) -> Prediction {
        Learner::predict(self, ts_unix_ms)
    }

    fn observe(&mut self, obs: &Observation) {
        Learner::observe(self, obs);
    }

    fn drift_events(&self) -> u64 {
        self.accuracy.report().drift_events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::model::HOUR_MS;
    use crate::profile::synthetic::TRACE_START_UNIX_MS;
    use crate::profile::Metric;

    const MIN: u64 = 60_000;

    fn params(warmup: u64) -> LearnerParams {
        LearnerParams {
            drift: DriftParams {
                warmup_observations: warmup,
                ..DriftParams::default()
            },
            ..LearnerParams::default()
        }
    }

    fn peer(addr: &str, port: u16, bytes: u64) -> PeerUse {
        PeerUse {
            addr: addr.into(),
            port,
            proto: Proto::Tcp,
            bytes,
        }
    }

    fn obs(i: u64, cpu: f64, config: &[(&str, &str)], peers: Vec<PeerUse>) -> Observation {
        Observation {
            ts_unix_ms: TRACE_START_UNIX_MS + i * MIN,
            cpu_cores: cpu,
            mem_bytes: 1 << 30,
            disk_bytes_per_s: 1e6,
            net_bytes_per_s: 1e6,
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            peers,
        }
    }

    #[test]
    fn new_dependency_is_drift_after_warmup_only() {
        let mut l = Learner::new(params(10)).unwrap();
        // During the warm-up every endpoint is simply learned.
        for i in 0..10 {
            let events = l.observe(&obs(i, 1.0, &[], vec![peer("10.0.0.5", 5432, 100)]));
            assert!(events.is_empty(), "{events:?}");
        }
        let events = l.observe(&obs(
            10,
            1.0,
            &[],
            vec![peer("10.0.0.5", 5432, 100), peer("fd00::7", 443, 5)],
        ));
        assert_eq!(
            events.iter().map(|e| &e.kind).collect::<Vec<_>>(),
            vec![&DriftKind::NewDependency {
                key: "tcp://[fd00::7]:443".into()
            }]
        );
        // Known now: no second event.
        assert!(l
            .observe(&obs(11, 1.0, &[], vec![peer("fd00::7", 443, 5)]))
            .is_empty());
        let d = &l.profile().dependencies["tcp://10.0.0.5:5432"];
        assert_eq!((d.count, d.bytes), (11, 1100));
        assert_eq!(d.first_seen_unix_ms, TRACE_START_UNIX_MS);
        assert_eq!(d.last_seen_unix_ms, TRACE_START_UNIX_MS + 10 * MIN);
    }

    #[test]
    fn config_change_is_drift_and_becomes_expected() {
        let mut l = Learner::new(params(0)).unwrap();
        assert!(l
            .observe(&obs(0, 1.0, &[("app.conf", "h1")], vec![]))
            .is_empty());
        // An empty map is "not collected", not "everything removed".
        assert!(l.observe(&obs(1, 1.0, &[], vec![])).is_empty());
        let events = l.observe(&obs(
            2,
            1.0,
            &[("app.conf", "h2"), ("tls.pem", "h3")],
            vec![],
        ));
        assert_eq!(events.len(), 1);
        assert!(matches!(
            &events[0].kind,
            DriftKind::ConfigChange { added, changed, removed }
                if added == &["tls.pem"] && changed == &["app.conf"] && removed.is_empty()
        ));
        assert_eq!(l.profile().expected_config["app.conf"], "h2");
        assert!(l
            .observe(&obs(
                3,
                1.0,
                &[("app.conf", "h2"), ("tls.pem", "h3")],
                vec![]
            ))
            .is_empty());
    }

    #[test]
    fn level_shift_and_coverage_drop_are_detected_and_followed() {
        let mut l = Learner::new(params(60)).unwrap();
        let mut i = 0;
        // Three steady hours at 1 core (alternating slightly so quantiles are not degenerate).
        while i < 180 {
            assert!(l
                .observe(&obs(i, 1.0 + (i % 2) as f64 * 0.05, &[], vec![]))
                .is_empty());
            i += 1;
        }
        // Then the load quadruples and keeps climbing, 1% a sample, each one above all before:
        // coverage drops (the calibration, tuned to a steady load, cannot catch up that fast) and
        // the level shifts.
        let mut kinds = Vec::new();
        while i < 360 {
            let v = 4.0 * 1.01f64.powi((i - 180) as i32);
            kinds.extend(
                l.observe(&obs(i, v, &[], vec![]))
                    .into_iter()
                    .map(|e| e.kind),
            );
            i += 1;
        }
        assert!(
            kinds.iter().any(|k| matches!(
                k,
                DriftKind::LevelShift {
                    metric: Metric::Cpu,
                    ..
                }
            )),
            "{kinds:?}"
        );
        assert!(
            kinds.iter().any(|k| matches!(
                k,
                DriftKind::CoverageDrop {
                    metric: Metric::Cpu,
                    ..
                }
            )),
            "{kinds:?}"
        );
        // Nothing else moved.
        assert!(
            kinds.iter().all(|k| k.metric() == Some(Metric::Cpu)),
            "{kinds:?}"
        );
        // The model followed: the next hour is predicted at the new level.
        let e = l
            .predict(TRACE_START_UNIX_MS + i * MIN + HOUR_MS)
            .envelopes
            .cpu;
        assert!(e.limit >= 8.0, "{e:?}");
        assert_eq!(l.accuracy().drift_events, kinds.len() as u64);
    }

    #[test]
    fn dependencies_age_out_and_are_bounded() {
        let p = LearnerParams {
            peer_max_age_days: 14,
            max_dependencies: 2,
            ..params(0)
        };
        let mut l = Learner::new(p).unwrap();
        l.observe(&obs(0, 1.0, &[], vec![peer("10.0.0.1", 1, 1)]));
        l.observe(&obs(1, 1.0, &[], vec![peer("10.0.0.2", 2, 1)]));
        l.observe(&obs(
            2,
            1.0,
            &[],
            vec![peer("10.0.0.3", 3, 1), peer("bogus", 4, 1)],
        ));
        // Bounded: the least recently seen went; the invalid address was ignored.
        let keys: Vec<_> = l.profile().dependencies.keys().cloned().collect();
        assert_eq!(keys, vec!["tcp://10.0.0.2:2", "tcp://10.0.0.3:3"]);
        // 10.0.0.3 keeps being seen; 10.0.0.2 is not seen for more than 14 days.
        let later = 15 * 24 * 60;
        l.observe(&obs(later, 1.0, &[], vec![peer("10.0.0.3", 3, 1)]));
        let keys: Vec<_> = l.profile().dependencies.keys().cloned().collect();
        assert_eq!(keys, vec!["tcp://10.0.0.3:3"]);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let p = LearnerParams {
            peer_max_age_days: 0,
            ..LearnerParams::default()
        };
        let err = Learner::new(p).unwrap_err();
        assert!(err.to_string().contains("peer_max_age_days"), "{err}");
    }
}
