//! Quotas as a client sees them (SPEC §3, §4), with a manual clock instead of sleeps: the
//! rolling minute never admits more than rpm in any 60 s span, room comes back exactly when
//! Retry-After says, the day resets at midnight of `day_tz`, a key's own limit and the
//! upstream ceiling bind, refunds give room back, and concurrency admits exactly the limit.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jiff::Timestamp;
use keygate::clock::ManualClock;
use keygate::quota::SubjectKind;

fn at(text: &str) -> Timestamp {
    text.parse().expect("a valid RFC 3339 time")
}

async fn start_at(now: &str, extra: &str) -> (MockUpstream, TestGateway, Arc<ManualClock>) {
    let upstream = MockUpstream::start().await;
    let clock = Arc::new(ManualClock::new(at(now)));
    let config = config_from(&standard_config_text(&upstream.url(), extra));
    let gateway = TestGateway::start_with_clock(config, clock.clone()).await;
    (upstream, gateway, clock)
}

/// The quota fields of one answer, as SPEC §3 names them.
#[derive(Debug, PartialEq, Eq)]
struct QuotaHeaders {
    limit: String,
    remaining: String,
    reset: String,
    policy: String,
    state: String,
    retry_after: Option<String>,
}

fn quota_headers(answer: &Answer) -> QuotaHeaders {
    let get = |name: &str| {
        answer
            .header(name)
            .unwrap_or_else(|| panic!("{} answer without {name}", answer.status))
            .to_string()
    };
    QuotaHeaders {
        limit: get("x-ratelimit-limit"),
        remaining: get("x-ratelimit-remaining"),
        reset: get("x-ratelimit-reset"),
        policy: get("ratelimit-policy"),
        state: get("ratelimit"),
        retry_after: answer.header("retry-after").map(str::to_string),
    }
}

fn expect(
    limit: u64,
    remaining: u64,
    reset: u64,
    (minute_q, day_q): (u64, u64),
    (minute_r, minute_t, day_r, day_t): (u64, u64, u64, u64),
    retry_after: Option<u64>,
) -> QuotaHeaders {
    QuotaHeaders {
        limit: limit.to_string(),
        remaining: remaining.to_string(),
        reset: reset.to_string(),
        policy: format!("\"minute\";q={minute_q};w=60, \"day\";q={day_q};w=86400"),
        state: format!("\"minute\";r={minute_r};t={minute_t}, \"day\";r={day_r};t={day_t}"),
        retry_after: retry_after.map(|s| s.to_string()),
    }
}

async fn send(gateway: &TestGateway, token: &str) -> Answer {
    Answer::read(gateway.generate(token).await).await
}

async fn assert_limited(gateway: &TestGateway, token: &str) -> Answer {
    let answer = send(gateway, token).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.body, RATE_LIMITED_BODY);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.header("x-request-id").is_some());
    answer
}

async fn assert_admitted(gateway: &TestGateway, token: &str) -> Answer {
    let answer = send(gateway, token).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.header("retry-after").is_none());
    answer
}

/// Room comes back exactly at `instant`: a millisecond before it the answer is still a 429
/// that says to retry in 1 s, at it the request is admitted.
async fn assert_room_returns_at(
    gateway: &TestGateway,
    clock: &ManualClock,
    token: &str,
    instant: &str,
) -> Answer {
    let instant = at(instant);
    clock.set(
        instant
            .checked_sub(jiff::SignedDuration::from_millis(1))
            .unwrap(),
    );
    let refused = assert_limited(gateway, token).await;
    assert_eq!(refused.header("retry-after"), Some("1"));
    clock.set(instant);
    assert_admitted(gateway, token).await
}

#[tokio::test]
async fn a_burst_at_0_59_and_another_at_1_01_cannot_exceed_rpm_together() {
    let (upstream, gateway, clock) = start_at("2026-11-27T10:00:59Z", "").await;
    let mut last = None;
    for _ in 0..MARKETING_RPM {
        last = Some(assert_admitted(&gateway, TOKEN_MARKETING).await);
    }
    // 10:00:59 → midnight is 50341 s; the 0:59 bucket leaves the window at 10:02:00.
    assert_eq!(
        quota_headers(&last.unwrap()),
        expect(10, 0, 61, (10, 100), (0, 61, 90, 50341), None)
    );
    assert_limited(&gateway, TOKEN_MARKETING).await;

    clock.set(at("2026-11-27T10:01:01Z"));
    let refused = assert_limited(&gateway, TOKEN_MARKETING).await;
    assert_eq!(
        quota_headers(&refused),
        expect(10, 0, 59, (10, 100), (0, 59, 90, 50339), Some(59))
    );

    // Retry-After is honest: no room a millisecond before it runs out, room when it has.
    assert_room_returns_at(&gateway, &clock, TOKEN_MARKETING, "2026-11-27T10:02:00Z").await;
    assert_eq!(upstream.count() as u64, MARKETING_RPM + 1);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn room_comes_back_one_second_at_a_time_as_retry_after_says() {
    let (upstream, gateway, clock) = start_at("2026-11-27T10:00:00Z", "").await;
    let start = at("2026-11-27T10:00:00Z");
    let after = |ms: i64| {
        start
            .checked_add(jiff::SignedDuration::from_millis(ms))
            .unwrap()
    };
    for second in 0..MARKETING_RPM as i64 {
        clock.set(after(second * 1000));
        assert_admitted(&gateway, TOKEN_MARKETING).await;
    }
    clock.set(after(30_000));
    let refused = assert_limited(&gateway, TOKEN_MARKETING).await;
    // The oldest request (second 0) leaves at second 61.
    assert_eq!(refused.header("retry-after"), Some("31"));
    assert_eq!(refused.header("x-ratelimit-reset"), Some("31"));

    assert_room_returns_at(&gateway, &clock, TOKEN_MARKETING, "2026-11-27T10:01:01Z").await;
    // Only that one second's worth came back: the next leaves at second 62.
    assert_room_returns_at(&gateway, &clock, TOKEN_MARKETING, "2026-11-27T10:01:02Z").await;
    assert_eq!(upstream.count() as u64, MARKETING_RPM + 2);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn every_2xx_carries_the_quota_state() {
    let (_upstream, gateway, clock) = start_at("2026-11-27T10:00:00Z", "").await;
    let first = assert_admitted(&gateway, TOKEN_DESIGN_GENERATE).await;
    assert_eq!(
        quota_headers(&first),
        expect(100, 99, 61, (100, 10_000), (99, 61, 9_999, 50_400), None)
    );
    clock.advance(Duration::from_secs(20));
    let second = assert_admitted(&gateway, TOKEN_DESIGN_GENERATE).await;
    assert_eq!(
        quota_headers(&second),
        expect(100, 98, 41, (100, 10_000), (98, 41, 9_998, 50_380), None)
    );
    // The read route on the same team shares the counters.
    let read = Answer::read(
        gateway
            .client
            .get(gateway.url("/v1/models"))
            .bearer_auth(TOKEN_DESIGN_READ)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(read.status, 200);
    assert_eq!(
        quota_headers(&read),
        expect(100, 97, 41, (100, 10_000), (97, 41, 9_997, 50_380), None)
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// Spends a team's whole day in bursts of `rpm`, a minute and a second apart.
async fn spend_the_day(
    gateway: &TestGateway,
    clock: &ManualClock,
    token: &str,
    rpm: u64,
    rpd: u64,
) {
    for burst in 0..rpd / rpm {
        if burst > 0 {
            clock.advance(Duration::from_secs(61));
        }
        for _ in 0..rpm {
            assert_admitted(gateway, token).await;
        }
    }
    clock.advance(Duration::from_secs(61));
}

#[tokio::test]
async fn the_day_resets_at_utc_midnight() {
    let (upstream, gateway, clock) = start_at("2026-11-27T20:00:00Z", "").await;
    spend_the_day(
        &gateway,
        &clock,
        TOKEN_MARKETING,
        MARKETING_RPM,
        MARKETING_RPD,
    )
    .await;
    // Now 20:10:10: the minute has room, the day has none until midnight (13790 s).
    let refused = assert_limited(&gateway, TOKEN_MARKETING).await;
    assert_eq!(
        quota_headers(&refused),
        expect(100, 0, 13_790, (10, 100), (10, 60, 0, 13_790), Some(13_790))
    );
    let admitted =
        assert_room_returns_at(&gateway, &clock, TOKEN_MARKETING, "2026-11-28T00:00:00Z").await;
    assert_eq!(
        quota_headers(&admitted),
        expect(10, 9, 61, (10, 100), (9, 61, 99, 86_400), None)
    );
    assert_eq!(upstream.count() as u64, MARKETING_RPD + 1);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn the_day_resets_at_midnight_of_day_tz() {
    let extra = "[quotas]\nday_tz = \"America/New_York\"\n";
    // 23:00Z is 18:00 in New York (EST, UTC-5): its midnight is 05:00Z.
    let (_upstream, gateway, clock) = start_at("2026-11-27T23:00:00Z", extra).await;
    spend_the_day(
        &gateway,
        &clock,
        TOKEN_MARKETING,
        MARKETING_RPM,
        MARKETING_RPD,
    )
    .await;
    let refused = assert_limited(&gateway, TOKEN_MARKETING).await;
    // 23:10:10Z → 05:00:00Z.
    assert_eq!(refused.header("retry-after"), Some("20990"));
    clock.set(at("2026-11-28T00:00:00Z"));
    let refused = assert_limited(&gateway, TOKEN_MARKETING).await;
    assert_eq!(
        refused.header("retry-after"),
        Some("18000"),
        "UTC midnight is no reset"
    );
    let admitted =
        assert_room_returns_at(&gateway, &clock, TOKEN_MARKETING, "2026-11-28T05:00:00Z").await;
    assert!(
        admitted
            .header("ratelimit")
            .unwrap()
            .ends_with("\"day\";r=99;t=86400"),
        "{:?}",
        admitted.header("ratelimit")
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_key_with_its_own_rpm_is_held_to_it_while_the_team_has_room() {
    let (upstream, gateway, _clock) = start_at("2026-11-27T10:00:00Z", "").await;
    for i in 0..TIGHT_KEY_RPM {
        let answer = assert_admitted(&gateway, TOKEN_DESIGN_TIGHT).await;
        assert_eq!(answer.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(
            answer.header("x-ratelimit-remaining"),
            Some((TIGHT_KEY_RPM - 1 - i).to_string().as_str())
        );
    }
    let refused = assert_limited(&gateway, TOKEN_DESIGN_TIGHT).await;
    assert_eq!(
        quota_headers(&refused),
        expect(3, 0, 61, (3, 10_000), (0, 61, 9_997, 50_400), Some(61))
    );
    // The team still has room for its other keys.
    let other = assert_admitted(&gateway, TOKEN_DESIGN_GENERATE).await;
    assert_eq!(other.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(other.header("x-ratelimit-remaining"), Some("96"));
    assert_eq!(
        gateway.usage(SubjectKind::Team, "design").await.minute.used,
        4
    );
    assert_eq!(
        gateway
            .usage(SubjectKind::Key, "design-tight")
            .await
            .minute
            .used,
        3
    );
    assert_eq!(upstream.count(), 4);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_key_with_its_own_rpd_is_held_to_it_until_midnight() {
    const TOKEN_DAILY: &str = "kg_prod_design_daily_token_0000000000000000008";
    let extra = format!(
        "[[keys]]\nid = \"design-daily\"\nteam = \"design\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"generate\"]\nenv = \"prod\"\nrpd = 5\n",
        hash(TOKEN_DAILY)
    );
    let (upstream, gateway, clock) = start_at("2026-11-27T10:00:00Z", &extra).await;
    for _ in 0..5 {
        assert_admitted(&gateway, TOKEN_DAILY).await;
    }
    let refused = assert_limited(&gateway, TOKEN_DAILY).await;
    assert_eq!(
        quota_headers(&refused),
        expect(5, 0, 50_400, (100, 5), (95, 61, 0, 50_400), Some(50_400))
    );
    assert_admitted(&gateway, TOKEN_DESIGN_GENERATE).await;
    assert_room_returns_at(&gateway, &clock, TOKEN_DAILY, "2026-11-28T00:00:00Z").await;
    assert_eq!(upstream.count(), 7);
    gateway.shutdown().await;
    logs::assert_clean(&[TOKEN_DAILY]);
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn the_upstream_ceiling_binds_across_teams() {
    let extra = "[upstream.limits]\nrpm = 12\nrpd = 1000\n";
    let (upstream, gateway, _clock) = start_at("2026-11-27T10:00:00Z", extra).await;
    for _ in 0..8 {
        assert_admitted(&gateway, TOKEN_DESIGN_GENERATE).await;
    }
    for _ in 0..4 {
        assert_admitted(&gateway, TOKEN_MARKETING).await;
    }
    // Marketing's own plan (10) has room; the upstream key's plan (12) has none, so the
    // minute policy reported is the ceiling's.
    let refused = assert_limited(&gateway, TOKEN_MARKETING).await;
    assert_eq!(
        quota_headers(&refused),
        expect(12, 0, 61, (12, 100), (0, 61, 96, 50_400), Some(61))
    );
    assert_limited(&gateway, TOKEN_DESIGN_GENERATE).await;
    assert_eq!(upstream.count(), 12);
    assert_eq!(
        gateway
            .usage(SubjectKind::Upstream, "upstream")
            .await
            .minute
            .used,
        12
    );
    assert_eq!(
        gateway
            .usage(SubjectKind::Team, "marketing")
            .await
            .minute
            .used,
        4
    );
    assert_eq!(
        gateway.usage(SubjectKind::Team, "design").await.minute.used,
        8
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn upstream_5xx_is_refunded_and_does_not_count() {
    let (upstream, gateway, _clock) = start_at("2026-11-27T10:00:00Z", "").await;
    upstream.set_reply(Reply::Json(
        503,
        r#"{"error":{"code":"overloaded","message":"Try later"}}"#,
    ));
    // More failures than the plan allows: none of them may use it up.
    for _ in 0..MARKETING_RPM + 2 {
        let answer = send(&gateway, TOKEN_MARKETING).await;
        assert_eq!(answer.status, 503);
        assert_eq!(
            answer.body,
            r#"{"error":{"code":"overloaded","message":"Try later"}}"#
        );
        gateway.wait_team_used("marketing", 0).await;
    }
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    for _ in 0..MARKETING_RPM {
        assert_admitted(&gateway, TOKEN_MARKETING).await;
    }
    assert_limited(&gateway, TOKEN_MARKETING).await;
    assert_eq!(upstream.count() as u64, 2 * MARKETING_RPM + 2);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_connect_failure_is_refunded_and_does_not_count() {
    let clock = Arc::new(ManualClock::new(at("2026-11-27T10:00:00Z")));
    let config = config_from(&standard_config_text(&closed_port_url(), ""));
    let gateway = TestGateway::start_with_clock(config, clock).await;
    for _ in 0..MARKETING_RPM + 2 {
        let answer = send(&gateway, TOKEN_MARKETING).await;
        assert_eq!(answer.status, 502, "{}", answer.body);
        assert_eq!(answer.body, BAD_GATEWAY_BODY);
        gateway.wait_team_used("marketing", 0).await;
    }
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_admit_exactly_the_limit() {
    let (upstream, gateway, _clock) = start_at("2026-11-27T10:00:00Z", "").await;
    let gateway = Arc::new(gateway);
    let mut admitted = std::collections::HashMap::<&str, u64>::new();
    // Two waves: were the tight key's requests racing the team's, the team's plan could be
    // spent before the tight key reached its own limit, and its count would be luck.
    for wave in [
        [(TOKEN_MARKETING, 30), (TOKEN_DESIGN_TIGHT, 30)],
        [(TOKEN_MARKETING, 30), (TOKEN_DESIGN_GENERATE, 200)],
    ] {
        let mut tasks = tokio::task::JoinSet::new();
        for (token, n) in wave {
            for _ in 0..n {
                let gateway = gateway.clone();
                tasks
                    .spawn(async move { (token, gateway.generate(token).await.status().as_u16()) });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let (token, status) = joined.unwrap();
            assert!(status == 200 || status == 429, "unexpected {status}");
            if status == 200 {
                *admitted.entry(token).or_default() += 1;
            }
        }
    }
    assert_eq!(admitted[TOKEN_MARKETING], MARKETING_RPM);
    assert_eq!(admitted[TOKEN_DESIGN_TIGHT], TIGHT_KEY_RPM);
    assert_eq!(
        admitted[TOKEN_DESIGN_GENERATE] + admitted[TOKEN_DESIGN_TIGHT],
        DESIGN_RPM,
        "the team as a whole gets exactly its plan"
    );
    assert_eq!(upstream.count() as u64, MARKETING_RPM + DESIGN_RPM);
    Arc::try_unwrap(gateway).ok().unwrap().shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}
