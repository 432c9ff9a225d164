//! On-disk layout shared by the local store and directory repositories:
//! `<root>/<service>/v<N>.json`, one JSON [`ProfileVersion`] per file, written atomically.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::learner::Profile;

/// Version files larger than this are rejected unread (a real one is a few hundred KiB).
pub const MAX_VERSION_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Longest accepted service name.
pub const MAX_SERVICE_LEN: usize = 128;

/// Why a version file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VersionFileError {
    /// The file could not be read.
    #[error("cannot read the file")]
    Io(#[from] io::Error),
    /// The file is larger than [`MAX_VERSION_FILE_BYTES`].
    #[error("file is {size} bytes, more than the {MAX_VERSION_FILE_BYTES} accepted")]
    TooLarge {
        /// Its size.
        size: u64,
    },
    /// The content is not a valid profile version (bad or truncated JSON, inconsistent model).
    #[error("invalid profile version JSON")]
    Json(#[from] serde_json::Error),
    /// The file belongs to another service than its directory says.
    #[error("file is for service {found:?}, expected {expected:?}")]
    ServiceMismatch {
        /// Service of the directory.
        expected: String,
        /// Service recorded in the file.
        found: String,
    },
    /// The version recorded in the file differs from its name.
    #[error("file holds version {found}, its name says {expected}")]
    VersionMismatch {
        /// Version from the file name.
        expected: u64,
        /// Version recorded in the file.
        found: u64,
    },
}

/// Why a version was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// First version of a service.
    Initial,
    /// Periodic refresh of the learned profile.
    Scheduled,
    /// The primary drifted from its profile.
    Drift {
        /// What drifted.
        detail: String,
    },
    /// An operator asked for it.
    Manual,
    /// Copy of an earlier version.
    Rollback {
        /// The version restored.
        to: u64,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Initial => f.write_str("initial"),
            Reason::Scheduled => f.write_str("scheduled"),
            Reason::Drift { detail } => write!(f, "drift: {detail}"),
            Reason::Manual => f.write_str("manual"),
            Reason::Rollback { to } => write!(f, "rollback to v{to}"),
        }
    }
}

/// One stored version of a service's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileVersion {
    /// Version number, monotonic per service.
    pub version: u64,
    /// When it was committed, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Why it was committed.
    pub reason: Reason,
    /// The service it describes.
    pub service: String,
    /// Model snapshot, expected configuration and dependencies.
    pub profile: Profile,
}

/// Checks that `name` can be used as a directory name: 1 to 128 characters among ASCII letters,
/// digits, `.`, `_` and `-`, not starting with a dot.
pub fn check_service(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_SERVICE_LEN {
        return Err("must be 1 to 128 characters");
    }
    if name.starts_with('.') {
        return Err("must not start with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// `v<N>.json`.
pub fn file_name(version: u64) -> String {
    format!("v{version}.json")
}

/// The version number of a file named `v<N>.json`, `None` for anything else.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('v')?.strip_suffix(".json")?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every `v<N>.json` in `dir`, ascending by `N`; an absent directory has none.
pub fn scan(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_file_name) {
            found.push((n, entry.path()));
        }
    }
    found.sort_by_key(|(n, _)| *n);
    Ok(found)
}

/// Reads and validates version `version` of `service` from `path`.
pub fn read(path: &Path, service: &str, version: u64) -> Result<ProfileVersion, VersionFileError> {
    let file = fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > MAX_VERSION_FILE_BYTES {
        return Err(VersionFileError::TooLarge { size });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // take(): the file may grow between metadata() and read().
    file.take(MAX_VERSION_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_VERSION_FILE_BYTES {
        return Err(VersionFileError::TooLarge {
            size: bytes.len() as u64,
        });
    }
    parse(&bytes, service, version)
}

/// Parses the content of version file `version` of `service` and checks that it is that one.
pub fn parse(
    bytes: &[u8],
    service: &str,
    version: u64,
) -> Result<ProfileVersion, VersionFileError> {
    let v: ProfileVersion = serde_json::from_slice(bytes)?;
    if v.service != service {
        return Err(VersionFileError::ServiceMismatch {
            expected: service.to_string(),
            found: v.service,
        });
    }
    if v.version != version {
        return Err(VersionFileError::VersionMismatch {
            expected: version,
            found: v.version,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_reject_lookalikes() {
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        for bad in [
            "v.json",
            "v-1.json",
            "v+1.json",
            "v1.json.tmp",
            ".v1.json.tmp.7",
            "x1.json",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
        assert_eq!(parse_file_name("v99999999999999999999999.json"), None);
    }

    #[test]
    fn service_names_are_single_safe_path_components() {
        assert!(check_service("web-01.prod_a").is_ok());
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_service(bad).is_err(), "{bad:?}");
        }
    }
}
