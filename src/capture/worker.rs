//! One capture thread per recorded service, and [`Captures`], which owns them: started on the
//! service's primary tap, moved when the primary changes, stopped when the class stops asking.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::flow::{FlowLimits, FlowTable, Seen};
use super::sniff::{PacketSocket, MAX_FRAME};
use super::{CaptureError, CaptureStore, Record, Redactor};
use crate::config::CaptureConfig;

/// How often the store is written and idle connections are flushed.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Counters of one service's capture.
#[derive(Debug, Default)]
pub struct Counters {
    frames: AtomicU64,
    stored: AtomicU64,
    rate_dropped: AtomicU64,
    oversize: AtomicU64,
    broken: AtomicU64,
    refused: AtomicU64,
    store_bytes: AtomicU64,
    errors: AtomicU64,
}

/// What `status` and the metrics show of a capture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureStats {
    /// The tap captured.
    pub tap: String,
    /// Frames seen.
    pub frames: u64,
    /// Records stored.
    pub stored: u64,
    /// Records dropped by the rate limit.
    pub rate_dropped: u64,
    /// Records too large for the store.
    pub oversize: u64,
    /// Connections given up (gaps, not HTTP, oversized heads).
    pub broken: u64,
    /// Connections not followed (table full).
    pub refused: u64,
    /// Bytes in the store.
    pub store_bytes: u64,
    /// Store write errors.
    pub errors: u64,
}

struct Worker {
    tap: String,
    cfg: CaptureConfig,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every running capture, by service.
#[derive(Default)]
pub struct Captures {
    workers: Mutex<BTreeMap<String, Worker>>,
}

impl std::fmt::Debug for Captures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captures").finish_non_exhaustive()
    }
}

impl Captures {
    /// No capture running.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `service`'s capture run on `tap` with `cfg` (restarted if either changed).
    pub fn ensure(
        &self,
        service: &str,
        tap: &str,
        cfg: &CaptureConfig,
        state_dir: &Path,
    ) -> Result<bool, CaptureError> {
        let mut w = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = w.get(service) {
            if cur.tap == tap
                && cur.cfg == *cfg
                && cur.thread.as_ref().is_some_and(|t| !t.is_finished())
            {
                return Ok(false);
            }
        }
        w.remove(service);
        let worker = start(service, tap, cfg, &CaptureStore::dir_of(state_dir, service))?;
        w.insert(service.to_string(), worker);
        Ok(true)
    }

    /// Stops the capture of every service not in `keep`.
    pub fn retain(&self, keep: &[String]) {
        let mut w = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = w.keys().filter(|k| !keep.contains(k)).cloned().collect();
        for k in gone {
            tracing::info!(service = %k, "capture stopped");
            w.remove(&k);
        }
    }

    /// Counters per service.
    pub fn stats(&self) -> BTreeMap<String, CaptureStats> {
        let w = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        w.iter()
            .map(|(k, v)| {
                let c = &v.counters;
                let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
                (
                    k.clone(),
                    CaptureStats {
                        tap: v.tap.clone(),
                        frames: g(&c.frames),
                        stored: g(&c.stored),
                        rate_dropped: g(&c.rate_dropped),
                        oversize: g(&c.oversize),
                        broken: g(&c.broken),
                        refused: g(&c.refused),
                        store_bytes: g(&c.store_bytes),
                        errors: g(&c.errors),
                    },
                )
            })
            .collect()
    }
}

fn start(
    service: &str,
    tap: &str,
    cfg: &CaptureConfig,
    dir: &Path,
) -> Result<Worker, CaptureError> {
    let socket = PacketSocket::open(tap, Duration::from_millis(100))?;
    let redactor = Redactor::new(cfg)?;
    let store = CaptureStore::open(dir, cfg.max_bytes)?;
    let table = FlowTable::new(
        cfg.protocol,
        cfg.ports.clone(),
        FlowLimits {
            max_body: cfg.max_body_bytes,
            ..FlowLimits::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut run = Run {
        socket,
        table,
        redactor,
        store,
        bucket: Bucket::new(cfg.max_per_second),
        counters: counters.clone(),
        dir: dir.to_path_buf(),
    };
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("capture-{service}"))
        .spawn(move || run.run(&s))
        .map_err(|source| CaptureError::Thread {
            service: service.to_string(),
            source,
        })?;
    tracing::info!(%service, %tap, protocol = ?cfg.protocol, ports = ?cfg.ports, max_bytes = cfg.max_bytes, "capture started");
    Ok(Worker {
        tap: tap.to_string(),
        cfg: cfg.clone(),
        stop,
        counters,
        thread: Some(thread),
    })
}

/// A token bucket: `rate` records a second, bursts of as many.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: rate as f64,
            tokens: rate as f64,
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Run {
    socket: PacketSocket,
    table: FlowTable,
    redactor: Redactor,
    store: CaptureStore,
    bucket: Bucket,
    counters: Arc<Counters>,
    dir: PathBuf,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Run {
    fn run(&mut self, stop: &AtomicBool) {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut seen = Vec::new();
        let mut last_flush = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            match self.socket.recv(&mut buf) {
                Ok(Some(n)) => {
                    self.counters.frames.fetch_add(1, Ordering::Relaxed);
                    self.table
                        .frame(&buf[..n.min(buf.len())], now_us(), &mut seen);
                }
                Ok(None) => {}
                Err(e) => {
                    // The tap is gone (its domain stopped): the daemon starts a new capture
                    // on the next primary's tap.
                    tracing::info!(tap = %self.socket.link(), error = %e, "capture socket closed");
                    break;
                }
            }
            if last_flush.elapsed() >= FLUSH_EVERY {
                self.table.expire(now_us(), &mut seen);
            }
            for s in seen.drain(..) {
                self.keep(s);
            }
            if last_flush.elapsed() >= FLUSH_EVERY {
                last_flush = Instant::now();
                self.flush();
            }
        }
        let mut rest = Vec::new();
        self.table.expire(u64::MAX, &mut rest);
        for s in rest {
            self.keep(s);
        }
        self.flush();
    }

    fn keep(&mut self, s: Seen) {
        if !self.bucket.take(Instant::now()) {
            self.counters.rate_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut exchange = s.exchange;
        // Redacted here, before the record exists anywhere but in this thread's memory.
        self.redactor.apply(&mut exchange);
        let r = Record {
            seq: 0,
            at_unix_ms: s.first_us / 1000,
            client: s.client,
            server: s.server,
            latency_ms: s
                .answered_us
                .map(|a| a.saturating_sub(s.first_us) as f64 / 1000.0),
            exchange,
        };
        match self.store.push(r) {
            Ok(true) => {
                self.counters.stored.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                self.counters.oversize.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.store_error(&e),
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.store.flush() {
            self.store_error(&e);
        }
        let c = &self.counters;
        c.store_bytes.store(self.store.bytes(), Ordering::Relaxed);
        c.broken
            .store(self.table.counts.flows_broken, Ordering::Relaxed);
        c.refused
            .store(self.table.counts.flows_refused, Ordering::Relaxed);
    }

    fn store_error(&self, e: &CaptureError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(dir = %self.dir.display(), error = %crate::error::report(e), "capture store write failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let mut b = Bucket::new(10);
        let t0 = b.at;
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 10);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.take(t1)).count(), 5);
    }
}
