//! Owns keys made through the admin API: the stored record (hash only, never a token) and
//! the stores that hold them — in this process, or shared so every replica sees a change.
//!
//! Replicas notice changes by polling a version number that every write bumps (see
//! [`KeyStore::version`]): one tiny read per interval, no subscription to lose, and the
//! same mechanism works on a single Redis and on Redis Cluster.

pub mod redis;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::quota::StoreFuture;

/// A key created through the admin API, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub id: String,
    pub team: String,
    pub scopes: Vec<String>,
    pub env: String,
    /// SHA-256 hex of the token. The token itself is shown once and never stored.
    pub token_sha256: String,
    /// RFC 3339.
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    /// The token a rotation replaced, still accepted until `until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousToken>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousToken {
    pub token_sha256: String,
    /// RFC 3339: the end of the rotation's grace period.
    pub until: String,
}

/// How long one key store call may take: admin calls and the replicas' follower are off the
/// request path, so a busy Redis gets at least a second rather than a decision's tight
/// `store.timeout`.
pub fn call_timeout(store_timeout: Duration) -> Duration {
    store_timeout.max(Duration::from_secs(1))
}

pub trait KeyStore: Send + Sync + 'static {
    /// Every stored key and the version they are at, read together: a replica that took
    /// the version from a separate read could hold keys newer than the version it noted,
    /// and miss a later return to that version (a Redis restarted empty).
    fn load(&self) -> StoreFuture<'_, (u64, Vec<StoredKey>)>;
    /// Every stored key.
    fn list(&self) -> StoreFuture<'_, Vec<StoredKey>> {
        Box::pin(async move { self.load().await.map(|(_, keys)| keys) })
    }
    /// Stores a new key; `false` when the id is taken.
    fn create(&self, key: StoredKey) -> StoreFuture<'_, bool>;
    /// Replaces an existing key; `false` when there is none with that id.
    fn replace(&self, key: StoredKey) -> StoreFuture<'_, bool>;
    /// Removes a key; `false` when there was none.
    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool>;
    /// A number that changes with every write, so replicas know when to re-read.
    fn version(&self) -> StoreFuture<'_, u64>;
    fn kind(&self) -> &'static str;
}

/// Keys that live in this process only: with the memory quota store there is one replica.
#[derive(Default)]
pub struct MemoryKeyStore {
    state: Mutex<(u64, BTreeMap<String, StoredKey>)>,
}

impl MemoryKeyStore {
    fn with<T>(&self, f: impl FnOnce(&mut u64, &mut BTreeMap<String, StoredKey>) -> T) -> T {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (version, keys) = &mut *guard;
        f(version, keys)
    }
}

impl KeyStore for MemoryKeyStore {
    fn load(&self) -> StoreFuture<'_, (u64, Vec<StoredKey>)> {
        let loaded = self.with(|version, keys| (*version, keys.values().cloned().collect()));
        Box::pin(std::future::ready(Ok(loaded)))
    }

    fn create(&self, key: StoredKey) -> StoreFuture<'_, bool> {
        let created = self.with(|version, keys| {
            if keys.contains_key(&key.id) {
                return false;
            }
            keys.insert(key.id.clone(), key);
            *version += 1;
            true
        });
        Box::pin(std::future::ready(Ok(created)))
    }

    fn replace(&self, key: StoredKey) -> StoreFuture<'_, bool> {
        let replaced = self.with(|version, keys| match keys.get_mut(&key.id) {
            Some(existing) => {
                *existing = key;
                *version += 1;
                true
            }
            None => false,
        });
        Box::pin(std::future::ready(Ok(replaced)))
    }

    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let deleted = self.with(|version, keys| {
            let removed = keys.remove(id).is_some();
            if removed {
                *version += 1;
            }
            removed
        });
        Box::pin(std::future::ready(Ok(deleted)))
    }

    fn version(&self) -> StoreFuture<'_, u64> {
        let version = self.with(|version, _| *version);
        Box::pin(std::future::ready(Ok(version)))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
