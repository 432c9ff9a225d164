//! Kernel samepage merging (KSM): the host merges identical pages of processes that marked their
//! memory mergeable. QEMU marks guest RAM mergeable unless the domain says
//! `<memoryBacking><nosharepages/>`, so shadows booted from the same image as their primary (or
//! as each other, in a pool) share the pages they have in common once `ksmd` runs. `ksmd` scans
//! in the background and costs host CPU: [`ksmd_cpu_ticks`] reads what it has used.
//!
//! Everything here reads or writes `<root>/sys/kernel/mm/ksm` and `<root>/proc`, so it is
//! tested against a fake tree.

use std::path::{Path, PathBuf};

/// Errors of the KSM controls.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    /// The kernel has no KSM (built without `CONFIG_KSM`), or sysfs is not mounted.
    #[error("{path} does not exist: this kernel has no KSM (CONFIG_KSM) or sysfs is not mounted")]
    Missing {
        /// The directory looked for.
        path: PathBuf,
    },
    /// A KSM file could not be read or written (not root, read-only sysfs in a container).
    #[error("cannot {what} {path}")]
    Io {
        /// `read` or `write`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A counter held something other than a number.
    #[error("{path} holds {value:?}, not a number")]
    NotANumber {
        /// The file.
        path: PathBuf,
        /// What it held (clipped).
        value: String,
    },
}

/// The KSM counters that say what it saves and how far it got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KsmStats {
    /// `run`: 0 stopped, 1 running, 2 unmerging.
    pub run: u64,
    /// Shared pages in use (each backs several).
    pub pages_shared: u64,
    /// Pages that point at a shared one: what KSM saves.
    pub pages_sharing: u64,
    /// Completed scans of all mergeable memory.
    pub full_scans: u64,
}

impl KsmStats {
    /// Bytes saved: each sharing page is one the host does not hold (4 KiB pages).
    pub fn saved_bytes(&self) -> u64 {
        self.pages_sharing * 4096
    }
}

fn dir(root: &Path) -> PathBuf {
    root.join("sys/kernel/mm/ksm")
}

fn read_u64(path: &Path) -> Result<u64, KsmError> {
    let text = std::fs::read_to_string(path).map_err(|source| KsmError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| KsmError::NotANumber {
        path: path.to_path_buf(),
        value: text.chars().take(40).collect(),
    })
}

/// Reads the counters under `root` (`/` on a real host).
pub fn stats(root: &Path) -> Result<KsmStats, KsmError> {
    let d = dir(root);
    if !d.is_dir() {
        return Err(KsmError::Missing { path: d });
    }
    Ok(KsmStats {
        run: read_u64(&d.join("run"))?,
        pages_shared: read_u64(&d.join("pages_shared"))?,
        pages_sharing: read_u64(&d.join("pages_sharing"))?,
        full_scans: read_u64(&d.join("full_scans"))?,
    })
}

/// Sets `run` (0 stop, 1 run); returns what it was before. Writing the value it already has
/// is a no-op for the kernel.
pub fn set_run(root: &Path, run: u64) -> Result<u64, KsmError> {
    let d = dir(root);
    if !d.is_dir() {
        return Err(KsmError::Missing { path: d });
    }
    let path = d.join("run");
    let before = read_u64(&path)?;
    if before != run {
        std::fs::write(&path, format!("{run}\n")).map_err(|source| KsmError::Io {
            what: "write",
            path,
            source,
        })?;
    }
    Ok(before)
}

/// CPU time `ksmd` has used (user + system, in clock ticks of `/proc/<pid>/stat`), found by its
/// `comm`; `None` when no `ksmd` thread is found.
pub fn ksmd_cpu_ticks(root: &Path) -> Option<u64> {
    let proc = root.join("proc");
    for entry in std::fs::read_dir(&proc).ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "ksmd" {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        return Some(utime + stime);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(run: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let d = dir(root.path());
        std::fs::create_dir_all(&d).unwrap();
        for (f, v) in [
            ("run", run),
            ("pages_shared", "120\n"),
            ("pages_sharing", "2560\n"),
            ("full_scans", "3\n"),
        ] {
            std::fs::write(d.join(f), v).unwrap();
        }
        let p = root.path().join("proc/37");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("comm"), "ksmd\n").unwrap();
        std::fs::write(
            p.join("stat"),
            "37 (ksmd) S 2 0 0 0 -1 2129984 0 0 0 0 150 25 0 0 25 5 1 0 9 0 0 0\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.path().join("proc/self")).unwrap();
        root
    }

    #[test]
    fn counters_say_what_ksm_saves() {
        let root = fake("1\n");
        let s = stats(root.path()).unwrap();
        assert_eq!(
            s,
            KsmStats {
                run: 1,
                pages_shared: 120,
                pages_sharing: 2560,
                full_scans: 3
            }
        );
        assert_eq!(s.saved_bytes(), 10 << 20);
        assert_eq!(ksmd_cpu_ticks(root.path()), Some(175));
    }

    #[test]
    fn run_is_switched_and_the_old_value_returned() {
        let root = fake("0\n");
        assert_eq!(set_run(root.path(), 1).unwrap(), 0);
        assert_eq!(stats(root.path()).unwrap().run, 1);
        assert_eq!(set_run(root.path(), 1).unwrap(), 1);
    }

    #[test]
    fn a_kernel_without_ksm_or_garbage_is_named() {
        let root = tempfile::tempdir().unwrap();
        let e = stats(root.path()).unwrap_err();
        assert!(e.to_string().contains("CONFIG_KSM"), "{e}");
        assert!(set_run(root.path(), 1).is_err());
        assert_eq!(ksmd_cpu_ticks(root.path()), None);
        let root = fake("running\n");
        let e = stats(root.path()).unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }
}
