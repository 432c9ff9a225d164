//! The resource model: seasonal buckets, and the calibrated forecast layer on top of them.
//!
//! # Model
//!
//! For each metric (CPU cores, memory bytes, disk and network bytes per second) the model answers
//! "how much will the primary use at time *t*?" with an [`Envelope`]: a median (`p50`), an upper
//! quantile (`p95`) and a provisioning `limit = p95 × (1 + headroom)`.
//!
//! Up to two hours after the last sample, `p95` is the calibrated quantile of the
//! [`super::forecast`] layer: a mixture of experts (last value, moving averages, the rolling
//! 24-hour window, the recent hour, yesterday at the same time, and the seasonal buckets below)
//! whose coverage converges on `coverage_target` (the service's class target, 95% by default).
//! Further ahead, and for `p50`, the seasonal buckets answer alone, as described next. The
//! default `headroom` is 0: the calibration already gives the coverage asked for.
//!
//! **Seasonal buckets.** Load on a service follows the clock, so history is kept per time bucket:
//! the 168 hours of the week (bucket 0 is Monday 00:00-01:00 UTC), the 24 hours of the day, and
//! one all-time bucket. A prediction uses the hour-of-week bucket of *t*; when that bucket holds
//! fewer than `min_samples_per_bucket` samples it falls back to the hour-of-day bucket, then to
//! the all-time bucket, and with no finished hour at all to the recent window alone ([`Source`]
//! says which one answered).
//!
//! **Quantile estimation with bounded memory.** Samples of the hour in progress are buffered (at
//! most `max_hour_samples`; beyond that the buffer is decimated, keeping every other sample, so
//! any sampling rate fits). When the hour ends, its exact p50, p95 and maximum become one *visit*
//! summary, appended to its hour-of-week, hour-of-day and all-time buckets. Each bucket is a ring
//! of the last few visits (`week_visits` = 3 weeks, `day_visits` = 7 days, `all_visits` = 48
//! hours), so memory is fixed — `4 × (168·3 + 24·7 + 48) = 2880` visit summaries plus a few short
//! windows, whatever the sampling rate — and so is the size of a version file. This was chosen
//! over a raw-sample reservoir (tens of thousands of values per version file, for no better
//! accuracy at hourly resolution) and over streaming estimators such as P² (they do not forget,
//! and converge slowly on the ~60 samples an hour-of-week bucket receives per week).
//!
//! From the visits, a bucket gives:
//! - its *level* `b50`: the recency-weighted mean of its visits' medians (weight
//!   `visit_decay^age`, age 0 = newest visit), so recent weeks dominate;
//! - its *spread*: the median, over the visits of both the hour-of-week and the hour-of-day bucket
//!   of *t*, of the relative spread `(p95 − p50) / p50`; then `b95 = b50 × (1 + spread)`. A
//!   one-off burst inflates one visit's p95; taking the median over up to ten visits keeps it
//!   from inflating a whole week of envelopes (on the benchmark's spiky trace this cuts mean waste
//!   from 24.9% to 20.6%, coverage staying at 99.4%), while a burst that recurs at that hour
//!   recurs in most visits and is kept. When the all-time bucket answers, the spread is the median over its own
//!   visits. (If a visit has a zero median the spread is undefined and `b95` is the weighted mean
//!   of the visits' p95.)
//!
//! **Fast adaptation.** Seasonal buckets alone would take a week to follow a change. Two
//! short-term terms correct them:
//! - the *level factor* `s`: the median, over the last `level_window` samples, of
//!   `observed / b50` (measured when each sample arrived, against the bucket level that answered
//!   then). When the primary suddenly runs at twice, or half, its usual level, `s` moves to 2, or
//!   0.5, within half a window and scales the seasonal envelope in both directions. It is clamped
//!   to `[1/level_clamp, level_clamp]`.
//! - the *recent peak*: the p95 of the last `recent_window` raw samples is a floor for the
//!   envelope's p95, so a ramp or burst the level factor has not caught yet is covered by the next
//!   prediction.
//!
//! So: `p50 = b50·s`, `p95 = max(b95·s, recent p95)`, `limit = p95·(1 + headroom)`.
//!
//! **Regime shifts.** When `s` stays outside `[1/shift_factor, shift_factor]` for
//! `shift_confirm` observations the shift is confirmed ([`Model::level_shift`], reported as drift
//! by [`crate::profile::drift`]); it ends after `s` has stayed within
//! `[1/√shift_factor, √shift_factor]` as long (hysteresis: a factor hovering at the edge is one
//! shift). While a shift lasts, every hour that completes *replaces* the history of its buckets
//! instead of joining it: old samples of exactly the buckets the new regime has been seen in are
//! dropped, and the level factor covers the hours not yet seen again. Rescaling every bucket at
//! once would be faster for a uniform shift but wrong for a local one: a first weekend, seen by a
//! model that only knows weekdays, would rescale all the weekdays too. After a coverage drop the
//! learner asks for the same renewal of the current hour's buckets ([`Model::renew_current`]).
//!
//! **Storage.** The model is serialised as-is into each profile version. Stored values are rounded
//! to 15 significant digits so a version survives a JSON round trip bit for bit (see `exact`).
//! Times are bucketed in UTC; a service following a local clock with daylight saving time sees its
//! pattern move by an hour twice a year, which the short-term terms cover while the buckets
//! relearn.
//!
//! The default parameters are the ones the benchmark (`cargo bench --bench profile`) runs with,
//! the same for every trace.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::forecast::{self, ForecastParams, MetricForecast};
use super::{Metric, Observation, PerMetric};

/// One hour, in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;
/// One day, in milliseconds.
pub const DAY_MS: u64 = 24 * HOUR_MS;
/// Hour-of-week buckets.
pub const WEEK_BUCKETS: usize = 168;
/// Hour-of-day buckets.
pub const DAY_BUCKETS: usize = 24;

/// Hard bounds on the ring sizes accepted from parameters or files, so an untrusted version file
/// cannot make the daemon allocate without limit.
const MAX_VISITS: usize = 1024;
const MAX_WINDOW: usize = 4096;

/// Errors of the model: invalid parameters or an inconsistent snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A parameter is outside its valid range.
    #[error("model parameter {name} = {value} is invalid: {expected}")]
    InvalidParam {
        /// Parameter name.
        name: &'static str,
        /// The rejected value, as text.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// A snapshot's structure does not match the model (wrong bucket count, oversized ring,
    /// non-finite number...).
    #[error("model snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

/// Tuning of the model. The defaults are the values the benchmark was run with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelParams {
    /// A bucket with fewer samples than this defers to the next coarser level.
    pub min_samples_per_bucket: u32,
    /// Safety margin above the calibrated quantile: `limit = p95 × (1 + headroom)`.
    pub headroom: f64,
    /// Visits (weeks) remembered per hour-of-week bucket.
    pub week_visits: usize,
    /// Visits (days) remembered per hour-of-day bucket.
    pub day_visits: usize,
    /// Visits (hours) remembered by the all-time bucket.
    pub all_visits: usize,
    /// Weight of a visit relative to the next newer one, in (0, 1].
    pub visit_decay: f64,
    /// Samples buffered for the hour in progress before decimation.
    pub max_hour_samples: usize,
    /// Samples over which the level factor is taken.
    pub level_window: usize,
    /// Bound of the level factor: it stays within `[1/level_clamp, level_clamp]`.
    pub level_clamp: f64,
    /// Raw samples whose p95 floors the envelope.
    pub recent_window: usize,
    /// A level factor beyond this (or below its inverse) is a shifted level.
    pub shift_factor: f64,
    /// Consecutive shifted observations that confirm a regime shift.
    pub shift_confirm: u32,
    /// Share of samples the calibrated quantile (`p95` of the envelope) should cover: the
    /// class's `coverage_target` (see [`super::forecast`]).
    pub coverage_target: f64,
    /// Step of the online calibration, relative to the mean absolute residual.
    pub calibration_step: f64,
    /// Softness of the expert mixture's weights.
    pub mix_temperature: f64,
    /// Half-life of the experts' discounted losses, hours.
    pub loss_halflife_h: f64,
    /// `c = floor_frac × level` in the forecast's transform `ln(x + c)`.
    pub floor_frac: f64,
    /// Loss of a missed sample when the mixture weighs its experts (a covered sample costs its
    /// waste, 0..1).
    pub miss_loss: f64,
    /// Experts the mixture may use, one bit each in the order of
    /// [`forecast::EXPERT_NAMES`].
    pub experts: u32,
    /// Learning rate of the quantile-regression expert one step ahead.
    pub quantile_rate: f64,
    /// Learning rate of the quantile-regression expert one hour ahead.
    pub quantile_rate_hour: f64,
    /// Largest relative step down when a forecast snaps onto a value the metric took in the
    /// last day (1: always onto the largest one at or below it).
    pub snap: f64,
    /// Largest relative step down when a forecast one step ahead that is above every value of
    /// the last day snaps onto the largest one.
    pub snap_above: f64,
    /// The same one hour ahead.
    pub snap_above_hour: f64,
    /// Whether the conditional layer ([`super::conditional`]) may give the forecast where it
    /// has been wasting less than the mixture.
    pub conditional: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            min_samples_per_bucket: 30,
            headroom: 0.0,
            week_visits: 3,
            day_visits: 7,
            all_visits: 48,
            visit_decay: 0.5,
            max_hour_samples: 240,
            level_window: 30,
            level_clamp: 8.0,
            recent_window: 5,
            shift_factor: 1.3,
            shift_confirm: 60,
            coverage_target: 0.95,
            calibration_step: 0.03,
            mix_temperature: 0.01,
            loss_halflife_h: 48.0,
            floor_frac: 0.05,
            miss_loss: 1.0,
            experts: (1 << forecast::EXPERTS) - 1,
            quantile_rate: 0.001,
            quantile_rate_hour: 0.0005,
            snap: 0.3,
            snap_above: 0.15,
            snap_above_hour: 0.0,
            conditional: true,
        }
    }
}

impl ModelParams {
    /// The forecast layer's part.
    pub fn forecast(&self) -> ForecastParams {
        ForecastParams {
            coverage_target: self.coverage_target,
            calibration_step: self.calibration_step,
            mix_temperature: self.mix_temperature,
            loss_halflife_h: self.loss_halflife_h,
            floor_frac: self.floor_frac,
            miss_loss: self.miss_loss,
            experts: self.experts,
            quantile_rate: [self.quantile_rate, self.quantile_rate_hour],
            snap: self.snap,
            snap_above: [self.snap_above, self.snap_above_hour],
            conditional: self.conditional,
        }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), ModelError> {
        fn bad(name: &'static str, value: impl ToString, expected: &'static str) -> ModelError {
            ModelError::InvalidParam {
                name,
                value: value.to_string(),
                expected,
            }
        }
        if !(self.headroom.is_finite() && (0.0..=10.0).contains(&self.headroom)) {
            return Err(bad("headroom", self.headroom, "between 0 and 10"));
        }
        if !(self.visit_decay.is_finite() && self.visit_decay > 0.0 && self.visit_decay <= 1.0) {
            return Err(bad("visit_decay", self.visit_decay, "in (0, 1]"));
        }
        if !(self.level_clamp.is_finite() && self.level_clamp >= 1.0 && self.level_clamp <= 1000.0)
        {
            return Err(bad("level_clamp", self.level_clamp, "between 1 and 1000"));
        }
        if !(self.shift_factor.is_finite() && self.shift_factor > 1.0) {
            return Err(bad(
                "shift_factor",
                self.shift_factor,
                "a finite number above 1",
            ));
        }
        if !(self.coverage_target.is_finite() && (0.5..=0.999).contains(&self.coverage_target)) {
            return Err(bad(
                "coverage_target",
                self.coverage_target,
                "between 0.5 and 0.999",
            ));
        }
        for (name, v, lo, hi, expected) in [
            (
                "calibration_step",
                self.calibration_step,
                1e-4,
                1.0,
                "between 0.0001 and 1",
            ),
            (
                "mix_temperature",
                self.mix_temperature,
                1e-3,
                100.0,
                "between 0.001 and 100",
            ),
            (
                "loss_halflife_h",
                self.loss_halflife_h,
                0.1,
                1e4,
                "between 0.1 and 10000",
            ),
            (
                "floor_frac",
                self.floor_frac,
                1e-6,
                1.0,
                "between 0.000001 and 1",
            ),
            (
                "miss_loss",
                self.miss_loss,
                0.0,
                1000.0,
                "between 0 and 1000",
            ),
            (
                "quantile_rate",
                self.quantile_rate,
                0.0,
                1.0,
                "between 0 and 1",
            ),
            (
                "quantile_rate_hour",
                self.quantile_rate_hour,
                0.0,
                1.0,
                "between 0 and 1",
            ),
            ("snap", self.snap, 0.0, 1.0, "between 0 and 1"),
            ("snap_above", self.snap_above, 0.0, 1.0, "between 0 and 1"),
            (
                "snap_above_hour",
                self.snap_above_hour,
                0.0,
                1.0,
                "between 0 and 1",
            ),
        ] {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return Err(bad(name, v, expected));
            }
        }
        if self.experts == 0 || self.experts >= 1 << forecast::EXPERTS {
            return Err(bad(
                "experts",
                self.experts,
                "a non-empty set of the 9 experts' bits (1..=511)",
            ));
        }
        if !(1..=100_000).contains(&self.shift_confirm) {
            return Err(bad(
                "shift_confirm",
                self.shift_confirm,
                "between 1 and 100000",
            ));
        }
        for (name, v) in [
            ("week_visits", self.week_visits),
            ("day_visits", self.day_visits),
            ("all_visits", self.all_visits),
        ] {
            if v == 0 || v > MAX_VISITS {
                return Err(bad(name, v, "between 1 and 1024"));
            }
        }
        for (name, v) in [
            ("max_hour_samples", self.max_hour_samples),
            ("level_window", self.level_window),
            ("recent_window", self.recent_window),
        ] {
            if !(2..=MAX_WINDOW).contains(&v) {
                return Err(bad(name, v, "between 2 and 4096"));
            }
        }
        Ok(())
    }
}

/// Which history answered a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The hour-of-week bucket of the timestamp.
    HourOfWeek,
    /// The hour-of-day bucket (the hour-of-week bucket had too few samples).
    HourOfDay,
    /// The all-time bucket (both seasonal buckets had too few samples).
    AllTime,
    /// No finished hour yet: the recent window alone.
    Recent,
    /// Nothing observed yet: the envelope is zero.
    Empty,
}

/// Predicted usage of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Median.
    pub p50: f64,
    /// Upper quantile: the calibrated quantile at the coverage target (95% by default) within
    /// two hours of the last sample, the seasonal 95th percentile beyond.
    pub p95: f64,
    /// Provisioning limit: `p95 × (1 + headroom)`.
    pub limit: f64,
    /// Which history answered.
    pub source: Source,
}

impl Envelope {
    /// The envelope of a predictor that knows nothing.
    pub const EMPTY: Envelope = Envelope {
        p50: 0.0,
        p95: 0.0,
        limit: 0.0,
        source: Source::Empty,
    };
}

/// Envelopes of all metrics at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The time predicted for.
    pub ts_unix_ms: u64,
    /// One envelope per metric.
    pub envelopes: PerMetric<Envelope>,
}

/// Summary of one hour of samples, the unit a bucket remembers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Visit {
    /// Unix hour (`ts / 3600000`) the samples belong to.
    pub hour: u64,
    /// Samples summarised.
    pub n: u32,
    /// Median of the hour.
    pub p50: f64,
    /// 95th percentile of the hour.
    pub p95: f64,
    /// Maximum of the hour.
    pub max: f64,
}

/// A ring of visits, newest last.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Remembered visits, oldest first.
    pub visits: VecDeque<Visit>,
}

/// A bucket's recency-weighted quantiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketEstimate {
    /// Weighted p50.
    pub p50: f64,
    /// Weighted p95.
    pub p95: f64,
    /// Samples summarised by the visits.
    pub samples: u64,
}

impl Bucket {
    fn push(&mut self, visit: Visit, cap: usize) {
        while self.visits.len() >= cap {
            self.visits.pop_front();
        }
        self.visits.push_back(visit);
    }

    /// Samples summarised by the remembered visits.
    pub fn samples(&self) -> u64 {
        self.visits.iter().map(|v| u64::from(v.n)).sum()
    }

    /// Recency-weighted quantiles, `None` for an empty bucket.
    pub fn estimate(&self, decay: f64) -> Option<BucketEstimate> {
        let mut w_sum = 0.0;
        let mut p50 = 0.0;
        let mut p95 = 0.0;
        let mut w = 1.0;
        for v in self.visits.iter().rev() {
            // A visit cut short (daemon restart) says less about its hour than a full one.
            let weight = w * f64::from(v.n.min(30));
            w_sum += weight;
            p50 += weight * v.p50;
            p95 += weight * v.p95;
            w *= decay;
        }
        (w_sum > 0.0).then(|| BucketEstimate {
            p50: p50 / w_sum,
            p95: p95 / w_sum,
            samples: self.samples(),
        })
    }
}

/// Samples of the hour in progress, decimated when the buffer is full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HourBuffer {
    /// Unix hour being accumulated.
    pub hour: u64,
    /// Keep one sample in `stride`.
    pub stride: u32,
    /// Samples offered this hour, kept or not.
    pub seen: u32,
    /// Kept samples.
    pub samples: Vec<f64>,
}

impl HourBuffer {
    fn new(hour: u64) -> Self {
        HourBuffer {
            hour,
            stride: 1,
            seen: 0,
            samples: Vec::new(),
        }
    }

    fn push(&mut self, v: f64, cap: usize) {
        if self.seen.is_multiple_of(self.stride) {
            self.samples.push(v);
            if self.samples.len() >= cap {
                // Keep every other sample and halve the rate from now on: memory stays bounded
                // and the kept samples still span the whole hour evenly.
                let mut i = 0;
                self.samples.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.stride = self.stride.saturating_mul(2);
            }
        }
        self.seen = self.seen.saturating_add(1);
    }

    fn summary(&self) -> Option<Visit> {
        if self.samples.is_empty() {
            return None;
        }
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        Some(Visit {
            hour: self.hour,
            n: self.seen,
            p50: exact(quantile_sorted(&s, 0.5)),
            p95: exact(quantile_sorted(&s, 0.95)),
            max: s[s.len() - 1],
        })
    }
}

/// Everything the model knows about one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricModel {
    /// Hour-of-week buckets, Monday 00:00 UTC first.
    pub week: Vec<Bucket>,
    /// Hour-of-day buckets, 00:00 UTC first.
    pub day: Vec<Bucket>,
    /// The all-time bucket.
    pub all: Bucket,
    /// The hour in progress.
    pub hour: Option<HourBuffer>,
    /// Last raw samples, newest last.
    pub recent: VecDeque<f64>,
    /// Last `observed / bucket p50` ratios, newest last.
    pub ratios: VecDeque<f64>,
    /// The bucket level the ratios were measured against.
    pub ratio_source: Option<Source>,
    /// Consecutive observations with the level factor outside the shift band (while not in a
    /// shift), or back inside the calm band (while in one).
    pub shift_run: u32,
    /// A confirmed regime shift is in progress.
    pub in_shift: bool,
    /// The next completed hour replaces the older visits of its buckets.
    pub renew_next: bool,
}

impl MetricModel {
    fn new() -> Self {
        MetricModel {
            week: vec![Bucket::default(); WEEK_BUCKETS],
            day: vec![Bucket::default(); DAY_BUCKETS],
            all: Bucket::default(),
            hour: None,
            recent: VecDeque::new(),
            ratios: VecDeque::new(),
            ratio_source: None,
            shift_run: 0,
            in_shift: false,
            renew_next: false,
        }
    }

    /// The seasonal estimate for `ts`, following the fallback order.
    fn base(&self, ts: u64, p: &ModelParams) -> Option<(Source, BucketEstimate)> {
        let min = u64::from(p.min_samples_per_bucket);
        let week = &self.week[hour_of_week(ts)];
        let day = &self.day[hour_of_day(ts)];
        let (source, bucket) = [
            (Source::HourOfWeek, week),
            (Source::HourOfDay, day),
            (Source::AllTime, &self.all),
        ]
        .into_iter()
        .find(|(_, b)| b.samples() >= min)
        // Young model: whatever the all-time bucket has rather than nothing.
        .unwrap_or((Source::AllTime, &self.all));
        let mut e = bucket.estimate(p.visit_decay)?;
        let spread = match source {
            Source::HourOfWeek | Source::HourOfDay => {
                // The same hour's visits from both buckets, each once.
                let extra = day
                    .visits
                    .iter()
                    .filter(|d| !week.visits.iter().any(|w| w.hour == d.hour));
                median_spread(week.visits.iter().chain(extra))
            }
            _ => median_spread(self.all.visits.iter()),
        };
        if let Some(spread) = spread {
            e.p95 = e.p50 * (1.0 + spread);
        }
        Some((source, e))
    }

    fn level_factor(&self, p: &ModelParams) -> f64 {
        if self.ratios.is_empty() {
            return 1.0;
        }
        let mut r: Vec<f64> = self.ratios.iter().copied().collect();
        r.sort_by(f64::total_cmp);
        quantile_sorted(&r, 0.5).clamp(1.0 / p.level_clamp, p.level_clamp)
    }

    fn recent_quantiles(&self) -> Option<(f64, f64)> {
        if self.recent.is_empty() {
            return None;
        }
        let mut r: Vec<f64> = self.recent.iter().copied().collect();
        r.sort_by(f64::total_cmp);
        Some((quantile_sorted(&r, 0.5), quantile_sorted(&r, 0.95)))
    }

    fn predict(&self, ts: u64, p: &ModelParams) -> Envelope {
        let recent = self.recent_quantiles();
        let (source, p50, p95) = match (self.base(ts, p), recent) {
            (Some((source, e)), recent) => {
                let s = self.level_factor(p);
                let floor = recent.map_or(0.0, |(_, r95)| r95);
                (source, e.p50 * s, (e.p95 * s).max(floor))
            }
            (None, Some((r50, r95))) => (Source::Recent, r50, r95),
            (None, None) => return Envelope::EMPTY,
        };
        Envelope {
            p50,
            p95,
            limit: p95 * (1.0 + p.headroom),
            source,
        }
    }

    fn observe(&mut self, ts: u64, v: f64, p: &ModelParams) {
        let v = exact(v);
        if let Some((source, e)) = self.base(ts, p) {
            // Ratios against different bucket levels are not comparable: start over.
            if self.ratio_source.replace(source) != Some(source) {
                self.ratios.clear();
                self.shift_run = 0;
            }
            if e.p50 > 0.0 {
                push_bounded(&mut self.ratios, exact(v / e.p50), p.level_window);
            }
            // Hysteresis: a shift starts outside [1/f, f] and ends only back inside
            // [1/sqrt(f), sqrt(f)], so a factor hovering near the edge is one shift, not many.
            let f = self.level_factor(p).ln().abs();
            let limit = p.shift_factor.ln();
            let counts = if self.in_shift {
                f < limit / 2.0
            } else {
                f > limit
            };
            self.shift_run = if counts {
                self.shift_run.saturating_add(1)
            } else {
                0
            };
            if self.shift_run >= p.shift_confirm {
                self.in_shift = !self.in_shift;
                self.shift_run = 0;
            }
        }
        push_bounded(&mut self.recent, v, p.recent_window);

        let hour = ts / HOUR_MS;
        if self.hour.as_ref().is_some_and(|h| h.hour != hour) {
            // Any change of hour (forward, or backward after a clock step) closes the visit.
            if let Some(visit) = self.hour.take().and_then(|h| h.summary()) {
                // During a confirmed shift (or after a coverage drop) the hour just seen
                // describes the current regime better than anything its buckets remember.
                let renew = self.renew_next || self.in_shift;
                self.renew_next = false;
                let ts_visit = visit.hour * HOUR_MS;
                let buckets = [
                    (&mut self.week[hour_of_week(ts_visit)], p.week_visits),
                    (&mut self.day[hour_of_day(ts_visit)], p.day_visits),
                    (&mut self.all, p.all_visits),
                ];
                for (bucket, cap) in buckets {
                    if renew {
                        bucket.visits.clear();
                    }
                    bucket.push(visit, cap);
                }
            }
        }
        self.hour
            .get_or_insert_with(|| HourBuffer::new(hour))
            .push(v, p.max_hour_samples);
    }

    /// The seasonal p95 for `ts` (level factor and recent floor included, no headroom), the
    /// forecast layer's `seasonal` expert.
    fn seasonal(&self, ts: u64, p: &ModelParams) -> Option<f64> {
        let e = self.predict(ts, p);
        (e.source != Source::Empty).then_some(e.p95)
    }

    fn shifted(&self, p: &ModelParams) -> Option<f64> {
        self.in_shift.then(|| self.level_factor(p))
    }

    fn validate(&self, p: &ModelParams) -> Result<(), String> {
        if self.week.len() != WEEK_BUCKETS || self.day.len() != DAY_BUCKETS {
            return Err(format!(
                "expected {WEEK_BUCKETS} hour-of-week and {DAY_BUCKETS} hour-of-day buckets, found {} and {}",
                self.week.len(),
                self.day.len()
            ));
        }
        let rings = self
            .week
            .iter()
            .map(|b| (b, p.week_visits))
            .chain(self.day.iter().map(|b| (b, p.day_visits)))
            .chain(std::iter::once((&self.all, p.all_visits)));
        for (b, cap) in rings {
            if b.visits.len() > cap {
                return Err(format!(
                    "bucket holds {} visits, limit {cap}",
                    b.visits.len()
                ));
            }
            for v in &b.visits {
                if ![v.p50, v.p95, v.max]
                    .iter()
                    .all(|x| x.is_finite() && *x >= 0.0)
                {
                    return Err(format!(
                        "visit of hour {} has a non-finite or negative value",
                        v.hour
                    ));
                }
            }
        }
        if self.recent.len() > p.recent_window || self.ratios.len() > p.level_window {
            return Err("recent window larger than its parameter".into());
        }
        if let Some(h) = &self.hour {
            if h.samples.len() > p.max_hour_samples || h.stride == 0 {
                return Err("hour buffer larger than max_hour_samples".into());
            }
        }
        let finite = |x: &f64| x.is_finite() && *x >= 0.0;
        let hour_ok = self
            .hour
            .as_ref()
            .is_none_or(|h| h.samples.iter().all(finite));
        if !(self.recent.iter().all(finite) && self.ratios.iter().all(finite) && hour_ok) {
            return Err("non-finite or negative sample".into());
        }
        Ok(())
    }
}

/// The learned resource model of one service. See the [module documentation](self) for the
/// method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ModelRepr")]
pub struct Model {
    params: ModelParams,
    metrics: PerMetric<MetricModel>,
    /// The calibrated forecast layer ([`super::forecast`]).
    forecast: PerMetric<MetricForecast>,
    observations: u64,
}

/// The unchecked shape of a snapshot; [`Model`] is only built from it after validation.
#[derive(Deserialize)]
struct ModelRepr {
    params: ModelParams,
    metrics: PerMetric<MetricModel>,
    /// Absent from versions written before the forecast layer: it then starts empty.
    #[serde(default)]
    forecast: StoredForecast,
    observations: u64,
}

/// The forecast layer as a version stores it: in this release's layout, or in an earlier one
/// (before the quantile-regression expert: eight experts' margins, no regression), which is
/// dropped and relearned within a day; the seasonal buckets are kept either way.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredForecast {
    Current(Box<PerMetric<MetricForecast>>),
    Earlier(serde::de::IgnoredAny),
}

impl Default for StoredForecast {
    fn default() -> Self {
        StoredForecast::Current(Box::default())
    }
}

impl TryFrom<ModelRepr> for Model {
    type Error = ModelError;

    fn try_from(r: ModelRepr) -> Result<Self, ModelError> {
        r.params.validate()?;
        for (m, mm) in r.metrics.iter() {
            mm.validate(&r.params)
                .map_err(|e| ModelError::Inconsistent(format!("{m}: {e}")))?;
        }
        let mut forecast = match r.forecast {
            StoredForecast::Current(f) => *f,
            StoredForecast::Earlier(_) => PerMetric::default(),
        };
        for m in Metric::ALL {
            forecast
                .get_mut(m)
                .restore()
                .map_err(|e| ModelError::Inconsistent(format!("{m}: {e}")))?;
        }
        Ok(Model {
            params: r.params,
            metrics: r.metrics,
            forecast,
            observations: r.observations,
        })
    }
}

impl Model {
    /// An empty model.
    pub fn new(mut params: ModelParams) -> Result<Self, ModelError> {
        params.validate()?;
        for x in [
            &mut params.headroom,
            &mut params.visit_decay,
            &mut params.level_clamp,
            &mut params.shift_factor,
        ] {
            *x = exact(*x);
        }
        Ok(Model {
            params,
            metrics: PerMetric::from_fn(|_| MetricModel::new()),
            forecast: PerMetric::default(),
            observations: 0,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// Observations learned so far.
    pub fn observations(&self) -> u64 {
        self.observations
    }

    /// Learns one observation's resource usage.
    pub fn observe(&mut self, obs: &Observation) {
        let fp = self.params.forecast();
        let ts = obs.ts_unix_ms;
        for m in Metric::ALL {
            let v = obs.value(m);
            let seasonal_now = self.metrics.get(m).seasonal(ts, &self.params);
            let mm = self.metrics.get_mut(m);
            mm.observe(ts, v, &self.params);
            let mm = &*mm;
            let params = &self.params;
            self.forecast.get_mut(m).observe(
                ts,
                v,
                seasonal_now,
                || mm.seasonal(ts + forecast::HOUR_AHEAD_MS, params),
                &fp,
            );
        }
        self.observations += 1;
    }

    /// The envelopes expected at `ts_unix_ms`: the buckets' median, and the calibrated quantile
    /// of the forecast layer as `p95`.
    pub fn predict(&self, ts_unix_ms: u64) -> Prediction {
        let fp = self.params.forecast();
        Prediction {
            ts_unix_ms,
            envelopes: PerMetric::from_fn(|m| {
                let seasonal = self.metrics.get(m).predict(ts_unix_ms, &self.params);
                let known = seasonal.source != Source::Empty;
                let Some(q) =
                    self.forecast
                        .get(m)
                        .predict(ts_unix_ms, known.then_some(seasonal.p95), &fp)
                else {
                    // Nothing seen, or a target beyond the calibrated horizons.
                    return seasonal;
                };
                Envelope {
                    p50: seasonal.p50.min(q),
                    p95: q,
                    limit: q * (1.0 + self.params.headroom),
                    source: seasonal.source,
                }
            }),
        }
    }

    /// The forecast layer of `metric` (calibration state, for reports and tests).
    pub fn forecast(&self, metric: Metric) -> &MetricForecast {
        self.forecast.get(metric)
    }

    /// Sets the coverage the calibrated quantile converges on (the service's class target).
    pub fn set_coverage_target(&mut self, target: f64) -> Result<(), ModelError> {
        let mut p = self.params.clone();
        p.coverage_target = target;
        p.validate()?;
        self.params = p;
        Ok(())
    }

    /// The current level factor of `metric` (1 = the primary runs as its buckets say).
    pub fn level_factor(&self, metric: Metric) -> f64 {
        self.metrics.get(metric).level_factor(&self.params)
    }

    /// The seasonal envelope of one hour-of-week bucket (0 = Monday 00:00 UTC), without the
    /// short-term corrections; `None` if the bucket is empty or `hour_of_week >= 168`.
    pub fn bucket_envelope(&self, metric: Metric, hour_of_week: usize) -> Option<Envelope> {
        let b = self.metrics.get(metric).week.get(hour_of_week)?;
        let e = b.estimate(self.params.visit_decay)?;
        Some(Envelope {
            p50: e.p50,
            p95: e.p95,
            limit: e.p95 * (1.0 + self.params.headroom),
            source: Source::HourOfWeek,
        })
    }

    /// `Some(level factor)` while `metric` runs in a confirmed regime shift: the level factor
    /// has stayed outside `[1/shift_factor, shift_factor]` for `shift_confirm` observations.
    pub fn level_shift(&self, metric: Metric) -> Option<f64> {
        self.metrics.get(metric).shifted(&self.params)
    }

    /// Makes the buckets of the hour in progress forget their older visits when it completes
    /// (used after a coverage drop: whatever those buckets remember no longer fits).
    pub fn renew_current(&mut self, metric: Metric) {
        self.metrics.get_mut(metric).renew_next = true;
    }
}

/// Hour of the week of a timestamp, 0 = Monday 00:00-01:00 UTC.
pub fn hour_of_week(ts_unix_ms: u64) -> usize {
    let day = ts_unix_ms / DAY_MS;
    // 1970-01-01 was a Thursday: day 0 is weekday 3 when Monday is 0.
    let weekday = (day + 3) % 7;
    (weekday * 24 + (ts_unix_ms / HOUR_MS) % 24) as usize
}

/// Hour of the day of a timestamp, UTC.
pub fn hour_of_day(ts_unix_ms: u64) -> usize {
    ((ts_unix_ms / HOUR_MS) % 24) as usize
}

/// Rounds a value to 15 significant digits (and magnitudes below 1e-7 to 0) so that it survives
/// a JSON round trip bit for bit. serde_json's default float parser is only exact for decimals
/// whose digits fit in 53 bits with at most 22 decimal places; profile versions are compared for
/// equality (rollback, idempotent pushes, sync conflicts), so every float the model stores goes
/// through here. Inputs are bounded by [`super::MAX_VALUE`].
pub(crate) fn exact(x: f64) -> f64 {
    if !x.is_finite() || x.abs() < 1e-7 {
        return 0.0;
    }
    format!("{x:.14e}").parse().unwrap_or(0.0)
}

/// Median of the visits' relative spread `(p95 - p50) / p50`; `None` if there are no visits or
/// one has a zero median (the spread is then undefined).
fn median_spread<'a>(visits: impl Iterator<Item = &'a Visit>) -> Option<f64> {
    let mut spreads = Vec::new();
    for v in visits {
        if v.p50 <= 0.0 {
            return None;
        }
        spreads.push((v.p95 - v.p50) / v.p50);
    }
    if spreads.is_empty() {
        return None;
    }
    spreads.sort_by(f64::total_cmp);
    Some(quantile_sorted(&spreads, 0.5))
}

/// Quantile `q` of an ascending, non-empty slice, linearly interpolated.
pub(crate) fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    debug_assert!(!sorted.is_empty());
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

fn push_bounded(q: &mut VecDeque<f64>, v: f64, cap: usize) {
    while q.len() >= cap {
        q.pop_front();
    }
    q.push_back(v);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::profile::replay;
    use crate::profile::synthetic::{self, Shape, TraceSpec, TRACE_START_UNIX_MS};
    use crate::profile::{Learner, LearnerParams};

    const MIN: u64 = 60_000;

    fn obs(ts: u64, cpu: f64) -> Observation {
        Observation {
            ts_unix_ms: ts,
            cpu_cores: cpu,
            mem_bytes: 1 << 30,
            disk_bytes_per_s: 1e6,
            net_bytes_per_s: 1e6,
            config: BTreeMap::new(),
            peers: Vec::new(),
        }
    }

    #[test]
    fn hour_of_week_starts_monday_midnight_utc() {
        // TRACE_START_UNIX_MS is Monday 2024-01-01 00:00 UTC.
        assert_eq!(hour_of_week(TRACE_START_UNIX_MS), 0);
        assert_eq!(
            hour_of_week(TRACE_START_UNIX_MS + 9 * HOUR_MS + 59 * MIN),
            9
        );
        assert_eq!(
            hour_of_week(TRACE_START_UNIX_MS + 6 * DAY_MS + 23 * HOUR_MS),
            167
        );
        assert_eq!(hour_of_week(TRACE_START_UNIX_MS + 7 * DAY_MS), 0);
        assert_eq!(
            hour_of_day(TRACE_START_UNIX_MS + 3 * DAY_MS + 5 * HOUR_MS),
            5
        );
    }

    #[test]
    fn learns_the_daily_cycle_of_a_synthetic_trace() {
        let trace = synthetic::generate(&TraceSpec {
            shape: Shape::Diurnal,
            days: 4,
            step_ms: MIN,
            seed: 7,
        });
        let mut learner = Learner::new(LearnerParams::default()).unwrap();
        let result = replay::replay(&trace.observations, None, &mut learner, 0).score(0.0);
        assert!(result.report.coverage >= 0.90, "{:?}", result.report);
        assert!(
            result.report.metrics.cpu.coverage >= 0.90,
            "{:?}",
            result.report
        );
        // Not covering by over-provisioning everything.
        assert!(result.report.mean_waste <= 0.30, "{:?}", result.report);

        // The cycle itself was learned: 15:00 (peak) needs far more than 03:00 (trough),
        // looking a day ahead, from the hour-of-day buckets.
        let day5 = TRACE_START_UNIX_MS + 4 * DAY_MS;
        let peak = learner
            .predict(day5 + 15 * HOUR_MS + 30 * MIN)
            .envelopes
            .cpu;
        let trough = learner.predict(day5 + 3 * HOUR_MS + 30 * MIN).envelopes.cpu;
        assert_eq!(peak.source, Source::HourOfDay);
        assert!(
            peak.p50 > 2.5 * trough.p50,
            "peak {peak:?} trough {trough:?}"
        );
        // The synthetic peak is 2 cores x 1.6 = 3.2.
        assert!((2.8..3.6).contains(&peak.p50), "{peak:?}");
    }

    #[test]
    fn falls_back_from_hour_of_week_to_hour_of_day_to_all_time() {
        let mut m = Model::new(ModelParams::default()).unwrap();
        let monday10 = TRACE_START_UNIX_MS + 10 * HOUR_MS;
        for i in 0..60 {
            m.observe(&obs(monday10 + i * MIN, 1.0));
        }
        // Closes the 10:00 hour.
        m.observe(&obs(monday10 + HOUR_MS, 1.0));

        let next_week = monday10 + 7 * DAY_MS + 30 * MIN;
        assert_eq!(
            m.predict(next_week).envelopes.cpu.source,
            Source::HourOfWeek
        );
        let tuesday10 = monday10 + DAY_MS + 30 * MIN;
        assert_eq!(m.predict(tuesday10).envelopes.cpu.source, Source::HourOfDay);
        let tuesday12 = monday10 + DAY_MS + 2 * HOUR_MS;
        assert_eq!(m.predict(tuesday12).envelopes.cpu.source, Source::AllTime);
    }

    #[test]
    fn a_bucket_below_min_samples_defers_to_the_next_level() {
        let params = ModelParams {
            min_samples_per_bucket: 30,
            ..ModelParams::default()
        };
        let mut m = Model::new(params).unwrap();
        let monday = TRACE_START_UNIX_MS;
        // Tuesday 10:00: a full hour at 4 cores.
        for i in 0..60 {
            m.observe(&obs(monday + DAY_MS + 10 * HOUR_MS + i * MIN, 4.0));
        }
        // Wednesday 10:00: only 10 samples at 1 core, closed by a sample at 11:00.
        for i in 0..10 {
            m.observe(&obs(monday + 2 * DAY_MS + 10 * HOUR_MS + i * MIN, 1.0));
        }
        m.observe(&obs(monday + 2 * DAY_MS + 11 * HOUR_MS, 1.0));
        // Next Wednesday 10:00: its hour-of-week bucket has 10 < 30 samples; the hour-of-day
        // bucket has 70, so it answers.
        let p = m.predict(monday + 9 * DAY_MS + 10 * HOUR_MS).envelopes.cpu;
        assert_eq!(p.source, Source::HourOfDay);
    }

    #[test]
    fn empty_model_predicts_nothing_then_the_recent_window() {
        let mut m = Model::new(ModelParams::default()).unwrap();
        let t = TRACE_START_UNIX_MS;
        assert_eq!(m.predict(t).envelopes.cpu, Envelope::EMPTY);
        for i in 0..5 {
            m.observe(&obs(t + i * MIN, 2.0));
        }
        let e = m.predict(t + 5 * MIN).envelopes.cpu;
        assert_eq!(e.source, Source::Recent);
        // A constant: the calibrated quantile is that constant (to its tracking step).
        assert!((e.limit - 2.0).abs() < 1e-3, "{e:?}");
        // Beyond the calibrated horizons the seasonal envelope answers (here the recent window).
        let far = m.predict(t + 5 * HOUR_MS).envelopes.cpu;
        assert_eq!((far.p95, far.limit), (2.0, 2.0));
    }

    #[test]
    fn level_factor_follows_a_step_and_the_shift_renews_buckets() {
        let mut m = Model::new(ModelParams::default()).unwrap();
        let t0 = TRACE_START_UNIX_MS;
        // Two days at 1 core, then 3 cores from day 2 onwards.
        for i in 0..(2 * 24 * 60) {
            m.observe(&obs(t0 + i * MIN, 1.0));
        }
        assert_eq!(m.level_factor(Metric::Cpu), 1.0);
        let t1 = t0 + 2 * DAY_MS;
        for i in 0..(3 * 60) {
            m.observe(&obs(t1 + i * MIN, 3.0));
        }
        assert!((m.level_factor(Metric::Cpu) - 3.0).abs() < 1e-9);
        assert!(m.level_shift(Metric::Cpu).is_some());
        // Predictions already follow the new level...
        let e = m.predict(t1 + 3 * HOUR_MS).envelopes.cpu;
        assert!(e.p50 > 2.9 && e.limit >= 2.99, "{e:?}");
        // ...and the hours completed during the shift replaced their buckets' history.
        let day = &m.metrics.cpu.day[hour_of_day(t1 + HOUR_MS)];
        assert_eq!(day.visits.len(), 1);
        assert_eq!(day.visits[0].p50, 3.0);
    }

    #[test]
    fn hour_buffer_stays_bounded_at_any_sampling_rate() {
        let params = ModelParams {
            max_hour_samples: 64,
            ..ModelParams::default()
        };
        let mut m = Model::new(params).unwrap();
        let t = TRACE_START_UNIX_MS;
        for i in 0..10_000u64 {
            m.observe(&obs(t + i * 300, (i % 100) as f64));
        }
        let hour = m.metrics.cpu.hour.as_ref().unwrap();
        assert!(hour.samples.len() < 64);
        assert_eq!(hour.seen, 10_000);
        // Decimation kept the spread of the values.
        let v = hour.summary().unwrap();
        assert!(v.p50 > 30.0 && v.p50 < 70.0 && v.p95 > 85.0, "{v:?}");
    }

    #[test]
    fn snapshot_round_trips_bit_for_bit() {
        let trace = synthetic::generate(&TraceSpec {
            shape: Shape::Spiky,
            days: 2,
            step_ms: MIN,
            seed: 11,
        });
        let mut m = Model::new(ModelParams::default()).unwrap();
        for o in &trace.observations {
            m.observe(o);
        }
        let json = serde_json::to_string(&m).unwrap();
        let back: Model = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }

    #[test]
    fn inconsistent_snapshots_are_rejected() {
        let m = Model::new(ModelParams::default()).unwrap();
        let mut v = serde_json::to_value(&m).unwrap();
        v["metrics"]["cpu"]["week"] = serde_json::json!([]);
        let err = serde_json::from_value::<Model>(v).unwrap_err();
        assert!(err.to_string().contains("hour-of-week"), "{err}");

        let mut v = serde_json::to_value(&m).unwrap();
        v["params"]["headroom"] = serde_json::json!(-1.0);
        assert!(serde_json::from_value::<Model>(v).is_err());

        let mut v = serde_json::to_value(&m).unwrap();
        v["metrics"]["mem"]["recent"] = serde_json::json!(vec![1.0; 100]);
        assert!(serde_json::from_value::<Model>(v).is_err());
    }

    #[test]
    fn a_forecast_state_of_an_earlier_layout_is_relearned() {
        // A version written before the quantile-regression expert: its heads have no
        // regression. It loads; the forecast layer starts over, the seasonal buckets stay.
        let trace = synthetic::generate(&TraceSpec {
            shape: Shape::Diurnal,
            days: 1,
            step_ms: MIN,
            seed: 5,
        });
        let mut m = Model::new(ModelParams::default()).unwrap();
        for o in &trace.observations {
            m.observe(o);
        }
        let mut v = serde_json::to_value(&m).unwrap();
        for metric in ["cpu", "mem", "disk", "net"] {
            for head in v["forecast"][metric]["heads"].as_array_mut().unwrap() {
                head.as_object_mut().unwrap().remove("regression");
            }
        }
        let back: Model = serde_json::from_value(v).unwrap();
        assert_eq!(back.metrics, m.metrics);
        assert_eq!(back.observations, m.observations);
        assert_eq!(back.forecast(Metric::Cpu), &MetricForecast::default());
    }

    #[test]
    fn a_version_without_the_conditional_layer_loads_and_relearns_it() {
        // A version written before the conditional layer: its heads have no `conditional`,
        // `choice` or `conditional_miss`. It loads with the layer empty, everything else kept.
        let trace = synthetic::generate(&TraceSpec {
            shape: Shape::Spiky,
            days: 2,
            step_ms: MIN,
            seed: 6,
        });
        let (learned, rest) = trace.observations.split_at(trace.observations.len() - 600);
        let mut m = Model::new(ModelParams::default()).unwrap();
        for o in learned {
            m.observe(o);
        }
        assert!(!m.forecast(Metric::Cpu).heads[0].conditional.is_empty());
        let mut v = serde_json::to_value(&m).unwrap();
        for metric in ["cpu", "mem", "disk", "net"] {
            for head in v["forecast"][metric]["heads"].as_array_mut().unwrap() {
                let head = head.as_object_mut().unwrap();
                for key in ["conditional", "choice", "conditional_miss"] {
                    assert!(head.remove(key).is_some(), "{key}");
                }
            }
        }
        let mut back: Model = serde_json::from_value(v).unwrap();
        assert_eq!(back.metrics, m.metrics);
        let (f, b) = (m.forecast(Metric::Cpu), back.forecast(Metric::Cpu));
        assert_eq!((&b.ring, b.samples), (&f.ring, f.samples));
        assert_eq!(b.heads[0].regression, f.heads[0].regression);
        assert!(b.heads[0].conditional.is_empty());
        // It forecasts at once (the mixture) and the layer fills again.
        assert!(back.predict(rest[0].ts_unix_ms).envelopes.cpu.limit > 0.0);
        for o in rest {
            back.observe(o);
        }
        assert!(!back.forecast(Metric::Cpu).heads[0].conditional.is_empty());
    }

    #[test]
    fn invalid_parameters_are_named() {
        let p = ModelParams {
            visit_decay: 0.0,
            ..ModelParams::default()
        };
        let err = Model::new(p).unwrap_err();
        assert!(err.to_string().contains("visit_decay"), "{err}");
    }

    #[test]
    fn exact_values_survive_json() {
        for x in [
            0.1,
            1.0 / 3.0,
            2.883741173632207e-8,
            4.2e9 + 0.123,
            9.9e13,
            1.8604080706020294,
        ] {
            let q = exact(x);
            let back: f64 = serde_json::from_str(&serde_json::to_string(&q).unwrap()).unwrap();
            assert_eq!(back, q, "{x}");
            assert!((q - x).abs() <= x.abs() * 1e-14 || q == 0.0);
        }
        assert_eq!(exact(f64::NAN), 0.0);
        assert_eq!(exact(1e-9), 0.0);
    }
}
