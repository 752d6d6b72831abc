//! Owns alerts (SPEC §5): the events (`quota_warning`, `store_degraded`,
//! `store_recovered`, `anomaly`) as one JSON object each, their fleet-wide deduplication,
//! a WARN log line, and delivery to every webhook: a JSON POST retried with exponential
//! backoff and jitter, then dropped. Raising an alert never waits: it goes into a bounded
//! queue that a background task drains.
//!
//! Payloads name teams, key ids and client addresses, never tokens or keys. A webhook URL
//! may itself be a secret (Slack's are), so only its host is ever logged.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use jiff::Timestamp;
use ring::rand::SecureRandom;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::anomaly::Finding;
use crate::config::{AlertsConfig, OnStoreError};
use crate::metrics::{AlertKind, Metrics};
use crate::quota::{StoreError, Window};

/// Alerts waiting for the dispatcher. Alerts are rare; a full queue means a storm, and
/// dropping (counted) beats holding up requests.
const QUEUE_CAPACITY: usize = 1024;

/// Deliveries (one alert to one webhook, with its retries) in flight at once.
const MAX_DELIVERIES: usize = 256;

/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Bound on one deduplication call: past it, this replica decides alone.
const DEDUPE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq)]
pub enum AlertEvent {
    QuotaWarning {
        team: String,
        window: Window,
        threshold: f64,
        used: u64,
        limit: u64,
        resets_at: Timestamp,
    },
    StoreDegraded {
        mode: OnStoreError,
        error: String,
    },
    StoreRecovered {
        mode: OnStoreError,
        down_for: Duration,
    },
    Anomaly(Finding),
    /// The upstream answered 401 for one of its real keys: revoked or rotated at the
    /// upstream. Named by env and position in its source, never by value.
    UpstreamKeyRejected {
        env: String,
        key_index: usize,
        rested_for: Duration,
    },
}

impl AlertEvent {
    pub fn kind(&self) -> AlertKind {
        match self {
            AlertEvent::QuotaWarning { .. } => AlertKind::QuotaWarning,
            AlertEvent::StoreDegraded { .. } => AlertKind::StoreDegraded,
            AlertEvent::StoreRecovered { .. } => AlertKind::StoreRecovered,
            AlertEvent::Anomaly(_) => AlertKind::Anomaly,
            AlertEvent::UpstreamKeyRejected { .. } => AlertKind::UpstreamKeyRejected,
        }
    }

    /// The one-line human summary (Slack shows it as is).
    pub fn text(&self) -> String {
        match self {
            AlertEvent::QuotaWarning {
                team,
                window,
                threshold,
                used,
                limit,
                resets_at,
            } => format!(
                "keygate: team {team} reached {}% of its {} quota ({used} of {limit}); resets at {resets_at:.0}",
                (threshold * 100.0).round(),
                window.as_str()
            ),
            AlertEvent::StoreDegraded { mode, error } => format!(
                "keygate: quota store unreachable ({error}); on_error = {}: {}",
                mode.as_str(),
                match mode {
                    OnStoreError::Local => "each replica enforces its share of every limit",
                    OnStoreError::Open => "requests are admitted without quota",
                    OnStoreError::Closed => "requests are refused with 503",
                }
            ),
            AlertEvent::StoreRecovered { mode, down_for } => format!(
                "keygate: quota store reachable again after {}s (on_error = {})",
                down_for.as_secs(),
                mode.as_str()
            ),
            AlertEvent::Anomaly(finding) => finding.summary(),
            AlertEvent::UpstreamKeyRejected {
                env,
                key_index,
                rested_for,
            } => format!(
                "keygate: the upstream refused {env} key #{key_index} (401); it is out of turn for {}s and requests use the other {env} keys. Replace or remove it.",
                rested_for.as_secs()
            ),
        }
    }

    /// The JSON object sent to webhooks and written to the log.
    pub fn payload(&self, at: Timestamp) -> Value {
        let mut body = json!({
            "kind": self.kind().as_str(),
            "at": format!("{at:.0}"),
            "text": self.text(),
        });
        let fields = match self {
            AlertEvent::QuotaWarning {
                team,
                window,
                threshold,
                used,
                limit,
                resets_at,
            } => json!({
                "team": team,
                "window": window.as_str(),
                "threshold": threshold,
                "used": used,
                "limit": limit,
                "resets_at": format!("{resets_at:.0}"),
            }),
            AlertEvent::StoreDegraded { mode, error } => {
                json!({ "mode": mode.as_str(), "error": error })
            }
            AlertEvent::StoreRecovered { mode, down_for } => {
                json!({ "mode": mode.as_str(), "down_for": down_for.as_secs_f64() })
            }
            AlertEvent::Anomaly(f) => json!({
                "signal": f.signal.as_str(),
                "team": f.team,
                "key_id": f.key_id,
                "observed": f.observed,
                "baseline": f.baseline,
                "client_ip": f.client_ip,
            }),
            AlertEvent::UpstreamKeyRejected {
                env,
                key_index,
                rested_for,
            } => json!({
                "env": env,
                "key_index": key_index,
                "rested_for": rested_for.as_secs_f64(),
            }),
        };
        if let (Value::Object(body), Value::Object(fields)) = (&mut body, fields) {
            body.extend(fields);
        }
        body
    }
}

// ---------------------------------------------------------------------------------------
// Deduplication.

pub type DedupeFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send + 'a>>;

/// Remembers which alerts were already raised, fleet-wide when the store is shared.
pub trait AlertDedupe: Send + Sync + 'static {
    /// True the first time `key` is claimed within `ttl` (Redis: `SET key 1 NX PX ttl`).
    fn claim<'a>(&'a self, key: &'a str, ttl: Duration) -> DedupeFuture<'a>;
}

/// Deduplication within one process (the memory store, and the fallback while a shared
/// store cannot answer).
#[derive(Default)]
pub struct MemoryDedupe {
    claimed: Mutex<HashMap<String, Instant>>,
}

impl MemoryDedupe {
    pub fn claim_now(&self, key: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        if claimed.len() > 4096 {
            claimed.retain(|_, until| *until > now);
        }
        match claimed.get(key) {
            Some(until) if *until > now => false,
            _ => {
                claimed.insert(key.to_string(), now + ttl);
                true
            }
        }
    }
}

impl AlertDedupe for MemoryDedupe {
    fn claim<'a>(&'a self, key: &'a str, ttl: Duration) -> DedupeFuture<'a> {
        Box::pin(async move { Ok(self.claim_now(key, ttl)) })
    }
}

/// The latest alert events (as sent), newest last, bounded: for the dashboard.
#[derive(Debug, Default)]
pub struct RecentAlerts {
    events: Mutex<std::collections::VecDeque<Value>>,
}

impl RecentAlerts {
    pub const CAPACITY: usize = 200;

    pub fn push(&self, event: Value) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == Self::CAPACITY {
            events.pop_front();
        }
        events.push_back(event);
    }

    pub fn list(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Deduplication across the fleet in the shared Redis: `SET key 1 NX PX ttl`.
pub struct RedisDedupe {
    redis: crate::shared_redis::SharedRedis,
}

impl RedisDedupe {
    pub fn new(redis: crate::shared_redis::SharedRedis) -> Self {
        Self { redis }
    }
}

impl AlertDedupe for RedisDedupe {
    fn claim<'a>(&'a self, key: &'a str, ttl: Duration) -> DedupeFuture<'a> {
        let mut redis = self.redis.clone();
        Box::pin(async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
                .query_async(&mut redis)
                .await
                .map_err(|e| StoreError::Unreachable(e.to_string()))?;
            Ok(set.is_some())
        })
    }
}

// ---------------------------------------------------------------------------------------
// Raising and delivering.

struct Pending {
    event: AlertEvent,
    /// Raise only if this key is claimed first, for this long.
    once: Option<(String, Duration)>,
}

/// The handle that raises alerts; cheap to clone, never waits.
#[derive(Clone)]
pub struct Alerts {
    queue: mpsc::Sender<Pending>,
    metrics: Arc<Metrics>,
}

/// The background half, to be run on the runtime by [`AlertDispatcher::run`].
pub struct AlertDispatcher {
    queue: mpsc::Receiver<Pending>,
    metrics: Arc<Metrics>,
    dedupe: Arc<dyn AlertDedupe>,
    fallback: MemoryDedupe,
    delivery: Arc<Delivery>,
    deliveries: Arc<Semaphore>,
    recent: Arc<RecentAlerts>,
}

impl Alerts {
    pub fn new(
        config: &AlertsConfig,
        metrics: Arc<Metrics>,
        dedupe: Arc<dyn AlertDedupe>,
        recent: Arc<RecentAlerts>,
    ) -> Result<(Alerts, AlertDispatcher), String> {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let delivery = Delivery::new(config, metrics.clone())?;
        Ok((
            Alerts {
                queue,
                metrics: metrics.clone(),
            },
            AlertDispatcher {
                queue: receiver,
                metrics,
                dedupe,
                fallback: MemoryDedupe::default(),
                delivery: Arc::new(delivery),
                deliveries: Arc::new(Semaphore::new(MAX_DELIVERIES)),
                recent,
            },
        ))
    }

    /// Raises an alert now.
    pub fn raise(&self, event: AlertEvent) {
        self.enqueue(Pending { event, once: None });
    }

    /// Raises an alert unless `key` was already claimed (by any replica) within `ttl`.
    pub fn raise_once(&self, event: AlertEvent, key: String, ttl: Duration) {
        self.enqueue(Pending {
            event,
            once: Some((key, ttl)),
        });
    }

    fn enqueue(&self, pending: Pending) {
        if let Err(e) = self.queue.try_send(pending) {
            self.metrics.alert_dropped();
            let kind = match &e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => {
                    p.event.kind()
                }
            };
            tracing::warn!(
                target: "keygate::alert",
                kind = kind.as_str(),
                "alert dropped: the alert queue is full"
            );
        }
    }
}

impl AlertDispatcher {
    /// Drains the queue until every [`Alerts`] handle is gone.
    pub async fn run(mut self) {
        while let Some(pending) = self.queue.recv().await {
            if let Some((key, ttl)) = &pending.once {
                if !self.first(key, *ttl).await {
                    continue;
                }
            }
            self.dispatch(pending.event);
        }
    }

    async fn first(&self, key: &str, ttl: Duration) -> bool {
        match tokio::time::timeout(DEDUPE_TIMEOUT, self.dedupe.claim(key, ttl)).await {
            Ok(Ok(first)) => first,
            Ok(Err(_)) | Err(_) => {
                // The shared store cannot say: decide locally rather than stay silent or
                // repeat the alert for every request.
                self.fallback.claim_now(key, ttl)
            }
        }
    }

    fn dispatch(&self, event: AlertEvent) {
        let kind = event.kind();
        let payload = event.payload(Timestamp::now());
        self.metrics.alert_sent(kind);
        tracing::warn!(
            target: "keygate::alert",
            kind = kind.as_str(),
            alert = %payload,
            "{}",
            event.text()
        );
        let body = Bytes::from(payload.to_string());
        self.recent.push(payload);
        for webhook in &self.delivery.webhooks {
            let Ok(permit) = self.deliveries.clone().try_acquire_owned() else {
                self.metrics.alert_dropped();
                tracing::warn!(
                    target: "keygate::alert",
                    webhook = %webhook_host(webhook),
                    "alert not delivered: too many deliveries in flight"
                );
                continue;
            };
            let delivery = self.delivery.clone();
            let webhook = webhook.clone();
            let body = body.clone();
            tokio::spawn(async move {
                delivery.deliver(&webhook, body).await;
                drop(permit);
            });
        }
    }
}

/// What is safe to log of a webhook URL: scheme and host, never the path (a secret for
/// Slack incoming webhooks).
fn webhook_host(uri: &Uri) -> String {
    format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map_or("?", |a| a.as_str())
    )
}

type WebhookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Delivery {
    client: WebhookClient,
    webhooks: Vec<Uri>,
    max_attempts: u32,
    backoff: Duration,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Delivery {
    fn new(config: &AlertsConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let connector = crate::forward::https_connector(
            roots,
            config.timeout,
            crate::config::UpstreamProtocol::Http1,
        )?;
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            webhooks: config.webhooks.clone(),
            max_attempts: config.max_attempts,
            backoff: config.retry_backoff,
            timeout: config.timeout,
            metrics,
        })
    }

    async fn deliver(&self, webhook: &Uri, body: Bytes) {
        for attempt in 1..=self.max_attempts {
            let failure = match self.post(webhook, body.clone()).await {
                Ok(status) if status.is_success() => return,
                Ok(status) => format!("answered {status}"),
                Err(e) => e,
            };
            self.metrics.alert_delivery_failed();
            if attempt == self.max_attempts {
                self.metrics.alert_dropped();
                tracing::warn!(
                    target: "keygate::alert",
                    webhook = %webhook_host(webhook),
                    attempts = attempt,
                    failure = %failure,
                    "alert dropped: the webhook failed every attempt"
                );
                return;
            }
            let wait = backoff(self.backoff, attempt);
            tracing::debug!(
                target: "keygate::alert",
                webhook = %webhook_host(webhook),
                attempt,
                failure = %failure,
                retry_in_ms = wait.as_millis() as u64,
                "alert delivery failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn post(&self, webhook: &Uri, body: Bytes) -> Result<http::StatusCode, String> {
        let request = Request::post(webhook.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("keygate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) if e.is_connect() => Err("cannot connect".into()),
            Ok(Err(_)) => Err("request failed".into()),
            Ok(Ok(response)) => Ok(response.status()),
        }
    }
}

/// Exponential backoff with "equal jitter": half the doubled delay for sure, the other
/// half at random, so retries from many replicas spread out.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let doubled = base
        .saturating_mul(1u32 << (attempt - 1).min(16))
        .min(MAX_BACKOFF);
    let half = doubled / 2;
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    let fraction = f64::from(u32::from_ne_bytes(bytes)) / f64::from(u32::MAX);
    half + half.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for attempt in 1..=4u32 {
            let full = base * (1 << (attempt - 1));
            let wait = backoff(base, attempt);
            assert!(
                wait >= full / 2 && wait <= full,
                "attempt {attempt}: {wait:?}"
            );
        }
        assert!(backoff(base, 30) <= MAX_BACKOFF);
    }

    #[test]
    fn quota_warning_payload_has_the_spec_fields() {
        let event = AlertEvent::QuotaWarning {
            team: "design".into(),
            window: Window::Minute,
            threshold: 0.8,
            used: 80,
            limit: 100,
            resets_at: "2026-01-01T00:01:00Z".parse().unwrap(),
        };
        let payload = event.payload("2026-01-01T00:00:30Z".parse().unwrap());
        assert_eq!(
            payload,
            json!({
                "kind": "quota_warning",
                "at": "2026-01-01T00:00:30Z",
                "text": "keygate: team design reached 80% of its minute quota (80 of 100); resets at 2026-01-01T00:01:00Z",
                "team": "design",
                "window": "minute",
                "threshold": 0.8,
                "used": 80,
                "limit": 100,
                "resets_at": "2026-01-01T00:01:00Z",
            })
        );
    }

    #[test]
    fn webhook_paths_are_never_logged() {
        let uri: Uri = "https://hooks.slack.com/services/T000/B000/SECRETPATH"
            .parse()
            .unwrap();
        assert_eq!(webhook_host(&uri), "https://hooks.slack.com");
    }

    #[tokio::test]
    async fn memory_dedupe_claims_once_per_ttl() {
        let dedupe = MemoryDedupe::default();
        assert!(dedupe.claim("a", Duration::from_secs(60)).await.unwrap());
        assert!(!dedupe.claim("a", Duration::from_secs(60)).await.unwrap());
        assert!(dedupe.claim("b", Duration::from_secs(60)).await.unwrap());
        assert!(dedupe.claim_now("c", Duration::ZERO));
        assert!(dedupe.claim_now("c", Duration::ZERO));
    }
}
