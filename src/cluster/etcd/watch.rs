//! One watch on the cluster's whole prefix, turned into typed [`ClusterEvent`]s. The watch is
//! re-established after any failure from the revision after the last one seen, so no change
//! is missed; only when etcd has compacted that history away does it start from now and
//! send [`ClusterEvent::Resync`]. A value that does not parse is logged with its key and
//! skipped: a bad writer cannot stop the others' events.

use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::broadcast;

use super::codec;
use super::conn::Conn;
use super::keys::Keys;
use crate::cluster::{ClusterEvent, CoordError};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Follows every change under `keys` for as long as the process runs.
pub async fn follow(keys: Keys, conn: &Conn, tx: broadcast::Sender<ClusterEvent>) {
    let mut next: Option<i64> = None;
    let mut started = false;
    let mut backoff = MIN_BACKOFF;
    loop {
        match watch_once(&keys, conn, &tx, &mut next, &mut started).await {
            Ok(()) => backoff = MIN_BACKOFF,
            Err(e) => {
                tracing::debug!(error = %crate::error::report(&e), "etcd watch interrupted");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One watch stream, from `next` (or from now). Returns when it ends.
async fn watch_once(
    keys: &Keys,
    conn: &Conn,
    tx: &broadcast::Sender<ClusterEvent>,
    next: &mut Option<i64>,
    started: &mut bool,
) -> Result<(), CoordError> {
    let root = keys.root().to_string();
    let from = match *next {
        Some(r) => r,
        None => {
            let r = &root;
            let now = conn
                .run("read revision", |mut c| async move {
                    c.get(
                        r.as_str(),
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_keys_only()
                                .with_limit(1),
                        ),
                    )
                    .await
                })
                .await?;
            let rev = now.header().map_or(0, |h| h.revision());
            if *started {
                // Changes between the lost history and now are unknown.
                let _ = tx.send(ClusterEvent::Resync);
            }
            rev + 1
        }
    };
    *started = true;
    let r = &root;
    let mut stream = conn
        .run("open watch", |mut c| async move {
            c.watch(
                r.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from)
                        .with_progress_notify(),
                ),
            )
            .await
        })
        .await?;
    *next = Some(from);
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                conn.reset().await;
                return Err(CoordError::Unavailable {
                    op: "watch".into(),
                    source: std::sync::Arc::new(std::io::Error::other("watch stream closed")),
                });
            }
            Err(e) => {
                conn.reset().await;
                return Err(CoordError::Unavailable {
                    op: "watch".into(),
                    source: std::sync::Arc::new(e),
                });
            }
        };
        if msg.compact_revision() > 0 || msg.canceled() {
            tracing::warn!(
                compacted = msg.compact_revision(),
                reason = msg.cancel_reason(),
                "etcd watch history lost; resynchronising"
            );
            *next = None;
            return Ok(());
        }
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            *next = Some(kv.mod_revision() + 1);
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            match codec::event(keys, kv.key(), value) {
                Ok(Some(e)) => {
                    let _ = tx.send(e);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed value in etcd")
                }
            }
        }
        if msg.events().is_empty() {
            if let Some(h) = msg.header() {
                *next = Some(next.unwrap_or(0).max(h.revision() + 1));
            }
        }
    }
}
