//! Fuzz targets for understudy's parsers of untrusted input.
//!
//! Each module has one `check(data)` that feeds `data` to a group of parsers and panics when a
//! property does not hold, not only when the parser itself panics:
//!
//! - [`domain_xml`]: domain XML parse, the shadow plan and clone (a dry run, nothing touches a
//!   disk), the standby boot variant and understudy's metadata element;
//! - [`agent`]: every guest-agent reply parser, base64 payloads, and the file helpers driven by
//!   a guest that answers with the input;
//! - [`proc_net`]: guest socket tables and the dependency map they feed;
//! - [`cgroup`]: `/proc/<pid>/cgroup` (locating a domain's cgroups under a fake root) and the
//!   v1/v2 counter files;
//! - [`config`]: the TOML configuration loader;
//! - [`control`]: the control socket's request decoder, and the client's response decoder and
//!   status renderer;
//! - [`profile`]: profile version files;
//! - [`cluster`]: heartbeat datagrams, etcd keys and the records read from them;
//! - [`capture`]: captured frames cut into exchanges, their redaction, chunked bodies.
//!
//! The AFL binaries in `src/bin/` call these; `tests/replay.rs` runs them over every seed,
//! kept corpus input and past crash without AFL.

pub mod agent;
pub mod capture;
pub mod cgroup;
pub mod cluster;
pub mod config;
pub mod control;
pub mod domain_xml;
pub mod proc_net;
pub mod profile;

/// The input as text: parsers of text get what a lossy reader would hand them, so every input
/// exercises them rather than only valid UTF-8.
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Number of lines an error may point at (1-based; one past the last for "at end of input").
pub fn line_bound(text: &str) -> usize {
    text.lines().count() + 1
}

/// A target's entry point: runs one input, panics on a violated property.
pub type Check = fn(&[u8]);

/// Every target by name, as listed in `fuzz/targets`.
pub const TARGETS: &[(&str, Check)] = &[
    ("domain_xml", domain_xml::check),
    ("agent", agent::check),
    ("proc_net", proc_net::check),
    ("cgroup", cgroup::check),
    ("config", config::check),
    ("control", control::check),
    ("profile", profile::check),
    ("cluster", cluster::check),
    ("capture", capture::check),
];
