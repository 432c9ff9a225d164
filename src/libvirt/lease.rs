//! Handing a dead QEMU's disk leases back the moment it is gone.
//!
//! With libvirt's lock manager (`lock_manager = "lockd"`), every QEMU keeps one connection to
//! virtlockd open for its whole life, and its disk leases are released when that connection
//! closes. A killed QEMU's files close just before the kernel makes it a zombie, so virtlockd
//! sees the close while the process still exists; it then polls for the process in 200 ms
//! sleeps in its only event loop, and no lease can be had from it meanwhile. (libvirtd's own
//! stop of the domain does the same; see `LiveSteps::libvirt_stopped`.) A data disk's handover
//! waited those 200 ms on every crash.
//!
//! So the primary's watcher duplicates that connection into this process (`pidfd_getfd`, which
//! needs `CAP_SYS_PTRACE` over QEMU), keeping it open past QEMU's death, and closes it once the
//! process has been reaped: virtlockd then releases the leases and finds the pid gone at once.
//! Holding the connection can only keep a lease longer, never shorter: a dead QEMU's disk is
//! never given out while its process still exists. Without the capability, or without
//! virtlockd, nothing is held and the handover waits for libvirt as before.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// File name of virtlockd's socket (under /run/libvirt on a host).
const VIRTLOCKD_SOCKET: &str = "virtlockd-sock";
/// Most descriptors of one QEMU looked at: QEMU opens a few dozen.
const MAX_FDS_SCANNED: usize = 4096;
/// How often a dead QEMU is checked for having been reaped.
const REAP_POLL: Duration = Duration::from_millis(1);
/// How long a released entry stays for a promotion to find.
const KEEP_RELEASED: Duration = Duration::from_secs(120);

/// Duplicates into this process every connection the process behind `pidfd` (pid `pid`) has
/// open to virtlockd. Empty when it has none (no lock manager) or when it may not be read
/// (no `CAP_SYS_PTRACE` over it: the error says so).
pub fn lock_connections(
    proc_root: &Path,
    pidfd: BorrowedFd<'_>,
    pid: i32,
) -> std::io::Result<Vec<OwnedFd>> {
    let mut held = Vec::new();
    let fds = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd"))?;
    for entry in fds.filter_map(|e| e.ok()).take(MAX_FDS_SCANNED) {
        let Some(num) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd takes our open pidfd, a descriptor number in that process and
        // flags 0; it returns a new descriptor of ours or -1, and reads no memory of ours.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), num, 0) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Closed meanwhile.
                Some(libc::EBADF) => continue,
                _ => return Err(e),
            }
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        if peer_is_virtlockd(&fd) {
            held.push(fd);
        }
    }
    Ok(held)
}

/// Whether `fd` is a Unix socket connected to virtlockd's socket.
fn peer_is_virtlockd(fd: &OwnedFd) -> bool {
    nix::sys::socket::getpeername::<nix::sys::socket::UnixAddr>(fd.as_raw_fd())
        .ok()
        .and_then(|a| {
            a.path()
                .map(|p| p.file_name() == Some(VIRTLOCKD_SOCKET.as_ref()))
        })
        .unwrap_or(false)
}

/// Waits until the process behind `pidfd` has been reaped (signal 0 through the pidfd fails
/// with ESRCH only then: a zombie still takes it), at most `limit`. True when it was.
pub async fn reaped(pidfd: BorrowedFd<'_>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        // SAFETY: pidfd_send_signal takes our open pidfd, signal 0 (a check, nothing sent), a
        // null siginfo and flags 0; it reads no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(REAP_POLL).await;
    }
}

/// Where a held connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handback {
    /// QEMU runs (or is dying) and its connection is held here.
    Held,
    /// QEMU was reaped and the connection closed: virtlockd has its leases back.
    Released,
    /// The hold ended without proof of the reap (the watch stopped, or the process lingered):
    /// the connection is closed, but the leases' state is libvirt's to say.
    Unconfirmed,
}

/// The primaries whose virtlockd connection the daemon holds, by domain: the watcher that
/// holds one reports here, a promotion asks here. Owned by the daemon.
#[derive(Debug, Default)]
pub struct LeaseHandbacks {
    by_domain: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    since: Instant,
    state: watch::Receiver<Handback>,
}

/// A watcher's side of one held connection. Dropped without [`HandbackReport::released`], it
/// reports [`Handback::Unconfirmed`].
#[derive(Debug)]
pub struct HandbackReport {
    tx: watch::Sender<Handback>,
}

impl HandbackReport {
    /// The connection was closed after QEMU was reaped.
    pub fn released(self) {
        let _ = self.tx.send(Handback::Released);
    }
}

impl Drop for HandbackReport {
    fn drop(&mut self) {
        self.tx.send_if_modified(|s| {
            let held = *s == Handback::Held;
            if held {
                *s = Handback::Unconfirmed;
            }
            held
        });
    }
}

impl LeaseHandbacks {
    /// Records that the connection of `domain`'s QEMU is held from now on (a restarted
    /// primary replaces its old entry).
    pub fn hold(&self, domain: &str) -> HandbackReport {
        let (tx, rx) = watch::channel(Handback::Held);
        let mut map = self.by_domain.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, e| *e.state.borrow() == Handback::Held || e.since.elapsed() < KEEP_RELEASED);
        map.insert(
            domain.to_string(),
            Entry {
                since: Instant::now(),
                state: rx,
            },
        );
        HandbackReport { tx }
    }

    /// Waits up to `limit` for `domain`'s held connection to be handed back. True only when
    /// it was closed after QEMU's reap; false when none is held or the hold ended otherwise.
    pub async fn released(&self, domain: &str, limit: Duration) -> bool {
        let Some(mut rx) = self
            .by_domain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(domain)
            .map(|e| e.state.clone())
        else {
            return false;
        };
        let settled = tokio::time::timeout(limit, async {
            rx.wait_for(|s| *s != Handback::Held)
                .await
                .map(|s| *s)
                .unwrap_or(Handback::Unconfirmed)
        })
        .await;
        settled == Ok(Handback::Released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn pidfd_of(pid: i32) -> OwnedFd {
        // SAFETY: pidfd_open takes a pid and flags; no pointers.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(raw >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(raw as i32) }
    }

    /// A child holding a connection to a listener named like virtlockd's socket and one to
    /// another socket: only the first is taken; after the child is killed and reaped the
    /// listener's side sees no EOF until the held copy is dropped.
    #[tokio::test]
    async fn holds_only_the_virtlockd_connection_past_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let lockd = UnixListener::bind(dir.path().join(VIRTLOCKD_SOCKET)).unwrap();
        let other = UnixListener::bind(dir.path().join("monitor.sock")).unwrap();
        let to_lockd = UnixStream::connect(dir.path().join(VIRTLOCKD_SOCKET)).unwrap();
        let to_other = UnixStream::connect(dir.path().join("monitor.sock")).unwrap();
        let (mut lockd_side, _) = lockd.accept().unwrap();
        let (_other_side, _) = other.accept().unwrap();
        use std::os::unix::process::CommandExt;
        let (a, b) = (to_lockd.as_raw_fd(), to_other.as_raw_fd());
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("100");
        // SAFETY: the pre-exec hook only clears FD_CLOEXEC on two descriptors we own, with
        // fcntl (async-signal-safe), before exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in [a, b] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop((to_lockd, to_other));
        let pid = child.id() as i32;
        let pidfd = pidfd_of(pid);
        let held = lock_connections(Path::new("/proc"), pidfd.as_fd(), pid).unwrap();
        assert_eq!(held.len(), 1, "only the virtlockd connection is held");

        child.kill().unwrap();
        child.wait().unwrap();
        assert!(reaped(pidfd.as_fd(), Duration::from_secs(5)).await);
        use std::io::Read;
        lockd_side
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 1];
        let e = lockd_side.read(&mut buf).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "still open while held"
        );
        drop(held);
        assert_eq!(lockd_side.read(&mut buf).unwrap(), 0, "EOF once dropped");
    }

    #[tokio::test]
    async fn a_living_process_is_not_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pidfd = pidfd_of(child.id() as i32);
        assert!(!reaped(pidfd.as_fd(), Duration::from_millis(20)).await);
        child.kill().unwrap();
        // A zombie is not reaped either.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reaped(pidfd.as_fd(), Duration::from_millis(20)).await);
        child.wait().unwrap();
        assert!(reaped(pidfd.as_fd(), Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn handbacks_report_release_and_unconfirmed() {
        let h = LeaseHandbacks::default();
        assert!(!h.released("none", Duration::from_millis(1)).await);

        let report = h.hold("web");
        assert!(
            !h.released("web", Duration::from_millis(10)).await,
            "still held"
        );
        report.released();
        assert!(h.released("web", Duration::from_millis(10)).await);

        let report = h.hold("db");
        drop(report);
        assert!(!h.released("db", Duration::from_millis(10)).await);
    }
}
