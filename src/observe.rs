//! Owns what the finish step does with a completed request context: the metrics and the
//! usage line are recorded from that one context, so the two never disagree; the metrics
//! with a few atomic adds on the spot, quota warnings checked against the team's usage the
//! decision reported, and the usage line (and the live anomaly detection fed from it)
//! handed to the writer thread without waiting.

use std::sync::Arc;
use std::time::Duration;

pub use crate::alerts::RecentAlerts;

use crate::alerts::{AlertDedupe, AlertDispatcher, AlertEvent, Alerts};
use crate::anomaly::{Detector, Finding, COOLDOWN_MINUTES};
use crate::config::Config;
use crate::context::RequestContext;
use crate::in_flight::InFlight;
use crate::metrics::{Metrics, StoreHealthView, UnreportedStoreHealth};
use crate::quota::failover::StoreHealth;
use crate::quota::{Window, WindowUsage};
use crate::usage_log::{
    Completed, UsageConsumer, UsageLog, UsageRecord, UsageSink, QUEUE_CAPACITY,
};
use crate::usage_series::{SeriesConsumer, UsageSeries};

pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub usage_log: UsageLog,
    pub alerts: Alerts,
    /// The last hour per team and minute, for the dashboard (fed by the usage writer).
    pub series: Arc<UsageSeries>,
    /// The latest alerts raised here, for the dashboard.
    pub recent_alerts: Arc<RecentAlerts>,
    store_health: Arc<dyn StoreHealthView>,
    requests_in_flight: Option<Arc<InFlight>>,
    /// `alerts.thresholds` in millionths, for exact integer crossing checks.
    thresholds_ppm: Vec<(f64, u64)>,
}

impl Observer {
    /// Starts the usage log writer (with live anomaly detection when enabled) and returns
    /// the alert dispatcher, to be spawned on the runtime.
    pub fn start(
        config: &Config,
        metrics: Arc<Metrics>,
        dedupe: Arc<dyn AlertDedupe>,
        mut consumers: Vec<Box<dyn UsageConsumer>>,
    ) -> Result<(Self, AlertDispatcher), String> {
        let recent_alerts = Arc::new(RecentAlerts::default());
        let (alerts, dispatcher) = Alerts::new(
            &config.alerts,
            metrics.clone(),
            dedupe,
            recent_alerts.clone(),
        )?;
        let series = Arc::new(UsageSeries::default());
        consumers.push(Box::new(SeriesConsumer(series.clone())));
        if config.anomalies.enabled {
            consumers.push(Box::new(LiveAnomalies {
                detector: Detector::new(config.anomalies.clone()),
                alerts: alerts.clone(),
                findings: Vec::new(),
            }));
        }
        let sink = match &config.usage_log.path {
            Some(path) => UsageSink::File(path.clone()),
            None => UsageSink::Stdout,
        };
        let usage_log =
            UsageLog::start(sink, QUEUE_CAPACITY, metrics.clone(), consumers).map_err(|e| {
                let place = config
                    .usage_log
                    .path
                    .as_ref()
                    .map_or("stdout".into(), |p| p.display().to_string());
                format!("usage log {place}: {e}")
            })?;
        let mut observer = Self::with_parts(metrics, usage_log, alerts, &config.alerts.thresholds);
        observer.series = series;
        observer.recent_alerts = recent_alerts;
        Ok((observer, dispatcher))
    }

    pub fn with_parts(
        metrics: Arc<Metrics>,
        usage_log: UsageLog,
        alerts: Alerts,
        thresholds: &[f64],
    ) -> Self {
        Self {
            metrics,
            usage_log,
            alerts,
            series: Arc::default(),
            recent_alerts: Arc::default(),
            store_health: Arc::new(UnreportedStoreHealth),
            requests_in_flight: None,
            thresholds_ppm: thresholds
                .iter()
                .map(|t| (*t, (t * 1_000_000.0).round() as u64))
                .collect(),
        }
    }

    /// Uses the store's own health report for `keygate_store_errors_total` and
    /// `keygate_store_degraded` instead of the errors the request path saw.
    pub fn set_store_health(&mut self, health: Arc<dyn StoreHealthView>) {
        self.store_health = health;
    }

    /// The count and cap behind `keygate_requests_in_flight` and its `_limit`.
    pub fn set_requests_in_flight(&mut self, in_flight: Arc<InFlight>) {
        self.requests_in_flight = Some(in_flight);
    }

    pub fn store_health(&self) -> &dyn StoreHealthView {
        &*self.store_health
    }

    /// The finish step's work: metrics and quota warnings now, the usage line queued.
    pub fn record(&self, ctx: RequestContext) {
        let latency = ctx.latency();
        self.metrics.record_request(&ctx, latency);
        self.quota_warnings(&ctx);
        if let Some(cause) = &ctx.cause {
            tracing::debug!(
                target: "keygate::access",
                request_id = ctx.request_id_str(),
                outcome = ctx.outcome.as_str(),
                status = ctx.status,
                cause = %cause,
            );
        }
        self.usage_log.enqueue(Completed { ctx, latency });
    }

    /// Raises `quota_warning` for each threshold this request's admission reached. The
    /// store counts admissions one by one, so exactly one admission per window reaches each
    /// count; the store-side claim (`SET NX`) covers refunds and rolling windows that reach
    /// a count again, across every replica.
    fn quota_warnings(&self, ctx: &RequestContext) {
        if !ctx.admitted || self.thresholds_ppm.is_empty() {
            return;
        }
        let (Some(usage), Some(key)) = (ctx.team_usage, ctx.key.as_deref()) else {
            return;
        };
        let now_secs = ctx.received_at.as_second();
        for (window, w) in [(Window::Minute, usage.minute), (Window::Day, usage.day)] {
            for &(threshold, ppm) in &self.thresholds_ppm {
                if w.used != crossing(ppm, w.limit) {
                    continue;
                }
                let (instance, resets_at, ttl) = window_instance(window, w, now_secs);
                self.alerts.raise_once(
                    AlertEvent::QuotaWarning {
                        team: key.team.to_string(),
                        window,
                        threshold,
                        used: w.used,
                        limit: w.limit,
                        resets_at: jiff::Timestamp::from_second(resets_at)
                            .unwrap_or(ctx.received_at),
                    },
                    format!(
                        "keygate:alert:quota:{}:{}{instance}:{threshold}",
                        key.team,
                        window.as_str()
                    ),
                    ttl,
                );
            }
        }
    }

    /// The `/metrics` body; `slices`: the store's local slices, when it takes them.
    pub fn render_metrics(&self, slices: Option<crate::quota::SliceCounters>) -> String {
        self.metrics.render(
            &*self.store_health,
            self.requests_in_flight.as_deref(),
            slices,
        )
    }
}

/// The count at which usage reaches `ppm` millionths of `limit` (at least 1).
fn crossing(ppm: u64, limit: u64) -> u64 {
    let k = (u128::from(ppm) * u128::from(limit)).div_ceil(1_000_000);
    u64::try_from(k).unwrap_or(u64::MAX).max(1)
}

/// Which window instance a warning belongs to: `(key suffix, resets_at, claim ttl)`.
/// The day window is its calendar day, named by its end. The minute window rolls, so its
/// instance is the 60 s from the first warning on: one warning per threshold per minute.
fn window_instance(window: Window, usage: WindowUsage, now_secs: i64) -> (String, i64, Duration) {
    let reset = i64::try_from(usage.reset_secs).unwrap_or(i64::MAX / 2);
    match window {
        Window::Minute => (String::new(), now_secs + reset, Duration::from_secs(60)),
        Window::Day => {
            // The reset is reported in whole seconds; midnight is on a whole minute.
            let end = (now_secs + reset + 30).div_euclid(60) * 60;
            (
                format!(":{end}"),
                end,
                Duration::from_secs(usage.reset_secs + 3600),
            )
        }
    }
}

/// Raises `store_degraded` when the quota store's health turns degraded and
/// `store_recovered` (with how long it was down) when it is back. Each replica reports its
/// own outage: while the store is down there is no shared place to agree on one report.
pub async fn alert_on_store_health(
    health: Arc<StoreHealth>,
    alerts: Alerts,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = health.subscribe();
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = shutdown.changed() => break,
        }
        let degraded = *changes.borrow_and_update();
        match (degraded, down_since) {
            (true, None) => {
                down_since = Some(std::time::Instant::now());
                alerts.raise(AlertEvent::StoreDegraded {
                    mode: health.mode(),
                    error: health.last_error().unwrap_or_else(|| "unknown".into()),
                });
            }
            (false, Some(since)) => {
                down_since = None;
                alerts.raise(AlertEvent::StoreRecovered {
                    mode: health.mode(),
                    down_for: since.elapsed(),
                });
            }
            _ => {}
        }
    }
}

/// Live anomaly detection, on the usage log's writer thread: each finding becomes an
/// `anomaly` alert, raised once across the fleet per signal and subject per cooldown.
struct LiveAnomalies {
    detector: Detector,
    alerts: Alerts,
    findings: Vec<Finding>,
}

impl UsageConsumer for LiveAnomalies {
    fn consume(&mut self, record: &UsageRecord, _line: &str) {
        self.detector.observe(record, &mut self.findings);
        for finding in self.findings.drain(..) {
            let key = format!(
                "keygate:alert:anomaly:{}:{}:{}",
                finding.signal.as_str(),
                finding.key_id.as_deref().unwrap_or("-"),
                finding.client_ip.as_deref().unwrap_or("-"),
            );
            self.alerts.raise_once(
                AlertEvent::Anomaly(finding),
                key,
                Duration::from_secs(60 * COOLDOWN_MINUTES as u64),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossings_are_exact_in_integers() {
        assert_eq!(crossing(800_000, 10), 8);
        assert_eq!(crossing(950_000, 100), 95);
        assert_eq!(crossing(950_000, 10), 10);
        assert_eq!(crossing(1_000_000, 1_000_000_000), 1_000_000_000);
        assert_eq!(crossing(800_000, 1), 1);
        assert_eq!(crossing(333_333, 3), 1);
    }

    #[test]
    fn a_day_instance_is_named_by_its_end() {
        let usage = WindowUsage {
            used: 8,
            limit: 10,
            reset_secs: 3601,
        };
        // 23:00:00 with the day ending at midnight (reset rounded up by a second).
        let now = 1_767_222_000;
        let (suffix, resets_at, _) = window_instance(Window::Day, usage, now);
        assert_eq!(resets_at, 1_767_225_600);
        assert_eq!(suffix, ":1767225600");
    }
}
