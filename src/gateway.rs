//! Owns the gateway's shared state: the hot-swappable snapshot built from a config and the
//! admin-made keys (routes, keys, limits), the quota store, the upstream client and keys,
//! and the clock.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use jiff::Timestamp;

use crate::auth::{ApiKey, KeyOrigin, KeyRegistry};
use crate::clock::Clock;
use crate::config::{parse_sha256_hex, Config, OnStoreError};
use crate::forward::Upstream;
use crate::in_flight::InFlight;
use crate::key_store::{KeyStore, StoredKey};
use crate::observe::Observer;
use crate::quota::calendar::DayCalendar;
use crate::quota::failover::{FailoverStore, StoreHealth};
use crate::quota::{Limits, QuotaStore, Subject, SubjectKind};
use crate::request_id::RequestIds;
use crate::routing::{Route, RouteTable};
use crate::scope::{Scope, Scopes};
use crate::throttle::AddressThrottle;
use crate::upstream_keys::UpstreamKeys;

/// Everything requests read, derived from one config plus the admin-made keys. Swapped
/// whole, so a request sees one consistent version from start to finish.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// Every accepted token digest (a rotated key has two until its grace ends).
    pub keys: KeyRegistry,
    /// One record per key id, for listing.
    pub by_id: BTreeMap<Arc<str>, Arc<ApiKey>>,
}

/// One key as defined in the config or through the admin API, before it becomes records.
struct KeyDefinition<'a> {
    id: &'a str,
    team: &'a str,
    scopes: Scopes,
    env: &'a str,
    expires: Option<Timestamp>,
    rpm: Option<u64>,
    rpd: Option<u64>,
    origin: KeyOrigin,
    created: Option<Timestamp>,
    digest: [u8; 32],
    /// A replaced token still accepted until the given time.
    previous: Option<([u8; 32], Timestamp)>,
}

impl Snapshot {
    /// Builds the snapshot. `previous` carries per-key state (last use) across rebuilds.
    pub fn build(
        config: Arc<Config>,
        admin_keys: &[StoredKey],
        previous: Option<&Snapshot>,
    ) -> Self {
        let routes = RouteTable::new(
            config
                .routes
                .iter()
                .map(|r| Route {
                    method: r.method.clone(),
                    prefix: r.prefix.clone(),
                    scope: r.scope,
                    label: r.label.as_str().into(),
                })
                .collect(),
        );
        let mut snapshot = Self {
            config: config.clone(),
            routes,
            keys: KeyRegistry::default(),
            by_id: BTreeMap::new(),
        };
        for key in &config.keys {
            snapshot.add(
                KeyDefinition {
                    id: &key.id,
                    team: &key.team,
                    scopes: key.scopes,
                    env: &key.env,
                    expires: key.expires,
                    rpm: key.rpm,
                    rpd: key.rpd,
                    origin: KeyOrigin::Config,
                    created: None,
                    digest: key.token_sha256,
                    previous: None,
                },
                previous,
            );
        }
        for stored in admin_keys {
            match admin_definition(stored) {
                Ok(definition) => snapshot.add(definition, previous),
                Err(problem) => {
                    tracing::warn!(key_id = %stored.id, problem = %problem, "admin key ignored")
                }
            }
        }
        snapshot
    }

    fn add(&mut self, key: KeyDefinition<'_>, previous: Option<&Snapshot>) {
        if self.by_id.contains_key(key.id) {
            tracing::warn!(key_id = %key.id, "key id defined twice; the config file's wins");
            return;
        }
        let config = &self.config;
        let Some(team) = config.team(key.team) else {
            tracing::warn!(key_id = %key.id, team = %key.team, "key names an unknown team; ignored");
            return;
        };
        if !config.upstream.keys.contains_key(key.env) {
            tracing::warn!(key_id = %key.id, env = %key.env, "key names an unknown env; ignored");
            return;
        }
        let team_name: Arc<str> = team.name.as_str().into();
        let mut subjects = vec![Subject {
            kind: SubjectKind::Team,
            id: team_name.clone(),
            limits: team.limits,
        }];
        if key.rpm.is_some() || key.rpd.is_some() {
            subjects.push(Subject {
                kind: SubjectKind::Key,
                id: key.id.into(),
                limits: Limits {
                    rpm: key.rpm.unwrap_or(team.limits.rpm),
                    rpd: key.rpd.unwrap_or(team.limits.rpd),
                },
            });
        }
        if let Some(limits) = config.upstream.limits {
            subjects.push(Subject {
                kind: SubjectKind::Upstream,
                id: "upstream".into(),
                limits,
            });
        }
        let subjects: Arc<[Subject]> = subjects.into();
        let last_used_ms = previous
            .and_then(|p| p.by_id.get(key.id))
            .map(|k| k.last_used_ms.clone())
            .unwrap_or_else(|| Arc::new(AtomicI64::new(0)));
        let record = |expires| ApiKey {
            id: key.id.into(),
            team: team_name.clone(),
            scopes: key.scopes,
            env: key.env.into(),
            expires,
            rpm: key.rpm,
            rpd: key.rpd,
            origin: key.origin,
            created: key.created,
            last_used_ms: last_used_ms.clone(),
            subjects: subjects.clone(),
        };
        let current = Arc::new(record(key.expires));
        self.keys.insert(key.digest, current.clone());
        self.by_id.insert(current.id.clone(), current);
        if let Some((digest, until)) = key.previous {
            let until = key.expires.map_or(until, |e| e.min(until));
            self.keys.insert(digest, Arc::new(record(Some(until))));
        }
    }
}

fn parse_time(text: &str, field: &str) -> Result<Timestamp, String> {
    text.parse()
        .map_err(|_| format!("{field} {text:?} is not an RFC 3339 time"))
}

fn admin_definition(stored: &StoredKey) -> Result<KeyDefinition<'_>, String> {
    let mut scopes = Scopes::default();
    for name in &stored.scopes {
        scopes.insert(Scope::parse(name).ok_or_else(|| format!("unknown scope {name:?}"))?);
    }
    let digest =
        parse_sha256_hex(&stored.token_sha256).ok_or("token_sha256 is not 64 hex digits")?;
    let previous = match &stored.previous {
        Some(p) => Some((
            parse_sha256_hex(&p.token_sha256)
                .ok_or("previous token_sha256 is not 64 hex digits")?,
            parse_time(&p.until, "previous.until")?,
        )),
        None => None,
    };
    Ok(KeyDefinition {
        id: &stored.id,
        team: &stored.team,
        scopes,
        env: &stored.env,
        expires: stored
            .expires
            .as_deref()
            .map(|t| parse_time(t, "expires"))
            .transpose()?,
        rpm: stored.rpm,
        rpd: stored.rpd,
        origin: KeyOrigin::Admin,
        created: Some(parse_time(&stored.created, "created")?),
        digest,
        previous,
    })
}

/// Settings of the edge that cannot change without a restart.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    pub trusted_proxies: Vec<IpNet>,
    pub max_body_bytes: u64,
    /// Longest pause between two pieces of a request body.
    pub body_read_timeout: std::time::Duration,
    /// Least average rate of a request body while keygate waits on the client (0: off).
    pub body_min_rate: u64,
    pub on_store_error: OnStoreError,
    pub store_timeout: std::time::Duration,
}

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// The inputs of the snapshot, kept so either can change alone.
    sources: Mutex<(Arc<Config>, Arc<Vec<StoredKey>>)>,
    /// The quota store behind `store.timeout` and `store.on_error`.
    pub store: Arc<dyn QuotaStore>,
    /// Whether the store is degraded, since when and why (`/readyz`, metrics, alerts).
    pub store_health: Arc<StoreHealth>,
    pub key_store: Arc<dyn KeyStore>,
    pub upstream: Upstream,
    pub upstream_keys: UpstreamKeys,
    /// `[upstream.retry]`, fixed at start like the rest of the upstream connection.
    pub retry: crate::config::RetryPolicy,
    pub circuit: Arc<crate::circuit::CircuitBreaker>,
    pub clock: Arc<dyn Clock>,
    pub edge: EdgeSettings,
    /// Proxied requests being served, up to `server.max_requests_in_flight` (fixed at
    /// start, like the listener's connection cap).
    pub requests_in_flight: Arc<InFlight>,
    pub request_ids: RequestIds,
    pub observer: Observer,
    pub throttle: AddressThrottle,
    pub reload_stats: crate::reload::ReloadStats,
    /// Whether the admin-made keys this replica serves are current with the key store.
    pub key_sync: crate::reload::KeySyncHealth,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn QuotaStore>,
        key_store: Arc<dyn KeyStore>,
        clock: Arc<dyn Clock>,
        mut observer: Observer,
    ) -> Result<Self, String> {
        let metrics = &observer.metrics;
        let upstream = Upstream::new(
            &config.upstream,
            metrics.upstream_connections(),
            metrics.upstream_resends(),
        )?;
        let upstream_keys = UpstreamKeys::load(&config.upstream.keys);
        for (env, problem) in upstream_keys.problems() {
            tracing::warn!(env = %env, problem = %problem, "no usable upstream key: requests for this env answer 503");
        }
        let edge = EdgeSettings {
            trusted_proxies: config.server.trusted_proxies.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            body_min_rate: config.server.body_min_rate,
            on_store_error: config.store.on_error,
            store_timeout: config.store.timeout,
        };
        let store = FailoverStore::new(
            store,
            &config.store,
            clock.clone(),
            DayCalendar::new(config.day_tz.clone()),
        );
        let store_health = store.health();
        observer.set_store_health(store_health.clone());
        let admin_keys = Arc::new(Vec::new());
        let throttle = AddressThrottle::new(if config.anomalies.enabled {
            config.anomalies.invalid_tokens_per_minute
        } else {
            0
        });
        let retry = config.upstream.retry;
        let circuit = Arc::new(crate::circuit::CircuitBreaker::new(
            config.upstream.circuit,
            observer.metrics.clone(),
        ));
        let requests_in_flight = InFlight::new(config.server.max_requests_in_flight);
        observer.set_requests_in_flight(requests_in_flight.clone());
        Ok(Self {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config.clone(), &admin_keys, None)),
            sources: Mutex::new((config, admin_keys)),
            store: Arc::new(store),
            store_health,
            key_store,
            upstream,
            upstream_keys,
            retry,
            circuit,
            clock,
            requests_in_flight,
            edge,
            request_ids: RequestIds::default(),
            throttle,
            observer,
            reload_stats: Default::default(),
            key_sync: Default::default(),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces routes, teams, plans and config keys for new requests; in-flight ones keep
    /// theirs.
    pub fn apply_config(&self, config: Arc<Config>) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.0 = config;
        self.rebuild(&sources);
    }

    /// Replaces the admin-made keys (after a change in the key store).
    pub fn apply_admin_keys(&self, keys: Vec<StoredKey>) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.1 = Arc::new(keys);
        self.rebuild(&sources);
    }

    fn rebuild(&self, sources: &(Arc<Config>, Arc<Vec<StoredKey>>)) {
        let previous = self.snapshot.load();
        let next = Snapshot::build(sources.0.clone(), &sources.1, Some(&previous));
        self.snapshot.store(Arc::new(next));
    }

    /// Re-reads the admin-made keys from the key store now; returns the version they are at.
    pub async fn refresh_admin_keys(&self) -> Result<u64, crate::quota::StoreError> {
        let (version, keys) = self.key_store.load().await?;
        self.apply_admin_keys(keys);
        Ok(version)
    }

    /// The team subjects of the current config, for reading usage without charging.
    pub fn team_subjects(&self) -> Vec<Subject> {
        self.snapshot()
            .config
            .teams
            .iter()
            .map(|team| Subject {
                kind: SubjectKind::Team,
                id: team.name.as_str().into(),
                limits: team.limits,
            })
            .collect()
    }

    pub fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        crate::client_addr::client_ip(peer, headers, &self.edge.trusted_proxies)
    }
}
