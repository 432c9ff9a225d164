//! What a domain holds of the host's memory: its cgroup's memory charge and its QEMU process's
//! resident and proportional set sizes (`/proc/<pid>/smaps_rollup`).
//!
//! Three views, because each answers another question. The cgroup charge (v1
//! `memory.usage_in_bytes`, v2 `memory.current`) is what the kernel bills the domain for,
//! page cache of its disk I/O included. RSS counts every page the process maps, shared or not.
//! PSS divides each shared page among the processes that map it, so the PSS of all shadows
//! booted from one image adds up to what they hold together (KSM-merged and page-cache pages
//! are shared). The private (unshared) pages are what the host gets back if the process goes:
//! the marginal cost of a shadow, also under KSM, which charges a merged page to one cgroup
//! only (the process whose page it kept), so cgroup charges shift between a primary and its
//! shadow as pages merge. A standing-by shadow's cost is reported as a share of its primary's.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::cgroup::{CgroupError, CgroupReader};

/// `smaps_rollup` is a few hundred bytes; more means a wrong file.
const MAX_ROLLUP_BYTES: u64 = 64 * 1024;

/// Errors reading a process's memory figures.
#[derive(Debug, Error)]
pub enum MemCostError {
    /// `/proc/<pid>/smaps_rollup` could not be read (the process is gone, or no permission).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `smaps_rollup` lacks a field or holds one that is not `<number> kB`.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The process's cgroup could not be located or read.
    #[error("cgroup of process {pid}")]
    Cgroup {
        /// The process.
        pid: u32,
        /// Why.
        #[source]
        source: CgroupError,
    },
}

/// Host memory one domain's QEMU process holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryHeld {
    /// The domain cgroup's memory charge (page cache included); `None` when the host has no
    /// memory controller for it.
    pub cgroup_bytes: Option<u64>,
    /// The cgroup's anonymous memory (v1 `total_rss`, v2 `anon`).
    pub cgroup_anon_bytes: Option<u64>,
    /// Resident set size of the QEMU process.
    pub rss_bytes: u64,
    /// Proportional set size: shared pages divided among their sharers; `None` when
    /// `smaps_rollup` may not be read (it needs ptrace access: a daemon confined without
    /// CAP_SYS_PTRACE reads RSS from `status` instead).
    pub pss_bytes: Option<u64>,
    /// Private pages (`Private_Clean` + `Private_Dirty`): mapped by this process alone, so
    /// freed when it goes. `None` like `pss_bytes`.
    #[serde(default)]
    pub private_bytes: Option<u64>,
}

/// The figures of `smaps_rollup` this module uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollup {
    /// `Rss`.
    pub rss: u64,
    /// `Pss`.
    pub pss: u64,
    /// `Private_Clean` + `Private_Dirty`.
    pub private: u64,
}

impl MemoryHeld {
    /// The one figure costs are compared by: the cgroup charge when there is one (it is what
    /// the kernel bills), the process's PSS otherwise.
    pub fn held_bytes(&self) -> u64 {
        self.cgroup_bytes
            .or(self.pss_bytes)
            .unwrap_or(self.rss_bytes)
    }
}

/// `part` as a percentage of `whole`, one decimal; `None` when `whole` is 0.
pub fn share_pct(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| (part as f64 * 1000.0 / whole as f64).round() / 10.0)
}

/// The RSS, PSS and private lines of `smaps_rollup` text, in bytes; `source` names the file in
/// errors.
pub fn parse_smaps_rollup(text: &str, source: &Path) -> Result<Rollup, MemCostError> {
    let field = |key: &str| -> Result<u64, MemCostError> {
        let malformed = |reason: String| MemCostError::Malformed {
            path: source.to_owned(),
            reason,
        };
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .ok_or_else(|| malformed(format!("no {key} line")))?;
        let kib = line
            .trim()
            .strip_suffix("kB")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                malformed(format!(
                    "{key} is {:?}, not <number> kB",
                    line.trim().chars().take(64).collect::<String>()
                ))
            })?;
        kib.checked_mul(1024)
            .ok_or_else(|| malformed(format!("{key} overflows 64 bits")))
    };
    let private = field("Private_Clean")?.saturating_add(field("Private_Dirty")?);
    Ok(Rollup {
        rss: field("Rss")?,
        pss: field("Pss")?,
        private,
    })
}

/// Reads the figures of process `pid` with `/proc` and `/sys/fs/cgroup` under `root` (`/` on a
/// real host; a fixture tree in tests).
pub fn read(root: &Path, pid: u32) -> Result<MemoryHeld, MemCostError> {
    let proc_dir = root.join("proc").join(pid.to_string());
    let path = proc_dir.join("smaps_rollup");
    let mut text = String::new();
    let (rss_bytes, pss_bytes, private_bytes) =
        match File::open(&path).and_then(|f| f.take(MAX_ROLLUP_BYTES).read_to_string(&mut text)) {
            Ok(_) => {
                let r = parse_smaps_rollup(&text, &path)?;
                (r.rss, Some(r.pss), Some(r.private))
            }
            // smaps_rollup needs ptrace access to the process; `status` does not.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let rss = crate::libvirt::rss_bytes(&root.join("proc"), pid as i32).map_err(
                    |source| MemCostError::Read {
                        path: proc_dir.join("status"),
                        source,
                    },
                )?;
                (rss, None, None)
            }
            Err(source) => return Err(MemCostError::Read { path, source }),
        };
    let counters = CgroupReader::new(root)
        .read(pid)
        .map_err(|source| MemCostError::Cgroup { pid, source })?;
    Ok(MemoryHeld {
        cgroup_bytes: counters.mem_bytes,
        cgroup_anon_bytes: counters.mem_rss_bytes,
        rss_bytes,
        pss_bytes,
        private_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `smaps_rollup` of a paused 192 MiB lab shadow (TCG), as Linux 6.1 writes it.
    const ROLLUP: &str = "\
55d0c6a5c000-7ffd5b5f6000 ---p 00000000 00:00 0                          [rollup]
Rss:              104412 kB
Pss:               98127 kB
Pss_Dirty:         90112 kB
Pss_Anon:          89880 kB
Pss_File:           8247 kB
Pss_Shmem:             0 kB
Shared_Clean:       8792 kB
Shared_Dirty:          0 kB
Private_Clean:      5740 kB
Private_Dirty:     89880 kB
Referenced:       104412 kB
Anonymous:         89880 kB
LazyFree:              0 kB
AnonHugePages:     10240 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn rollup_gives_rss_pss_and_private_in_bytes() {
        let r = parse_smaps_rollup(ROLLUP, Path::new("smaps_rollup")).unwrap();
        assert_eq!(r.rss, 104_412 * 1024);
        assert_eq!(r.pss, 98_127 * 1024);
        assert_eq!(r.private, (5_740 + 89_880) * 1024);
    }

    #[test]
    fn rollup_without_pss_or_with_garbage_is_named() {
        let no_pss: String = ROLLUP
            .lines()
            .filter(|l| !l.starts_with("Pss"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = parse_smaps_rollup(&no_pss, Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("no Pss line"), "{e}");
        let bad = ROLLUP.replace("Rss:              104412 kB", "Rss: lots");
        let e = parse_smaps_rollup(&bad, Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("Rss is \"lots\""), "{e}");
        let huge = ROLLUP.replace("104412 kB", "99999999999999999999 kB");
        assert!(parse_smaps_rollup(&huge, Path::new("x")).is_err());
    }

    #[test]
    fn figures_come_from_proc_and_the_domains_memory_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let dom = "machine/qemu-3-web1.libvirt-qemu";
        let write = |rel: &str, text: &str| {
            let p = r.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write("proc/42/smaps_rollup", ROLLUP);
        write(
            "proc/42/cgroup",
            &format!("7:memory:/{dom}\n4:cpu,cpuacct:/{dom}/emulator\n0::/\n"),
        );
        write(
            &format!("sys/fs/cgroup/memory/{dom}/memory.usage_in_bytes"),
            "120000000\n",
        );
        write(
            &format!("sys/fs/cgroup/memory/{dom}/memory.stat"),
            "cache 9000\nrss 1\ntotal_cache 11000000\ntotal_rss 92000000\n",
        );
        let m = read(r, 42).unwrap();
        assert_eq!(
            m,
            MemoryHeld {
                cgroup_bytes: Some(120_000_000),
                cgroup_anon_bytes: Some(92_000_000),
                rss_bytes: 104_412 * 1024,
                pss_bytes: Some(98_127 * 1024),
                private_bytes: Some((5_740 + 89_880) * 1024),
            }
        );
        assert_eq!(m.held_bytes(), 120_000_000);
        let gone = read(r, 43).unwrap_err();
        assert!(matches!(gone, MemCostError::Read { .. }), "{gone}");
    }

    #[test]
    fn share_is_a_rounded_percentage() {
        assert_eq!(share_pct(1, 3), Some(33.3));
        assert_eq!(share_pct(50, 100), Some(50.0));
        assert_eq!(share_pct(1, 0), None);
    }
}
