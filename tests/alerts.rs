//! Alerts and anomalies (SPEC §5): quota warnings once per team, window and threshold
//! across two replicas on one Redis, and an upstream key's rejection once for the fleet; store outages reported and their end; a dead webhook
//! retried then dropped while requests never wait; the invalid-token burst throttled and
//! reported; the usage stream in Redis; the offline detector flags a night burst from a
//! new address and not the steady keys around it; no token or key in any alert.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::observe::{request_id, series};
use common::redis::RedisServer;
use common::webhook::{Answer, WebhookReceiver};
use common::*;
use keygate::alerts::{AlertDedupe, AlertEvent, MemoryDedupe};
use keygate::clock::{Clock, ManualClock};
use keygate::config::{Config, KeySource, OnStoreError};
use keygate::quota::calendar::DayCalendar;
use keygate::quota::memory::MemoryStore;
use keygate::quota::QuotaStore;
use keygate::secret::Secret;
use keygate::server::StartOptions;
use keygate::usage_log::UsageRecord;

const BAD_TOKEN: &str = "kg_prod_guessing_tokens_000000000000000000000000042";

fn alert_config(upstream: &MockUpstream, webhooks: &[String], extra: &str) -> String {
    let hooks: Vec<String> = webhooks.iter().map(|w| format!("{w:?}")).collect();
    standard_config_text(
        &upstream.url(),
        &format!(
            "[alerts]\nthresholds = [0.8, 1.0]\nwebhooks = [{}]\nmax_attempts = 3\nretry_backoff = \"20ms\"\ntimeout = \"30s\"\n{extra}",
            hooks.join(", ")
        ),
    )
}

/// Replicas sharing one quota store and one alert claim store, as a fleet shares Redis.
struct Fleet {
    gateways: Vec<TestGateway>,
}

impl Fleet {
    /// Replicas on one real Redis: quotas, alert claims (`SET NX`) and the usage stream.
    async fn on_redis(config_text: &str, replicas: usize, redis: &RedisServer) -> Self {
        Self::on_redis_with(config_text, replicas, redis, |_| {}).await
    }

    /// The same, with `adjust` applied to each replica's config (what TOML cannot say
    /// in a test, such as inline upstream keys).
    async fn on_redis_with(
        config_text: &str,
        replicas: usize,
        redis: &RedisServer,
        adjust: impl Fn(&mut Config),
    ) -> Self {
        // A generous store timeout: on a busy machine a slow answer must not switch a
        // replica to its local counters (on_error = local), which are not exact.
        let text = format!(
            "{config_text}\n[store]\nurl = \"{}\"\ntimeout = \"2s\"\n",
            redis.url()
        );
        let mut gateways = Vec::new();
        for _ in 0..replicas {
            let mut config = config_from(&text);
            adjust(&mut config);
            gateways.push(TestGateway::start(config).await);
        }
        Self { gateways }
    }

    async fn start(config_text: &str, replicas: usize, clock: Arc<ManualClock>) -> Self {
        let clock: Arc<dyn Clock> = clock;
        let store: Arc<dyn QuotaStore> =
            Arc::new(MemoryStore::new(clock.clone(), DayCalendar::utc()));
        let dedupe: Arc<dyn AlertDedupe> = Arc::new(MemoryDedupe::default());
        let mut gateways = Vec::new();
        for _ in 0..replicas {
            gateways.push(
                TestGateway::start_with_options(
                    config_from(config_text),
                    StartOptions {
                        clock: clock.clone(),
                        store: Some(store.clone()),
                        alert_dedupe: Some(dedupe.clone()),
                        ..StartOptions::default()
                    },
                )
                .await,
            );
        }
        Self { gateways }
    }

    /// Raises a marker alert on every replica and waits for all of them at `webhook`:
    /// each replica's dispatcher is first-in first-out, so every alert raised before the
    /// marker has been dispatched (counted in `keygate_alerts_total`) by then.
    async fn drain_alerts(&self, webhook: &WebhookReceiver) {
        let markers = || {
            webhook
                .alerts()
                .iter()
                .filter(|a| a["kind"] == "store_recovered")
                .count()
        };
        let wanted = markers() + self.gateways.len();
        for gateway in &self.gateways {
            gateway
                .running
                .as_ref()
                .unwrap()
                .gateway
                .observer
                .alerts
                .raise(AlertEvent::StoreRecovered {
                    mode: OnStoreError::Local,
                    down_for: Duration::ZERO,
                });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while markers() < wanted {
            assert!(
                std::time::Instant::now() < deadline,
                "markers did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn alerts_total(&self, kind: &str) -> f64 {
        let mut total = 0.0;
        for gateway in &self.gateways {
            total += series(
                &gateway.metrics().await,
                "keygate_alerts_total",
                &[("kind", kind)],
            )
            .expect("keygate_alerts_total is exported");
        }
        total
    }

    async fn shutdown(self) {
        for gateway in self.gateways {
            gateway.shutdown().await;
        }
    }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new("2026-11-27T10:00:05Z".parse().unwrap()))
}

#[tokio::test]
async fn quota_warnings_arrive_once_each_across_two_replicas_on_one_redis() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let webhook = WebhookReceiver::start(Answer::Status(200)).await;
    let fleet = Fleet::on_redis(&alert_config(&upstream, &[webhook.url()], ""), 2, &redis).await;

    // Marketing may send 10 a minute; 16 requests race over both replicas.
    let requests = (0..16).map(|i| fleet.gateways[i % 2].generate(TOKEN_MARKETING));
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let mut store_errors = 0.0;
    for gateway in &fleet.gateways {
        store_errors +=
            series(&gateway.metrics().await, "keygate_store_errors_total", &[]).unwrap();
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        MARKETING_RPM as usize,
        "store errors: {store_errors}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 6);

    fleet.drain_alerts(&webhook).await;
    assert_eq!(fleet.alerts_total("quota_warning").await, 2.0);
    let warnings = || {
        webhook
            .alerts()
            .into_iter()
            .filter(|a| a["kind"] == "quota_warning")
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while warnings().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "warnings: {:?}",
            webhook.alerts()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut warnings = warnings();
    warnings.sort_by(|a, b| {
        a["threshold"]
            .as_f64()
            .partial_cmp(&b["threshold"].as_f64())
            .unwrap()
    });
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    for (warning, (threshold, used)) in warnings.iter().zip([(0.8, 8), (1.0, 10)]) {
        assert_eq!(warning["team"], "marketing");
        assert_eq!(warning["window"], "minute");
        assert_eq!(warning["threshold"], threshold);
        assert_eq!(warning["used"], used);
        assert_eq!(warning["limit"], MARKETING_RPM);
        assert!(warning["at"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok());
        let at: jiff::Timestamp = warning["at"].as_str().unwrap().parse().unwrap();
        let resets_at: jiff::Timestamp = warning["resets_at"].as_str().unwrap().parse().unwrap();
        let until_reset = resets_at.as_second() - at.as_second();
        assert!(
            (1..=62).contains(&until_reset),
            "minute resets in {until_reset}s"
        );
        let text = warning["text"].as_str().unwrap();
        assert!(
            text.contains("team marketing") && text.contains("minute") && !text.contains('\n'),
            "{text}"
        );
    }

    // More traffic in the same window raises nothing new.
    for gateway in &fleet.gateways {
        assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 429);
    }
    fleet.drain_alerts(&webhook).await;
    assert_eq!(fleet.alerts_total("quota_warning").await, 2.0);
    // The claims live in Redis, with an expiry.
    let claims = redis.cli(&["KEYS", "keygate:alert:quota:*"]).unwrap();
    let mut claims: Vec<&str> = claims.lines().collect();
    claims.sort();
    assert_eq!(
        claims,
        [
            "keygate:alert:quota:marketing:minute:0.8",
            "keygate:alert:quota:marketing:minute:1"
        ]
    );
    let ttl: i64 = redis
        .cli(&["PTTL", claims[0]])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((1..=60_000).contains(&ttl), "claim ttl {ttl} ms");

    let bodies = webhook.raw_bodies();
    for secret in ALL_SECRETS {
        assert!(!bodies.contains(secret), "an alert carried a token or key");
    }
    fleet.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
    assert!(
        !logs::captured().contains("webhook-path-secret"),
        "a webhook URL's secret path was logged"
    );
}

#[tokio::test]
async fn reaching_a_threshold_again_after_a_refund_repeats_no_warning() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let webhook = WebhookReceiver::start(Answer::Status(200)).await;
    let fleet = Fleet::on_redis(&alert_config(&upstream, &[webhook.url()], ""), 2, &redis).await;
    let threshold = DESIGN_RPM * 8 / 10;
    for i in 0..threshold - 1 {
        let response = fleet.gateways[i as usize % 2]
            .generate(TOKEN_DESIGN_GENERATE)
            .await;
        assert_eq!(response.status(), 200);
    }
    // The 80th admission fails upstream and is refunded: usage falls back to 79.
    upstream.set_reply(Reply::Json(500, r#"{"error":"boom"}"#));
    assert_eq!(
        fleet.gateways[0]
            .generate(TOKEN_DESIGN_GENERATE)
            .await
            .status(),
        500
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = fleet.gateways[0].metrics().await;
        let used = series(
            &metrics,
            "keygate_quota_used",
            &[("team", "design"), ("window", "minute")],
        );
        if used == Some((threshold - 1) as f64) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no refund: {used:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next admission reaches 80 again, on the other replica.
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    assert_eq!(
        fleet.gateways[1]
            .generate(TOKEN_DESIGN_GENERATE)
            .await
            .status(),
        200
    );

    fleet.drain_alerts(&webhook).await;
    assert_eq!(fleet.alerts_total("quota_warning").await, 1.0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_store_outage_and_its_end_are_alerted() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let webhook = WebhookReceiver::start(Answer::Status(200)).await;
    let fleet = Fleet::on_redis(&alert_config(&upstream, &[webhook.url()], ""), 1, &redis).await;
    let gateway = &fleet.gateways[0];
    assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);

    redis.kill();
    // on_error = local: the request is still answered, from this replica's own counters.
    assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);
    webhook.wait_for(1, Duration::from_secs(10)).await;
    let degraded = &webhook.alerts()[0];
    assert_eq!(degraded["kind"], "store_degraded");
    assert_eq!(degraded["mode"], "local");
    assert!(!degraded["error"].as_str().unwrap().is_empty());
    assert!(degraded["text"].as_str().unwrap().contains("unreachable"));
    let metrics = gateway.metrics().await;
    assert_eq!(series(&metrics, "keygate_store_degraded", &[]), Some(1.0));
    assert!(series(&metrics, "keygate_store_errors_total", &[]).unwrap() >= 1.0);

    redis.restart();
    webhook.wait_for(2, Duration::from_secs(15)).await;
    let recovered = &webhook.alerts()[1];
    assert_eq!(recovered["kind"], "store_recovered");
    assert_eq!(recovered["mode"], "local");
    assert!(recovered["down_for"].as_f64().unwrap() > 0.0);
    assert_eq!(
        series(&gateway.metrics().await, "keygate_store_degraded", &[]),
        Some(0.0)
    );
    assert_eq!(fleet.alerts_total("store_degraded").await, 1.0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn every_replica_appends_its_usage_lines_to_one_redis_stream() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let text = alert_config(
        &upstream,
        &[],
        "[usage_log]\nredis_stream = \"keygate:usage\"\nstream_maxlen = 1000\n",
    );
    let fleet = Fleet::on_redis(&text, 2, &redis).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let token = if i == 5 {
            BAD_TOKEN
        } else {
            TOKEN_DESIGN_GENERATE
        };
        ids.push(request_id(&fleet.gateways[i % 2].generate(token).await));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while redis.cli(&["XLEN", "keygate:usage"]).unwrap().trim() != "6" {
        assert!(
            std::time::Instant::now() < deadline,
            "stream never held 6 lines"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // `XRANGE` prints id, field, value per entry: the value is the usage line.
    let entries = redis.cli(&["XRANGE", "keygate:usage", "-", "+"]).unwrap();
    let lines: Vec<serde_json::Value> = entries
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert!(
        entries.lines().filter(|l| *l == "line").count() == 6,
        "{entries}"
    );
    let mut streamed: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    streamed.sort();
    ids.sort();
    assert_eq!(streamed, ids);
    // The same lines as each replica's file.
    for gateway in &fleet.gateways {
        for line in gateway.usage.lines() {
            assert!(lines.contains(&line), "{line} missing from the stream");
        }
    }
    assert!(!entries.contains(BAD_TOKEN) && !entries.contains(REAL_KEY));
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_dead_webhook_is_retried_then_dropped_and_requests_never_wait() {
    let upstream = MockUpstream::start().await;
    let failing = WebhookReceiver::start(Answer::Status(500)).await;
    let hanging = WebhookReceiver::start(Answer::Hang).await;
    let refused = format!(
        "http://127.0.0.1:{}/nobody-listens",
        common::redis::free_port()
    );
    let webhooks = [failing.url(), refused, hanging.url()];
    let fleet = Fleet::start(&alert_config(&upstream, &webhooks, ""), 1, clock()).await;
    let gateway = &fleet.gateways[0];

    // Ten requests: the 8th and the 10th raise warnings. Every answer arrives while the
    // hanging webhook still holds its first delivery open (it never answers).
    for _ in 0..MARKETING_RPM {
        assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 200);
    }
    hanging.wait_for(1, Duration::from_secs(5)).await;

    // Two alerts × three tries at the failing webhook, then both dropped there and at the
    // refused one; the hanging deliveries are still waiting, not dropped.
    failing.wait_for(6, Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gateway.metrics().await;
        let dropped = series(&metrics, "keygate_alerts_dropped_total", &[]).unwrap();
        if dropped == 4.0 {
            let failures = series(&metrics, "keygate_alert_delivery_failures_total", &[]).unwrap();
            assert_eq!(failures, 12.0, "3 tries × 2 alerts × 2 dead webhooks");
            break;
        }
        assert!(dropped < 4.0, "dropped {dropped}");
        assert!(std::time::Instant::now() < deadline, "only {dropped} drops");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(failing.count(), 6, "no try after the drop");
    hanging.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(
        hanging.count(),
        2,
        "one open delivery per alert, never retried"
    );
    for alert in failing.alerts() {
        assert_eq!(alert["kind"], "quota_warning");
    }
    let logs = logs::captured();
    assert!(logs.contains("alert dropped: the webhook failed every attempt"));
    assert!(!logs.contains("webhook-path-secret") && !logs.contains("nobody-listens"));
    fleet.shutdown().await;
}

#[tokio::test]
async fn an_invalid_token_burst_is_throttled_and_raises_an_anomaly() {
    let upstream = MockUpstream::start().await;
    let webhook = WebhookReceiver::start(Answer::Status(200)).await;
    let text = alert_config(
        &upstream,
        &[webhook.url()],
        "[anomalies]\ninvalid_tokens_per_minute = 5\n",
    );
    let fleet = Fleet::start(&text, 1, clock()).await;
    let gateway = &fleet.gateways[0];

    for _ in 0..5 {
        let response = gateway.generate(BAD_TOKEN).await;
        assert_eq!(response.status(), 401);
    }
    // Now even a valid token from this address waits for the minute to end.
    let throttled = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(throttled.status(), 429);
    assert_eq!(throttled.headers()["retry-after"], "55");
    assert_eq!(throttled.text().await.unwrap(), RATE_LIMITED_BODY);
    assert_eq!(upstream.count(), 0);

    webhook.wait_for(1, Duration::from_secs(5)).await;
    let anomaly = &webhook.alerts()[0];
    assert_eq!(anomaly["kind"], "anomaly");
    assert_eq!(anomaly["signal"], "invalid_tokens");
    assert_eq!(anomaly["client_ip"], "127.0.0.1");
    assert_eq!(anomaly["observed"], 5.0);
    assert_eq!(anomaly["baseline"], 5.0);
    assert!(anomaly["key_id"].is_null() && anomaly["team"].is_null());
    assert!(anomaly["text"].as_str().unwrap().contains("invalid_tokens"));

    let metrics = gateway.metrics().await;
    assert_eq!(
        series(
            &metrics,
            "keygate_rejections_total",
            &[("reason", "rate_limited_client_address")]
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            &metrics,
            "keygate_auth_failures_total",
            &[("reason", "unknown")]
        ),
        Some(5.0)
    );
    assert!(!webhook.raw_bodies().contains(BAD_TOKEN));
    fleet.shutdown().await;
    logs::assert_clean(&[BAD_TOKEN]);
}

// ---------------------------------------------------------------------------------------
// Offline.

/// The `n`th request of a key; its latency cycles through 800, 900, … 1700 ms.
fn line(ts: jiff::Timestamp, key: &str, team: &str, ip: &str, n: u64) -> String {
    UsageRecord {
        ts,
        request_id: format!("req-{n}"),
        team: Some(team.into()),
        key_id: Some(key.into()),
        env: Some("prod".into()),
        method: "POST".into(),
        path: "/v1/text-to-image".into(),
        route: Some("POST /v1/text-to-image".into()),
        status: 200,
        upstream_status: Some(200),
        outcome: "forwarded".into(),
        latency_ms: 800.0 + (n % 10) as f64 * 100.0,
        upstream_latency_ms: Some(790.0),
        bytes_in: 70,
        bytes_out: 144,
        client_ip: ip.into(),
        user_agent: Some("batch/1.0".into()),
        minute_used: Some(5),
        minute_limit: Some(100),
        day_used: Some(n),
        day_limit: Some(10_000),
    }
    .to_line()
}

/// A night of steady traffic (20:00 to 04:00) from three keys, each from its own addresses; at 03:12 one key
/// bursts 180 requests in two minutes from an address it has never used.
fn synthetic_log() -> String {
    let start: jiff::Timestamp = "2026-11-26T20:00:00Z".parse().unwrap();
    let steady = [
        (
            "design-generate",
            "design",
            ["10.0.0.11", "10.0.0.12"],
            5u64,
        ),
        (
            "marketing-generate",
            "marketing",
            ["10.0.0.21", "10.0.0.21"],
            3,
        ),
        ("design-batch", "design", ["10.0.0.31", "10.0.0.32"], 12),
    ];
    let burst_start: jiff::Timestamp = "2026-11-27T03:12:00Z".parse().unwrap();
    let mut lines = Vec::new();
    let mut per_key = std::collections::HashMap::new();
    let mut next = |key: &str| {
        let n = per_key.entry(key.to_string()).or_insert(0u64);
        *n += 1;
        *n
    };
    for minute in 0..(8 * 60) {
        let minute_start = start + jiff::SignedDuration::from_secs(minute * 60);
        for (key, team, ips, rate) in &steady {
            // A steady rate that wobbles by ±2 a minute.
            let count = rate + (minute as u64 * 7 + key.len() as u64) % 5 - 2;
            for i in 0..count {
                let n = next(key);
                let ts =
                    minute_start + jiff::SignedDuration::from_millis((i * 60_000 / count) as i64);
                lines.push((ts, line(ts, key, team, ips[(i % 2) as usize], n)));
            }
        }
        if minute_start >= burst_start
            && minute_start < burst_start + jiff::SignedDuration::from_secs(120)
        {
            for i in 0..90 {
                let n = next("design-generate");
                let ts = minute_start + jiff::SignedDuration::from_millis(i * 600 + 300);
                lines.push((ts, line(ts, "design-generate", "design", "203.0.113.66", n)));
            }
        }
    }
    lines.sort_by_key(|(ts, _)| *ts);
    lines.into_iter().map(|(_, l)| l + "\n").collect()
}

#[test]
fn the_offline_detector_flags_a_night_burst_from_a_new_address_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("usage.log");
    std::fs::write(&log, synthetic_log()).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["usage", "anomalies", "--log"])
        .arg(&log)
        .output()
        .expect("keygate runs");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let findings: Vec<&str> = stdout.lines().collect();
    assert_eq!(findings.len(), 2, "{stdout}");
    assert_eq!(
        findings[0],
        "2026-11-27T03:12:00Z key=design-generate team=design signal=new_client_ip \
         observed=new_address_203.0.113.66 baseline=2_known_addresses client_ip=203.0.113.66"
    );
    assert!(
        findings[1].starts_with(
            "2026-11-27T03:12:1" // 30 requests into the burst's first minute
        ) && findings[1].contains(
            " key=design-generate team=design signal=rate_spike observed=30/min baseline="
        ),
        "{}",
        findings[1]
    );
    let baseline: f64 = findings[1]
        .split("baseline=")
        .nth(1)
        .and_then(|b| b.split("/min").next())
        .and_then(|b| b.parse().ok())
        .unwrap();
    assert!(
        (4.0..=6.0).contains(&baseline),
        "baseline {baseline}: the key's own ~5/min"
    );
    assert!(
        findings[1].ends_with("client_ip=203.0.113.66"),
        "{}",
        findings[1]
    );
    for steady in ["marketing-generate", "design-batch", "10.0.0."] {
        assert!(!stdout.contains(steady), "{steady} flagged:\n{stdout}");
    }

    let report = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["usage", "report", "--log"])
        .arg(&log)
        .output()
        .expect("keygate runs");
    assert!(report.status.success());
    let report = String::from_utf8(report.stdout).unwrap();
    let row = report
        .lines()
        .find(|l| l.starts_with("marketing-generate"))
        .unwrap_or_else(|| panic!("{report}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[1], "marketing");
    // 8 h × 60 min, 3 a minute on average (the wobble averages to zero over 5 minutes).
    assert_eq!(columns[2], "1440", "{row}");
    assert_eq!(&columns[3..5], ["0", "0"]);
    // Latencies 800…1700 ms, 144 of each: the 720th is 1200, the 1368th 1700.
    assert_eq!(&columns[5..7], ["1200.0", "1700.0"], "{row}");
}

/// The README says an upstream key's rejection is alerted once for the fleet: each replica
/// meets the 401 itself (its own turn of keys), and the claim in Redis lets one alert out.
#[tokio::test]
async fn a_rejected_upstream_key_is_alerted_once_across_two_replicas_on_one_redis() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    upstream.refuse_key(REAL_KEY, 401);
    let webhook = WebhookReceiver::start(Answer::Status(200)).await;
    let text = config_text_with_resilience(
        &upstream.url(),
        "[upstream.retry]\nattempts = 3\nbase = \"10ms\"\ncap = \"40ms\"\nbudget = \"10s\"\n",
        &format!(
            "[alerts]\nwebhooks = [{:?}]\nretry_backoff = \"20ms\"\n",
            webhook.url()
        ),
    );
    let fleet = Fleet::on_redis_with(&text, 2, &redis, |config| {
        config.upstream.keys.insert(
            "prod".into(),
            KeySource::Inline(vec![Secret::new(REAL_KEY), Secret::new(REAL_KEY_B)]),
        );
    })
    .await;

    for gateway in &fleet.gateways {
        for _ in 0..3 {
            let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
            assert_eq!(response.status(), 200, "the other key serves the request");
        }
    }
    let refused = format!("Bearer {REAL_KEY}");
    let tried_refused = upstream
        .received()
        .iter()
        .filter(|r| r.headers["authorization"] == refused.as_str())
        .count();
    assert_eq!(
        tried_refused, 2,
        "each replica met the refusal once, then rested the key"
    );

    fleet.drain_alerts(&webhook).await;
    assert_eq!(fleet.alerts_total("upstream_key_rejected").await, 1.0);
    let rejected: Vec<_> = webhook
        .alerts()
        .into_iter()
        .filter(|a| a["kind"] == "upstream_key_rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["env"], "prod");
    assert_eq!(rejected[0]["key_index"], 0);
    assert_eq!(
        redis
            .cli(&["KEYS", "keygate:alert:upstream_key:*"])
            .unwrap()
            .trim(),
        "keygate:alert:upstream_key:prod:0"
    );
    let raw = webhook.raw_bodies();
    for secret in [REAL_KEY, REAL_KEY_B, TOKEN_DESIGN_GENERATE] {
        assert!(!raw.contains(secret), "an alert carries a secret");
    }
    fleet.shutdown().await;
}
