//! A canary's resources against the service's profile: what the profile predicts the service
//! needs when the canary runs (its CPU and memory envelopes), and whether the changed clone
//! used more than that envelope's provisioning limit while the recorded traffic was replayed.
//!
//! The figures are measured as the profile measures the primary: CPU as busy cores of the whole
//! QEMU process, memory as the guest's memory in use (balloon statistics). The replay sends the
//! recorded requests back to back, faster than they arrived, so CPU is compared at the recorded
//! pace: the CPU time the clone used, spread over the time the recorded traffic originally took
//! (or the replay's own duration, if that was longer). Memory is a level: the largest reading
//! taken during the replay.
//!
//! The unchanged baseline clone is measured the same way: when it is beyond the envelope too,
//! the replay (or the clone itself) exceeds it, not the change, and no finding is raised; nor
//! when the canary used at most [`NOISE_MARGIN`] more than the baseline.

use serde::{Deserialize, Serialize};

use crate::capture::Record;
use crate::profile::{Envelope, Source};

/// How much more than the unchanged baseline the canary must use for a finding: two clones of
/// one primary under one replay differ by some amount (QEMU's own work, timer ticks under TCG),
/// and a change that costs less than this is not worth a finding even at the limit.
pub const NOISE_MARGIN: f64 = 0.10;

/// The envelopes the service's profile predicted for the canary's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEnvelope {
    /// The stored profile version the live profile descends from (`None`: not stored yet).
    pub version: Option<u64>,
    /// When the prediction is for, Unix ms.
    pub at_unix_ms: u64,
    /// Busy CPU, cores.
    pub cpu: Envelope,
    /// Memory in use, bytes.
    pub mem: Envelope,
}

/// What one clone used while the traffic was replayed.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CloneUse {
    /// CPU time of its QEMU during the replay, ms.
    pub cpu_ms: f64,
    /// The largest memory-in-use reading during the replay, bytes (`None`: no balloon
    /// statistics were readable).
    pub mem_bytes: Option<u64>,
}

/// The resources measured during one replay.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ReplayUse {
    /// The unchanged clone.
    pub baseline: CloneUse,
    /// The changed clone.
    pub canary: CloneUse,
    /// From the first recorded request to the last, ms.
    pub recorded_span_ms: u64,
    /// How long the replay took, ms.
    pub replay_ms: f64,
}

impl ReplayUse {
    /// Busy cores that `cpu_ms` amounts to at the recorded pace.
    pub fn cores_at_recorded_pace(&self, cpu_ms: f64) -> f64 {
        let over = self.replay_ms.max(self.recorded_span_ms as f64);
        if over > 0.0 && cpu_ms.is_finite() {
            cpu_ms.max(0.0) / over
        } else {
            0.0
        }
    }
}

/// From the first recorded request to the last, ms (0 for fewer than two).
pub fn recorded_span_ms(records: &[Record]) -> u64 {
    let first = records.iter().map(|r| r.at_unix_ms).min();
    let last = records.iter().map(|r| r.at_unix_ms).max();
    first.zip(last).map_or(0, |(a, b)| b - a)
}

/// One metric's comparison with its envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeCheck {
    /// `cpu` (cores) or `mem` (bytes).
    pub metric: String,
    /// The envelope's predicted 95th percentile.
    pub p95: f64,
    /// The envelope's provisioning limit: beyond it is a finding.
    pub limit: f64,
    /// The baseline's use (`None`: not measured).
    pub baseline: Option<f64>,
    /// The canary's use (`None`: not measured).
    pub canary: Option<f64>,
}

impl EnvelopeCheck {
    /// The canary used more than the limit.
    pub fn canary_beyond(&self) -> bool {
        self.canary.is_some_and(|v| v > self.limit)
    }

    /// The unchanged baseline used more than the limit.
    pub fn baseline_beyond(&self) -> bool {
        self.baseline.is_some_and(|v| v > self.limit)
    }

    /// The change takes the service beyond its envelope: the canary is beyond it, the
    /// unchanged baseline under the same replay is not, and the canary used more than
    /// [`NOISE_MARGIN`] above the baseline (when the baseline was measured).
    pub fn finding(&self) -> bool {
        let above_noise = match (self.canary, self.baseline) {
            (Some(c), Some(b)) => c > b * (1.0 + NOISE_MARGIN),
            _ => true,
        };
        self.canary_beyond() && !self.baseline_beyond() && above_noise
    }
}

/// The canary's resources against the profile's envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EnvelopeReport {
    /// No comparison: the profile predicts no envelope (the reason says why).
    Unavailable {
        /// Why.
        why: String,
    },
    /// Compared.
    Compared {
        /// The envelopes compared with.
        envelope: ProfileEnvelope,
        /// The measurements.
        used: ReplayUse,
        /// One per metric the profile predicts.
        checks: Vec<EnvelopeCheck>,
    },
}

impl EnvelopeReport {
    /// The checks that are findings (the change goes beyond the envelope).
    pub fn findings(&self) -> Vec<&EnvelopeCheck> {
        match self {
            EnvelopeReport::Unavailable { .. } => Vec::new(),
            EnvelopeReport::Compared { checks, .. } => {
                checks.iter().filter(|c| c.finding()).collect()
            }
        }
    }
}

/// Whether an envelope predicts anything (an empty or non-finite one does not).
fn predicts(e: &Envelope) -> bool {
    e.source != Source::Empty && e.limit.is_finite() && e.limit > 0.0
}

/// Compares `used` with `envelope` (`Err`: why there is no envelope).
pub fn compare(envelope: Result<ProfileEnvelope, String>, used: ReplayUse) -> EnvelopeReport {
    let envelope = match envelope {
        Ok(e) => e,
        Err(why) => return EnvelopeReport::Unavailable { why },
    };
    let mut checks = Vec::new();
    if predicts(&envelope.cpu) {
        checks.push(EnvelopeCheck {
            metric: "cpu".into(),
            p95: envelope.cpu.p95,
            limit: envelope.cpu.limit,
            baseline: Some(used.cores_at_recorded_pace(used.baseline.cpu_ms)),
            canary: Some(used.cores_at_recorded_pace(used.canary.cpu_ms)),
        });
    }
    if predicts(&envelope.mem) {
        checks.push(EnvelopeCheck {
            metric: "mem".into(),
            p95: envelope.mem.p95,
            limit: envelope.mem.limit,
            baseline: used.baseline.mem_bytes.map(|b| b as f64),
            canary: used.canary.mem_bytes.map(|b| b as f64),
        });
    }
    if checks.is_empty() {
        return EnvelopeReport::Unavailable {
            why: "the profile predicts neither CPU nor memory".into(),
        };
    }
    EnvelopeReport::Compared {
        envelope,
        used,
        checks,
    }
}

/// One check as text: `cpu 0.42 cores (limit 0.30, p95 0.25; baseline 0.20)`.
pub fn describe(c: &EnvelopeCheck) -> String {
    let v = |x: Option<f64>| match (x, c.metric.as_str()) {
        (None, _) => "not measured".to_string(),
        (Some(x), "mem") => format!("{:.1} MiB", x / (1024.0 * 1024.0)),
        (Some(x), _) => format!("{x:.2} cores"),
    };
    let l = |x: f64| v(Some(x));
    format!(
        "{} canary {} (limit {}, p95 {}; baseline {})",
        c.metric,
        v(c.canary),
        l(c.limit),
        l(c.p95),
        v(c.baseline)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(limit: f64) -> Envelope {
        Envelope {
            p50: limit / 2.0,
            p95: limit / 1.2,
            limit,
            source: Source::HourOfWeek,
        }
    }

    fn profile(cpu: Envelope, mem: Envelope) -> Result<ProfileEnvelope, String> {
        Ok(ProfileEnvelope {
            version: Some(3),
            at_unix_ms: 1_000,
            cpu,
            mem,
        })
    }

    const MIB: u64 = 1024 * 1024;

    fn used(baseline: (f64, u64), canary: (f64, u64)) -> ReplayUse {
        ReplayUse {
            baseline: CloneUse {
                cpu_ms: baseline.0,
                mem_bytes: Some(baseline.1 * MIB),
            },
            canary: CloneUse {
                cpu_ms: canary.0,
                mem_bytes: Some(canary.1 * MIB),
            },
            // The traffic took 10 s when recorded; replayed in 2 s.
            recorded_span_ms: 10_000,
            replay_ms: 2_000.0,
        }
    }

    fn metrics(r: &EnvelopeReport) -> Vec<&str> {
        r.findings().iter().map(|c| c.metric.as_str()).collect()
    }

    #[test]
    fn cpu_is_compared_at_the_recorded_pace_not_the_replays() {
        // 3 s of CPU in a 2 s replay is 1.5 cores, but 0.3 at the 10 s the traffic took.
        let u = used((1_000.0, 30), (3_000.0, 30));
        assert!((u.cores_at_recorded_pace(3_000.0) - 0.3).abs() < 1e-9);
        let r = compare(profile(env(0.5), env((64 * MIB) as f64)), u);
        assert!(r.findings().is_empty(), "{r:?}");
        let r = compare(profile(env(0.25), env((64 * MIB) as f64)), u);
        assert_eq!(metrics(&r), ["cpu"]);
        // A replay slower than the recording is spread over its own duration.
        let slow = ReplayUse {
            replay_ms: 20_000.0,
            ..u
        };
        assert!((slow.cores_at_recorded_pace(3_000.0) - 0.15).abs() < 1e-9);
        assert_eq!(ReplayUse::default().cores_at_recorded_pace(5.0), 0.0);
    }

    #[test]
    fn memory_beyond_the_limit_is_a_finding_with_the_figures() {
        let r = compare(
            profile(env(10.0), env((40 * MIB) as f64)),
            used((100.0, 30), (100.0, 90)),
        );
        assert_eq!(metrics(&r), ["mem"]);
        let text = describe(r.findings()[0]);
        assert!(
            text.contains("mem canary 90.0 MiB (limit 40.0 MiB"),
            "{text}"
        );
        assert!(text.contains("baseline 30.0 MiB"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"], "compared");
        assert_eq!(json["checks"][1]["metric"], "mem");
    }

    #[test]
    fn beyond_for_the_unchanged_baseline_too_is_not_the_changes_doing() {
        let r = compare(
            profile(env(10.0), env((40 * MIB) as f64)),
            used((100.0, 60), (100.0, 90)),
        );
        assert!(r.findings().is_empty());
        let EnvelopeReport::Compared { checks, .. } = &r else {
            panic!("{r:?}")
        };
        assert!(checks[1].canary_beyond() && checks[1].baseline_beyond());
        // Nor is a canary just past the limit with a baseline just below it.
        let r = compare(
            profile(env(10.0), env((40 * MIB) as f64)),
            used((100.0, 39), (100.0, 41)),
        );
        assert!(r.findings().is_empty(), "{r:?}");
        let r = compare(
            profile(env(10.0), env((40 * MIB) as f64)),
            used((100.0, 36), (100.0, 41)),
        );
        assert_eq!(metrics(&r), ["mem"]);
    }

    #[test]
    fn unmeasured_memory_and_empty_envelopes_raise_nothing() {
        let mut u = used((100.0, 0), (100.0, 0));
        u.canary.mem_bytes = None;
        let r = compare(profile(env(10.0), env(1.0)), u);
        assert!(r.findings().is_empty());
        let EnvelopeReport::Compared { checks, .. } = &r else {
            panic!("{r:?}")
        };
        assert!(describe(&checks[1]).contains("canary not measured"));
        // An envelope with no history, or a non-finite one, predicts nothing.
        let r = compare(
            profile(
                Envelope::EMPTY,
                Envelope {
                    limit: f64::INFINITY,
                    ..env(1.0)
                },
            ),
            u,
        );
        assert!(matches!(r, EnvelopeReport::Unavailable { .. }), "{r:?}");
        let r = compare(Err("too young".into()), u);
        assert_eq!(
            r,
            EnvelopeReport::Unavailable {
                why: "too young".into()
            }
        );
    }

    #[test]
    fn the_recorded_span_is_first_to_last() {
        let rec = |at| Record {
            seq: 0,
            at_unix_ms: at,
            client: "10.0.0.2:1000".parse().unwrap(),
            server: "10.0.0.1:80".parse().unwrap(),
            latency_ms: None,
            exchange: crate::capture::Exchange::Stream {
                to_server: crate::capture::Body::new(b"", 0),
                to_client: crate::capture::Body::new(b"", 0),
            },
        };
        assert_eq!(recorded_span_ms(&[]), 0);
        assert_eq!(recorded_span_ms(&[rec(5)]), 0);
        assert_eq!(recorded_span_ms(&[rec(9), rec(5), rec(7)]), 4);
    }
}
