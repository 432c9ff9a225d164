//! This host's lease, renewed by our own loop. etcd-client's keep-alive stream dies with its
//! connection (an etcd restart, a member lost) and is not re-established by the crate, so the
//! loop here sends each keepalive itself, waits for its answer within the operation timeout,
//! and on any failure reconnects (to whichever endpoint answers) and carries on with the same
//! lease while etcd still has it, or a new one when it has expired.
//!
//! The keys held under the lease (this host's liveness, its shadows) are kept in memory and
//! written again after every reconnection, so a new lease carries them all and nothing
//! removed meanwhile comes back.
//!
//! The time each acknowledged keepalive was *sent* is published ([`LeaseStatus`]): etcd cannot
//! expire the lease before that instant plus the TTL, which is what self-fencing is timed from.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use etcd_client::{LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp};
use tokio::sync::watch;

use super::conn::Conn;
use crate::cluster::{CoordError, LeaseStatus, Mode};

/// Reconnection attempts start this far apart and double up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnection attempts: well under any lease TTL.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Operations per etcd transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// How long a keepalive may wait for its answer: two keepalive periods (at least 300 ms),
/// within the operation timeout. An answer comes in milliseconds from a member with a leader;
/// one whose leader is gone holds the renewal until its own request timeout, and a short bound
/// moves to a member with a (new) leader soon after one is elected. A keepalive that misses
/// the bound costs a reconnection, not the lease: self-fencing counts from the last answered
/// one, over the whole TTL.
fn keepalive_bound(every: Duration, op_timeout: Duration) -> Duration {
    (every * 2).max(Duration::from_millis(300)).min(op_timeout)
}

/// The lease and the keys held under it.
pub struct Lease {
    status: watch::Sender<LeaseStatus>,
    /// Key → value of every key to hold under the lease. Locked across writes, so a
    /// registration and a re-write after reconnection never interleave.
    held: tokio::sync::Mutex<BTreeMap<String, Vec<u8>>>,
    ttl_s: i64,
    every: Duration,
}

impl Lease {
    /// No lease yet ([`Mode::Starting`]); [`Lease::keep`] gets one.
    pub fn new(ttl: Duration, every: Duration) -> Self {
        Lease {
            status: watch::channel(LeaseStatus::without_lease(Mode::Starting, ttl)).0,
            held: tokio::sync::Mutex::new(BTreeMap::new()),
            ttl_s: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1),
            every,
        }
    }

    /// Status receiver.
    pub fn subscribe(&self) -> watch::Receiver<LeaseStatus> {
        self.status.subscribe()
    }

    fn lease_id(&self) -> Option<i64> {
        self.status.borrow().lease_id
    }

    fn set_mode(&self, mode: Mode) {
        self.status.send_if_modified(|s| {
            if s.mode == mode {
                return false;
            }
            if mode == Mode::Unreachable {
                tracing::warn!(lease = ?s.lease_id, last_ack = ?s.last_ack_sent.map(|t| t.elapsed()), "etcd unreachable; the lease is not being renewed");
            } else {
                tracing::info!(lease = ?s.lease_id, mode = mode.label(), "etcd lease");
            }
            s.mode = mode;
            s.since = Instant::now();
            true
        });
    }

    fn acked(&self, id: i64, sent: Instant, ttl_s: i64) {
        self.status.send_modify(|s| {
            s.lease_id = Some(id);
            s.last_ack_sent = Some(sent);
            s.ttl = Duration::from_secs(u64::try_from(ttl_s).unwrap_or(1));
        });
    }

    fn lost(&self) {
        self.status.send_modify(|s| {
            if let Some(id) = s.lease_id.take() {
                tracing::warn!(
                    lease = id,
                    "etcd lease expired; a new one is granted and every leased key written again"
                );
            }
        });
    }

    /// Holds `key` = `value` under the lease from now on, and writes it now when there is a
    /// lease. Without one, [`CoordError::NoLease`]: it is written as soon as one is granted.
    pub async fn hold(&self, conn: &Conn, key: String, value: Vec<u8>) -> Result<(), CoordError> {
        let mut held = self.held.lock().await;
        held.insert(key.clone(), value.clone());
        let Some(id) = self.lease_id() else {
            return Err(CoordError::NoLease {
                why: "not granted yet; the key is written when it is".into(),
            });
        };
        let (k, v) = (&key, &value);
        conn.run(format!("put {key}"), |mut c| async move {
            c.put(
                k.as_str(),
                v.clone(),
                Some(PutOptions::new().with_lease(id)),
            )
            .await
            .map(drop)
        })
        .await
    }

    /// Stops holding `key` and deletes it.
    pub async fn drop_key(&self, conn: &Conn, key: String) -> Result<(), CoordError> {
        let mut held = self.held.lock().await;
        held.remove(&key);
        let k = &key;
        conn.run(format!("delete {key}"), |mut c| async move {
            c.delete(k.as_str(), None).await.map(drop)
        })
        .await
    }

    /// Renews the lease for as long as the process runs. After a connection that renewed it
    /// fails, a new one is tried at once (it goes to every endpoint together); the mode turns
    /// [`Mode::Unreachable`] only when that finds no member to renew with.
    pub async fn keep(&self, conn: &Conn) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let (e, renewed) = self.session(conn, &mut backoff).await;
            tracing::debug!(error = %crate::error::report(&e), "etcd lease session ended");
            if renewed {
                continue;
            }
            self.set_mode(Mode::Unreachable);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection's worth of renewals: returns why it ended, and whether the lease was
    /// renewed on it (then the next endpoints are tried at once).
    async fn session(&self, conn: &Conn, backoff: &mut Duration) -> (CoordError, bool) {
        let mut renewed = false;
        let e = self.renew(conn, backoff, &mut renewed).await;
        (e, renewed)
    }

    async fn renew(&self, conn: &Conn, backoff: &mut Duration, renewed: &mut bool) -> CoordError {
        let ttl = self.ttl_s;
        let id = match self.lease_id() {
            Some(id) => id,
            None => {
                let sent = Instant::now();
                match conn
                    .run("grant lease", |mut c| async move {
                        c.lease_grant(ttl, None).await
                    })
                    .await
                {
                    Ok(g) => {
                        self.acked(g.id(), sent, g.ttl());
                        tracing::info!(lease = g.id(), ttl_s = g.ttl(), "etcd lease granted");
                        g.id()
                    }
                    Err(e) => return e,
                }
            }
        };
        let bound = keepalive_bound(self.every, conn.endpoints().op_timeout);
        let sent = Instant::now();
        let opened = conn
            .run_within("open keepalive", bound, |mut c| async move {
                match c.lease_keep_alive(id).await {
                    Ok(pair) => Ok(Some(pair)),
                    // Its first keepalive was answered with TTL 0: etcd no longer has it.
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await;
        let (mut keeper, mut stream) = match opened {
            Ok(Some(pair)) => pair,
            Ok(None) => {
                self.lost();
                *backoff = Duration::ZERO;
                return CoordError::NoLease {
                    why: format!("lease {id} expired"),
                };
            }
            Err(e) => return e,
        };
        self.acked(id, sent, ttl);
        if let Err(e) = self.write_held(conn, id).await {
            return e;
        }
        self.set_mode(Mode::Connected);
        *renewed = true;
        *backoff = MIN_BACKOFF;
        loop {
            tokio::time::sleep(self.every).await;
            let sent = Instant::now();
            let answer = tokio::time::timeout(bound, async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => self.acked(id, sent, r.ttl()),
                Ok(Ok(Some(_))) => {
                    self.lost();
                    *backoff = Duration::ZERO;
                    return CoordError::NoLease {
                        why: format!("lease {id} expired"),
                    };
                }
                Ok(Ok(None)) => {
                    conn.reset().await;
                    return CoordError::Unavailable {
                        op: "keepalive".into(),
                        source: std::sync::Arc::new(std::io::Error::other(
                            "keepalive stream closed",
                        )),
                    };
                }
                Ok(Err(e)) => {
                    conn.reset().await;
                    return CoordError::Unavailable {
                        op: "keepalive".into(),
                        source: std::sync::Arc::new(e),
                    };
                }
                Err(_) => {
                    conn.reset().await;
                    return CoordError::Timeout {
                        op: "keepalive".into(),
                        after: bound,
                    };
                }
            }
        }
    }

    /// Writes every held key under lease `id` and deletes the keys still attached to it that
    /// are no longer held (removed while etcd was out of reach).
    async fn write_held(&self, conn: &Conn, id: i64) -> Result<(), CoordError> {
        let held = self.held.lock().await;
        let attached = conn
            .run("lease keys", |mut c| async move {
                c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                    .await
            })
            .await?;
        let stale: BTreeSet<Vec<u8>> = attached
            .keys()
            .iter()
            .filter(|k| {
                std::str::from_utf8(k)
                    .map(|k| !held.contains_key(k))
                    .unwrap_or(true)
            })
            .cloned()
            .collect();
        let ops: Vec<TxnOp> = held
            .iter()
            .map(|(k, v)| {
                TxnOp::put(
                    k.as_bytes(),
                    v.as_slice(),
                    Some(PutOptions::new().with_lease(id)),
                )
            })
            .chain(stale.into_iter().map(|k| TxnOp::delete(k, None)))
            .collect();
        for chunk in ops.chunks(TXN_OPS) {
            let txn = &Txn::new().and_then(chunk.to_vec());
            conn.run("write leased keys", |mut c| async move {
                c.txn(txn.clone()).await.map(drop)
            })
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keepalive_waits_two_periods_within_the_operation_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(keepalive_bound(ms(200), ms(1000)), ms(400));
        assert_eq!(keepalive_bound(ms(50), ms(1000)), ms(300));
        assert_eq!(keepalive_bound(ms(333), ms(500)), ms(500));
    }
}
