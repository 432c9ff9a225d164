//! Sample history: an in-memory ring of recent samples, backed by a bounded, append-only log
//! per service on disk.
//!
//! On-disk layout: `<dir>/<service>/seg-<sequence>.jsonl`, one JSON [`Sample`] per line. Samples
//! are appended to the newest segment; once it reaches a quarter of the byte cap a new segment
//! starts, and the oldest segments are deleted to keep the total under the cap, so the oldest
//! data always goes first. Appends are plain writes (no fsync per sample): a daemon crash loses
//! nothing, a host crash may lose the tail or leave a torn last line, which [`History::open`]
//! cuts off instead of failing.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::sample::Sample;

/// Smallest accepted disk cap: room for four segments of a few dozen samples.
const MIN_DISK_BYTES: u64 = 16 * 1024;

/// Errors of the history store.
#[derive(Debug, Error)]
pub enum HistoryError {
    /// The service name cannot be used as a directory name.
    #[error("service name {name:?} is not usable as a directory (allowed: A-Z a-z 0-9 . _ -, at most 128, not starting with '.')")]
    InvalidService {
        /// The rejected name.
        name: String,
    },
    /// The caps are unusable.
    #[error("invalid history caps: {reason}")]
    InvalidCaps {
        /// Why.
        reason: &'static str,
    },
    /// A filesystem operation failed.
    #[error("history {op} {path}")]
    Io {
        /// What was being done (create, open, read, write, remove, list).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A sample could not be encoded.
    #[error("cannot encode sample for {path}")]
    Encode {
        /// The segment it was destined for.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// One encoded sample is larger than a segment may be.
    #[error("encoded sample of {len} bytes exceeds the segment size of {max} bytes")]
    RecordTooLarge {
        /// Encoded length.
        len: u64,
        /// Segment size (a quarter of the disk cap).
        max: u64,
    },
}

/// Bounds of a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCaps {
    /// Samples kept in memory.
    pub ring_capacity: usize,
    /// Bytes kept on disk for the service, all segments together.
    pub max_disk_bytes: u64,
}

/// Fixed-capacity ring of samples, oldest first.
#[derive(Debug, Clone)]
pub struct SampleRing {
    capacity: usize,
    samples: VecDeque<Sample>,
}

impl SampleRing {
    /// An empty ring keeping at most `capacity` samples.
    pub fn new(capacity: usize) -> Self {
        SampleRing {
            capacity,
            samples: VecDeque::with_capacity(capacity.min(4096)),
        }
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn push(&mut self, s: Sample) {
        if self.capacity == 0 {
            return;
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// Samples, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Sample> + ExactSizeIterator {
        self.samples.iter()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Maximum number of samples.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[derive(Debug, Clone)]
struct Segment {
    seq: u64,
    path: PathBuf,
    len: u64,
}

/// What [`History::open`] found on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Samples loaded into the ring.
    pub loaded: usize,
    /// Lines that did not decode (corruption) and were skipped.
    pub skipped_lines: usize,
    /// Bytes of a torn final line cut from the newest segment.
    pub torn_bytes: u64,
}

/// The history of one service.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    caps: HistoryCaps,
    ring: SampleRing,
    /// Oldest first; the last one is written to.
    segments: VecDeque<Segment>,
    current: Option<File>,
    report: ReloadReport,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HistoryError + 'a {
    move |source| HistoryError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn valid_service(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".jsonl")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl History {
    /// Opens (creating if needed) the history of `service` under `dir` and reloads the newest
    /// samples into the ring.
    pub fn open(dir: &Path, service: &str, caps: HistoryCaps) -> Result<Self, HistoryError> {
        if !valid_service(service) {
            return Err(HistoryError::InvalidService {
                name: service.to_owned(),
            });
        }
        if caps.max_disk_bytes < MIN_DISK_BYTES {
            return Err(HistoryError::InvalidCaps {
                reason: "max_disk_bytes must be at least 16 KiB",
            });
        }
        let dir = dir.join(service);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut segments = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let Some(seq) = entry.file_name().to_str().and_then(segment_seq) else {
                continue;
            };
            let len = entry
                .metadata()
                .map_err(io_err("open", &entry.path()))?
                .len();
            segments.push(Segment {
                seq,
                path: entry.path(),
                len,
            });
        }
        segments.sort_by_key(|s| s.seq);
        let mut h = History {
            dir,
            caps,
            ring: SampleRing::new(caps.ring_capacity),
            segments: segments.into(),
            current: None,
            report: ReloadReport::default(),
        };
        h.cut_torn_tail()?;
        h.reload()?;
        // A cap lowered since the last run applies at once.
        h.enforce_cap(0)?;
        Ok(h)
    }

    /// Truncates the newest segment after its last newline: a torn write must not be glued to
    /// the next record.
    fn cut_torn_tail(&mut self) -> Result<(), HistoryError> {
        let Some(seg) = self.segments.back_mut() else {
            return Ok(());
        };
        let bytes = read_segment(&seg.path, self.caps.max_disk_bytes)?;
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64;
        if keep < bytes.len() as u64 {
            let f = OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(io_err("open", &seg.path))?;
            f.set_len(keep).map_err(io_err("write", &seg.path))?;
            self.report.torn_bytes = bytes.len() as u64 - keep;
            seg.len = keep;
        }
        Ok(())
    }

    /// Loads the newest samples (up to the ring capacity), reading segments newest first.
    fn reload(&mut self) -> Result<(), HistoryError> {
        let want = self.caps.ring_capacity;
        let mut newest_first: Vec<Sample> = Vec::new();
        for seg in self.segments.iter().rev() {
            if newest_first.len() >= want {
                break;
            }
            let bytes = read_segment(&seg.path, self.caps.max_disk_bytes)?;
            let mut in_seg = Vec::new();
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<Sample>(line) {
                    Ok(s) => in_seg.push(s),
                    Err(_) => self.report.skipped_lines += 1,
                }
            }
            newest_first.extend(in_seg.into_iter().rev().take(want - newest_first.len()));
        }
        self.report.loaded = newest_first.len();
        for s in newest_first.into_iter().rev() {
            self.ring.push(s);
        }
        Ok(())
    }

    /// Segment size: a quarter of the disk cap.
    fn segment_max(&self) -> u64 {
        self.caps.max_disk_bytes / 4
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Deletes the oldest segments (never the newest) until `incoming` more bytes fit the cap.
    fn enforce_cap(&mut self, incoming: u64) -> Result<(), HistoryError> {
        while self.segments.len() > 1 && self.disk_bytes() + incoming > self.caps.max_disk_bytes {
            if let Some(old) = self.segments.pop_front() {
                fs::remove_file(&old.path).map_err(io_err("remove", &old.path))?;
            }
        }
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), HistoryError> {
        let seq = self.segments.back().map_or(0, |s| s.seq + 1);
        let path = self.dir.join(format!("seg-{seq:020}.jsonl"));
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        self.segments.push_back(Segment { seq, path, len: 0 });
        self.current = Some(f);
        Ok(())
    }

    /// Adds a sample to the ring and appends it to disk. The ring is updated even if the disk
    /// write fails.
    pub fn append(&mut self, sample: Sample) -> Result<(), HistoryError> {
        let mut line = serde_json::to_vec(&sample).map_err(|source| HistoryError::Encode {
            path: self.dir.clone(),
            source,
        })?;
        line.push(b'\n');
        self.ring.push(sample);
        let len = line.len() as u64;
        if len > self.segment_max() {
            return Err(HistoryError::RecordTooLarge {
                len,
                max: self.segment_max(),
            });
        }
        let full = self
            .segments
            .back()
            .is_none_or(|s| s.len + len > self.segment_max());
        if full {
            self.start_segment()?;
        } else if self.current.is_none() {
            // Reopened after a restart: continue the newest segment.
            let path = self
                .segments
                .back()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            self.current = Some(
                OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?,
            );
        }
        self.enforce_cap(len)?;
        let Some(seg) = self.segments.back_mut() else {
            return Ok(());
        };
        let Some(f) = self.current.as_mut() else {
            return Ok(());
        };
        f.write_all(&line).map_err(io_err("write", &seg.path))?;
        seg.len += len;
        Ok(())
    }

    /// Recent samples in memory.
    pub fn ring(&self) -> &SampleRing {
        &self.ring
    }

    /// What the last [`History::open`] found.
    pub fn reload_report(&self) -> ReloadReport {
        self.report
    }

    /// Reads every sample on disk, oldest first (bounded by the disk cap); undecodable lines are
    /// skipped.
    pub fn load_all(&self) -> Result<Vec<Sample>, HistoryError> {
        let mut out = Vec::new();
        for seg in &self.segments {
            let bytes = read_segment(&seg.path, self.caps.max_disk_bytes)?;
            out.extend(
                bytes
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .filter_map(|l| serde_json::from_slice(l).ok()),
            );
        }
        Ok(out)
    }
}

/// Reads a segment, never more than `max` bytes (a segment larger than the whole cap was not
/// written by us; only its start is used).
fn read_segment(path: &Path, max: u64) -> Result<Vec<u8>, HistoryError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut buf = Vec::new();
    f.take(max)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::sample::SampleSource;

    fn sample(ts: u64) -> Sample {
        Sample {
            ts_unix_ms: ts,
            cpu_cores: Some(0.5),
            mem_bytes: Some(1 << 30),
            disk_read_bps: Some(10.0),
            disk_write_bps: None,
            net_rx_bps: Some(100.0),
            net_tx_bps: Some(200.0),
            source: SampleSource::HostAndGuest,
            degraded_reason: None,
        }
    }

    fn caps(ring: usize, disk: u64) -> HistoryCaps {
        HistoryCaps {
            ring_capacity: ring,
            max_disk_bytes: disk,
        }
    }

    fn ts(samples: impl Iterator<Item = Sample>) -> Vec<u64> {
        samples.map(|s| s.ts_unix_ms).collect()
    }

    #[test]
    fn ring_keeps_newest() {
        let mut r = SampleRing::new(3);
        for t in 0..5 {
            r.push(sample(t));
        }
        assert_eq!(ts(r.iter().cloned()), [2, 3, 4]);
        assert_eq!(r.latest().unwrap().ts_unix_ms, 4);
        let mut z = SampleRing::new(0);
        z.push(sample(1));
        assert!(z.is_empty());
    }

    #[test]
    fn survives_restart_and_reloads_tail() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut h = History::open(d.path(), "web-1", caps(100, 1 << 20)).unwrap();
            for t in 0..10 {
                h.append(sample(t)).unwrap();
            }
        }
        let h = History::open(d.path(), "web-1", caps(4, 1 << 20)).unwrap();
        assert_eq!(ts(h.ring().iter().cloned()), [6, 7, 8, 9]);
        assert_eq!(
            h.reload_report(),
            ReloadReport {
                loaded: 4,
                skipped_lines: 0,
                torn_bytes: 0
            }
        );
        assert_eq!(
            ts(h.load_all().unwrap().into_iter()),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn disk_cap_drops_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let cap = 16 * 1024;
        let mut h = History::open(d.path(), "db", caps(10, cap)).unwrap();
        let n = 2_000u64; // ~200 bytes each: far more than the cap
        for t in 0..n {
            h.append(sample(t)).unwrap();
            assert!(
                h.disk_bytes() <= cap,
                "over cap after {t}: {}",
                h.disk_bytes()
            );
        }
        let on_disk = ts(h.load_all().unwrap().into_iter());
        // What is left is a contiguous run ending with the newest sample.
        assert_eq!(*on_disk.last().unwrap(), n - 1);
        assert!(on_disk.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(on_disk.len() > 40, "kept {} samples", on_disk.len());
        let files = fs::read_dir(d.path().join("db")).unwrap().count();
        assert!(files <= 5, "{files} segment files");
        // Reopening with the same cap keeps the same data.
        drop(h);
        let h = History::open(d.path(), "db", caps(10, cap)).unwrap();
        assert_eq!(ts(h.load_all().unwrap().into_iter()), on_disk);
        assert_eq!(h.ring().latest().unwrap().ts_unix_ms, n - 1);
    }

    #[test]
    fn torn_last_record_is_cut_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut h = History::open(d.path(), "web-1", caps(100, 1 << 20)).unwrap();
            for t in 0..3 {
                h.append(sample(t)).unwrap();
            }
        }
        let seg = fs::read_dir(d.path().join("web-1"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(br#"{"ts_unix_ms":3,"cpu_co"#).unwrap();
        drop(f);
        let mut h = History::open(d.path(), "web-1", caps(100, 1 << 20)).unwrap();
        assert_eq!(h.reload_report().torn_bytes, 23);
        assert_eq!(ts(h.ring().iter().cloned()), [0, 1, 2]);
        // The next record starts on a clean line.
        h.append(sample(4)).unwrap();
        drop(h);
        let h = History::open(d.path(), "web-1", caps(100, 1 << 20)).unwrap();
        assert_eq!(ts(h.ring().iter().cloned()), [0, 1, 2, 4]);
        assert_eq!(h.reload_report().skipped_lines, 0);
    }

    #[test]
    fn corrupt_lines_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("svc");
        fs::create_dir_all(&dir).unwrap();
        let good = |t| String::from_utf8(serde_json::to_vec(&sample(t)).unwrap()).unwrap();
        fs::write(
            dir.join("seg-00000000000000000000.jsonl"),
            format!("{}\nnot json\n{}\n", good(1), good(2)),
        )
        .unwrap();
        fs::write(
            dir.join("seg-00000000000000000001.jsonl"),
            format!("{}\n", good(3)),
        )
        .unwrap();
        fs::write(dir.join("unrelated.txt"), "ignored").unwrap();
        let h = History::open(d.path(), "svc", caps(10, 1 << 20)).unwrap();
        assert_eq!(ts(h.ring().iter().cloned()), [1, 2, 3]);
        assert_eq!(h.reload_report().skipped_lines, 1);
    }

    #[test]
    fn rejects_bad_names_and_caps() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "x y"] {
            assert!(
                matches!(
                    History::open(d.path(), bad, caps(1, 1 << 20)),
                    Err(HistoryError::InvalidService { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            History::open(d.path(), "ok", caps(1, 100)),
            Err(HistoryError::InvalidCaps { .. })
        ));
    }
}
