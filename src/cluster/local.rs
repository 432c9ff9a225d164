//! The single-host coordinator: every record in memory, rebuilt from libvirt at start (the
//! daemon adopts every primary it finds), compare-and-swap under one lock. Its one host is
//! always alive and its mode is [`Mode::Standalone`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::{
    check_name, Claim, ClusterEvent, CoordError, CoordFuture, Coordinator, FailureReport,
    HostFacts, HostId, HostInfo, HostState, LeaseStatus, Mode, OwnerRecord, PrimarySpec,
    ShadowRecord,
};

/// Everything a single host records about itself.
#[derive(Default)]
struct Records {
    facts: Option<HostFacts>,
    draining: BTreeSet<HostId>,
    owners: BTreeMap<String, OwnerRecord>,
    specs: BTreeMap<String, PrimarySpec>,
    /// By (service, shadow): one host.
    shadows: BTreeMap<(String, String), ShadowRecord>,
    failures: BTreeMap<String, FailureReport>,
}

/// The records of one host.
pub struct LocalCoordinator {
    host: HostId,
    records: Mutex<Records>,
    changes: broadcast::Sender<ClusterEvent>,
    lease: watch::Sender<LeaseStatus>,
}

fn done<T: Send + 'static>(r: Result<T, CoordError>) -> CoordFuture<'static, T> {
    Box::pin(futures::future::ready(r))
}

impl LocalCoordinator {
    /// No records yet; `host` names this host.
    pub fn new(host: HostId) -> Self {
        LocalCoordinator {
            host,
            records: Mutex::new(Records::default()),
            changes: broadcast::channel(256).0,
            lease: watch::channel(LeaseStatus::without_lease(Mode::Standalone, Duration::ZERO)).0,
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, ev: ClusterEvent) {
        let _ = self.changes.send(ev);
    }

    fn claim_now(&self, claim: Claim) -> Result<OwnerRecord, CoordError> {
        check_name("service", &claim.service)?;
        check_name("domain", &claim.domain)?;
        let mut r = self.records();
        let current = match r.owners.get(&claim.service) {
            Some(cur) if cur.generation != claim.expected => {
                return Err(CoordError::Conflict {
                    service: claim.service.clone(),
                    expected: claim.expected,
                    current: cur.clone(),
                })
            }
            Some(cur) => cur.generation,
            None if claim.expected != 0 => {
                return Err(CoordError::NoRecord {
                    service: claim.service.clone(),
                    expected: claim.expected,
                })
            }
            None => 0,
        };
        let record = OwnerRecord {
            service: claim.service.clone(),
            domain: claim.domain,
            host: self.host.clone(),
            generation: current + 1,
        };
        r.owners.insert(claim.service, record.clone());
        drop(r);
        self.emit(ClusterEvent::Owner(record.clone()));
        Ok(record)
    }

    fn adopt_now(&self, service: &str, domain: &str) -> Result<OwnerRecord, CoordError> {
        check_name("service", service)?;
        check_name("domain", domain)?;
        let mut r = self.records();
        if let Some(existing) = r.owners.get(service) {
            return Ok(existing.clone());
        }
        let record = OwnerRecord {
            service: service.to_string(),
            domain: domain.to_string(),
            host: self.host.clone(),
            generation: 1,
        };
        r.owners.insert(service.to_string(), record.clone());
        drop(r);
        self.emit(ClusterEvent::Owner(record.clone()));
        Ok(record)
    }

    fn release_now(&self, service: &str, expected: u64) -> Result<(), CoordError> {
        let mut r = self.records();
        match r.owners.get(service) {
            None => Err(CoordError::NoRecord {
                service: service.to_string(),
                expected,
            }),
            Some(cur) if cur.generation != expected => Err(CoordError::Conflict {
                service: service.to_string(),
                expected,
                current: cur.clone(),
            }),
            Some(_) => {
                r.owners.remove(service);
                drop(r);
                self.emit(ClusterEvent::OwnerReleased {
                    service: service.to_string(),
                });
                Ok(())
            }
        }
    }

    fn hosts_now(&self) -> Vec<HostInfo> {
        let r = self.records();
        r.facts
            .iter()
            .map(|f| HostInfo {
                facts: f.clone(),
                alive: true,
                state: if r.draining.contains(&f.host) {
                    HostState::Draining
                } else {
                    HostState::Active
                },
            })
            .collect()
    }
}

impl Coordinator for LocalCoordinator {
    fn host(&self) -> &HostId {
        &self.host
    }

    fn lease(&self) -> watch::Receiver<LeaseStatus> {
        self.lease.subscribe()
    }

    fn register(&self, mut facts: HostFacts) -> CoordFuture<'_, ()> {
        facts.host = self.host.clone();
        self.records().facts = Some(facts.clone());
        self.emit(ClusterEvent::HostUp(facts));
        done(Ok(()))
    }

    fn hosts(&self) -> CoordFuture<'_, Vec<HostInfo>> {
        done(Ok(self.hosts_now()))
    }

    fn set_drain(&self, host: &HostId, draining: bool) -> CoordFuture<'_, ()> {
        let r = check_name("host", &host.0).map(|()| {
            let mut r = self.records();
            if draining {
                r.draining.insert(host.clone());
            } else {
                r.draining.remove(host);
            }
            drop(r);
            self.emit(ClusterEvent::Drain {
                host: host.clone(),
                draining,
            });
        });
        done(r)
    }

    fn owner(&self, service: &str) -> CoordFuture<'_, Option<OwnerRecord>> {
        done(Ok(self.records().owners.get(service).cloned()))
    }

    fn owners(&self) -> CoordFuture<'_, Vec<OwnerRecord>> {
        done(Ok(self.records().owners.values().cloned().collect()))
    }

    fn claim(&self, claim: Claim) -> CoordFuture<'_, OwnerRecord> {
        done(self.claim_now(claim))
    }

    fn adopt(&self, service: &str, domain: &str) -> CoordFuture<'_, OwnerRecord> {
        done(self.adopt_now(service, domain))
    }

    fn release(&self, service: &str, expected: u64) -> CoordFuture<'_, ()> {
        done(self.release_now(service, expected))
    }

    fn publish_spec(&self, mut spec: PrimarySpec) -> CoordFuture<'_, ()> {
        let r = check_name("service", &spec.service).map(|()| {
            spec.host = self.host.clone();
            self.records()
                .specs
                .insert(spec.service.clone(), spec.clone());
            self.emit(ClusterEvent::Spec(spec));
        });
        done(r)
    }

    fn spec(&self, service: &str) -> CoordFuture<'_, Option<PrimarySpec>> {
        done(Ok(self.records().specs.get(service).cloned()))
    }

    fn specs(&self) -> CoordFuture<'_, Vec<PrimarySpec>> {
        done(Ok(self.records().specs.values().cloned().collect()))
    }

    fn withdraw_spec(&self, service: &str) -> CoordFuture<'_, ()> {
        if self.records().specs.remove(service).is_some() {
            self.emit(ClusterEvent::SpecWithdrawn {
                service: service.to_string(),
            });
        }
        done(Ok(()))
    }

    fn register_shadow(&self, mut shadow: ShadowRecord) -> CoordFuture<'_, ()> {
        let r = check_name("service", &shadow.service)
            .and_then(|()| check_name("domain", &shadow.shadow))
            .map(|()| {
                shadow.host = self.host.clone();
                self.records().shadows.insert(
                    (shadow.service.clone(), shadow.shadow.clone()),
                    shadow.clone(),
                );
                self.emit(ClusterEvent::Shadow(shadow));
            });
        done(r)
    }

    fn unregister_shadow(&self, service: &str, shadow: &str) -> CoordFuture<'_, ()> {
        let key = (service.to_string(), shadow.to_string());
        if self.records().shadows.remove(&key).is_some() {
            self.emit(ClusterEvent::ShadowGone {
                service: key.0,
                host: self.host.clone(),
                shadow: key.1,
            });
        }
        done(Ok(()))
    }

    fn shadows(&self) -> CoordFuture<'_, Vec<ShadowRecord>> {
        done(Ok(self.records().shadows.values().cloned().collect()))
    }

    fn report_failure(&self, mut report: FailureReport) -> CoordFuture<'_, ()> {
        let r = check_name("service", &report.service).map(|()| {
            report.host = self.host.clone();
            self.records()
                .failures
                .insert(report.service.clone(), report.clone());
            self.emit(ClusterEvent::Failure(report));
        });
        done(r)
    }

    fn failures(&self) -> CoordFuture<'_, Vec<FailureReport>> {
        done(Ok(self.records().failures.values().cloned().collect()))
    }

    fn clear_failure(&self, service: &str) -> CoordFuture<'_, ()> {
        if self.records().failures.remove(service).is_some() {
            self.emit(ClusterEvent::FailureCleared {
                service: service.to_string(),
            });
        }
        done(Ok(()))
    }

    fn watch(&self) -> broadcast::Receiver<ClusterEvent> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ShadowStatus;
    use crate::failover::Trigger;

    fn claim(domain: &str, expected: u64) -> Claim {
        Claim {
            service: "web".into(),
            domain: domain.into(),
            expected,
        }
    }

    fn owner_event(ev: ClusterEvent) -> OwnerRecord {
        match ev {
            ClusterEvent::Owner(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn claims_are_compare_and_swap_on_the_generation() {
        let c = LocalCoordinator::new(HostId("h1".into()));
        let mut changes = c.watch();
        let first = c.claim(claim("web", 0)).await.unwrap();
        assert_eq!(first.generation, 1);
        assert_eq!(first.host, HostId("h1".into()));
        // Two promotions that both saw generation 1: exactly one wins.
        let a = c.claim(claim("web-shadow-1", 1)).await;
        let b = c.claim(claim("web-shadow-2", 1)).await;
        assert_eq!(a.unwrap().generation, 2);
        match b.unwrap_err() {
            CoordError::Conflict {
                expected, current, ..
            } => {
                assert_eq!(expected, 1);
                assert_eq!(current.domain, "web-shadow-1");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.owner("web").await.unwrap().unwrap().domain,
            "web-shadow-1"
        );
        assert_eq!(owner_event(changes.recv().await.unwrap()).generation, 1);
        assert_eq!(owner_event(changes.recv().await.unwrap()).generation, 2);
    }

    #[tokio::test]
    async fn adopt_keeps_an_existing_record() {
        let c = LocalCoordinator::new(HostId("h1".into()));
        assert_eq!(c.adopt("web", "web").await.unwrap().generation, 1);
        c.claim(claim("web-shadow-1", 1)).await.unwrap();
        let r = c.adopt("web", "web").await.unwrap();
        assert_eq!((r.domain.as_str(), r.generation), ("web-shadow-1", 2));
        assert_eq!(c.owner("db").await.unwrap(), None);
    }

    #[tokio::test]
    async fn release_is_conditional_on_the_generation() {
        let c = LocalCoordinator::new(HostId("h1".into()));
        c.adopt("web", "web").await.unwrap();
        assert!(matches!(
            c.release("web", 2).await,
            Err(CoordError::Conflict { expected: 2, .. })
        ));
        c.release("web", 1).await.unwrap();
        assert!(matches!(
            c.release("web", 1).await,
            Err(CoordError::NoRecord { .. })
        ));
        assert!(c.owners().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_host_with_its_records_stamped_with_its_name() {
        let h = HostId("h1".into());
        let c = LocalCoordinator::new(h.clone());
        assert_eq!(c.lease().borrow().mode, Mode::Standalone);
        c.register(HostFacts::now(
            HostId("ignored".into()),
            "qemu:///system",
            1,
        ))
        .await
        .unwrap();
        c.set_drain(&h, true).await.unwrap();
        let hosts = c.hosts().await.unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            (&hosts[0].facts.host, hosts[0].alive, hosts[0].state),
            (&h, true, HostState::Draining)
        );
        c.register_shadow(ShadowRecord {
            service: "web".into(),
            shadow: "web-shadow-1".into(),
            host: HostId("other".into()),
            status: ShadowStatus::Ready,
            mem_kib: 1024,
            updated_unix_ms: 5,
        })
        .await
        .unwrap();
        assert_eq!(c.shadows().await.unwrap()[0].host, h);
        c.report_failure(FailureReport {
            service: "web".into(),
            domain: "web".into(),
            host: HostId("other".into()),
            generation: 1,
            trigger: Trigger::Pidfd,
            at_unix_ms: 9,
            to: None,
        })
        .await
        .unwrap();
        assert_eq!(c.failures().await.unwrap()[0].host, h);
        c.clear_failure("web").await.unwrap();
        c.unregister_shadow("web", "web-shadow-1").await.unwrap();
        assert!(c.failures().await.unwrap().is_empty());
        assert!(c.shadows().await.unwrap().is_empty());
        assert!(matches!(
            c.claim(claim("a/b", 0)).await,
            Err(CoordError::InvalidName { what: "domain", .. })
        ));
    }
}
