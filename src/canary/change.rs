//! A change tried on a canary: a golden image its system disk boots from instead of the
//! shadow's, then configuration files written and commands run in the guest through its agent,
//! in that order. Read from a TOML file given to `canary start --apply`:
//!
//! ```toml
//! golden_image = "/var/lib/libvirt/images/web-2026-12.qcow2"
//!
//! [[file]]
//! path = "/etc/app.conf"
//! content = "workers = 4\n"
//!
//! [[command]]
//! argv = ["/bin/sh", "-c", "kill -HUP $(pidof app)"]
//! timeout_ms = 10000
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest change file accepted.
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;
/// Largest file content: written as one base64 guest-exec argument (4096 bytes at most).
pub const MAX_FILE_BYTES: usize = 3 * 1024;

/// One file written in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileChange {
    /// Absolute path in the guest.
    pub path: String,
    /// Its whole new content.
    pub content: String,
}

/// One command run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandChange {
    /// Argument vector; `argv[0]` an absolute path (guest-exec does not search PATH).
    pub argv: Vec<String>,
    /// Longest it may run (100..=600000 ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// A change: a golden image to boot from, files, then commands.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// The image (an absolute path on the host) the first system disk boots an overlay of,
    /// in place of the shadow's base; data disks are untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden_image: Option<PathBuf>,
    /// Files written first.
    #[serde(default, rename = "file")]
    pub files: Vec<FileChange>,
    /// Commands run after.
    #[serde(default, rename = "command")]
    pub commands: Vec<CommandChange>,
}

/// Why a change file is refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Larger than [`MAX_CHANGE_BYTES`].
    #[error("change file is {0} bytes; at most {MAX_CHANGE_BYTES} are accepted")]
    TooLarge(usize),
    /// Not TOML of the expected shape.
    #[error("change file is not valid")]
    Parse(#[source] toml::de::Error),
    /// A value is out of bounds.
    #[error("{0}")]
    Invalid(String),
}

impl Change {
    /// Parses and checks a change file's text.
    pub fn parse(text: &str) -> Result<Self, ChangeError> {
        if text.len() > MAX_CHANGE_BYTES {
            return Err(ChangeError::TooLarge(text.len()));
        }
        let c: Change = toml::from_str(text).map_err(ChangeError::Parse)?;
        if c.golden_image.is_none() && c.files.is_empty() && c.commands.is_empty() {
            return Err(ChangeError::Invalid(
                "the change has no golden_image, [[file]] or [[command]] entries".into(),
            ));
        }
        if let Some(g) = &c.golden_image {
            let text = g.to_string_lossy();
            if !g.is_absolute() || text.len() > 1024 || text.contains(',') {
                return Err(ChangeError::Invalid(format!(
                    "golden_image {text:?} must be an absolute path (at most 1024 bytes, no comma: \
                     qemu-img takes it as a backing file)"
                )));
            }
        }
        for (i, f) in c.files.iter().enumerate() {
            if !f.path.starts_with('/') || f.path.contains('\0') || f.path.len() > 1024 {
                return Err(ChangeError::Invalid(format!(
                    "file[{i}].path {:?} must be an absolute path",
                    f.path
                )));
            }
            if f.content.len() > MAX_FILE_BYTES {
                return Err(ChangeError::Invalid(format!(
                    "file[{i}].content is {} bytes; at most {MAX_FILE_BYTES}",
                    f.content.len()
                )));
            }
        }
        for (i, cmd) in c.commands.iter().enumerate() {
            match cmd.argv.first() {
                Some(p) if p.starts_with('/') => {}
                _ => {
                    return Err(ChangeError::Invalid(format!(
                        "command[{i}].argv must start with an absolute path"
                    )))
                }
            }
            if !(100..=600_000).contains(&cmd.timeout_ms) {
                return Err(ChangeError::Invalid(format!(
                    "command[{i}].timeout_ms {} is out of range 100..=600000",
                    cmd.timeout_ms
                )));
            }
        }
        Ok(c)
    }

    /// Every step as an argument vector and its time limit: files are written by the guest's
    /// `/bin/sh` from a base64 argument (no shell quoting of the content involved).
    pub fn steps(&self) -> Vec<(Vec<String>, u64)> {
        let mut out = Vec::new();
        for f in &self.files {
            out.push((
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "printf '%s' \"$1\" | base64 -d > \"$2\"".into(),
                    "understudy-change".into(),
                    crate::monitor::base64::encode(f.content.as_bytes()),
                    f.path.clone(),
                ],
                10_000,
            ));
        }
        for c in &self.commands {
            out.push((c.argv.clone(), c.timeout_ms));
        }
        out
    }

    /// One line per part of the change (the golden image first), for reports.
    pub fn summary(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .golden_image
            .iter()
            .map(|g| format!("golden image {}", g.display()))
            .collect();
        out.extend(self.step_names());
        out
    }

    /// One line per step of [`Change::steps`], in order.
    pub fn step_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .files
            .iter()
            .map(|f| format!("file {} ({} bytes)", f.path, f.content.len()))
            .collect();
        out.extend(
            self.commands
                .iter()
                .map(|c| format!("command {:?}", c.argv)),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_files_parse_and_bad_ones_are_named() {
        let c = Change::parse(
            "[[file]]\npath = \"/etc/a\"\ncontent = \"x = 1\\n\"\n[[command]]\nargv = [\"/bin/true\"]\n",
        )
        .unwrap();
        assert_eq!(c.steps().len(), 2);
        assert_eq!(
            c.steps()[0].0[4],
            crate::monitor::base64::encode(b"x = 1\n")
        );
        let g = Change::parse("golden_image = \"/images/web-2.qcow2\"\n").unwrap();
        assert!(g.steps().is_empty());
        assert_eq!(g.summary(), ["golden image /images/web-2.qcow2"]);
        for (text, needle) in [
            ("", "no golden_image"),
            ("golden_image = \"web-2.qcow2\"\n", "absolute"),
            ("golden_image = \"/a,b.qcow2\"\n", "no comma"),
            ("[[file]]\npath = \"etc\"\ncontent = \"\"\n", "absolute"),
            ("[[command]]\nargv = [\"true\"]\n", "absolute"),
            (
                "[[command]]\nargv = [\"/bin/true\"]\ntimeout_ms = 1\n",
                "timeout_ms",
            ),
            ("[[cmd]]\n", "not valid"),
        ] {
            let e = Change::parse(text).unwrap_err();
            assert!(crate::error::report(&e).contains(needle), "{text}: {e}");
        }
    }
}
