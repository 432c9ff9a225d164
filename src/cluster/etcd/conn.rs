//! One connection to the etcd cluster, made again after any failure: etcd-client does not
//! reconnect by itself (its channel stays broken after an etcd restart), so a call that fails
//! drops the client and the next call connects afresh. One endpoint at a time, not the crate's
//! balanced channel over all of them: that channel keeps sending a share of the calls to a
//! member that is down, so with one member of three dead a lease renewal (several calls in a
//! row) kept failing until the lease expired. A new connection goes to every endpoint at once
//! and keeps the first member that answers a linearizable read, i.e. one that has a leader: a
//! member powered off (its packets dropped) or cut from the quorum never holds the others up,
//! and when the leader was lost, the connection is made as soon as a new one is elected
//! (connecting in turn waited out a call's bound on each dead or leaderless member first).
//! Every call is bounded by the operation timeout, connecting included.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use futures::stream::{FuturesUnordered, StreamExt};

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

/// A key nobody writes: a new connection reads it (count only, linearizable) to prove that the
/// member it reached has a leader.
const PROBE_KEY: &str = "understudy-connection-probe";

/// A shared, replaceable client.
pub struct Conn {
    ends: Endpoints,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Conn {
    /// No connection yet: the first call connects.
    pub fn new(ends: Endpoints) -> Self {
        Conn {
            ends,
            client: tokio::sync::Mutex::new(None),
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
        let c = self.connect_first_answering().await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Connects to every endpoint at once and returns the first client whose member answers a
    /// linearizable read; the others are dropped. Without any answer, the first error (the
    /// caller's bound ends a wait on members that do not answer at all).
    async fn connect_first_answering(&self) -> Result<Client, etcd_client::Error> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.ends.connect_timeout)
            .with_timeout(self.ends.op_timeout)
            // HTTP/2 pings find a dead peer under a long-lived stream (a watch) that no
            // request would notice.
            .with_keep_alive(self.ends.op_timeout, self.ends.op_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let mut tries: FuturesUnordered<_> = self
            .ends
            .urls
            .iter()
            .map(|url| {
                let opts = opts.clone();
                async move {
                    let mut c = Client::connect([url.as_str()], Some(opts)).await?;
                    c.get(PROBE_KEY, Some(GetOptions::new().with_count_only()))
                        .await?;
                    Ok::<_, etcd_client::Error>(c)
                }
            })
            .collect();
        let mut first_error = None;
        while let Some(tried) = tries.next().await {
            match tried {
                Ok(c) => return Ok(c),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error
            .unwrap_or_else(|| etcd_client::Error::InvalidArgs("no etcd endpoint".into())))
    }

    /// Forgets the client: the next call connects again.
    pub async fn reset(&self) {
        self.client.lock().await.take();
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
    /// or has no leader) is made again on a new connection, as many times as there are
    /// endpoints, within the same bound: such a call was not applied, and every write here is safe to repeat
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
