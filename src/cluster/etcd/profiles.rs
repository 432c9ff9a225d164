//! The central profile repository in etcd: one key per version,
//! `<prefix>/profiles/<service>/v<20 digits>`, its value the same JSON as a version file.
//! Values read back are untrusted: bounded, parsed, and checked to be the version their key
//! names; an unreadable one is skipped (and replaced by the next push of that number), as the
//! directory repository does with files.
//!
//! [`ProfileRepository`] is synchronous (the profile manager runs it on a blocking thread), so
//! the repository runs its own connection on its own thread and runtime, and each call waits
//! for that thread's answer.

use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use futures::future::BoxFuture;

use super::codec::MAX_VALUE_BYTES;
use super::conn::{Conn, Endpoints};
use super::keys::{KeyOf, Keys};
use crate::cluster::CoordError;
use crate::profile::layout::{self, ProfileVersion};
use crate::profile::{ProfileRepository, RepoError};

type Job = Box<dyn for<'c> FnOnce(&'c Conn, &'c Keys) -> BoxFuture<'c, ()> + Send>;

/// Profile versions in etcd.
pub struct EtcdProfileRepository {
    jobs: mpsc::Sender<Job>,
    /// How long a caller waits for the repository thread (a few operation timeouts).
    bound: Duration,
    location: String,
}

impl std::fmt::Debug for EtcdProfileRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdProfileRepository")
            .field("location", &self.location)
            .finish()
    }
}

/// A version read from `key`: bounded, parsed, and the one the key names.
fn parse_version(
    key: &str,
    service: &str,
    version: u64,
    value: &[u8],
) -> Result<ProfileVersion, CoordError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(CoordError::TooLarge {
            key: key.to_string(),
            bytes: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    layout::parse(value, service, version).map_err(|e| CoordError::Malformed {
        key: key.to_string(),
        why: crate::error::report(&e),
    })
}

fn backend(service: &str) -> impl FnOnce(CoordError) -> RepoError + '_ {
    move |source| RepoError::Backend {
        service: service.to_string(),
        source: Box::new(source),
    }
}

impl EtcdProfileRepository {
    /// A repository under `prefix` on `endpoints`; its thread starts now, its connection on
    /// first use.
    pub fn new(endpoints: Endpoints, prefix: &str) -> Result<Self, CoordError> {
        let keys = Keys::new(prefix)?;
        let location = format!("etcd {} under {}", endpoints.urls.join(","), keys.root());
        let bound = endpoints.op_timeout * 4 + endpoints.connect_timeout;
        let (jobs, rx) = mpsc::channel::<Job>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CoordError::Unavailable {
                op: "start the profile repository's runtime".into(),
                source: std::sync::Arc::new(e),
            })?;
        std::thread::Builder::new()
            .name("profile-repo-etcd".into())
            .spawn(move || {
                let conn = Conn::new(endpoints);
                while let Ok(job) = rx.recv() {
                    rt.block_on(job(&conn, &keys));
                }
            })
            .map_err(|e| CoordError::Unavailable {
                op: "start the profile repository's thread".into(),
                source: std::sync::Arc::new(e),
            })?;
        Ok(EtcdProfileRepository {
            jobs,
            bound,
            location,
        })
    }

    /// Runs `f` on the repository's thread and waits for its answer.
    fn call<T: Send + 'static>(
        &self,
        op: &str,
        f: impl for<'c> FnOnce(&'c Conn, &'c Keys) -> BoxFuture<'c, Result<T, CoordError>>
            + Send
            + 'static,
    ) -> Result<T, CoordError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn, keys| {
            Box::pin(async move {
                let _ = tx.send(f(conn, keys).await);
            })
        });
        let gone = || CoordError::Unavailable {
            op: op.to_string(),
            source: std::sync::Arc::new(std::io::Error::other(
                "the profile repository's thread has stopped",
            )),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        match rx.recv_timeout(self.bound) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(CoordError::Timeout {
                op: op.to_string(),
                after: self.bound,
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

/// The versions of `service` present, as (number, key), highest first.
async fn numbers(
    conn: &Conn,
    keys: &Keys,
    service: &str,
) -> Result<Vec<(u64, String)>, CoordError> {
    let prefix = keys.profiles_of(service)?;
    let p = &prefix;
    let mut r = conn
        .run(format!("list {prefix}"), |mut c| async move {
            c.get(
                p.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_sort(SortTarget::Key, SortOrder::Descend),
                ),
            )
            .await
        })
        .await?;
    Ok(r.take_kvs()
        .into_iter()
        .filter_map(|kv| match keys.parse(kv.key()) {
            Some(KeyOf::Profile {
                service: s,
                version,
            }) if s == service => Some((version, String::from_utf8_lossy(kv.key()).into_owned())),
            _ => None,
        })
        .collect())
}

async fn read(conn: &Conn, key: &str) -> Result<Option<(Vec<u8>, i64)>, CoordError> {
    let mut r = conn
        .run(format!("get {key}"), |mut c| async move {
            c.get(key, None).await
        })
        .await?;
    Ok(r.take_kvs()
        .into_iter()
        .next()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
}

/// What a push did.
enum Pushed {
    Stored,
    Exists,
}

async fn push(conn: &Conn, keys: &Keys, v: ProfileVersion) -> Result<Pushed, CoordError> {
    let key = keys.profile(&v.service, v.version)?;
    let bytes = serde_json::to_vec(&v).map_err(|e| CoordError::Malformed {
        key: key.clone(),
        why: format!("cannot serialise: {e}"),
    })?;
    // Written only where nothing is, or over an unreadable value seen at `rev`.
    let mut replace_rev = None;
    for _ in 0..3 {
        let cond = match replace_rev {
            None => Compare::version(key.as_str(), CompareOp::Equal, 0),
            Some(rev) => Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
        };
        let txn = Txn::new()
            .when([cond])
            .and_then([TxnOp::put(key.as_str(), bytes.clone(), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = conn
            .run(format!("push {key}"), |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if r.succeeded() {
            return Ok(Pushed::Stored);
        }
        let existing = r.op_responses().into_iter().find_map(|o| match o {
            TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
            _ => None,
        });
        let Some(kv) = existing else { continue };
        match parse_version(&key, &v.service, v.version, kv.value()) {
            Ok(e) if e == v => return Ok(Pushed::Stored),
            Ok(_) => return Ok(Pushed::Exists),
            Err(e) => {
                tracing::warn!(error = %e, "replacing an unusable profile version in etcd");
                replace_rev = Some(kv.mod_revision());
            }
        }
    }
    Err(CoordError::Malformed {
        key,
        why: "an unusable value was written there again during each attempt to replace it".into(),
    })
}

impl ProfileRepository for EtcdProfileRepository {
    fn push(&self, service: &str, v: &ProfileVersion) -> Result<(), RepoError> {
        check(service)?;
        if v.service != service {
            return Err(RepoError::ServiceMismatch {
                expected: service.to_string(),
                found: v.service.clone(),
            });
        }
        let version = v.clone();
        match self
            .call("push profile version", move |conn, keys| {
                Box::pin(push(conn, keys, version))
            })
            .map_err(backend(service))?
        {
            Pushed::Stored => Ok(()),
            Pushed::Exists => Err(RepoError::VersionExists {
                service: service.to_string(),
                version: v.version,
            }),
        }
    }

    fn pull_latest(&self, service: &str) -> Result<Option<ProfileVersion>, RepoError> {
        check(service)?;
        let s = service.to_string();
        self.call("pull latest profile version", move |conn, keys| {
            Box::pin(async move {
                for (n, key) in numbers(conn, keys, &s).await? {
                    let Some((value, _)) = read(conn, &key).await? else {
                        continue;
                    };
                    match parse_version(&key, &s, n, &value) {
                        Ok(v) => return Ok(Some(v)),
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping unusable version in repository")
                        }
                    }
                }
                Ok(None)
            })
        })
        .map_err(backend(service))
    }

    fn list(&self, service: &str) -> Result<Vec<u64>, RepoError> {
        check(service)?;
        let s = service.to_string();
        self.call("list profile versions", move |conn, keys| {
            Box::pin(async move {
                let prefix = keys.profiles_of(&s)?;
                let p = &prefix;
                let mut r = conn
                    .run(format!("list {prefix}"), |mut c| async move {
                        c.get(p.as_str(), Some(GetOptions::new().with_prefix()))
                            .await
                    })
                    .await?;
                let mut out = Vec::new();
                for kv in r.take_kvs() {
                    let Some(KeyOf::Profile { service, version }) = keys.parse(kv.key()) else {
                        continue;
                    };
                    let key = String::from_utf8_lossy(kv.key());
                    match parse_version(&key, &service, version, kv.value()) {
                        Ok(_) => out.push(version),
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping unusable version in repository")
                        }
                    }
                }
                out.sort_unstable();
                Ok(out)
            })
        })
        .map_err(backend(service))
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

fn check(service: &str) -> Result<(), RepoError> {
    layout::check_service(service).map_err(|reason| RepoError::InvalidService {
        name: service.to_string(),
        reason,
    })
}
