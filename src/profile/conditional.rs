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
//! sample one step, or one hour, later). The forecast is chosen among those outcomes (so it is a
//! value the metric took: exactly 0, a counter's step) by minimising the expected cost
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
//! # State
//!
//! Outcomes are kept as 16-bit codes on a logarithmic scale ([`encode`]): exactly 0, or a value
//! between [`CODE_MIN`] and [`MAX_VALUE`] rounded *up* to the next of 65,535 steps of 0.07%. A
//! limit chosen among them still covers the outcome it came from (a counter's step, a recurring
//! reading), at most 0.07% above it; the forecast layer then lowers it onto the largest value of
//! the last day within that step, which gives back the exact value for what the day has seen. A profile version stores each ring as its codes in base64:
//! at most [`CONTEXTS`] × [`CAPACITY`] + [`ALL_CAPACITY`] = 1,408 codes, at most
//! [`MAX_STORED_BYTES`] of JSON per metric and horizon (eight per version), where the outcomes as
//! JSON numbers took about 25 KB. A version written before the layer loads with it empty (it
//! relearns); one that stored the outcomes as numbers loads them rounded up onto codes.
//!
//! # Cost
//!
//! Per forecast: two binary searches in the window (the context) and a linear scan of the
//! context's outcomes, kept sorted (decoded); per learned sample a `ln` and an `exp` (the
//! code), a ring-buffer push and an insertion into (and a removal from) a sorted vector.
//! (Choosing among the outcomes relative to the window's median, to follow a level shift, and a
//! context of the last two samples were both tried and wasted more on the real traces' tuning
//! half.)

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::MAX_VALUE;
use crate::monitor::base64;

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
/// Smallest positive outcome a code tells apart: smaller ones are kept as this (rounded up).
pub const CODE_MIN: f64 = 1e-6;
/// Largest code: [`MAX_VALUE`].
const CODE_TOP: u16 = u16::MAX;
/// `ln` of the ratio between two consecutive codes: 65,534 steps from [`CODE_MIN`] to
/// [`MAX_VALUE`] (`ln(1e20) / 65534`, about 0.07%).
const CODE_STEP: f64 = 46.051_701_859_880_914 / (CODE_TOP - 1) as f64;
/// Bound on the JSON of one [`Conditional`] (every ring full): base64 of 2 bytes per outcome,
/// the price and the punctuation.
pub const MAX_STORED_BYTES: usize = 4_096;

/// The code of an outcome `x` (0 to [`MAX_VALUE`]): 0 for 0, else the smallest code whose
/// [`decode`] is at least `x`.
pub fn encode(x: f64) -> u16 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    let k = ((x / CODE_MIN).ln() / CODE_STEP).ceil();
    // `k` is the code minus one, give or take the rounding of `ln`: settle on the smallest code
    // whose value is at least `x` (so a code's own value keeps its code).
    let mut code = k.clamp(0.0, f64::from(CODE_TOP - 1)) as u16 + 1;
    while code > 1 && decode(code - 1) >= x {
        code -= 1;
    }
    while code < CODE_TOP && decode(code) < x {
        code += 1;
    }
    code
}

/// The value of a code.
pub fn decode(code: u16) -> f64 {
    if code == 0 {
        return 0.0;
    }
    (CODE_MIN * (f64::from(code - 1) * CODE_STEP).exp()).min(MAX_VALUE)
}

/// The value of the code below `x`'s: every value above it and at most `x` has `x`'s code.
pub fn step_below(x: f64) -> f64 {
    decode(encode(x).saturating_sub(1))
}

/// The context of a forecast made after a sample `x` whose `rank`, the share of the window
/// strictly below it plus half the share equal to it.
pub fn context(x: f64, rank: f64) -> u8 {
    if x <= 0.0 {
        return 0;
    }
    1 + RANK_EDGES.iter().filter(|e| rank > **e).count() as u8
}

/// Conditional outcomes and the calibrated price of one metric and horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Stored", into = "Stored")]
pub struct Conditional {
    /// Per context: the latest outcomes' codes, oldest first.
    outcomes: Vec<VecDeque<u16>>,
    /// Codes of the outcomes of every context, oldest first.
    all: VecDeque<u16>,
    /// `ln λ`, the price of a miss in fully wasted samples.
    log_price: f64,
    /// `outcomes`, each context's decoded and sorted ascending, then `all`'s (derived): a
    /// forecast is a linear scan.
    sorted: Vec<Vec<f64>>,
}

/// How a version stores a [`Conditional`].
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    /// Each ring's codes, little-endian, in base64.
    Codes {
        /// Per context.
        contexts: Vec<String>,
        /// The context-free ring.
        recent: String,
        /// `ln λ`.
        log_price: f64,
    },
    /// The outcomes as numbers (versions written before the codes).
    Values {
        outcomes: Vec<VecDeque<f64>>,
        all: VecDeque<f64>,
        log_price: f64,
    },
}

fn to_base64(ring: &VecDeque<u16>) -> String {
    let bytes: Vec<u8> = ring.iter().flat_map(|c| c.to_le_bytes()).collect();
    base64::encode(&bytes)
}

fn from_base64(text: &str, cap: usize) -> Result<VecDeque<u16>, String> {
    // Bound the text before decoding it: a version file may be corrupt or hostile.
    if text.len() > (2 * cap).div_ceil(3) * 4 {
        return Err("conditional outcomes beyond their bound".into());
    }
    let bytes = base64::decode(text).map_err(|e| format!("conditional outcomes: {e}"))?;
    if bytes.len() % 2 != 0 {
        return Err("conditional outcomes: odd number of bytes".into());
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect())
}

impl From<Conditional> for Stored {
    fn from(c: Conditional) -> Self {
        Stored::Codes {
            contexts: c.outcomes.iter().map(to_base64).collect(),
            recent: to_base64(&c.all),
            log_price: c.log_price,
        }
    }
}

impl TryFrom<Stored> for Conditional {
    type Error = String;

    fn try_from(s: Stored) -> Result<Self, String> {
        let (outcomes, all, log_price) = match s {
            Stored::Codes {
                contexts,
                recent,
                log_price,
            } => (
                contexts
                    .iter()
                    .take(CONTEXTS + 1)
                    .map(|t| from_base64(t, CAPACITY))
                    .collect::<Result<Vec<_>, _>>()?,
                from_base64(&recent, ALL_CAPACITY)?,
                log_price,
            ),
            Stored::Values {
                outcomes,
                all,
                log_price,
            } => {
                let value = |x: &f64| x.is_finite() && (0.0..=MAX_VALUE).contains(x);
                if !outcomes.iter().flatten().chain(&all).all(value) {
                    return Err("conditional state out of range".into());
                }
                let codes = |r: &VecDeque<f64>| r.iter().map(|x| encode(*x)).collect();
                (outcomes.iter().map(codes).collect(), codes(&all), log_price)
            }
        };
        let mut c = Conditional {
            outcomes,
            all,
            log_price,
            sorted: Vec::new(),
        };
        c.validate()?;
        c.sorted = c
            .outcomes
            .iter()
            .chain([&c.all])
            .map(|ring| {
                let mut v: Vec<f64> = ring.iter().map(|k| decode(*k)).collect();
                v.sort_by(f64::total_cmp);
                v
            })
            .collect();
        Ok(c)
    }
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
        let code = encode(x);
        push(
            &mut self.outcomes[ctx],
            &mut self.sorted[ctx],
            code,
            CAPACITY,
        );
        push(
            &mut self.all,
            &mut self.sorted[CONTEXTS],
            code,
            ALL_CAPACITY,
        );
        if let Some(limit) = limit {
            let miss = f64::from(u8::from(x > limit));
            self.log_price = (self.log_price + PRICE_STEP * (miss - (1.0 - tau)))
                .clamp(LOG_PRICE.0, LOG_PRICE.1);
        }
    }

    /// Outcomes kept, over every ring.
    pub fn len(&self) -> usize {
        self.outcomes.iter().map(VecDeque::len).sum::<usize>() + self.all.len()
    }

    /// Whether nothing was learned yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a state's bounds and ranges.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.outcomes.len() != CONTEXTS
            || self.outcomes.iter().any(|r| r.len() > CAPACITY)
            || self.all.len() > ALL_CAPACITY
        {
            return Err("conditional outcomes beyond their bound".into());
        }
        if !(self.log_price.is_finite() && (LOG_PRICE.0..=LOG_PRICE.1).contains(&self.log_price)) {
            return Err("conditional state out of range".into());
        }
        Ok(())
    }
}

fn push(ring: &mut VecDeque<u16>, sorted: &mut Vec<f64>, code: u16, cap: usize) {
    while ring.len() >= cap {
        if let Some(old) = ring.pop_front() {
            remove_sorted(sorted, decode(old));
        }
    }
    ring.push_back(code);
    let e = decode(code);
    let i = sorted.partition_point(|v| *v < e);
    sorted.insert(i, e);
}

fn remove_sorted(sorted: &mut Vec<f64>, x: f64) {
    let i = sorted.partition_point(|v| *v < x);
    if sorted.get(i) == Some(&x) {
        sorted.remove(i);
    }
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
    fn codes_round_up_by_at_most_a_step() {
        assert_eq!((encode(0.0), decode(0)), (0, 0.0));
        assert_eq!(encode(-1.0), 0);
        assert_eq!(encode(f64::NAN), 0);
        // Below the smallest code: rounded up onto it, so still covered.
        assert_eq!(encode(1e-9), 1);
        assert_eq!(decode(1), CODE_MIN);
        assert_eq!(decode(encode(MAX_VALUE)), MAX_VALUE);
        let mut rng = SplitMix64::new(3);
        let mut last = (0.0, 0u16);
        for _ in 0..100_000 {
            // Log-uniform over the whole range, and small integers (counters' steps).
            let x = if rng.next_u64().is_multiple_of(2) {
                CODE_MIN * (rng.next_f64() * (MAX_VALUE / CODE_MIN).ln()).exp()
            } else {
                (rng.next_u64() % 10_000) as f64
            };
            let v = decode(encode(x));
            assert!(v >= x && v <= x.max(CODE_MIN) * 1.0008, "{x} -> {v}");
            // Idempotent: a code's value keeps its code.
            assert_eq!(encode(v), encode(x));
            if x > last.0 {
                assert!(encode(x) >= last.1);
            }
            last = (x, encode(x));
            // The step below: every value above it and at most `v` shares `x`'s code.
            if x > 0.0 {
                let below = step_below(v);
                assert!(
                    below < x.max(CODE_MIN) && encode(below) + 1 == encode(x),
                    "{x}"
                );
            }
        }
    }

    /// A layer whose every ring is full of distinct outcomes.
    fn full() -> Conditional {
        let mut rng = SplitMix64::new(8);
        let mut c = Conditional::default();
        for i in 0..CONTEXTS * CAPACITY * 2 {
            let x = 1e3 * (rng.next_f64() * 20.0).exp();
            c.learn((i % CONTEXTS) as u8, x, Some(x * 0.5), 0.95);
        }
        c
    }

    #[test]
    fn a_stored_layer_is_bounded_and_round_trips() {
        let c = full();
        assert_eq!(c.len(), CONTEXTS * CAPACITY + ALL_CAPACITY);
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.len() <= MAX_STORED_BYTES, "{} bytes", json.len());
        let back: Conditional = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        for ctx in 0..CONTEXTS as u8 {
            assert_eq!(back.forecast(ctx), c.forecast(ctx));
        }
    }

    #[test]
    fn outcomes_stored_as_numbers_load_rounded_up() {
        // The layout before the codes: each ring's outcomes as JSON numbers.
        let mut outcomes = vec![Vec::<f64>::new(); CONTEXTS];
        outcomes[0] = vec![0.0; 20];
        outcomes[3] = (0..40).map(|i| 68.266 * f64::from(i % 4)).collect();
        let all: Vec<f64> = outcomes.iter().flatten().copied().collect();
        let json = serde_json::json!({"outcomes": outcomes, "all": all, "log_price": 2.5});
        let c: Conditional = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(c.len(), 120);
        assert_eq!(c.forecast(0), Some(0.0));
        // Chosen among the outcomes, rounded up onto a code: still covers the value it was.
        let f = c.forecast(3).unwrap();
        assert!((3.0 * 68.266..=3.0 * 68.266 * 1.0008).contains(&f), "{f}");
        // Out of range numbers are refused.
        let mut bad = json;
        bad["all"][0] = serde_json::json!(-1.0);
        assert!(serde_json::from_value::<Conditional>(bad).is_err());
    }

    #[test]
    fn a_corrupt_stored_layer_is_refused() {
        let good = serde_json::to_value(full()).unwrap();
        let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            edit(&mut v);
            serde_json::from_value::<Conditional>(v).is_err()
        };
        // A ring longer than its capacity, one context too many or too few, not base64, an
        // odd number of bytes, a price out of range.
        assert!(refused(&|v| v["contexts"][0] = "AAAA".repeat(100).into()));
        assert!(refused(&|v| v["contexts"]
            .as_array_mut()
            .unwrap()
            .push("".into())));
        assert!(refused(&|v| {
            v["contexts"].as_array_mut().unwrap().pop();
        }));
        assert!(refused(&|v| v["recent"] = "not base64!".into()));
        assert!(refused(&|v| v["recent"] = "AA==".into()));
        assert!(refused(&|v| v["log_price"] = 1e9.into()));
        assert!(!refused(&|_| {}));
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
    }
}
