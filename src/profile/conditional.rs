//! Conditional empirical quantiles: what followed the same situation before.
//!
//! # Why
//!
//! The experts of [`super::forecast`] are levels plus a margin: each says "about this much,
//! give or take its usual error". On real VM traces much of a sample's fate is told by the
//! *situation* rather than the level: a metric that alternates between 0 and a value from one
//! sample to the next is 0 after a non-zero sample and non-zero after a 0; a counter that
//! sits at its floor stays there unless a burst starts; after a burst the next sample is
//! anywhere. A level with a margin covers all of these with one spread, and wastes the spread
//! where the situation says there is none. (On the Bitbrains traces a sample at 0 under a
//! positive limit is a 100% waste, and such samples are common: idle CPUs, disks and networks.)
//!
//! # Method
//!
//! The situation is a *context*: where the last sample sits in the last day's distribution,
//! one of [`BINS`] bins (exactly 0, then rank bins up to the window's p25, p50, p75, p90, p97,
//! above). Per context the layer keeps the last [`CAPACITY`] outcomes that followed it (the
//! sample one step, or one hour, later), as they were. The forecast is chosen among those
//! outcomes (so it is a value the metric took: exactly 0, a counter's step) by minimising the
//! expected cost
//!
//! `Σ_{e ≤ c} (1 − e/c) + λ · #{e > c}`
//!
//! over the candidates `c`: the waste of the outcomes it covers plus a price `λ` per outcome it
//! misses. That is the limit a waste-at-coverage judge wants: where a context's outcomes are
//! spread out, missing its top few saves much waste; where they are tight (or all 0), a limit
//! at their top costs little. One price per metric and horizon, tracked on the forecasts'
//! own misses (`ln λ += η · (miss − (1 − τ))`), makes the miss rate converge on `1 − τ`: the
//! same adaptive conformal calibration as the mixture's correction, acting on the price instead
//! of an additive margin. A context with fewer than [`MIN_OUTCOMES`] outcomes uses the
//! outcomes of every context.
//!
//! # Cost
//!
//! Per forecast: two binary searches in the window (the context) and a linear scan of the
//! context's outcomes, kept sorted; per learned sample a ring-buffer push and an insertion into
//! (and a removal from) a sorted vector. State: [`CONTEXTS`] rings of at most [`CAPACITY`]
//! numbers and one of [`ALL_CAPACITY`] per metric and horizon. (Choosing among the outcomes
//! relative to the window's median, to follow a level shift, and a context of the last two
//! samples were both tried and wasted more on the real traces' tuning half.)

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::MAX_VALUE;

/// Bins of one sample: exactly 0, then by rank in the window (see [`RANK_EDGES`]).
pub const BINS: usize = 7;
/// Rank edges of the non-zero bins.
const RANK_EDGES: [f64; BINS - 2] = [0.25, 0.5, 0.75, 0.9, 0.97];
/// Contexts: the last sample's bin.
pub const CONTEXTS: usize = BINS;
/// Outcomes kept per context.
pub const CAPACITY: usize = 128;
/// Outcomes kept for the context-free fallback.
pub const ALL_CAPACITY: usize = 4 * CAPACITY;
/// Fewest outcomes a context needs before its own are used.
pub const MIN_OUTCOMES: usize = 16;
/// Bounds of `ln λ`.
const LOG_PRICE: (f64, f64) = (-3.0, 12.0);
/// Initial `ln λ`: a miss costs as much as 20 fully wasted samples.
const LOG_PRICE_START: f64 = 3.0;
/// Step of `ln λ` per forecast judged.
pub const PRICE_STEP: f64 = 0.08;

/// The context of a forecast made after a sample `x` whose `rank`, the share of the window strictly below it plus half the share
/// equal to it.
pub fn context(x: f64, rank: f64) -> u8 {
    if x <= 0.0 {
        return 0;
    }
    1 + RANK_EDGES.iter().filter(|e| rank > **e).count() as u8
}

/// Conditional outcomes and the calibrated price of one metric and horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conditional {
    /// Per context: the latest outcomes, oldest first.
    pub outcomes: Vec<VecDeque<f64>>,
    /// Outcomes of every context, oldest first.
    pub all: VecDeque<f64>,
    /// `ln λ`, the price of a miss in fully wasted samples.
    pub log_price: f64,
    /// `outcomes`, each context's sorted ascending, then `all` sorted (derived, rebuilt by
    /// [`Conditional::restore`]): a forecast is then a linear scan.
    #[serde(skip)]
    sorted: Vec<Vec<f64>>,
}

impl Default for Conditional {
    fn default() -> Self {
        Conditional {
            outcomes: vec![VecDeque::new(); CONTEXTS],
            all: VecDeque::new(),
            log_price: LOG_PRICE_START,
            sorted: vec![Vec::new(); CONTEXTS + 1],
        }
    }
}

impl Conditional {
    /// The forecast for context `ctx`, `None` before enough outcomes.
    pub fn forecast(&self, ctx: u8) -> Option<f64> {
        let own = &self.sorted[usize::from(ctx).min(CONTEXTS - 1)];
        let all = &self.sorted[CONTEXTS];
        let sorted = if own.len() >= MIN_OUTCOMES {
            own
        } else if all.len() >= MIN_OUTCOMES {
            all
        } else {
            return None;
        };
        Some(choose(sorted, self.log_price.exp()))
    }

    /// Learns that `x` followed context `ctx`, where `limit` was forecast.
    pub fn learn(&mut self, ctx: u8, x: f64, limit: Option<f64>, tau: f64) {
        let ctx = usize::from(ctx).min(CONTEXTS - 1);
        push(&mut self.outcomes[ctx], &mut self.sorted[ctx], x, CAPACITY);
        push(&mut self.all, &mut self.sorted[CONTEXTS], x, ALL_CAPACITY);
        if let Some(limit) = limit {
            let miss = f64::from(u8::from(x > limit));
            self.log_price = (self.log_price + PRICE_STEP * (miss - (1.0 - tau)))
                .clamp(LOG_PRICE.0, LOG_PRICE.1);
        }
    }

    /// Checks a deserialised state and rebuilds what is derived.
    pub(crate) fn restore(&mut self) -> Result<(), String> {
        self.validate()?;
        self.sorted = self
            .outcomes
            .iter()
            .chain([&self.all])
            .map(|ring| {
                let mut v: Vec<f64> = ring.iter().copied().collect();
                v.sort_by(f64::total_cmp);
                v
            })
            .collect();
        Ok(())
    }

    /// Checks a state's bounds and ranges.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let value = |x: &f64| x.is_finite() && (0.0..=MAX_VALUE).contains(x);
        if self.outcomes.len() != CONTEXTS
            || self.outcomes.iter().any(|r| r.len() > CAPACITY)
            || self.all.len() > ALL_CAPACITY
        {
            return Err("conditional outcomes beyond their bound".into());
        }
        if !(self.outcomes.iter().flatten().chain(&self.all).all(value)
            && self.log_price.is_finite()
            && (LOG_PRICE.0..=LOG_PRICE.1).contains(&self.log_price))
        {
            return Err("conditional state out of range".into());
        }
        Ok(())
    }
}

fn push(ring: &mut VecDeque<f64>, sorted: &mut Vec<f64>, e: f64, cap: usize) {
    while ring.len() >= cap {
        if let Some(old) = ring.pop_front() {
            let i = sorted.partition_point(|v| *v < old);
            if sorted.get(i) == Some(&old) {
                sorted.remove(i);
            }
        }
    }
    ring.push_back(e);
    let i = sorted.partition_point(|v| *v < e);
    sorted.insert(i, e);
}

/// The outcome `c` of `sorted` (ascending, not empty) minimising
/// `Σ_{e ≤ c} (1 − e/c) + price · #{e > c}` (ties: the larger).
fn choose(sorted: &[f64], price: f64) -> f64 {
    let n = sorted.len();
    let mut best = (f64::INFINITY, sorted[n - 1]);
    let mut sum = 0.0;
    for i in 0..n {
        sum += sorted[i];
        if i + 1 < n && sorted[i + 1] == sorted[i] {
            continue;
        }
        let c = sorted[i];
        let covered = (i + 1) as f64;
        let waste = if c > 0.0 { covered - sum / c } else { 0.0 };
        let cost = waste + price * (n - i - 1) as f64;
        if cost <= best.0 {
            best = (cost, c);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn the_choice_minimises_waste_plus_the_price_of_misses() {
        let ring = [1.0, 1.0, 2.0, 2.0, 2.0, 10.0];
        // Brute force over every candidate.
        let cost = |c: f64, price: f64| {
            ring.iter()
                .map(|e| if *e <= c { 1.0 - e / c } else { price })
                .sum::<f64>()
        };
        for price in [0.1, 1.0, 3.0, 100.0] {
            let best = ring
                .iter()
                .copied()
                .min_by(|a, b| cost(*a, price).total_cmp(&cost(*b, price)))
                .unwrap();
            assert_eq!(
                cost(choose(&ring, price), price),
                cost(best, price),
                "{price}"
            );
        }
        // A cheap miss leaves the outlier out, a dear one covers it.
        assert_eq!(choose(&ring, 0.5), 2.0);
        assert_eq!(choose(&ring, 100.0), 10.0);
    }

    #[test]
    fn an_alternating_metric_is_forecast_exactly_and_calibrated() {
        // 0 after a busy sample, a busy sample (noisy, 1..2) after a 0: the context tells
        // which, so the forecast after a busy sample is exactly 0 and covers it.
        let mut rng = SplitMix64::new(5);
        let mut c = Conditional::default();
        let (mut issued, mut covered) = (0u32, 0u32);
        let mut last = 1.0;
        for i in 0..20_000 {
            let x = if i % 2 == 0 {
                0.0
            } else {
                1.0 + rng.next_f64()
            };
            // The window's ranks are not needed here: 0 has its own context, any busy value
            // the same rank.
            let ctx = context(last, 0.6);
            let limit = c.forecast(ctx);
            if i > 2_000 {
                issued += 1;
                covered += u32::from(limit.is_some_and(|l| x <= l));
                if last > 0.0 {
                    assert_eq!(limit, Some(0.0));
                }
            }
            c.learn(ctx, x, limit, 0.95);
            last = x;
        }
        let coverage = f64::from(covered) / f64::from(issued);
        assert!((coverage - 0.95).abs() < 0.01, "{coverage}");
        // The sorted copies follow the rings, and are rebuilt alike from them.
        let mut back = Conditional {
            sorted: Vec::new(),
            ..c.clone()
        };
        back.restore().unwrap();
        assert_eq!(back, c);
    }
}
