//! Backtesting on an operator's own history: `understudy profile backtest --csv FILE`.
//!
//! A history is a CSV file (optionally gzip-compressed) with the header
//! `timestamp_unix_s,cpu_cores,mem_bytes,disk_bytes_per_s,net_bytes_per_s` and one sample per
//! line, in time order (a timestamp may repeat), at any sampling period. [`run`] replays it through the model and the
//! [`super::baseline`]s, one step and one hour ahead, and reports for each predictor the
//! coverage, under-prediction and waste at the configured settings, and its waste at the
//! smallest headroom that reaches the coverage target. The benchmark (`cargo bench --bench
//! profile`) calls the same [`run`] on every trace, so its figures and a backtest's agree.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};

use super::baseline::{LastValue, RollingWindow, StaticPeak};
use super::learner::{Learner, LearnerError, LearnerParams};
use super::model::HOUR_MS;
use super::replay::{self, hour_ahead_samples, AtTarget, ReplayResult};
use super::{Metric, Observation, Predictor, MAX_VALUE};

/// The header a history must start with.
pub const HEADER: &str = "timestamp_unix_s,cpu_cores,mem_bytes,disk_bytes_per_s,net_bytes_per_s";
/// Fewest samples a backtest accepts.
pub const MIN_SAMPLES: usize = 100;
/// Shortest history a backtest accepts: a day, so that the hour-ahead forecasts and the
/// 24-hour window have something to work with.
pub const MIN_SPAN_MS: u64 = 24 * HOUR_MS;
/// Most samples read (a year at 3 s).
pub const MAX_SAMPLES: usize = 10_000_000;
/// Largest headroom searched for the coverage target.
pub const MAX_HEADROOM: f64 = 2.0;
/// Malformed lines listed in an error (all are counted).
const MAX_LISTED: usize = 20;

/// Errors of a backtest.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    /// The file could not be opened or read (or is not valid gzip).
    #[error("{}: cannot read the history", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The first line is not [`HEADER`].
    #[error("{}: line 1: expected the header {HEADER:?}, found {found:?}", path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What the first line holds (truncated).
        found: String,
    },
    /// Lines that are not samples.
    #[error("{}", render_malformed(path, lines, *count))]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The first malformed lines: line number (1 = the header) and what is wrong.
        lines: Vec<(usize, String)>,
        /// How many lines are malformed in all.
        count: usize,
    },
    /// More than [`MAX_SAMPLES`] samples.
    #[error("{}: more than {MAX_SAMPLES} samples; backtest a shorter period", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Too few samples, or too short a period, to judge a model.
    #[error("{}: {samples} samples over {span_h:.1} h; a backtest needs at least {MIN_SAMPLES} samples covering 24 h", path.display())]
    TooFew {
        /// The file.
        path: PathBuf,
        /// Samples read.
        samples: usize,
        /// Hours between the first and the last sample.
        span_h: f64,
    },
    /// The settings make invalid model parameters.
    #[error("invalid profile settings")]
    Params(#[from] LearnerError),
}

fn render_malformed(path: &Path, lines: &[(usize, String)], count: usize) -> String {
    let mut s = format!(
        "{}: {count} malformed line{}:",
        path.display(),
        if count == 1 { "" } else { "s" }
    );
    for (n, what) in lines {
        let _ = write!(s, "\n{}: line {n}: {what}", path.display());
    }
    if count > lines.len() {
        let _ = write!(s, "\n(and {} more)", count - lines.len());
    }
    s
}

/// Reads a history file; gzip is recognised by its magic bytes.
pub fn load(path: &Path) -> Result<Vec<Observation>, BacktestError> {
    let io_err = |source| BacktestError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = BufReader::new(File::open(path).map_err(io_err)?);
    let gzip = file.fill_buf().map_err(io_err)?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn BufRead> = if gzip {
        Box::new(BufReader::new(MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    };
    parse(reader, path)
}

/// Parses a history (see the module documentation); `path` names it in errors.
pub fn parse(reader: impl Read, path: &Path) -> Result<Vec<Observation>, BacktestError> {
    let mut lines = BufReader::new(reader).lines();
    let io_err = |source| BacktestError::Io {
        path: path.to_owned(),
        source,
    };
    let header = lines
        .next()
        .transpose()
        .map_err(io_err)?
        .unwrap_or_default();
    if header.trim() != HEADER {
        return Err(BacktestError::Header {
            path: path.to_owned(),
            found: header.chars().take(120).collect(),
        });
    }
    let mut obs: Vec<Observation> = Vec::new();
    let mut bad: Vec<(usize, String)> = Vec::new();
    let mut count = 0;
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let line = line.map_err(io_err)?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line, obs.last().map(|o| o.ts_unix_ms)) {
            Ok(o) => {
                if obs.len() >= MAX_SAMPLES {
                    return Err(BacktestError::TooLarge {
                        path: path.to_owned(),
                    });
                }
                obs.push(o);
            }
            Err(what) => {
                count += 1;
                if bad.len() < MAX_LISTED {
                    bad.push((n, what));
                }
            }
        }
    }
    if count > 0 {
        return Err(BacktestError::Malformed {
            path: path.to_owned(),
            lines: bad,
            count,
        });
    }
    let span = match (obs.first(), obs.last()) {
        (Some(a), Some(b)) => b.ts_unix_ms - a.ts_unix_ms,
        _ => 0,
    };
    if obs.len() < MIN_SAMPLES || span < MIN_SPAN_MS {
        return Err(BacktestError::TooFew {
            path: path.to_owned(),
            samples: obs.len(),
            span_h: span as f64 / HOUR_MS as f64,
        });
    }
    Ok(obs)
}

fn parse_line(line: &str, previous_ms: Option<u64>) -> Result<Observation, String> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    if fields.len() != 5 {
        return Err(format!(
            "expected 5 comma-separated fields, found {}",
            fields.len()
        ));
    }
    let ts_s: u64 = fields[0]
        .parse()
        .map_err(|_| format!("timestamp {:?} is not a whole number of seconds", fields[0]))?;
    let ts_unix_ms = ts_s
        .checked_mul(1000)
        .ok_or_else(|| format!("timestamp {ts_s} is out of range"))?;
    if let Some(prev) = previous_ms {
        // A repeated timestamp is kept (real exports repeat rows); going back is an error.
        if ts_unix_ms < prev {
            return Err(format!(
                "timestamp {ts_s} is before the previous sample's {} (samples must be in time order)",
                prev / 1000
            ));
        }
    }
    let names = [
        "cpu_cores",
        "mem_bytes",
        "disk_bytes_per_s",
        "net_bytes_per_s",
    ];
    let mut v = [0.0; 4];
    for k in 0..4 {
        let x: f64 = fields[k + 1]
            .parse()
            .map_err(|_| format!("{} {:?} is not a number", names[k], fields[k + 1]))?;
        if !(x.is_finite() && (0.0..=MAX_VALUE).contains(&x)) {
            return Err(format!(
                "{} {:?} is not between 0 and {MAX_VALUE:e}",
                names[k],
                fields[k + 1]
            ));
        }
        v[k] = x;
    }
    Ok(Observation {
        ts_unix_ms,
        cpu_cores: v[0],
        mem_bytes: v[1].round() as u64,
        disk_bytes_per_s: v[2],
        net_bytes_per_s: v[3],
        config: BTreeMap::new(),
        peers: Vec::new(),
    })
}

/// Writes observations as a history file's content (the inverse of [`parse`], to the second).
pub fn to_csv(obs: &[Observation]) -> String {
    let mut s = String::with_capacity(obs.len() * 64);
    s.push_str(HEADER);
    s.push('\n');
    for o in obs {
        let _ = writeln!(
            s,
            "{},{},{},{},{}",
            o.ts_unix_ms / 1000,
            o.cpu_cores,
            o.mem_bytes,
            o.disk_bytes_per_s,
            o.net_bytes_per_s
        );
    }
    s
}

/// The figures of one horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HorizonReport {
    /// Observations ahead each prediction is made (0 = one step).
    pub horizon: usize,
    /// Every predictor at the configured headroom (the model also at its coverage target).
    pub configured: Vec<ReplayResult>,
    /// Every predictor at the smallest headroom reaching the coverage target.
    pub at_target: Vec<AtTarget>,
}

impl HorizonReport {
    /// Whether this is the one-step horizon.
    pub fn label(&self) -> String {
        if self.horizon == 0 {
            "one step ahead".into()
        } else {
            format!(
                "1 hour ahead (predicted {} samples earlier)",
                self.horizon + 1
            )
        }
    }
}

/// A backtest's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BacktestReport {
    /// Samples replayed.
    pub samples: usize,
    /// Median sampling period, seconds.
    pub period_s: f64,
    /// Days between the first and the last sample.
    pub span_days: f64,
    /// The coverage target the model calibrates to, and the at-target figures use.
    pub coverage_target: f64,
    /// The configured headroom.
    pub headroom: f64,
    /// One step ahead, then one hour ahead.
    pub horizons: Vec<HorizonReport>,
}

/// The predictors compared, all without headroom (it is applied when scoring): the model with
/// `params`, then the baselines.
pub fn predictors(params: &LearnerParams) -> Result<Vec<Box<dyn Predictor>>, LearnerError> {
    let mut p = params.clone();
    p.model.headroom = 0.0;
    Ok(vec![
        Box::new(Learner::new(p)?),
        Box::new(RollingWindow::new(0.0)),
        Box::new(LastValue::new(0.0)),
        Box::new(StaticPeak::new(0.0)),
    ])
}

/// Replays `obs` through the model (with `params`) and the baselines, one step and one hour
/// ahead. `shift_index` marks a known regime shift (synthetic traces) for the adaptation
/// figures.
pub fn run(
    obs: &[Observation],
    shift_index: Option<usize>,
    params: &LearnerParams,
) -> Result<BacktestReport, LearnerError> {
    params.validate()?;
    let target = params.model.coverage_target;
    let headroom = params.model.headroom;
    let hour = hour_ahead_samples(obs);
    let mut horizons = Vec::new();
    for horizon in [0, hour.max(1)] {
        let mut configured = Vec::new();
        let mut at_target = Vec::new();
        for mut p in predictors(params)? {
            let rec = replay::replay(obs, shift_index, p.as_mut(), horizon);
            configured.push(rec.score(headroom));
            at_target.push(rec.at_target(target, MAX_HEADROOM));
        }
        horizons.push(HorizonReport {
            horizon,
            configured,
            at_target,
        });
    }
    let span = match (obs.first(), obs.last()) {
        (Some(a), Some(b)) => b.ts_unix_ms - a.ts_unix_ms,
        _ => 0,
    };
    Ok(BacktestReport {
        samples: obs.len(),
        period_s: HOUR_MS as f64 / (hour + 1) as f64 / 1000.0,
        span_days: span as f64 / (24 * HOUR_MS) as f64,
        coverage_target: target,
        headroom,
        horizons,
    })
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

impl fmt::Display for BacktestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} samples, one every {:.0} s, over {:.1} days; coverage target {}, headroom {}",
            self.samples,
            self.period_s,
            self.span_days,
            pct(self.coverage_target),
            pct(self.headroom)
        )?;
        for h in &self.horizons {
            writeln!(f, "\n== {} ==", h.label())?;
            writeln!(
                f,
                "at the configured settings:\n{:<16} {:<8} {:>9} {:>9} {:>9}",
                "predictor", "metric", "coverage", "under", "waste"
            )?;
            for r in &h.configured {
                for m in Metric::ALL {
                    let a = r.report.metrics.get(m);
                    writeln!(
                        f,
                        "{:<16} {:<8} {:>9} {:>9} {:>9}",
                        r.predictor,
                        m.name(),
                        pct(a.coverage),
                        pct(a.under_rate),
                        pct(a.mean_waste)
                    )?;
                }
                writeln!(
                    f,
                    "{:<16} {:<8} {:>9} {:>9} {:>9}",
                    r.predictor,
                    "overall",
                    pct(r.report.coverage),
                    pct(r.report.under_rate),
                    pct(r.report.mean_waste)
                )?;
            }
            writeln!(
                f,
                "at the smallest headroom reaching {} coverage:\n{:<16} {:>9} {:>9} {:>9}",
                pct(self.coverage_target),
                "predictor",
                "headroom",
                "coverage",
                "waste"
            )?;
            for a in &h.at_target {
                match (a.headroom, &a.report) {
                    (Some(hr), Some(r)) => writeln!(
                        f,
                        "{:<16} {:>9} {:>9} {:>9}",
                        a.predictor,
                        pct(hr),
                        pct(r.coverage),
                        pct(r.mean_waste)
                    )?,
                    _ => writeln!(
                        f,
                        "{:<16} does not reach it with up to {} headroom",
                        a.predictor,
                        pct(MAX_HEADROOM)
                    )?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::synthetic::{generate, Shape, TraceSpec};

    fn parse_str(s: &str) -> Result<Vec<Observation>, BacktestError> {
        parse(s.as_bytes(), Path::new("h.csv"))
    }

    fn day_of(step_s: u64) -> String {
        let mut s = format!("{HEADER}\n");
        for i in 0..=(86_400 / step_s) {
            let _ = writeln!(s, "{},0.5,1000,10.5,20", 1_700_000_000 + i * step_s);
        }
        s
    }

    #[test]
    fn reads_a_history_and_its_csv_round_trips() {
        let t = generate(&TraceSpec {
            shape: Shape::Spiky,
            days: 2,
            step_ms: 60_000,
            seed: 9,
        });
        let back = parse_str(&to_csv(&t.observations)).unwrap();
        assert_eq!(back.len(), t.observations.len());
        for (a, b) in back.iter().zip(&t.observations) {
            for m in Metric::ALL {
                assert_eq!(a.value(m), b.value(m));
            }
            assert_eq!(a.ts_unix_ms, b.ts_unix_ms);
        }
        assert_eq!(parse_str(&day_of(300)).unwrap().len(), 289);
    }

    #[test]
    fn a_backtest_of_a_csv_matches_the_bench_replay_of_its_trace() {
        // What bench-profile does with a synthetic trace...
        let t = generate(&TraceSpec {
            shape: Shape::DiurnalWeekly,
            days: 3,
            step_ms: 300_000,
            seed: 4,
        });
        let params = LearnerParams::default();
        let bench = run(&t.observations, None, &params).unwrap();
        // ...and what `understudy profile backtest --csv` does with it written out (gzipped, so
        // that path is exercised too).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::default(),
        );
        io::Write::write_all(&mut gz, to_csv(&t.observations).as_bytes()).unwrap();
        gz.finish().unwrap();
        let back = run(&load(&path).unwrap(), None, &params).unwrap();
        assert_eq!(back.horizons.len(), 2);
        assert_eq!(back.horizons[1].horizon, 11);
        for (a, b) in bench.horizons.iter().zip(&back.horizons) {
            assert_eq!(a.at_target, b.at_target);
            for (x, y) in a.configured.iter().zip(&b.configured) {
                // The CSV carries no configuration or peers, so the configuration and
                // dependency drift of the synthetic trace is absent: resource figures only.
                assert_eq!(x.report.metrics, y.report.metrics);
                assert_eq!(
                    (x.report.coverage, x.report.under_rate, x.report.mean_waste),
                    (y.report.coverage, y.report.under_rate, y.report.mean_waste)
                );
            }
        }
        assert_eq!(bench.samples, back.samples);
        assert_eq!(bench.period_s, 300.0);
        let text = back.to_string();
        assert!(
            text.contains("== 1 hour ahead (predicted 12 samples earlier) =="),
            "{text}"
        );
        assert!(text.contains("rolling_p95_24h"), "{text}");
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let mut s = day_of(300);
        // Line 4 (header = line 1) gets a bad number, line 7 a missing field, line 9 goes back
        // in time.
        let mut lines: Vec<String> = s.lines().map(String::from).collect();
        lines[3] = "1700000600,abc,1000,10,20".into();
        lines[6] = "1700001500,0.5,1000,10".into();
        lines[8] = "1700000000,0.5,1000,10,20".into();
        s = lines.join("\n");
        let err = parse_str(&s).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, BacktestError::Malformed { count: 3, lines, .. }
                if lines.iter().map(|l| l.0).collect::<Vec<_>>() == [4, 7, 9]),
            "{text}"
        );
        assert!(
            text.contains("h.csv: line 4: cpu_cores \"abc\" is not a number"),
            "{text}"
        );
        assert!(
            text.contains("line 7: expected 5 comma-separated fields, found 4"),
            "{text}"
        );
        assert!(
            text.contains("line 9: timestamp 1700000000 is before"),
            "{text}"
        );

        let neg = day_of(300).replace("1700000300,0.5", "1700000300,-0.5");
        assert!(parse_str(&neg)
            .unwrap_err()
            .to_string()
            .contains("line 3: cpu_cores \"-0.5\" is not between 0"));
    }

    #[test]
    fn a_wrong_header_or_too_little_history_is_a_clear_error() {
        let err = parse_str("ts,cpu\n1,2\n").unwrap_err();
        assert!(
            err.to_string().contains("line 1: expected the header"),
            "{err}"
        );
        let short: String = day_of(300).lines().take(50).collect::<Vec<_>>().join("\n");
        let err = parse_str(&short).unwrap_err();
        assert!(
            err.to_string().contains(
                "49 samples over 4.0 h; a backtest needs at least 100 samples covering 24 h"
            ),
            "{err}"
        );
    }
}
