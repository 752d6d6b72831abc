//! Upstream resilience: retries of the upstream's 429 and 503 with backoff and Retry-After,
//! a retried request charged once, key failover on 429 and 401 (with one alert), the
//! circuit breaker (immediate 503s while the upstream is down, a probe after the
//! cool-down), and the requests that must never be sent twice.

mod common;

use std::time::Duration;

use keygate::config::{Config, KeySource};
use keygate::secret::Secret;

use common::observe::series;
use common::webhook::{Answer, WebhookReceiver};
use common::*;

const UPSTREAM_429: &str = r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit exceeded. Please try again later."}}"#;
const UPSTREAM_503: &str = r#"{"error":{"code":"service_unavailable","message":"Overloaded"}}"#;
const UPSTREAM_500: &str = r#"{"error":{"code":"internal","message":"Model crashed"}}"#;

/// Fast retries (so tests take milliseconds, not the production seconds) and a circuit
/// that stays out of the way unless a test sets its own.
const FAST_RETRIES: &str = "[upstream.retry]\nattempts = 3\nbase = \"10ms\"\ncap = \"40ms\"\nbudget = \"10s\"\n[upstream.circuit]\nenabled = false\n";

fn config(upstream: &MockUpstream, resilience: &str, extra: &str) -> Config {
    config_from(&config_text_with_resilience(
        &upstream.url(),
        resilience,
        extra,
    ))
}

/// The same config with two real keys for `prod`, used in turn.
fn two_key_config(upstream: &MockUpstream, resilience: &str, extra: &str) -> Config {
    let mut config = config(upstream, resilience, extra);
    config.upstream.keys.insert(
        "prod".into(),
        KeySource::Inline(vec![Secret::new(REAL_KEY), Secret::new(REAL_KEY_B)]),
    );
    config
}

fn throttled(retry_after: &'static str) -> Reply {
    Reply::JsonWith(429, UPSTREAM_429, vec![("retry-after", retry_after)])
}

fn retries_header(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-keygate-retries")
        .map(|v| v.to_str().unwrap().to_string())
}

fn keys_used(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .received()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_429_with_retry_after_twice_then_200_reaches_the_client_as_200_charged_once() {
    let upstream = MockUpstream::start().await;
    upstream.script(vec![throttled("1"), throttled("1")]);
    let gateway = TestGateway::start(config(&upstream, FAST_RETRIES, "")).await;

    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 200);
    assert_eq!(retries_header(&response).as_deref(), Some("2"));
    assert_eq!(
        response.headers()["x-ratelimit-remaining"],
        (DESIGN_RPM - 1).to_string(),
        "three upstream calls, one admission"
    );
    let id = common::observe::request_id(&response);
    assert_eq!(response.text().await.unwrap(), common::upstream::OK_JSON);

    let received = upstream.received();
    assert_eq!(received.len(), 3);
    // The wait honoured Retry-After (1 s), not the 10–40 ms backoff.
    for pair in received.windows(2) {
        let waited = pair[1].at - pair[0].at;
        assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    }
    // Every try carried the same body, the same request id and the real key.
    for r in &received {
        assert_eq!(r.body, PROMPT_BODY.as_bytes());
        assert_eq!(r.headers["x-request-id"], id.as_str());
        assert_eq!(
            r.headers["authorization"],
            format!("Bearer {REAL_KEY}").as_str()
        );
    }
    gateway.wait_team_used("design", 1).await;

    let line = gateway.usage.wait_for(&id).await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream_status"], 200);
    assert_eq!(
        gateway.usage.lines().len(),
        1,
        "one request, one usage line"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        series(&metrics, "keygate_upstream_retries_total", &[]),
        Some(2.0)
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_503_is_retried_with_backoff_and_an_http_date_retry_after_is_read() {
    let upstream = MockUpstream::start().await;
    // A date in the past: "retry now", so only the backoff applies.
    upstream.script(vec![
        Reply::JsonWith(
            503,
            UPSTREAM_503,
            vec![("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
        ),
        Reply::Json(503, UPSTREAM_503),
    ]);
    let gateway = TestGateway::start(config(&upstream, FAST_RETRIES, "")).await;
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 200);
    assert_eq!(retries_header(&response).as_deref(), Some("2"));
    assert_eq!(upstream.count(), 3);
    gateway.shutdown().await;
}

#[tokio::test]
async fn when_retries_run_out_the_client_gets_the_last_answer_and_its_admission_back() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(throttled("0"));
    let gateway = TestGateway::start(config(&upstream, FAST_RETRIES, "")).await;

    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 429);
    assert_eq!(retries_header(&response).as_deref(), Some("2"));
    assert_eq!(response.text().await.unwrap(), UPSTREAM_429);
    assert_eq!(upstream.count(), 3, "attempts = 3");
    // The upstream did no work: the team is not charged.
    gateway.wait_team_used("design", 0).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_retry_after_beyond_the_budget_is_answered_at_once_without_a_retry() {
    let upstream = MockUpstream::start().await;
    upstream.script(vec![throttled("120")]);
    let gateway = TestGateway::start(config(&upstream, FAST_RETRIES, "")).await;

    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 429);
    assert_eq!(retries_header(&response), None);
    assert_eq!(response.headers()["retry-after"], "120");
    assert_eq!(upstream.count(), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_throttled_key_rests_and_traffic_moves_to_the_next_key() {
    let upstream = MockUpstream::start().await;
    upstream.refuse_key(REAL_KEY, 429);
    let gateway = TestGateway::start(two_key_config(&upstream, FAST_RETRIES, "")).await;

    let first = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(first.status(), 200);
    assert_eq!(retries_header(&first).as_deref(), Some("1"));
    for _ in 0..5 {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        assert_eq!(response.status(), 200);
        assert_eq!(retries_header(&response), None, "the throttled key rests");
    }
    let used = keys_used(&upstream);
    let a = format!("Bearer {REAL_KEY}");
    let b = format!("Bearer {REAL_KEY_B}");
    assert_eq!(used[0], a);
    assert!(used[1..].iter().all(|k| *k == b), "{used:?}");
    assert_eq!(used.len(), 7);
    gateway.wait_team_used("design", 6).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_rejected_key_is_taken_out_and_alerted_once_without_naming_it() {
    let upstream = MockUpstream::start().await;
    upstream.refuse_key(REAL_KEY, 401);
    let webhook = WebhookReceiver::start(Answer::Status(200)).await;
    let alerts = format!(
        "[alerts]\nwebhooks = [{:?}]\nretry_backoff = \"20ms\"\n",
        webhook.url()
    );
    let gateway = TestGateway::start(two_key_config(&upstream, FAST_RETRIES, &alerts)).await;

    for _ in 0..6 {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        assert_eq!(response.status(), 200, "the other key serves the request");
    }
    let used = keys_used(&upstream);
    let a = format!("Bearer {REAL_KEY}");
    assert_eq!(used.iter().filter(|k| **k == a).count(), 1, "{used:?}");

    webhook.wait_for(1, Duration::from_secs(5)).await;
    let alert = webhook
        .alerts()
        .into_iter()
        .find(|a| a["kind"] == "upstream_key_rejected")
        .expect("an upstream_key_rejected alert");
    assert_eq!(alert["env"], "prod");
    assert_eq!(alert["key_index"], 0);
    assert!(alert["text"].as_str().unwrap().contains("prod key #0"));
    let raw = webhook.raw_bodies();
    for secret in [REAL_KEY, REAL_KEY_B, TOKEN_DESIGN_GENERATE] {
        assert!(!raw.contains(secret), "an alert carries a secret");
    }
    let metrics = gateway.metrics().await;
    assert_eq!(
        series(
            &metrics,
            "keygate_alerts_total",
            &[("kind", "upstream_key_rejected")]
        ),
        Some(1.0)
    );
    gateway.shutdown().await;
    assert_eq!(
        webhook
            .alerts()
            .iter()
            .filter(|a| a["kind"] == "upstream_key_rejected")
            .count(),
        1
    );
}

#[tokio::test]
async fn with_one_key_a_rejection_is_not_retried_and_answers_502() {
    let upstream = MockUpstream::start().await;
    upstream.refuse_key(REAL_KEY, 401);
    let gateway = TestGateway::start(config(&upstream, FAST_RETRIES, "")).await;
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 502);
    assert_eq!(retries_header(&response), None);
    assert_eq!(response.text().await.unwrap(), BAD_GATEWAY_BODY);
    assert_eq!(upstream.count(), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_dead_upstream_opens_the_circuit_and_answers_503_at_once() {
    let resilience = "[upstream.retry]\nattempts = 2\nbase = \"5ms\"\ncap = \"10ms\"\n[upstream.circuit]\nfailures = 4\ncooldown = \"60s\"\n";
    let text = config_text_with_resilience(&closed_port_url(), resilience, "");
    let gateway = TestGateway::start(config_from(&text)).await;

    // Two tries per request: the fourth failed connect, in the second request, opens it.
    for _ in 0..2 {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        assert_eq!(response.status(), 502);
        assert_eq!(response.text().await.unwrap(), BAD_GATEWAY_BODY);
    }
    let (status, ready) = gateway.readyz().await;
    assert_eq!(
        status, 200,
        "an open circuit does not make a replica unready"
    );
    assert_eq!(ready["upstream_circuit"]["state"], "open");

    for _ in 0..5 {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        assert_eq!(response.status(), 503);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert!(response.headers().contains_key("x-request-id"));
        assert_eq!(response.text().await.unwrap(), SERVICE_UNAVAILABLE_BODY);
    }
    // Nothing was charged for requests that never reached the upstream.
    gateway.wait_team_used("design", 0).await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        series(&metrics, "keygate_upstream_circuit_state", &[]),
        Some(1.0)
    );
    assert_eq!(
        series(&metrics, "keygate_upstream_circuit_opened_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        series(
            &metrics,
            "keygate_rejections_total",
            &[("reason", "upstream_circuit_open")]
        ),
        Some(5.0)
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn after_the_cool_down_a_probe_goes_through_and_traffic_resumes() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Json(500, UPSTREAM_500));
    let resilience = "[upstream.retry]\nattempts = 1\n[upstream.circuit]\nfailures = 3\ncooldown = \"300ms\"\nprobes = 1\n";
    let gateway = TestGateway::start(config(&upstream, resilience, "")).await;

    for _ in 0..3 {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        assert_eq!(response.status(), 500, "the upstream's own 5xx");
    }
    let refused = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(upstream.count(), 3, "the open circuit sent nothing");

    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    // Poll until the cool-down ends: the first request let through is the probe.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        match response.status().as_u16() {
            200 => break,
            503 => assert_eq!(upstream.count(), 3, "refused requests never reach it"),
            other => panic!("unexpected {other}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "circuit never half-opened"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(upstream.count(), 4, "one probe");
    let (_, ready) = gateway.readyz().await;
    assert_eq!(ready["upstream_circuit"]["state"], "closed");
    let answers = generate_all((0..10).map(|_| (&gateway, TOKEN_DESIGN_GENERATE))).await;
    assert_eq!(count_status(&answers, 200), 10, "{answers:?}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_failed_probe_opens_the_circuit_again() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Json(502, UPSTREAM_500));
    let resilience =
        "[upstream.retry]\nattempts = 1\n[upstream.circuit]\nfailures = 2\ncooldown = \"200ms\"\n";
    let gateway = TestGateway::start(config(&upstream, resilience, "")).await;
    for _ in 0..2 {
        assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 502);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while upstream.count() < 3 {
        let status = gateway.generate(TOKEN_DESIGN_GENERATE).await.status();
        assert!(status == 503 || status == 502, "{status}");
        assert!(std::time::Instant::now() < deadline, "no probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The probe failed: open again, so the next request is refused without a call.
    assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 503);
    assert_eq!(upstream.count(), 3);
    let metrics = gateway.metrics().await;
    assert_eq!(
        series(&metrics, "keygate_upstream_circuit_opened_total", &[]),
        Some(2.0)
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_body_too_large_to_hold_streams_once_and_is_never_replayed() {
    let upstream = MockUpstream::start().await;
    upstream.script(vec![Reply::Json(503, UPSTREAM_503)]);
    let resilience = "[upstream.retry]\nattempts = 3\nbase = \"5ms\"\ncap = \"10ms\"\nmax_replay_bytes = 1024\n[upstream.circuit]\nenabled = false\n";
    let gateway = TestGateway::start(config(&upstream, resilience, "")).await;

    let big = vec![b'x'; 4096];
    let response = gateway
        .client
        .post(gateway.url("/v1/text-to-image"))
        .bearer_auth(TOKEN_DESIGN_GENERATE)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "the upstream's answer, not retried");
    assert_eq!(retries_header(&response), None);
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.received()[0].body_len, 4096);

    // A small body of unknown length (chunked) streams once too.
    upstream.script(vec![Reply::Json(503, UPSTREAM_503)]);
    let response = gateway.generate_chunked(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 503);
    assert_eq!(upstream.count(), 2);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_request_the_upstream_may_have_started_is_never_retried() {
    let upstream = MockUpstream::start().await;
    let resilience = "[upstream.retry]\nattempts = 5\nbase = \"5ms\"\ncap = \"10ms\"\n[upstream.circuit]\nenabled = false\n";
    let text = config_text_with_resilience(&upstream.url(), resilience, "")
        .replace("timeout = \"5s\"", "timeout = \"300ms\"");
    let gateway = TestGateway::start(config_from(&text)).await;

    // The connection breaks after the request went out: 502, one call.
    upstream.set_reply(Reply::Drop);
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 502);
    assert_eq!(upstream.count(), 1);

    // The upstream is slow (maybe generating): 504, one call.
    upstream.set_reply(Reply::Hang);
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 504);
    assert_eq!(upstream.count(), 2);

    // A 500 is the upstream's answer about this request: passed on, one call.
    upstream.set_reply(Reply::Json(500, UPSTREAM_500));
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 500);
    assert_eq!(upstream.count(), 3);
    gateway.shutdown().await;
}

#[test]
fn retry_and_circuit_settings_are_validated_together() {
    let upstream_url = "http://127.0.0.1:9";
    let text = config_text_with_resilience(
        upstream_url,
        "[upstream.retry]\nattempts = 0\nbase = \"2s\"\ncap = \"1s\"\nbudget = \"0s\"\nmax_replay_bytes = 999999999999\n[upstream.circuit]\nfailures = 0\nprobes = 0\ncooldown = \"soon\"\n",
        "",
    );
    let error = Config::from_toml(&text).unwrap_err().to_string();
    for field in [
        "upstream.retry.attempts",
        "upstream.retry.cap",
        "upstream.retry.budget",
        "upstream.retry.max_replay_bytes",
        "upstream.circuit.failures",
        "upstream.circuit.probes",
        "upstream.circuit.cooldown",
    ] {
        assert!(error.contains(field), "{field} missing from: {error}");
    }
    let unknown = config_text_with_resilience(upstream_url, "[upstream.retry]\nhedge = true\n", "");
    let error = Config::from_toml(&unknown).unwrap_err().to_string();
    assert!(error.contains("hedge"), "{error}");
}

#[tokio::test]
async fn a_held_body_that_stalls_or_breaks_off_is_the_clients_fault_and_never_sent() {
    use tokio::io::AsyncWriteExt;
    let upstream = MockUpstream::start().await;
    let mut config = config(&upstream, FAST_RETRIES, "");
    config.server.body_read_timeout = Duration::from_millis(300);
    let gateway = TestGateway::start(config).await;
    let auth = format!("Authorization: Bearer {TOKEN_DESIGN_GENERATE}");
    let head = common::raw::post_head(&[auth.as_bytes()], Some(100));

    // Stalls: 408 after body_read_timeout.
    let mut stream = common::raw::connect(gateway.proxy_addr()).await;
    stream.write_all(&head).await.unwrap();
    stream.write_all(b"{\"prompt\"").await.unwrap();
    let outcome = common::raw::read_response(&mut stream).await;
    assert_eq!(outcome.response().status, 408);
    assert_eq!(outcome.response().body_text(), REQUEST_TIMEOUT_BODY);

    // Breaks off: 400, not a 502 blamed on the upstream.
    let mut request = head.clone();
    request.extend_from_slice(b"{\"prompt\"");
    let outcome = common::raw::exchange_then_close(gateway.proxy_addr(), &request).await;
    assert_eq!(outcome.status(), Some(400), "{outcome:?}");
    assert_eq!(outcome.response().body_text(), BAD_REQUEST_BODY);

    assert_eq!(
        upstream.count(),
        0,
        "a held body goes out only when complete"
    );
    gateway.wait_team_used("design", 0).await;
    gateway.shutdown().await;
}
