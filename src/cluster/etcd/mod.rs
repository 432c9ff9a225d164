//! The coordinator of several hosts: every record in etcd (layout in [`keys`]), values JSON
//! and read back as untrusted ([`codec`]), owner changes by transaction on the record's
//! revision, this host's liveness and shadows under its lease ([`lease`], renewed by our own
//! loop), and one watch turning changes into [`ClusterEvent`]s ([`watch`]).
//!
//! Every call is bounded by the operation timeout; a call that fails resets the connection,
//! and the next one connects again to whichever endpoint answers ([`conn`]).

pub mod codec;
mod conn;
pub mod keys;
mod lease;
mod profiles;
mod watch;

pub use conn::Endpoints;
pub use profiles::EtcdProfileRepository;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{broadcast, watch as tokio_watch};
use tokio::task::JoinHandle;

use self::codec::DrainFlag;
use self::conn::Conn;
use self::keys::{KeyOf, Keys};
use self::lease::Lease;
use super::{
    check_name, Claim, ClusterEvent, CoordError, CoordFuture, Coordinator, FailureReport,
    HostFacts, HostId, HostInfo, HostState, LeaseStatus, OwnerRecord, PrimarySpec, ShadowRecord,
};

/// How to reach etcd and what to keep there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// The members and the timeouts.
    pub endpoints: Endpoints,
    /// This host.
    pub host: HostId,
    /// Every key lives under this prefix (`/understudy/<cluster>`).
    pub prefix: String,
    /// The lease's time to live (whole seconds; etcd may grant more).
    pub lease_ttl: Duration,
    /// How often a keepalive is sent.
    pub keepalive_every: Duration,
}

/// Owner records, membership and everything else of [`Coordinator`] in etcd.
pub struct EtcdCoordinator {
    host: HostId,
    keys: Keys,
    conn: Arc<Conn>,
    lease: Arc<Lease>,
    changes: broadcast::Sender<ClusterEvent>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for EtcdCoordinator {
    /// Stops renewing the lease and watching; the lease is not revoked, so the host's keys
    /// stay until it expires (a restarted daemon takes over before others notice).
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The key-values of a range read, in key order.
fn kvs(r: &TxnOpResponse) -> &[etcd_client::KeyValue] {
    match r {
        TxnOpResponse::Get(g) => g.kvs(),
        _ => &[],
    }
}

impl EtcdCoordinator {
    /// Starts renewing this host's lease and watching the cluster, in the current tokio
    /// runtime. Returns at once: etcd need not be reachable yet (the mode says when it is).
    pub fn start(settings: EtcdSettings) -> Result<Self, CoordError> {
        check_name("host", &settings.host.0)?;
        let keys = Keys::new(&settings.prefix)?;
        let conn = Arc::new(Conn::new(settings.endpoints));
        let lease = Arc::new(Lease::new(settings.lease_ttl, settings.keepalive_every));
        let changes = broadcast::channel(1024).0;
        let tasks = vec![
            tokio::spawn({
                let (lease, conn) = (lease.clone(), conn.clone());
                async move { lease.keep(&conn).await }
            }),
            tokio::spawn({
                let (keys, conn, tx) = (keys.clone(), conn.clone(), changes.clone());
                async move { watch::follow(keys, &conn, tx).await }
            }),
        ];
        Ok(EtcdCoordinator {
            host: settings.host,
            keys,
            conn,
            lease,
            changes,
            tasks,
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn get_one(&self, key: String) -> Result<Option<etcd_client::KeyValue>, CoordError> {
        let k = &key;
        let mut r = self
            .conn
            .run(format!("get {key}"), |mut c| async move {
                c.get(k.as_str(), None).await
            })
            .await?;
        Ok(r.take_kvs().into_iter().next())
    }

    async fn get_prefix(&self, prefix: String) -> Result<Vec<etcd_client::KeyValue>, CoordError> {
        let p = &prefix;
        let mut r = self
            .conn
            .run(format!("list {prefix}"), |mut c| async move {
                c.get(p.as_str(), Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        Ok(r.take_kvs())
    }

    async fn put(&self, key: String, value: Vec<u8>) -> Result<(), CoordError> {
        let (k, v) = (&key, &value);
        self.conn
            .run(format!("put {key}"), |mut c| async move {
                c.put(k.as_str(), v.clone(), None).await.map(drop)
            })
            .await
    }

    async fn delete(&self, key: String) -> Result<(), CoordError> {
        let k = &key;
        self.conn
            .run(format!("delete {key}"), |mut c| async move {
                c.delete(k.as_str(), None).await.map(drop)
            })
            .await
    }

    async fn txn(&self, op: String, txn: Txn) -> Result<etcd_client::TxnResponse, CoordError> {
        let t = &txn;
        self.conn
            .run(op, |mut c| async move { c.txn(t.clone()).await })
            .await
    }

    /// The owner record of `service` with its key's mod revision.
    async fn owner_at(&self, service: &str) -> Result<Option<(OwnerRecord, i64)>, CoordError> {
        let key = self.keys.owner(service)?;
        match self.get_one(key.clone()).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((
                codec::owner(&key, service, kv.value())?,
                kv.mod_revision(),
            ))),
        }
    }

    async fn claim_now(&self, claim: Claim) -> Result<OwnerRecord, CoordError> {
        check_name("domain", &claim.domain)?;
        let key = self.keys.owner(&claim.service)?;
        let current = self.owner_at(&claim.service).await?;
        let (compare, generation) = match current {
            None if claim.expected == 0 => (Compare::version(key.as_str(), CompareOp::Equal, 0), 1),
            None => {
                return Err(CoordError::NoRecord {
                    service: claim.service,
                    expected: claim.expected,
                })
            }
            Some((cur, _)) if cur.generation != claim.expected => {
                return Err(CoordError::Conflict {
                    service: claim.service,
                    expected: claim.expected,
                    current: cur,
                })
            }
            Some((cur, rev)) => (
                Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
                cur.generation + 1,
            ),
        };
        let record = OwnerRecord {
            service: claim.service.clone(),
            domain: claim.domain,
            host: self.host.clone(),
            generation,
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key.as_str(), codec::encode(&record), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.txn(format!("claim {}", claim.service), txn).await?;
        if r.succeeded() {
            return Ok(record);
        }
        // Someone else's transaction landed between our read and ours; or ours did, on an
        // attempt whose answer was lost and that the connection made again.
        let responses = r.op_responses();
        match responses.first().and_then(|g| kvs(g).first()) {
            Some(kv) => match codec::owner(&key, &claim.service, kv.value())? {
                current if current == record => Ok(record),
                current => Err(CoordError::Conflict {
                    service: claim.service.clone(),
                    expected: claim.expected,
                    current,
                }),
            },
            None => Err(CoordError::NoRecord {
                service: claim.service,
                expected: claim.expected,
            }),
        }
    }

    async fn adopt_now(&self, service: &str, domain: &str) -> Result<OwnerRecord, CoordError> {
        check_name("domain", domain)?;
        let key = self.keys.owner(service)?;
        let record = OwnerRecord {
            service: service.to_string(),
            domain: domain.to_string(),
            host: self.host.clone(),
            generation: 1,
        };
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), codec::encode(&record), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.txn(format!("adopt {service}"), txn).await?;
        if r.succeeded() {
            return Ok(record);
        }
        let responses = r.op_responses();
        match responses.first().and_then(|g| kvs(g).first()) {
            Some(kv) => codec::owner(&key, service, kv.value()),
            // Removed between the compare and the read: cannot happen inside one txn.
            None => Err(CoordError::NoRecord {
                service: service.to_string(),
                expected: 0,
            }),
        }
    }

    async fn release_now(&self, service: &str, expected: u64) -> Result<(), CoordError> {
        let key = self.keys.owner(service)?;
        let Some((cur, rev)) = self.owner_at(service).await? else {
            return Err(CoordError::NoRecord {
                service: service.to_string(),
                expected,
            });
        };
        if cur.generation != expected {
            return Err(CoordError::Conflict {
                service: service.to_string(),
                expected,
                current: cur,
            });
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(key.as_str(), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.txn(format!("release {service}"), txn).await?;
        if r.succeeded() {
            return Ok(());
        }
        let responses = r.op_responses();
        match responses.first().and_then(|g| kvs(g).first()) {
            Some(kv) => Err(CoordError::Conflict {
                service: service.to_string(),
                expected,
                current: codec::owner(&key, service, kv.value())?,
            }),
            None => Err(CoordError::NoRecord {
                service: service.to_string(),
                expected,
            }),
        }
    }

    async fn register_now(&self, mut facts: HostFacts) -> Result<(), CoordError> {
        facts.host = self.host.clone();
        let value = codec::encode(&facts);
        self.put(self.keys.host(&self.host)?, value.clone()).await?;
        self.lease
            .hold(&self.conn, self.keys.alive(&self.host)?, value)
            .await
    }

    async fn hosts_now(&self) -> Result<Vec<HostInfo>, CoordError> {
        let get =
            |kind: &str| TxnOp::get(self.keys.kind(kind), Some(GetOptions::new().with_prefix()));
        // One transaction: a consistent view of facts, liveness and drain flags.
        let r = self
            .txn(
                "list hosts".into(),
                Txn::new().and_then([get("hosts"), get("alive"), get("drain")]),
            )
            .await?;
        let responses = r.op_responses();
        let [facts, alive, drain] = [0, 1, 2].map(|i| responses.get(i).map(kvs).unwrap_or(&[]));
        let host_of = |kv: &etcd_client::KeyValue| match self.keys.parse(kv.key()) {
            Some(KeyOf::Host(h) | KeyOf::Alive(h) | KeyOf::Drain(h)) => Some(h),
            _ => None,
        };
        let alive: Vec<HostId> = alive.iter().filter_map(host_of).collect();
        let mut draining = Vec::new();
        for kv in drain {
            let Some(h) = host_of(kv) else { continue };
            codec::drain(&String::from_utf8_lossy(kv.key()), &h, kv.value())?;
            draining.push(h);
        }
        let mut out = Vec::new();
        for kv in facts {
            let Some(h) = host_of(kv) else { continue };
            let f = codec::facts(&String::from_utf8_lossy(kv.key()), &h, kv.value())?;
            out.push(HostInfo {
                alive: alive.contains(&h),
                state: if draining.contains(&h) {
                    HostState::Draining
                } else {
                    HostState::Active
                },
                facts: f,
            });
        }
        Ok(out)
    }

    async fn set_drain_now(&self, host: &HostId, draining: bool) -> Result<(), CoordError> {
        let key = self.keys.drain(host)?;
        if draining {
            let flag = DrainFlag {
                host: host.clone(),
                by: self.host.clone(),
                since_unix_ms: crate::clock::now_unix_ms(),
            };
            self.put(key, codec::encode(&flag)).await
        } else {
            self.delete(key).await
        }
    }

    /// Every record of one kind, each parsed by `parse` (key, what the key names, value).
    async fn list<T>(
        &self,
        kind: &str,
        parse: impl Fn(&str, KeyOf, &[u8]) -> Option<Result<T, CoordError>>,
    ) -> Result<Vec<T>, CoordError> {
        let mut out = Vec::new();
        for kv in self.get_prefix(self.keys.kind(kind)).await? {
            let Some(of) = self.keys.parse(kv.key()) else {
                continue;
            };
            if let Some(r) = parse(&String::from_utf8_lossy(kv.key()), of, kv.value()) {
                out.push(r?);
            }
        }
        Ok(out)
    }
}

impl Coordinator for EtcdCoordinator {
    fn host(&self) -> &HostId {
        &self.host
    }

    fn lease(&self) -> tokio_watch::Receiver<LeaseStatus> {
        self.lease.subscribe()
    }

    fn register(&self, facts: HostFacts) -> CoordFuture<'_, ()> {
        Box::pin(self.register_now(facts))
    }

    fn hosts(&self) -> CoordFuture<'_, Vec<HostInfo>> {
        Box::pin(self.hosts_now())
    }

    fn set_drain(&self, host: &HostId, draining: bool) -> CoordFuture<'_, ()> {
        let host = host.clone();
        Box::pin(async move { self.set_drain_now(&host, draining).await })
    }

    fn owner(&self, service: &str) -> CoordFuture<'_, Option<OwnerRecord>> {
        let service = service.to_string();
        Box::pin(async move { Ok(self.owner_at(&service).await?.map(|(r, _)| r)) })
    }

    fn owners(&self) -> CoordFuture<'_, Vec<OwnerRecord>> {
        Box::pin(self.list("owners", |key, of, v| match of {
            KeyOf::Owner(s) => Some(codec::owner(key, &s, v)),
            _ => None,
        }))
    }

    fn claim(&self, claim: Claim) -> CoordFuture<'_, OwnerRecord> {
        Box::pin(self.claim_now(claim))
    }

    fn adopt(&self, service: &str, domain: &str) -> CoordFuture<'_, OwnerRecord> {
        let (service, domain) = (service.to_string(), domain.to_string());
        Box::pin(async move { self.adopt_now(&service, &domain).await })
    }

    fn release(&self, service: &str, expected: u64) -> CoordFuture<'_, ()> {
        let service = service.to_string();
        Box::pin(async move { self.release_now(&service, expected).await })
    }

    fn publish_spec(&self, mut spec: PrimarySpec) -> CoordFuture<'_, ()> {
        Box::pin(async move {
            check_name("domain", &spec.domain)?;
            spec.host = self.host.clone();
            self.put(self.keys.spec(&spec.service)?, codec::encode(&spec))
                .await
        })
    }

    fn spec(&self, service: &str) -> CoordFuture<'_, Option<PrimarySpec>> {
        let service = service.to_string();
        Box::pin(async move {
            let key = self.keys.spec(&service)?;
            match self.get_one(key.clone()).await? {
                None => Ok(None),
                Some(kv) => codec::spec(&key, &service, kv.value()).map(Some),
            }
        })
    }

    fn specs(&self) -> CoordFuture<'_, Vec<PrimarySpec>> {
        Box::pin(self.list("specs", |key, of, v| match of {
            KeyOf::Spec(s) => Some(codec::spec(key, &s, v)),
            _ => None,
        }))
    }

    fn withdraw_spec(&self, service: &str) -> CoordFuture<'_, ()> {
        let key = self.keys.spec(service);
        Box::pin(async move { self.delete(key?).await })
    }

    fn register_shadow(&self, mut shadow: ShadowRecord) -> CoordFuture<'_, ()> {
        Box::pin(async move {
            shadow.host = self.host.clone();
            let key = self
                .keys
                .shadow(&shadow.service, &self.host, &shadow.shadow)?;
            self.lease
                .hold(&self.conn, key, codec::encode(&shadow))
                .await
        })
    }

    fn unregister_shadow(&self, service: &str, shadow: &str) -> CoordFuture<'_, ()> {
        let key = self.keys.shadow(service, &self.host, shadow);
        Box::pin(async move { self.lease.drop_key(&self.conn, key?).await })
    }

    fn shadows(&self) -> CoordFuture<'_, Vec<ShadowRecord>> {
        Box::pin(self.list("shadows", |key, of, v| match of {
            KeyOf::Shadow {
                service,
                host,
                shadow,
            } => Some(codec::shadow(key, (&service, &host, &shadow), v)),
            _ => None,
        }))
    }

    fn report_failure(&self, mut report: FailureReport) -> CoordFuture<'_, ()> {
        Box::pin(async move {
            report.host = self.host.clone();
            self.put(self.keys.failure(&report.service)?, codec::encode(&report))
                .await
        })
    }

    fn failures(&self) -> CoordFuture<'_, Vec<FailureReport>> {
        Box::pin(self.list("failures", |key, of, v| match of {
            KeyOf::Failure(s) => Some(codec::failure(key, &s, v)),
            _ => None,
        }))
    }

    fn clear_failure(&self, service: &str) -> CoordFuture<'_, ()> {
        let key = self.keys.failure(service);
        Box::pin(async move { self.delete(key?).await })
    }

    fn watch(&self) -> broadcast::Receiver<ClusterEvent> {
        self.changes.subscribe()
    }
}
