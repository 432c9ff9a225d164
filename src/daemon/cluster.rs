//! This host in the cluster: the coordinator the configuration asks for (etcd with a
//! `[cluster]` table, this host alone without), the host's registration, what it publishes
//! (its shadows; with `[cluster]`, its primaries' specs), and the `hosts` request.
//!
//! Publishing is state-based: every [`PUBLISH_EVERY`] the table is compared with what was last
//! written, and only the differences are written, so a write that failed while etcd was out of
//! reach is simply made again on a later round. A primary's definition is read again every
//! [`SPEC_EVERY`] and published when it changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::protocol::{HostEntry, HostPrimary, HostShadow, HostsReport};
use crate::cluster::etcd::Endpoints;
use crate::cluster::{
    CoordError, Coordinator, EtcdCoordinator, EtcdProfileRepository, EtcdSettings, HostFacts,
    HostId, LocalCoordinator, Mode, PrimarySpec, ShadowRecord, ShadowStatus,
};
use crate::config::{ClusterConfig, Config, RepositoryBackend};
use crate::failover::record::ShadowState;
use crate::profile::{DirectoryRepository, ProfileRepository};

use super::Shared;

/// How often the table is compared with what was published.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// How often this host's facts (capacity) are written again.
const FACTS_EVERY: Duration = Duration::from_secs(30);
/// How often a primary's definition is read again to see whether it changed.
const SPEC_EVERY: Duration = Duration::from_secs(60);

/// The etcd endpoints and timeouts of `[cluster]`.
pub fn endpoints(c: &ClusterConfig) -> Endpoints {
    Endpoints {
        urls: c.endpoints.clone(),
        connect_timeout: c.connect_timeout(),
        op_timeout: c.op_timeout(),
    }
}

/// This host's name: `[cluster] host`, or the operating system's.
pub fn host_of(cfg: &Config) -> HostId {
    cfg.cluster
        .as_ref()
        .and_then(|c| c.host.clone())
        .map_or_else(HostId::local, HostId)
}

/// The coordinator for `cfg`: etcd with `[cluster]`, this host alone without.
pub fn coordinator(cfg: &Config) -> Result<Arc<dyn Coordinator>, CoordError> {
    let host = host_of(cfg);
    match &cfg.cluster {
        None => Ok(Arc::new(LocalCoordinator::new(host))),
        Some(c) => Ok(Arc::new(EtcdCoordinator::start(EtcdSettings {
            endpoints: endpoints(c),
            host,
            prefix: c.key_prefix.clone(),
            lease_ttl: c.lease_ttl(),
            keepalive_every: c.keepalive_interval(),
        })?)),
    }
}

/// The central profile repository `cfg` names.
pub fn profile_repository(cfg: &Config) -> Result<Arc<dyn ProfileRepository>, CoordError> {
    match (&cfg.cluster, cfg.profile.repository_backend) {
        (Some(c), RepositoryBackend::Etcd) => Ok(Arc::new(EtcdProfileRepository::new(
            endpoints(c),
            &c.key_prefix,
        )?)),
        // Validation refuses etcd without [cluster].
        _ => Ok(Arc::new(DirectoryRepository::new(&cfg.profile.repository))),
    }
}

/// A published spec: its primary, generation and XML, and when libvirt was last read.
struct SpecMark {
    domain: String,
    generation: u64,
    xml: String,
    read_at: Instant,
}

/// What was last written, so that only changes are written again.
#[derive(Default)]
struct Published {
    facts_at: Option<Instant>,
    /// (service, shadow) → status.
    shadows: BTreeMap<(String, String), ShadowStatus>,
    /// service → what was published and when it was last compared with libvirt.
    specs: BTreeMap<String, SpecMark>,
}

/// Starts registering this host and publishing what runs on it, and exports the mode.
pub(super) fn start(d: &Shared) {
    let (mut lease, metrics) = (d.coord.lease(), d.metrics.clone());
    tokio::spawn(async move {
        loop {
            let mode = lease.borrow_and_update().mode;
            metrics.set_cluster_mode(mode);
            if lease.changed().await.is_err() {
                return;
            }
        }
    });
    let d = d.clone();
    tokio::spawn(async move {
        let mut published = Published::default();
        let mut every = tokio::time::interval(PUBLISH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            every.tick().await;
            let result = publish(&d, &mut published).await;
            // Reported once per kind of failure, not every round while etcd is away.
            match result {
                Ok(()) if last_error.is_some() => {
                    tracing::info!("cluster records published again");
                    last_error = None;
                }
                Ok(()) => {}
                Err(e) => {
                    let why = crate::error::report(&e);
                    if last_error.as_deref() != Some(why.as_str()) {
                        tracing::warn!(error = %why, "cluster records not published; retrying");
                        last_error = Some(why);
                    }
                }
            }
        }
    });
}

/// One round: facts when due, then shadows and specs that changed.
async fn publish(d: &Shared, p: &mut Published) -> Result<(), CoordError> {
    let cfg = d.cfg();
    let coord = d.coord.as_ref();
    if p.facts_at.is_none_or(|t| t.elapsed() >= FACTS_EVERY) {
        let uri = cfg
            .cluster
            .as_ref()
            .and_then(|c| c.libvirt_uri.clone())
            .unwrap_or_else(|| cfg.daemon.libvirt_uri.clone());
        let mut facts = HostFacts::now(coord.host().clone(), &uri, d.started_unix_ms);
        let reserved_kib = cfg
            .cluster
            .as_ref()
            .map_or(0, |c| c.reserved_memory_mib.saturating_mul(1024));
        facts.capacity = facts.capacity.map(|c| c.reserving(reserved_kib));
        match coord.register(facts).await {
            // Written as soon as the lease is granted.
            Ok(()) | Err(CoordError::NoLease { .. }) => p.facts_at = Some(Instant::now()),
            Err(e) => return Err(e),
        }
    }

    let services: Vec<_> = d.table().iter().cloned().collect();
    let mut now: BTreeMap<(String, String), ShadowStatus> = BTreeMap::new();
    for s in &services {
        for x in &s.shadows {
            let status = match x.state {
                ShadowState::Standby(_) => ShadowStatus::Ready,
                // Between tiers it cannot be promoted until it is there.
                ShadowState::Booting | ShadowState::Switching(_) => ShadowStatus::Provisioning,
                // Being promoted, or failed: not a shadow anyone can count on.
                ShadowState::Promoting | ShadowState::Failed => continue,
            };
            now.insert((s.name.clone(), x.name.clone()), status);
        }
    }
    let gone: Vec<_> = p
        .shadows
        .keys()
        .filter(|k| !now.contains_key(*k))
        .cloned()
        .collect();
    for (service, shadow) in gone {
        coord.unregister_shadow(&service, &shadow).await?;
        p.shadows.remove(&(service, shadow));
    }
    for ((service, shadow), status) in now {
        if p.shadows.get(&(service.clone(), shadow.clone())) == Some(&status) {
            continue;
        }
        let rec = ShadowRecord {
            service: service.clone(),
            shadow: shadow.clone(),
            host: coord.host().clone(),
            status,
            mem_kib: 0,
            updated_unix_ms: crate::clock::now_unix_ms(),
        };
        match coord.register_shadow(rec).await {
            Ok(()) | Err(CoordError::NoLease { .. }) => {
                p.shadows.insert((service, shadow), status);
            }
            Err(e) => return Err(e),
        }
    }

    // Specs are for other hosts: published only in a cluster.
    if coord.lease().borrow().mode == Mode::Standalone {
        return Ok(());
    }
    for s in &services {
        let owner = match coord.owner(&s.name).await? {
            Some(o) => o,
            // Not recorded at start (etcd was out of reach): recorded now, unless another
            // host got there first (adopt is conditional on the record's absence).
            None => coord.adopt(&s.name, &s.active).await?,
        };
        if owner.host != *coord.host() || owner.domain != s.active {
            continue;
        }
        let same_owner = |m: &SpecMark| m.domain == s.active && m.generation == owner.generation;
        if p.specs
            .get(&s.name)
            .is_some_and(|m| same_owner(m) && m.read_at.elapsed() < SPEC_EVERY)
        {
            continue;
        }
        let dom = s.active.clone();
        let xml = match d
            .hv()
            .run("read primary spec", move |hv| hv.xml(&dom, true))
            .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(service = %s.name, domain = %s.active, error = %crate::error::report(&e), "primary spec not published");
                continue;
            }
        };
        let unchanged = p
            .specs
            .get(&s.name)
            .is_some_and(|m| same_owner(m) && m.xml == xml);
        if !unchanged {
            coord
                .publish_spec(PrimarySpec {
                    service: s.name.clone(),
                    class: s.class.clone(),
                    domain: s.active.clone(),
                    host: coord.host().clone(),
                    generation: owner.generation,
                    xml: xml.clone(),
                    published_unix_ms: crate::clock::now_unix_ms(),
                })
                .await?;
        }
        p.specs.insert(
            s.name.clone(),
            SpecMark {
                domain: s.active.clone(),
                generation: owner.generation,
                xml,
                read_at: Instant::now(),
            },
        );
    }
    Ok(())
}

/// The answer to `hosts`: every host with its state, capacity, primaries and shadows. While
/// etcd cannot be read, this host's mode and the peers' heartbeats are still answered, with
/// why the records are missing.
pub(super) async fn hosts(d: &Shared) -> Result<HostsReport, CoordError> {
    let coord = d.coord.as_ref();
    let read = async {
        Ok::<_, CoordError>((
            coord.hosts().await?,
            coord.owners().await?,
            coord.shadows().await?,
        ))
    };
    let (hosts, owners, shadows, records_error) = match read.await {
        Ok((h, o, s)) => (h, o, s, None),
        Err(e) if coord.lease().borrow().mode != Mode::Connected => (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Some(crate::error::report(&e)),
        ),
        Err(e) => return Err(e),
    };
    let lease = *coord.lease().borrow();
    let mut entries: BTreeMap<HostId, HostEntry> = hosts
        .into_iter()
        .map(|h| {
            let f = h.facts;
            (
                f.host.clone(),
                HostEntry {
                    name: f.host.0,
                    known: true,
                    alive: h.alive,
                    state: h.state,
                    libvirt_uri: f.libvirt_uri,
                    capacity: f.capacity,
                    updated_unix_ms: f.updated_unix_ms,
                    version: f.version,
                    primaries: Vec::new(),
                    shadows: Vec::new(),
                },
            )
        })
        .collect();
    fn entry<'e>(entries: &'e mut BTreeMap<HostId, HostEntry>, h: &HostId) -> &'e mut HostEntry {
        entries
            .entry(h.clone())
            .or_insert_with(|| HostEntry::unknown(&h.0))
    }
    for o in owners {
        entry(&mut entries, &o.host).primaries.push(HostPrimary {
            service: o.service,
            domain: o.domain,
            generation: o.generation,
        });
    }
    for s in shadows {
        entry(&mut entries, &s.host).shadows.push(HostShadow {
            service: s.service,
            shadow: s.shadow,
            status: s.status,
        });
    }
    Ok(HostsReport {
        this_host: coord.host().0.clone(),
        mode: lease.mode,
        last_keepalive_ms_ago: lease
            .last_ack_sent
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
        lease_ttl_ms: (lease.mode != Mode::Standalone)
            .then(|| u64::try_from(lease.ttl.as_millis()).unwrap_or(u64::MAX)),
        hosts: entries.into_values().collect(),
        peers: d.hostloss.view(),
        self_fenced: d.hostloss.self_fenced(),
        records_error,
    })
}
