//! Predictive profile benchmark: replays histories through the learned model and three
//! baselines — `rolling_p95_24h` (the p95 of the last 24 h plus headroom), `last_value` and
//! `static_peak` — one step and one hour ahead, and prints coverage, under-prediction and waste.
//!
//! Run: `cargo bench --bench profile` (the model part of `make bench-profile`; no lab needed).
//! Results also go to `<target dir>/bench-profile.json`. `BENCH_PROFILE_PARTS` picks parts,
//! comma-separated, default all: `synthetic`, `real`, `cost`. `BENCH_PROFILE_VMS=tune` runs the
//! real part on the first 22 VMs only (file-name order: the half the defaults were chosen on),
//! `held` on the other 21.
//!
//! Every history goes through `understudy::profile::backtest::run`, the code behind
//! `understudy profile backtest`, with the default settings (coverage target 95%, no headroom):
//! 1. *synthetic*: five seeded traces (21 days, 1-minute samples, see
//!    `understudy::profile::synthetic`). Verdict per trace and horizon: at the default settings
//!    the model's coverage is within 1.5 points of its 95% target; at the smallest headroom
//!    reaching 95% coverage its mean waste is <= 25% and below every baseline's (a baseline that
//!    never reaches 95% is beaten).
//! 2. *real*: the 43 VMs of `../shared/traces/bitbrains-rnd/` (Bitbrains Rnd, 300 s samples,
//!    about three months each). Per horizon: mean waste of each predictor at the smallest
//!    headroom that reaches 95% coverage, and on how many VMs each wastes least; and the model's
//!    coverage at the default settings, VM by VM.
//! 3. *cost*: CPU time of the model per observation (learn + predict; this thread's, so other
//!    work on the machine does not count) at one sample a second and at 300 s, against the
//!    collector's budget (1% of a core per 10 domains at one sample a
//!    second: 1 ms per observation for the whole collector, model included).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use understudy::monitor::collector::thread_cpu_ns;
use understudy::profile::backtest::{self, BacktestReport, HorizonReport};
use understudy::profile::synthetic::{self, Shape, TraceSpec, COVERAGE_TARGET, WASTE_TARGET};
use understudy::profile::{Learner, LearnerParams, Observation};

const SEED: u64 = 0x5EED_2024;
/// Targets on the real traces (printed, not asserted).
const REAL_WASTE_CUT: f64 = 0.20;
const REAL_LEAST_WASTE_SHARE: f64 = 0.75;
const CALIBRATION_TOLERANCE: f64 = 0.015;
const CALIBRATED_SHARE: f64 = 0.90;

#[derive(Serialize)]
struct Synthetic {
    trace: &'static str,
    report: BacktestReport,
    /// Per horizon: model meets the targets and beats every baseline.
    pass: Vec<bool>,
}

#[derive(Serialize)]
struct RealSummary {
    horizon: &'static str,
    /// Per predictor: mean waste at 95% coverage over the VMs where it reaches it, VMs where it
    /// reaches it, VMs where it wastes least.
    predictors: Vec<(String, f64, usize, usize)>,
    /// Model coverage at the default settings, per VM.
    model_coverage: Vec<(String, f64)>,
}

#[derive(Serialize)]
struct Output {
    model_params: LearnerParams,
    synthetic: Vec<Synthetic>,
    real: Vec<(String, BacktestReport)>,
    real_summary: Vec<RealSummary>,
    /// The model's cost per observation.
    cost: Option<Cost>,
}

/// Nanoseconds per observation, one figure per run.
#[derive(Serialize)]
struct Cost {
    cpu_ns_at_1s: Vec<f64>,
    wall_ns_at_1s: Vec<f64>,
    cpu_ns_at_300s: Vec<f64>,
    wall_ns_at_300s: Vec<f64>,
}

fn pct(x: f64) -> String {
    format!("{:6.2}%", x * 100.0)
}

fn adapt(a: Option<Option<usize>>) -> String {
    match a {
        None => "-".into(),
        Some(None) => "never".into(),
        Some(Some(n)) => n.to_string(),
    }
}

/// Prints one synthetic trace's horizon and returns its verdict.
fn synthetic_horizon(name: &str, h: &HorizonReport) -> bool {
    println!("\n== {name} | {} ==", h.label());
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>6} {:>10} {:>12} {:>10}  {:>9} {:>8}",
        "predictor",
        "coverage",
        "under",
        "waste",
        "drift",
        "adapt(cov)",
        "adapt(waste)",
        "shift-miss",
        "@95% hdrm",
        "waste"
    );
    for (r, a) in h.configured.iter().zip(&h.at_target) {
        println!(
            "{:<16} {:>8} {:>8} {:>8} {:>6} {:>10} {:>12} {:>10}  {:>9} {:>8}",
            r.predictor,
            pct(r.report.coverage),
            pct(r.report.under_rate),
            pct(r.report.mean_waste),
            r.report.drift_events,
            adapt(r.adapt_coverage),
            adapt(r.adapt_waste),
            r.shift_misses.map_or("-".to_string(), |m| m.to_string()),
            a.headroom.map_or("never".to_string(), pct),
            a.mean_waste().map_or("-".to_string(), pct),
        );
    }
    // The model calibrates to the coverage target, so at the default settings its coverage is
    // the target (warm-up misses included), give or take: judged within the tolerance. Waste and
    // the comparison are judged where every predictor covers the target, at its own smallest
    // headroom: a baseline that never reaches it is beaten.
    let m = &h.configured[0].report;
    let calibrated = (m.coverage - COVERAGE_TARGET).abs() <= CALIBRATION_TOLERANCE;
    let model_waste = h.at_target[0].mean_waste();
    let meets = calibrated && model_waste.is_some_and(|w| w <= WASTE_TARGET);
    let beats: Vec<(bool, String)> = h.at_target[1..]
        .iter()
        .map(|b| {
            let won = meets
                && match (model_waste, b.mean_waste()) {
                    (Some(mw), Some(bw)) => mw < bw,
                    (Some(_), None) => true,
                    _ => false,
                };
            (
                won,
                format!(
                    "{} {}",
                    if won { "beats" } else { "does NOT beat" },
                    b.predictor
                ),
            )
        })
        .collect();
    let pass = meets && beats.iter().all(|b| b.0);
    println!(
        "verdict {name} {}: {} — model coverage {} at default settings (target {:.0}% ± {:.1}), waste at {:.0}% coverage {} (target <= {:.0}%); {}",
        h.label(),
        if pass { "PASS" } else { "FAIL" },
        pct(m.coverage),
        COVERAGE_TARGET * 100.0,
        CALIBRATION_TOLERANCE * 100.0,
        COVERAGE_TARGET * 100.0,
        model_waste.map_or("never".into(), pct),
        WASTE_TARGET * 100.0,
        beats.iter().map(|b| b.1.as_str()).collect::<Vec<_>>().join(", ")
    );
    pass
}

fn run_synthetic(params: &LearnerParams) -> Vec<Synthetic> {
    println!("### 1. synthetic traces (21 days, 1-minute samples), default settings");
    let mut out = Vec::new();
    for shape in Shape::ALL {
        let t = synthetic::generate(&TraceSpec::bench(shape, SEED));
        let report = backtest::run(&t.observations, t.shift_index, params)
            .expect("default parameters are valid");
        let pass = report
            .horizons
            .iter()
            .map(|h| synthetic_horizon(shape.name(), h))
            .collect();
        out.push(Synthetic {
            trace: shape.name(),
            report,
            pass,
        });
    }
    let passed = out.iter().flat_map(|s| &s.pass).filter(|p| **p).count();
    let least = out
        .iter()
        .flat_map(|s| &s.report.horizons)
        .filter(|h| least_waste(h) == Some(0))
        .count();
    println!(
        "\nsynthetic: {passed}/{} verdicts PASS (5 traces x 2 horizons); model least waste at 95% coverage in {least}/{}",
        out.len() * 2,
        out.len() * 2
    );
    out
}

/// Index of the predictor with the least waste at the coverage target.
fn least_waste(h: &HorizonReport) -> Option<usize> {
    h.at_target
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.mean_waste().map(|w| (i, w)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

fn traces_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/traces/bitbrains-rnd")
}

fn run_real(params: &LearnerParams) -> (Vec<(String, BacktestReport)>, Vec<RealSummary>) {
    let dir = traces_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("real traces missing at {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".csv.gz"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.csv.gz in {}", dir.display());
    // `BENCH_PROFILE_VMS=tune` keeps the first half of the VMs (in file-name order: the split the
    // defaults were chosen on), `held` the other half; unset or `all`, every VM.
    let half = files.len().div_ceil(2);
    match std::env::var("BENCH_PROFILE_VMS").as_deref() {
        Ok("tune") => files.truncate(half),
        Ok("held") => drop(files.drain(..half)),
        Ok("all") | Err(_) => {}
        Ok(other) => panic!("BENCH_PROFILE_VMS={other}: expected tune, held or all"),
    }
    println!(
        "\n### 2. real traces: {} VMs of {} (default settings; waste at 95% coverage = each predictor at its smallest headroom reaching it)",
        files.len(),
        dir.display()
    );
    let started = Instant::now();
    let mut reports = Vec::new();
    for f in &files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".csv.gz"))
            .unwrap_or("?")
            .to_string();
        let obs = backtest::load(f).unwrap_or_else(|e| panic!("{e}"));
        let r = backtest::run(&obs, None, params).expect("default parameters are valid");
        let line: Vec<String> = r
            .horizons
            .iter()
            .map(|h| {
                format!(
                    "{}: model cov {} | @95% waste {}",
                    if h.horizon == 0 { "1-step" } else { "1h" },
                    pct(h.configured[0].report.coverage),
                    h.at_target
                        .iter()
                        .map(|a| format!(
                            "{} {}",
                            a.predictor,
                            a.mean_waste().map_or("never".into(), pct)
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .collect();
        println!("{name} ({} samples) {}", obs.len(), line.join(" || "));
        reports.push((name, r));
    }
    let mut summaries = Vec::new();
    for (hi, label) in [(0, "one step ahead"), (1, "1 hour ahead")] {
        let names: Vec<String> = reports[0].1.horizons[hi]
            .at_target
            .iter()
            .map(|a| a.predictor.clone())
            .collect();
        let mut rows = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let wastes: Vec<f64> = reports
                .iter()
                .filter_map(|(_, r)| r.horizons[hi].at_target[k].mean_waste())
                .collect();
            let least = reports
                .iter()
                .filter(|(_, r)| least_waste(&r.horizons[hi]) == Some(k))
                .count();
            let mean = wastes.iter().sum::<f64>() / wastes.len().max(1) as f64;
            rows.push((name.clone(), mean, wastes.len(), least));
        }
        let n = reports.len();
        println!("\n{label}: waste at 95% coverage over {n} VMs");
        println!(
            "| predictor | mean waste at the smallest headroom reaching 95% coverage | VMs reaching 95% | VMs where it wastes least |\n|---|---|---|---|"
        );
        for (name, mean, reached, least) in &rows {
            println!(
                "| {name} | {:.1}% | {reached} of {n} | {least} of {n} |",
                mean * 100.0
            );
        }
        let cov: Vec<(String, f64)> = reports
            .iter()
            .map(|(v, r)| (v.clone(), r.horizons[hi].configured[0].report.coverage))
            .collect();
        let mut sorted: Vec<f64> = cov.iter().map(|c| c.1).collect();
        sorted.sort_by(f64::total_cmp);
        let target = params.model.coverage_target;
        let within = sorted
            .iter()
            .filter(|c| (**c - target).abs() <= CALIBRATION_TOLERANCE)
            .count();
        let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        println!(
            "model coverage at default settings (target {}): min {} p10 {} median {} p90 {} max {}; within {:.1} points of target on {within} of {n} VMs",
            pct(target),
            pct(q(0.0)),
            pct(q(0.1)),
            pct(q(0.5)),
            pct(q(0.9)),
            pct(q(1.0)),
            CALIBRATION_TOLERANCE * 100.0
        );
        let (model, rolling) = (&rows[0], &rows[1]);
        let cut = 1.0 - model.1 / rolling.1;
        println!(
            "targets {label}: waste {:.1}% vs rolling window {:.1}% = {:.1}% lower (target >= {:.0}%): {}; least waste on {} of {n} VMs (target >= {:.0}%): {}; calibrated on {within} of {n} (target >= {:.0}%): {}",
            model.1 * 100.0,
            rolling.1 * 100.0,
            cut * 100.0,
            REAL_WASTE_CUT * 100.0,
            if cut >= REAL_WASTE_CUT && model.2 == n { "MET" } else { "NOT MET" },
            model.3,
            REAL_LEAST_WASTE_SHARE * 100.0,
            if model.3 as f64 >= REAL_LEAST_WASTE_SHARE * n as f64 { "MET" } else { "NOT MET" },
            CALIBRATED_SHARE * 100.0,
            if within as f64 >= CALIBRATED_SHARE * n as f64 { "MET" } else { "NOT MET" },
        );
        summaries.push(RealSummary {
            horizon: label,
            predictors: rows,
            model_coverage: cov,
        });
    }
    println!("(real traces: {:.1}s)", started.elapsed().as_secs_f64());
    (reports, summaries)
}

/// CPU time of learning and predicting, per observation: at the daemon's one sample a second
/// (six hours of a synthetic trace), and on a real trace at 300 s (where every sample also closes
/// a 5-minute slot, the forecast layer's most expensive step). Measured as this thread's CPU time
/// (`/proc/thread-self/schedstat`, as the collector's own cost is), so other work on a shared
/// machine does not count; the wall time is printed beside it.
fn run_cost(params: &LearnerParams) -> Cost {
    let per_second = synthetic::generate(&TraceSpec {
        shape: Shape::Spiky,
        days: 1,
        step_ms: 1000,
        seed: SEED,
    })
    .observations
    .into_iter()
    .take(6 * 3600)
    .collect::<Vec<_>>();
    let real = backtest::load(&traces_dir().join("vm008.csv.gz"))
        .unwrap_or_else(|e| panic!("real trace for the cost: {e}"));
    const RUNS: usize = 3;
    // Per run: CPU and wall nanoseconds per observation.
    let measure = |obs: &[Observation]| -> Vec<(f64, f64)> {
        let mut sink = 0.0;
        let runs = (0..RUNS)
            .map(|_| {
                let mut learner =
                    Learner::new(params.clone()).expect("default parameters are valid");
                let cpu =
                    thread_cpu_ns().expect("this thread's CPU time (/proc/thread-self/schedstat)");
                let started = Instant::now();
                for o in obs {
                    sink += learner.predict(o.ts_unix_ms).envelopes.cpu.limit;
                    learner.observe(o);
                }
                let wall = started.elapsed().as_nanos() as f64;
                let cpu = thread_cpu_ns().unwrap_or(cpu).saturating_sub(cpu) as f64;
                (cpu / obs.len() as f64, wall / obs.len() as f64)
            })
            .collect();
        std::hint::black_box(sink);
        runs
    };
    let (a, b) = (measure(&per_second), measure(&real));
    let show = |runs: &[(f64, f64)]| {
        let cpu: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.1}", r.0 / 1000.0))
            .collect();
        let wall: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.1}", r.1 / 1000.0))
            .collect();
        format!("CPU {} µs (wall {} µs)", cpu.join(" / "), wall.join(" / "))
    };
    let min_cpu = |runs: &[(f64, f64)]| runs.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    println!(
        "\n### 3. cost of the model per observation (predict + learn, 4 metrics), {RUNS} runs each, this thread's CPU time:\n\
         at 1 s sampling: {}; least {:.1} µs = {:.2}% of the collector's budget (1 ms per observation)\n\
         at 300 s sampling (vm008): {}",
        show(&a),
        min_cpu(&a) / 1000.0,
        min_cpu(&a) / 1e6 * 100.0,
        show(&b),
    );
    Cost {
        cpu_ns_at_1s: a.iter().map(|r| r.0).collect(),
        wall_ns_at_1s: a.iter().map(|r| r.1).collect(),
        cpu_ns_at_300s: b.iter().map(|r| r.0).collect(),
        wall_ns_at_300s: b.iter().map(|r| r.1).collect(),
    }
}

fn main() {
    // For exploring parameters without a rebuild: JSON merged over the defaults, e.g.
    // BENCH_PROFILE_PARAMS='{"model":{"calibration_step":0.1}}'. The README's figures use none.
    let params: LearnerParams = match std::env::var("BENCH_PROFILE_PARAMS") {
        Ok(json) => {
            serde_json::from_str(&json).expect("BENCH_PROFILE_PARAMS is LearnerParams JSON")
        }
        Err(_) => LearnerParams::default(),
    };
    let parts =
        std::env::var("BENCH_PROFILE_PARTS").unwrap_or_else(|_| "synthetic,real,cost".into());
    let want = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let started = Instant::now();
    let synthetic = if want("synthetic") {
        run_synthetic(&params)
    } else {
        Vec::new()
    };
    let (real, real_summary) = if want("real") {
        run_real(&params)
    } else {
        (Vec::new(), Vec::new())
    };
    let cost = want("cost").then(|| run_cost(&params));
    println!("\nbench-profile: {:.1}s", started.elapsed().as_secs_f64());
    let out = Output {
        model_params: params,
        synthetic,
        real,
        real_summary,
        cost,
    };
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let path = dir.join("bench-profile.json");
    match serde_json::to_vec_pretty(&out) {
        Ok(json) => match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, json)) {
            Ok(()) => println!("results written to {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        },
        Err(e) => eprintln!("cannot serialise results: {e}"),
    }
}
