//! `guest-exec` (start a process, get its pid) and `guest-exec-status` (running, or exited with
//! its status and captured output, cut to the caller's bound).

use super::reply::{join, parse_reply, Ctx};
use super::{AgentError, AgentLimits, Command};

/// Parses a `guest-exec` reply and returns the guest pid.
pub fn parse_exec(text: &str, limits: &AgentLimits) -> Result<i64, AgentError> {
    let ctx = Ctx {
        command: Command::Exec,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let o = ctx.object(&ret, "return")?;
    Ok(ctx.uint(
        ctx.required(o, "return", "pid")?,
        "return.pid",
        i64::MAX as u64,
    )? as i64)
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// The agent reported exit without code or signal.
    Unknown,
}

/// Captured output of one stream, cut to the caller's bound.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedOutput {
    /// The bytes kept (at most the requested maximum).
    pub data: Vec<u8>,
    /// Whether output was lost, either by qemu-ga's own cap or by ours.
    pub truncated: bool,
}

/// A `guest-exec-status` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecStatus {
    /// Still running.
    Running,
    /// Finished.
    Exited {
        /// Exit code or signal.
        status: ExitStatus,
        /// Standard output.
        stdout: CapturedOutput,
        /// Standard error.
        stderr: CapturedOutput,
    },
}

/// Parses a `guest-exec-status` reply, keeping at most `max_output` bytes of each stream.
pub fn parse_exec_status(
    text: &str,
    limits: &AgentLimits,
    max_output: usize,
) -> Result<ExecStatus, AgentError> {
    let ctx = Ctx {
        command: Command::ExecStatus,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let o = ctx.object(&ret, "return")?;
    if !ctx.boolean(ctx.required(o, "return", "exited")?, "return.exited")? {
        return Ok(ExecStatus::Running);
    }
    let code = o
        .get("exitcode")
        .map(|v| ctx.int(v, "return.exitcode", i32::MIN.into(), i32::MAX.into()))
        .transpose()?;
    let signal = o
        .get("signal")
        .map(|v| ctx.int(v, "return.signal", 0, 1024))
        .transpose()?;
    let status = match (code, signal) {
        (_, Some(s)) => ExitStatus::Signal(s as i32),
        (Some(c), None) => ExitStatus::Code(c as i32),
        (None, None) => ExitStatus::Unknown,
    };
    let stream = |data_key: &str, trunc_key: &str| -> Result<CapturedOutput, AgentError> {
        let mut data = match o.get(data_key) {
            Some(v) => ctx.base64(v, &join("return", data_key))?,
            None => Vec::new(),
        };
        let mut truncated = match o.get(trunc_key) {
            Some(v) => ctx.boolean(v, &join("return", trunc_key))?,
            None => false,
        };
        if data.len() > max_output {
            data.truncate(max_output);
            truncated = true;
        }
        Ok(CapturedOutput { data, truncated })
    };
    Ok(ExecStatus::Exited {
        status,
        stdout: stream("out-data", "out-truncated")?,
        stderr: stream("err-data", "err-truncated")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::test_support::{fixture, limits};

    #[test]
    fn exec_fixtures() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            parse_exec(&fixture(d.path(), "exec.json"), &limits()).unwrap(),
            1234
        );
        assert_eq!(
            parse_exec_status(
                &fixture(d.path(), "exec-status-running.json"),
                &limits(),
                1024
            )
            .unwrap(),
            ExecStatus::Running
        );
        let done = parse_exec_status(
            &fixture(d.path(), "exec-status-exited.json"),
            &limits(),
            1024,
        )
        .unwrap();
        let ExecStatus::Exited {
            status,
            stdout,
            stderr,
        } = done
        else {
            panic!("not exited")
        };
        assert_eq!(status, ExitStatus::Code(0));
        assert_eq!(stdout.data, b"Linux web-1 6.1.0-18-amd64\n");
        assert!(!stdout.truncated);
        assert!(stderr.data.is_empty());
        // Our own bound cuts and flags.
        let cut =
            parse_exec_status(&fixture(d.path(), "exec-status-exited.json"), &limits(), 5).unwrap();
        let ExecStatus::Exited { stdout, .. } = cut else {
            panic!()
        };
        assert_eq!(stdout.data, b"Linux");
        assert!(stdout.truncated);
        let sig = parse_exec_status(
            &fixture(d.path(), "exec-status-signal.json"),
            &limits(),
            1024,
        )
        .unwrap();
        let ExecStatus::Exited { status, stderr, .. } = sig else {
            panic!()
        };
        assert_eq!(status, ExitStatus::Signal(9));
        assert!(stderr.truncated, "qemu-ga's own truncation flag is kept");
    }
}
