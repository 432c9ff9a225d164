//! Drift: the primary no longer looks like its profile.
//!
//! Four kinds are detected:
//! - **coverage drop**: of the last `window` observations of a metric, the share inside the
//!   predicted envelope (at or below its calibrated quantile, `p95`, which covers the class's
//!   coverage target when the profile fits) fell below `coverage_threshold`;
//! - **level shift**: the model confirms a regime shift (its level factor, observed / seasonal
//!   median, stayed outside `[1/shift_factor, shift_factor]` for `shift_confirm` observations, see
//!   [`crate::profile::model`]) — a sustained step up *or down*, which coverage alone cannot see
//!   when the load drops. Reported once per shift, when it is confirmed;
//! - **new dependency**: the primary talked to an endpoint the profile does not list;
//! - **configuration change**: a configuration item appeared, disappeared or changed hash.
//!
//! Resource drift is only judged after `warmup_observations` observations (a young model is
//! expected to miss) and, once reported for a metric, not again for that metric until a full new
//! window has been seen. Dependency drift is also only reported after the warm-up: during it every
//! endpoint is new and is simply learned.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Metric, Observation, PerMetric, Prediction};
use crate::profile::model::Source;

/// Errors in drift parameters.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// A parameter is outside its valid range.
    #[error("drift parameter {name} = {value} is invalid: {expected}")]
    InvalidParam {
        /// Parameter name.
        name: &'static str,
        /// The rejected value, as text.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
}

/// Tuning of the detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftParams {
    /// Observations per judgement window.
    pub window: usize,
    /// Coverage below which a full window is a drift.
    pub coverage_threshold: f64,
    /// Observations before resource and dependency drift are judged.
    pub warmup_observations: u64,
}

impl Default for DriftParams {
    fn default() -> Self {
        DriftParams {
            window: 60,
            coverage_threshold: 0.80,
            warmup_observations: 1440,
        }
    }
}

impl DriftParams {
    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), DriftError> {
        let bad = |name, value: String, expected| DriftError::InvalidParam {
            name,
            value,
            expected,
        };
        if !(2..=100_000).contains(&self.window) {
            return Err(bad(
                "window",
                self.window.to_string(),
                "between 2 and 100000",
            ));
        }
        if !(self.coverage_threshold.is_finite() && (0.0..=1.0).contains(&self.coverage_threshold))
        {
            return Err(bad(
                "coverage_threshold",
                self.coverage_threshold.to_string(),
                "between 0 and 1",
            ));
        }
        Ok(())
    }
}

/// What kind of drift was seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DriftKind {
    /// Too many observations of `metric` above the envelope.
    CoverageDrop {
        /// The metric.
        metric: Metric,
        /// Coverage over the window.
        coverage: f64,
    },
    /// `metric` runs at a sustained multiple of its seasonal level.
    LevelShift {
        /// The metric.
        metric: Metric,
        /// Current observed / expected ratio.
        factor: f64,
    },
    /// An endpoint the profile does not know.
    NewDependency {
        /// Its key, e.g. `tcp://10.0.0.5:5432`.
        key: String,
    },
    /// Configuration items differ from the expected ones.
    ConfigChange {
        /// Items that appeared.
        added: Vec<String>,
        /// Items that disappeared.
        removed: Vec<String>,
        /// Items whose hash changed.
        changed: Vec<String>,
    },
}

impl DriftKind {
    /// The resource metric concerned, if any.
    pub fn metric(&self) -> Option<Metric> {
        match self {
            DriftKind::CoverageDrop { metric, .. } | DriftKind::LevelShift { metric, .. } => {
                Some(*metric)
            }
            DriftKind::NewDependency { .. } | DriftKind::ConfigChange { .. } => None,
        }
    }
}

/// A detected drift, with a human-readable explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftEvent {
    /// What was detected.
    pub kind: DriftKind,
    /// One line for logs and version reasons.
    pub detail: String,
}

impl fmt::Display for DriftEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

#[derive(Debug, Clone, Default)]
struct MetricState {
    inside: VecDeque<bool>,
    /// A confirmed level shift is in progress and was reported.
    in_shift: bool,
}

/// Stateful resource drift detection; dependency and configuration checks are stateless helpers.
#[derive(Debug, Clone)]
pub struct DriftDetector {
    params: DriftParams,
    metrics: PerMetric<MetricState>,
}

impl DriftDetector {
    /// A detector with empty windows.
    pub fn new(params: DriftParams) -> Result<Self, DriftError> {
        params.validate()?;
        Ok(DriftDetector {
            params,
            metrics: PerMetric::default(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &DriftParams {
        &self.params
    }

    /// Judges one observation against the prediction made for it. `level_shift` gives the
    /// model's confirmed shift per metric ([`crate::profile::Model::level_shift`]);
    /// `observations` is how many observations the model had learned before this one (for the
    /// warm-up).
    pub fn check_resources(
        &mut self,
        prediction: &Prediction,
        obs: &Observation,
        level_shift: impl Fn(Metric) -> Option<f64>,
        observations: u64,
    ) -> Vec<DriftEvent> {
        let mut events = Vec::new();
        let warm = observations >= self.params.warmup_observations;
        for m in Metric::ALL {
            let env = prediction.envelopes.get(m);
            let st = self.metrics.get_mut(m);
            let shift = level_shift(m);
            if shift.is_none() {
                st.in_shift = false;
            }
            if matches!(env.source, Source::Empty | Source::Recent) {
                continue;
            }
            if st.inside.len() >= self.params.window {
                st.inside.pop_front();
            }
            // The calibrated quantile, not the limit: whether the primary still looks like its profile
            // does not depend on the headroom an operator adds for sizing.
            st.inside.push_back(obs.value(m) <= env.p95);
            if !warm {
                // A shift seen during the warm-up is part of what is being learned.
                st.in_shift = shift.is_some();
                continue;
            }
            if let (Some(factor), false) = (shift, st.in_shift) {
                st.in_shift = true;
                events.push(DriftEvent {
                    detail: format!("{m}: running at {factor:.2}x its usual level"),
                    kind: DriftKind::LevelShift { metric: m, factor },
                });
            }
            if st.inside.len() >= self.params.window {
                let cov = st.inside.iter().filter(|x| **x).count() as f64 / st.inside.len() as f64;
                if cov < self.params.coverage_threshold {
                    events.push(DriftEvent {
                        detail: format!(
                            "{m}: only {:.0}% of the last {} observations within the envelope",
                            cov * 100.0,
                            st.inside.len()
                        ),
                        kind: DriftKind::CoverageDrop {
                            metric: m,
                            coverage: cov,
                        },
                    });
                    // Judge the next window on its own.
                    st.inside.clear();
                }
            }
        }
        events
    }

    /// Forgets the state of `metric` (after the profile was replaced).
    pub fn reset(&mut self, metric: Metric) {
        *self.metrics.get_mut(metric) = MetricState::default();
    }
}

/// Compares an observed configuration with the expected one; `None` if they match.
pub fn check_config(
    expected: &BTreeMap<String, String>,
    observed: &BTreeMap<String, String>,
) -> Option<DriftEvent> {
    let added: Vec<String> = observed
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .cloned()
        .collect();
    let removed: Vec<String> = expected
        .keys()
        .filter(|k| !observed.contains_key(*k))
        .cloned()
        .collect();
    let changed: Vec<String> = observed
        .iter()
        .filter(|(k, v)| expected.get(*k).is_some_and(|e| e != *v))
        .map(|(k, _)| k.clone())
        .collect();
    if added.is_empty() && removed.is_empty() && changed.is_empty() {
        return None;
    }
    let detail = format!(
        "configuration changed: added [{}], removed [{}], changed [{}]",
        added.join(", "),
        removed.join(", "),
        changed.join(", ")
    );
    Some(DriftEvent {
        kind: DriftKind::ConfigChange {
            added,
            removed,
            changed,
        },
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::model::Envelope;

    fn prediction(limit: f64, source: Source) -> Prediction {
        let e = Envelope {
            p50: limit,
            p95: limit,
            limit,
            source,
        };
        Prediction {
            ts_unix_ms: 0,
            envelopes: PerMetric::from_fn(|_| e),
        }
    }

    fn observation(v: f64) -> Observation {
        Observation {
            ts_unix_ms: 0,
            cpu_cores: v,
            mem_bytes: 0,
            disk_bytes_per_s: 0.0,
            net_bytes_per_s: 0.0,
            config: BTreeMap::new(),
            peers: Vec::new(),
        }
    }

    fn detector(window: usize) -> DriftDetector {
        DriftDetector::new(DriftParams {
            window,
            coverage_threshold: 0.8,
            warmup_observations: 0,
        })
        .unwrap()
    }

    #[test]
    fn sustained_coverage_drop_is_reported_once_per_window() {
        let mut d = detector(10);
        let p = prediction(1.0, Source::HourOfWeek);
        let mut events = Vec::new();
        // 7 covered, then misses: the window of 10 falls below 80% at the 3rd miss.
        for v in [0.5; 7].into_iter().chain([2.0; 13]) {
            events.extend(d.check_resources(&p, &observation(v), |_| None, 100));
        }
        let drops: Vec<_> = events
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    DriftKind::CoverageDrop {
                        metric: Metric::Cpu,
                        ..
                    }
                )
            })
            .collect();
        // One when the first window fails, one for the next full window of misses.
        assert_eq!(drops.len(), 2, "{events:?}");
        assert!(drops[0].detail.contains("cpu"), "{}", drops[0].detail);
        // Memory (0 under a limit of 1) never drifted.
        assert!(events.iter().all(|e| e.kind.metric() == Some(Metric::Cpu)));
    }

    #[test]
    fn no_resource_drift_during_warmup_or_without_a_seasonal_prediction() {
        let mut d = DriftDetector::new(DriftParams {
            window: 5,
            coverage_threshold: 0.8,
            warmup_observations: 50,
        })
        .unwrap();
        let p = prediction(1.0, Source::HourOfWeek);
        for i in 0..20 {
            assert!(d
                .check_resources(&p, &observation(5.0), |_| Some(5.0), i)
                .is_empty());
        }
        let recent = prediction(1.0, Source::Recent);
        for _ in 0..20 {
            assert!(d
                .check_resources(&recent, &observation(5.0), |_| None, 100)
                .is_empty());
        }
    }

    #[test]
    fn level_shift_is_reported_when_confirmed_then_not_again() {
        let mut d = detector(1000);
        let p = prediction(10.0, Source::HourOfDay);
        let mut shift = None;
        let mut events = Vec::new();
        for i in 0..30 {
            if i == 10 {
                shift = Some(2.0);
            }
            events.extend(d.check_resources(&p, &observation(1.0), |_| shift, 100));
        }
        let shifts: Vec<_> = events
            .iter()
            .filter(|e| matches!(e.kind, DriftKind::LevelShift { factor, .. } if factor == 2.0))
            .collect();
        // Once per metric.
        assert_eq!(shifts.len(), 4, "{events:?}");
    }

    #[test]
    fn config_change_lists_added_removed_and_changed_items() {
        let expected: BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        assert!(check_config(&expected, &expected).is_none());
        let observed: BTreeMap<String, String> =
            [("a".into(), "9".into()), ("c".into(), "3".into())].into();
        let e = check_config(&expected, &observed).unwrap();
        assert_eq!(
            e.kind,
            DriftKind::ConfigChange {
                added: vec!["c".into()],
                removed: vec!["b".into()],
                changed: vec!["a".into()],
            }
        );
        assert!(e.detail.contains("changed [a]"), "{}", e.detail);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let bad = DriftParams {
            coverage_threshold: 1.5,
            ..DriftParams::default()
        };
        assert!(DriftDetector::new(bad).is_err());
        let bad = DriftParams {
            window: 1,
            ..DriftParams::default()
        };
        assert!(DriftDetector::new(bad).is_err());
    }
}
