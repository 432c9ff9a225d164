//! Coordination: who owns a service and who may promote which shadow.
//!
//! Every service has one owner record: the domain that serves it, the host that runs that
//! domain, and a generation that grows with every change. A promotion claims the record
//! (compare-and-swap on the generation it last saw) before the shadow is resumed; a claim that
//! loses means another promotion won, and the shadow stays paused. This is the seam several
//! hosts plug into (an etcd transaction on the record's revision, a lease per host, watches);
//! [`LocalCoordinator`] is the single-host implementation, where the daemon's own table is the
//! only claimant. [`HostCapacity`] says what this host can still hold; [`placement`] decides
//! on which hosts a service's shadows go.

mod capacity;
mod local;
pub mod placement;

pub use capacity::{HostCapacity, HOST_RESERVE_KIB};
pub use local::LocalCoordinator;
pub use placement::Placement;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Errors of the coordination backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// The record changed since the claimant read it: another promotion won.
    #[error("service '{service}' is owned by '{}' on host '{}' (generation {}); expected generation {expected}", current.domain, current.host, current.generation)]
    Conflict {
        /// The service.
        service: String,
        /// The generation the claimant expected.
        expected: u64,
        /// The record as it is.
        current: OwnerRecord,
    },
    /// The backend cannot be reached or did not answer in time; nothing was changed.
    #[error("coordination backend unavailable: {why}")]
    Unavailable {
        /// What failed.
        why: String,
    },
}

/// The identity of a host in the cluster (its name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub String);

impl HostId {
    /// This machine's host name, as the operating system reports it.
    pub fn local() -> Self {
        HostId(sysinfo::System::host_name().unwrap_or_else(|_| "localhost".into()))
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who serves a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The service.
    pub service: String,
    /// The domain serving it.
    pub domain: String,
    /// The host running that domain.
    pub host: HostId,
    /// Grows by one with every change of owner; a claim names the generation it saw.
    pub generation: u64,
}

/// A request to become a service's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The service.
    pub service: String,
    /// The domain that will serve it.
    pub domain: String,
    /// The generation the claimant last saw (0: no record yet).
    pub expected: u64,
}

/// The coordination seam. Calls may wait on a network round trip: they are async, and the
/// implementation bounds their time.
pub trait Coordinator: Send + Sync {
    /// This host.
    fn host(&self) -> &HostId;

    /// The owner record of `service`, if any.
    fn owner(&self, service: &str) -> BoxFuture<'_, Result<Option<OwnerRecord>, CoordError>>;

    /// Compare-and-swap: `claim.domain` on this host becomes the owner, provided the record's
    /// generation is still `claim.expected` (no record counts as 0). Returns the new record.
    fn claim(&self, claim: Claim) -> BoxFuture<'_, Result<OwnerRecord, CoordError>>;

    /// Records what was found at start (a primary running here) unless a record exists:
    /// returns the record in force, which may name another domain or host.
    fn adopt(&self, service: &str, domain: &str) -> BoxFuture<'_, Result<OwnerRecord, CoordError>>;

    /// Every change of owner from now on.
    fn watch(&self) -> tokio::sync::broadcast::Receiver<OwnerRecord>;
}
