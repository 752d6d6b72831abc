//! Owns admin-made keys on the shared Redis (one server or a Cluster): one hash of
//! id → JSON [`StoredKey`] and a change counter, written only by one Lua script so a write
//! and its counter bump are one atomic step.
//!
//! # Layout
//!
//! `kg:keys:{admin}` is the hash, `kg:keys:{admin}:v` the counter. One hash tag, so one
//! slot: the script may touch both on Redis Cluster too.
//!
//! # Why polling and no pub/sub
//!
//! Replicas follow the counter (see [`crate::reload::KEY_POLL_INTERVAL`], 250 ms), which
//! already bounds how long a change takes to reach every replica well under a second.
//! A pub/sub channel would only shave that delay, at the price of a second connection per
//! replica that can silently miss messages while it reconnects (so the poll would have to
//! stay as the safety net anyway), and of sharded pub/sub on Cluster. One `GET` per replica
//! every 250 ms costs nothing, works the same on Cluster, and there is nothing to lose on a
//! reconnect: the next answer simply carries the current counter.
//!
//! # A Redis that forgets
//!
//! A Redis restarted without persistence comes back empty. Its counter then starts again,
//! and a plain `INCR` would count 1, 2, … anew: a replica that last saw 1 would take the
//! first new key for "no change" and never load it. So the first write on an empty Redis
//! seeds the counter with the writer's clock in microseconds, a value no earlier counter of
//! that Redis shares. Keys themselves are gone with the data: run Redis with persistence.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use redis::{RedisError, Script};

use super::{KeyStore, StoredKey};
use crate::config::StoreUrl;
use crate::quota::redis::store_error;
use crate::quota::{StoreError, StoreFuture};
use crate::shared_redis::SharedRedis;

const KEYS_HASH: &str = "kg:keys:{admin}";
const VERSION_KEY: &str = "kg:keys:{admin}:v";

/// KEYS: the hash, the counter. ARGV: verb (`create`, `replace`, `delete`), counter seed,
/// id, JSON record. Answers 1 when it wrote (and bumped the counter), 0 when it did not.
const SCRIPT: &str = r#"
local verb, seed, id = ARGV[1], ARGV[2], ARGV[3]
local wrote
if verb == 'create' then
  wrote = redis.call('HSETNX', KEYS[1], id, ARGV[4])
elseif verb == 'replace' then
  wrote = redis.call('HEXISTS', KEYS[1], id)
  if wrote == 1 then redis.call('HSET', KEYS[1], id, ARGV[4]) end
elseif verb == 'delete' then
  wrote = redis.call('HDEL', KEYS[1], id)
else
  return redis.error_reply('unknown verb ' .. verb)
end
if wrote == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], seed) end
redis.call('INCR', KEYS[2])
return 1
"#;

/// KEYS: the hash, the counter. Answers the counter (0 when missing) and the hash's
/// fields and values, read in one step so they belong together.
const LOAD_SCRIPT: &str = r#"
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('HGETALL', KEYS[1])}
"#;

/// At most one fresh connection per this interval, however often calls fail.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

pub struct RedisKeyStore {
    url: StoreUrl,
    connection: ArcSwap<SharedRedis>,
    script: Script,
    load_script: Script,
    timeout: Duration,
    reopened: Mutex<Instant>,
}

#[derive(Clone, Copy)]
enum Write {
    Create,
    Replace,
    Delete,
}

impl Write {
    fn as_str(self) -> &'static str {
        match self {
            Write::Create => "create",
            Write::Replace => "replace",
            Write::Delete => "delete",
        }
    }
}

impl RedisKeyStore {
    /// A key store on the Redis (or Cluster) a URL names, with its own connection so admin
    /// calls never queue behind quota decisions. Connects lazily, like the quota store.
    /// Every call gives up after `timeout`.
    pub fn open(url: &StoreUrl, timeout: Duration) -> Result<Self, String> {
        let connection =
            SharedRedis::open(url)?.ok_or_else(|| "memory:// is not a Redis URL".to_string())?;
        Ok(Self {
            url: url.clone(),
            connection: ArcSwap::from_pointee(connection),
            script: Script::new(SCRIPT),
            load_script: Script::new(LOAD_SCRIPT),
            timeout,
            reopened: Mutex::new(Instant::now()),
        })
    }

    fn connection(&self) -> SharedRedis {
        SharedRedis::clone(&self.connection.load())
    }

    /// Runs one Redis call within the bound. A call that did not reach Redis swaps in a
    /// fresh connection for the next one: a half-open connection (peer gone without a
    /// reset) would otherwise keep timing out.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        let error = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => store_error(error),
            Err(_) => StoreError::Timeout(self.timeout),
        };
        if matches!(error, StoreError::Unreachable(_) | StoreError::Timeout(_)) {
            self.reopen();
        }
        Err(error)
    }

    fn reopen(&self) {
        let mut last = self.reopened.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < REOPEN_INTERVAL {
            return;
        }
        *last = Instant::now();
        match SharedRedis::open(&self.url) {
            Ok(Some(fresh)) => self.connection.store(Arc::new(fresh)),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "cannot reopen the admin key store connection"),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection();
        self.bounded(async move { cmd.query_async(&mut connection).await })
            .await
    }

    async fn write(&self, verb: Write, id: &str, record: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(KEYS_HASH)
            .key(VERSION_KEY)
            .arg(verb.as_str())
            .arg(counter_seed())
            .arg(id)
            .arg(record);
        let wrote: i64 = self
            .bounded(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        Ok(wrote == 1)
    }
}

/// Microseconds since the epoch: the counter's start on an empty Redis (see the module doc).
fn counter_seed() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2))
}

fn record_json(key: &StoredKey) -> Result<String, StoreError> {
    serde_json::to_string(key).map_err(|e| StoreError::Protocol(e.to_string()))
}

/// The hash's records; one that does not parse is skipped (and logged), so a bad record
/// can never take every other key down with it.
fn parse_records(fields: Vec<(String, String)>) -> Vec<StoredKey> {
    fields
        .into_iter()
        .filter_map(|(id, json)| match serde_json::from_str::<StoredKey>(&json) {
            Ok(key) if key.id == id => Some(key),
            Ok(_) => {
                tracing::warn!(key_id = %id, "stored admin key names another id; ignored");
                None
            }
            Err(error) => {
                tracing::warn!(key_id = %id, %error, "stored admin key does not parse; ignored");
                None
            }
        })
        .collect()
}

impl KeyStore for RedisKeyStore {
    fn load(&self) -> StoreFuture<'_, (u64, Vec<StoredKey>)> {
        Box::pin(async move {
            let mut connection = self.connection();
            let mut invocation = self.load_script.prepare_invoke();
            invocation.key(KEYS_HASH).key(VERSION_KEY);
            let (version, fields): (u64, Vec<(String, String)>) = self
                .bounded(async move { invocation.invoke_async(&mut connection).await })
                .await?;
            Ok((version, parse_records(fields)))
        })
    }

    fn create(&self, key: StoredKey) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            self.write(Write::Create, &key.id, &record_json(&key)?)
                .await
        })
    }

    fn replace(&self, key: StoredKey) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            self.write(Write::Replace, &key.id, &record_json(&key)?)
                .await
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(self.write(Write::Delete, id, ""))
    }

    fn version(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let version: Option<u64> = self.query(redis::cmd("GET").arg(VERSION_KEY)).await?;
            Ok(version.unwrap_or(0))
        })
    }

    fn kind(&self) -> &'static str {
        self.connection.load().kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> StoredKey {
        StoredKey {
            id: id.into(),
            team: "design".into(),
            scopes: vec!["generate".into()],
            env: "prod".into(),
            token_sha256: "ab".repeat(32),
            created: "2026-11-27T10:00:00Z".into(),
            expires: None,
            rpm: None,
            rpd: None,
            previous: None,
        }
    }

    #[test]
    fn one_bad_record_does_not_hide_the_others() {
        let good = serde_json::to_string(&key("good")).unwrap();
        let forged = serde_json::to_string(&key("other")).unwrap();
        let keys = parse_records(vec![
            ("good".into(), good),
            ("broken".into(), "{not json".into()),
            ("forged".into(), forged),
        ]);
        assert_eq!(keys, vec![key("good")]);
    }

    #[test]
    fn hash_and_counter_share_one_hash_tag() {
        let tag = |k: &'static str| &k[k.find('{').unwrap()..=k.find('}').unwrap()];
        assert_eq!(tag(KEYS_HASH), tag(VERSION_KEY));
    }

    #[test]
    fn a_fresh_counter_starts_past_any_plain_count() {
        assert!(counter_seed() > 1_000_000_000_000_000);
    }
}
