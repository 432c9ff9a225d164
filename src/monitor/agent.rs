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

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use thiserror::Error;

use super::base64::{self, Base64Error};

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

// ---------------------------------------------------------------------------------------------
// Validation helpers. `field` strings are JSON-path-like and only built for error messages.

struct Ctx<'a> {
    command: Command,
    limits: &'a AgentLimits,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Ctx<'_> {
    fn shape(&self, field: &str, expected: &'static str) -> AgentError {
        AgentError::Shape {
            command: self.command,
            field: field.to_owned(),
            expected,
        }
    }

    fn object<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Map<String, Value>, AgentError> {
        v.as_object().ok_or_else(|| self.shape(field, "an object"))
    }

    fn array<'v>(&self, v: &'v Value, field: &str) -> Result<&'v [Value], AgentError> {
        let a = v.as_array().ok_or_else(|| self.shape(field, "an array"))?;
        if a.len() > self.limits.max_entries {
            return Err(AgentError::TooManyEntries {
                command: self.command,
                field: field.to_owned(),
                count: a.len(),
                max: self.limits.max_entries,
            });
        }
        Ok(a)
    }

    fn required<'v>(
        &self,
        obj: &'v Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Result<&'v Value, AgentError> {
        obj.get(key).ok_or_else(|| AgentError::MissingField {
            command: self.command,
            field: join(parent, key),
        })
    }

    /// An integer in `[0, max]`; QAPI ints are int64, so `max` is at most `i64::MAX`.
    fn uint(&self, v: &Value, field: &str, max: u64) -> Result<u64, AgentError> {
        let Value::Number(n) = v else {
            return Err(self.shape(field, "an integer"));
        };
        if let Some(u) = n.as_u64() {
            if u > max {
                return Err(AgentError::NumberOutOfRange {
                    command: self.command,
                    field: field.to_owned(),
                    value: u.to_string(),
                    max,
                });
            }
            return Ok(u);
        }
        if let Some(i) = n.as_i64() {
            return Err(AgentError::NegativeNumber {
                command: self.command,
                field: field.to_owned(),
                value: i,
            });
        }
        // A float: either written with a fraction/exponent, or an integer too large for u64.
        match n.as_f64() {
            Some(f) if f.abs() >= 9.2e18 => Err(AgentError::NumberOutOfRange {
                command: self.command,
                field: field.to_owned(),
                value: n.to_string(),
                max,
            }),
            _ => Err(self.shape(field, "an integer")),
        }
    }

    fn counter(&self, v: &Value, field: &str) -> Result<u64, AgentError> {
        self.uint(v, field, i64::MAX as u64)
    }

    /// A signed integer in `[min, max]`.
    fn int(&self, v: &Value, field: &str, min: i64, max: i64) -> Result<i64, AgentError> {
        let Value::Number(n) = v else {
            return Err(self.shape(field, "an integer"));
        };
        match n.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(i),
            _ if n.is_f64() && n.as_f64().is_some_and(|f| f.abs() < 9.2e18) => {
                Err(self.shape(field, "an integer"))
            }
            _ => Err(AgentError::NumberOutOfRange {
                command: self.command,
                field: field.to_owned(),
                value: n.to_string(),
                max: max.unsigned_abs(),
            }),
        }
    }

    fn string(&self, v: &Value, field: &str) -> Result<String, AgentError> {
        let s = v.as_str().ok_or_else(|| self.shape(field, "a string"))?;
        self.bounded(s, field, self.limits.max_string_len)?;
        Ok(s.to_owned())
    }

    fn bounded(&self, s: &str, field: &str, max: usize) -> Result<(), AgentError> {
        if s.len() > max {
            return Err(AgentError::StringTooLong {
                command: self.command,
                field: field.to_owned(),
                len: s.len(),
                max,
            });
        }
        Ok(())
    }

    fn boolean(&self, v: &Value, field: &str) -> Result<bool, AgentError> {
        v.as_bool().ok_or_else(|| self.shape(field, "a boolean"))
    }

    fn opt_counter(
        &self,
        obj: &Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Result<Option<u64>, AgentError> {
        obj.get(key)
            .map(|v| self.counter(v, &join(parent, key)))
            .transpose()
    }

    fn opt_string(
        &self,
        obj: &Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Result<Option<String>, AgentError> {
        obj.get(key)
            .map(|v| self.string(v, &join(parent, key)))
            .transpose()
    }

    fn invalid(&self, field: &str, value: &str, expected: &'static str) -> AgentError {
        AgentError::InvalidValue {
            command: self.command,
            field: field.to_owned(),
            value: cut(value, 64),
            expected,
        }
    }

    /// Decodes a base64 field whose encoded length was already bounded by the reply size.
    fn base64(&self, v: &Value, field: &str) -> Result<Vec<u8>, AgentError> {
        let s = v
            .as_str()
            .ok_or_else(|| self.shape(field, "a base64 string"))?;
        base64::decode(s).map_err(|source| AgentError::Base64 {
            command: self.command,
            field: field.to_owned(),
            source,
        })
    }
}

/// Checks the envelope of a reply and returns its `return` value.
///
/// Rejects oversized text before parsing, invalid JSON, `{"error": ...}` replies (as
/// [`AgentError::Guest`]) and anything that is neither.
pub fn parse_reply(
    command: Command,
    text: &str,
    limits: &AgentLimits,
) -> Result<Value, AgentError> {
    if text.len() > limits.max_reply_bytes {
        return Err(AgentError::ReplyTooLarge {
            command,
            len: text.len(),
            max: limits.max_reply_bytes,
        });
    }
    let value: Value =
        serde_json::from_str(text).map_err(|source| AgentError::InvalidJson { command, source })?;
    let ctx = Ctx { command, limits };
    let Value::Object(mut obj) = value else {
        return Err(ctx.shape("<reply>", "an object with `return` or `error`"));
    };
    if let Some(err) = obj.get("error") {
        let e = ctx.object(err, "error")?;
        let class = match e.get("class") {
            Some(v) => ctx.string(v, "error.class")?,
            None => "<no class>".to_owned(),
        };
        let desc = match e.get("desc") {
            Some(v) => ctx.string(v, "error.desc")?,
            None => String::new(),
        };
        return Err(AgentError::Guest {
            command,
            class,
            desc,
        });
    }
    obj.remove("return")
        .ok_or_else(|| ctx.shape("<reply>", "an object with `return` or `error`"))
}

// ---------------------------------------------------------------------------------------------
// Typed replies.

/// Parses a `guest-ping` reply (`{"return": {}}`).
pub fn parse_ping(text: &str, limits: &AgentLimits) -> Result<(), AgentError> {
    let ret = parse_reply(Command::Ping, text, limits)?;
    Ctx {
        command: Command::Ping,
        limits,
    }
    .object(&ret, "return")?;
    Ok(())
}

/// One entry of `guest-info`'s `supported_commands`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportedCommand {
    /// Command name, e.g. `guest-exec`.
    pub name: String,
    /// Whether the agent allows it (it may be disabled by `--block-rpcs` or an allow list).
    pub enabled: bool,
    /// Whether the command sends a reply on success (`guest-shutdown` does not).
    pub success_response: bool,
}

/// A `guest-info` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Agent version, e.g. `7.2.0`.
    pub version: String,
    /// Commands the agent knows.
    pub supported_commands: Vec<SupportedCommand>,
}

impl AgentInfo {
    /// Whether `name` is known and enabled.
    pub fn is_enabled(&self, name: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == name && c.enabled)
    }
}

/// Parses a `guest-info` reply.
pub fn parse_info(text: &str, limits: &AgentLimits) -> Result<AgentInfo, AgentError> {
    let ctx = Ctx {
        command: Command::Info,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let obj = ctx.object(&ret, "return")?;
    let version = ctx.string(ctx.required(obj, "return", "version")?, "return.version")?;
    let list = ctx.array(
        ctx.required(obj, "return", "supported_commands")?,
        "return.supported_commands",
    )?;
    let mut supported_commands = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let path = format!("return.supported_commands[{i}]");
        let o = ctx.object(item, &path)?;
        supported_commands.push(SupportedCommand {
            name: ctx.string(ctx.required(o, &path, "name")?, &join(&path, "name"))?,
            enabled: ctx.boolean(ctx.required(o, &path, "enabled")?, &join(&path, "enabled"))?,
            success_response: match o.get("success-response") {
                Some(v) => ctx.boolean(v, &join(&path, "success-response"))?,
                None => true,
            },
        });
    }
    Ok(AgentInfo {
        version,
        supported_commands,
    })
}

/// A `guest-get-osinfo` reply. Every field is optional in the QAPI schema.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsInfo {
    /// `id`, e.g. `debian` (os-release ID).
    pub id: Option<String>,
    /// `name`, e.g. `Debian GNU/Linux`.
    pub name: Option<String>,
    /// `pretty-name`.
    pub pretty_name: Option<String>,
    /// `version`, e.g. `12 (bookworm)`.
    pub version: Option<String>,
    /// `version-id`, e.g. `12`.
    pub version_id: Option<String>,
    /// `variant`.
    pub variant: Option<String>,
    /// `variant-id`.
    pub variant_id: Option<String>,
    /// `kernel-release` (uname -r).
    pub kernel_release: Option<String>,
    /// `kernel-version` (uname -v).
    pub kernel_version: Option<String>,
    /// `machine` (uname -m).
    pub machine: Option<String>,
}

/// Parses a `guest-get-osinfo` reply.
pub fn parse_osinfo(text: &str, limits: &AgentLimits) -> Result<OsInfo, AgentError> {
    let ctx = Ctx {
        command: Command::OsInfo,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let o = ctx.object(&ret, "return")?;
    let p = "return";
    Ok(OsInfo {
        id: ctx.opt_string(o, p, "id")?,
        name: ctx.opt_string(o, p, "name")?,
        pretty_name: ctx.opt_string(o, p, "pretty-name")?,
        version: ctx.opt_string(o, p, "version")?,
        version_id: ctx.opt_string(o, p, "version-id")?,
        variant: ctx.opt_string(o, p, "variant")?,
        variant_id: ctx.opt_string(o, p, "variant-id")?,
        kernel_release: ctx.opt_string(o, p, "kernel-release")?,
        kernel_version: ctx.opt_string(o, p, "kernel-version")?,
        machine: ctx.opt_string(o, p, "machine")?,
    })
}

/// Per-CPU times from `guest-get-cpustats` (type `linux`), in milliseconds (qemu-ga converts
/// `/proc/stat` ticks with `CLK_TCK`). Optional fields are absent on old guest kernels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// CPU number.
    pub cpu: u32,
    /// Time in user mode (includes guest time on Linux).
    pub user_ms: u64,
    /// Time in user mode at low priority.
    pub nice_ms: u64,
    /// Time in kernel mode.
    pub system_ms: u64,
    /// Idle time.
    pub idle_ms: u64,
    /// Time waiting for I/O.
    pub iowait_ms: Option<u64>,
    /// Time servicing interrupts.
    pub irq_ms: Option<u64>,
    /// Time servicing softirqs.
    pub softirq_ms: Option<u64>,
    /// Time stolen by the hypervisor.
    pub steal_ms: Option<u64>,
    /// Time running nested guests.
    pub guest_ms: Option<u64>,
    /// Time running niced nested guests.
    pub guestnice_ms: Option<u64>,
}

impl CpuStats {
    /// Time the CPU did work for the guest: user + nice + system + irq + softirq (guest time is
    /// already inside user/nice on Linux).
    pub fn busy_ms(&self) -> u64 {
        [
            self.user_ms,
            self.nice_ms,
            self.system_ms,
            self.irq_ms.unwrap_or(0),
            self.softirq_ms.unwrap_or(0),
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// Parses a `guest-get-cpustats` reply.
pub fn parse_cpustats(text: &str, limits: &AgentLimits) -> Result<Vec<CpuStats>, AgentError> {
    let ctx = Ctx {
        command: Command::CpuStats,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let list = ctx.array(&ret, "return")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let p = format!("return[{i}]");
        let o = ctx.object(item, &p)?;
        let ty = ctx.string(ctx.required(o, &p, "type")?, &join(&p, "type"))?;
        if ty != "linux" {
            return Err(ctx.invalid(&join(&p, "type"), &ty, "\"linux\""));
        }
        let req = |key: &str| -> Result<u64, AgentError> {
            ctx.counter(ctx.required(o, &p, key)?, &join(&p, key))
        };
        out.push(CpuStats {
            cpu: ctx.uint(
                ctx.required(o, &p, "cpu")?,
                &join(&p, "cpu"),
                u64::from(u32::MAX),
            )? as u32,
            user_ms: req("user")?,
            nice_ms: req("nice")?,
            system_ms: req("system")?,
            idle_ms: req("idle")?,
            iowait_ms: ctx.opt_counter(o, &p, "iowait")?,
            irq_ms: ctx.opt_counter(o, &p, "irq")?,
            softirq_ms: ctx.opt_counter(o, &p, "softirq")?,
            steal_ms: ctx.opt_counter(o, &p, "steal")?,
            guest_ms: ctx.opt_counter(o, &p, "guest")?,
            guestnice_ms: ctx.opt_counter(o, &p, "guestnice")?,
        });
    }
    Ok(out)
}

/// One block device from `guest-get-diskstats` (the guest's `/proc/diskstats`). Sectors are 512
/// bytes; ticks are milliseconds. Fields are absent when the guest kernel does not report them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Device name, e.g. `vda`.
    pub name: String,
    /// Major device number.
    pub major: u32,
    /// Minor device number.
    pub minor: u32,
    /// Completed reads.
    pub read_ios: Option<u64>,
    /// Merged reads.
    pub read_merges: Option<u64>,
    /// Sectors read.
    pub read_sectors: Option<u64>,
    /// Time spent reading.
    pub read_ticks: Option<u64>,
    /// Completed writes.
    pub write_ios: Option<u64>,
    /// Merged writes.
    pub write_merges: Option<u64>,
    /// Sectors written.
    pub write_sectors: Option<u64>,
    /// Time spent writing.
    pub write_ticks: Option<u64>,
    /// Completed discards.
    pub discard_ios: Option<u64>,
    /// Merged discards.
    pub discard_merges: Option<u64>,
    /// Sectors discarded.
    pub discard_sectors: Option<u64>,
    /// Time spent discarding.
    pub discard_ticks: Option<u64>,
    /// Completed flushes.
    pub flush_ios: Option<u64>,
    /// Time spent flushing.
    pub flush_ticks: Option<u64>,
    /// I/Os currently in progress.
    pub ios_pgr: Option<u64>,
    /// Time the device was busy.
    pub total_ticks: Option<u64>,
    /// Weighted time spent doing I/O.
    pub weight_ticks: Option<u64>,
}

/// Parses a `guest-get-diskstats` reply.
pub fn parse_diskstats(text: &str, limits: &AgentLimits) -> Result<Vec<DiskStats>, AgentError> {
    let ctx = Ctx {
        command: Command::DiskStats,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let list = ctx.array(&ret, "return")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let p = format!("return[{i}]");
        let o = ctx.object(item, &p)?;
        let dev = |key: &str| -> Result<u32, AgentError> {
            Ok(ctx.uint(
                ctx.required(o, &p, key)?,
                &join(&p, key),
                u64::from(u32::MAX),
            )? as u32)
        };
        let mut d = DiskStats {
            name: ctx.string(ctx.required(o, &p, "name")?, &join(&p, "name"))?,
            major: dev("major")?,
            minor: dev("minor")?,
            ..DiskStats::default()
        };
        let sp = join(&p, "stats");
        let s = ctx.object(ctx.required(o, &p, "stats")?, &sp)?;
        let fields: [(&str, &mut Option<u64>); 17] = [
            ("read-ios", &mut d.read_ios),
            ("read-merges", &mut d.read_merges),
            ("read-sectors", &mut d.read_sectors),
            ("read-ticks", &mut d.read_ticks),
            ("write-ios", &mut d.write_ios),
            ("write-merges", &mut d.write_merges),
            ("write-sectors", &mut d.write_sectors),
            ("write-ticks", &mut d.write_ticks),
            ("discard-ios", &mut d.discard_ios),
            ("discard-merges", &mut d.discard_merges),
            ("discard-sectors", &mut d.discard_sectors),
            ("discard-ticks", &mut d.discard_ticks),
            ("flush-ios", &mut d.flush_ios),
            ("flush-ticks", &mut d.flush_ticks),
            ("ios-pgr", &mut d.ios_pgr),
            ("total-ticks", &mut d.total_ticks),
            ("weight-ticks", &mut d.weight_ticks),
        ];
        for (key, slot) in fields {
            *slot = ctx.opt_counter(s, &sp, key)?;
        }
        out.push(d);
    }
    Ok(out)
}

/// One address of a guest interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The address; its family matches the reply's `ip-address-type`.
    pub addr: IpAddr,
    /// Prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix: u8,
}

/// Cumulative interface counters (the guest's `/proc/net/dev`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errs: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Transmit errors.
    pub tx_errs: u64,
    /// Transmitted packets dropped.
    pub tx_dropped: u64,
}

/// One interface from `guest-network-get-interfaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInterface {
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// MAC address (`aa:bb:cc:dd:ee:ff`), absent for interfaces without one.
    pub hardware_address: Option<String>,
    /// Configured addresses.
    pub addresses: Vec<InterfaceAddress>,
    /// Counters, absent when the agent could not read them.
    pub statistics: Option<InterfaceStats>,
}

impl NetInterface {
    /// Whether this is the loopback interface, whose traffic never leaves the guest.
    pub fn is_loopback(&self) -> bool {
        self.name == "lo"
            || (!self.addresses.is_empty() && self.addresses.iter().all(|a| a.addr.is_loopback()))
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parses a `guest-network-get-interfaces` reply.
pub fn parse_interfaces(text: &str, limits: &AgentLimits) -> Result<Vec<NetInterface>, AgentError> {
    let ctx = Ctx {
        command: Command::NetworkInterfaces,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let list = ctx.array(&ret, "return")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let p = format!("return[{i}]");
        let o = ctx.object(item, &p)?;
        let name = ctx.string(ctx.required(o, &p, "name")?, &join(&p, "name"))?;
        let hardware_address = ctx.opt_string(o, &p, "hardware-address")?;
        if let Some(mac) = &hardware_address {
            if !is_mac(mac) {
                return Err(ctx.invalid(&join(&p, "hardware-address"), mac, "a MAC address"));
            }
        }
        let mut addresses = Vec::new();
        if let Some(v) = o.get("ip-addresses") {
            let ap = join(&p, "ip-addresses");
            for (j, a) in ctx.array(v, &ap)?.iter().enumerate() {
                let q = format!("{ap}[{j}]");
                let ao = ctx.object(a, &q)?;
                let ty = ctx.string(
                    ctx.required(ao, &q, "ip-address-type")?,
                    &join(&q, "ip-address-type"),
                )?;
                let text =
                    ctx.string(ctx.required(ao, &q, "ip-address")?, &join(&q, "ip-address"))?;
                let addr: IpAddr = text
                    .parse()
                    .map_err(|_| ctx.invalid(&join(&q, "ip-address"), &text, "an IP address"))?;
                let max_prefix = match (ty.as_str(), addr) {
                    ("ipv4", IpAddr::V4(_)) => 32,
                    ("ipv6", IpAddr::V6(_)) => 128,
                    _ => {
                        return Err(ctx.invalid(
                            &join(&q, "ip-address-type"),
                            &ty,
                            "the family of ip-address",
                        ))
                    }
                };
                let prefix = ctx.uint(
                    ctx.required(ao, &q, "prefix")?,
                    &join(&q, "prefix"),
                    max_prefix,
                )? as u8;
                addresses.push(InterfaceAddress { addr, prefix });
            }
        }
        let statistics = match o.get("statistics") {
            None => None,
            Some(v) => {
                let sp = join(&p, "statistics");
                let s = ctx.object(v, &sp)?;
                let c = |key: &str| -> Result<u64, AgentError> {
                    ctx.counter(ctx.required(s, &sp, key)?, &join(&sp, key))
                };
                Some(InterfaceStats {
                    rx_bytes: c("rx-bytes")?,
                    rx_packets: c("rx-packets")?,
                    rx_errs: c("rx-errs")?,
                    rx_dropped: c("rx-dropped")?,
                    tx_bytes: c("tx-bytes")?,
                    tx_packets: c("tx-packets")?,
                    tx_errs: c("tx-errs")?,
                    tx_dropped: c("tx-dropped")?,
                })
            }
        };
        out.push(NetInterface {
            name,
            hardware_address,
            addresses,
            statistics,
        });
    }
    Ok(out)
}

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

// ---------------------------------------------------------------------------------------------
// High-level helpers.

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
        loop {
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
    use std::collections::VecDeque;
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Writes the fixture into a temp dir and reads it back, so parsers are exercised on files.
    fn fixture(dir: &Path, name: &str) -> String {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/monitor/fixtures/agent")
            .join(name);
        let dst = dir.join(name);
        fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy fixture {}: {e}", src.display()));
        fs::read_to_string(dst).unwrap()
    }

    fn limits() -> AgentLimits {
        AgentLimits::default()
    }

    #[test]
    fn ping_and_info_fixtures() {
        let d = tempfile::tempdir().unwrap();
        parse_ping(&fixture(d.path(), "ping.json"), &limits()).unwrap();
        let info = parse_info(&fixture(d.path(), "info.json"), &limits()).unwrap();
        assert_eq!(info.version, "7.2.0");
        assert!(info.is_enabled("guest-exec"));
        assert!(!info.is_enabled("guest-file-write"), "disabled in fixture");
        assert!(!info.is_enabled("guest-no-such"));
        let shutdown = info
            .supported_commands
            .iter()
            .find(|c| c.name == "guest-shutdown")
            .unwrap();
        assert!(!shutdown.success_response);
    }

    #[test]
    fn osinfo_fixture() {
        let d = tempfile::tempdir().unwrap();
        let os = parse_osinfo(&fixture(d.path(), "osinfo.json"), &limits()).unwrap();
        assert_eq!(os.id.as_deref(), Some("debian"));
        assert_eq!(os.version_id.as_deref(), Some("12"));
        assert_eq!(os.kernel_release.as_deref(), Some("6.1.0-18-amd64"));
        assert_eq!(os.machine.as_deref(), Some("x86_64"));
        assert_eq!(os.variant, None);
    }

    #[test]
    fn cpustats_fixture() {
        let d = tempfile::tempdir().unwrap();
        let cpus = parse_cpustats(&fixture(d.path(), "cpustats.json"), &limits()).unwrap();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[1].cpu, 1);
        assert_eq!(cpus[0].user_ms, 1_532_140);
        assert_eq!(cpus[0].steal_ms, Some(3_210));
        assert_eq!(
            cpus[0].busy_ms(),
            1_532_140 + 2_030 + 401_220 + 18_550,
            "irq is 0"
        );
    }

    #[test]
    fn diskstats_fixture() {
        let d = tempfile::tempdir().unwrap();
        let disks = parse_diskstats(&fixture(d.path(), "diskstats.json"), &limits()).unwrap();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].name, "vda");
        assert_eq!((disks[0].major, disks[0].minor), (254, 0));
        assert_eq!(disks[0].read_sectors, Some(4_551_214));
        assert_eq!(disks[0].flush_ios, Some(90_211));
        assert_eq!(
            disks[1].discard_ios, None,
            "old-kernel entry has no discard fields"
        );
    }

    #[test]
    fn interfaces_fixture() {
        let d = tempfile::tempdir().unwrap();
        let ifs = parse_interfaces(&fixture(d.path(), "interfaces.json"), &limits()).unwrap();
        assert_eq!(ifs.len(), 2);
        assert!(ifs[0].is_loopback());
        let eth = &ifs[1];
        assert!(!eth.is_loopback());
        assert_eq!(eth.hardware_address.as_deref(), Some("52:54:00:6b:3c:58"));
        assert_eq!(
            eth.addresses[0],
            InterfaceAddress {
                addr: "10.20.0.15".parse().unwrap(),
                prefix: 24
            }
        );
        assert_eq!(eth.addresses[1].prefix, 64);
        let st = eth.statistics.unwrap();
        assert_eq!((st.rx_bytes, st.tx_bytes), (918_273_645, 123_456_789));
    }

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

    #[test]
    fn guest_error_reply() {
        let d = tempfile::tempdir().unwrap();
        let e = parse_cpustats(&fixture(d.path(), "error-command-disabled.json"), &limits())
            .unwrap_err();
        match e {
            AgentError::Guest {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, Command::CpuStats);
                assert_eq!(class, "GenericError");
                assert!(desc.contains("disabled"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn malformed_replies_are_rejected_with_named_errors() {
        let d = tempfile::tempdir().unwrap();
        let l = limits();
        let e = parse_interfaces(&fixture(d.path(), "truncated.json"), &l).unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::InvalidJson {
                    command: Command::NetworkInterfaces,
                    ..
                }
            ),
            "{e}"
        );

        let e = parse_cpustats(&fixture(d.path(), "cpustats-negative.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::NegativeNumber { field, value: -5, .. } if field == "return[0].idle"),
            "{e}"
        );
        assert!(e.to_string().contains("guest-get-cpustats"));

        let e = parse_cpustats(&fixture(d.path(), "cpustats-huge.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::NumberOutOfRange { field, .. } if field == "return[0].user"),
            "{e}"
        );

        let e = parse_cpustats(&fixture(d.path(), "cpustats-wrong-shape.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::Shape { field, .. } if field == "return"),
            "{e}"
        );

        let e = parse_diskstats(&fixture(d.path(), "diskstats-missing-name.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::MissingField { field, .. } if field == "return[0].name"),
            "{e}"
        );

        let e = parse_interfaces(&fixture(d.path(), "interfaces-bad-ip.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::InvalidValue { field, .. } if field == "return[0].ip-addresses[0].ip-address"),
            "{e}"
        );

        let e = parse_exec_status(&fixture(d.path(), "exec-status-bad-base64.json"), &l, 1024)
            .unwrap_err();
        assert!(
            matches!(&e, AgentError::Base64 { field, .. } if field == "return.out-data"),
            "{e}"
        );

        let e = parse_ping("[]", &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::Shape { field, .. } if field == "<reply>"),
            "{e}"
        );
        let e = parse_ping(r#"{"id": 1}"#, &l).unwrap_err();
        assert!(matches!(e, AgentError::Shape { .. }), "{e}");
        let e = parse_cpustats(
            r#"{"return":[{"type":"linux","cpu":0,"user":1.5,"nice":0,"system":0,"idle":0}]}"#,
            &l,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Shape {
                    expected: "an integer",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_cpustats(r#"{"return":[{"type":"windows","cpu":0}]}"#, &l).unwrap_err();
        assert!(matches!(e, AgentError::InvalidValue { .. }), "{e}");
        let e = parse_interfaces(r#"{"return":[{"name":"eth0","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"10.0.0.1","prefix":33}]}]}"#, &l).unwrap_err();
        assert!(
            matches!(e, AgentError::NumberOutOfRange { max: 32, .. }),
            "{e}"
        );
        let e = parse_interfaces(r#"{"return":[{"name":"eth0","ip-addresses":[{"ip-address-type":"ipv6","ip-address":"10.0.0.1","prefix":8}]}]}"#, &l).unwrap_err();
        assert!(matches!(e, AgentError::InvalidValue { .. }), "{e}");
        let e = parse_exec_status(
            r#"{"return":{"exited":true,"exitcode":4294967296}}"#,
            &l,
            10,
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::NumberOutOfRange { .. }), "{e}");
    }

    #[test]
    fn bounds_are_enforced() {
        let d = tempfile::tempdir().unwrap();
        let text = fixture(d.path(), "cpustats.json");
        let small = AgentLimits {
            max_reply_bytes: 64,
            ..limits()
        };
        let e = parse_cpustats(&text, &small).unwrap_err();
        assert!(
            matches!(e, AgentError::ReplyTooLarge { max: 64, .. }),
            "{e}"
        );

        // 300 interfaces with the default cap of 256.
        let one = r#"{"name":"eth0"}"#;
        let many = format!(r#"{{"return":[{}]}}"#, vec![one; 300].join(","));
        let e = parse_interfaces(&many, &limits()).unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::TooManyEntries {
                    count: 300,
                    max: 256,
                    ..
                }
            ),
            "{e}"
        );

        let long = format!(r#"{{"return":{{"id":"{}"}}}}"#, "x".repeat(5000));
        let e = parse_osinfo(&long, &limits()).unwrap_err();
        assert!(
            matches!(&e, AgentError::StringTooLong { field, len: 5000, .. } if field == "return.id"),
            "{e}"
        );

        let e = parse_ping(
            &fixture(d.path(), "oversized.json"),
            &AgentLimits {
                max_reply_bytes: 1024,
                ..limits()
            },
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::ReplyTooLarge { .. }), "{e}");
    }

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
