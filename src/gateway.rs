//! Owns the gateway's shared state: the hot-swappable snapshot built from a config (routes,
//! keys, limits), the quota store, the upstream client and keys, and the clock.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

use crate::auth::{ApiKey, KeyRegistry};
use crate::clock::Clock;
use crate::config::{Config, OnStoreError};
use crate::forward::Upstream;
use crate::observe::Observer;
use crate::quota::{Limits, QuotaStore, Subject, SubjectKind};
use crate::request_id::RequestIds;
use crate::routing::{Route, RouteTable};
use crate::upstream_keys::UpstreamKeys;

/// Everything derived from one config that requests read. Swapped whole on reload, so a
/// request sees one consistent version from start to finish.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub keys: KeyRegistry,
}

impl Snapshot {
    pub fn build(config: Arc<Config>) -> Self {
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
        let upstream_subject = config.upstream.limits.map(|limits| Subject {
            kind: SubjectKind::Upstream,
            id: "upstream".into(),
            limits,
        });
        let mut keys = KeyRegistry::default();
        for key in &config.keys {
            let Some(team) = config.team(&key.team) else {
                continue;
            };
            let team_name: Arc<str> = team.name.as_str().into();
            let mut subjects = vec![Subject {
                kind: SubjectKind::Team,
                id: team_name.clone(),
                limits: team.limits,
            }];
            if key.rpm.is_some() || key.rpd.is_some() {
                subjects.push(Subject {
                    kind: SubjectKind::Key,
                    id: key.id.as_str().into(),
                    limits: Limits {
                        rpm: key.rpm.unwrap_or(team.limits.rpm),
                        rpd: key.rpd.unwrap_or(team.limits.rpd),
                    },
                });
            }
            subjects.extend(upstream_subject.clone());
            keys.insert(
                key.token_sha256,
                Arc::new(ApiKey {
                    id: key.id.as_str().into(),
                    team: team_name,
                    scopes: key.scopes,
                    env: key.env.as_str().into(),
                    expires: key.expires,
                    subjects: subjects.into(),
                }),
            );
        }
        Self {
            config,
            routes,
            keys,
        }
    }
}

/// Settings of the edge that cannot change without a restart.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    pub trusted_proxies: Vec<IpNet>,
    pub max_body_bytes: u64,
    /// Longest pause between two pieces of a request body.
    pub body_read_timeout: std::time::Duration,
    pub on_store_error: OnStoreError,
    pub store_timeout: std::time::Duration,
}

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub store: Arc<dyn QuotaStore>,
    pub upstream: Upstream,
    pub upstream_keys: UpstreamKeys,
    pub clock: Arc<dyn Clock>,
    pub edge: EdgeSettings,
    pub request_ids: RequestIds,
    pub observer: Observer,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn QuotaStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let upstream = Upstream::new(&config.upstream)?;
        let upstream_keys = UpstreamKeys::load(&config.upstream.keys);
        for (env, problem) in upstream_keys.problems() {
            tracing::warn!(env = %env, problem = %problem, "no usable upstream key: requests for this env answer 503");
        }
        let edge = EdgeSettings {
            trusted_proxies: config.server.trusted_proxies.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            on_store_error: config.store.on_error,
            store_timeout: config.store.timeout,
        };
        Ok(Self {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config)),
            store,
            upstream,
            upstream_keys,
            clock,
            edge,
            request_ids: RequestIds::default(),
            observer: Observer::default(),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces routes, keys and limits for new requests; in-flight ones keep theirs.
    pub fn apply_config(&self, config: Arc<Config>) {
        self.snapshot.store(Arc::new(Snapshot::build(config)));
    }

    pub fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        crate::client_addr::client_ip(peer, headers, &self.edge.trusted_proxies)
    }
}
