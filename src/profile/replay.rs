//! Replaying a history through a predictor, and scoring it at any headroom.
//!
//! A replay predicts each observation `horizon` observations ahead (before the predictor has
//! learned the observation `horizon` places earlier; `horizon = 0` is one step ahead) and
//! records the predicted limit with the predictor run *without* headroom. Every predictor here
//! (the model and the [`super::baseline`]s) gives `limit = base × (1 + headroom)` from a state
//! that does not depend on the headroom (the model's calibration and drift judge its quantile,
//! not the limit), so one [`Recording`] scores any headroom exactly: [`Recording::score`] at the
//! configured one, [`Recording::at_target`] at the smallest one reaching a coverage target.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::accuracy::{AccuracyReport, AccuracyTracker};
use super::model::{Envelope, Prediction, HOUR_MS};
use super::{Metric, Observation, PerMetric, Predictor};

/// Samples of the rolling window used for the adaptation figures.
pub const ADAPT_WINDOW: usize = 60;
/// Coverage the adaptation figures wait for.
pub const ADAPT_COVERAGE: f64 = 0.95;
/// Mean waste the adaptation figures wait for.
pub const ADAPT_WASTE: f64 = 0.25;

/// The limits a predictor (run without headroom) gave for each observation of a history.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The predictor's name.
    pub predictor: String,
    /// Observations ahead each prediction was made.
    pub horizon: usize,
    /// Per observation: the predicted limit of each metric, in [`Metric::ALL`] order.
    limits: Vec<[f64; 4]>,
    /// Per observation: the observed value of each metric.
    values: Vec<[f64; 4]>,
    /// Drift events the predictor raised.
    drift_events: u64,
    /// Index of the first observation after a known regime shift.
    shift_index: Option<usize>,
}

/// Outcome of a replay at one headroom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayResult {
    /// The predictor's name.
    pub predictor: String,
    /// How many observations ahead each prediction was made.
    pub horizon: usize,
    /// Headroom applied on top of the predictor's base.
    pub headroom: f64,
    /// Accuracy over the whole history.
    pub report: AccuracyReport,
    /// After the shift: samples until the coverage of the next [`ADAPT_WINDOW`] samples is back
    /// at or above [`ADAPT_COVERAGE`]. `None` without a shift; `Some(None)` if it never recovers.
    pub adapt_coverage: Option<Option<usize>>,
    /// After the shift: samples until the mean waste of the next [`ADAPT_WINDOW`] samples is at
    /// or below [`ADAPT_WASTE`] (with coverage at target too). Same conventions.
    pub adapt_waste: Option<Option<usize>>,
    /// Under-predicted (observation, metric) pairs in the [`ADAPT_WINDOW`] observations after
    /// the shift; `None` without a shift.
    pub shift_misses: Option<u32>,
}

/// A predictor at the smallest headroom that reaches a coverage target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AtTarget {
    /// The predictor's name.
    pub predictor: String,
    /// That headroom; `None` if even the largest one searched does not reach the target.
    pub headroom: Option<f64>,
    /// Coverage and waste there.
    pub report: Option<AccuracyReport>,
}

impl AtTarget {
    /// Mean waste at the target, `None` if it is not reached.
    pub fn mean_waste(&self) -> Option<f64> {
        self.report.as_ref().map(|r| r.mean_waste)
    }
}

/// The replay horizon that predicts each observation one hour before it, at the history's
/// median sampling period: a horizon of `h` predicts `h + 1` periods ahead (at least 0).
pub fn hour_ahead_samples(obs: &[Observation]) -> usize {
    let mut steps: Vec<u64> = obs
        .windows(2)
        .map(|w| w[1].ts_unix_ms.saturating_sub(w[0].ts_unix_ms))
        .filter(|d| *d > 0)
        .collect();
    if steps.is_empty() {
        return 0;
    }
    steps.sort_unstable();
    let period = steps[steps.len() / 2];
    ((HOUR_MS as f64 / period as f64).round() as usize).saturating_sub(1)
}

/// Replays `obs` through `predictor` (which should run without headroom): the prediction for
/// each observation is made `horizon` observations ahead. Observations whose prediction would
/// precede the history are scored against an empty prediction.
pub fn replay(
    obs: &[Observation],
    shift_index: Option<usize>,
    predictor: &mut dyn Predictor,
    horizon: usize,
) -> Recording {
    let mut pending: VecDeque<Prediction> = VecDeque::with_capacity(horizon + 1);
    let mut limits = Vec::with_capacity(obs.len());
    let mut values = Vec::with_capacity(obs.len());
    for (i, o) in obs.iter().enumerate() {
        if let Some(target) = obs.get(i + horizon) {
            pending.push_back(predictor.predict(target.ts_unix_ms));
        }
        // Observations before `horizon` would have been predicted before the history started.
        let p = if i < horizon {
            None
        } else {
            pending.pop_front()
        };
        limits.push(Metric::ALL.map(|m| {
            p.as_ref()
                .map_or(Envelope::EMPTY.limit, |p| p.envelopes.get(m).limit)
        }));
        values.push(Metric::ALL.map(|m| o.value(m)));
        predictor.observe(o);
    }
    Recording {
        predictor: predictor.name().to_string(),
        horizon,
        limits,
        values,
        drift_events: predictor.drift_events(),
        shift_index,
    }
}

impl Recording {
    /// Observations recorded.
    pub fn len(&self) -> usize {
        self.limits.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// The figures at `headroom`.
    pub fn score(&self, headroom: f64) -> ReplayResult {
        let scale = 1.0 + headroom;
        let mut tracker = AccuracyTracker::new();
        // Per sample: metrics covered, and waste summed over covered metrics.
        let mut per_sample: Vec<(u32, f64)> = Vec::with_capacity(self.len());
        for (limits, values) in self.limits.iter().zip(&self.values) {
            let limits = limits.map(|l| l * scale);
            let mut covered = 0;
            let mut waste = 0.0;
            for k in 0..4 {
                let (l, v) = (limits[k], values[k]);
                if v <= l {
                    covered += 1;
                    if l > 0.0 {
                        waste += (l - v) / l;
                    }
                }
            }
            per_sample.push((covered, waste));
            tracker.record_limits(
                &PerMetric::from_fn(|m| limits[m as usize]),
                &PerMetric::from_fn(|m| values[m as usize]),
            );
        }
        tracker.record_drift(self.drift_events);
        let after_shift = self
            .shift_index
            .map(|s| &per_sample[s.min(per_sample.len())..]);
        ReplayResult {
            predictor: self.predictor.clone(),
            horizon: self.horizon,
            headroom,
            report: tracker.report(),
            adapt_coverage: after_shift.map(|a| samples_to_adapt(a, false)),
            adapt_waste: after_shift.map(|a| samples_to_adapt(a, true)),
            shift_misses: after_shift.map(|a| {
                a.iter()
                    .take(ADAPT_WINDOW)
                    .map(|(covered, _)| Metric::ALL.len() as u32 - covered)
                    .sum()
            }),
        }
    }

    /// The smallest headroom in `[0, max_headroom]` whose coverage (mean over the metrics)
    /// reaches `target`, and the figures there.
    pub fn at_target(&self, target: f64, max_headroom: f64) -> AtTarget {
        // Per metric, the scale each observation needs: observed / limit, sorted.
        let needs: Vec<Vec<f64>> = (0..4)
            .map(|k| {
                let mut r: Vec<f64> = self
                    .limits
                    .iter()
                    .zip(&self.values)
                    .map(|(l, v)| {
                        let (l, v) = (l[k], v[k]);
                        if v <= 0.0 || v <= l {
                            0.0
                        } else if l > 0.0 {
                            v / l
                        } else {
                            f64::INFINITY
                        }
                    })
                    .collect();
                r.sort_by(f64::total_cmp);
                r
            })
            .collect();
        let n = self.len().max(1) as f64;
        let coverage = |scale: f64| {
            needs
                .iter()
                .map(|r| r.partition_point(|x| *x <= scale) as f64 / n)
                .sum::<f64>()
                / 4.0
        };
        let name = self.predictor.clone();
        if coverage(1.0 + max_headroom) < target {
            return AtTarget {
                predictor: name,
                headroom: None,
                report: None,
            };
        }
        let (mut lo, mut hi) = (0.0f64, max_headroom);
        if coverage(1.0) >= target {
            hi = 0.0;
        } else {
            for _ in 0..60 {
                let mid = (lo + hi) / 2.0;
                if coverage(1.0 + mid) >= target {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
        }
        // `observed <= limit × scale` and `observed / limit <= scale` can differ in the last
        // bit: step up until the scoring itself agrees.
        let mut r = self.score(hi);
        while r.report.coverage < target && hi < max_headroom {
            hi = (hi * (1.0 + 1e-12)).max(hi + 1e-12);
            r = self.score(hi);
        }
        AtTarget {
            predictor: name,
            headroom: Some(hi),
            report: Some(r.report),
        }
    }
}

fn samples_to_adapt(after: &[(u32, f64)], need_waste: bool) -> Option<usize> {
    let metrics = Metric::ALL.len() as f64;
    let mut window: VecDeque<(u32, f64)> = VecDeque::with_capacity(ADAPT_WINDOW);
    let (mut cov, mut waste) = (0u32, 0.0f64);
    for (i, s) in after.iter().enumerate() {
        window.push_back(*s);
        cov += s.0;
        waste += s.1;
        if window.len() > ADAPT_WINDOW {
            let old = window.pop_front()?;
            cov -= old.0;
            waste -= old.1;
        }
        if window.len() == ADAPT_WINDOW {
            let coverage = f64::from(cov) / (ADAPT_WINDOW as f64 * metrics);
            let mean_waste = if cov == 0 {
                1.0
            } else {
                waste / f64::from(cov)
            };
            if coverage >= ADAPT_COVERAGE && (!need_waste || mean_waste <= ADAPT_WASTE) {
                return Some(i + 1 - ADAPT_WINDOW);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::baseline::LastValue;
    use crate::profile::synthetic::{generate, Shape, TraceSpec};

    fn trace(days: u32) -> Vec<Observation> {
        generate(&TraceSpec {
            shape: Shape::Diurnal,
            days,
            step_ms: 60_000,
            seed: 3,
        })
        .observations
    }

    #[test]
    fn replay_predicts_ahead_without_peeking() {
        // A predictor that remembers the last value: with a horizon of h it must be scored
        // against the value h + 1 observations earlier.
        let t = trace(1);
        let h = 5;
        let r = replay(&t, None, &mut LastValue::new(0.0), h).score(0.0);
        assert_eq!(r.horizon, h);
        assert_eq!(r.report.samples, t.len() as u64);
        let mut expect_covered = 0;
        for (i, o) in t.iter().enumerate() {
            if i > h && o.cpu_cores <= t[i - h - 1].cpu_cores {
                expect_covered += 1;
            }
        }
        assert_eq!(r.report.metrics.cpu.covered, expect_covered);
    }

    #[test]
    fn scoring_a_recording_equals_replaying_with_the_headroom() {
        let t = trace(2);
        let rec = replay(&t, None, &mut LastValue::new(0.0), 0);
        let direct = replay(&t, None, &mut LastValue::new(0.25), 0).score(0.0);
        let scored = rec.score(0.25);
        assert_eq!(direct.report, scored.report);
    }

    #[test]
    fn at_target_finds_the_smallest_headroom() {
        let t = trace(2);
        let rec = replay(&t, None, &mut LastValue::new(0.0), 0);
        let at = rec.at_target(0.95, 2.0);
        let h = at.headroom.unwrap();
        assert!(at.report.as_ref().unwrap().coverage >= 0.95);
        assert!(rec.score(h * 0.999).report.coverage < 0.95, "{h}");
        assert!(rec.at_target(0.95, 1e-6).headroom.is_none());
    }

    #[test]
    fn hour_ahead_follows_the_sampling_period() {
        assert_eq!(hour_ahead_samples(&trace(1)), 59);
        let five_min: Vec<Observation> = trace(1).into_iter().step_by(5).collect();
        assert_eq!(hour_ahead_samples(&five_min), 11);
        assert_eq!(hour_ahead_samples(&five_min[..1]), 0);
    }

    #[test]
    fn samples_to_adapt_counts_until_the_next_window_is_good() {
        let good = (4u32, 0.8f64);
        let bad = (0u32, 0.0f64);
        let mut s = vec![bad; 10];
        s.extend(vec![good; 100]);
        // Coverage of 60 samples >= 95% needs at most 12 missed metric-samples (3 samples).
        assert_eq!(samples_to_adapt(&s, false), Some(7));
        assert_eq!(samples_to_adapt(&s[..50], false), None);
        // Waste 0.8/4 = 20% per covered metric: within target.
        assert_eq!(samples_to_adapt(&s, true), Some(7));
        let wasteful = vec![(4u32, 4.0f64); 100];
        assert_eq!(samples_to_adapt(&wasteful, true), None);
    }
}
