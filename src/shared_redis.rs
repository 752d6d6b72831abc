//! Owns the connection to the Redis a fleet shares: one server (`redis://`, `rediss://`,
//! a multiplexed connection with redis-rs's ConnectionManager) or a Redis Cluster
//! (`redis+cluster://h1:p1,h2:p2`), opened with keygate's own timeouts.
//!
//! Both kinds are one cheap-to-clone handle that speaks redis-rs's async `ConnectionLike`,
//! so the quota store (and anything else that needs the shared Redis) runs the same
//! commands and scripts on either. Connecting is lazy: a replica starts even while Redis is
//! down, and the first command reports the outage.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::StoreUrl;

/// How long opening a TCP connection (and the TLS handshake) may take. Longer than a
/// decision's bound on purpose: a reconnect runs in the background, and a slow network
/// should still be able to bring the store back.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A response that has not come within this is given up inside redis-rs. The request path
/// never waits that long (it is bounded by `store.timeout`); this only frees the slot of
/// an answer nobody waits for any more.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A handle on the shared Redis. Clones share one connection (one per node on Cluster).
#[derive(Clone)]
pub enum SharedRedis {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl SharedRedis {
    /// Opens a handle for a `redis://`, `rediss://` or cluster store URL; `None` for
    /// `memory://`. Only a malformed URL fails here: reachability shows on first use.
    pub fn open(url: &StoreUrl) -> Result<Option<Self>, String> {
        match url {
            StoreUrl::Memory => Ok(None),
            StoreUrl::Redis(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
                // Reconnects are driven from outside (the quota store's probe, with its own
                // backoff), so redis-rs gives up quickly instead of queueing requests
                // behind a long retry loop.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| e.to_string())?;
                Ok(Some(SharedRedis::Single(manager)))
            }
            StoreUrl::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()
                    .map_err(|e| e.to_string())?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(RESPONSE_TIMEOUT);
                Ok(Some(SharedRedis::Cluster(
                    client.get_pending_async_connection_with_config(config),
                )))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, SharedRedis::Cluster(_))
    }

    /// `redis` or `redis-cluster`, for logs and `/readyz`.
    pub fn kind(&self) -> &'static str {
        match self {
            SharedRedis::Single(_) => "redis",
            SharedRedis::Cluster(_) => "redis-cluster",
        }
    }
}

/// The store URL for logs: host, port and database, never a password.
pub fn redacted(url: &StoreUrl) -> String {
    fn strip(url: &str) -> String {
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://{}", &url[..scheme], &url[at + 1..])
            }
            _ => url.to_string(),
        }
    }
    match url {
        StoreUrl::Memory => "memory://".to_string(),
        StoreUrl::Redis(url) => strip(url),
        StoreUrl::Cluster(nodes) => {
            let nodes: Vec<String> = nodes
                .iter()
                .map(|n| strip(n).trim_start_matches("redis://").to_string())
                .collect();
            format!("redis+cluster://{}", nodes.join(","))
        }
    }
}

impl ConnectionLike for SharedRedis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            SharedRedis::Single(c) => c.req_packed_command(cmd),
            SharedRedis::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            SharedRedis::Single(c) => c.req_packed_commands(pipeline, offset, count),
            SharedRedis::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            SharedRedis::Single(c) => c.get_db(),
            SharedRedis::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_no_password() {
        let single = StoreUrl::Redis("rediss://user:s3cret@10.0.0.5:6380/2".into());
        assert_eq!(redacted(&single), "rediss://10.0.0.5:6380/2");
        let cluster =
            StoreUrl::Cluster(vec!["redis://:pw@h1:7000".into(), "redis://h2:7001".into()]);
        assert_eq!(redacted(&cluster), "redis+cluster://h1:7000,h2:7001");
    }
}
