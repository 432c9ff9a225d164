//! Helpers shared by the parsers' tests.

use std::fs;
use std::path::{Path, PathBuf};

use super::AgentLimits;

/// Writes the fixture into a temp dir and reads it back, so parsers are exercised on files.
pub(super) fn fixture(dir: &Path, name: &str) -> String {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/monitor/fixtures/agent")
        .join(name);
    let dst = dir.join(name);
    fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy fixture {}: {e}", src.display()));
    fs::read_to_string(dst).unwrap()
}

pub(super) fn limits() -> AgentLimits {
    AgentLimits::default()
}
