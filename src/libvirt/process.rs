//! Watching a domain's QEMU process through pidfds: the kernel reports its exit at once,
//! about a second before libvirt's own lifecycle event arrives, and thread pidfds report a
//! crash at its first thread's exit, before the kernel has released the guest's memory.

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

/// Largest status file read: the live definition's limit plus QEMU's capability flags.
const STATUS_FILE_MAX: u64 = crate::domain_xml::DOMAIN_XML_MAX as u64 + (256 << 10);

/// The running domains as libvirt's status files list them (`<run_dir>/<name>.xml`: a
/// `<domstatus>` around the live `<domain>`, written while the domain runs and removed when it
/// has stopped), each with its text or why it could not be read. Reading them asks libvirtd
/// nothing, so it never waits for a domain's lock.
pub fn status_files(run_dir: &Path) -> std::io::Result<Vec<(String, std::io::Result<String>)>> {
    use std::io::Read;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(run_dir)? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".xml"))
            .filter(|n| !n.is_empty() && !n.starts_with('.'))
        else {
            continue;
        };
        let text = std::fs::File::open(&path).and_then(|f| {
            let mut s = String::new();
            f.take(STATUS_FILE_MAX).read_to_string(&mut s)?;
            Ok(s)
        });
        out.push((name.to_string(), text));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Scheduler times of a QEMU process's vCPU threads, summed over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSched {
    /// Time they ran on a host CPU, in nanoseconds.
    pub run_ns: u64,
    /// Time they waited, runnable, on a host run queue, in nanoseconds.
    pub wait_ns: u64,
}

/// Scheduler times of a QEMU process's vCPU threads (threads named `CPU <n>/KVM` or
/// `CPU <n>/TCG`), from the first two fields of `/proc/<pid>/task/*/schedstat`. Reads only
/// /proc, so it answers even when QEMU itself is stopped or its monitor is stuck.
pub fn vcpu_sched(proc_root: &Path, pid: i32) -> std::io::Result<VcpuSched> {
    let mut total = VcpuSched {
        run_ns: 0,
        wait_ns: 0,
    };
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
        let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
        if let Some(Some(run)) = fields.next() {
            total.run_ns = total.run_ns.saturating_add(run);
            let wait = fields.next().flatten().unwrap_or(0);
            total.wait_ns = total.wait_ns.saturating_add(wait);
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

/// Whether the QEMU of `domain` still holds its files: the pid in libvirt's pid file is that
/// domain's QEMU, or a process in a group exit (a dying QEMU's command line is gone with its
/// memory, but its files close only at the end). A zombie or a reaped one holds nothing.
pub fn qemu_holds_files(run_dir: &Path, domain: &str) -> bool {
    let Ok(pid) = qemu_pid(run_dir, domain) else {
        return false;
    };
    if is_qemu_of(pid, domain) {
        return true;
    }
    let proc_root = Path::new("/proc");
    state_and_flags(proc_root, pid).is_some_and(|(state, _)| !is_dead_state(&state))
        && group_exiting(proc_root, pid)
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
    // A QEMU already dying (its crash heard early) is waited for like a killed one.
    if !is_qemu_of(pid, domain) && !qemu_holds_files(run_dir, domain) {
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
    /// The process is gone.
    Exited,
    /// Its threads are exiting (a fatal signal, or `exit_group`): it runs no more code, but the
    /// kernel is still releasing its memory and files, which for a guest's RAM takes tens of
    /// milliseconds here and longer the larger the guest.
    Exiting,
}

/// Threads watched besides the whole process. At a fatal signal every thread exits, but only
/// the last one releases the memory; a watch on two or more of them hears the first. Only
/// sub-threads: the kernel wakes a thread pidfd on the leader only when the whole group is gone.
const WATCHED_THREADS: usize = 8;

/// `PF_EXITING` in a task's flags (`/proc/<pid>/stat` field 9): set as it enters `do_exit`.
const PF_EXITING: u64 = 0x4;

/// After a watched thread exits: how often, and how many times, to look for the process's
/// group exit before deciding the thread left alone (a vCPU unplugged). A fatal signal marks
/// every thread before any can exit, so the evidence is there at once but for a window of a
/// few instructions in the leader.
const GROUP_EXIT_CHECKS: u32 = 20;
const GROUP_EXIT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

/// Whether process `pid` is in a group exit (its leader killed, exiting or a zombie, or gone),
/// from `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn group_exiting(proc_root: &Path, pid: i32) -> bool {
    let Some((state, flags)) = state_and_flags(proc_root, pid) else {
        return true; // gone
    };
    if is_dead_state(&state) || flags & PF_EXITING != 0 {
        return true;
    }
    let dir = proc_root.join(pid.to_string());
    let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
        return true;
    };
    // A fatal signal is queued as SIGKILL to every thread (its bit is 1 << (9 - 1)).
    let sigkill = 1u64 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        ["SigPnd:", "ShdPnd:"].iter().any(|k| {
            l.strip_prefix(k)
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|set| set & sigkill != 0)
        })
    })
}

/// A task's state letter and flags (`/proc/<pid>/stat` fields 3 and 9); `None` when it is gone.
fn state_and_flags(proc_root: &Path, pid: i32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name is in parentheses and may hold anything: fields follow the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_string();
    let flags = fields
        .nth(5)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    Some((state, flags))
}

/// A zombie or dead task: its threads have all exited and its files are closed.
fn is_dead_state(state: &str) -> bool {
    matches!(state, "Z" | "X" | "x")
}

/// Opens a pidfd; `flags` 0 watches the whole process, `PIDFD_THREAD` one thread.
fn pidfd(pid: i32, flags: libc::c_uint) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no pointers.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // SAFETY: `owned` is a valid open pidfd that the AsyncFd owns for its whole life, so
    // its raw fd stays the same open description until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// The threads of `pid` worth a watch: its long-lived sub-threads (vCPUs, RCU, I/O threads;
/// not the thread pool's `worker`s, which come and go), at most [`WATCHED_THREADS`], vCPU
/// threads (`CPU <n>/...`, named by QEMU's `debug-threads=on`, which libvirt sets) first.
fn watched_threads(proc_root: &Path, pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc_root.join(pid.to_string()).join("task")) else {
        return Vec::new();
    };
    let mut threads: Vec<(bool, i32)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (tid != pid && !comm.starts_with("worker")).then_some((!comm.starts_with("CPU "), tid))
        })
        .collect();
    threads.sort_unstable();
    threads
        .into_iter()
        .take(WATCHED_THREADS)
        .map(|(_, tid)| tid)
        .collect()
}

/// A pidfd on one QEMU process, and thread pidfds on some of its threads.
pub struct QemuProcess {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
    threads: Vec<AsyncFd<OwnedFd>>,
}

impl QemuProcess {
    /// Opens a pidfd on `pid`, and thread pidfds on its long-lived sub-threads (where the
    /// kernel offers them: Linux 6.9 and later). Must be called inside a tokio runtime.
    pub fn open(domain: &str, pid: i32) -> Result<Self, LibvirtError> {
        let fd = pidfd(pid, 0).map_err(|source| LibvirtError::Process {
            domain: domain.to_string(),
            source,
        })?;
        let threads = watched_threads(Path::new("/proc"), pid)
            .into_iter()
            .filter_map(|tid| pidfd(tid, libc::PIDFD_THREAD).ok())
            .collect();
        Ok(QemuProcess { pid, fd, threads })
    }

    /// The watched pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pidfd on the whole process.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.get_ref().as_fd()
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

    /// Completes as soon as the process is known to be ending: at the first watched thread
    /// that exits in a group exit ([`ProcessExit::Exiting`]), or when the process is gone. The
    /// crash of a large guest is heard before the kernel has released its memory. A thread
    /// that leaves alone (a vCPU unplugged) is dropped from the watch.
    pub async fn ended(&self) -> ProcessExit {
        let mut watching = vec![true; self.threads.len()];
        loop {
            let ready = std::future::poll_fn(|cx| {
                if self.fd.poll_read_ready(cx).is_ready() {
                    return std::task::Poll::Ready(None);
                }
                for (i, fd) in self.threads.iter().enumerate() {
                    if watching[i] && fd.poll_read_ready(cx).is_ready() {
                        return std::task::Poll::Ready(Some(i));
                    }
                }
                std::task::Poll::Pending
            })
            .await;
            let Some(i) = ready else {
                return self.exited().await;
            };
            for _ in 0..GROUP_EXIT_CHECKS {
                if group_exiting(Path::new("/proc"), self.pid) {
                    return ProcessExit::Exiting;
                }
                tokio::time::sleep(GROUP_EXIT_CHECK_EVERY).await;
            }
            tracing::info!(
                pid = self.pid,
                "a watched QEMU thread exited without its process; watching the others"
            );
            watching[i] = false;
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

    /// A child with a few threads, one of them named like a vCPU, that exits on its own after
    /// `vcpu_leaves_after` seconds when given.
    fn threaded_child(vcpu_leaves_after: Option<f64>) -> std::process::Child {
        let script = format!(
            r#"
import threading, time
def vcpu(leave):
    with open(f"/proc/self/task/{{threading.get_native_id()}}/comm", "w") as f:
        f.write("CPU 0/TCG")
    time.sleep(leave if leave is not None else 100)
ballast = bytearray(64 << 20)
threading.Thread(target=vcpu, args=({leave},), daemon=True).start()
threading.Thread(target=time.sleep, args=(100,), daemon=True).start()
print("ready", flush=True)
time.sleep(100)
"#,
            leave = vcpu_leaves_after.map_or("None".to_string(), |s| s.to_string())
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        child
    }

    #[tokio::test]
    async fn a_killed_threaded_process_is_heard_ending() {
        let mut child = threaded_child(None);
        let pid = child.id() as i32;
        assert_eq!(
            watched_threads(Path::new("/proc"), pid).len(),
            2,
            "two sub-threads"
        );
        let watch = QemuProcess::open("test", pid).unwrap();
        assert!(!group_exiting(Path::new("/proc"), pid));
        watch.kill().unwrap();
        let how = tokio::time::timeout(std::time::Duration::from_secs(10), watch.ended())
            .await
            .unwrap();
        assert!(matches!(how, ProcessExit::Exiting | ProcessExit::Exited));
        assert!(group_exiting(Path::new("/proc"), pid));
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn a_vcpu_thread_leaving_alone_is_not_an_end() {
        let mut child = threaded_child(Some(0.2));
        let pid = child.id() as i32;
        let watch = QemuProcess::open("test", pid).unwrap();
        assert_eq!(watch.threads.len(), 2, "a pidfd on each sub-thread");
        // The vCPU thread exits after 0.2 s; the process lives on.
        let early = tokio::time::timeout(std::time::Duration::from_secs(1), watch.ended()).await;
        assert!(early.is_err(), "ended at a lone thread's exit: {early:?}");
        child.kill().unwrap();
        let how = tokio::time::timeout(std::time::Duration::from_secs(10), watch.ended())
            .await
            .unwrap();
        assert!(matches!(how, ProcessExit::Exiting | ProcessExit::Exited));
        child.wait().unwrap();
    }

    #[test]
    fn status_files_are_the_xml_files_read_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("web1.xml"), "<domstatus/>").unwrap();
        std::fs::write(p.join("web1.pid"), "123").unwrap();
        // libvirt's rewrite in progress, and hidden files, are not domains.
        std::fs::write(p.join("web2.xml.new"), "<x/>").unwrap();
        std::fs::write(p.join(".xml"), "<x/>").unwrap();
        let big = "a".repeat(STATUS_FILE_MAX as usize + 10);
        std::fs::write(p.join("big.xml"), &big).unwrap();
        let files = status_files(p).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["big", "web1"]);
        assert_eq!(files[0].1.as_ref().unwrap().len() as u64, STATUS_FILE_MAX);
        assert_eq!(files[1].1.as_ref().unwrap(), "<domstatus/>");
        assert!(status_files(&p.join("missing")).is_err());
    }

    #[test]
    fn group_exit_read_from_proc_files() {
        let root = tempfile::tempdir().unwrap();
        let write = |pid: &str, stat: &str, status: &str| {
            let d = root.path().join(pid);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stat"), stat).unwrap();
            std::fs::write(d.join("status"), status).unwrap();
        };
        let quiet = "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n";
        // Running, nothing pending; the name holds spaces and parentheses.
        write("1", "1 (qemu (x) y) S 1 1 1 0 -1 4194560 0 0\n", quiet);
        assert!(!group_exiting(root.path(), 1));
        // PF_EXITING among the flags.
        write("2", "2 (qemu) R 1 1 1 0 -1 4194564 0 0\n", quiet);
        assert!(group_exiting(root.path(), 2));
        // A zombie leader.
        write("3", "3 (qemu) Z 1 1 1 0 -1 4194560 0 0\n", quiet);
        assert!(group_exiting(root.path(), 3));
        // SIGKILL queued to the thread, or to the process.
        let run = "4 (qemu) S 1 1 1 0 -1 4194560 0 0\n";
        write(
            "4",
            run,
            "SigPnd:\t0000000000000100\nShdPnd:\t0000000000000000\n",
        );
        assert!(group_exiting(root.path(), 4));
        write(
            "5",
            run,
            "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n",
        );
        assert!(group_exiting(root.path(), 5));
        // Other signals pending are no exit; a missing process is.
        write(
            "6",
            run,
            "SigPnd:\t0000000000004002\nShdPnd:\t0000000000000000\n",
        );
        assert!(!group_exiting(root.path(), 6));
        assert!(group_exiting(root.path(), 7));
    }

    #[test]
    fn vcpu_sched_sums_only_vcpu_threads() {
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
        assert_eq!(
            vcpu_sched(root.path(), 42).unwrap(),
            VcpuSched {
                run_ns: 2000,
                wait_ns: 7
            }
        );
        assert!(vcpu_sched(root.path(), 43).is_err());
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
