//! Owns the real upstream keys per environment: reading them from env vars or files, and
//! handing out the `Authorization` value for a request. Keys exist only as [`Secret`]s and
//! sensitive header values.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

struct EnvKeys {
    source: KeySource,
    headers: ArcSwap<Result<Vec<HeaderValue>, String>>,
    next: AtomicUsize,
}

impl EnvKeys {
    fn load(source: KeySource) -> Self {
        let loaded = Self::read(&source);
        Self {
            source,
            headers: ArcSwap::from_pointee(loaded),
            next: AtomicUsize::new(0),
        }
    }

    fn read(source: &KeySource) -> Result<Vec<HeaderValue>, String> {
        read_source(source).map(|keys| keys.iter().filter_map(Secret::bearer_header).collect())
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

    /// The `Authorization` value for the next request in `env`, rotating through the keys.
    pub fn authorization(&self, env: &str) -> Result<HeaderValue, String> {
        let envs = self.envs.load();
        let env_keys = envs
            .get(env)
            .ok_or_else(|| format!("no upstream key configured for env {env:?}"))?;
        let loaded = env_keys.headers.load();
        match &**loaded {
            Ok(headers) if !headers.is_empty() => {
                let i = env_keys.next.fetch_add(1, Ordering::Relaxed) % headers.len();
                Ok(headers[i].clone())
            }
            Ok(_) => Err(format!("env {env:?} holds no key")),
            Err(e) => Err(format!("env {env:?}: {e}")),
        }
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
                Ok(headers) => keys.headers.store(Arc::new(Ok(headers))),
                Err(e) => {
                    tracing::warn!(env = %env, error = %e, "upstream key source unreadable; keeping the last good keys");
                    if keys.headers.load().is_err() {
                        keys.headers.store(Arc::new(Err(e)));
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
            .filter_map(|(env, keys)| match &**keys.headers.load() {
                Ok(h) if !h.is_empty() => None,
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
