//! The baselines the model is judged against: what a user would run instead of it.
//!
//! - [`LastValue`]: the last observed value, plus headroom;
//! - [`StaticPeak`]: the largest value ever observed, plus headroom;
//! - [`RollingWindow`]: the p95 of the samples of the last 24 hours, plus headroom (how
//!   Kubernetes' vertical pod autoscaler recommends requests).

use std::collections::VecDeque;

use super::model::{quantile_sorted, Envelope, Prediction, Source, DAY_MS};
use super::{Metric, Observation, PerMetric, Predictor};

fn flat_envelope(p50: f64, p95: f64, headroom: f64) -> Envelope {
    Envelope {
        p50,
        p95,
        limit: p95 * (1.0 + headroom),
        source: Source::Recent,
    }
}

/// Predicts the last observed value, plus headroom.
#[derive(Debug, Clone)]
pub struct LastValue {
    headroom: f64,
    last: Option<PerMetric<f64>>,
}

impl LastValue {
    /// A baseline with the given headroom.
    pub fn new(headroom: f64) -> Self {
        LastValue {
            headroom,
            last: None,
        }
    }
}

impl Predictor for LastValue {
    fn name(&self) -> &str {
        "last_value"
    }

    fn predict(&self, ts_unix_ms: u64) -> Prediction {
        Prediction {
            ts_unix_ms,
            envelopes: PerMetric::from_fn(|m| match &self.last {
                Some(l) => flat_envelope(*l.get(m), *l.get(m), self.headroom),
                None => Envelope::EMPTY,
            }),
        }
    }

    fn observe(&mut self, obs: &Observation) {
        self.last = Some(PerMetric::from_fn(|m| obs.value(m)));
    }
}

/// Predicts the maximum ever observed, plus headroom.
#[derive(Debug, Clone)]
pub struct StaticPeak {
    headroom: f64,
    peak: Option<PerMetric<f64>>,
}

impl StaticPeak {
    /// A baseline with the given headroom.
    pub fn new(headroom: f64) -> Self {
        StaticPeak {
            headroom,
            peak: None,
        }
    }
}

impl Predictor for StaticPeak {
    fn name(&self) -> &str {
        "static_peak"
    }

    fn predict(&self, ts_unix_ms: u64) -> Prediction {
        Prediction {
            ts_unix_ms,
            envelopes: PerMetric::from_fn(|m| match &self.peak {
                Some(p) => flat_envelope(*p.get(m), *p.get(m), self.headroom),
                None => Envelope::EMPTY,
            }),
        }
    }

    fn observe(&mut self, obs: &Observation) {
        let peak = self.peak.get_or_insert_with(|| PerMetric::from_fn(|_| 0.0));
        for m in Metric::ALL {
            let p = peak.get_mut(m);
            *p = p.max(obs.value(m));
        }
    }
}

/// Predicts the p95 of the samples of the last 24 hours, plus headroom.
#[derive(Debug, Clone)]
pub struct RollingWindow {
    headroom: f64,
    window_ms: u64,
    /// Samples in the window, oldest first: time and values.
    samples: VecDeque<(u64, PerMetric<f64>)>,
    /// The window's values per metric, ascending.
    sorted: PerMetric<Vec<f64>>,
}

impl RollingWindow {
    /// The 24-hour baseline with the given headroom.
    pub fn new(headroom: f64) -> Self {
        RollingWindow {
            headroom,
            window_ms: DAY_MS,
            samples: VecDeque::new(),
            sorted: PerMetric::default(),
        }
    }
}

impl Predictor for RollingWindow {
    fn name(&self) -> &str {
        "rolling_p95_24h"
    }

    fn predict(&self, ts_unix_ms: u64) -> Prediction {
        Prediction {
            ts_unix_ms,
            envelopes: PerMetric::from_fn(|m| {
                let s = self.sorted.get(m);
                if s.is_empty() {
                    return Envelope::EMPTY;
                }
                flat_envelope(
                    quantile_sorted(s, 0.5),
                    quantile_sorted(s, 0.95),
                    self.headroom,
                )
            }),
        }
    }

    fn observe(&mut self, obs: &Observation) {
        let ts = obs.ts_unix_ms;
        let values = PerMetric::from_fn(|m| obs.value(m));
        for m in Metric::ALL {
            let s = self.sorted.get_mut(m);
            let v = *values.get(m);
            let i = s.partition_point(|x| *x < v);
            s.insert(i, v);
        }
        self.samples.push_back((ts, values));
        // Samples older than the window, or from after a clock step back, leave it.
        while let Some((t, old)) = self.samples.front() {
            if ts.saturating_sub(*t) < self.window_ms && *t <= ts {
                break;
            }
            for m in Metric::ALL {
                let s = self.sorted.get_mut(m);
                let v = *old.get(m);
                let i = s.partition_point(|x| *x < v);
                s.remove(i);
            }
            self.samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::synthetic::{generate, Shape, TraceSpec};

    fn trace() -> Vec<Observation> {
        generate(&TraceSpec {
            shape: Shape::Diurnal,
            days: 2,
            step_ms: 60_000,
            seed: 3,
        })
        .observations
    }

    #[test]
    fn last_value_and_static_peak_follow_their_definition() {
        let t = trace();
        let mut lv = LastValue::new(0.1);
        let mut sp = StaticPeak::new(0.1);
        assert_eq!(lv.predict(0).envelopes.cpu, Envelope::EMPTY);
        for o in &t[..3] {
            lv.observe(o);
            sp.observe(o);
        }
        let last = t[2].cpu_cores;
        let peak = t[..3].iter().map(|o| o.cpu_cores).fold(0.0, f64::max);
        assert!((lv.predict(0).envelopes.cpu.limit - last * 1.1).abs() < 1e-12);
        assert!((sp.predict(0).envelopes.cpu.limit - peak * 1.1).abs() < 1e-12);
    }

    #[test]
    fn rolling_window_is_the_p95_of_the_last_day() {
        let t = trace();
        let mut rw = RollingWindow::new(0.2);
        assert_eq!(rw.predict(0).envelopes.cpu, Envelope::EMPTY);
        for o in &t {
            rw.observe(o);
        }
        // The last 1440 samples (one day at one minute), sorted: their p95.
        let mut day: Vec<f64> = t[t.len() - 1440..].iter().map(|o| o.cpu_cores).collect();
        day.sort_by(f64::total_cmp);
        let e = rw.predict(0).envelopes.cpu;
        assert_eq!(e.p95, quantile_sorted(&day, 0.95));
        assert!((e.limit - e.p95 * 1.2).abs() < 1e-12);
        assert_eq!(rw.samples.len(), 1440);
        assert!(rw.sorted.mem.windows(2).all(|w| w[0] <= w[1]));
    }
}
