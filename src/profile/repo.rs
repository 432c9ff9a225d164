//! The central profile repository that hosts share versions through.

use std::io;
use std::path::{Path, PathBuf};

use super::layout::{self, ProfileVersion, VersionFileError};
use crate::state::write_atomic;

/// Errors of a profile repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The service name cannot be used as a directory name.
    #[error("invalid service name {name:?}: {reason}")]
    InvalidService {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A version was offered under another service than the one it records.
    #[error("version of service {found:?} offered as service {expected:?}")]
    ServiceMismatch {
        /// The service it was offered under.
        expected: String,
        /// The service recorded in the version.
        found: String,
    },
    /// The repository already holds this number with different content; it is not overwritten.
    #[error("repository already holds version {version} of {service} with different content")]
    VersionExists {
        /// Service.
        service: String,
        /// Version number.
        version: u64,
    },
    /// The repository's storage failed.
    #[error("repository I/O failed on {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The repository's backend (etcd) failed, did not answer in time, or holds a value
    /// that is not a version where one was expected.
    #[error("profile repository backend failed for service {service}")]
    Backend {
        /// Service.
        service: String,
        /// What the backend said.
        #[source]
        source: Box<crate::cluster::CoordError>,
    },
    /// A version could not be serialised.
    #[error("cannot serialise version {version} of service {service}")]
    Serialize {
        /// Service.
        service: String,
        /// Version number.
        version: u64,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Where hosts publish and fetch profile versions.
pub trait ProfileRepository: Send + Sync {
    /// Stores `v` (idempotent for identical content; a different version under an existing
    /// number is refused with [`RepoError::VersionExists`]).
    fn push(&self, service: &str, v: &ProfileVersion) -> Result<(), RepoError>;
    /// The highest-numbered readable version of `service`, if any.
    fn pull_latest(&self, service: &str) -> Result<Option<ProfileVersion>, RepoError>;
    /// Numbers of the readable versions of `service`, ascending.
    fn list(&self, service: &str) -> Result<Vec<u64>, RepoError>;
    /// Where it is, for logs.
    fn location(&self) -> String;
    /// Whether it can be used now (a directory repository whose mount is missing cannot: it
    /// is never created over).
    fn ready(&self) -> bool {
        true
    }
}

/// A repository in a local or mounted directory, with the store's layout
/// (`<dir>/<service>/v<N>.json`) and atomic writes. Unreadable files are skipped with a warning,
/// and overwritten when a host pushes a readable version under their number.
#[derive(Debug, Clone)]
pub struct DirectoryRepository {
    root: PathBuf,
}

impl DirectoryRepository {
    /// A repository rooted at `root` (created on first push).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirectoryRepository { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn service_dir(&self, service: &str) -> Result<PathBuf, RepoError> {
        layout::check_service(service).map_err(|reason| RepoError::InvalidService {
            name: service.to_string(),
            reason,
        })?;
        Ok(self.root.join(service))
    }

    /// Readable versions, ascending, skipping (and logging) unusable files.
    fn readable(&self, service: &str) -> Result<Vec<(u64, PathBuf)>, RepoError> {
        let dir = self.service_dir(service)?;
        let files = layout::scan(&dir).map_err(|source| RepoError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(files
            .into_iter()
            .filter(|(n, path)| match layout::read(path, service, *n) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unusable version in repository");
                    false
                }
            })
            .collect())
    }
}

impl ProfileRepository for DirectoryRepository {
    fn push(&self, service: &str, v: &ProfileVersion) -> Result<(), RepoError> {
        let path = self
            .service_dir(service)?
            .join(layout::file_name(v.version));
        if v.service != service {
            return Err(RepoError::ServiceMismatch {
                expected: service.to_string(),
                found: v.service.clone(),
            });
        }
        match layout::read(&path, service, v.version) {
            Ok(existing) if existing == *v => return Ok(()),
            Ok(_) => {
                return Err(RepoError::VersionExists {
                    service: service.to_string(),
                    version: v.version,
                })
            }
            Err(VersionFileError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "replacing unusable version in repository");
            }
        }
        let bytes = serde_json::to_vec(v).map_err(|source| RepoError::Serialize {
            service: service.to_string(),
            version: v.version,
            source,
        })?;
        write_atomic(&path, &bytes).map_err(|source| RepoError::Io { path, source })
    }

    fn pull_latest(&self, service: &str) -> Result<Option<ProfileVersion>, RepoError> {
        let dir = self.service_dir(service)?;
        let files = layout::scan(&dir).map_err(|source| RepoError::Io {
            path: dir.clone(),
            source,
        })?;
        for (n, path) in files.into_iter().rev() {
            match layout::read(&path, service, n) {
                Ok(v) => return Ok(Some(v)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unusable version in repository");
                }
            }
        }
        Ok(None)
    }

    fn list(&self, service: &str) -> Result<Vec<u64>, RepoError> {
        Ok(self
            .readable(service)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn ready(&self) -> bool {
        self.root.is_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::layout::Reason;
    use crate::profile::learner::Profile;
    use crate::profile::model::ModelParams;

    fn version(service: &str, n: u64, tag: &str) -> ProfileVersion {
        let mut profile = Profile::new(ModelParams::default()).unwrap();
        profile.expected_config.insert("f".into(), tag.into());
        ProfileVersion {
            version: n,
            created_unix_ms: n * 1000,
            reason: Reason::Scheduled,
            service: service.into(),
            profile,
        }
    }

    #[test]
    fn push_list_pull_latest() {
        let dir = tempfile::tempdir().unwrap();
        let repo = DirectoryRepository::new(dir.path());
        assert_eq!(repo.list("svc").unwrap(), Vec::<u64>::new());
        assert!(repo.pull_latest("svc").unwrap().is_none());

        repo.push("svc", &version("svc", 2, "two")).unwrap();
        repo.push("svc", &version("svc", 1, "one")).unwrap();
        assert!(dir.path().join("svc/v2.json").exists());
        assert_eq!(repo.list("svc").unwrap(), vec![1, 2]);
        assert_eq!(
            repo.pull_latest("svc").unwrap(),
            Some(version("svc", 2, "two"))
        );

        // Identical re-push is a no-op; different content under a taken number is refused.
        repo.push("svc", &version("svc", 1, "one")).unwrap();
        assert!(matches!(
            repo.push("svc", &version("svc", 1, "other")),
            Err(RepoError::VersionExists { version: 1, .. })
        ));
        assert!(matches!(
            repo.push("svc", &version("db", 3, "x")),
            Err(RepoError::ServiceMismatch { .. })
        ));
        assert!(matches!(
            repo.list("a/b"),
            Err(RepoError::InvalidService { .. })
        ));
    }

    #[test]
    fn unreadable_files_are_skipped_and_repaired_by_a_push() {
        let dir = tempfile::tempdir().unwrap();
        let repo = DirectoryRepository::new(dir.path());
        repo.push("svc", &version("svc", 1, "one")).unwrap();
        std::fs::write(dir.path().join("svc/v2.json"), b"{\"version\": 2, \"trunc").unwrap();
        assert_eq!(repo.list("svc").unwrap(), vec![1]);
        assert_eq!(repo.pull_latest("svc").unwrap().unwrap().version, 1);

        repo.push("svc", &version("svc", 2, "two")).unwrap();
        assert_eq!(repo.list("svc").unwrap(), vec![1, 2]);
        assert_eq!(
            repo.pull_latest("svc").unwrap(),
            Some(version("svc", 2, "two"))
        );
    }
}
