//! Predictive profile benchmark: replays deterministic synthetic traces (21 days, 1-minute
//! samples) through the learned model and two baselines, predicting each sample before learning
//! it, and prints coverage, under-prediction, waste and adaptation after a shift.
//!
//! Run: `cargo bench --bench profile`. Results also go to `<target dir>/bench-profile.json`.
//!
//! Verdict rule, per trace and baseline: the model must meet both targets (coverage >= 95%, mean
//! waste <= 25%), and it beats a baseline when the baseline misses the coverage target, or when
//! the baseline reaches it too but with more waste than the model.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use understudy::profile::synthetic::{
    self, LastValue, ReplayResult, Shape, StaticPeak, TraceSpec, COVERAGE_TARGET, WASTE_TARGET,
};
use understudy::profile::{Learner, LearnerParams, Metric, Predictor};

const SEED: u64 = 0x5EED_2024;

#[derive(Serialize)]
struct TraceOutcome {
    trace: &'static str,
    samples: usize,
    shift_index: Option<usize>,
    results: Vec<ReplayResult>,
    model_meets_targets: bool,
    beats: Vec<(String, bool, String)>,
}

#[derive(Serialize)]
struct BenchOutput {
    seed: u64,
    coverage_target: f64,
    waste_target: f64,
    model_params: LearnerParams,
    traces: Vec<TraceOutcome>,
    all_pass: bool,
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

/// Whether `model` beats `base`, and why.
fn compare(model: &ReplayResult, base: &ReplayResult) -> (bool, String) {
    let (m, b) = (&model.report, &base.report);
    if b.coverage < COVERAGE_TARGET {
        let ok = m.coverage >= COVERAGE_TARGET;
        (
            ok,
            format!(
                "{}: coverage {:.1}% < {:.0}% target{}",
                base.predictor,
                b.coverage * 100.0,
                COVERAGE_TARGET * 100.0,
                if ok { "" } else { " (model misses it too)" }
            ),
        )
    } else {
        let ok = m.coverage >= COVERAGE_TARGET && m.mean_waste < b.mean_waste;
        (
            ok,
            format!(
                "{}: both cover >= {:.0}%, waste {:.1}% vs model {:.1}%",
                base.predictor,
                COVERAGE_TARGET * 100.0,
                b.mean_waste * 100.0,
                m.mean_waste * 100.0
            ),
        )
    }
}

fn main() {
    let params = LearnerParams::default();
    let headroom = params.model.headroom;
    let mut outcomes = Vec::new();
    let mut all_pass = true;
    let started = Instant::now();

    for shape in Shape::ALL {
        let trace = synthetic::generate(&TraceSpec::bench(shape, SEED));
        let mut predictors: Vec<Box<dyn Predictor>> = vec![
            Box::new(Learner::new(params.clone()).expect("default parameters are valid")),
            Box::new(LastValue::new(headroom)),
            Box::new(StaticPeak::new(headroom)),
        ];
        let results: Vec<ReplayResult> = predictors
            .iter_mut()
            .map(|p| synthetic::replay(&trace, p.as_mut()))
            .collect();

        println!(
            "\n== trace {} ({} samples, 1-minute, shift at {}) ==",
            shape.name(),
            trace.observations.len(),
            trace
                .shift_index
                .map_or("-".to_string(), |i| format!("sample {i}"))
        );
        println!(
            "{:<12} {:>8} {:>8} {:>8} {:>6} {:>10} {:>11}",
            "predictor", "coverage", "under", "waste", "drift", "adapt(cov)", "adapt(waste)"
        );
        for r in &results {
            println!(
                "{:<12} {:>8} {:>8} {:>8} {:>6} {:>10} {:>11}",
                r.predictor,
                pct(r.report.coverage),
                pct(r.report.under_rate),
                pct(r.report.mean_waste),
                r.report.drift_events,
                adapt(r.adapt_coverage),
                adapt(r.adapt_waste)
            );
        }
        let model = &results[0];
        let per_metric: Vec<String> = Metric::ALL
            .iter()
            .map(|m| {
                let a = model.report.metrics.get(*m);
                format!(
                    "{m} {:.1}%/{:.1}%",
                    a.coverage * 100.0,
                    a.mean_waste * 100.0
                )
            })
            .collect();
        println!("  model per metric (coverage/waste): {}", per_metric.join(", "));

        let meets = model.meets_targets();
        let beats: Vec<(String, bool, String)> = results[1..]
            .iter()
            .map(|b| {
                let (ok, why) = compare(model, b);
                (b.predictor.clone(), ok, why)
            })
            .collect();
        let pass = meets && beats.iter().all(|b| b.1);
        all_pass &= pass;
        println!(
            "verdict {}: {} — model coverage {:.1}% (target >= {:.0}%), waste {:.1}% (target <= {:.0}%); {}",
            shape.name(),
            if pass { "PASS" } else { "FAIL" },
            model.report.coverage * 100.0,
            COVERAGE_TARGET * 100.0,
            model.report.mean_waste * 100.0,
            WASTE_TARGET * 100.0,
            beats
                .iter()
                .map(|(_, ok, why)| format!("{} {why}", if *ok { "beats" } else { "does NOT beat" }))
                .collect::<Vec<_>>()
                .join("; ")
        );
        outcomes.push(TraceOutcome {
            trace: shape.name(),
            samples: trace.observations.len(),
            shift_index: trace.shift_index,
            results,
            model_meets_targets: meets,
            beats,
        });
    }

    println!(
        "\noverall: {} ({:.1}s)",
        if all_pass { "PASS" } else { "FAIL" },
        started.elapsed().as_secs_f64()
    );
    let out = BenchOutput {
        seed: SEED,
        coverage_target: COVERAGE_TARGET,
        waste_target: WASTE_TARGET,
        model_params: params,
        traces: outcomes,
        all_pass,
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
