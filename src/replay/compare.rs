//! Judging replayed answers.
//!
//! A canary's answer to a request is compared with the unchanged baseline's (both replayed from
//! the same recording, on copies of the same data); what the baseline itself answers
//! differently from the recorded primary is noise (time, per-guest identity, data that moved
//! on since the recording) and is not held against the canary, as Diffy does with two copies
//! of the current version. Bodies are compared by line after the class's ignore patterns are
//! removed. A standby check compares a shadow's answers with the recorded ones directly.

use serde::{Deserialize, Serialize};

use super::{Answer, ReplayError};
use crate::capture::{Exchange, Record};
use crate::config::ReplayConfig;

/// Differences listed per request at most.
const MAX_DETAILS: usize = 4;
/// Characters of a line quoted in a difference.
const QUOTE: usize = 80;

/// Removes the ignored parts of bodies.
#[derive(Debug, Clone)]
pub struct Normalizer {
    ignore: Vec<regex::Regex>,
}

impl Normalizer {
    /// From a class's `replay.ignore` patterns.
    pub fn new(patterns: &[String]) -> Result<Self, ReplayError> {
        let ignore = patterns
            .iter()
            .map(|p| {
                regex::RegexBuilder::new(p)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|source| ReplayError::Pattern {
                        pattern: p.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { ignore })
    }

    /// The body's lines with the ignored parts removed; lines left blank are dropped (an
    /// ignore pattern may take whole lines, such as the records of a growing list).
    pub fn lines(&self, body: &str) -> Vec<String> {
        let mut s = body.to_string();
        for p in &self.ignore {
            s = p.replace_all(&s, "").into_owned();
        }
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// The recorded answer of a record: (status, body).
pub fn recorded(r: &Record) -> (Option<u16>, String) {
    match &r.exchange {
        Exchange::Http { response, .. } => match response {
            Some(resp) => (
                Some(resp.status),
                String::from_utf8_lossy(&resp.body.bytes()).into_owned(),
            ),
            None => (None, String::new()),
        },
        Exchange::Stream { to_client, .. } => (
            None,
            String::from_utf8_lossy(&to_client.bytes()).into_owned(),
        ),
    }
}

/// What a request is, for people: `GET /ledger`, or the stream's connection.
pub fn describe(r: &Record) -> String {
    match &r.exchange {
        Exchange::Http { request, .. } => format!("{} {}", request.method, request.target),
        Exchange::Stream { .. } => format!("tcp {} -> {}", r.client, r.server),
    }
}

/// One request whose answers differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestDiff {
    /// Record sequence number.
    pub seq: u64,
    /// `METHOD target`.
    pub request: String,
    /// Recorded status.
    pub recorded_status: Option<u16>,
    /// The reference's status (the baseline's, or the recorded one for a standby check).
    pub expected_status: Option<u16>,
    /// The judged answer's status.
    pub got_status: Option<u16>,
    /// What differs.
    pub what: Vec<String>,
}

/// Latency of one side of a replay, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Of the answers' latencies.
    pub fn of(answers: &[Answer]) -> Self {
        let mut v: Vec<f64> = answers.iter().map(|a| a.latency_ms).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| {
            if v.is_empty() {
                0.0
            } else {
                v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
            }
        };
        Self {
            p50: q(0.5),
            p99: q(0.99),
            max: q(1.0),
        }
    }
}

/// A canary's answers judged against the baseline's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Requests replayed.
    pub requests: usize,
    /// Requests whose canary answer differs beyond the noise.
    pub differing: Vec<RequestDiff>,
    /// Requests where the baseline already differed from the recording (noise filtered).
    pub noisy: usize,
    /// Requests the baseline did not answer.
    pub baseline_errors: usize,
    /// Requests the canary did not answer.
    pub canary_errors: usize,
    /// Baseline latency.
    pub baseline_latency: Latency,
    /// Canary latency.
    pub canary_latency: Latency,
    /// The canary's median latency is beyond `latency_factor` x the baseline's plus
    /// `latency_slack_ms`.
    pub slower: bool,
}

/// The overall verdict of a canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryVerdict {
    /// Nothing differs beyond the noise.
    Clean,
    /// Some answers differ, or it is slower.
    Differs,
}

impl Comparison {
    /// Clean or not.
    pub fn verdict(&self) -> CanaryVerdict {
        if self.differing.is_empty() && !self.slower {
            CanaryVerdict::Clean
        } else {
            CanaryVerdict::Differs
        }
    }

    /// Share of requests whose canary answer matched (1.0 without requests).
    pub fn fidelity(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            1.0 - self.differing.len() as f64 / self.requests as f64
        }
    }
}

fn quote(s: Option<&String>) -> String {
    match s {
        None => "(no line)".into(),
        Some(s) => format!("{:?}", s.chars().take(QUOTE).collect::<String>()),
    }
}

/// Differences between `got` and `expected`, ignoring those where `expected` already differs
/// from `reference` (noise). With `reference` None nothing is noise.
fn differences(
    norm: &Normalizer,
    expected: &Answer,
    got: &Answer,
    reference: Option<(Option<u16>, &str)>,
) -> (Vec<String>, bool) {
    let mut what = Vec::new();
    let mut noisy = false;
    if let Some(e) = &got.error {
        if expected.error.is_none() {
            what.push(format!("no answer: {e}"));
            return (what, noisy);
        }
    }
    let status_noise = reference.is_some_and(|(s, _)| s.is_some() && s != expected.status);
    noisy |= status_noise;
    if got.status != expected.status && !status_noise {
        what.push(format!(
            "status {} -> {}",
            expected.status.map_or("-".into(), |s| s.to_string()),
            got.status.map_or("-".into(), |s| s.to_string())
        ));
    }
    let (el, gl) = (norm.lines(&expected.body), norm.lines(&got.body));
    let rl = reference.map(|(_, b)| norm.lines(b));
    for i in 0..el.len().max(gl.len()) {
        if el.get(i) == gl.get(i) {
            if rl.as_ref().is_some_and(|r| r.get(i) != el.get(i)) {
                noisy = true;
            }
            continue;
        }
        if rl.as_ref().is_some_and(|r| r.get(i) != el.get(i)) {
            noisy = true;
            continue;
        }
        if what.len() < MAX_DETAILS {
            what.push(format!(
                "body line {}: {} -> {}",
                i + 1,
                quote(el.get(i)),
                quote(gl.get(i))
            ));
        }
    }
    (what, noisy)
}

/// Judges a canary's answers against the baseline's (`records`, `baseline` and `canary` in
/// the same order).
pub fn compare_canary(
    records: &[Record],
    baseline: &[Answer],
    canary: &[Answer],
    norm: &Normalizer,
    cfg: &ReplayConfig,
) -> Comparison {
    let mut differing = Vec::new();
    let mut noisy = 0;
    for ((r, b), c) in records.iter().zip(baseline).zip(canary) {
        let (rs, rb) = recorded(r);
        let (what, noise) = differences(norm, b, c, Some((rs, &rb)));
        noisy += usize::from(noise);
        if !what.is_empty() {
            differing.push(RequestDiff {
                seq: r.seq,
                request: describe(r),
                recorded_status: rs,
                expected_status: b.status,
                got_status: c.status,
                what,
            });
        }
    }
    let (bl, cl) = (Latency::of(baseline), Latency::of(canary));
    Comparison {
        requests: records.len().min(baseline.len()).min(canary.len()),
        differing,
        noisy,
        baseline_errors: baseline.iter().filter(|a| a.error.is_some()).count(),
        canary_errors: canary.iter().filter(|a| a.error.is_some()).count(),
        baseline_latency: bl,
        canary_latency: cl,
        slower: cl.p50 > cfg.latency_factor * bl.p50 + cfg.latency_slack_ms,
    }
}

/// A standby's answers judged against the recorded ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyVerdict {
    /// Requests replayed.
    pub requests: usize,
    /// Requests answered as recorded.
    pub matched: usize,
    /// The others (at most 20 listed).
    pub mismatches: Vec<RequestDiff>,
    /// `matched / requests` reached the class's `verify_min_match`.
    pub passed: bool,
}

/// Judges `answers` against the recorded answers of `records`.
pub fn verify(
    records: &[Record],
    answers: &[Answer],
    norm: &Normalizer,
    min_match: f64,
) -> VerifyVerdict {
    let mut matched = 0;
    let mut mismatches = Vec::new();
    for (r, a) in records.iter().zip(answers) {
        let (rs, rb) = recorded(r);
        let expected = Answer {
            status: rs,
            body: rb,
            ..Answer::default()
        };
        let (what, _) = differences(norm, &expected, a, None);
        if what.is_empty() {
            matched += 1;
        } else if mismatches.len() < 20 {
            mismatches.push(RequestDiff {
                seq: r.seq,
                request: describe(r),
                recorded_status: rs,
                expected_status: rs,
                got_status: a.status,
                what,
            });
        }
    }
    let requests = records.len().min(answers.len());
    VerifyVerdict {
        requests,
        matched,
        mismatches,
        passed: requests > 0 && matched as f64 >= min_match * requests as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Body, HttpRequest, HttpResponse};

    fn rec(seq: u64, target: &str, status: u16, body: &str) -> Record {
        Record {
            seq,
            at_unix_ms: 0,
            client: "10.0.0.1:1".parse().unwrap(),
            server: "10.0.0.10:80".parse().unwrap(),
            latency_ms: Some(1.0),
            exchange: Exchange::Http {
                request: HttpRequest {
                    method: "GET".into(),
                    target: target.into(),
                    version: 0,
                    headers: vec![],
                    body: Body::default(),
                },
                response: Some(HttpResponse {
                    status,
                    headers: vec![],
                    body: Body::new(body.as_bytes(), 0),
                }),
            },
        }
    }

    fn ans(status: u16, body: &str) -> Answer {
        Answer {
            status: Some(status),
            body: body.into(),
            latency_ms: 5.0,
            error: None,
        }
    }

    #[test]
    fn a_broken_path_differs_and_noise_does_not() {
        let norm = Normalizer::new(&["uuid=\\S+".into()]).unwrap();
        let records = vec![
            rec(1, "/", 200, "guest uuid=aaa role=primary\n"),
            rec(2, "/ledger", 200, "k1\n"),
            rec(3, "/time", 200, "t=1\n"),
        ];
        // The baseline's ledger grew since the recording and its clock moved: noise.
        let baseline = vec![
            ans(200, "guest uuid=bbb role=primary\n"),
            ans(200, "k1\nk2\n"),
            ans(200, "t=2\n"),
        ];
        let canary = vec![
            ans(200, "guest uuid=ccc role=primary\n"),
            ans(503, "data disk not mounted\n"),
            ans(200, "t=3\n"),
        ];
        let c = compare_canary(
            &records,
            &baseline,
            &canary,
            &norm,
            &ReplayConfig::default(),
        );
        assert_eq!(c.verdict(), CanaryVerdict::Differs);
        assert_eq!(c.differing.len(), 1, "{:?}", c.differing);
        assert_eq!(c.differing[0].request, "GET /ledger");
        assert!(c.differing[0].what[0].contains("status 200 -> 503"));
        assert_eq!(c.noisy, 2);
        let same = compare_canary(
            &records,
            &baseline,
            &baseline,
            &norm,
            &ReplayConfig::default(),
        );
        assert_eq!(same.verdict(), CanaryVerdict::Clean);
        assert_eq!(same.fidelity(), 1.0);
    }

    #[test]
    fn slower_canary_is_reported() {
        let norm = Normalizer::new(&[]).unwrap();
        let records = vec![rec(1, "/", 200, "x")];
        let mut slow = ans(200, "x");
        slow.latency_ms = 500.0;
        let c = compare_canary(
            &records,
            &[ans(200, "x")],
            &[slow],
            &norm,
            &ReplayConfig::default(),
        );
        assert!(c.slower);
        assert_eq!(c.verdict(), CanaryVerdict::Differs);
    }

    #[test]
    fn verification_matches_recorded_answers() {
        let norm = Normalizer::new(&["uuid=\\S+".into()]).unwrap();
        let records = vec![rec(1, "/", 200, "uuid=a ok\n"), rec(2, "/x", 404, "no\n")];
        let ok = verify(
            &records,
            &[ans(200, "uuid=b ok\n"), ans(404, "no\n")],
            &norm,
            0.99,
        );
        assert!(ok.passed);
        let bad = verify(
            &records,
            &[ans(500, "boom\n"), ans(404, "no\n")],
            &norm,
            0.99,
        );
        assert!(!bad.passed);
        assert_eq!(bad.mismatches[0].request, "GET /");
    }
}
