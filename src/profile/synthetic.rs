//! Deterministic synthetic workloads, the baselines, and the replay that scores a predictor.
//!
//! Used by the benchmark (`cargo bench --bench profile`) and by tests. Everything is seeded: the
//! same [`TraceSpec`] always produces the same trace, on every machine.
//!
//! Each trace drives all four metrics from one load *shape* `level(t)` (around 1.0), with
//! per-metric scale and noise: the value is `scale × level(t) × (1 + σ·e_t)`, where `e_t` is a
//! unit-variance AR(1) process (real load is autocorrelated: a busy minute tends to follow a busy
//! minute). Memory moves less than the rest (`0.5 + 0.5·level`).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::accuracy::{AccuracyReport, AccuracyTracker};
use super::model::{Envelope, Prediction, Source, DAY_MS, HOUR_MS};
use super::{Metric, Observation, PeerUse, PerMetric, Predictor, Proto};

/// Monday 2024-01-01 00:00:00 UTC: traces start at the beginning of a week.
pub const TRACE_START_UNIX_MS: u64 = 1_704_067_200_000;

/// Coverage a predictor must reach.
pub const COVERAGE_TARGET: f64 = 0.95;
/// Mean waste a predictor must stay under.
pub const WASTE_TARGET: f64 = 0.25;
/// Samples of the rolling window used for the adaptation figures.
pub const ADAPT_WINDOW: usize = 60;

/// splitmix64: tiny, fast, good enough statistical quality for test data and tick jitter, no
/// dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// The load pattern of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Daily cycle, trough at 03:00 and peak at 15:00 UTC (0.4 to 1.6).
    Diurnal,
    /// Daily cycle on weekdays; weekends run at 35% of it.
    DiurnalWeekly,
    /// Flat-ish load with rare bursts (3-5x for 2-10 minutes, about one every 8 hours).
    Spiky,
    /// Daily cycle whose level doubles on day 14 at 10:00 (Monday of week 3).
    ShiftUp,
    /// Daily cycle whose level halves on day 14 at 10:00.
    ShiftDown,
}

impl Shape {
    /// All shapes, in report order.
    pub const ALL: [Shape; 5] = [
        Shape::Diurnal,
        Shape::DiurnalWeekly,
        Shape::Spiky,
        Shape::ShiftUp,
        Shape::ShiftDown,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Diurnal => "diurnal",
            Shape::DiurnalWeekly => "diurnal_weekly",
            Shape::Spiky => "spiky",
            Shape::ShiftUp => "shift_up",
            Shape::ShiftDown => "shift_down",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceSpec {
    /// Load pattern.
    pub shape: Shape,
    /// Length in days.
    pub days: u32,
    /// Sampling interval, milliseconds.
    pub step_ms: u64,
    /// PRNG seed.
    pub seed: u64,
}

impl TraceSpec {
    /// The benchmark's trace: 21 days at 1-minute sampling.
    pub fn bench(shape: Shape, seed: u64) -> Self {
        TraceSpec {
            shape,
            days: 21,
            step_ms: 60_000,
            seed,
        }
    }
}

/// A generated trace.
#[derive(Debug, Clone)]
pub struct Trace {
    /// How it was made.
    pub spec: TraceSpec,
    /// Observations, in time order.
    pub observations: Vec<Observation>,
    /// Index of the first observation after a regime shift, if the shape has one.
    pub shift_index: Option<usize>,
}

/// Per-metric scale, noise σ and AR(1) coefficient.
const METRICS: [(Metric, f64, f64, f64); 4] = [
    (Metric::Cpu, 2.0, 0.08, 0.6),
    (Metric::Mem, 4.0 * 1024.0 * 1024.0 * 1024.0, 0.02, 0.9),
    (Metric::Disk, 20.0e6, 0.12, 0.5),
    (Metric::Net, 50.0e6, 0.10, 0.6),
];

/// Time of the shift in the shift shapes, from the trace start.
const SHIFT_OFFSET_MS: u64 = 14 * DAY_MS + 10 * HOUR_MS;

fn diurnal(ts: u64) -> f64 {
    let hour = (ts % DAY_MS) as f64 / HOUR_MS as f64;
    1.0 + 0.6 * (std::f64::consts::TAU * (hour - 9.0) / 24.0).sin()
}

/// Generates a trace.
pub fn generate(spec: &TraceSpec) -> Trace {
    let mut rng = SplitMix64::new(spec.seed ^ (spec.shape as u64).wrapping_mul(0x9E37_79B9));
    let step = spec.step_ms.max(1);
    let n = (u64::from(spec.days) * DAY_MS / step) as usize;
    let shift_ts = TRACE_START_UNIX_MS + SHIFT_OFFSET_MS;
    let mut noise = [0.0f64; 4];
    let mut burst_left = 0u32;
    let mut burst_height = 1.0;
    let mut observations = Vec::with_capacity(n);
    let mut shift_index = None;
    let config: BTreeMap<String, String> = [
        ("/etc/app/app.conf".to_string(), "sha256:1f2e".to_string()),
        ("/etc/app/tls.pem".to_string(), "sha256:9a8b".to_string()),
    ]
    .into();

    for i in 0..n {
        let ts = TRACE_START_UNIX_MS + i as u64 * step;
        let mut level = match spec.shape {
            Shape::Diurnal | Shape::ShiftUp | Shape::ShiftDown => diurnal(ts),
            Shape::DiurnalWeekly => {
                // Day 0 of the trace is a Monday: days 5 and 6 of each week are the weekend.
                let weekday = ((ts - TRACE_START_UNIX_MS) / DAY_MS) % 7;
                diurnal(ts) * if weekday >= 5 { 0.35 } else { 1.0 }
            }
            Shape::Spiky => 0.8 + 0.2 * (diurnal(ts) - 1.0) / 0.6,
        };
        if ts >= shift_ts {
            shift_index.get_or_insert(i);
            level *= match spec.shape {
                Shape::ShiftUp => 2.0,
                Shape::ShiftDown => 0.5,
                _ => 1.0,
            };
        }
        let mut burst = 1.0;
        if spec.shape == Shape::Spiky {
            if burst_left == 0 && rng.next_f64() < 1.0 / 480.0 {
                burst_left = 2 + (rng.next_u64() % 9) as u32;
                burst_height = 3.0 + 2.0 * rng.next_f64();
            }
            if burst_left > 0 {
                burst_left -= 1;
                burst = burst_height;
            }
        }
        let mut values = [0.0; 4];
        for (k, (metric, scale, sigma, phi)) in METRICS.iter().enumerate() {
            noise[k] = phi * noise[k] + (1.0 - phi * phi).sqrt() * rng.normal();
            let (shape_level, b) = if *metric == Metric::Mem {
                (0.5 + 0.5 * level, 1.0 + (burst - 1.0) * 0.1)
            } else {
                (level, burst)
            };
            values[k] = (scale * shape_level * b * (1.0 + sigma * noise[k])).max(0.0);
        }
        observations.push(Observation {
            ts_unix_ms: ts,
            cpu_cores: values[0],
            mem_bytes: values[1] as u64,
            disk_bytes_per_s: values[2],
            net_bytes_per_s: values[3],
            config: config.clone(),
            peers: vec![PeerUse {
                addr: "10.0.0.5".into(),
                port: 5432,
                proto: Proto::Tcp,
                bytes: (values[3] * step as f64 / 1000.0 * 0.2) as u64,
            }],
        });
    }
    let shift_index = match spec.shape {
        Shape::ShiftUp | Shape::ShiftDown => shift_index,
        _ => None,
    };
    Trace {
        spec: spec.clone(),
        observations,
        shift_index,
    }
}

fn flat_envelope(v: f64, headroom: f64) -> Envelope {
    Envelope {
        p50: v,
        p95: v,
        limit: v * (1.0 + headroom),
        source: Source::Recent,
    }
}

/// Baseline: predicts the last observed value, plus headroom.
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
                Some(l) => flat_envelope(*l.get(m), self.headroom),
                None => Envelope::EMPTY,
            }),
        }
    }

    fn observe(&mut self, obs: &Observation) {
        self.last = Some(PerMetric::from_fn(|m| obs.value(m)));
    }
}

/// Baseline: predicts the maximum ever observed, plus headroom.
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
                Some(p) => flat_envelope(*p.get(m), self.headroom),
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

/// Outcome of replaying a trace through a predictor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayResult {
    /// The predictor's name.
    pub predictor: String,
    /// How many observations ahead each prediction was made.
    pub horizon: usize,
    /// Accuracy over the whole trace.
    pub report: AccuracyReport,
    /// After the shift: samples until the coverage of the next [`ADAPT_WINDOW`] samples is back
    /// at or above [`COVERAGE_TARGET`]. `None` if the trace has no shift; `Some(None)` if it
    /// never recovers.
    pub adapt_coverage: Option<Option<usize>>,
    /// After the shift: samples until the mean waste of the next [`ADAPT_WINDOW`] samples is at
    /// or below [`WASTE_TARGET`] (with coverage at target too). Same conventions.
    pub adapt_waste: Option<Option<usize>>,
    /// Under-predicted (observation, metric) pairs in the [`ADAPT_WINDOW`] observations after
    /// the shift; `None` if the trace has no shift.
    pub shift_misses: Option<u32>,
}

impl ReplayResult {
    /// Whether coverage and waste targets are both met.
    pub fn meets_targets(&self) -> bool {
        self.report.coverage >= COVERAGE_TARGET && self.report.mean_waste <= WASTE_TARGET
    }
}

/// Replays `trace` through `predictor`. The prediction for each observation is made
/// `horizon` observations ahead: before the predictor has learned the observation `horizon`
/// places earlier (`horizon = 0`: just before learning the observation itself). Observations
/// whose prediction would precede the trace are scored against an empty prediction.
pub fn replay(trace: &Trace, predictor: &mut dyn Predictor, horizon: usize) -> ReplayResult {
    let obs = &trace.observations;
    let mut tracker = AccuracyTracker::new();
    let mut pending: VecDeque<Prediction> = VecDeque::with_capacity(horizon + 1);
    // Per sample: metrics covered, and waste summed over covered metrics.
    let mut per_sample: Vec<(u32, f64)> = Vec::with_capacity(obs.len());
    for (i, o) in obs.iter().enumerate() {
        if i == 0 {
            for early in obs.iter().take(horizon) {
                pending.push_back(empty_prediction(early.ts_unix_ms));
            }
        }
        if let Some(target) = obs.get(i + horizon) {
            pending.push_back(predictor.predict(target.ts_unix_ms));
        }
        let p = pending
            .pop_front()
            .unwrap_or_else(|| empty_prediction(o.ts_unix_ms));
        tracker.record(&p, o);
        let mut covered = 0;
        let mut waste = 0.0;
        for m in Metric::ALL {
            let limit = p.envelopes.get(m).limit;
            let v = o.value(m);
            if v <= limit {
                covered += 1;
                if limit > 0.0 {
                    waste += (limit - v) / limit;
                }
            }
        }
        per_sample.push((covered, waste));
        predictor.observe(o);
    }
    tracker.record_drift(predictor.drift_events());
    let after_shift = trace
        .shift_index
        .map(|s| &per_sample[s.min(per_sample.len())..]);
    ReplayResult {
        predictor: predictor.name().to_string(),
        horizon,
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

fn empty_prediction(ts_unix_ms: u64) -> Prediction {
    Prediction {
        ts_unix_ms,
        envelopes: PerMetric::from_fn(|_| Envelope::EMPTY),
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
            if coverage >= COVERAGE_TARGET && (!need_waste || mean_waste <= WASTE_TARGET) {
                return Some(i + 1 - ADAPT_WINDOW);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shape: Shape, days: u32) -> TraceSpec {
        TraceSpec {
            shape,
            days,
            step_ms: 60_000,
            seed: 3,
        }
    }

    #[test]
    fn generation_is_deterministic_and_shaped() {
        let a = generate(&spec(Shape::DiurnalWeekly, 7));
        let b = generate(&spec(Shape::DiurnalWeekly, 7));
        assert_eq!(a.observations, b.observations);
        assert_eq!(a.observations.len(), 7 * 1440);
        assert_eq!(a.shift_index, None);
        let c = generate(&TraceSpec {
            seed: 4,
            ..spec(Shape::DiurnalWeekly, 7)
        });
        assert_ne!(a.observations, c.observations);

        // Weekday 15:00 is busier than 03:00, and than the weekend.
        let cpu_at = |day: usize, hour: usize| {
            let s = &a.observations[day * 1440 + hour * 60..day * 1440 + hour * 60 + 60];
            s.iter().map(|o| o.cpu_cores).sum::<f64>() / 60.0
        };
        assert!(cpu_at(1, 15) > 2.0 * cpu_at(1, 3));
        assert!(cpu_at(1, 15) > 2.0 * cpu_at(5, 15));
    }

    #[test]
    fn shift_shapes_mark_the_shift() {
        let t = generate(&spec(Shape::ShiftUp, 15));
        let i = t.shift_index.unwrap();
        assert_eq!(
            t.observations[i].ts_unix_ms,
            TRACE_START_UNIX_MS + SHIFT_OFFSET_MS
        );
        let mean = |r: std::ops::Range<usize>| {
            r.clone().map(|k| t.observations[k].cpu_cores).sum::<f64>() / r.len() as f64
        };
        // Same time of day, one day apart.
        let ratio = mean(i..i + 60) / mean(i - 1440..i - 1380);
        assert!((1.7..2.3).contains(&ratio), "{ratio}");
    }

    #[test]
    fn baselines_follow_their_definition() {
        let mut lv = LastValue::new(0.1);
        let mut sp = StaticPeak::new(0.1);
        assert_eq!(lv.predict(0).envelopes.cpu, Envelope::EMPTY);
        let t = generate(&spec(Shape::Diurnal, 1));
        for o in &t.observations[..3] {
            lv.observe(o);
            sp.observe(o);
        }
        let last = t.observations[2].cpu_cores;
        let peak = t.observations[..3]
            .iter()
            .map(|o| o.cpu_cores)
            .fold(0.0, f64::max);
        assert!((lv.predict(0).envelopes.cpu.limit - last * 1.1).abs() < 1e-12);
        assert!((sp.predict(0).envelopes.cpu.limit - peak * 1.1).abs() < 1e-12);
    }

    #[test]
    fn replay_predicts_ahead_without_peeking() {
        // A predictor that remembers the last value: with a horizon of h it must be scored
        // against the value h + 1 observations earlier.
        let t = generate(&spec(Shape::Diurnal, 1));
        let h = 5;
        let r = replay(&t, &mut LastValue::new(0.0), h);
        assert_eq!(r.horizon, h);
        assert_eq!(r.report.samples, t.observations.len() as u64);
        let mut expect_covered = 0;
        for (i, o) in t.observations.iter().enumerate() {
            if i > h && o.cpu_cores <= t.observations[i - h - 1].cpu_cores {
                expect_covered += 1;
            }
        }
        assert_eq!(r.report.metrics.cpu.covered, expect_covered);
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

    #[test]
    fn model_beats_baselines_on_a_short_weekly_trace() {
        let t = generate(&TraceSpec {
            shape: Shape::DiurnalWeekly,
            days: 8,
            step_ms: 120_000,
            seed: 5,
        });
        let mut model = crate::profile::Learner::new(Default::default()).unwrap();
        let m = replay(&t, &mut model, 0);
        let lv = replay(&t, &mut LastValue::new(0.1), 0);
        let sp = replay(&t, &mut StaticPeak::new(0.1), 0);
        assert!(m.meets_targets(), "{:?}", m.report);
        assert!(lv.report.coverage < COVERAGE_TARGET);
        assert!(sp.report.mean_waste > m.report.mean_waste);
    }
}
