//! Replays every target's inputs without AFL: the seeds from the tree, the corpus kept from
//! earlier runs (`fuzz/corpus/<target>/`) and every input that once crashed a target
//! (`fuzz/crashes/<target>/`). A regression on any known input fails here, in `make test`.

use std::panic;
use std::path::{Path, PathBuf};

use understudy_fuzz::TARGETS;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `(target, seed directories)` from `fuzz/targets`.
fn listed() -> Vec<(String, Vec<String>)> {
    include_str!("../targets")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace().map(str::to_string);
            (words.next().unwrap(), words.collect())
        })
        .collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn every_listed_target_exists_and_every_target_is_listed() {
    let names: Vec<String> = listed().into_iter().map(|(n, _)| n).collect();
    let known: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        names, known,
        "fuzz/targets and understudy_fuzz::TARGETS disagree"
    );
}

#[test]
fn corpus_and_past_crashes_replay_cleanly() {
    // Failures are collected, not thrown one by one: the report lists every bad input.
    panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut total = 0;
    for (name, seeds) in listed() {
        let check = TARGETS.iter().find(|(n, _)| *n == name).unwrap().1;
        let mut dirs: Vec<PathBuf> = seeds.iter().map(|s| repo().join(s)).collect();
        dirs.push(repo().join("fuzz/corpus").join(&name));
        dirs.push(repo().join("fuzz/crashes").join(&name));
        let inputs: Vec<PathBuf> = dirs.iter().flat_map(|d| files(d)).collect();
        if inputs.is_empty() {
            failures.push(format!("{name}: no input to replay"));
        }
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            if let Err(e) = panic::catch_unwind(|| check(&data)) {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{name}: {}: {why}", input.display()));
            }
        }
        eprintln!("{name}: {} inputs replayed", inputs.len());
        total += inputs.len();
    }
    let _ = panic::take_hook();
    assert!(
        failures.is_empty(),
        "{} of {total} inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
