//! Owns the real upstream keys per environment: reading them from env vars or files, and
//! handing out the `Authorization` value for a request. Keys exist only as [`Secret`]s and
//! sensitive header values.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::config::KeySource;
use crate::secret::Secret;

/// Reads the keys of one source. A file holds one key per line (blank lines and `#`
/// comments skipped); several keys are used in turn.
pub fn read_source(source: &KeySource) -> Result<Vec<Secret>, String> {
    let keys: Vec<Secret> = match source {
        KeySource::Env(var) => match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => vec![Secret::new(value.trim())],
            Ok(_) => return Err(format!("env var {var} is empty")),
            Err(_) => return Err(format!("env var {var} is not set")),
        },
        KeySource::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(Secret::new)
                .collect()
        }
        KeySource::Inline(keys) => keys.clone(),
    };
    if keys.is_empty() {
        return Err("holds no key".to_string());
    }
    for key in &keys {
        if key.bearer_header().is_none() {
            return Err("holds a key with characters not allowed in a header".to_string());
        }
    }
    Ok(keys)
}

/// How long a key the upstream answered 401 for sits out: long enough not to burn requests
/// on a revoked key, short enough to notice an upstream that recovered.
pub const REJECTED_REST: Duration = Duration::from_secs(300);
/// How long a key the upstream answered 429 for sits out when no Retry-After says.
const THROTTLED_REST: Duration = Duration::from_secs(30);
const MAX_REST: Duration = Duration::from_secs(600);

/// The keys of one environment, loaded together from one source.
struct LoadedKeys {
    headers: Vec<HeaderValue>,
    /// Per key: Unix ms until which it is left out of turn (0: in turn).
    rested_until_ms: Vec<AtomicI64>,
}

struct EnvKeys {
    source: KeySource,
    keys: ArcSwap<Result<LoadedKeys, String>>,
    next: AtomicUsize,
}

impl EnvKeys {
    fn load(source: KeySource) -> Self {
        let loaded = Self::read(&source);
        Self {
            source,
            keys: ArcSwap::from_pointee(loaded),
            next: AtomicUsize::new(0),
        }
    }

    fn read(source: &KeySource) -> Result<LoadedKeys, String> {
        read_source(source).map(|keys| {
            let headers: Vec<HeaderValue> = keys.iter().filter_map(Secret::bearer_header).collect();
            LoadedKeys {
                rested_until_ms: headers.iter().map(|_| AtomicI64::new(0)).collect(),
                headers,
            }
        })
    }
}

/// The real key chosen for one request, and the way to report what the upstream thought
/// of it. Names the key by its position, never by value.
pub struct UpstreamCredential {
    pub authorization: HeaderValue,
    pub env: Arc<str>,
    pub index: usize,
    /// Unix ms until which this key sits out (0: in turn). Non-zero only when every key
    /// of the env rests and this one is back first.
    pub rested_until_ms: i64,
    keys: Arc<EnvKeys>,
}

impl UpstreamCredential {
    /// Takes this key out of turn after the upstream refused it: 401 (revoked or rotated at
    /// the upstream) or 429 (its own rate limit; `retry_after` when the upstream said).
    /// Returns the rest when the key was in turn until now, so a caller alerts once per
    /// rest, not once per request that raced into the same refusal.
    pub fn rest_after(
        &self,
        status: u16,
        retry_after: Option<Duration>,
        now_ms: i64,
    ) -> Option<Duration> {
        let rest = match status {
            401 => REJECTED_REST,
            429 => retry_after.unwrap_or(THROTTLED_REST).min(MAX_REST),
            _ => return None,
        };
        let loaded = self.keys.keys.load();
        let Ok(loaded) = &**loaded else { return None };
        // Only the same key list: a reload may have replaced it since.
        if loaded.headers.get(self.index) != Some(&self.authorization) {
            return None;
        }
        let until = now_ms + rest.as_millis() as i64;
        let before = loaded.rested_until_ms[self.index].fetch_max(until, Ordering::Relaxed);
        if before > now_ms {
            return None;
        }
        tracing::warn!(env = %self.env, key_index = self.index, status, rest_secs = rest.as_secs(), "upstream refused a key; it sits out for a while");
        Some(rest)
    }

    /// How long this key still rests, from `now_ms`.
    pub fn rests_for(&self, now_ms: i64) -> Option<Duration> {
        (self.rested_until_ms > now_ms)
            .then(|| Duration::from_millis((self.rested_until_ms - now_ms) as u64))
    }
}

impl EnvKeys {
    /// The next key in turn, skipping rested ones; when every key rests, the one whose rest
    /// ends first.
    fn pick(&self, now_ms: i64) -> Result<(usize, HeaderValue, i64), String> {
        let loaded = self.keys.load();
        let loaded = match &**loaded {
            Ok(loaded) if !loaded.headers.is_empty() => loaded,
            Ok(_) => return Err("holds no key".to_string()),
            Err(e) => return Err(e.clone()),
        };
        let n = loaded.headers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut soonest = (i64::MAX, start % n);
        for step in 0..n {
            let i = (start + step) % n;
            let until = loaded.rested_until_ms[i].load(Ordering::Relaxed);
            if until <= now_ms {
                return Ok((i, loaded.headers[i].clone(), 0));
            }
            if until < soonest.0 {
                soonest = (until, i);
            }
        }
        Ok((soonest.1, loaded.headers[soonest.1].clone(), soonest.0))
    }
}

/// The upstream keys of every environment. The set of environments and their sources can
/// change on a config reload; an unchanged source keeps its keys and rotation position.
pub struct UpstreamKeys {
    envs: ArcSwap<HashMap<String, Arc<EnvKeys>>>,
}

impl UpstreamKeys {
    pub fn load(sources: &BTreeMap<String, KeySource>) -> Self {
        let keys = Self {
            envs: ArcSwap::from_pointee(HashMap::new()),
        };
        keys.apply_sources(sources);
        keys
    }

    /// Switches to a new set of sources (after a config reload).
    pub fn apply_sources(&self, sources: &BTreeMap<String, KeySource>) {
        let current = self.envs.load();
        let next = sources
            .iter()
            .map(|(env, source)| {
                let keys = match current.get(env) {
                    Some(existing) if existing.source == *source => existing.clone(),
                    _ => Arc::new(EnvKeys::load(source.clone())),
                };
                (env.clone(), keys)
            })
            .collect();
        self.envs.store(Arc::new(next));
    }

    /// The credential for the next request in `env`, rotating through its keys.
    pub fn credential(&self, env: &Arc<str>, now_ms: i64) -> Result<UpstreamCredential, String> {
        let envs = self.envs.load();
        let keys = envs
            .get(&**env)
            .ok_or_else(|| format!("no upstream key configured for env {env:?}"))?
            .clone();
        let (index, authorization, rested_until_ms) =
            keys.pick(now_ms).map_err(|e| format!("env {env:?}: {e}"))?;
        Ok(UpstreamCredential {
            authorization,
            env: env.clone(),
            index,
            rested_until_ms,
            keys,
        })
    }

    /// The `Authorization` value for the next request in `env`.
    pub fn authorization(&self, env: &str) -> Result<HeaderValue, String> {
        self.credential(&Arc::from(env), jiff::Timestamp::now().as_millisecond())
            .map(|c| c.authorization)
    }

    /// The files keys are read from, so a watcher can follow them.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        self.envs
            .load()
            .values()
            .filter_map(|keys| match &keys.source {
                KeySource::File(path) => Some(path.clone()),
                _ => None,
            })
            .collect()
    }

    /// Re-reads every source, keeping the last good keys of a source that now fails.
    pub fn reload(&self) {
        for (env, keys) in self.envs.load().iter() {
            match EnvKeys::read(&keys.source) {
                Ok(fresh) => {
                    let unchanged = matches!(&**keys.keys.load(), Ok(current) if current.headers == fresh.headers);
                    if !unchanged {
                        keys.keys.store(Arc::new(Ok(fresh)));
                    }
                }
                Err(e) => {
                    tracing::warn!(env = %env, error = %e, "upstream key source unreadable; keeping the last good keys");
                    if keys.keys.load().is_err() {
                        keys.keys.store(Arc::new(Err(e)));
                    }
                }
            }
        }
    }

    /// Environments without a usable key, with the reason (for `/readyz` and `check`).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = self
            .envs
            .load()
            .iter()
            .filter_map(|(env, keys)| match &**keys.keys.load() {
                Ok(loaded) if !loaded.headers.is_empty() => None,
                Ok(_) => Some((env.clone(), "holds no key".to_string())),
                Err(e) => Some((env.clone(), e.clone())),
            })
            .collect();
        problems.sort();
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_keys_rotate_and_skip_comments() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "# rotated 2026-11\nsk-one\n\nsk-two").unwrap();
        let sources = BTreeMap::from([("prod".to_string(), KeySource::File(file.path().into()))]);
        let keys = UpstreamKeys::load(&sources);
        let a = keys.authorization("prod").unwrap();
        let b = keys.authorization("prod").unwrap();
        assert_eq!(a.to_str().unwrap(), "Bearer sk-one");
        assert_eq!(b.to_str().unwrap(), "Bearer sk-two");
        assert!(keys.problems().is_empty());
    }

    #[test]
    fn missing_sources_are_reported_without_the_value() {
        let sources = BTreeMap::from([(
            "prod".to_string(),
            KeySource::Env("KEYGATE_TEST_SURELY_UNSET_VAR".into()),
        )]);
        let keys = UpstreamKeys::load(&sources);
        assert!(keys.authorization("prod").is_err());
        assert!(keys.authorization("dev").is_err());
        assert_eq!(keys.problems().len(), 1);
    }
}
