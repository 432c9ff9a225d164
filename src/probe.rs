//! An external client's view of a service: HTTP GETs at a fixed interval, recording who
//! answered and the gaps between good answers. Used by `understudy probe`, the demo, and as
//! the outside check that tells a missed failover from a quiet one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Milliseconds since the probe started.
    pub at_ms: u64,
    /// First line of the body (bounded), identifying who answered.
    pub body: String,
}

/// What a probe run saw.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered with a 2xx status.
    pub answered: u64,
    /// The longest gap between two consecutive good answers, in ms.
    pub max_gap_ms: u64,
    /// When the longest gap ended (ms since start).
    pub max_gap_end_ms: u64,
    /// Each change of the answering body: (ms since start, new body).
    pub changes: Vec<Answer>,
}

/// One HTTP/1.0 GET with a deadline on connect, write and read; returns the body's first
/// line for a 2xx answer. Reads at most 64 KiB.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    s.take(64 * 1024).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
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

/// Probes `addr` every `interval` for `duration`, calling `on_change` whenever the answering
/// body changes (or answers stop/resume).
pub fn run(
    addr: SocketAddr,
    path: &str,
    interval: Duration,
    timeout: Duration,
    duration: Duration,
    mut on_change: impl FnMut(&Answer, Option<u64>),
) -> ProbeReport {
    let start = Instant::now();
    let mut report = ProbeReport::default();
    let mut last_good: Option<u64> = None;
    let mut last_body: Option<String> = None;
    while start.elapsed() < duration {
        let t = Instant::now();
        report.sent += 1;
        if let Some(body) = http_get(addr, path, timeout) {
            let now = start.elapsed().as_millis() as u64;
            report.answered += 1;
            let gap = last_good.map(|g| now - g);
            if let Some(g) = gap {
                if g > report.max_gap_ms {
                    report.max_gap_ms = g;
                    report.max_gap_end_ms = now;
                }
            }
            if last_body.as_deref() != Some(body.as_str()) {
                let a = Answer {
                    at_ms: now,
                    body: body.clone(),
                };
                on_change(&a, gap);
                report.changes.push(a);
                last_body = Some(body);
            }
            last_good = Some(now);
        }
        if let Some(rest) = interval.checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

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
    fn records_changes_of_the_answering_guest() {
        let addr = serve(vec!["a", "a", "b"]);
        let mut seen = Vec::new();
        let r = run(
            addr,
            "/",
            Duration::from_millis(1),
            Duration::from_millis(500),
            Duration::from_millis(200),
            |a, _| seen.push(a.body.clone()),
        );
        assert_eq!(seen, vec!["a", "b"]);
        assert!(r.answered >= 3);
        assert_eq!(r.changes.len(), 2);
    }

    #[test]
    fn non_2xx_and_silence_are_not_answers() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 256];
                let _ = c.read(&mut buf);
                let _ = c.write_all(b"HTTP/1.0 503 Busy\r\n\r\nno\n");
            }
        });
        assert_eq!(http_get(addr, "/", Duration::from_millis(500)), None);
        // Nobody listens on port 1 of loopback.
        assert_eq!(
            http_get(
                "127.0.0.1:1".parse().unwrap(),
                "/",
                Duration::from_millis(200)
            ),
            None
        );
    }
}
