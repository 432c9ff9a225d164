//! [`GuestAgent`]: the typed client over any [`AgentTransport`]. One call per command, except
//! file reads and writes (open, chunks, always close) and `exec` (start, then poll the status
//! until the process exits or the timeout passes).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::exec::{parse_exec, parse_exec_status, CapturedOutput, ExecStatus, ExitStatus};
use super::file::{parse_file_close, parse_file_open, parse_file_read, parse_file_write};
use super::system::{
    parse_cpustats, parse_diskstats, parse_info, parse_interfaces, parse_osinfo, parse_ping,
    AgentInfo, CpuStats, DiskStats, NetInterface, OsInfo,
};
use super::{AgentError, AgentLimits, AgentTransport, Command};
use crate::monitor::base64;

/// Options for [`GuestAgent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOptions {
    /// Reply bounds.
    pub limits: AgentLimits,
    /// Timeout for each single command.
    pub command_timeout: Duration,
    /// Delay between `guest-exec-status` polls.
    pub exec_poll_interval: Duration,
    /// Bytes requested per `guest-file-read`.
    pub file_chunk_bytes: usize,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            limits: AgentLimits::default(),
            command_timeout: Duration::from_secs(5),
            exec_poll_interval: Duration::from_millis(100),
            // 48 KiB encodes to 64 KiB of base64: replies stay far below max_reply_bytes.
            file_chunk_bytes: 48 * 1024,
        }
    }
}

/// Contents read from a guest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// At most the requested number of bytes.
    pub data: Vec<u8>,
    /// Whether the file had more bytes than requested.
    pub truncated: bool,
}

/// Result of a finished guest command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Guest pid it ran as.
    pub pid: i64,
    /// Exit code or signal.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: CapturedOutput,
    /// Standard error.
    pub stderr: CapturedOutput,
}

/// Longest argv accepted by [`GuestAgent::exec`], and longest single argument or path.
const MAX_ARGS: usize = 256;
const MAX_ARG_LEN: usize = 4096;

/// Typed guest agent client over any [`AgentTransport`].
#[derive(Debug, Clone)]
pub struct GuestAgent<T> {
    transport: T,
    options: AgentOptions,
}

impl<T: AgentTransport> GuestAgent<T> {
    /// Wraps `transport`.
    pub fn new(transport: T, options: AgentOptions) -> Self {
        GuestAgent { transport, options }
    }

    /// The options in use.
    pub fn options(&self) -> &AgentOptions {
        &self.options
    }

    fn send(
        &self,
        command: Command,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<String, AgentError> {
        let msg = match arguments {
            Some(a) => json!({ "execute": command.name(), "arguments": a }),
            None => json!({ "execute": command.name() }),
        };
        self.transport
            .command(&msg.to_string(), timeout)
            .map_err(|source| AgentError::Transport { command, source })
    }

    fn call(&self, command: Command, arguments: Option<Value>) -> Result<String, AgentError> {
        self.send(command, arguments, self.options.command_timeout)
    }

    /// `guest-ping`: proves the agent (and so the guest userspace) is responsive.
    pub fn ping(&self) -> Result<(), AgentError> {
        parse_ping(&self.call(Command::Ping, None)?, &self.options.limits)
    }

    /// `guest-info`: agent version and supported commands.
    pub fn info(&self) -> Result<AgentInfo, AgentError> {
        parse_info(&self.call(Command::Info, None)?, &self.options.limits)
    }

    /// `guest-get-osinfo`.
    pub fn osinfo(&self) -> Result<OsInfo, AgentError> {
        parse_osinfo(&self.call(Command::OsInfo, None)?, &self.options.limits)
    }

    /// `guest-get-cpustats`.
    pub fn cpustats(&self) -> Result<Vec<CpuStats>, AgentError> {
        parse_cpustats(&self.call(Command::CpuStats, None)?, &self.options.limits)
    }

    /// `guest-get-diskstats`.
    pub fn diskstats(&self) -> Result<Vec<DiskStats>, AgentError> {
        parse_diskstats(&self.call(Command::DiskStats, None)?, &self.options.limits)
    }

    /// `guest-network-get-interfaces`.
    pub fn interfaces(&self) -> Result<Vec<NetInterface>, AgentError> {
        parse_interfaces(
            &self.call(Command::NetworkInterfaces, None)?,
            &self.options.limits,
        )
    }

    /// Reads at most `max_bytes` of the guest file at absolute `path`: open, read until end of
    /// file or the bound, and always close the handle (a close failure is logged, not returned,
    /// because the data read is still valid).
    pub fn read_file(&self, path: &str, max_bytes: usize) -> Result<GuestFile, AgentError> {
        if !path.starts_with('/') || path.len() > MAX_ARG_LEN || path.contains('\0') {
            return Err(AgentError::InvalidRequest {
                command: Command::FileOpen,
                reason: "path must be absolute, without NUL, at most 4096 bytes",
            });
        }
        let limits = &self.options.limits;
        let handle = parse_file_open(
            &self.call(
                Command::FileOpen,
                Some(json!({ "path": path, "mode": "r" })),
            )?,
            limits,
        )?;
        let result = self.read_handle(handle, path, max_bytes);
        let closed = self
            .call(Command::FileClose, Some(json!({ "handle": handle })))
            .and_then(|r| parse_file_close(&r, limits));
        if let Err(e) = closed {
            tracing::warn!(path, handle, error = %e, "guest-file-close failed; handle may leak in the agent");
        }
        result
    }

    fn read_handle(
        &self,
        handle: i64,
        path: &str,
        max_bytes: usize,
    ) -> Result<GuestFile, AgentError> {
        let mut data = Vec::new();
        let chunk_max = self.options.file_chunk_bytes.max(1);
        loop {
            // Ask for one byte past the bound so that a file of exactly max_bytes is not
            // reported as truncated.
            let want = chunk_max.min(max_bytes.saturating_add(1) - data.len());
            let reply = self.call(
                Command::FileRead,
                Some(json!({ "handle": handle, "count": want })),
            )?;
            let chunk = parse_file_read(&reply, &self.options.limits, want)?;
            if chunk.data.is_empty() && !chunk.eof {
                return Err(AgentError::ReadStalled {
                    path: path.to_owned(),
                });
            }
            data.extend_from_slice(&chunk.data);
            if data.len() > max_bytes {
                data.truncate(max_bytes);
                return Ok(GuestFile {
                    data,
                    truncated: true,
                });
            }
            if chunk.eof {
                return Ok(GuestFile {
                    data,
                    truncated: false,
                });
            }
        }
    }

    /// Replaces the content of the guest file at absolute `path` with `data` (at most
    /// `max_bytes`): open in mode `w` (created or truncated), write in chunks of
    /// [`AgentOptions::file_chunk_bytes`], always close the handle. The guest sees a truncated
    /// file until the last chunk is written, so keep `data` small.
    pub fn write_file(&self, path: &str, data: &[u8], max_bytes: usize) -> Result<(), AgentError> {
        if !path.starts_with('/') || path.len() > MAX_ARG_LEN || path.contains('\0') {
            return Err(AgentError::InvalidRequest {
                command: Command::FileOpen,
                reason: "path must be absolute, without NUL, at most 4096 bytes",
            });
        }
        if data.len() > max_bytes {
            return Err(AgentError::InvalidRequest {
                command: Command::FileWrite,
                reason: "content is larger than the caller's bound",
            });
        }
        let limits = &self.options.limits;
        let handle = parse_file_open(
            &self.call(
                Command::FileOpen,
                Some(json!({ "path": path, "mode": "w" })),
            )?,
            limits,
        )?;
        let result = self.write_handle(handle, path, data);
        let closed = self
            .call(Command::FileClose, Some(json!({ "handle": handle })))
            .and_then(|r| parse_file_close(&r, limits));
        match (result, closed) {
            (Err(e), _) => Err(e),
            // Unlike a read, a write is only complete once the handle is flushed and closed.
            (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    fn write_handle(&self, handle: i64, path: &str, data: &[u8]) -> Result<(), AgentError> {
        let chunk_max = self.options.file_chunk_bytes.max(1);
        let mut done = 0;
        while done < data.len() {
            let chunk = &data[done..data.len().min(done + chunk_max)];
            let reply = self.call(
                Command::FileWrite,
                Some(json!({
                    "handle": handle,
                    "buf-b64": base64::encode(chunk),
                    "count": chunk.len(),
                })),
            )?;
            let written = parse_file_write(&reply, &self.options.limits, chunk.len())?;
            if written == 0 {
                return Err(AgentError::WriteStalled {
                    path: path.to_owned(),
                });
            }
            done += written;
        }
        Ok(())
    }

    /// Runs `argv[0]` with arguments `argv[1..]` in the guest (no shell is involved), then polls
    /// `guest-exec-status` until it exits or `timeout` passes. Each output stream is cut to
    /// `max_output` bytes. The whole status reply must still fit
    /// [`AgentLimits::max_reply_bytes`] (qemu-ga sends up to 16 MiB per stream, base64-encoded),
    /// so commands with large output fail with [`AgentError::ReplyTooLarge`]: keep output small.
    pub fn exec(
        &self,
        argv: &[String],
        max_output: usize,
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let bad = |reason| AgentError::InvalidRequest {
            command: Command::Exec,
            reason,
        };
        let (path, args) = argv.split_first().ok_or_else(|| bad("argv is empty"))?;
        if path.is_empty() {
            return Err(bad("program path is empty"));
        }
        if argv.len() > MAX_ARGS {
            return Err(bad("more than 256 arguments"));
        }
        if argv
            .iter()
            .any(|a| a.len() > MAX_ARG_LEN || a.contains('\0'))
        {
            return Err(bad("an argument is longer than 4096 bytes or contains NUL"));
        }
        let limits = &self.options.limits;
        let start = Instant::now();
        let pid = parse_exec(
            &self.call(
                Command::Exec,
                Some(json!({ "path": path, "arg": args, "capture-output": true })),
            )?,
            limits,
        )?;
        let started = start.elapsed();
        let mut polls = 0u32;
        loop {
            polls += 1;
            let remaining = timeout.saturating_sub(start.elapsed());
            let per_call = self
                .options
                .command_timeout
                .min(remaining.max(Duration::from_millis(1)));
            let reply = self.send(Command::ExecStatus, Some(json!({ "pid": pid })), per_call)?;
            if let ExecStatus::Exited {
                status,
                stdout,
                stderr,
            } = parse_exec_status(&reply, limits, max_output)?
            {
                tracing::debug!(pid, ?started, polls, elapsed = ?start.elapsed(), "guest command ended");
                return Ok(ExecOutput {
                    pid,
                    status,
                    stdout,
                    stderr,
                });
            }
            let remaining = timeout.saturating_sub(start.elapsed());
            if remaining.is_zero() {
                return Err(AgentError::ExecTimeout { pid, timeout });
            }
            std::thread::sleep(self.options.exec_poll_interval.min(remaining));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::AgentTransportError;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Scripted transport: pops one reply per command and records what was sent.
    struct Script {
        replies: Mutex<VecDeque<Result<String, AgentTransportError>>>,
        sent: Mutex<Vec<Value>>,
        /// Reply used once the script is exhausted.
        fallback: Option<String>,
    }

    impl Script {
        fn new(replies: Vec<Result<String, AgentTransportError>>) -> Self {
            Script {
                replies: Mutex::new(replies.into()),
                sent: Mutex::new(Vec::new()),
                fallback: None,
            }
        }
        fn sent(&self) -> Vec<Value> {
            self.sent.lock().unwrap().clone()
        }
        fn sent_commands(&self) -> Vec<String> {
            self.sent()
                .iter()
                .map(|v| v["execute"].as_str().unwrap().to_owned())
                .collect()
        }
    }

    impl AgentTransport for Script {
        fn command(&self, json: &str, _timeout: Duration) -> Result<String, AgentTransportError> {
            self.sent
                .lock()
                .unwrap()
                .push(serde_json::from_str(json).unwrap());
            match self.replies.lock().unwrap().pop_front() {
                Some(r) => r,
                None => self
                    .fallback
                    .clone()
                    .ok_or_else(|| AgentTransportError::Other("script exhausted".into())),
            }
        }
    }

    fn ok(s: &str) -> Result<String, AgentTransportError> {
        Ok(s.to_owned())
    }

    fn read_reply(data: &[u8], eof: bool) -> Result<String, AgentTransportError> {
        Ok(
            json!({"return": {"count": data.len(), "buf-b64": base64::encode(data), "eof": eof}})
                .to_string(),
        )
    }

    fn opts(chunk: usize) -> AgentOptions {
        AgentOptions {
            file_chunk_bytes: chunk,
            exec_poll_interval: Duration::from_millis(1),
            ..AgentOptions::default()
        }
    }

    #[test]
    fn read_file_loops_and_closes() {
        let t = Script::new(vec![
            ok(r#"{"return": 7}"#),
            read_reply(b"abcd", false),
            read_reply(b"efgh", false),
            read_reply(b"ij", true),
            ok(r#"{"return": {}}"#),
        ]);
        let agent = GuestAgent::new(&t, opts(4));
        let f = agent.read_file("/proc/net/tcp", 100).unwrap();
        assert_eq!(
            f,
            GuestFile {
                data: b"abcdefghij".to_vec(),
                truncated: false
            }
        );
        let sent = t.sent();
        assert_eq!(
            sent[0]["arguments"],
            json!({"path": "/proc/net/tcp", "mode": "r"})
        );
        assert_eq!(sent[1]["arguments"], json!({"handle": 7, "count": 4}));
        assert_eq!(
            sent[4],
            json!({"execute": "guest-file-close", "arguments": {"handle": 7}})
        );
    }

    #[test]
    fn read_file_bounds_output_and_flags_truncation() {
        let t = Script::new(vec![
            ok(r#"{"return": 7}"#),
            read_reply(b"abcd", false),
            read_reply(b"ef", false),
            ok(r#"{"return": {}}"#),
        ]);
        let agent = GuestAgent::new(&t, opts(4));
        let f = agent.read_file("/etc/hosts", 5).unwrap();
        assert_eq!(
            f,
            GuestFile {
                data: b"abcde".to_vec(),
                truncated: true
            }
        );
        // Second request asked only for what could still fit plus one byte.
        assert_eq!(t.sent()[2]["arguments"]["count"], 2);
        assert_eq!(t.sent_commands().last().unwrap(), "guest-file-close");

        // A file of exactly the bound is not truncated.
        let t = Script::new(vec![
            ok(r#"{"return": 7}"#),
            read_reply(b"abcde", true),
            ok(r#"{"return": {}}"#),
        ]);
        let f = GuestAgent::new(&t, opts(64))
            .read_file("/etc/hosts", 5)
            .unwrap();
        assert_eq!(
            f,
            GuestFile {
                data: b"abcde".to_vec(),
                truncated: false
            }
        );
    }

    #[test]
    fn read_file_closes_even_when_a_read_fails() {
        let t = Script::new(vec![
            ok(r#"{"return": 7}"#),
            ok(r#"{"error": {"class": "GenericError", "desc": "read failed"}}"#),
            ok(r#"{"return": {}}"#),
        ]);
        let e = GuestAgent::new(&t, opts(4))
            .read_file("/etc/hosts", 100)
            .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Guest {
                    command: Command::FileRead,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            t.sent_commands(),
            ["guest-file-open", "guest-file-read", "guest-file-close"]
        );

        // A stalled read (no bytes, no eof) ends the loop, and still closes.
        let t = Script::new(vec![
            ok(r#"{"return": 7}"#),
            read_reply(b"", false),
            ok(r#"{"return": {}}"#),
        ]);
        let e = GuestAgent::new(&t, opts(4))
            .read_file("/etc/hosts", 100)
            .unwrap_err();
        assert!(matches!(e, AgentError::ReadStalled { .. }), "{e}");
        assert_eq!(t.sent_commands().last().unwrap(), "guest-file-close");
    }

    #[test]
    fn read_file_refuses_relative_paths_without_sending() {
        let t = Script::new(vec![]);
        let e = GuestAgent::new(&t, opts(4))
            .read_file("etc/hosts", 100)
            .unwrap_err();
        assert!(matches!(e, AgentError::InvalidRequest { .. }), "{e}");
        assert!(t.sent().is_empty());
    }

    #[test]
    fn exec_sends_argv_vector_and_polls_until_exit() {
        let out = base64::encode(b"ok\n");
        let t = Script::new(vec![
            ok(r#"{"return": {"pid": 42}}"#),
            ok(r#"{"return": {"exited": false}}"#),
            ok(r#"{"return": {"exited": false}}"#),
            ok(&format!(
                r#"{{"return": {{"exited": true, "exitcode": 3, "out-data": "{out}"}}}}"#
            )),
        ]);
        let argv: Vec<String> = ["/bin/cat", "/etc/hostname; rm -rf /"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = GuestAgent::new(&t, opts(4))
            .exec(&argv, 1024, Duration::from_secs(60))
            .unwrap();
        assert_eq!(r.pid, 42);
        assert_eq!(r.status, ExitStatus::Code(3));
        assert_eq!(r.stdout.data, b"ok\n");
        let sent = t.sent();
        // The shell-looking argument is passed verbatim as one argv element, never to a shell.
        assert_eq!(
            sent[0],
            json!({"execute": "guest-exec", "arguments": {"path": "/bin/cat", "arg": ["/etc/hostname; rm -rf /"], "capture-output": true}})
        );
        assert_eq!(
            sent[1],
            json!({"execute": "guest-exec-status", "arguments": {"pid": 42}})
        );
        assert_eq!(sent.len(), 4);
    }

    #[test]
    fn exec_times_out_on_a_process_that_never_exits() {
        let mut t = Script::new(vec![ok(r#"{"return": {"pid": 42}}"#)]);
        t.fallback = Some(r#"{"return": {"exited": false}}"#.to_owned());
        let argv = vec!["/bin/sleep".to_owned(), "1000".to_owned()];
        let e = GuestAgent::new(&t, opts(4))
            .exec(&argv, 1024, Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(e, AgentError::ExecTimeout { pid: 42, .. }), "{e}");
        assert!(t.sent().len() >= 2, "polled at least once");
    }

    #[test]
    fn exec_refuses_bad_argv() {
        let t = Script::new(vec![]);
        let a = GuestAgent::new(&t, opts(4));
        assert!(matches!(
            a.exec(&[], 10, Duration::from_secs(1)),
            Err(AgentError::InvalidRequest { .. })
        ));
        assert!(matches!(
            a.exec(&["".into()], 10, Duration::from_secs(1)),
            Err(AgentError::InvalidRequest { .. })
        ));
        assert!(matches!(
            a.exec(&["/bin/x\0".into()], 10, Duration::from_secs(1)),
            Err(AgentError::InvalidRequest { .. })
        ));
        assert!(t.sent().is_empty());
    }

    #[test]
    fn transport_errors_are_chained() {
        let t = Script::new(vec![Err(AgentTransportError::Timeout(
            Duration::from_secs(5),
        ))]);
        let e = GuestAgent::new(&t, opts(4)).ping().unwrap_err();
        assert!(matches!(
            e,
            AgentError::Transport {
                command: Command::Ping,
                source: AgentTransportError::Timeout(_)
            }
        ));
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn write_file_chunks_handles_short_writes_and_closes() {
        let t = Script::new(vec![
            ok(r#"{"return": 9}"#),
            ok(r#"{"return": {"count": 4, "eof": false}}"#),
            // A short write: 2 of the 4 bytes sent; the rest goes out again.
            ok(r#"{"return": {"count": 2, "eof": false}}"#),
            ok(r#"{"return": {"count": 2, "eof": false}}"#),
            ok(r#"{"return": {"count": 1, "eof": false}}"#),
            ok(r#"{"return": {}}"#),
        ]);
        GuestAgent::new(&t, opts(4))
            .write_file("/etc/app.conf", b"abcdefghi", 64)
            .unwrap();
        let sent = t.sent();
        assert_eq!(
            t.sent_commands(),
            [
                "guest-file-open",
                "guest-file-write",
                "guest-file-write",
                "guest-file-write",
                "guest-file-write",
                "guest-file-close"
            ]
        );
        assert_eq!(
            sent[0]["arguments"],
            json!({"path": "/etc/app.conf", "mode": "w"})
        );
        let chunks: Vec<Vec<u8>> = sent[1..5]
            .iter()
            .map(|v| base64::decode(v["arguments"]["buf-b64"].as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(
            chunks,
            [
                b"abcd".to_vec(),
                b"efgh".to_vec(),
                b"ghi".to_vec(),
                b"i".to_vec()
            ]
        );
        assert_eq!(sent[5]["arguments"], json!({"handle": 9}));
    }

    #[test]
    fn write_file_rejects_bad_replies_and_oversized_content() {
        // More written than sent is a lie; the handle is still closed.
        let t = Script::new(vec![
            ok(r#"{"return": 3}"#),
            ok(r#"{"return": {"count": 99, "eof": false}}"#),
            ok(r#"{"return": {}}"#),
        ]);
        let e = GuestAgent::new(&t, opts(4))
            .write_file("/x", b"ab", 64)
            .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::WriteCountMismatch {
                    declared: 99,
                    requested: 2
                }
            ),
            "{e}"
        );
        assert_eq!(t.sent_commands().last().unwrap(), "guest-file-close");
        // No progress would loop forever.
        let t = Script::new(vec![
            ok(r#"{"return": 3}"#),
            ok(r#"{"return": {"count": 0, "eof": false}}"#),
            ok(r#"{"return": {}}"#),
        ]);
        let e = GuestAgent::new(&t, opts(4))
            .write_file("/x", b"ab", 64)
            .unwrap_err();
        assert!(matches!(e, AgentError::WriteStalled { .. }), "{e}");
        // Refused before anything is sent.
        let t = Script::new(vec![]);
        let a = GuestAgent::new(&t, opts(4));
        assert!(matches!(
            a.write_file("/x", b"abc", 2),
            Err(AgentError::InvalidRequest { .. })
        ));
        assert!(matches!(
            a.write_file("rel", b"a", 2),
            Err(AgentError::InvalidRequest { .. })
        ));
        assert!(t.sent().is_empty());
        // A failed close means the data may not be flushed: the write failed.
        let t = Script::new(vec![
            ok(r#"{"return": 3}"#),
            ok(r#"{"return": {"count": 2, "eof": false}}"#),
            ok(r#"{"error": {"class": "GenericError", "desc": "close failed"}}"#),
        ]);
        let e = GuestAgent::new(&t, opts(4))
            .write_file("/x", b"ab", 64)
            .unwrap_err();
        assert!(matches!(e, AgentError::Guest { .. }), "{e}");
    }
}
