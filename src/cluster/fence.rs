//! A host's fence device: a fence agent run with the calling convention of Debian's
//! fence-agents (`fence_ipmilan`, `fence_virsh`, ...; the lab's `scripts/fence_lab`). Powering
//! a host off is `<argv> -o off`, which must exit 0, then `<argv> -o status`, which must report
//! the host off (exit status 2, fence-agents' "off"); only then is the host fenced.

use std::process::Stdio;
use std::time::{Duration, Instant};

/// How much of an agent's output is kept for a message.
const OUTPUT_KEPT: usize = 2048;

/// Errors of fencing a host through its device.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The agent could not be started.
    #[error("fence agent {program} could not be started")]
    Spawn {
        /// The agent.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent did not finish in time (it was killed).
    #[error("fence agent `-o {action}` did not finish within {after:?}")]
    Timeout {
        /// `off` or `status`.
        action: &'static str,
        /// The bound.
        after: Duration,
    },
    /// `-o off` failed.
    #[error("fence agent `-o off` failed ({status}): {output}")]
    OffFailed {
        /// Its exit status.
        status: String,
        /// What it printed (the end of it).
        output: String,
    },
    /// `-o status` did not report the host off.
    #[error("fence agent `-o status` does not report the host off ({status}): {output}")]
    NotOff {
        /// Its exit status (0: on).
        status: String,
        /// What it printed (the end of it).
        output: String,
    },
}

/// A confirmed power-off.
#[derive(Debug, Clone, Copy)]
pub struct Fenced {
    /// How long `-o off` took.
    pub off: Duration,
    /// How long `-o status` took.
    pub status: Duration,
}

/// One host's fence agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceDevice {
    argv: Vec<String>,
    timeout: Duration,
}

impl FenceDevice {
    /// The agent `argv` (program and its options, without `-o`); each call bounded by
    /// `timeout`. `None` for an empty vector.
    pub fn new(argv: Vec<String>, timeout: Duration) -> Option<Self> {
        (!argv.is_empty()).then_some(FenceDevice { argv, timeout })
    }

    /// Powers the host off and confirms it is off. A host the device already reports off
    /// (another host fenced it) is not powered off again.
    pub async fn power_off(&self) -> Result<Fenced, FenceError> {
        let began = Instant::now();
        if let Ok((Some(2), _)) = self.run("status").await {
            return Ok(Fenced {
                off: Duration::ZERO,
                status: began.elapsed(),
            });
        }
        let began = Instant::now();
        let (code, output) = self.run("off").await?;
        if code != Some(0) {
            return Err(FenceError::OffFailed {
                status: status_text(code),
                output,
            });
        }
        let off = began.elapsed();
        let began = Instant::now();
        let (code, output) = self.run("status").await?;
        if code != Some(2) {
            return Err(FenceError::NotOff {
                status: status_text(code),
                output,
            });
        }
        Ok(Fenced {
            off,
            status: began.elapsed(),
        })
    }

    /// Runs `<argv> -o <action>`: its exit code (`None`: killed by a signal) and the end of
    /// what it printed.
    async fn run(&self, action: &'static str) -> Result<(Option<i32>, String), FenceError> {
        let (program, args) = self.argv.split_first().expect("new refuses an empty argv");
        let child = tokio::process::Command::new(program)
            .args(args)
            .args(["-o", action])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| FenceError::Spawn {
                program: program.clone(),
                source,
            })?;
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| FenceError::Timeout {
                action,
                after: self.timeout,
            })?
            .map_err(|source| FenceError::Spawn {
                program: program.clone(),
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code(), tail(text.trim())))
    }
}

fn status_text(code: Option<i32>) -> String {
    code.map_or_else(
        || "killed by a signal".into(),
        |c| format!("exit status {c}"),
    )
}

fn tail(s: &str) -> String {
    let mut start = s.len().saturating_sub(OUTPUT_KEPT);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fence agent written as a shell script, given `-n h2`: `$3 $4` are `-o <action>`.
    fn agent(dir: &std::path::Path, body: &str) -> FenceDevice {
        let path = dir.join("fence_test");
        std::fs::write(&path, format!("{body}\n")).unwrap();
        // Run through sh: executing a file just written races with other tests' forks
        // (ETXTBSY).
        FenceDevice::new(
            vec![
                "/bin/sh".into(),
                path.display().to_string(),
                "-n".into(),
                "h2".into(),
            ],
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("understudy-fence-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn off_then_status_off_is_a_confirmed_fence() {
        let d = dir("ok");
        let (log, off) = (d.join("calls"), d.join("off"));
        let a = agent(
            &d,
            &format!(
                "echo \"$*\" >> {log}\ncase \"$4\" in off) touch {off}; echo 'Success: Powered OFF';; status) [ -e {off} ] && {{ echo 'Status: OFF'; exit 2; }}; echo 'Status: ON';; esac",
                log = log.display(),
                off = off.display()
            ),
        );
        let f = a.power_off().await.expect("fenced");
        assert!(f.off > Duration::ZERO);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "-n h2 -o status\n-n h2 -o off\n-n h2 -o status\n"
        );
        // Already off (another host fenced it): not powered off again.
        std::fs::remove_file(&log).unwrap();
        let f = a.power_off().await.expect("fenced");
        assert_eq!(f.off, Duration::ZERO);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "-n h2 -o status\n");
    }

    #[tokio::test]
    async fn a_host_still_on_or_a_failed_off_is_not_fenced() {
        let d = dir("on");
        let a = agent(
            &d,
            "case \"$4\" in status) echo 'Status: ON'; exit 0;; esac",
        );
        let e = a.power_off().await.unwrap_err();
        assert!(matches!(e, FenceError::NotOff { .. }), "{e}");
        assert!(e.to_string().contains("Status: ON"), "{e}");

        let d = dir("fail");
        let a = agent(&d, "echo 'Failed: no route to BMC' >&2; exit 1");
        let e = a.power_off().await.unwrap_err();
        assert!(matches!(e, FenceError::OffFailed { .. }), "{e}");
        assert!(e.to_string().contains("no route to BMC"), "{e}");

        let missing =
            FenceDevice::new(vec!["/nonexistent/fence_x".into()], Duration::from_secs(1)).unwrap();
        assert!(matches!(
            missing.power_off().await,
            Err(FenceError::Spawn { .. })
        ));
        assert_eq!(FenceDevice::new(Vec::new(), Duration::from_secs(1)), None);
    }

    #[tokio::test]
    async fn a_hanging_agent_is_bounded() {
        let d = dir("hang");
        let mut a = agent(&d, "sleep 30");
        a.timeout = Duration::from_millis(200);
        let began = Instant::now();
        let e = a.power_off().await.unwrap_err();
        assert!(
            matches!(e, FenceError::Timeout { action: "off", .. }),
            "{e}"
        );
        assert!(began.elapsed() < Duration::from_secs(5));
    }
}
