//! Owns applying changes to a running gateway without a restart: config file edits (watched
//! through its directory, so editors' and Kubernetes' rename-swaps are seen) and SIGHUP,
//! upstream key files, and keys made through the admin API on any replica.
//!
//! An invalid edit keeps the last good config; every problem is logged and counted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::gateway::Gateway;

/// How often replicas look for admin-made key changes: the bound on how long a revocation
/// takes to reach every replica.
pub const KEY_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Counts of reload attempts, for `/readyz` and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub applied: AtomicU64,
    pub rejected: AtomicU64,
}

/// Reloads the config file now: applies it when valid, keeps the last good one otherwise.
/// Upstream key files are re-read either way.
pub fn reload_config(gateway: &Gateway, path: &Path) -> Result<(), String> {
    let outcome = match Config::load(path) {
        Ok(next) => {
            let current = gateway.snapshot().config.clone();
            for section in restart_only_changes(&current, &next) {
                tracing::warn!(
                    section,
                    "config change needs a restart to take effect; the running value is kept"
                );
            }
            gateway.upstream_keys.apply_sources(&next.upstream.keys);
            gateway.apply_config(Arc::new(next));
            gateway.reload_stats.applied.fetch_add(1, Ordering::Relaxed);
            tracing::info!(config = %path.display(), "config reloaded");
            Ok(())
        }
        Err(error) => {
            gateway
                .reload_stats
                .rejected
                .fetch_add(1, Ordering::Relaxed);
            for problem in &error.problems {
                tracing::error!(config = %path.display(), problem = %problem, "config reload rejected; keeping the last good config");
            }
            Err(error.to_string())
        }
    };
    gateway.upstream_keys.reload();
    outcome
}

/// Sections that are read once at start (listeners, upstream client, store, calendar).
fn restart_only_changes(current: &Config, next: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if differs(&current.server, &next.server) {
        changed.push("server");
    }
    if differs(&current.upstream.url, &next.upstream.url)
        || current.upstream.timeout != next.upstream.timeout
        || current.upstream.connect_timeout != next.upstream.connect_timeout
        || current.upstream.ca_file != next.upstream.ca_file
        || current.upstream.protocol != next.upstream.protocol
    {
        changed.push("upstream (url, timeouts, ca_file, protocol)");
    }
    if current.upstream.retry != next.upstream.retry
        || current.upstream.circuit != next.upstream.circuit
    {
        changed.push("upstream.retry / upstream.circuit");
    }
    if differs(&current.store, &next.store) {
        changed.push("store");
    }
    if current.day_tz_name != next.day_tz_name {
        changed.push("quotas.day_tz");
    }
    if differs(&current.alerts, &next.alerts) {
        changed.push("alerts");
    }
    if differs(&current.usage_log, &next.usage_log) {
        changed.push("usage_log");
    }
    changed
}

/// Starts the background tasks that keep a gateway current: the admin-key follower always,
/// and the config/key-file watcher plus SIGHUP when the gateway runs from a config file.
pub fn spawn(
    tasks: &mut tokio::task::JoinSet<()>,
    gateway: Arc<Gateway>,
    config_path: Option<PathBuf>,
    shutdown: watch::Receiver<bool>,
) {
    tasks.spawn(follow_key_store(gateway.clone(), shutdown.clone()));
    tasks.spawn(watch_files(gateway, config_path, shutdown));
}

/// Polls the key store's version and re-reads the keys when it moved. While the store does
/// not answer, the keys last read stay in force: an outage must not revoke every key.
async fn follow_key_store(gateway: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let mut seen: Option<u64> = None;
    let mut ticker = tokio::time::interval(KEY_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = crate::key_store::call_timeout(gateway.edge.store_timeout);
    let sync = &gateway.key_sync;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let version = match tokio::time::timeout(timeout, gateway.key_store.version()).await {
            Ok(Ok(version)) => version,
            Ok(Err(e)) => {
                sync.failed(e.to_string());
                continue;
            }
            Err(_) => {
                sync.failed(format!("no answer within {timeout:?}"));
                continue;
            }
        };
        // After an outage the keys are read again whatever the counter says: the store
        // may have restarted in between.
        if seen == Some(version) && !sync.is_stale() {
            continue;
        }
        if version == 0 && seen.is_some_and(|v| v != 0) {
            tracing::warn!(
                store = gateway.key_store.kind(),
                "the admin key store is empty again (a Redis restarted without persistence?): \
                 admin-made keys are gone on every replica"
            );
        }
        match tokio::time::timeout(timeout, gateway.refresh_admin_keys()).await {
            Ok(Ok(loaded)) => {
                sync.synced();
                seen = Some(loaded);
            }
            Ok(Err(e)) => sync.failed(e.to_string()),
            Err(_) => sync.failed(format!("no answer within {timeout:?}")),
        }
    }
}

/// Whether this replica's copy of the admin-made keys is current, for `/readyz`. Logs each
/// change of state once, not every poll.
#[derive(Debug, Default)]
pub struct KeySyncHealth {
    stale_since: Mutex<Option<(jiff::Timestamp, String)>>,
}

impl KeySyncHealth {
    fn failed(&self, error: String) {
        let mut stale = self.stale_since.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *stale {
            Some((_, last)) => *last = error,
            None => {
                tracing::warn!(%error, "cannot read admin keys from the store; keeping the last known keys");
                *stale = Some((jiff::Timestamp::now(), error));
            }
        }
    }

    fn synced(&self) {
        let mut stale = self.stale_since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, _)) = stale.take() {
            let stale_for = jiff::Timestamp::now().duration_since(since);
            tracing::info!(
                stale_for_ms = stale_for.as_millis() as i64,
                "admin keys readable again"
            );
        }
    }

    pub fn is_stale(&self) -> bool {
        self.stale_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Since when and why the admin keys could not be read; `None` while current.
    pub fn stale(&self) -> Option<(jiff::Timestamp, String)> {
        self.stale_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What the watched files hold now, one digest each (`None`: unreadable). The directories
/// watched may hold busy neighbours (a usage log next to the config writes many times a
/// second): only a change of these contents is worth a reload.
fn fingerprint(config_path: Option<&Path>, gateway: &Gateway) -> Vec<Option<[u8; 32]>> {
    config_path
        .map(Path::to_path_buf)
        .into_iter()
        .chain(gateway.upstream_keys.files())
        .map(|path| {
            std::fs::read(path)
                .ok()
                .map(|bytes| crate::auth::sha256(&bytes))
        })
        .collect()
}

fn watched_dirs(config_path: Option<&Path>, gateway: &Gateway) -> BTreeSet<PathBuf> {
    let parent = |p: &Path| {
        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        }
    };
    config_path
        .into_iter()
        .map(parent)
        .chain(gateway.upstream_keys.files().iter().map(|p| parent(p)))
        .collect()
}

async fn watch_files(
    gateway: Arc<Gateway>,
    config_path: Option<PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already means "reload pending": coalesce.
            let _ = watcher_tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP instead");
            None
        }
    };
    let mut watching = BTreeSet::new();
    let mut follow = |watcher: &mut Option<notify::RecommendedWatcher>, gateway: &Gateway| {
        let Some(watcher) = watcher.as_mut() else {
            return;
        };
        for dir in watched_dirs(config_path.as_deref(), gateway) {
            if watching.contains(&dir) {
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watching.insert(dir);
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory")
                }
            }
        }
    };
    follow(&mut watcher, &gateway);

    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = fingerprint(config_path.as_deref(), &gateway);
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        tokio::select! {
            Some(()) = rx.recv() => {
                // Editors write in several steps: let the burst settle, then read once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                if fingerprint(config_path.as_deref(), &gateway) == seen {
                    continue;
                }
            }
            _ = sighup => tracing::info!("SIGHUP: reloading"),
            _ = shutdown.changed() => return,
        }
        // Taken before reading: an edit landing meanwhile differs from it and is read next.
        seen = fingerprint(config_path.as_deref(), &gateway);
        match &config_path {
            Some(path) => {
                let _ = reload_config(&gateway, path);
            }
            None => gateway.upstream_keys.reload(),
        }
        follow(&mut watcher, &gateway);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = include_str!("../config/keygate.toml");

    #[test]
    fn retry_and_circuit_changes_are_named_as_restart_only() {
        let current = Config::from_toml(REFERENCE).expect("reference config validates");
        assert!(restart_only_changes(&current, &current).is_empty());
        for (from, to) in [
            ("attempts = 3", "attempts = 5"),
            ("cooldown = \"10s\"", "cooldown = \"30s\""),
        ] {
            assert!(REFERENCE.contains(from), "{from}");
            let next = Config::from_toml(&REFERENCE.replacen(from, to, 1)).unwrap();
            assert_eq!(
                restart_only_changes(&current, &next),
                vec!["upstream.retry / upstream.circuit"],
                "{to}"
            );
        }
    }

    #[test]
    fn an_upstream_protocol_change_is_named_as_restart_only() {
        let current = Config::from_toml(REFERENCE).expect("reference config validates");
        let from = "connect_timeout = \"5s\"";
        assert!(REFERENCE.contains(from));
        let next = Config::from_toml(&REFERENCE.replacen(
            from,
            "connect_timeout = \"5s\"\nprotocol = \"http2\"",
            1,
        ))
        .unwrap();
        assert_eq!(
            restart_only_changes(&current, &next),
            vec!["upstream (url, timeouts, ca_file, protocol)"]
        );
    }
}
