//! An external client's view of a service: a new HTTP GET every interval, each on its own
//! (requests overlap, as many independent clients would), recording who answered and when.
//! Used by `understudy probe`, the demo, the failover bench, and the daemon's missed-failover
//! check.
//!
//! Requests must overlap to measure a gap honestly: a single client waiting out a timeout on a
//! SYN that hit a dead guest would report its own timeout, not the service's outage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response read; the first line of the body is all a probe needs.
const MAX_RESPONSE: usize = 64 * 1024;

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// When the answer was complete.
    pub at: Instant,
    /// First line of the body (at most 256 bytes), identifying who answered.
    pub body: String,
}

/// One HTTP/1.0 GET with one deadline for the whole exchange; returns the body's first line
/// for a 2xx answer. Reads at most 64 KiB.
pub async fn http_get_async(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(request(addr, path).as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        (&mut s)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut buf)
            .await
            .ok()?;
        first_body_line(&buf)
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

fn request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
}

fn first_body_line(buf: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(buf);
    let status_ok = text
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'));
    if !status_ok {
        return None;
    }
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let mut line = body.lines().next().unwrap_or("").trim().to_string();
    line.truncate(256);
    Some(line)
}

/// A running probe: a background thread launching one request per interval.
pub struct Prober {
    answers: Arc<Mutex<Vec<Answer>>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Prober {
    /// Starts probing `addr` + `path`: a new request every `interval`, each allowed `timeout`.
    pub fn start(
        addr: SocketAddr,
        path: &str,
        interval: Duration,
        timeout: Duration,
    ) -> std::io::Result<Prober> {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (a, n, st, path) = (
            answers.clone(),
            sent.clone(),
            stop.clone(),
            path.to_string(),
        );
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut tick = tokio::time::interval(interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    while !st.load(Ordering::Relaxed) {
                        tick.tick().await;
                        n.fetch_add(1, Ordering::Relaxed);
                        let (a, path) = (a.clone(), path.clone());
                        tokio::spawn(async move {
                            if let Some(body) = http_get_async(addr, &path, timeout).await {
                                a.lock().unwrap_or_else(|e| e.into_inner()).push(Answer {
                                    at: Instant::now(),
                                    body,
                                });
                            }
                        });
                    }
                    // Let requests in flight finish (or time out) before the runtime goes.
                    tokio::time::sleep(timeout).await;
                });
            })?;
        Ok(Prober {
            answers,
            sent,
            stop,
            thread: Some(thread),
            started: Instant::now(),
        })
    }

    /// A copy of the answers so far, in completion order.
    pub fn answers(&self) -> Vec<Answer> {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests launched so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// When the probe started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Stops launching requests, waits for those in flight, returns every answer.
    pub fn finish(mut self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.answers()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The outage around `event`: from the last answer completed before it to the first answer
/// after it whose body satisfies `is_new` (e.g. names the shadow). `None` if either is missing.
pub fn outage_around(
    answers: &[Answer],
    event: Instant,
    is_new: impl Fn(&str) -> bool,
) -> Option<Duration> {
    let before = answers
        .iter()
        .filter(|a| a.at <= event)
        .map(|a| a.at)
        .max()?;
    let after = answers
        .iter()
        .filter(|a| a.at > event && is_new(&a.body))
        .map(|a| a.at)
        .min()?;
    Some(after - before)
}

/// Summary of a probe run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeSummary {
    /// The longest gap between consecutive answers.
    pub max_gap: Duration,
    /// When (relative to the start) that gap ended.
    pub max_gap_end: Duration,
    /// Each change of the answering body: (time since start, new body).
    pub changes: Vec<(Duration, String)>,
}

/// Longest gap and body changes over `answers` (completion order), relative to `start`.
pub fn summarize(answers: &[Answer], start: Instant) -> ProbeSummary {
    let mut sorted: Vec<&Answer> = answers.iter().collect();
    sorted.sort_by_key(|a| a.at);
    let mut s = ProbeSummary::default();
    let mut prev: Option<&Answer> = None;
    for a in sorted {
        match prev {
            Some(p) => {
                let gap = a.at - p.at;
                if gap > s.max_gap {
                    s.max_gap = gap;
                    s.max_gap_end = a.at - start;
                }
                if p.body != a.body {
                    s.changes.push((a.at - start, a.body.clone()));
                }
            }
            None => s
                .changes
                .push((a.at.saturating_duration_since(start), a.body.clone())),
        }
        prev = Some(a);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A loopback server answering body `bodies[i]` to the i-th connection (last one repeats).
    fn serve(bodies: Vec<&'static str>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for (i, conn) in l.incoming().enumerate() {
                let Ok(mut c) = conn else { continue };
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let body = bodies[i.min(bodies.len() - 1)];
                let _ = c.write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}\n").as_bytes());
            }
        });
        addr
    }

    #[test]
    fn prober_records_who_answered_and_summary_finds_the_change() {
        let addr = serve(vec!["a", "a", "a", "b"]);
        let p = Prober::start(
            addr,
            "/",
            Duration::from_millis(5),
            Duration::from_millis(500),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let start = p.started();
        let answers = p.finish();
        assert!(answers.len() >= 4, "{answers:?}");
        let s = summarize(&answers, start);
        let bodies: Vec<&str> = s.changes.iter().map(|(_, b)| b.as_str()).collect();
        assert_eq!(bodies.first(), Some(&"a"));
        assert!(bodies.contains(&"b"));
    }

    #[test]
    fn outage_is_last_answer_before_to_first_new_answer_after() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let answers = vec![
            Answer {
                at: at(10),
                body: "old".into(),
            },
            Answer {
                at: at(20),
                body: "old".into(),
            },
            Answer {
                at: at(95),
                body: "old".into(),
            }, // a late answer from the old one
            Answer {
                at: at(130),
                body: "new".into(),
            },
        ];
        let o = outage_around(&answers, at(25), |b| b == "new").unwrap();
        assert_eq!(o, Duration::from_millis(110));
        assert_eq!(outage_around(&answers, at(5), |b| b == "none"), None);
    }

    #[tokio::test]
    async fn non_2xx_and_silence_are_not_answers() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 256];
                let _ = c.read(&mut buf);
                let _ = c.write_all(b"HTTP/1.0 503 Busy\r\n\r\nno\n");
            }
        });
        assert_eq!(
            http_get_async(addr, "/", Duration::from_millis(500)).await,
            None
        );
        // Nobody listens on port 1 of loopback.
        assert_eq!(
            http_get_async(
                "127.0.0.1:1".parse().unwrap(),
                "/",
                Duration::from_millis(200)
            )
            .await,
            None
        );
    }
}
