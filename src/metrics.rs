//! Owns the Prometheus metrics: label-bounded series updated with plain atomics on the
//! request path, and their rendering as Prometheus text (exposition format 0.0.4, the one
//! `promtool check metrics` accepts) for `GET /metrics`.
//!
//! Label values come only from configuration (teams, key ids, route labels) and from fixed
//! enums (outcome, status, reason): never from client input. A request with no key or no
//! route is counted under `"-"`.

use std::fmt::Write as _;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hashbrown::{DefaultHashBuilder, Equivalent, HashTable};

use crate::circuit::CircuitState;
use crate::context::{Outcome, Rejection, RequestContext};
use crate::error::AuthFailure;
use crate::in_flight::InFlight;
use crate::quota::SliceCounters;

/// The label value of a request without a key, a team or a route.
pub const NONE_LABEL: &str = "-";

/// Latency buckets in seconds: fast refusals at the bottom, slow image generations at the
/// top (the upstream may take up to two minutes).
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Quota decision buckets in seconds: a decision on one Redis takes a fraction of a
/// millisecond, and `store.timeout` (50 ms by default) is where it stops waiting, so the
/// buckets are fine below it and few above (decisions late past it still finish).
pub const DECISION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Every kind of alert, as the `kind` label of `keygate_alerts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertKind {
    QuotaWarning,
    StoreDegraded,
    StoreRecovered,
    Anomaly,
    UpstreamKeyRejected,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::QuotaWarning,
        AlertKind::StoreDegraded,
        AlertKind::StoreRecovered,
        AlertKind::Anomaly,
        AlertKind::UpstreamKeyRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::QuotaWarning => "quota_warning",
            AlertKind::StoreDegraded => "store_degraded",
            AlertKind::StoreRecovered => "store_recovered",
            AlertKind::Anomaly => "anomaly",
            AlertKind::UpstreamKeyRejected => "upstream_key_rejected",
        }
    }
}

/// Why a usage line was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageDrop {
    /// The writer's queue was full: the request did not wait.
    QueueFull,
    /// The line could not be written to its file.
    WriteError,
    /// The line was not appended to `usage_log.redis_stream` (queue full or Redis failed);
    /// it is still in the file.
    Stream,
}

impl UsageDrop {
    const ALL: [UsageDrop; 3] = [
        UsageDrop::QueueFull,
        UsageDrop::WriteError,
        UsageDrop::Stream,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UsageDrop::QueueFull => "queue_full",
            UsageDrop::WriteError => "write_error",
            UsageDrop::Stream => "stream",
        }
    }
}

/// The HTTP status as a bounded label: the codes keygate and the image API answer with,
/// and the class for anything else an upstream might send.
pub fn status_label(status: u16) -> &'static str {
    const KNOWN: [(u16, &str); 26] = [
        (200, "200"),
        (201, "201"),
        (202, "202"),
        (204, "204"),
        (206, "206"),
        (301, "301"),
        (302, "302"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (402, "402"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (409, "409"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (429, "429"),
        (431, "431"),
        (500, "500"),
        (501, "501"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Ok(i) = KNOWN.binary_search_by_key(&status, |(code, _)| *code) {
        return KNOWN[i].1;
    }
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------------
// Series storage.

const SHARDS: usize = 16;

/// Series created on first use and kept forever (their label values are bounded by
/// configuration). A lookup hashes the labels once and takes one shard's read lock; only a
/// new series takes a write lock. Lookups use a borrowed form of the labels, so the hot
/// path clones and allocates nothing.
struct SeriesMap<K, V> {
    hasher: DefaultHashBuilder,
    shards: [RwLock<HashTable<(K, V)>>; SHARDS],
}

impl<K: Hash, V: Default> SeriesMap<K, V> {
    fn new() -> Self {
        Self {
            hasher: DefaultHashBuilder::default(),
            shards: std::array::from_fn(|_| RwLock::new(HashTable::new())),
        }
    }

    /// Runs `f` on the series of `labels`, creating it (from `owned`) on first use. `Q`
    /// must hash exactly as `K` does.
    fn with<Q, R>(&self, labels: &Q, owned: impl FnOnce(&Q) -> K, f: impl Fn(&V) -> R) -> R
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let hash = self.hasher.hash_one(labels);
        // The top bits pick the shard; the table uses the low ones.
        let shard = &self.shards[(hash >> 60) as usize % SHARDS];
        {
            let table = shard.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, value)) = table.find(hash, |(k, _)| labels.equivalent(k)) {
                return f(value);
            }
        }
        let mut table = shard.write().unwrap_or_else(|p| p.into_inner());
        if let Some((_, value)) = table.find(hash, |(k, _)| labels.equivalent(k)) {
            return f(value);
        }
        let entry = table.insert_unique(hash, (owned(labels), V::default()), |(k, _)| {
            self.hasher.hash_one(k)
        });
        f(&entry.get().1)
    }

    /// Every series, in no particular order.
    fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for shard in &self.shards {
            let table = shard.read().unwrap_or_else(|p| p.into_inner());
            for (k, v) in table.iter() {
                f(k, v);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestLabels {
    team: Arc<str>,
    key_id: Arc<str>,
    route: Arc<str>,
    status: &'static str,
    outcome: Outcome,
}

/// The borrowed twin of [`RequestLabels`]: same fields in the same order, so both hash alike.
#[derive(Hash)]
struct RequestLabelsRef<'a> {
    team: &'a str,
    key_id: &'a str,
    route: &'a str,
    status: &'static str,
    outcome: Outcome,
}

impl Equivalent<RequestLabels> for RequestLabelsRef<'_> {
    fn equivalent(&self, key: &RequestLabels) -> bool {
        self.status == key.status
            && self.outcome == key.outcome
            && self.key_id == &*key.key_id
            && self.route == &*key.route
            && self.team == &*key.team
    }
}

/// A route's latency histograms: the whole request per outcome, and the upstream's part.
/// One lookup per request finds both.
#[derive(Default)]
struct RouteLatency {
    by_outcome: [Histogram; Outcome::ALL.len()],
    upstream: Histogram,
}

/// A fixed-bucket histogram: one atomic add per bucket hit, the sum in nanoseconds.
pub struct Histogram {
    bounds: &'static [f64; LATENCY_BUCKETS.len()],
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    /// Request latency buckets.
    fn default() -> Self {
        Histogram::with_bounds(&LATENCY_BUCKETS)
    }
}

impl Histogram {
    pub fn with_bounds(bounds: &'static [f64; LATENCY_BUCKETS.len()]) -> Histogram {
        Histogram {
            bounds,
            buckets: Default::default(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let index = self
            .bounds
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(value.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn is_empty(&self) -> bool {
        self.buckets.iter().all(|b| b.load(Ordering::Relaxed) == 0)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(bound) => format_float(*bound),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", format_float(sum));
        // The count is the +Inf bucket, so the two never disagree within one scrape.
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// The team's quota as last seen, fleet-wide (the store's view, not this replica's share).
#[derive(Default)]
struct QuotaGauges {
    minute_used: AtomicU64,
    minute_limit: AtomicU64,
    day_used: AtomicU64,
    day_limit: AtomicU64,
}

/// What the metrics need to know about the quota store's health, supplied by the store.
pub trait StoreHealthView: Send + Sync {
    /// Store calls that failed since start.
    fn errors_total(&self) -> u64;
    /// The store is unreachable and the `on_error` policy is in force.
    fn degraded(&self) -> bool;
}

/// The health view until a store reports its own: no errors, never degraded.
#[derive(Default)]
pub struct UnreportedStoreHealth;

impl StoreHealthView for UnreportedStoreHealth {
    fn errors_total(&self) -> u64 {
        0
    }

    fn degraded(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------
// The registry.

pub struct Metrics {
    requests: SeriesMap<RequestLabels, AtomicU64>,
    latency: SeriesMap<Arc<str>, RouteLatency>,
    quota: SeriesMap<Arc<str>, QuotaGauges>,
    rejections: [AtomicU64; Rejection::ALL.len()],
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    alerts: [AtomicU64; AlertKind::ALL.len()],
    alert_deliveries_failed: AtomicU64,
    alerts_dropped: AtomicU64,
    upstream_retries: AtomicU64,
    /// Connections to the upstream open now, counted by the upstream pool.
    upstream_connections: crate::upstream_pool::OpenConnections,
    /// Requests the HTTP/2 upstream pool sent again, by reason, counted by the pool.
    upstream_resends: crate::upstream_h2::Resends,
    /// [`CircuitState::gauge`] of the upstream circuit.
    circuit_state: std::sync::atomic::AtomicU8,
    circuit_opened: AtomicU64,
    usage_log_dropped: [AtomicU64; UsageDrop::ALL.len()],
    /// How long quota decisions took, the store's queue included.
    quota_decisions: Histogram,
    /// The `"-"` label, allocated once.
    none: Arc<str>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: SeriesMap::new(),
            latency: SeriesMap::new(),
            quota: SeriesMap::new(),
            rejections: Default::default(),
            auth_failures: Default::default(),
            alerts: Default::default(),
            alert_deliveries_failed: AtomicU64::new(0),
            alerts_dropped: AtomicU64::new(0),
            upstream_retries: AtomicU64::new(0),
            upstream_connections: Default::default(),
            upstream_resends: Default::default(),
            circuit_state: Default::default(),
            circuit_opened: AtomicU64::new(0),
            usage_log_dropped: Default::default(),
            quota_decisions: Histogram::with_bounds(&DECISION_BUCKETS),
            none: NONE_LABEL.into(),
        }
    }

    /// What the upstream pool counts its open connections in.
    pub fn upstream_connections(&self) -> crate::upstream_pool::OpenConnections {
        self.upstream_connections.clone()
    }

    /// What the HTTP/2 upstream pool counts the requests it sends again in.
    pub fn upstream_resends(&self) -> crate::upstream_h2::Resends {
        self.upstream_resends.clone()
    }

    /// Records one finished request: every per-request series, from the one context the
    /// usage line is also written from.
    pub fn record_request(&self, ctx: &RequestContext, latency: Duration) {
        let route = ctx.route.as_deref().unwrap_or(NONE_LABEL);
        let labels = RequestLabelsRef {
            team: ctx.team().unwrap_or(NONE_LABEL),
            key_id: ctx.key_id().unwrap_or(NONE_LABEL),
            route,
            status: status_label(ctx.status),
            outcome: ctx.outcome,
        };
        self.requests.with(
            &labels,
            |l| RequestLabels {
                team: self.label(ctx.key.as_ref().map(|k| &k.team), l.team),
                key_id: self.label(ctx.key.as_ref().map(|k| &k.id), l.key_id),
                route: self.label(ctx.route.as_ref(), l.route),
                status: l.status,
                outcome: l.outcome,
            },
            |count| count.fetch_add(1, Ordering::Relaxed),
        );
        self.latency.with(
            route,
            |r| self.label(ctx.route.as_ref(), r),
            |h| {
                // Indexed by discriminant (`Outcome::ALL` order, checked by a test).
                if let Some(histogram) = h.by_outcome.get(ctx.outcome as usize) {
                    histogram.observe(latency);
                }
                if let Some(upstream) = ctx.upstream_latency {
                    h.upstream.observe(upstream);
                }
            },
        );
        if let Some(decided_in) = ctx.quota_latency {
            self.quota_decisions.observe(decided_in);
        }
        if ctx.upstream_retries > 0 {
            self.upstream_retries
                .fetch_add(u64::from(ctx.upstream_retries), Ordering::Relaxed);
        }
        if let Some(rejection) = ctx.rejection {
            self.rejections[rejection as usize].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(failure) = ctx.auth_failure {
            if let Some(count) = self.auth_failures.get(failure as usize) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn label(&self, configured: Option<&Arc<str>>, fallback: &str) -> Arc<str> {
        match configured {
            Some(value) => value.clone(),
            None if fallback == NONE_LABEL => self.none.clone(),
            None => fallback.into(),
        }
    }

    /// Sets a team's quota gauges from a fresh read of the store (at scrape time).
    pub fn set_quota(&self, team: &Arc<str>, minute: (u64, u64), day: (u64, u64)) {
        self.quota.with(
            &**team,
            |_| team.clone(),
            |g| {
                g.minute_used.store(minute.0, Ordering::Relaxed);
                g.minute_limit.store(minute.1, Ordering::Relaxed);
                g.day_used.store(day.0, Ordering::Relaxed);
                g.day_limit.store(day.1, Ordering::Relaxed);
            },
        );
    }

    pub fn alert_sent(&self, kind: AlertKind) {
        self.alerts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn alert_delivery_failed(&self) {
        self.alert_deliveries_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn alert_dropped(&self) {
        self.alerts_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_circuit_state(&self, state: CircuitState) {
        self.circuit_state.store(state.gauge(), Ordering::Relaxed);
    }

    pub fn circuit_opened(&self) {
        self.circuit_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn usage_line_dropped(&self, why: UsageDrop) {
        self.usage_log_dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn usage_lines_dropped(&self, why: UsageDrop) -> u64 {
        self.usage_log_dropped[why as usize].load(Ordering::Relaxed)
    }

    /// Renders every family as Prometheus text.
    /// `in_flight`: the request cap's count, when there is one; `slices`: what local slices
    /// of quota did, when the store takes them (`store.local_slices`).
    pub fn render(
        &self,
        store: &dyn StoreHealthView,
        in_flight: Option<&InFlight>,
        slices: Option<SliceCounters>,
    ) -> String {
        let mut out = String::with_capacity(16 * 1024);
        family(
            &mut out,
            "keygate_build_info",
            "gauge",
            "Always 1; the labels name the running build.",
        );
        let _ = writeln!(
            out,
            "keygate_build_info{{version=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION"))
        );

        family(
            &mut out,
            "keygate_requests_total",
            "counter",
            "Finished requests by team, key id, route, status and outcome.",
        );
        let mut rows = Vec::new();
        self.requests.for_each(|l, count| {
            rows.push((
                format!(
                    "team=\"{}\",key_id=\"{}\",route=\"{}\",status=\"{}\",outcome=\"{}\"",
                    escape(&l.team),
                    escape(&l.key_id),
                    escape(&l.route),
                    l.status,
                    l.outcome.as_str()
                ),
                count.load(Ordering::Relaxed),
            ));
        });
        rows.sort();
        for (labels, value) in rows {
            let _ = writeln!(out, "keygate_requests_total{{{labels}}} {value}");
        }

        family(
            &mut out,
            "keygate_request_duration_seconds",
            "histogram",
            "Time from the request head to the end of the response body, by route and outcome.",
        );
        let mut routes = Vec::new();
        self.latency.for_each(|route, h| {
            let mut total = String::new();
            for outcome in Outcome::ALL {
                let histogram = &h.by_outcome[outcome as usize];
                if !histogram.is_empty() {
                    histogram.render(
                        &mut total,
                        "keygate_request_duration_seconds",
                        &format!(
                            "route=\"{}\",outcome=\"{}\"",
                            escape(route),
                            outcome.as_str()
                        ),
                    );
                }
            }
            let mut upstream = String::new();
            if !h.upstream.is_empty() {
                h.upstream.render(
                    &mut upstream,
                    "keygate_upstream_duration_seconds",
                    &format!("route=\"{}\"", escape(route)),
                );
            }
            routes.push((route.clone(), total, upstream));
        });
        routes.sort();
        for (_, total, _) in &routes {
            out.push_str(total);
        }
        family(
            &mut out,
            "keygate_upstream_duration_seconds",
            "histogram",
            "Time the upstream took to answer with its response head, by route.",
        );
        for (_, _, upstream) in &routes {
            out.push_str(upstream);
        }

        let mut quota = Vec::new();
        self.quota.for_each(|team, g| {
            quota.push((
                team.clone(),
                [
                    g.minute_used.load(Ordering::Relaxed),
                    g.minute_limit.load(Ordering::Relaxed),
                    g.day_used.load(Ordering::Relaxed),
                    g.day_limit.load(Ordering::Relaxed),
                ],
            ));
        });
        quota.sort();
        family(
            &mut out,
            "keygate_quota_used",
            "gauge",
            "Requests counted in the team's window, fleet-wide, as this replica last saw it.",
        );
        for (team, v) in &quota {
            let team = escape(team);
            let _ = writeln!(
                out,
                "keygate_quota_used{{team=\"{team}\",window=\"minute\"}} {}",
                v[0]
            );
            let _ = writeln!(
                out,
                "keygate_quota_used{{team=\"{team}\",window=\"day\"}} {}",
                v[2]
            );
        }
        family(
            &mut out,
            "keygate_quota_limit",
            "gauge",
            "The team's limit for the window.",
        );
        for (team, v) in &quota {
            let team = escape(team);
            let _ = writeln!(
                out,
                "keygate_quota_limit{{team=\"{team}\",window=\"minute\"}} {}",
                v[1]
            );
            let _ = writeln!(
                out,
                "keygate_quota_limit{{team=\"{team}\",window=\"day\"}} {}",
                v[3]
            );
        }

        labelled(
            &mut out,
            ("keygate_rejections_total", "counter", "reason"),
            "Requests the gateway refused itself, by reason.",
            Rejection::ALL
                .iter()
                .map(|r| (r.as_str(), &self.rejections[*r as usize])),
        );
        labelled(
            &mut out,
            ("keygate_auth_failures_total", "counter", "reason"),
            "Refused tokens, by reason.",
            AuthFailure::ALL
                .iter()
                .map(|f| (f.as_str(), &self.auth_failures[*f as usize])),
        );

        scalar(
            &mut out,
            ("keygate_store_errors_total", "counter"),
            "Quota store calls that failed.",
            store.errors_total(),
        );
        scalar(
            &mut out,
            ("keygate_store_degraded", "gauge"),
            "1 while the quota store is unreachable and store.on_error is in force.",
            u8::from(store.degraded()),
        );
        if let Some(slices) = slices {
            render_slice_counters(&mut out, slices);
        }
        scalar(
            &mut out,
            ("keygate_upstream_connections", "gauge"),
            "Connections to the upstream open now: one per request in flight over HTTP/1.1, shared by up to the upstream's stream limit with upstream.protocol = \"http2\".",
            self.upstream_connections.current(),
        );
        labelled(
            &mut out,
            ("keygate_upstream_resends_total", "counter", "reason"),
            "Requests sent again at once on another HTTP/2 stream (upstream.protocol = \"http2\"): the upstream refused the stream, or its connection went away, before processing them.",
            crate::upstream_h2::ResendReason::ALL
                .iter()
                .map(|reason| (reason.as_str(), self.upstream_resends.get(*reason))),
        );
        if let Some(in_flight) = in_flight {
            scalar(
                &mut out,
                ("keygate_requests_in_flight", "gauge"),
                "Proxied requests being served now, HTTP/2 streams included.",
                in_flight.current(),
            );
            scalar(
                &mut out,
                ("keygate_requests_in_flight_limit", "gauge"),
                "server.max_requests_in_flight: more at once are answered 503.",
                in_flight.limit(),
            );
        }
        family(
            &mut out,
            "keygate_quota_decision_duration_seconds",
            "histogram",
            "Time a quota decision took as the request saw it: the store, its queue and the wait for a worker thread.",
        );
        self.quota_decisions
            .render(&mut out, "keygate_quota_decision_duration_seconds", "");

        labelled(
            &mut out,
            ("keygate_alerts_total", "counter", "kind"),
            "Alerts raised (after fleet-wide deduplication), by kind.",
            AlertKind::ALL
                .iter()
                .map(|k| (k.as_str(), &self.alerts[*k as usize])),
        );
        for (name, help, value) in [
            (
                "keygate_alert_delivery_failures_total",
                "Webhook delivery attempts that failed (each retry counts).",
                &self.alert_deliveries_failed,
            ),
            (
                "keygate_alerts_dropped_total",
                "Webhook deliveries given up: retries exhausted or the alert queue full.",
                &self.alerts_dropped,
            ),
            (
                "keygate_upstream_retries_total",
                "Upstream calls sent again by keygate.",
                &self.upstream_retries,
            ),
        ] {
            scalar(
                &mut out,
                (name, "counter"),
                help,
                value.load(Ordering::Relaxed),
            );
        }
        scalar(
            &mut out,
            ("keygate_upstream_circuit_state", "gauge"),
            "The upstream circuit: 0 closed, 1 open (answering 503 at once), 2 half-open (probing).",
            self.circuit_state.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            ("keygate_upstream_circuit_opened_total", "counter"),
            "Times the upstream circuit opened after a run of failed upstream calls.",
            self.circuit_opened.load(Ordering::Relaxed),
        );
        labelled(
            &mut out,
            ("keygate_usage_log_dropped_total", "counter", "reason"),
            "Usage lines not written, by reason.",
            UsageDrop::ALL
                .iter()
                .map(|w| (w.as_str(), &self.usage_log_dropped[*w as usize])),
        );
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The families of local slices of quota (`store.local_slices`): only a replica whose store
/// takes slices has them.
fn render_slice_counters(out: &mut String, counters: SliceCounters) {
    scalar(
        out,
        ("keygate_quota_slice_granted_total", "counter"),
        "Admissions the quota store granted into this replica's local slices (store.local_slices).",
        counters.granted,
    );
    scalar(
        out,
        ("keygate_quota_slice_served_total", "counter"),
        "Admissions answered from a local slice, with no call to the quota store.",
        counters.served,
    );
    scalar(
        out,
        ("keygate_quota_slice_returned_total", "counter"),
        "Admissions of local slices given back to the quota store unused.",
        counters.returned,
    );
}

/// A family of one unlabelled sample: `(name, type)`.
fn scalar(out: &mut String, (name, kind): (&str, &str), help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A family with one sample per value of a fixed label set: `(name, type, label)`.
fn labelled<'a>(
    out: &mut String,
    (name, kind, label): (&str, &str, &str),
    help: &str,
    samples: impl Iterator<Item = (&'a str, &'a AtomicU64)>,
) {
    family(out, name, kind, help);
    for (value, count) in samples {
        let _ = writeln!(
            out,
            "{name}{{{label}=\"{value}\"}} {}",
            count.load(Ordering::Relaxed)
        );
    }
}

/// Label-value escaping of the text format: backslash, double quote and newline.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn format_float(value: f64) -> String {
    if value.is_finite() && value == value.trunc() && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(500));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "route=\"r\"");
        assert!(
            out.contains("x_seconds_bucket{route=\"r\",le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{route=\"r\",le=\"0.05\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{route=\"r\",le=\"120.0\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{route=\"r\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{route=\"r\"} 3\n"), "{out}");
        assert!(
            out.contains("x_seconds_sum{route=\"r\"} 500.0305\n"),
            "{out}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("POST /v1/x"), "POST /v1/x");
    }

    #[test]
    fn fixed_label_arrays_are_indexed_by_discriminant() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, f) in AuthFailure::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
        }
        for (i, k) in AlertKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        for (i, d) in UsageDrop::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
    }

    #[test]
    fn unknown_statuses_fold_into_their_class() {
        assert_eq!(status_label(504), "504");
        assert_eq!(status_label(429), "429");
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(999), "other");
    }
}
