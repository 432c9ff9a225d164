//! Deterministic synthetic workloads for the benchmark and the tests.
//!
//! Used by the benchmark (`cargo bench --bench profile`) and by tests. Everything is seeded: the
//! same [`TraceSpec`] always produces the same trace, on every machine.
//!
//! Each trace drives all four metrics from one load *shape* `level(t)` (around 1.0), with
//! per-metric scale and noise: the value is `scale × level(t) × (1 + σ·e_t)`, where `e_t` is a
//! unit-variance AR(1) process (real load is autocorrelated: a busy minute tends to follow a busy
//! minute). Memory moves less than the rest (`0.5 + 0.5·level`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::{DAY_MS, HOUR_MS};
use super::{Metric, Observation, PeerUse, Proto};
use crate::rng::SplitMix64;

/// Monday 2024-01-01 00:00:00 UTC: traces start at the beginning of a week.
pub const TRACE_START_UNIX_MS: u64 = 1_704_067_200_000;

/// Coverage the model must reach on the synthetic traces.
pub const COVERAGE_TARGET: f64 = 0.95;
/// Mean waste the model must stay under on the synthetic traces.
pub const WASTE_TARGET: f64 = 0.25;

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
}
