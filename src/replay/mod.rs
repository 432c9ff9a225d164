//! Replaying recorded traffic against an isolated shadow, and comparing answers.
//!
//! `client` sends each recorded request (HTTP, or a TCP stream's client bytes) over a socket
//! bound to the isolated shadow's own bridge, so it can only reach that shadow, and reads a
//! bounded answer. `compare` judges a canary's answers against an unchanged baseline's and the
//! recorded ones (the baseline's own differences from the recording are noise), or a standby's
//! answers against the recording.

pub mod client;
pub mod compare;

pub use client::{Answer, Target};
pub use compare::{CanaryVerdict, Comparison, Normalizer, RequestDiff, VerifyVerdict};

/// Errors of replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// An ignore pattern is not a regular expression (the configuration check refuses these).
    #[error("ignore pattern {pattern:?} is invalid")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        #[source]
        source: regex::Error,
    },
    /// There is nothing to replay.
    #[error("no recorded traffic for service '{service}' (enable [class.<class>.capture] and let clients use it)")]
    NothingRecorded {
        /// The service.
        service: String,
    },
}
