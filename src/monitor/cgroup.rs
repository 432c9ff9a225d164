//! Host-side resource counters of a QEMU process, read from its cgroup (v1, v2 or hybrid).
//!
//! The domain's cgroup is found from `/proc/<pid>/cgroup` (`hierarchy-id:controllers:path`, the
//! v2 line being `0::path`) rather than guessed from the domain name, so any libvirt cgroup
//! layout works. libvirt puts QEMU's main thread in an `emulator` child (and vCPUs in `vcpuN`)
//! for the cpu controllers; those suffixes are stripped so the counters cover the whole domain
//! (cgroup CPU and memory accounting is hierarchical).
//!
//! All paths are taken relative to a root directory (`/` in production) so tests can build a
//! fake `/proc` and `/sys/fs/cgroup` in a temporary directory.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Largest cgroup file read; kernel-written files are far smaller, so more means a wrong file.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Errors locating or reading a process's cgroup counters.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// `/proc/<pid>/cgroup` does not exist: the process is gone.
    #[error("process {pid} does not exist ({path} not found)")]
    ProcessGone {
        /// The pid looked up.
        pid: u32,
        /// The missing file.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file is larger than any kernel cgroup file should be.
    #[error("{path} is larger than {max} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// A line does not have the expected structure.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A value that must be an unsigned integer is not.
    #[error("{path}:{line}: {value:?} is not an unsigned integer")]
    NotANumber {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text (cut to 64 bytes).
        value: String,
    },
    /// Summing per-device counters overflowed 64 bits, which no real counter does.
    #[error("{path}: sum of {key} overflows 64 bits")]
    Overflow {
        /// The file.
        path: PathBuf,
        /// The key being summed.
        key: &'static str,
    },
    /// A cgroup path escapes its hierarchy (contains `..`).
    #[error("{source_file}: cgroup path {path:?} is not a plain absolute path")]
    UnsafePath {
        /// The `/proc/<pid>/cgroup` file.
        source_file: PathBuf,
        /// The rejected cgroup path.
        path: String,
    },
    /// None of the process's hierarchies is mounted where expected.
    #[error(
        "process {pid}: no cpuacct, memory, blkio or unified cgroup found under {cgroup_root}"
    )]
    NoCgroup {
        /// The pid looked up.
        pid: u32,
        /// The cgroup mount root searched.
        cgroup_root: PathBuf,
    },
}

/// Which cgroup layout the counters came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies only.
    V1,
    /// v1 controllers plus a cgroup2 mount (usually `/sys/fs/cgroup/unified`).
    Hybrid,
    /// A single unified cgroup2 hierarchy.
    V2,
}

/// One line of `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupEntry {
    /// Hierarchy id; 0 for the cgroup2 hierarchy.
    pub hierarchy_id: u32,
    /// Controllers bound to the hierarchy (empty for cgroup2; `name=systemd` kept as is).
    pub controllers: Vec<String>,
    /// Path of the process's cgroup inside the hierarchy.
    pub path: String,
}

/// Parses `/proc/<pid>/cgroup` text; `source` names the file in errors.
pub fn parse_proc_cgroup(text: &str, source: &Path) -> Result<Vec<CgroupEntry>, CgroupError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |reason| CgroupError::Malformed {
            path: source.to_owned(),
            line: i + 1,
            reason,
        };
        // The path itself may contain ':', so split at most twice.
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed("expected hierarchy-id:controllers:path"));
        };
        let hierarchy_id = id.parse::<u32>().map_err(|_| CgroupError::NotANumber {
            path: source.to_owned(),
            line: i + 1,
            value: id.chars().take(64).collect(),
        })?;
        if !path.starts_with('/') {
            return Err(malformed("cgroup path is not absolute"));
        }
        let controllers = if ctrl.is_empty() {
            Vec::new()
        } else {
            ctrl.split(',').map(str::to_owned).collect()
        };
        out.push(CgroupEntry {
            hierarchy_id,
            controllers,
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// Directories holding a domain's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLocation {
    /// Layout detected.
    pub version: CgroupVersion,
    /// v1 `cpuacct` directory of the domain.
    pub cpuacct: Option<PathBuf>,
    /// v1 `memory` directory of the domain.
    pub memory: Option<PathBuf>,
    /// v1 `blkio` directory of the domain.
    pub blkio: Option<PathBuf>,
    /// cgroup2 directory of the domain.
    pub unified: Option<PathBuf>,
}

/// A counter that could not be read because its file (or the key in it) is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingCounter {
    /// Which counter.
    pub counter: CounterKind,
    /// The file that was looked at.
    pub file: PathBuf,
    /// The key looked for, for keyed files whose key was absent (`None`: the file is absent).
    pub key: Option<&'static str>,
}

/// The counters [`CgroupCounters`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// CPU time.
    Cpu,
    /// Memory usage.
    Memory,
    /// Anonymous (RSS) memory.
    MemoryRss,
    /// Page cache memory.
    MemoryCache,
    /// Block I/O bytes.
    Io,
}

/// Cumulative counters of one domain's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupCounters {
    /// CPU time used by all QEMU threads, in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    /// Memory charged to the cgroup (v1 `memory.usage_in_bytes`, v2 `memory.current`),
    /// including page cache.
    pub mem_bytes: Option<u64>,
    /// Anonymous memory (v1 `total_rss`, v2 `anon`).
    pub mem_rss_bytes: Option<u64>,
    /// Page cache (v1 `total_cache`, v2 `file`).
    pub mem_cache_bytes: Option<u64>,
    /// Bytes read from block devices.
    pub io_read_bytes: Option<u64>,
    /// Bytes written to block devices.
    pub io_write_bytes: Option<u64>,
    /// Layout the counters came from.
    pub version: CgroupVersion,
    /// Counters left `None`, each naming the file looked at.
    pub missing: Vec<MissingCounter>,
}

/// Reads cgroup counters relative to a root directory.
#[derive(Debug, Clone)]
pub struct CgroupReader {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
}

impl CgroupReader {
    /// Reader for files under `root` (`/` on a real host): `root/proc` and `root/sys/fs/cgroup`.
    pub fn new(root: &Path) -> Self {
        CgroupReader {
            proc_root: root.join("proc"),
            cgroup_root: root.join("sys/fs/cgroup"),
        }
    }

    /// Reader for the real host.
    pub fn host() -> Self {
        Self::new(Path::new("/"))
    }

    /// Finds the cgroup directories of process `pid` (a QEMU process).
    pub fn locate(&self, pid: u32) -> Result<CgroupLocation, CgroupError> {
        let file = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = match read_bounded(&file)? {
            Some(t) => t,
            None => return Err(CgroupError::ProcessGone { pid, path: file }),
        };
        let entries = parse_proc_cgroup(&text, &file)?;
        let mut loc = CgroupLocation {
            version: CgroupVersion::V1,
            cpuacct: None,
            memory: None,
            blkio: None,
            unified: None,
        };
        let mut v1_domains = Vec::new();
        let mut unified_domain = None;
        for e in &entries {
            let rel = domain_relative(&e.path, &file)?;
            // A process in a root cgroup has no cgroup of its own: root counters are host-wide.
            if rel.as_os_str().is_empty() {
                continue;
            }
            if e.hierarchy_id == 0 && e.controllers.is_empty() {
                unified_domain = Some(rel);
                continue;
            }
            let Some(mount) = self.v1_mount(&e.controllers) else {
                continue;
            };
            let dir = mount.join(&rel);
            for c in &e.controllers {
                let slot = match c.as_str() {
                    "cpuacct" => &mut loc.cpuacct,
                    "memory" => &mut loc.memory,
                    "blkio" => &mut loc.blkio,
                    _ => continue,
                };
                *slot = Some(dir.clone());
                v1_domains.push(rel.clone());
            }
        }
        if let (Some(rel), Some(base)) = (unified_domain, self.unified_mount()) {
            // On a hybrid host the unified hierarchy may place QEMU somewhere unrelated (e.g.
            // libvirtd's service cgroup when libvirt manages v1 only): trust it only when it
            // names the same cgroup as the v1 controllers.
            if v1_domains.is_empty() || v1_domains.contains(&rel) {
                loc.unified = Some(base.join(rel));
            }
        }
        let has_v1 = loc.cpuacct.is_some() || loc.memory.is_some() || loc.blkio.is_some();
        loc.version = match (has_v1, loc.unified.is_some()) {
            (true, true) => CgroupVersion::Hybrid,
            (true, false) => CgroupVersion::V1,
            (false, true) => CgroupVersion::V2,
            (false, false) => {
                return Err(CgroupError::NoCgroup {
                    pid,
                    cgroup_root: self.cgroup_root.clone(),
                })
            }
        };
        Ok(loc)
    }

    /// Locates and reads the counters of process `pid`.
    pub fn read(&self, pid: u32) -> Result<CgroupCounters, CgroupError> {
        read_counters(&self.locate(pid)?)
    }

    /// The cgroup2 mount: the root itself on a pure v2 host, `unified/` on a hybrid one.
    fn unified_mount(&self) -> Option<PathBuf> {
        if self.cgroup_root.join("cgroup.controllers").is_file() {
            return Some(self.cgroup_root.clone());
        }
        let hybrid = self.cgroup_root.join("unified");
        hybrid
            .join("cgroup.controllers")
            .is_file()
            .then_some(hybrid)
    }

    /// The v1 mount of a controller set: `cpu,cpuacct` (with `cpu`/`cpuacct` symlinks on most
    /// distributions), or one directory per controller when they are mounted separately.
    fn v1_mount(&self, controllers: &[String]) -> Option<PathBuf> {
        let joined = controllers.join(",");
        std::iter::once(joined.as_str())
            .chain(controllers.iter().map(String::as_str))
            .filter(|name| !name.is_empty() && !name.contains('/') && *name != "." && *name != "..")
            .map(|name| self.cgroup_root.join(name))
            .find(|p| p.is_dir())
    }
}

/// Turns a cgroup path into a relative path to the domain's cgroup: strips libvirt's per-thread
/// children and refuses `..`.
fn domain_relative(path: &str, source: &Path) -> Result<PathBuf, CgroupError> {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => parts.push(s.to_str().unwrap_or_default()),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CgroupError::UnsafePath {
                    source_file: source.to_owned(),
                    path: path.to_owned(),
                })
            }
        }
    }
    if let Some(last) = parts.last() {
        if is_thread_group(last) {
            parts.pop();
        }
    }
    Ok(parts.iter().collect())
}

fn is_thread_group(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    name == "emulator" || numbered("vcpu") || numbered("iothread")
}

/// Reads the counters from located directories. v1 controllers win; cgroup2 fills what they
/// lack (on hybrid hosts the unified `cpu.stat` is always present).
pub fn read_counters(loc: &CgroupLocation) -> Result<CgroupCounters, CgroupError> {
    let mut c = CgroupCounters {
        cpu_usage_ns: None,
        mem_bytes: None,
        mem_rss_bytes: None,
        mem_cache_bytes: None,
        io_read_bytes: None,
        io_write_bytes: None,
        version: loc.version,
        missing: Vec::new(),
    };
    let mut missing = Vec::new();

    if let Some(dir) = &loc.cpuacct {
        c.cpu_usage_ns = read_single(&dir.join("cpuacct.usage"), CounterKind::Cpu, &mut missing)?;
    }
    if c.cpu_usage_ns.is_none() {
        if let Some(dir) = &loc.unified {
            let usec = read_keyed(
                &dir.join("cpu.stat"),
                &["usage_usec"],
                CounterKind::Cpu,
                &mut missing,
            )?;
            c.cpu_usage_ns = usec.map(|u| u.saturating_mul(1000));
        }
    }

    if let Some(dir) = &loc.memory {
        c.mem_bytes = read_single(
            &dir.join("memory.usage_in_bytes"),
            CounterKind::Memory,
            &mut missing,
        )?;
        let stat = dir.join("memory.stat");
        // total_* are hierarchical; plain rss/cache only count the cgroup itself.
        c.mem_rss_bytes = read_keyed(
            &stat,
            &["total_rss", "rss"],
            CounterKind::MemoryRss,
            &mut missing,
        )?;
        c.mem_cache_bytes = read_keyed(
            &stat,
            &["total_cache", "cache"],
            CounterKind::MemoryCache,
            &mut missing,
        )?;
    }
    if let Some(dir) = loc.unified.as_ref().filter(|_| c.mem_bytes.is_none()) {
        c.mem_bytes = read_single(
            &dir.join("memory.current"),
            CounterKind::Memory,
            &mut missing,
        )?;
        let stat = dir.join("memory.stat");
        c.mem_rss_bytes = read_keyed(&stat, &["anon"], CounterKind::MemoryRss, &mut missing)?;
        c.mem_cache_bytes = read_keyed(&stat, &["file"], CounterKind::MemoryCache, &mut missing)?;
    }

    if let Some(dir) = &loc.blkio {
        let file = dir.join("blkio.throttle.io_service_bytes");
        match read_bounded(&file)? {
            Some(text) => {
                let (r, w) = parse_blkio_service_bytes(&text, &file)?;
                (c.io_read_bytes, c.io_write_bytes) = (Some(r), Some(w));
            }
            None => missing.push(MissingCounter {
                counter: CounterKind::Io,
                file,
                key: None,
            }),
        }
    }
    if let Some(dir) = loc.unified.as_ref().filter(|_| c.io_read_bytes.is_none()) {
        let file = dir.join("io.stat");
        match read_bounded(&file)? {
            Some(text) => {
                let (r, w) = parse_io_stat(&text, &file)?;
                (c.io_read_bytes, c.io_write_bytes) = (Some(r), Some(w));
            }
            None => missing.push(MissingCounter {
                counter: CounterKind::Io,
                file,
                key: None,
            }),
        }
    }

    // Keep only gaps that no fallback filled.
    let filled = |k: CounterKind| match k {
        CounterKind::Cpu => c.cpu_usage_ns.is_some(),
        CounterKind::Memory => c.mem_bytes.is_some(),
        CounterKind::MemoryRss => c.mem_rss_bytes.is_some(),
        CounterKind::MemoryCache => c.mem_cache_bytes.is_some(),
        CounterKind::Io => c.io_read_bytes.is_some(),
    };
    missing.retain(|m| !filled(m.counter));
    c.missing = missing;
    Ok(c)
}

/// Reads a whole file of at most [`MAX_FILE_BYTES`]; `Ok(None)` if it does not exist.
fn read_bounded(path: &Path) -> Result<Option<String>, CgroupError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CgroupError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| CgroupError::Read {
            path: path.to_owned(),
            source,
        })?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(CgroupError::TooLarge {
            path: path.to_owned(),
            max: MAX_FILE_BYTES,
        });
    }
    Ok(Some(text))
}

fn number(value: &str, path: &Path, line: usize) -> Result<u64, CgroupError> {
    value.parse::<u64>().map_err(|_| CgroupError::NotANumber {
        path: path.to_owned(),
        line,
        value: value.chars().take(64).collect(),
    })
}

/// A file holding one number (`cpuacct.usage`, `memory.current`, ...).
fn read_single(
    path: &Path,
    kind: CounterKind,
    missing: &mut Vec<MissingCounter>,
) -> Result<Option<u64>, CgroupError> {
    match read_bounded(path)? {
        Some(text) => parse_single(&text, path).map(Some),
        None => {
            missing.push(MissingCounter {
                counter: kind,
                file: path.to_owned(),
                key: None,
            });
            Ok(None)
        }
    }
}

/// Parses a single-number cgroup file.
pub fn parse_single(text: &str, path: &Path) -> Result<u64, CgroupError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(CgroupError::Malformed {
            path: path.to_owned(),
            line: 1,
            reason: "file is empty",
        });
    }
    number(t, path, 1)
}

/// A `key value` file (`cpu.stat`, `memory.stat`): the first of `keys` present.
fn read_keyed(
    path: &Path,
    keys: &[&'static str],
    kind: CounterKind,
    missing: &mut Vec<MissingCounter>,
) -> Result<Option<u64>, CgroupError> {
    let Some(text) = read_bounded(path)? else {
        missing.push(MissingCounter {
            counter: kind,
            file: path.to_owned(),
            key: None,
        });
        return Ok(None);
    };
    for key in keys {
        if let Some(v) = parse_keyed(&text, path, key)? {
            return Ok(Some(v));
        }
    }
    missing.push(MissingCounter {
        counter: kind,
        file: path.to_owned(),
        key: keys.first().copied(),
    });
    Ok(None)
}

/// Finds `key` in a flat keyed file (`key value` per line) and parses its value.
pub fn parse_keyed(text: &str, path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        if it.next() != Some(key) {
            continue;
        }
        let Some(v) = it.next() else {
            return Err(CgroupError::Malformed {
                path: path.to_owned(),
                line: i + 1,
                reason: "key without value",
            });
        };
        return number(v, path, i + 1).map(Some);
    }
    Ok(None)
}

/// Sums `Read` and `Write` bytes over devices in v1 `blkio.throttle.io_service_bytes`
/// (`MAJ:MIN Op bytes` lines and a final `Total bytes`).
pub fn parse_blkio_service_bytes(text: &str, path: &Path) -> Result<(u64, u64), CgroupError> {
    let (mut read, mut write) = (0u64, 0u64);
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [] => {}
            ["Total", v] => {
                number(v, path, i + 1)?;
            }
            [dev, op, v] => {
                if !is_dev(dev) {
                    return Err(CgroupError::Malformed {
                        path: path.to_owned(),
                        line: i + 1,
                        reason: "expected MAJ:MIN device",
                    });
                }
                let n = number(v, path, i + 1)?;
                let (slot, key) = match *op {
                    "Read" => (&mut read, "Read"),
                    "Write" => (&mut write, "Write"),
                    _ => continue,
                };
                *slot = slot.checked_add(n).ok_or(CgroupError::Overflow {
                    path: path.to_owned(),
                    key,
                })?;
            }
            _ => {
                return Err(CgroupError::Malformed {
                    path: path.to_owned(),
                    line: i + 1,
                    reason: "expected `MAJ:MIN Op bytes`",
                })
            }
        }
    }
    Ok((read, write))
}

/// Sums `rbytes` and `wbytes` over devices in cgroup2 `io.stat`
/// (`MAJ:MIN rbytes=.. wbytes=.. rios=.. ...` lines).
pub fn parse_io_stat(text: &str, path: &Path) -> Result<(u64, u64), CgroupError> {
    let (mut read, mut write) = (0u64, 0u64);
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        let Some(dev) = it.next() else { continue };
        if !is_dev(dev) {
            return Err(CgroupError::Malformed {
                path: path.to_owned(),
                line: i + 1,
                reason: "expected MAJ:MIN device",
            });
        }
        for kv in it {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(CgroupError::Malformed {
                    path: path.to_owned(),
                    line: i + 1,
                    reason: "expected key=value",
                });
            };
            let (slot, key) = match k {
                "rbytes" => (&mut read, "rbytes"),
                "wbytes" => (&mut write, "wbytes"),
                _ => continue,
            };
            let n = number(v, path, i + 1)?;
            *slot = slot.checked_add(n).ok_or(CgroupError::Overflow {
                path: path.to_owned(),
                key,
            })?;
        }
    }
    Ok((read, write))
}

fn is_dev(s: &str) -> bool {
    s.split_once(':').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/monitor/fixtures/cgroup");

    fn put(root: &Path, rel: &str, fixture: &str) {
        let dst = root.join(rel);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(Path::new(FIX).join(fixture), &dst)
            .unwrap_or_else(|e| panic!("fixture {fixture}: {e}"));
    }

    const V1_DOM: &str = "machine/qemu-3-web1.libvirt-qemu";

    /// Hybrid host like this one: separate v1 mounts for cpu and cpuacct, plus cgroup2 at unified/.
    fn hybrid_host(root: &Path) {
        put(root, "proc/4242/cgroup", "proc-cgroup-v1-hybrid.txt");
        for c in [
            "cpu", "cpuacct", "cpuset", "memory", "blkio", "devices", "freezer", "pids", "systemd",
        ] {
            fs::create_dir_all(root.join("sys/fs/cgroup").join(c)).unwrap();
        }
        put(
            root,
            "sys/fs/cgroup/unified/cgroup.controllers",
            "empty.txt",
        );
        put(
            root,
            &format!("sys/fs/cgroup/cpuacct/{V1_DOM}/cpuacct.usage"),
            "v1-cpuacct.usage",
        );
        put(
            root,
            &format!("sys/fs/cgroup/memory/{V1_DOM}/memory.usage_in_bytes"),
            "v1-memory.usage_in_bytes",
        );
        put(
            root,
            &format!("sys/fs/cgroup/memory/{V1_DOM}/memory.stat"),
            "v1-memory.stat",
        );
        put(
            root,
            &format!("sys/fs/cgroup/blkio/{V1_DOM}/blkio.throttle.io_service_bytes"),
            "v1-blkio.throttle.io_service_bytes",
        );
    }

    #[test]
    fn v1_hybrid_host_reads_domain_cgroup_not_emulator_child() {
        let d = tempfile::tempdir().unwrap();
        hybrid_host(d.path());
        let r = CgroupReader::new(d.path());
        let loc = r.locate(4242).unwrap();
        // The unified line is `0::/`: QEMU has no cgroup2 group of its own, so only v1 is used.
        assert_eq!(loc.version, CgroupVersion::V1);
        assert_eq!(loc.unified, None);
        assert!(loc
            .cpuacct
            .as_ref()
            .unwrap()
            .ends_with("cpuacct/machine/qemu-3-web1.libvirt-qemu"));
        let c = r.read(4242).unwrap();
        assert_eq!(c.cpu_usage_ns, Some(183_274_651_220_931));
        assert_eq!(c.mem_bytes, Some(2_218_336_256));
        assert_eq!(
            c.mem_rss_bytes,
            Some(1_990_148_096),
            "hierarchical total_rss preferred"
        );
        assert_eq!(c.mem_cache_bytes, Some(201_326_592));
        assert_eq!(c.io_read_bytes, Some(1_316_388_864 + 4_096));
        assert_eq!(c.io_write_bytes, Some(8_937_164_800));
        assert!(c.missing.is_empty(), "{:?}", c.missing);
    }

    #[test]
    fn v1_combined_cpu_cpuacct_mount() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        put(root, "proc/77/cgroup", "proc-cgroup-v1-combined.txt");
        fs::create_dir_all(root.join("sys/fs/cgroup/cpu,cpuacct")).unwrap();
        put(
            root,
            &format!("sys/fs/cgroup/cpu,cpuacct/{V1_DOM}/cpuacct.usage"),
            "v1-cpuacct.usage",
        );
        let c = CgroupReader::new(root).read(77).unwrap();
        assert_eq!(c.version, CgroupVersion::V1);
        assert_eq!(c.cpu_usage_ns, Some(183_274_651_220_931));
        assert_eq!(
            c.mem_bytes, None,
            "memory hierarchy not mounted in this fake host"
        );
    }

    #[test]
    fn v2_host() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let dom = r"machine.slice/machine-qemu\x2d5\x2ddb1.scope/libvirt";
        put(root, "proc/900/cgroup", "proc-cgroup-v2.txt");
        put(root, "sys/fs/cgroup/cgroup.controllers", "empty.txt");
        put(
            root,
            &format!("sys/fs/cgroup/{dom}/cpu.stat"),
            "v2-cpu.stat",
        );
        put(
            root,
            &format!("sys/fs/cgroup/{dom}/memory.current"),
            "v2-memory.current",
        );
        put(
            root,
            &format!("sys/fs/cgroup/{dom}/memory.stat"),
            "v2-memory.stat",
        );
        put(root, &format!("sys/fs/cgroup/{dom}/io.stat"), "v2-io.stat");
        let c = CgroupReader::new(root).read(900).unwrap();
        assert_eq!(c.version, CgroupVersion::V2);
        assert_eq!(c.cpu_usage_ns, Some(5_120_334_981_000));
        assert_eq!(c.mem_bytes, Some(4_294_967_296));
        assert_eq!(c.mem_rss_bytes, Some(3_865_470_976));
        assert_eq!(c.mem_cache_bytes, Some(268_435_456));
        assert_eq!(c.io_read_bytes, Some(734_003_200 + 1_048_576));
        assert_eq!(c.io_write_bytes, Some(2_147_483_648));
    }

    #[test]
    fn missing_files_give_none_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        hybrid_host(root);
        fs::remove_file(root.join(format!(
            "sys/fs/cgroup/blkio/{V1_DOM}/blkio.throttle.io_service_bytes"
        )))
        .unwrap();
        let c = CgroupReader::new(root).read(4242).unwrap();
        assert_eq!(c.io_read_bytes, None);
        assert_eq!(c.cpu_usage_ns, Some(183_274_651_220_931));
        assert_eq!(c.missing.len(), 1, "{:?}", c.missing);
        assert_eq!(c.missing[0].counter, CounterKind::Io);
        assert!(c.missing[0]
            .file
            .ends_with(format!("{V1_DOM}/blkio.throttle.io_service_bytes")));
        assert_eq!(c.missing[0].key, None);

        // A keyed file without the key names file and key.
        fs::write(
            root.join(format!("sys/fs/cgroup/memory/{V1_DOM}/memory.stat")),
            "cache 1\n",
        )
        .unwrap();
        let c = CgroupReader::new(root).read(4242).unwrap();
        assert_eq!(c.mem_rss_bytes, None);
        let rss = c
            .missing
            .iter()
            .find(|m| m.counter == CounterKind::MemoryRss)
            .unwrap();
        assert_eq!(rss.key, Some("total_rss"));
        assert!(rss.file.ends_with("memory.stat"));
    }

    #[test]
    fn hybrid_falls_back_to_unified_cpu_stat_of_the_same_cgroup() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        hybrid_host(root);
        let hybrid = fs::read_to_string(Path::new(FIX).join("proc-cgroup-v1-hybrid.txt"))
            .unwrap()
            .replace("0::/\n", &format!("0::/{V1_DOM}/emulator\n"));
        fs::write(root.join("proc/4242/cgroup"), hybrid).unwrap();
        fs::remove_file(root.join(format!("sys/fs/cgroup/cpuacct/{V1_DOM}/cpuacct.usage")))
            .unwrap();
        put(
            root,
            &format!("sys/fs/cgroup/unified/{V1_DOM}/cpu.stat"),
            "v2-cpu.stat",
        );
        let c = CgroupReader::new(root).read(4242).unwrap();
        assert_eq!(c.version, CgroupVersion::Hybrid);
        assert_eq!(c.cpu_usage_ns, Some(5_120_334_981_000));
        assert!(
            c.missing.iter().all(|m| m.counter != CounterKind::Cpu),
            "filled gap is not reported"
        );
    }

    #[test]
    fn hybrid_ignores_unified_group_unrelated_to_the_domain() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        hybrid_host(root);
        let hybrid = fs::read_to_string(Path::new(FIX).join("proc-cgroup-v1-hybrid.txt"))
            .unwrap()
            .replace("0::/\n", "0::/system.slice/libvirtd.service\n");
        fs::write(root.join("proc/4242/cgroup"), hybrid).unwrap();
        let loc = CgroupReader::new(root).locate(4242).unwrap();
        assert_eq!(
            loc.unified, None,
            "libvirtd's service counters are not the domain's"
        );
        assert_eq!(loc.version, CgroupVersion::V1);
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        hybrid_host(root);
        put(
            root,
            &format!("sys/fs/cgroup/cpuacct/{V1_DOM}/cpuacct.usage"),
            "bad-not-a-number.txt",
        );
        let e = CgroupReader::new(root).read(4242).unwrap_err();
        assert!(
            matches!(&e, CgroupError::NotANumber { path, .. } if path.ends_with("cpuacct.usage")),
            "{e}"
        );
        assert!(e.to_string().contains("cpuacct.usage"));

        put(
            root,
            &format!("sys/fs/cgroup/cpuacct/{V1_DOM}/cpuacct.usage"),
            "v1-cpuacct.usage",
        );
        put(
            root,
            &format!("sys/fs/cgroup/blkio/{V1_DOM}/blkio.throttle.io_service_bytes"),
            "bad-blkio.txt",
        );
        let e = CgroupReader::new(root).read(4242).unwrap_err();
        assert!(matches!(&e, CgroupError::Malformed { line: 2, .. }), "{e}");

        let p = Path::new("io.stat");
        assert!(matches!(
            parse_io_stat("8:0 rbytes=12 wbytes\n", p),
            Err(CgroupError::Malformed { .. })
        ));
        assert!(matches!(
            parse_io_stat("8:0 rbytes=-1\n", p),
            Err(CgroupError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_io_stat("8:0 rbytes=18446744073709551615\n8:16 rbytes=1\n", p),
            Err(CgroupError::Overflow { key: "rbytes", .. })
        ));
        assert_eq!(parse_io_stat("", p).unwrap(), (0, 0), "no I/O yet");
        assert!(matches!(
            parse_keyed("usage_usec\n", p, "usage_usec"),
            Err(CgroupError::Malformed { .. })
        ));
        assert!(matches!(
            parse_single("\n", p),
            Err(CgroupError::Malformed { .. })
        ));
    }

    #[test]
    fn process_gone_and_bad_proc_cgroup() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let e = CgroupReader::new(root).read(1).unwrap_err();
        assert!(matches!(e, CgroupError::ProcessGone { pid: 1, .. }), "{e}");

        put(root, "proc/5/cgroup", "bad-proc-cgroup.txt");
        let e = CgroupReader::new(root).read(5).unwrap_err();
        assert!(matches!(&e, CgroupError::Malformed { line: 2, .. }), "{e}");

        fs::write(root.join("proc/5/cgroup"), "4:memory:/machine/../../etc\n").unwrap();
        let e = CgroupReader::new(root).read(5).unwrap_err();
        assert!(matches!(e, CgroupError::UnsafePath { .. }), "{e}");

        fs::write(root.join("proc/5/cgroup"), "4:memory:/machine/x\n").unwrap();
        let e = CgroupReader::new(root).read(5).unwrap_err();
        assert!(matches!(e, CgroupError::NoCgroup { pid: 5, .. }), "{e}");
    }

    #[test]
    fn proc_cgroup_parsing() {
        let p = Path::new("/proc/1/cgroup");
        let e = parse_proc_cgroup("12:cpu,cpuacct:/a:b\n0::/x\n", p).unwrap();
        assert_eq!(e[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(e[0].path, "/a:b");
        assert_eq!(
            e[1],
            CgroupEntry {
                hierarchy_id: 0,
                controllers: vec![],
                path: "/x".into()
            }
        );
        assert!(matches!(
            parse_proc_cgroup("x:cpu:/\n", p),
            Err(CgroupError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_proc_cgroup("1:cpu:relative\n", p),
            Err(CgroupError::Malformed { .. })
        ));
    }

    #[test]
    fn thread_group_suffixes() {
        let p = Path::new("x");
        assert_eq!(
            domain_relative("/machine/q/emulator", p).unwrap(),
            PathBuf::from("machine/q")
        );
        assert_eq!(
            domain_relative("/machine/q/vcpu12", p).unwrap(),
            PathBuf::from("machine/q")
        );
        assert_eq!(
            domain_relative("/machine/q/iothread1", p).unwrap(),
            PathBuf::from("machine/q")
        );
        assert_eq!(
            domain_relative("/machine/q/vcpux", p).unwrap(),
            PathBuf::from("machine/q/vcpux")
        );
        assert_eq!(domain_relative("/", p).unwrap(), PathBuf::new());
    }
}
