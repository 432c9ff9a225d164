//! One connection to the etcd cluster, made again after any failure: etcd-client does not
//! reconnect by itself (its channel stays broken after an etcd restart), so a call that fails
//! drops the client and the next call connects afresh, to the next endpoint in turn. One
//! endpoint at a time, not the crate's balanced channel over all of them: that channel keeps
//! sending a share of the calls to a member that is down, so with one member of three dead a
//! lease renewal (several calls in a row) kept failing until the lease expired. A member cut
//! off from the quorum refuses calls (`require_leader`) and is moved past the same way. Every
//! call is bounded by the operation timeout, connecting included.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::cluster::CoordError;

/// Where etcd is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// `http://host:port` of each member.
    pub urls: Vec<String>,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on each call, connecting included.
    pub op_timeout: Duration,
}

/// A shared, replaceable client.
pub struct Conn {
    ends: Endpoints,
    client: tokio::sync::Mutex<Option<Client>>,
    /// The endpoint the next connection goes to (modulo their number).
    next: AtomicUsize,
}

impl Conn {
    /// No connection yet: the first call connects.
    pub fn new(ends: Endpoints) -> Self {
        Conn {
            ends,
            client: tokio::sync::Mutex::new(None),
            next: AtomicUsize::new(0),
        }
    }

    /// The endpoints and timeouts.
    pub fn endpoints(&self) -> &Endpoints {
        &self.ends
    }

    /// The client, connecting first when there is none.
    async fn client(&self) -> Result<Client, etcd_client::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.ends.connect_timeout)
            .with_timeout(self.ends.op_timeout)
            // HTTP/2 pings find a dead peer under a long-lived stream (a watch) that no
            // request would notice.
            .with_keep_alive(self.ends.op_timeout, self.ends.op_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let n = self.ends.urls.len().max(1);
        let url = self
            .ends
            .urls
            .get(self.next.load(Ordering::Relaxed) % n)
            .cloned()
            .unwrap_or_default();
        let c = Client::connect([url], Some(opts)).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the client: the next call connects again, to the next endpoint.
    pub async fn reset(&self) {
        let mut slot = self.client.lock().await;
        if slot.take().is_some() {
            self.next.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `f` on a client within the operation timeout. Any failure resets the connection.
    pub async fn run<T, F, Fut>(&self, op: impl Into<String>, f: F) -> Result<T, CoordError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run_within(op, self.ends.op_timeout, f).await
    }

    /// [`Self::run`] with another bound. A call refused as unavailable (the member is down,
    /// or has no leader) is made again on the next endpoint, each endpoint once, within the
    /// same bound: such a call was not applied, and every write here is safe to repeat
    /// (conditional writes recognise their own earlier success).
    pub async fn run_within<T, F, Fut>(
        &self,
        op: impl Into<String>,
        bound: Duration,
        f: F,
    ) -> Result<T, CoordError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let op = op.into();
        let attempts = self.ends.urls.len().max(1);
        let calls = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let result = match self.client().await {
                    Ok(c) => f(c).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        self.reset().await;
                        if attempt >= attempts || !refused(&e) {
                            return Err(e);
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(bound, calls).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CoordError::Unavailable {
                op,
                source: Arc::new(e),
            }),
            Err(_) => {
                self.reset().await;
                Err(CoordError::Timeout { op, after: bound })
            }
        }
    }
}

/// Whether `e` says the member did not take the call: it could not be connected to, or it
/// answered "unavailable" (no leader, shutting down).
fn refused(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}
