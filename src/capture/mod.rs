//! Passive capture of a primary's traffic from the host side, for replay on isolated shadows.
//!
//! A packet socket bound to the primary's tap (`sniff`) sees every frame to and from the guest
//! without being in their path: it adds no latency. Frames are parsed with etherparse,
//! reassembled per TCP connection (`flow`), and cut into HTTP request/response pairs (or, for a
//! plain TCP service, each connection's two byte streams). Every record is redacted (`redact`)
//! before it reaches the rate limit and the store (`store`): atomic segment files under the
//! state directory, bounded in bytes, oldest dropped first. Packet contents are untrusted:
//! every buffer, table and field is bounded. `worker` runs one capture per service and owns its
//! counters.

pub mod flow;
pub mod redact;
pub mod sniff;
pub mod store;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use flow::{FlowLimits, FlowTable};
pub use redact::Redactor;
pub use store::CaptureStore;
pub use worker::{CaptureStats, Captures};

/// Errors of capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The packet socket could not be opened, bound or configured.
    #[error("cannot open a packet socket on {link}: {what}")]
    Socket {
        /// The tap.
        link: String,
        /// The call that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A store file or directory could not be written or read.
    #[error("capture store {path}")]
    Store {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A redaction pattern is not a regular expression (the configuration check refuses these).
    #[error("redaction pattern {pattern:?} is invalid")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        #[source]
        source: regex::Error,
    },
    /// The capture thread could not be started.
    #[error("cannot start the capture thread for {service}")]
    Thread {
        /// The service.
        service: String,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
}

/// A body or stream as stored: UTF-8 text as is, anything else base64-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Body {
    /// The bytes kept, as text or base64 (see `base64`).
    pub data: String,
    /// `data` is base64.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base64: bool,
    /// Bytes there were beyond those kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub truncated: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Body {
    /// Wraps `bytes`; `truncated` bytes more were not kept.
    pub fn new(bytes: &[u8], truncated: u64) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => Body {
                data: s.to_string(),
                base64: false,
                truncated,
            },
            Err(_) => Body {
                data: crate::monitor::base64::encode(bytes),
                base64: true,
                truncated,
            },
        }
    }

    /// The bytes kept (a base64 body that does not decode counts as empty).
    pub fn bytes(&self) -> Vec<u8> {
        if self.base64 {
            crate::monitor::base64::decode(&self.data).unwrap_or_default()
        } else {
            self.data.as_bytes().to_vec()
        }
    }
}

/// A recorded HTTP request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// HTTP/1.`version`.
    pub version: u8,
    /// Header names and values in order (values lossily decoded).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
}

/// A recorded HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header names and values in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
}

/// What one record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Exchange {
    /// An HTTP request and the answer seen for it (none if the connection ended first).
    Http {
        /// The request.
        request: HttpRequest,
        /// The response.
        response: Option<HttpResponse>,
    },
    /// A TCP connection's two byte streams.
    Stream {
        /// Client to server.
        to_server: Body,
        /// Server to client.
        to_client: Body,
    },
}

/// One stored record: an exchange, where and when it was seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Store sequence number (increasing per service).
    pub seq: u64,
    /// When its first byte was seen, Unix ms.
    pub at_unix_ms: u64,
    /// Client side of the connection.
    pub client: SocketAddr,
    /// Server side (the guest).
    pub server: SocketAddr,
    /// First request byte to first response byte, in ms (none without a response).
    pub latency_ms: Option<f64>,
    /// The exchange.
    #[serde(flatten)]
    pub exchange: Exchange,
}
