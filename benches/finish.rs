//! The finish step's hot-path cost: recording a request's metrics and queueing its usage
//! line (the line itself is written on the writer thread, off the request path).

use std::hint::black_box;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

mod support;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderValue, Method};

use keygate::alerts::{Alerts, MemoryDedupe};
use keygate::auth::ApiKey;
use keygate::config::AlertsConfig;
use keygate::context::{Outcome, RequestContext};
use keygate::metrics::Metrics;
use keygate::observe::Observer;
use keygate::quota::{Limits, SubjectKind, SubjectUsage, WindowUsage};
use keygate::scope::Scopes;
use keygate::usage_log::{UsageLog, UsageSink};

/// Discards lines: the bench measures the request path, not the disk.
struct Discard;

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn keys() -> Vec<Arc<ApiKey>> {
    (0..50)
        .map(|i| {
            support::team_key(
                i,
                10,
                Scopes::default(),
                Limits {
                    rpm: 1000,
                    rpd: 100_000,
                },
            )
        })
        .collect()
}

fn context(key: &Arc<ApiKey>, route: &Arc<str>) -> RequestContext {
    let mut ctx = RequestContext::new(
        HeaderValue::from_static("0123456789abcdef-42"),
        Method::POST,
        "10.0.0.7".parse().unwrap(),
        jiff::Timestamp::now(),
    );
    ctx.path = "/v1/text-to-image".into();
    ctx.route = Some(route.clone());
    ctx.key = Some(key.clone());
    ctx.user_agent = Some("python-requests/2.32".into());
    ctx.status = 200;
    ctx.upstream_status = Some(200);
    ctx.outcome = Outcome::Forwarded;
    ctx.upstream_latency = Some(Duration::from_millis(850));
    ctx.admitted = true;
    ctx.team_usage = Some(SubjectUsage {
        kind: SubjectKind::Team,
        minute: WindowUsage {
            used: 12,
            limit: 1000,
            reset_secs: 40,
        },
        day: WindowUsage {
            used: 500,
            limit: 100_000,
            reset_secs: 4000,
        },
    });
    ctx
}

fn finish(c: &mut Criterion) {
    let keys = keys();
    let route: Arc<str> = "POST /v1/text-to-image".into();
    let metrics = Arc::new(Metrics::new());
    let log = UsageLog::start_with_output(
        UsageSink::Stdout,
        keygate::usage_log::QUEUE_CAPACITY,
        metrics.clone(),
        Vec::new(),
        Some(Box::new(Discard)),
    )
    .unwrap();
    let alerts_config = AlertsConfig {
        thresholds: vec![0.8, 0.95, 1.0],
        webhooks: Vec::new(),
        max_attempts: 5,
        retry_backoff: Duration::from_millis(500),
        timeout: Duration::from_secs(5),
    };
    // The dispatcher is kept but not run: no alert is raised below the thresholds.
    let (alerts, _dispatcher) = Alerts::new(
        &alerts_config,
        metrics.clone(),
        Arc::new(MemoryDedupe::default()),
        Arc::default(),
    )
    .unwrap();
    let observer = Observer::with_parts(metrics.clone(), log, alerts, &alerts_config.thresholds);

    let mut group = c.benchmark_group("finish");
    // Metrics alone, on a context built once (series already exist: the steady state).
    group.bench_function("metrics_record", |b| {
        let contexts: Vec<RequestContext> = keys.iter().map(|key| context(key, &route)).collect();
        let mut i = 0usize;
        b.iter(|| {
            let ctx = &contexts[i % contexts.len()];
            i += 1;
            metrics.record_request(black_box(ctx), Duration::from_millis(900));
        })
    });
    // The whole finish step: metrics, quota-warning check, usage line queued (contexts are
    // built outside the timing; the writer thread drains the queue meanwhile).
    group.bench_function("record_and_enqueue", |b| {
        let mut i = 0usize;
        b.iter_batched(
            || {
                i += 1;
                context(&keys[i % keys.len()], &route)
            },
            |ctx| observer.record(black_box(ctx)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
    eprintln!(
        "usage lines dropped while benchmarking (queue full): {}",
        metrics.usage_lines_dropped(keygate::metrics::UsageDrop::QueueFull)
    );
}

criterion_group!(benches, finish);
criterion_main!(benches);
