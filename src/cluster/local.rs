//! The single-host coordinator: owner records in memory, rebuilt from libvirt at start (the
//! daemon adopts every primary it finds), compare-and-swap under one lock.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use tokio::sync::broadcast;

use super::{Claim, CoordError, Coordinator, HostId, OwnerRecord};

/// Owner records of one host.
pub struct LocalCoordinator {
    host: HostId,
    owners: Mutex<BTreeMap<String, OwnerRecord>>,
    changes: broadcast::Sender<OwnerRecord>,
}

impl LocalCoordinator {
    /// No records yet; `host` names this host.
    pub fn new(host: HostId) -> Self {
        LocalCoordinator {
            host,
            owners: Mutex::new(BTreeMap::new()),
            changes: broadcast::channel(64).0,
        }
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OwnerRecord>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn claim_now(&self, claim: Claim) -> Result<OwnerRecord, CoordError> {
        let mut owners = self.owners();
        let current = owners.get(&claim.service).map_or(0, |r| r.generation);
        if current != claim.expected {
            return Err(CoordError::Conflict {
                service: claim.service.clone(),
                expected: claim.expected,
                current: owners[&claim.service].clone(),
            });
        }
        let record = OwnerRecord {
            service: claim.service.clone(),
            domain: claim.domain,
            host: self.host.clone(),
            generation: current + 1,
        };
        owners.insert(claim.service, record.clone());
        let _ = self.changes.send(record.clone());
        Ok(record)
    }

    fn adopt_now(&self, service: &str, domain: &str) -> OwnerRecord {
        let mut owners = self.owners();
        if let Some(r) = owners.get(service) {
            return r.clone();
        }
        let record = OwnerRecord {
            service: service.to_string(),
            domain: domain.to_string(),
            host: self.host.clone(),
            generation: 1,
        };
        owners.insert(service.to_string(), record.clone());
        let _ = self.changes.send(record.clone());
        record
    }
}

impl Coordinator for LocalCoordinator {
    fn host(&self) -> &HostId {
        &self.host
    }

    fn owner(&self, service: &str) -> BoxFuture<'_, Result<Option<OwnerRecord>, CoordError>> {
        let r = self.owners().get(service).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn claim(&self, claim: Claim) -> BoxFuture<'_, Result<OwnerRecord, CoordError>> {
        let r = self.claim_now(claim);
        Box::pin(async move { r })
    }

    fn adopt(&self, service: &str, domain: &str) -> BoxFuture<'_, Result<OwnerRecord, CoordError>> {
        let r = self.adopt_now(service, domain);
        Box::pin(async move { Ok(r) })
    }

    fn watch(&self) -> broadcast::Receiver<OwnerRecord> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(domain: &str, expected: u64) -> Claim {
        Claim {
            service: "web".into(),
            domain: domain.into(),
            expected,
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
        assert_eq!(changes.recv().await.unwrap().generation, 1);
        assert_eq!(changes.recv().await.unwrap().generation, 2);
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
}
