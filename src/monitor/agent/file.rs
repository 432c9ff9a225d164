//! `guest-file-open`, `guest-file-read`, `guest-file-write` and `guest-file-close` replies: a
//! read's declared count must match its payload and the request, a write may be short but never
//! longer than what was sent.

use super::reply::{parse_reply, Ctx};
use super::{AgentError, AgentLimits, Command};

/// Parses a `guest-file-open` reply and returns the handle.
pub fn parse_file_open(text: &str, limits: &AgentLimits) -> Result<i64, AgentError> {
    let ctx = Ctx {
        command: Command::FileOpen,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    Ok(ctx.uint(&ret, "return", i64::MAX as u64)? as i64)
}

/// One `guest-file-read` chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    /// The decoded bytes (length equals the reply's `count`).
    pub data: Vec<u8>,
    /// Whether the end of file was reached.
    pub eof: bool,
}

/// Parses a `guest-file-read` reply to a request for `requested` bytes.
pub fn parse_file_read(
    text: &str,
    limits: &AgentLimits,
    requested: usize,
) -> Result<FileChunk, AgentError> {
    let ctx = Ctx {
        command: Command::FileRead,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let o = ctx.object(&ret, "return")?;
    let declared = ctx.counter(ctx.required(o, "return", "count")?, "return.count")?;
    let data = ctx.base64(ctx.required(o, "return", "buf-b64")?, "return.buf-b64")?;
    let eof = ctx.boolean(ctx.required(o, "return", "eof")?, "return.eof")?;
    if declared != data.len() as u64 || data.len() > requested {
        return Err(AgentError::CountMismatch {
            declared,
            actual: data.len(),
            requested,
        });
    }
    Ok(FileChunk { data, eof })
}

/// Parses a `guest-file-write` reply to a request carrying `requested` bytes and returns the
/// number of bytes written (a short write is legal; more than was sent is not).
pub fn parse_file_write(
    text: &str,
    limits: &AgentLimits,
    requested: usize,
) -> Result<usize, AgentError> {
    let ctx = Ctx {
        command: Command::FileWrite,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let o = ctx.object(&ret, "return")?;
    let declared = ctx.counter(ctx.required(o, "return", "count")?, "return.count")?;
    if declared > requested as u64 {
        return Err(AgentError::WriteCountMismatch {
            declared,
            requested,
        });
    }
    Ok(declared as usize)
}

/// Parses a `guest-file-close` reply, whose `return` must be an object (empty).
pub fn parse_file_close(text: &str, limits: &AgentLimits) -> Result<(), AgentError> {
    let command = Command::FileClose;
    let ret = parse_reply(command, text, limits)?;
    Ctx { command, limits }.object(&ret, "return")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::test_support::{fixture, limits};

    #[test]
    fn file_fixtures() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            parse_file_open(&fixture(d.path(), "file-open.json"), &limits()).unwrap(),
            1000
        );
        let c = parse_file_read(&fixture(d.path(), "file-read.json"), &limits(), 4096).unwrap();
        assert_eq!(c.data, b"hello world\n");
        assert!(c.eof);
        let e = parse_file_read(
            &fixture(d.path(), "file-read-count-mismatch.json"),
            &limits(),
            4096,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::CountMismatch {
                    declared: 100,
                    actual: 12,
                    ..
                }
            ),
            "{e}"
        );
        // More data than requested is refused too.
        let e = parse_file_read(&fixture(d.path(), "file-read.json"), &limits(), 4).unwrap_err();
        assert!(
            matches!(e, AgentError::CountMismatch { requested: 4, .. }),
            "{e}"
        );
    }
}
