//! Watching a domain's QEMU process through a pidfd: the kernel reports its exit at once,
//! about a second before libvirt's own lifecycle event arrives.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::LibvirtError;

/// Where libvirt's system QEMU driver writes `<domain>.pid`.
pub const QEMU_RUN_DIR: &str = "/run/libvirt/qemu";

/// Reads the QEMU pid of a running domain from libvirt's pid file.
pub fn qemu_pid(run_dir: &Path, domain: &str) -> Result<i32, LibvirtError> {
    let path: PathBuf = run_dir.join(format!("{domain}.pid"));
    let err = |source| LibvirtError::Process {
        domain: domain.to_string(),
        source,
    };
    let text = std::fs::read_to_string(&path).map_err(err)?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} does not hold a pid: {:?}", path.display(), text.trim()),
            ))
        })
}

/// Total run time in nanoseconds of a QEMU process's vCPU threads (threads named
/// `CPU <n>/KVM` or `CPU <n>/TCG`), from `/proc/<pid>/task/*/schedstat`. Reads only /proc, so it
/// answers even when QEMU itself is stopped or its monitor is stuck.
pub fn vcpu_time_ns(proc_root: &Path, pid: i32) -> std::io::Result<u64> {
    let mut total: u64 = 0;
    let mut found = false;
    for entry in std::fs::read_dir(proc_root.join(pid.to_string()).join("task"))? {
        let dir = entry?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !comm.starts_with("CPU ") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        if let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            total = total.saturating_add(ns);
            found = true;
        }
    }
    if found {
        Ok(total)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no vCPU threads under pid {pid}"),
        ))
    }
}

/// Resident memory of a process in bytes (`VmRSS` of `/proc/<pid>/status`): for a paused
/// shadow, the host memory it holds while it stands by.
pub fn rss_bytes(proc_root: &Path, pid: i32) -> std::io::Result<u64> {
    let path = proc_root.join(pid.to_string()).join("status");
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb.saturating_mul(1024))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} has no VmRSS line in kB", path.display()),
            )
        })
}

/// Whether `pid` is the QEMU of domain `name` (its command line names `guest=<name>`): a pid
/// file can outlive its process and the pid be reused.
pub fn is_qemu_of(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = format!("guest={name}");
    cmdline
        .split(|b| *b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .any(|arg| arg == want || arg.starts_with(&format!("{want},")))
}

/// SIGKILLs the QEMU of `domain` through a pidfd and waits up to `timeout` for it to exit.
/// `Ok(Some(pid))`: killed and gone; `Ok(None)`: no QEMU of that domain runs; `Err`: why it
/// may still run. Besides fencing, this spares libvirt's destroy its SIGTERM grace (about
/// 10 s), which a stopped (SIGSTOP) QEMU never honours.
pub async fn kill_qemu(
    run_dir: &Path,
    domain: &str,
    timeout: std::time::Duration,
) -> Result<Option<i32>, String> {
    let Ok(pid) = qemu_pid(run_dir, domain) else {
        return Ok(None);
    };
    if !is_qemu_of(pid, domain) {
        return Ok(None);
    }
    let process = match QemuProcess::open(domain, pid) {
        Ok(p) => p,
        // Exited between the two reads.
        Err(_) if !is_qemu_of(pid, domain) => return Ok(None),
        Err(e) => return Err(format!("cannot watch QEMU pid {pid}: {e}")),
    };
    process
        .kill()
        .map_err(|e| format!("cannot kill QEMU pid {pid}: {e}"))?;
    tokio::time::timeout(timeout, process.exited())
        .await
        .map_err(|_| format!("QEMU pid {pid} still runs {timeout:?} after SIGKILL"))?;
    Ok(Some(pid))
}

/// How the watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// The process exited (any reason).
    Exited,
}

/// A pidfd on one QEMU process.
pub struct QemuProcess {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
}

impl QemuProcess {
    /// Opens a pidfd on `pid`. Must be called inside a tokio runtime.
    pub fn open(domain: &str, pid: i32) -> Result<Self, LibvirtError> {
        let err = |source| LibvirtError::Process {
            domain: domain.to_string(),
            source,
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no pointers.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // SAFETY: `owned` is a valid open pidfd that the AsyncFd owns for its whole life, so
        // its raw fd stays the same open description until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        Ok(QemuProcess { pid, fd })
    }

    /// The watched pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends SIGKILL through the pidfd (never to a reused pid). A stopped (SIGSTOP) process
    /// dies too.
    pub fn kill(&self) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal takes our open pidfd, a signal number, a null siginfo and
        // flags 0; it reads no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match r {
            0 => Ok(()),
            _ => match std::io::Error::last_os_error() {
                // Already gone (exited, not yet reaped): killed is what we wanted.
                e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Completes when the process has exited (a pidfd polls readable then).
    pub async fn exited(&self) -> ProcessExit {
        loop {
            match self.fd.readable().await {
                Ok(_guard) => return ProcessExit::Exited,
                Err(e) => {
                    tracing::warn!(pid = self.pid, fd = self.fd.as_raw_fd(), error = %e, "pidfd poll failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_reports_child_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let watch = QemuProcess::open("test", child.id() as i32).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), watch.exited()).await;
        assert_eq!(r.unwrap(), ProcessExit::Exited);
        child.wait().unwrap();
    }

    #[test]
    fn vcpu_time_sums_only_vcpu_threads() {
        let root = tempfile::tempdir().unwrap();
        for (tid, comm, stat) in [
            ("10", "qemu-system-x86\n", "999 0 1\n"),
            ("11", "CPU 0/TCG\n", "1500 7 3\n"),
            ("12", "CPU 1/TCG\n", "500 0 1\n"),
        ] {
            let d = root.path().join("42/task").join(tid);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("comm"), comm).unwrap();
            std::fs::write(d.join("schedstat"), stat).unwrap();
        }
        assert_eq!(vcpu_time_ns(root.path(), 42).unwrap(), 2000);
        assert!(vcpu_time_ns(root.path(), 43).is_err());
    }

    #[test]
    fn rss_from_proc_status() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("7")).unwrap();
        std::fs::write(
            root.path().join("7/status"),
            "Name:\tqemu-system-x86\nVmPeak:\t  999 kB\nVmRSS:\t  204800 kB\nThreads:\t5\n",
        )
        .unwrap();
        assert_eq!(rss_bytes(root.path(), 7).unwrap(), 204800 * 1024);
        // A kernel thread has no VmRSS line; a missing process is an I/O error.
        std::fs::create_dir_all(root.path().join("8")).unwrap();
        std::fs::write(root.path().join("8/status"), "Name:\tkthreadd\n").unwrap();
        let e = rss_bytes(root.path(), 8).unwrap_err();
        assert!(e.to_string().contains("no VmRSS"), "{e}");
        assert!(rss_bytes(root.path(), 9).is_err());
        // And the real thing: this test process holds some memory.
        let own = rss_bytes(Path::new("/proc"), std::process::id() as i32).unwrap();
        assert!(own > 0);
    }

    #[test]
    fn pid_file_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web1.pid"), "garbage").unwrap();
        let e = qemu_pid(dir.path(), "web1").unwrap_err();
        assert!(format!("{:?}", e).contains("does not hold a pid"));
        std::fs::write(dir.path().join("web1.pid"), "4242\n").unwrap();
        assert_eq!(qemu_pid(dir.path(), "web1").unwrap(), 4242);
        assert!(qemu_pid(dir.path(), "nope").is_err());
    }
}
