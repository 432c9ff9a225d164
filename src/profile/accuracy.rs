//! Scoring predictions against what was then observed.
//!
//! For every metric and sample, with `limit` the predicted provisioning limit (p95 plus headroom):
//! - *covered*: `observed <= limit`; coverage is the covered share of samples;
//! - *under-predicted* (a false negative: the shadow would have been too small):
//!   `observed > limit`; the under-prediction rate is `1 - coverage`;
//! - *waste* (over-provisioning) of a covered sample: `(limit - observed) / limit`, 0 when the
//!   limit is 0; the reported waste is its mean over covered samples;
//! - *shortfall* of an under-predicted sample: `(observed - limit) / observed`, averaged over
//!   under-predicted samples (how badly the misses missed).

use serde::{Deserialize, Serialize};

use super::{Metric, Observation, PerMetric, Prediction};

/// Running counts of one metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Counts {
    samples: u64,
    covered: u64,
    waste_sum: f64,
    shortfall_sum: f64,
}

impl Counts {
    fn record(&mut self, limit: f64, observed: f64) {
        self.samples += 1;
        if observed <= limit {
            self.covered += 1;
            if limit > 0.0 {
                self.waste_sum += (limit - observed) / limit;
            }
        } else {
            // observed > limit >= 0 here, so observed > 0.
            self.shortfall_sum += (observed - limit.max(0.0)) / observed;
        }
    }

    fn report(&self) -> MetricAccuracy {
        let under = self.samples - self.covered;
        let ratio = |num: f64, den: u64| if den == 0 { 0.0 } else { num / den as f64 };
        MetricAccuracy {
            samples: self.samples,
            covered: self.covered,
            under_predicted: under,
            coverage: if self.samples == 0 {
                1.0
            } else {
                self.covered as f64 / self.samples as f64
            },
            under_rate: ratio(under as f64, self.samples),
            mean_waste: ratio(self.waste_sum, self.covered),
            mean_shortfall: ratio(self.shortfall_sum, under),
        }
    }
}

/// Accuracy of one metric. With no samples, coverage is 1 and the rates are 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricAccuracy {
    /// Samples scored.
    pub samples: u64,
    /// Samples at or below the limit.
    pub covered: u64,
    /// Samples above the limit (false negatives).
    pub under_predicted: u64,
    /// `covered / samples`.
    pub coverage: f64,
    /// `under_predicted / samples`.
    pub under_rate: f64,
    /// Mean of `(limit - observed) / limit` over covered samples.
    pub mean_waste: f64,
    /// Mean of `(observed - limit) / observed` over under-predicted samples.
    pub mean_shortfall: f64,
}

/// Accuracy over all metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyReport {
    /// Observations scored.
    pub samples: u64,
    /// Per-metric figures.
    pub metrics: PerMetric<MetricAccuracy>,
    /// Mean coverage over the four metrics.
    pub coverage: f64,
    /// Mean under-prediction rate over the four metrics.
    pub under_rate: f64,
    /// Mean waste over the four metrics.
    pub mean_waste: f64,
    /// Drift events raised while scoring.
    pub drift_events: u64,
}

/// Continuously scores predictions; feed it each prediction with the observation that followed.
#[derive(Debug, Clone, Default)]
pub struct AccuracyTracker {
    samples: u64,
    metrics: PerMetric<Counts>,
    drift_events: u64,
}

impl AccuracyTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores `prediction` against `observation`.
    pub fn record(&mut self, prediction: &Prediction, observation: &Observation) {
        self.record_limits(
            &PerMetric::from_fn(|m| prediction.envelopes.get(m).limit),
            &PerMetric::from_fn(|m| observation.value(m)),
        );
    }

    /// Scores predicted limits against observed values.
    pub fn record_limits(&mut self, limits: &PerMetric<f64>, observed: &PerMetric<f64>) {
        self.samples += 1;
        for m in Metric::ALL {
            self.metrics
                .get_mut(m)
                .record(*limits.get(m), *observed.get(m));
        }
    }

    /// Counts `n` drift events.
    pub fn record_drift(&mut self, n: u64) {
        self.drift_events += n;
    }

    /// The figures so far.
    pub fn report(&self) -> AccuracyReport {
        let metrics = PerMetric::from_fn(|m| self.metrics.get(m).report());
        let mean = |f: fn(&MetricAccuracy) -> f64| {
            Metric::ALL.iter().map(|m| f(metrics.get(*m))).sum::<f64>() / Metric::ALL.len() as f64
        };
        AccuracyReport {
            samples: self.samples,
            coverage: mean(|a| a.coverage),
            under_rate: mean(|a| a.under_rate),
            mean_waste: mean(|a| a.mean_waste),
            metrics,
            drift_events: self.drift_events,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::profile::model::{Envelope, Source};

    fn prediction(limit: f64) -> Prediction {
        let e = Envelope {
            p50: limit / 2.0,
            p95: limit,
            limit,
            source: Source::HourOfWeek,
        };
        Prediction {
            ts_unix_ms: 0,
            envelopes: PerMetric::from_fn(|_| e),
        }
    }

    fn observation(cpu: f64) -> Observation {
        Observation {
            ts_unix_ms: 0,
            cpu_cores: cpu,
            mem_bytes: 0,
            disk_bytes_per_s: 0.0,
            net_bytes_per_s: 0.0,
            config: BTreeMap::new(),
            peers: Vec::new(),
        }
    }

    #[test]
    fn hand_computed_figures() {
        let mut t = AccuracyTracker::new();
        // limit 10: observed 5 (waste 0.5), 10 (waste 0, on the limit counts as covered),
        // 12 (under, shortfall 2/12), 8 (waste 0.2).
        for cpu in [5.0, 10.0, 12.0, 8.0] {
            t.record(&prediction(10.0), &observation(cpu));
        }
        t.record_drift(2);
        let r = t.report();
        let cpu = &r.metrics.cpu;
        assert_eq!((cpu.samples, cpu.covered, cpu.under_predicted), (4, 3, 1));
        assert!((cpu.coverage - 0.75).abs() < 1e-12);
        assert!((cpu.under_rate - 0.25).abs() < 1e-12);
        assert!((cpu.mean_waste - 0.7 / 3.0).abs() < 1e-12);
        assert!((cpu.mean_shortfall - 2.0 / 12.0).abs() < 1e-12);
        // Other metrics observed 0 under a limit of 10: all covered, waste 1.
        assert_eq!(r.metrics.mem.coverage, 1.0);
        assert!((r.metrics.mem.mean_waste - 1.0).abs() < 1e-12);
        assert!((r.coverage - (0.75 + 3.0) / 4.0).abs() < 1e-12);
        assert_eq!(r.samples, 4);
        assert_eq!(r.drift_events, 2);
    }

    #[test]
    fn zero_limit_and_zero_usage_is_covered_without_waste() {
        let mut t = AccuracyTracker::new();
        t.record(&prediction(0.0), &observation(0.0));
        t.record(&prediction(0.0), &observation(1.0));
        let cpu = t.report().metrics.cpu;
        assert_eq!((cpu.covered, cpu.under_predicted), (1, 1));
        assert_eq!(cpu.mean_waste, 0.0);
        assert_eq!(cpu.mean_shortfall, 1.0);
    }

    #[test]
    fn empty_report_and_json() {
        let r = AccuracyTracker::new().report();
        assert_eq!(r.samples, 0);
        assert_eq!(r.coverage, 1.0);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["metrics"]["cpu"]["under_rate"], 0.0);
    }
}
