//! Coordination: who owns a service, which hosts exist, and what they tell each other.
//!
//! Every service has one owner record: the domain that serves it, the host that runs that
//! domain, and a generation that grows with every change. A promotion claims the record
//! (compare-and-swap on the generation it last saw) before the shadow is resumed; a claim that
//! loses means another promotion won, and the shadow stays paused.
//!
//! Besides owners, the [`Coordinator`] carries what several hosts share:
//! - **membership**: each host registers its [`HostFacts`] (libvirt URI, capacity) and is
//!   alive while its lease is renewed; [`Coordinator::hosts`] lists hosts alive or lost;
//! - **drain flags**, set by any host for any host ([`Coordinator::set_drain`]);
//! - **primary specs**: a primary's host publishes each protected primary's domain XML and
//!   class ([`PrimarySpec`]) so a shadow's host on another machine can provision from it;
//! - **shadow registrations**: which shadows of which service run on which host
//!   ([`ShadowRecord`]; they vanish with their host's lease);
//! - **failure reports**: the primary's host records that a primary died ([`FailureReport`])
//!   for a shadow's host to act on;
//! - **events** ([`ClusterEvent`]) for every change of the above, and the state of this
//!   host's lease ([`LeaseStatus`]: connected or not, and when the last acknowledged keepalive
//!   was sent, which self-fencing is timed from).
//!
//! [`LocalCoordinator`] is the single-host implementation (everything in memory, the daemon's
//! own table the only claimant); [`EtcdCoordinator`] keeps it all in etcd. [`HostCapacity`]
//! says what a host can still hold; [`placement`] decides on which hosts a service's shadows
//! go. [`liveness`] holds the direct heartbeats between daemons and the rules for a lost host
//! and for self-fencing; [`reach`] the class probes of other hosts' primaries and the rule for
//! a host cut off from the switch; [`fence`] runs a host's fence agent; [`watchdog`] arms a watchdog
//! device.

mod capacity;
pub mod etcd;
pub mod fence;
pub mod liveness;
mod local;
pub mod placement;
pub mod reach;
mod records;
pub mod watchdog;

pub use capacity::{HostCapacity, HOST_RESERVE_KIB};
pub use etcd::{EtcdCoordinator, EtcdProfileRepository, EtcdSettings};
pub use local::LocalCoordinator;
pub use placement::Placement;
pub use records::{
    check_name, ClusterEvent, FailureReport, HostFacts, HostInfo, HostState, LeaseStatus, Mode,
    OwnerRecord, PrimarySpec, ShadowRecord, ShadowStatus,
};

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

/// Errors of the coordination backend.
#[derive(Debug, thiserror::Error)]
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
    /// A conditional change found no record where it expected one (e.g. releasing an owner
    /// record that another host already removed).
    #[error("service '{service}' has no owner record; expected generation {expected}")]
    NoRecord {
        /// The service.
        service: String,
        /// The generation the caller expected.
        expected: u64,
    },
    /// The backend cannot be reached or refused the call; nothing is known to have changed.
    #[error("coordination backend unavailable during {op}")]
    Unavailable {
        /// The operation (e.g. `claim web`).
        op: String,
        /// The backend's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The backend did not answer in time. A change may or may not have been applied: read
    /// the record again before acting on it.
    #[error("coordination backend did not answer {op} within {after:?}")]
    Timeout {
        /// The operation.
        op: String,
        /// The bound it exceeded.
        after: Duration,
    },
    /// A value read from the backend is not what understudy writes there (another program,
    /// an older version, corruption). Values from the backend are untrusted.
    #[error("malformed value at key '{key}': {why}")]
    Malformed {
        /// The key holding it.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// A value read from the backend is larger than any value understudy writes there.
    #[error("value at key '{key}' is {bytes} bytes; at most {limit} are accepted")]
    TooLarge {
        /// The key holding it.
        key: String,
        /// Its size.
        bytes: usize,
        /// The bound.
        limit: usize,
    },
    /// A host, service or domain name cannot be part of a key (empty, too long, `/` or a
    /// control character in it).
    #[error("invalid {what} name {name:?}: {why}")]
    InvalidName {
        /// What the name is of (`host`, `service`, `domain`).
        what: &'static str,
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// This host has no lease (it has not registered, or its lease expired and was not yet
    /// granted again): leased records cannot be written.
    #[error("this host holds no lease: {why}")]
    NoLease {
        /// Why.
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

/// What a coordinator call returns: it may wait on a network round trip, and the
/// implementation bounds its time ([`CoordError::Timeout`]).
pub type CoordFuture<'a, T> = BoxFuture<'a, Result<T, CoordError>>;

/// The coordination seam. Names (host, service, domain) must pass [`check_name`].
///
/// Records this host writes carry its name: a record's `host` field given by the caller is
/// replaced with [`Coordinator::host`] (the one exception is [`Coordinator::give_back`]).
pub trait Coordinator: Send + Sync {
    /// This host.
    fn host(&self) -> &HostId;

    /// This host's lease: connected or not, and when the last acknowledged keepalive was sent.
    /// Changes are signalled on the receiver.
    fn lease(&self) -> watch::Receiver<LeaseStatus>;

    // --- membership ---

    /// Registers (or updates) this host's facts. The host counts as alive while its lease is
    /// renewed; the facts stay readable after it is lost.
    fn register(&self, facts: HostFacts) -> CoordFuture<'_, ()>;

    /// Every host that ever registered, alive or lost, with its drain state; by name.
    fn hosts(&self) -> CoordFuture<'_, Vec<HostInfo>>;

    /// Sets or clears the drain flag of `host` (any host may drain any host). A draining host
    /// gets no new shadows and its primaries move away.
    fn set_drain(&self, host: &HostId, draining: bool) -> CoordFuture<'_, ()>;

    // --- owners ---

    /// The owner record of `service`, if any.
    fn owner(&self, service: &str) -> CoordFuture<'_, Option<OwnerRecord>>;

    /// Every owner record, by service.
    fn owners(&self) -> CoordFuture<'_, Vec<OwnerRecord>>;

    /// Compare-and-swap: `claim.domain` on this host becomes the owner, provided the record's
    /// generation is still `claim.expected` (no record counts as 0). Returns the new record.
    fn claim(&self, claim: Claim) -> CoordFuture<'_, OwnerRecord>;

    /// Undoes this host's own claim: `claim.domain` on host `to` (the owner before the claim,
    /// which may be another host) becomes the owner again, provided the record's generation is
    /// still `claim.expected`; the generation grows as with any change. The one record this
    /// host writes that may name another host: a promotion here of a primary from host `to`
    /// that failed past its claim gives the service back to that primary, so that the record
    /// names where it ran and a retry can claim it from there. Returns the new record.
    fn give_back(&self, claim: Claim, to: &HostId) -> CoordFuture<'_, OwnerRecord>;

    /// Records what was found at start (a primary running here) unless a record exists:
    /// returns the record in force, which may name another domain or host.
    fn adopt(&self, service: &str, domain: &str) -> CoordFuture<'_, OwnerRecord>;

    /// Removes the owner record of `service` if its generation is still `expected` (the
    /// service is no longer protected).
    fn release(&self, service: &str, expected: u64) -> CoordFuture<'_, ()>;

    // --- primary specs ---

    /// Publishes (or replaces) the spec of a primary running on this host.
    fn publish_spec(&self, spec: PrimarySpec) -> CoordFuture<'_, ()>;

    /// The published spec of `service`, if any.
    fn spec(&self, service: &str) -> CoordFuture<'_, Option<PrimarySpec>>;

    /// Every published spec, by service.
    fn specs(&self) -> CoordFuture<'_, Vec<PrimarySpec>>;

    /// Withdraws the spec of `service` (no longer protected, or no longer on this host).
    fn withdraw_spec(&self, service: &str) -> CoordFuture<'_, ()>;

    // --- shadow registrations (leased: they vanish when this host's lease expires) ---

    /// Registers (or updates) a shadow running on this host.
    fn register_shadow(&self, shadow: ShadowRecord) -> CoordFuture<'_, ()>;

    /// Removes this host's registration of `shadow` of `service`.
    fn unregister_shadow(&self, service: &str, shadow: &str) -> CoordFuture<'_, ()>;

    /// Every registered shadow on every host, by service, host and name.
    fn shadows(&self) -> CoordFuture<'_, Vec<ShadowRecord>>;

    // --- failure reports ---

    /// Records that a primary on this host died (one report per service; a newer one
    /// replaces it).
    fn report_failure(&self, report: FailureReport) -> CoordFuture<'_, ()>;

    /// Every standing failure report, by service.
    fn failures(&self) -> CoordFuture<'_, Vec<FailureReport>>;

    /// Removes the failure report of `service` (acted on).
    fn clear_failure(&self, service: &str) -> CoordFuture<'_, ()>;

    // --- changes ---

    /// Every change from now on, of any host. Events are hints to re-read, in order: after
    /// [`ClusterEvent::Resync`] (the backend lost part of its history) or a `Lagged` error
    /// (this receiver fell behind), re-read what you rely on.
    fn watch(&self) -> broadcast::Receiver<ClusterEvent>;
}
