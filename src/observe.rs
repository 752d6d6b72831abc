//! Owns what the finish step does with a completed request context: the metrics and the
//! usage line are recorded from that one context, so the two never disagree; the metrics
//! with a few atomic adds on the spot, the usage line (and everything fed from it) handed
//! to the writer thread without waiting.

use std::sync::Arc;

use crate::config::UsageLogConfig;
use crate::context::RequestContext;
use crate::metrics::{Metrics, ObservedStoreHealth, StoreHealthView};
use crate::usage_log::{Completed, UsageConsumer, UsageLog, UsageSink, QUEUE_CAPACITY};
use crate::usage_series::{SeriesConsumer, UsageSeries};

pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub usage_log: UsageLog,
    /// The last hour per team and minute, for the dashboard (fed by the usage writer).
    pub series: Arc<UsageSeries>,
    /// The latest alerts raised here, for the dashboard.
    pub recent_alerts: Arc<RecentAlerts>,
    /// Store errors seen on the request path, for stores that do not report their own.
    pub store_errors: Arc<ObservedStoreHealth>,
    store_health: Arc<dyn StoreHealthView>,
}

impl Observer {
    /// Starts the usage log writer for this config.
    pub fn start(
        config: &UsageLogConfig,
        mut consumers: Vec<Box<dyn UsageConsumer>>,
    ) -> std::io::Result<Self> {
        let series = Arc::new(UsageSeries::default());
        consumers.push(Box::new(SeriesConsumer(series.clone())));
        let sink = match &config.path {
            Some(path) => UsageSink::File(path.clone()),
            None => UsageSink::Stdout,
        };
        let metrics = Arc::new(Metrics::new());
        let usage_log = UsageLog::start(sink, QUEUE_CAPACITY, metrics.clone(), consumers)?;
        let mut observer = Self::with_parts(metrics, usage_log);
        observer.series = series;
        Ok(observer)
    }

    pub fn with_parts(metrics: Arc<Metrics>, usage_log: UsageLog) -> Self {
        let store_errors = Arc::new(ObservedStoreHealth::default());
        Self {
            metrics,
            usage_log,
            series: Arc::default(),
            recent_alerts: Arc::default(),
            store_health: store_errors.clone(),
            store_errors,
        }
    }

    /// Uses the store's own health report for `keygate_store_errors_total` and
    /// `keygate_store_degraded` instead of the errors the request path saw.
    pub fn set_store_health(&mut self, health: Arc<dyn StoreHealthView>) {
        self.store_health = health;
    }

    pub fn store_health(&self) -> &dyn StoreHealthView {
        &*self.store_health
    }

    /// The finish step's work: metrics now, the usage line queued.
    pub fn record(&self, ctx: RequestContext) {
        let latency = ctx.latency();
        self.metrics.record_request(&ctx, latency);
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

    /// The `/metrics` body.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&*self.store_health)
    }
}

/// The latest alert events (as sent), newest last, bounded.
#[derive(Debug, Default)]
pub struct RecentAlerts {
    events: std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>,
}

impl RecentAlerts {
    pub const CAPACITY: usize = 200;

    pub fn push(&self, event: serde_json::Value) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == Self::CAPACITY {
            events.pop_front();
        }
        events.push_back(event);
    }

    pub fn list(&self) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
