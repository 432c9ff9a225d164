//! One connection to the etcd cluster, over every endpoint, made again after any failure:
//! etcd-client does not reconnect by itself (its channel stays broken after an etcd restart),
//! so a call that fails drops the client and the next call connects afresh. Every call is
//! bounded by the operation timeout, connecting included.

use std::future::Future;
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
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.ends.connect_timeout)
            .with_timeout(self.ends.op_timeout)
            // HTTP/2 pings find a dead peer under a long-lived stream (a watch) that no
            // request would notice.
            .with_keep_alive(self.ends.op_timeout, self.ends.op_timeout)
            .with_keep_alive_while_idle(true);
        let c = Client::connect(&self.ends.urls, Some(opts)).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the client: the next call connects again.
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Runs `f` on a client within the operation timeout. Any failure resets the connection.
    pub async fn run<T, F, Fut>(&self, op: impl Into<String>, f: F) -> Result<T, CoordError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run_within(op, self.ends.op_timeout, f).await
    }

    /// [`Self::run`] with another bound (a keepalive answer, a first connection).
    pub async fn run_within<T, F, Fut>(
        &self,
        op: impl Into<String>,
        bound: Duration,
        f: F,
    ) -> Result<T, CoordError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let call = async {
            let c = self.client().await?;
            f(c).await
        };
        let result = tokio::time::timeout(bound, call).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.reset().await;
                Err(CoordError::Unavailable {
                    op: op.into(),
                    source: Arc::new(e),
                })
            }
            Err(_) => {
                self.reset().await;
                Err(CoordError::Timeout {
                    op: op.into(),
                    after: bound,
                })
            }
        }
    }
}
