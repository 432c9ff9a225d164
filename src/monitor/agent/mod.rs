//! QEMU guest agent (qemu-ga) replies: typed, validated parsing, and high-level helpers over an
//! [`AgentTransport`].
//!
//! Everything the guest sends is untrusted: a compromised or buggy guest can reply with anything.
//! Each reply is therefore checked against [`AgentLimits`] (total size, array lengths, string
//! lengths) and every number is range-checked (QAPI integers are `int64`, so a counter that is
//! negative or above `i64::MAX` is absurd and rejected). Errors name the command and the field.
//!
//! The helpers are blocking (the transport is a blocking libvirt call); run them on a blocking
//! thread from async code.
//!
//! The parts:
//! - this file: the [`AgentTransport`] seam and its error, [`AgentLimits`], the [`Command`] names
//!   and [`AgentError`];
//! - `reply`: the reply envelope ([`parse_reply`]) and the bounded, range-checked walk through a
//!   reply's JSON that every parser uses;
//! - `system`: what the guest reports about itself: `guest-ping`, `guest-info`,
//!   `guest-get-osinfo`, `guest-get-cpustats`, `guest-get-diskstats`,
//!   `guest-network-get-interfaces`;
//! - `exec`: `guest-exec` and `guest-exec-status`;
//! - `file`: `guest-file-open`, `-read`, `-write` and `-close`;
//! - `client`: [`GuestAgent`], the typed client over a transport (file reads and writes in
//!   chunks, commands polled to their end), and its [`AgentOptions`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::base64::Base64Error;

mod client;
mod exec;
mod file;
mod reply;
mod system;
#[cfg(test)]
mod test_support;

pub use client::{AgentOptions, ExecOutput, GuestAgent, GuestFile};
pub use exec::{parse_exec, parse_exec_status, CapturedOutput, ExecStatus, ExitStatus};
pub use file::{parse_file_close, parse_file_open, parse_file_read, parse_file_write, FileChunk};
pub use reply::parse_reply;
pub use system::{
    parse_cpustats, parse_diskstats, parse_info, parse_interfaces, parse_osinfo, parse_ping,
    AgentInfo, CpuStats, DiskStats, InterfaceAddress, InterfaceStats, NetInterface, OsInfo,
    SupportedCommand,
};

/// A guest agent: sends one JSON command, returns the raw reply text (already bounded in size by
/// the transport).
pub trait AgentTransport: Send + Sync {
    /// Sends `json` (one `{"execute": ...}` object) and waits at most `timeout` for the reply.
    fn command(&self, json: &str, timeout: Duration) -> Result<String, AgentTransportError>;
}

impl<T: AgentTransport + ?Sized> AgentTransport for &T {
    fn command(&self, json: &str, timeout: Duration) -> Result<String, AgentTransportError> {
        (**self).command(json, timeout)
    }
}

impl<T: AgentTransport + ?Sized> AgentTransport for Arc<T> {
    fn command(&self, json: &str, timeout: Duration) -> Result<String, AgentTransportError> {
        (**self).command(json, timeout)
    }
}

impl<T: AgentTransport + ?Sized> AgentTransport for Box<T> {
    fn command(&self, json: &str, timeout: Duration) -> Result<String, AgentTransportError> {
        (**self).command(json, timeout)
    }
}

/// Why the transport could not deliver a command or its reply.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AgentTransportError {
    /// No reply arrived within the timeout (the guest may be busy, hung, or the agent dead).
    #[error("guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent channel is not connected (agent not running in the guest, or domain down).
    #[error("guest agent is not connected")]
    NotConnected,
    /// Any other failure, as described by the transport.
    #[error("guest agent transport failed: {0}")]
    Other(String),
}

/// Bounds applied to every reply before and during parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLimits {
    /// Largest reply accepted, in bytes of JSON text.
    pub max_reply_bytes: usize,
    /// Largest array accepted (CPUs, disks, interfaces, addresses, supported commands).
    pub max_entries: usize,
    /// Longest string accepted (names, versions, error descriptions), in bytes.
    pub max_string_len: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            max_reply_bytes: 4 * 1024 * 1024,
            max_entries: 256,
            max_string_len: 4096,
        }
    }
}

/// Which guest agent command a result or error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `guest-ping`
    Ping,
    /// `guest-info`
    Info,
    /// `guest-get-osinfo`
    OsInfo,
    /// `guest-get-cpustats`
    CpuStats,
    /// `guest-get-diskstats`
    DiskStats,
    /// `guest-network-get-interfaces`
    NetworkInterfaces,
    /// `guest-exec`
    Exec,
    /// `guest-exec-status`
    ExecStatus,
    /// `guest-file-open`
    FileOpen,
    /// `guest-file-read`
    FileRead,
    /// `guest-file-write`
    FileWrite,
    /// `guest-file-close`
    FileClose,
}

impl Command {
    /// The QAPI command name.
    pub fn name(self) -> &'static str {
        match self {
            Command::Ping => "guest-ping",
            Command::Info => "guest-info",
            Command::OsInfo => "guest-get-osinfo",
            Command::CpuStats => "guest-get-cpustats",
            Command::DiskStats => "guest-get-diskstats",
            Command::NetworkInterfaces => "guest-network-get-interfaces",
            Command::Exec => "guest-exec",
            Command::ExecStatus => "guest-exec-status",
            Command::FileOpen => "guest-file-open",
            Command::FileRead => "guest-file-read",
            Command::FileWrite => "guest-file-write",
            Command::FileClose => "guest-file-close",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed guest agent command or an unacceptable reply.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The transport failed to deliver the command or its reply.
    #[error("{command}: transport failed")]
    Transport {
        /// The command sent.
        command: Command,
        /// What the transport reported.
        #[source]
        source: AgentTransportError,
    },
    /// The reply is larger than [`AgentLimits::max_reply_bytes`].
    #[error("{command}: reply of {len} bytes exceeds the {max}-byte limit")]
    ReplyTooLarge {
        /// The command sent.
        command: Command,
        /// Reply length in bytes.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The reply is not valid JSON.
    #[error("{command}: reply is not valid JSON")]
    InvalidJson {
        /// The command sent.
        command: Command,
        /// The JSON parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The agent answered with `{"error": {...}}`.
    #[error("{command}: guest agent reported {class}: {desc}")]
    Guest {
        /// The command sent.
        command: Command,
        /// QMP error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// Human-readable description from the agent.
        desc: String,
    },
    /// A value has the wrong JSON type or the reply has the wrong structure.
    #[error("{command}: field `{field}` should be {expected}")]
    Shape {
        /// The command sent.
        command: Command,
        /// Path of the field in the reply, e.g. `return[3].stats.read-ios`.
        field: String,
        /// What was expected there.
        expected: &'static str,
    },
    /// A required field is absent.
    #[error("{command}: required field `{field}` is missing")]
    MissingField {
        /// The command sent.
        command: Command,
        /// Path of the missing field.
        field: String,
    },
    /// A counter or size is negative.
    #[error("{command}: field `{field}` is negative ({value})")]
    NegativeNumber {
        /// The command sent.
        command: Command,
        /// Path of the field.
        field: String,
        /// The value received.
        value: i64,
    },
    /// A number is outside the range the field allows (e.g. above `i64::MAX`).
    #[error("{command}: field `{field}` value {value} is out of range (max {max})")]
    NumberOutOfRange {
        /// The command sent.
        command: Command,
        /// Path of the field.
        field: String,
        /// The value received, as text.
        value: String,
        /// Largest value allowed.
        max: u64,
    },
    /// An array has more entries than [`AgentLimits::max_entries`].
    #[error("{command}: field `{field}` has {count} entries, more than the limit of {max}")]
    TooManyEntries {
        /// The command sent.
        command: Command,
        /// Path of the array.
        field: String,
        /// Number of entries received.
        count: usize,
        /// Configured limit.
        max: usize,
    },
    /// A string is longer than [`AgentLimits::max_string_len`].
    #[error("{command}: field `{field}` is {len} bytes long, more than the limit of {max}")]
    StringTooLong {
        /// The command sent.
        command: Command,
        /// Path of the string.
        field: String,
        /// Length received, in bytes.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// A string does not hold what the field requires (e.g. an IP address).
    #[error("{command}: field `{field}` value {value:?} is not {expected}")]
    InvalidValue {
        /// The command sent.
        command: Command,
        /// Path of the field.
        field: String,
        /// The value received (cut to 64 bytes).
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A base64 payload does not decode.
    #[error("{command}: field `{field}` is not valid base64")]
    Base64 {
        /// The command sent.
        command: Command,
        /// Path of the payload field.
        field: String,
        /// The decoder's complaint.
        #[source]
        source: Base64Error,
    },
    /// `guest-file-read` declared a `count` that disagrees with its payload or the request.
    #[error("guest-file-read: reply declares count {declared} but carries {actual} bytes (requested {requested})")]
    CountMismatch {
        /// The `count` field of the reply.
        declared: u64,
        /// Decoded payload length.
        actual: usize,
        /// Count requested.
        requested: usize,
    },
    /// `guest-file-write` reported writing more than it was sent.
    #[error("guest-file-write: reply declares {declared} bytes written of {requested} sent")]
    WriteCountMismatch {
        /// The `count` field of the reply.
        declared: u64,
        /// Bytes sent in the request.
        requested: usize,
    },
    /// `guest-file-write` wrote nothing, which would loop forever.
    #[error("guest-file-write on {path}: no progress")]
    WriteStalled {
        /// The guest path being written.
        path: String,
    },
    /// `guest-file-read` returned no data without reporting end of file, which would loop forever.
    #[error("guest-file-read on {path}: no progress and no end of file")]
    ReadStalled {
        /// The guest path being read.
        path: String,
    },
    /// A request argument was refused before sending (e.g. empty argv, relative file path).
    #[error("{command}: invalid request: {reason}")]
    InvalidRequest {
        /// The command that would have been sent.
        command: Command,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A guest process started by `guest-exec` did not exit in time. It keeps running in the
    /// guest: qemu-ga has no command to kill it.
    #[error("guest-exec: process {pid} did not exit within {timeout:?}")]
    ExecTimeout {
        /// Guest pid of the process.
        pid: i64,
        /// The timeout that expired.
        timeout: Duration,
    },
}
