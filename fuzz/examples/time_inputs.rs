//! CPU cost of one target's check per input, without AFL's fork server or scheduling: runs
//! every input of the given files and directories `ROUNDS` times (default 5) and prints the
//! mean per input, the distribution and the slowest inputs. Built normally it measures the
//! parsers; built by `FUZZ_EXAMPLES=1 FUZZ_SECONDS=1 scripts/fuzz.sh <target>` (with the
//! targets, the same flags) it measures them as AFL runs them: instrumented, debug assertions
//! on but for indextree's (see `scripts/fuzz-rustc.sh`). Measure CPU, not wall time, on a
//! shared machine: `ROUNDS=2 perf stat -e task-clock time_inputs ...`.
//!
//! usage: time_inputs <target> <file or directory>...

use std::path::PathBuf;
use std::time::{Duration, Instant};

use understudy_fuzz::TARGETS;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else {
        eprintln!("usage: time_inputs <target> <file or directory>...");
        std::process::exit(2);
    };
    let Some(&(_, check)) = TARGETS.iter().find(|(n, _)| *n == name) else {
        eprintln!("time_inputs: unknown target {name}");
        std::process::exit(2);
    };
    let rounds: u32 = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut paths: Vec<PathBuf> = Vec::new();
    for a in args {
        let p = PathBuf::from(a);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&p)
                .expect("readable directory")
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            paths.extend(files);
        } else {
            paths.push(p);
        }
    }
    let inputs: Vec<(PathBuf, Vec<u8>)> = paths
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).expect("readable input");
            (p, data)
        })
        .collect();
    if inputs.is_empty() {
        eprintln!("time_inputs: no input");
        std::process::exit(2);
    }
    // One round first, untimed: allocator and page-cache warm-up.
    for (_, data) in &inputs {
        check(data);
    }
    let mut per_input = vec![Duration::ZERO; inputs.len()];
    let started = Instant::now();
    for _ in 0..rounds {
        for (i, (_, data)) in inputs.iter().enumerate() {
            let t = Instant::now();
            check(data);
            per_input[i] += t.elapsed();
        }
    }
    let total = started.elapsed();
    let mut us: Vec<(f64, usize)> = per_input
        .iter()
        .enumerate()
        .map(|(i, d)| (d.as_secs_f64() * 1e6 / f64::from(rounds), i))
        .collect();
    us.sort_by(|a, b| a.0.total_cmp(&b.0));
    let pct = |p: f64| us[((us.len() - 1) as f64 * p) as usize].0;
    let bytes: usize = inputs.iter().map(|(_, d)| d.len()).sum();
    println!(
        "{name}: {} inputs ({} bytes, mean {} bytes), {rounds} rounds in {:.3} s",
        inputs.len(),
        bytes,
        bytes / inputs.len(),
        total.as_secs_f64()
    );
    println!(
        "per input: mean {:.1} us ({:.0} inputs/s), median {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}",
        total.as_secs_f64() * 1e6 / f64::from(rounds) / inputs.len() as f64,
        f64::from(rounds) * inputs.len() as f64 / total.as_secs_f64(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    for (t, i) in us.iter().rev().take(5) {
        let (p, d) = &inputs[*i];
        println!("  {t:10.1} us  {:7} bytes  {}", d.len(), p.display());
    }
}
