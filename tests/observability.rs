//! The operator's view (SPEC §5): `/metrics` that promtool accepts after traffic of every
//! outcome, one usage line per request with every field, metrics and usage lines that
//! agree, a usage log that follows rotation and SIGHUP, and no secret anywhere.

mod common;

use std::collections::HashMap;

use common::observe::{promtool_check, request_id, series, UsageFile, USAGE_FIELDS};
use common::*;

const UNKNOWN_TOKEN: &str = "kg_prod_nobody_has_this_token_000000000000000099";

/// The standard config with a 300 ms upstream timeout (for 504s) and a `staging` env whose
/// upstream key is unreadable (for 503s).
fn config_text(upstream: &MockUpstream, extra: &str) -> String {
    standard_config_text(&upstream.url(), extra)
        .replace(
            "timeout = \"5s\"\nconnect_timeout",
            "timeout = \"300ms\"\nconnect_timeout",
        )
        .replace(
            "[upstream.keys.dev]",
            "[upstream.keys.staging]\nenv = \"KEYGATE_TEST_UNSET_STAGING_KEY\"\n[upstream.keys.dev]",
        )
        + &format!(
            r#"
[[keys]]
id = "design-staging"
team = "design"
token_sha256 = "{}"
scopes = ["generate"]
env = "staging"
"#,
            hash(TOKEN_STAGING)
        )
}

const TOKEN_STAGING: &str = "kg_staging_design_token_0000000000000000000000007";

struct Sent {
    id: String,
    status: u16,
}

async fn send(request: reqwest::RequestBuilder) -> Sent {
    let response = request.send().await.expect("gateway answers");
    let sent = Sent {
        id: request_id(&response),
        status: response.status().as_u16(),
    };
    let _ = response.bytes().await;
    sent
}

/// Traffic of every outcome the gateway can give; returns each request with its status.
async fn every_outcome(
    gateway: &TestGateway,
    upstream: &MockUpstream,
) -> Vec<(&'static str, Sent)> {
    let generate = || {
        gateway
            .client
            .post(gateway.url("/v1/text-to-image?size=large"))
            .header("content-type", "application/json")
            .body(PROMPT_BODY)
    };
    let mut sent = Vec::new();
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    sent.push((
        "ok",
        send(
            generate()
                .bearer_auth(TOKEN_DESIGN_GENERATE)
                .header("user-agent", "observability-test/1.0"),
        )
        .await,
    ));
    sent.push(("no_token", send(generate()).await));
    sent.push((
        "unknown_token",
        send(generate().bearer_auth(UNKNOWN_TOKEN)).await,
    ));
    sent.push((
        "expired",
        send(generate().bearer_auth(TOKEN_DESIGN_EXPIRED)).await,
    ));
    sent.push((
        "scope",
        send(generate().bearer_auth(TOKEN_DESIGN_READ)).await,
    ));
    sent.push((
        "no_route",
        send(
            gateway
                .client
                .delete(gateway.url("/v1/text-to-image"))
                .bearer_auth(TOKEN_DESIGN_GENERATE),
        )
        .await,
    ));
    for _ in 0..TIGHT_KEY_RPM {
        sent.push((
            "tight_ok",
            send(generate().bearer_auth(TOKEN_DESIGN_TIGHT)).await,
        ));
    }
    sent.push((
        "tight_429",
        send(generate().bearer_auth(TOKEN_DESIGN_TIGHT)).await,
    ));
    sent.push((
        "bad_path",
        send(
            gateway
                .client
                .get(gateway.url("/v1/a%2Fb"))
                .bearer_auth(TOKEN_DESIGN_GENERATE),
        )
        .await,
    ));
    sent.push((
        "no_upstream_key",
        send(generate().bearer_auth(TOKEN_STAGING)).await,
    ));
    upstream.set_reply(Reply::Json(500, r#"{"error":"boom"}"#));
    sent.push((
        "upstream_500",
        send(generate().bearer_auth(TOKEN_DESIGN_GENERATE)).await,
    ));
    upstream.set_reply(Reply::Drop);
    sent.push((
        "upstream_drop",
        send(generate().bearer_auth(TOKEN_DESIGN_GENERATE)).await,
    ));
    upstream.set_reply(Reply::Hang);
    sent.push((
        "upstream_hang",
        send(generate().bearer_auth(TOKEN_DESIGN_GENERATE)).await,
    ));
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    sent
}

fn secrets() -> Vec<&'static str> {
    let mut all = ALL_SECRETS.to_vec();
    all.push(UNKNOWN_TOKEN);
    all.push(TOKEN_STAGING);
    all
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in secrets() {
        assert!(
            !text.contains(secret),
            "a token or real key appeared in {what}"
        );
    }
}

#[tokio::test]
async fn every_request_leaves_one_usage_line_that_agrees_with_the_metrics() {
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config_from(&config_text(&upstream, ""))).await;
    let sent = every_outcome(&gateway, &upstream).await;

    let expected: HashMap<&str, (u16, &str)> = HashMap::from([
        ("ok", (200, "forwarded")),
        ("no_token", (401, "unauthorized")),
        ("unknown_token", (401, "unauthorized")),
        ("expired", (401, "unauthorized")),
        ("scope", (403, "forbidden")),
        ("no_route", (403, "forbidden")),
        ("tight_ok", (200, "forwarded")),
        ("tight_429", (429, "rate_limited")),
        ("bad_path", (400, "bad_request")),
        ("no_upstream_key", (503, "unavailable")),
        ("upstream_500", (500, "upstream_error")),
        ("upstream_drop", (502, "upstream_error")),
        ("upstream_hang", (504, "upstream_timeout")),
    ]);
    let mut lines = HashMap::new();
    for (what, request) in &sent {
        let (status, outcome) = expected[what];
        assert_eq!(request.status, status, "{what}");
        let line = gateway.usage.wait_for(&request.id).await;
        let object = line.as_object().unwrap();
        let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
        fields.sort();
        let mut wanted = USAGE_FIELDS.to_vec();
        wanted.sort();
        assert_eq!(fields, wanted, "{what}: {line}");
        assert_eq!(line["status"], status, "{what}: {line}");
        assert_eq!(line["outcome"], outcome, "{what}: {line}");
        assert_eq!(line["client_ip"], "127.0.0.1", "{what}");
        assert!(line["latency_ms"].as_f64().unwrap() > 0.0, "{what}");
        assert!(line["ts"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok());
        lines.insert(*what, line);
    }

    // Known in full for a forwarded request; the query never appears.
    let ok = &lines["ok"];
    assert_eq!(ok["team"], "design");
    assert_eq!(ok["key_id"], "design-generate");
    assert_eq!(ok["env"], "prod");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/v1/text-to-image");
    assert_eq!(ok["route"], "POST /v1/text-to-image");
    assert_eq!(ok["upstream_status"], 200);
    assert!(ok["upstream_latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ok["bytes_in"], PROMPT_BODY.len());
    assert_eq!(ok["bytes_out"], common::upstream::OK_JSON.len());
    assert_eq!(ok["user_agent"], "observability-test/1.0");
    assert_eq!(ok["minute_used"], 1);
    assert_eq!(ok["minute_limit"], DESIGN_RPM);
    assert_eq!(ok["day_used"], 1);
    assert_eq!(ok["day_limit"], DESIGN_RPD);

    // Null where the request never got that far.
    let no_token = &lines["no_token"];
    for field in [
        "team",
        "key_id",
        "env",
        "route",
        "upstream_status",
        "upstream_latency_ms",
        "user_agent",
        "minute_used",
        "minute_limit",
        "day_used",
        "day_limit",
    ] {
        assert!(no_token[field].is_null(), "{field} in {no_token}");
    }
    let scope = &lines["scope"];
    assert_eq!(scope["key_id"], "design-read");
    assert!(scope["route"].is_null() && scope["minute_used"].is_null());
    // A 429 reports the team's usage as the refusal saw it.
    let limited = &lines["tight_429"];
    assert_eq!(limited["key_id"], "design-tight");
    assert_eq!(limited["route"], "POST /v1/text-to-image");
    assert!(limited["upstream_status"].is_null());
    assert_eq!(limited["minute_used"], 1 + TIGHT_KEY_RPM);
    // Upstream failures: 500 passes through with its upstream status; 502/504 have none.
    assert_eq!(lines["upstream_500"]["upstream_status"], 500);
    assert!(lines["upstream_drop"]["upstream_status"].is_null());
    assert!(lines["upstream_hang"]["upstream_status"].is_null());

    // Exactly one line per request.
    let all = gateway.usage.lines();
    assert_eq!(all.len(), sent.len(), "one line per request");

    // The metrics count exactly what the usage log says, series by series.
    let metrics = gateway.metrics().await;
    let mut by_series: HashMap<[String; 5], u64> = HashMap::new();
    for line in &all {
        let label = |f: &str| line[f].as_str().unwrap_or("-").to_string();
        *by_series
            .entry([
                label("team"),
                label("key_id"),
                label("route"),
                line["status"].to_string(),
                label("outcome"),
            ])
            .or_default() += 1;
    }
    let mut series_total = 0.0;
    for ([team, key_id, route, status, outcome], count) in &by_series {
        let value = series(
            &metrics,
            "keygate_requests_total",
            &[
                ("team", team),
                ("key_id", key_id),
                ("route", route),
                ("status", status),
                ("outcome", outcome),
            ],
        );
        assert_eq!(
            value,
            Some(*count as f64),
            "{team} {key_id} {route} {status} {outcome}"
        );
        series_total += *count as f64;
    }
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("keygate_requests_total{"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        counted, series_total,
        "no request counted that has no usage line"
    );
    // Every request that reached the quota step had its decision timed once: those whose
    // line carries the quota's usage (the store never failed here).
    let decided = all.iter().filter(|l| !l["minute_limit"].is_null()).count();
    assert!(decided > 1, "{decided}");
    assert_eq!(
        series(
            &metrics,
            "keygate_quota_decision_duration_seconds_count",
            &[]
        ),
        Some(decided as f64)
    );
    assert_eq!(
        series(
            &metrics,
            "keygate_quota_decision_duration_seconds_bucket",
            &[("le", "5.0")]
        ),
        Some(decided as f64),
        "a decision on the memory store takes well under 5 s"
    );

    gateway.shutdown().await;
}

#[tokio::test]
async fn promtool_accepts_metrics_after_every_outcome_and_nothing_leaks() {
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config_from(&config_text(&upstream, ""))).await;
    let sent = every_outcome(&gateway, &upstream).await;
    for (_, request) in &sent {
        gateway.usage.wait_for(&request.id).await;
    }
    let metrics = gateway.metrics().await;
    promtool_check(&metrics);

    let value = |name: &str, labels: &[(&str, &str)]| {
        series(&metrics, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{metrics}"))
    };
    let route = "POST /v1/text-to-image";
    assert_eq!(
        value(
            "keygate_requests_total",
            &[
                ("team", "-"),
                ("key_id", "-"),
                ("route", "-"),
                ("status", "401"),
                ("outcome", "unauthorized")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            "keygate_requests_total",
            &[
                ("team", "design"),
                ("key_id", "design-tight"),
                ("route", route),
                ("status", "429"),
                ("outcome", "rate_limited")
            ]
        ),
        1.0
    );
    assert_eq!(
        value("keygate_rejections_total", &[("reason", "unauthorized")]),
        3.0
    );
    assert_eq!(
        value("keygate_rejections_total", &[("reason", "forbidden_scope")]),
        1.0
    );
    assert_eq!(
        value(
            "keygate_rejections_total",
            &[("reason", "forbidden_no_route")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "keygate_rejections_total",
            &[("reason", "rate_limited_key")]
        ),
        1.0
    );
    assert_eq!(
        value("keygate_rejections_total", &[("reason", "bad_request")]),
        1.0
    );
    assert_eq!(
        value("keygate_rejections_total", &[("reason", "no_upstream_key")]),
        1.0
    );
    assert_eq!(
        value("keygate_auth_failures_total", &[("reason", "missing")]),
        1.0
    );
    assert_eq!(
        value("keygate_auth_failures_total", &[("reason", "unknown")]),
        1.0
    );
    assert_eq!(
        value("keygate_auth_failures_total", &[("reason", "expired")]),
        1.0
    );
    // 1 + 3 forwarded with 200, then a 500 passed through: five upstream answers timed;
    // the dropped and the hung call have no upstream latency.
    assert_eq!(
        value(
            "keygate_upstream_duration_seconds_count",
            &[("route", route)]
        ),
        5.0
    );
    assert_eq!(
        value(
            "keygate_request_duration_seconds_count",
            &[("route", route), ("outcome", "forwarded")]
        ),
        4.0
    );
    assert_eq!(
        value(
            "keygate_request_duration_seconds_bucket",
            &[
                ("route", route),
                ("outcome", "upstream_timeout"),
                ("le", "0.25")
            ]
        ),
        0.0,
        "a 504 after the 300 ms upstream timeout is slower than 250 ms"
    );
    // Quota gauges read fresh from the store at scrape time: design spent 1 + 3 + the
    // refunded failures are given back, so 4 in the minute and the day.
    assert_eq!(
        value(
            "keygate_quota_used",
            &[("team", "design"), ("window", "minute")]
        ),
        4.0
    );
    assert_eq!(
        value(
            "keygate_quota_limit",
            &[("team", "design"), ("window", "minute")]
        ),
        DESIGN_RPM as f64
    );
    assert_eq!(
        value(
            "keygate_quota_used",
            &[("team", "marketing"), ("window", "day")]
        ),
        0.0
    );
    assert_eq!(value("keygate_store_errors_total", &[]), 0.0);
    assert_eq!(value("keygate_store_degraded", &[]), 0.0);
    assert_eq!(
        value(
            "keygate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        value(
            "keygate_usage_log_dropped_total",
            &[("reason", "queue_full")]
        ),
        0.0
    );
    value("keygate_alerts_total", &[("kind", "quota_warning")]);
    value("keygate_upstream_retries_total", &[]);

    assert_no_secret("/metrics", &metrics);
    assert_no_secret(
        "the usage log",
        &std::fs::read_to_string(&gateway.usage.path).unwrap(),
    );
    gateway.shutdown().await;
    logs::assert_clean(&secrets());
}

#[tokio::test]
async fn the_usage_log_follows_rotation_and_sighup() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.log");
    let extra = format!("[usage_log]\npath = {:?}\n", path.display().to_string());
    let gateway = TestGateway::start(config_from(&config_text(&upstream, &extra))).await;
    let usage = UsageFile::new(&path);
    let before = request_id(&gateway.generate(TOKEN_DESIGN_GENERATE).await);
    usage.wait_for(&before).await;

    // logrotate without copytruncate: the file is renamed away, then a new one appears.
    let rotated = UsageFile::new(&dir.path().join("usage.log.1"));
    std::fs::rename(&path, &rotated.path).unwrap();
    let after_rename = request_id(&gateway.generate(TOKEN_DESIGN_GENERATE).await);
    usage.wait_for(&after_rename).await;
    assert_eq!(
        rotated.lines().len(),
        1,
        "the rotated file keeps only the old line"
    );

    // Deleted outright: a new file is created.
    std::fs::remove_file(&path).unwrap();
    let after_delete = request_id(&gateway.generate(TOKEN_DESIGN_GENERATE).await);
    usage.wait_for(&after_delete).await;
    assert_eq!(usage.lines().len(), 1);

    // SIGHUP reopens the file before the next line (and does not stop the process).
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let id = request_id(&gateway.generate(TOKEN_DESIGN_GENERATE).await);
        usage.wait_for(&id).await;
        if logs::captured().contains("\"signal\":true") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reopen after SIGHUP within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gateway.shutdown().await;
}
