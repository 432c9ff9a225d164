//! `[class.X.capture]` and `[class.X.replay]`: what of a primary's traffic is recorded, and how
//! replayed answers are compared (canaries, standby verification).

use serde::Deserialize;

/// How captured connections are understood.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureProtocol {
    /// HTTP/1.x: request and response pairs.
    #[default]
    Http,
    /// Any other TCP service: each connection's two byte streams.
    Tcp,
}

/// `[class.X.capture]`: passive recording of a primary's inbound requests and its answers,
/// from its tap on the host. Off unless `enabled`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Record this class's primaries.
    pub enabled: bool,
    /// `http` or `tcp`.
    pub protocol: CaptureProtocol,
    /// The service's TCP ports on the guest (1..=16 of them): a connection is recorded when
    /// its server side uses one.
    pub ports: Vec<u16>,
    /// Bytes kept on disk per service (65536..=1 GiB); the oldest records go first.
    pub max_bytes: u64,
    /// Records kept per second at most (1..=10000); the rest are counted and dropped.
    pub max_per_second: u32,
    /// Bytes of each body (or each direction of a TCP stream) kept (0..=1 MiB).
    pub max_body_bytes: usize,
    /// Header names whose values are replaced before anything is stored (any case).
    pub redact_headers: Vec<String>,
    /// Query parameters, form fields and JSON keys whose values are replaced.
    pub redact_fields: Vec<String>,
    /// Regular expressions whose matches are replaced anywhere in what is stored.
    pub redact_patterns: Vec<String>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            protocol: CaptureProtocol::Http,
            ports: vec![80],
            max_bytes: 4 * 1024 * 1024,
            max_per_second: 100,
            max_body_bytes: 16 * 1024,
            redact_headers: vec![
                "authorization".into(),
                "proxy-authorization".into(),
                "cookie".into(),
                "set-cookie".into(),
            ],
            redact_fields: Vec::new(),
            redact_patterns: Vec::new(),
        }
    }
}

/// `[class.X.replay]`: how recorded traffic is replayed against isolated shadows and how their
/// answers are compared.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    /// Regular expressions removed from bodies before they are compared (per-guest values
    /// such as a host name or a UUID).
    pub ignore: Vec<String>,
    /// The most recent recorded requests replayed per run (1..=100000).
    pub max_requests: usize,
    /// Longest one replayed request may take, in milliseconds (10..=60000).
    pub timeout_ms: u64,
    /// A canary whose median latency exceeds the baseline's by this factor (1.0..=100.0) and
    /// by `latency_slack_ms` is reported slower.
    pub latency_factor: f64,
    /// See `latency_factor` (0..=60000).
    pub latency_slack_ms: f64,
    /// Standby verification period in seconds; 0 (the default) turns it off.
    pub verify_interval_s: u64,
    /// Share of replayed requests that must match for a verification to pass (0.0..=1.0).
    pub verify_min_match: f64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            ignore: Vec::new(),
            max_requests: 200,
            timeout_ms: 2000,
            latency_factor: 2.0,
            latency_slack_ms: 20.0,
            verify_interval_s: 0,
            verify_min_match: 0.99,
        }
    }
}
