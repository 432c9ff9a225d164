//! The host's watchdog device (`/dev/watchdog`: a hardware watchdog, or the kernel's softdog),
//! armed with a timeout and fed only while this host may keep its primaries. A daemon that
//! freezes (stopped, deadlocked, starved) stops feeding it, and the kernel resets the host
//! before the lease can expire: self-fencing that does not depend on the daemon running.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `WDIOC_SETTIMEOUT`: `_IOWR('W', 6, int)` (linux/watchdog.h).
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;

/// Errors of arming or feeding the watchdog.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// The device could not be opened (absent: `modprobe softdog` provides one).
    #[error("watchdog device {path} cannot be opened")]
    Open {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device refused the timeout.
    #[error("watchdog device {path} refused a timeout of {seconds} s")]
    Timeout {
        /// The device.
        path: PathBuf,
        /// The timeout asked for.
        seconds: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A keep-alive could not be written.
    #[error("watchdog device {path} not fed")]
    Feed {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An armed watchdog: the host resets unless [`Watchdog::feed`] is called within the timeout.
pub struct Watchdog {
    path: PathBuf,
    file: std::fs::File,
}

impl Watchdog {
    /// Opens (which arms) the device and sets its timeout.
    pub fn arm(path: &Path, timeout: Duration) -> Result<Self, WatchdogError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| WatchdogError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let seconds = timeout.as_secs().max(1);
        let mut value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one c_int through the pointer, which points
        // at a live local; the fd is open for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_SETTIMEOUT, &mut value) };
        let mut dog = Watchdog {
            path: path.to_path_buf(),
            file,
        };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            dog.disarm();
            return Err(WatchdogError::Timeout {
                path: path.to_path_buf(),
                seconds,
                source,
            });
        }
        tracing::info!(device = %path.display(), timeout_s = value, "watchdog armed");
        Ok(dog)
    }

    /// Restarts the countdown.
    pub fn feed(&mut self) -> Result<(), WatchdogError> {
        self.file
            .write_all(b"\0")
            .map_err(|source| WatchdogError::Feed {
                path: self.path.clone(),
                source,
            })
    }

    /// Stops the countdown (the "magic close": a `V` before closing), where the driver allows
    /// it; a driver built with `nowayout` keeps counting and resets the host.
    pub fn disarm(&mut self) {
        let _ = self.file.write_all(b"V");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_or_a_file_that_is_not_one_is_a_clear_error() {
        let e = Watchdog::arm(Path::new("/nonexistent/watchdog"), Duration::from_secs(2))
            .err()
            .expect("no such device");
        assert!(e.to_string().contains("/nonexistent/watchdog"), "{e}");
        let f = std::env::temp_dir().join(format!("understudy-wd-{}", std::process::id()));
        std::fs::write(&f, b"").unwrap();
        let e = Watchdog::arm(&f, Duration::from_secs(2))
            .err()
            .expect("a plain file takes no watchdog ioctl");
        assert!(
            matches!(e, WatchdogError::Timeout { seconds: 2, .. }),
            "{e}"
        );
        let _ = std::fs::remove_file(f);
    }
}
