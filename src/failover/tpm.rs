//! Emulated TPM state for shadows.
//!
//! libvirt keeps an emulated TPM's (swtpm's) persistent state per domain UUID, in
//! `<swtpm dir>/<uuid>/tpm2/` (`tpm1.2/` for a TPM 1.2): keys, NV indices, hierarchy
//! authorisations. A shadow has its own UUID, so left alone libvirt would give it a blank TPM
//! and a promoted shadow would lose whatever the guest sealed or stored in its TPM. Like a data
//! disk's, that state follows the service: before a shadow first starts it gets a copy of the
//! primary's state, and libvirt then sees an existing state and runs no `swtpm_setup`.
//!
//! A running swtpm keeps the state in memory and writes it to disk whenever the guest changes
//! it (atomically: a temporary file renamed over `tpm2-00.permall`). A standing-by shadow's
//! swtpm has already read its copy, so a later change of the primary's state cannot be pushed
//! into it: the shadow is stale and is replaced. [`record`] notes, next to the shadow's
//! overlays, which state it was given; [`is_stale`] compares that with the primary's now.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::domain_xml::DomainXml;

/// libvirt's `swtpm` state directory for the system instance (`<localstatedir>/lib/libvirt/
/// swtpm`; not configurable in libvirt's qemu.conf).
pub const SWTPM_STATE_DIR: &str = "/var/lib/libvirt/swtpm";

/// The per-version subdirectories libvirt uses.
const VERSION_DIRS: [&str; 2] = ["tpm2", "tpm1.2"];

/// Errors copying TPM state.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// Reading or writing state files failed.
    #[error("cannot copy the emulated TPM state from {from} to {to}")]
    Copy {
        /// The primary's state directory.
        from: PathBuf,
        /// The shadow's.
        to: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing the record of which state a shadow got failed.
    #[error("cannot record the TPM state given to shadow at {path}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where libvirt keeps the emulated TPM state of the domain with `uuid`.
pub fn state_dir(root: &Path, uuid: &str) -> PathBuf {
    root.join(uuid.to_ascii_lowercase())
}

/// Whether the domain has an emulated TPM (the only kind a shadow may have).
pub fn has_emulated_tpm(dom: &DomainXml) -> bool {
    dom.tpm_backends().iter().any(|b| b == "emulator")
}

/// A fingerprint of a domain's persistent TPM state: each state file's name, size and
/// modification time (swtpm replaces the file on every change). `None` if there is none yet
/// (a primary that never started).
pub fn fingerprint(root: &Path, uuid: &str) -> io::Result<Option<String>> {
    let dir = state_dir(root, uuid);
    let mut parts = Vec::new();
    for version in VERSION_DIRS {
        let vdir = dir.join(version);
        let entries = match fs::read_dir(&vdir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".permall") && !name.ends_with(".volatilestate") {
                continue;
            }
            let m = entry.metadata()?;
            parts.push(format!(
                "{version}/{name}:{}:{}.{}",
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ));
        }
    }
    parts.sort();
    Ok((!parts.is_empty()).then(|| parts.join(",")))
}

/// Copies the primary's TPM state to the shadow's state directory (replacing any there), and
/// returns the fingerprint of what was copied; `None` (nothing copied) if the primary has no
/// state yet, in which case libvirt creates a fresh one for the shadow.
///
/// The copy is made in a temporary directory beside the target and renamed into place, so
/// libvirt never sees half a state. Files keep their owner and mode (`swtpm_user`).
pub fn copy_state(
    root: &Path,
    primary_uuid: &str,
    shadow_uuid: &str,
) -> Result<Option<String>, TpmError> {
    let from = state_dir(root, primary_uuid);
    let to = state_dir(root, shadow_uuid);
    let err = |source| TpmError::Copy {
        from: from.clone(),
        to: to.clone(),
        source,
    };
    let before = fingerprint(root, primary_uuid).map_err(err)?;
    if before.is_none() {
        return Ok(None);
    }
    let tmp = root.join(format!(".{}.partial", shadow_uuid.to_ascii_lowercase()));
    let _ = fs::remove_dir_all(&tmp);
    copy_tree(&from, &tmp).map_err(err)?;
    let _ = fs::remove_dir_all(&to);
    fs::rename(&tmp, &to).map_err(err)?;
    // A write by the primary's swtpm during the copy shows as a changed fingerprint: record
    // the older one, so the shadow counts as stale and is replaced rather than trusted.
    let after = fingerprint(root, primary_uuid).map_err(err)?;
    Ok(if after == before { before } else { None })
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::metadata(from)?;
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()))?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        // swtpm's lock file belongs to the running primary's swtpm.
        if name == ".lock" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            let m = entry.metadata()?;
            fs::copy(&src, &dst)?;
            std::os::unix::fs::chown(&dst, Some(m.uid()), Some(m.gid()))?;
        }
    }
    Ok(())
}

/// Where the fingerprint of the state given to `shadow` is kept: beside its disk overlays,
/// so that removing a shadow's files removes it too.
pub fn record_path(disk_dir: &Path, shadow: &str) -> PathBuf {
    disk_dir.join(format!("{shadow}-tpm.state"))
}

/// Notes which primary state `shadow` was given (`None`: none, or a copy that raced a write).
pub fn record(disk_dir: &Path, shadow: &str, fingerprint: Option<&str>) -> Result<(), TpmError> {
    let path = record_path(disk_dir, shadow);
    let tmp = path.with_extension("state.partial");
    fs::write(&tmp, fingerprint.unwrap_or(""))
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|source| TpmError::Record { path, source })
}

/// Whether `shadow` holds other TPM state than its primary has now: a shadow given a copy
/// that the primary has since changed, or none while the primary has state now. A shadow
/// without a record (its primary had no emulated TPM when it was made) is never stale.
pub fn is_stale(root: &Path, primary_uuid: &str, disk_dir: &Path, shadow: &str) -> bool {
    let Ok(given) = fs::read_to_string(record_path(disk_dir, shadow)) else {
        return false;
    };
    match fingerprint(root, primary_uuid) {
        Ok(now) => now.as_deref().unwrap_or("") != given,
        // Unreadable now: keep the shadow rather than churn; the next round looks again.
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "6D1F2A3B-4C5D-4E6F-8A9B-0C1D2E3F4A5B";
    const S: &str = "0a1b2c3d-4e5f-4061-8273-8495a6b7c8d9";

    fn write_state(root: &Path, uuid: &str, content: &str) {
        let dir = state_dir(root, uuid).join("tpm2");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let tmp = dir.join("TMP2-00.permall");
        fs::write(&tmp, content).unwrap();
        fs::rename(&tmp, dir.join("tpm2-00.permall")).unwrap();
        fs::write(dir.join(".lock"), "").unwrap();
    }

    #[test]
    fn shadow_gets_a_copy_and_goes_stale_when_the_primary_changes() {
        let root = tempfile::tempdir().unwrap();
        let disks = tempfile::tempdir().unwrap();
        // No state yet: nothing copied, libvirt makes a fresh one.
        assert_eq!(copy_state(root.path(), P, S).unwrap(), None);
        write_state(root.path(), P, "primary keys v1");
        let fp = copy_state(root.path(), P, S).unwrap().expect("copied");
        let copied = state_dir(root.path(), S).join("tpm2");
        assert_eq!(
            fs::read_to_string(copied.join("tpm2-00.permall")).unwrap(),
            "primary keys v1"
        );
        assert!(!copied.join(".lock").exists(), "the primary's lock stays");
        assert_eq!(
            fs::metadata(&copied).unwrap().permissions().mode() & 0o777,
            0o700
        );
        record(disks.path(), "web-shadow-1", Some(&fp)).unwrap();
        assert!(!is_stale(root.path(), P, disks.path(), "web-shadow-1"));
        // The guest changes its TPM state: swtpm renames a new file into place.
        std::thread::sleep(std::time::Duration::from_millis(10));
        write_state(root.path(), P, "primary keys v2, longer");
        assert!(is_stale(root.path(), P, disks.path(), "web-shadow-1"));
        // A replacement gets the new state and is current again.
        let fp2 = copy_state(root.path(), P, S).unwrap().unwrap();
        assert_ne!(fp, fp2);
        record(disks.path(), "web-shadow-2", Some(&fp2)).unwrap();
        assert!(!is_stale(root.path(), P, disks.path(), "web-shadow-2"));
        assert_eq!(
            fs::read_to_string(copied.join("tpm2-00.permall")).unwrap(),
            "primary keys v2, longer"
        );
        // A shadow recorded without state is stale once the primary has some; one without a
        // record (no TPM) never is.
        record(disks.path(), "web-shadow-3", None).unwrap();
        assert!(is_stale(root.path(), P, disks.path(), "web-shadow-3"));
        assert!(!is_stale(root.path(), P, disks.path(), "web-shadow-9"));
    }

    #[test]
    fn emulated_tpm_is_recognised() {
        let dom = |tpm: &str| {
            DomainXml::parse(&format!(
                "<domain type='kvm'><name>t</name><devices>{tpm}</devices></domain>"
            ))
            .unwrap()
        };
        assert!(has_emulated_tpm(&dom(
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
        )));
        assert!(!has_emulated_tpm(&dom(
            "<tpm model='tpm-tis'><backend type='passthrough'/></tpm>"
        )));
        assert!(!has_emulated_tpm(&dom("")));
    }
}
