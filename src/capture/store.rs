//! The per-service record store: JSON-lines segment files under
//! `<state_dir>/capture/<service>/`, each written whole to a temporary file and renamed (a
//! reader never sees half a segment), at most `max_bytes` in all: the oldest segments are
//! deleted first.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{CaptureError, Record};

/// Segments a store is cut into: the unit in which the oldest records are dropped.
const SEGMENTS: u64 = 8;

/// One service's records on disk.
#[derive(Debug)]
pub struct CaptureStore {
    dir: PathBuf,
    max_bytes: u64,
    seg_bytes: u64,
    /// Closed segments, oldest first: (id, bytes).
    closed: VecDeque<(u64, u64)>,
    current_id: u64,
    current: Vec<u8>,
    /// Bytes of the current segment's file as last written: it stays on disk beside the new
    /// version until the rename, so room is made for both.
    current_on_disk: u64,
    dirty: bool,
    next_seq: u64,
}

fn seg_name(id: u64) -> String {
    format!("seg-{id:020}.jsonl")
}

fn seg_id(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

impl CaptureStore {
    /// The store directory of `service` under `state_dir`.
    pub fn dir_of(state_dir: &Path, service: &str) -> PathBuf {
        state_dir.join("capture").join(service)
    }

    /// Opens (creating) the store in `dir`, bounded to `max_bytes`; records already there are
    /// kept, and new ones go to a new segment.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, CaptureError> {
        let err = |source| CaptureError::Store {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut closed = Vec::new();
        for e in std::fs::read_dir(dir).map_err(err)? {
            let e = e.map_err(err)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = seg_id(&name) {
                closed.push((id, e.metadata().map_err(err)?.len()));
            } else if name.ends_with(".tmp") {
                // A write interrupted by a crash: never renamed, never read.
                let _ = std::fs::remove_file(e.path());
            }
        }
        closed.sort();
        let mut s = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            seg_bytes: (max_bytes / SEGMENTS).max(1),
            current_id: closed.last().map_or(0, |(id, _)| id + 1),
            closed: closed.into(),
            current: Vec::new(),
            current_on_disk: 0,
            dirty: false,
            next_seq: 0,
        };
        s.next_seq = s.records(1)?.last().map_or(0, |r| r.seq + 1);
        s.make_room(0)?;
        Ok(s)
    }

    /// Largest record line accepted.
    pub fn max_record_bytes(&self) -> u64 {
        self.seg_bytes
    }

    /// Adds a record (its `seq` is assigned here); false when it is larger than a segment
    /// and so not kept. Written at the next [`flush`](Self::flush).
    pub fn push(&mut self, mut r: Record) -> Result<bool, CaptureError> {
        r.seq = self.next_seq;
        let mut line = serde_json::to_vec(&r).unwrap_or_default();
        line.push(b'\n');
        if line.len() as u64 > self.seg_bytes {
            return Ok(false);
        }
        if (self.current.len() + line.len()) as u64 > self.seg_bytes {
            self.flush()?;
            self.closed
                .push_back((self.current_id, self.current.len() as u64));
            self.current_id += 1;
            self.current.clear();
            self.current_on_disk = 0;
        }
        self.next_seq += 1;
        self.current.extend_from_slice(&line);
        self.dirty = true;
        Ok(true)
    }

    /// Writes the current segment (atomically), first deleting the oldest segments it needs
    /// room from: room for the new version and the old one, both on disk until the rename, so
    /// the directory never holds more than the bound.
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        if !self.dirty {
            return Ok(());
        }
        self.make_room(self.current.len() as u64 + self.current_on_disk)?;
        let path = self.dir.join(seg_name(self.current_id));
        let tmp = self.dir.join(format!(".{}.tmp", seg_name(self.current_id)));
        let err = |source| CaptureError::Store {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&self.current).map_err(err)?;
        f.sync_data().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        self.current_on_disk = self.current.len() as u64;
        self.dirty = false;
        Ok(())
    }

    /// Deletes the oldest closed segments until they and `current` bytes fit.
    fn make_room(&mut self, current: u64) -> Result<(), CaptureError> {
        while self.closed.iter().map(|(_, b)| b).sum::<u64>() + current > self.max_bytes {
            let Some((id, _)) = self.closed.pop_front() else {
                break;
            };
            let path = self.dir.join(seg_name(id));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CaptureError::Store { path, source }),
            }
        }
        Ok(())
    }

    /// Bytes on disk (closed segments and the current one as last written).
    pub fn bytes(&self) -> u64 {
        self.closed.iter().map(|(_, b)| b).sum::<u64>() + self.current.len() as u64
    }

    /// The last `limit` records on disk and not yet flushed, oldest first. Lines that do not
    /// parse (a store written by another version, a damaged file) are skipped.
    pub fn records(&self, limit: usize) -> Result<Vec<Record>, CaptureError> {
        let mut out = VecDeque::new();
        let mut ids: Vec<u64> = self.closed.iter().map(|(id, _)| *id).collect();
        ids.push(self.current_id);
        for id in ids {
            let path = self.dir.join(seg_name(id));
            let data = if id == self.current_id && !self.current.is_empty() {
                self.current.clone()
            } else {
                match std::fs::read(&path) {
                    Ok(d) => d,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(CaptureError::Store { path, source }),
                }
            };
            for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                if let Ok(r) = serde_json::from_slice::<Record>(line) {
                    out.push_back(r);
                    if out.len() > limit {
                        out.pop_front();
                    }
                }
            }
        }
        Ok(out.into())
    }
}

/// Reads the last `limit` records of a service's store without opening it for writing.
pub fn read_records(dir: &Path, limit: usize) -> Result<Vec<Record>, CaptureError> {
    let mut ids = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CaptureError::Store {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    for e in entries.flatten() {
        if let Some(id) = seg_id(&e.file_name().to_string_lossy()) {
            ids.push(id);
        }
    }
    ids.sort();
    let mut out = VecDeque::new();
    for id in ids {
        let Ok(data) = std::fs::read(dir.join(seg_name(id))) else {
            continue;
        };
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(r) = serde_json::from_slice::<Record>(line) {
                out.push_back(r);
                if out.len() > limit {
                    out.pop_front();
                }
            }
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Body, Exchange};

    fn rec(i: usize) -> Record {
        Record {
            seq: 0,
            at_unix_ms: i as u64,
            client: "10.0.0.1:1".parse().unwrap(),
            server: "10.0.0.10:80".parse().unwrap(),
            latency_ms: Some(1.0),
            exchange: Exchange::Stream {
                to_server: Body::new(format!("req {i} {}", "x".repeat(200)).as_bytes(), 0),
                to_client: Body::new(b"ok", 0),
            },
        }
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn a_flood_stays_within_the_bound_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = CaptureStore::open(dir.path(), 65_536).unwrap();
        for i in 0..5000 {
            assert!(s.push(rec(i)).unwrap());
            if i % 50 == 0 {
                // Mid-flush, after the room is made, the old version of the current segment
                // and its new one are both on disk: that moment fits too.
                s.make_room(s.current.len() as u64 + s.current_on_disk)
                    .unwrap();
                let mid = disk_bytes(dir.path()) + s.current.len() as u64;
                assert!(mid <= 65_536, "mid-flush the store holds {mid} bytes");
                s.flush().unwrap();
                assert!(disk_bytes(dir.path()) <= 65_536);
            }
        }
        s.flush().unwrap();
        assert!(
            disk_bytes(dir.path()) <= 65_536,
            "{}",
            disk_bytes(dir.path())
        );
        let all = s.records(usize::MAX).unwrap();
        assert_eq!(all.last().unwrap().at_unix_ms, 4999);
        assert!(all.len() < 5000 && all.len() > 100);
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        // Reopened, it goes on numbering after the last record.
        drop(s);
        let mut s = CaptureStore::open(dir.path(), 65_536).unwrap();
        s.push(rec(9)).unwrap();
        s.flush().unwrap();
        assert_eq!(read_records(dir.path(), 1).unwrap()[0].seq, 5000);
    }

    #[test]
    fn an_oversized_record_is_refused_and_damaged_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = CaptureStore::open(dir.path(), 65_536).unwrap();
        let mut big = rec(0);
        big.exchange = Exchange::Stream {
            to_server: Body::new(&vec![b'a'; 20_000], 0),
            to_client: Body::default(),
        };
        assert!(!s.push(big).unwrap());
        s.push(rec(1)).unwrap();
        s.flush().unwrap();
        std::fs::write(dir.path().join(seg_name(0)), b"{not json\n").unwrap();
        assert!(read_records(dir.path(), 10).unwrap().is_empty());
    }
}
