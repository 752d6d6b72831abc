//! Shared quotas end to end: several keygate instances on one real redis-server, exact under
//! concurrency, rolling minute and calendar day moved without sleeping, the upstream
//! ceiling over teams, refunds, and each `store.on_error` mode while Redis is killed or
//! stalled.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::clock::OffsetClock;
use keygate::config::Config;

use common::redis::RedisServer;
use common::*;

/// A team on a plan with a tiny day, for the day boundary.
const TOKEN_NIGHTLY: &str = "kg_prod_nightly_generate_token_0000000000000007";

/// The standard config on a store URL. `store` goes into `[store]`; `extra` after it.
fn config(upstream: &MockUpstream, url: &str, store: &str, extra: &str) -> Config {
    config_from(&standard_config_text(
        &upstream.url(),
        &format!("[store]\nurl = \"{url}\"\n{store}\n{extra}"),
    ))
}

/// Exactness tests must not fall back: a generous timeout, and `closed` so any store
/// failure shows as a 503 instead of a silently approximate count.
const STRICT: &str = "on_error = \"closed\"\ntimeout = \"5s\"";

fn field(redis: &RedisServer, key: &str, field: &str) -> Option<String> {
    redis
        .cli(&["HGET", key, field])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[tokio::test]
async fn three_instances_on_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(TestGateway::start(config(&upstream, &redis.url(), STRICT, "")).await);
    }
    assert_fleet_admits_exactly_design_rpm(&gateways, &upstream).await;
    assert_eq!(
        field(&redis, "kg:q:{t:design}", "dn").as_deref(),
        Some("100")
    );
    for gateway in gateways {
        gateway.shutdown().await;
    }
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn rolling_minute_on_redis_has_no_double_burst_at_a_minute_boundary() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let clock = Arc::new(OffsetClock::new());
    let gateway =
        TestGateway::start_with(config(&upstream, &redis.url(), STRICT, ""), clock.clone()).await;

    clock.set("2026-11-27T10:00:59.3Z".parse().unwrap());
    for i in 0..MARKETING_RPM {
        let response = gateway.generate(TOKEN_MARKETING).await;
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(
            response.headers()["x-ratelimit-remaining"],
            (MARKETING_RPM - 1 - i).to_string()
        );
    }
    // A new calendar minute is not a new window: the 10 from 10:00:59 still count.
    clock.set("2026-11-27T10:01:00.3Z".parse().unwrap());
    let refused = gateway.generate(TOKEN_MARKETING).await;
    assert_eq!(refused.status(), 429);
    // The bucket of 10:00:59 leaves the window at 10:02:00, 59.7 s from now.
    assert_eq!(refused.headers()["retry-after"], "60");
    assert_eq!(refused.headers()["x-ratelimit-reset"], "60");
    assert_eq!(
        refused.headers()["ratelimit-policy"],
        r#""minute";q=10;w=60, "day";q=100;w=86400"#
    );
    assert_eq!(refused.text().await.unwrap(), RATE_LIMITED_BODY);

    clock.set("2026-11-27T10:01:59.3Z".parse().unwrap());
    let refused = gateway.generate(TOKEN_MARKETING).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");

    clock.set("2026-11-27T10:02:00.3Z".parse().unwrap());
    let admitted = gateway.generate(TOKEN_MARKETING).await;
    assert_eq!(admitted.status(), 200);
    assert_eq!(admitted.headers()["x-ratelimit-remaining"], "9");
    assert_eq!(upstream.count(), MARKETING_RPM as usize + 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn day_window_on_redis_resets_at_midnight_in_day_tz() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let extra = format!(
        r#"
[quotas]
day_tz = "America/New_York"

[plans.tiny]
rpm = 1000
rpd = 3

[[teams]]
name = "nightly"
plan = "tiny"

[[keys]]
id = "nightly-generate"
team = "nightly"
token_sha256 = "{}"
scopes = ["generate"]
env = "prod"
"#,
        hash(TOKEN_NIGHTLY)
    );
    let clock = Arc::new(OffsetClock::new());
    let gateway = TestGateway::start_with(
        config(&upstream, &redis.url(), STRICT, &extra),
        clock.clone(),
    )
    .await;

    // 23:59:58.4 in New York.
    clock.set("2026-11-28T04:59:58.4Z".parse().unwrap());
    for _ in 0..3 {
        assert_eq!(gateway.generate(TOKEN_NIGHTLY).await.status(), 200);
    }
    let refused = gateway.generate(TOKEN_NIGHTLY).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "2");
    assert_eq!(refused.headers()["x-ratelimit-limit"], "3");
    assert_eq!(refused.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(refused.headers()["x-ratelimit-reset"], "2");
    assert_eq!(
        field(&redis, "kg:q:{t:nightly}", "d").as_deref(),
        Some("20261127")
    );

    // 00:00:00.4: a new day in New York (05:00 UTC), a full day ahead of it.
    clock.set("2026-11-28T05:00:00.4Z".parse().unwrap());
    let admitted = gateway.generate(TOKEN_NIGHTLY).await;
    assert_eq!(admitted.status(), 200);
    assert_eq!(admitted.headers()["x-ratelimit-remaining"], "2");
    assert_eq!(admitted.headers()["x-ratelimit-reset"], "86400");
    assert_eq!(
        field(&redis, "kg:q:{t:nightly}", "d").as_deref(),
        Some("20261128")
    );
    assert_eq!(
        field(&redis, "kg:q:{t:nightly}", "dn").as_deref(),
        Some("1")
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn upstream_ceiling_holds_over_two_teams_and_two_instances() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let extra = "[upstream.limits]\nrpm = 15\nrpd = 1000";
    let a = TestGateway::start(config(&upstream, &redis.url(), STRICT, extra)).await;
    let b = TestGateway::start(config(&upstream, &redis.url(), STRICT, extra)).await;
    let requests = (0..25).flat_map(|i| {
        let gateway = if i % 2 == 0 { &a } else { &b };
        [(gateway, TOKEN_DESIGN_GENERATE), (gateway, TOKEN_MARKETING)]
    });
    let answers = generate_all(requests).await;
    assert_eq!(count_status(&answers, 200), 15, "{answers:?}");
    assert_eq!(count_status(&answers, 429), 35, "{answers:?}");
    let marketing_admitted = answers
        .iter()
        .skip(1)
        .step_by(2)
        .filter(|s| **s == 200)
        .count();
    assert!(marketing_admitted <= MARKETING_RPM as usize);
    assert_eq!(upstream.count(), 15);
    assert_eq!(
        field(&redis, "kg:q:{upstream}", "dn").as_deref(),
        Some("15")
    );

    let refused = b.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-ratelimit-limit"], "15");
    assert_eq!(refused.text().await.unwrap(), RATE_LIMITED_BODY);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn upstream_5xx_is_refunded_in_redis() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config(&upstream, &redis.url(), STRICT, "")).await;
    upstream.set_reply(Reply::Json(
        503,
        r#"{"error":{"code":"overloaded","message":"busy"}}"#,
    ));
    for _ in 0..MARKETING_RPM {
        assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 503);
    }
    // Refunds run off the request path: wait until Redis holds nothing for the team.
    let deadline = Instant::now() + Duration::from_secs(5);
    while field(&redis, "kg:q:{t:marketing}", "dn").as_deref() != Some("0") {
        assert!(Instant::now() < deadline, "refunds did not reach Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    for _ in 0..MARKETING_RPM {
        assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 200);
    }
    assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 429);
    gateway.shutdown().await;
}

/// Log lines about this Redis (by port) containing `text`.
fn store_log_lines(redis: &RedisServer, text: &str) -> usize {
    let port = format!("127.0.0.1:{}", redis.port);
    logs::captured()
        .lines()
        .filter(|line| line.contains(text) && line.contains(&port))
        .count()
}

#[tokio::test]
async fn local_mode_keeps_answering_while_redis_is_killed_and_resumes_after_restart() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let store = "on_error = \"local\"\ntimeout = \"200ms\"\nexpected_replicas = 2";
    let a = Arc::new(TestGateway::start(config(&upstream, &redis.url(), store, "")).await);
    let b = Arc::new(TestGateway::start(config(&upstream, &redis.url(), store, "")).await);

    // Background traffic on `design` through both instances for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for gateway in [a.clone(), b.clone(), a.clone(), b.clone()] {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let status = gateway
                    .generate(TOKEN_DESIGN_GENERATE)
                    .await
                    .status()
                    .as_u16();
                seen.push((status, started.elapsed()));
            }
            seen
        }));
    }

    for _ in 0..3 {
        assert_eq!(a.generate(TOKEN_MARKETING).await.status(), 200);
    }
    assert_eq!(
        field(&redis, "kg:q:{t:marketing}", "dn").as_deref(),
        Some("3")
    );
    redis.kill();

    // Each instance now allows 10 / 2 = 5 a minute for marketing, from its own memory.
    for gateway in [&a, &b] {
        let mut answers = Vec::new();
        for _ in 0..8 {
            answers.push(gateway.generate(TOKEN_MARKETING).await.status().as_u16());
        }
        assert_eq!(answers, [200, 200, 200, 200, 200, 429, 429, 429]);
        let (status, body) = gateway.readyz().await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "degraded");
        assert_eq!(body["store"]["state"], "degraded");
        assert_eq!(body["store"]["on_error"], "local");
        assert!(body["store"]["last_error"].is_string(), "{body}");
        assert!(gateway.store_health().is_degraded());
    }
    let refused = a.generate(TOKEN_MARKETING).await;
    assert_eq!(refused.headers()["x-ratelimit-limit"], "5");
    assert_eq!(refused.text().await.unwrap(), RATE_LIMITED_BODY);

    redis.restart();
    a.wait_store_state("ok", Duration::from_secs(15)).await;
    b.wait_store_state("ok", Duration::from_secs(15)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut answers = Vec::new();
    for task in load {
        answers.extend(task.await.unwrap());
    }

    // Counting is shared again: the restarted (empty) Redis receives the next admission.
    assert_eq!(b.generate(TOKEN_MARKETING).await.status(), 200);
    assert_eq!(
        field(&redis, "kg:q:{t:marketing}", "dn").as_deref(),
        Some("1")
    );
    assert!(!a.store_health().is_degraded());

    assert!(!answers.is_empty());
    for (status, took) in &answers {
        assert!(
            *status == 200 || *status == 429,
            "answer {status} during the outage"
        );
        // Nothing waits on a dead Redis beyond store.timeout; a second is a hang.
        assert!(*took < Duration::from_secs(1), "an answer took {took:?}");
    }
    // One line per transition, not one per request: each instance went down once with the
    // kill (a slow answer on a loaded machine may add an outage; hundreds of requests may not).
    let down = store_log_lines(&redis, "quota store unreachable");
    let up = store_log_lines(&redis, "quota store answers again");
    assert!(
        (2..=4).contains(&down),
        "{down} outage lines for {} answers",
        answers.len()
    );
    assert_eq!(up, down, "every outage logged as ended");
    assert!(a.store_health().error_count() >= 1);
    drop(answers);
    Arc::try_unwrap(a).ok().unwrap().shutdown().await;
    Arc::try_unwrap(b).ok().unwrap().shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn closed_mode_answers_503_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let store = "on_error = \"closed\"\ntimeout = \"200ms\"";
    let gateway = TestGateway::start(config(&upstream, &redis.url(), store, "")).await;
    assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 200);

    redis.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let response = gateway.generate(TOKEN_MARKETING).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(response.status(), 503);
        assert_eq!(response.text().await.unwrap(), SERVICE_UNAVAILABLE_BODY);
    }
    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["store"]["state"], "degraded");
    assert_eq!(body["store"]["on_error"], "closed");
    assert_eq!(
        upstream.count(),
        1,
        "nothing reaches the upstream while closed"
    );

    redis.restart();
    gateway
        .wait_store_state("ok", Duration::from_secs(15))
        .await;
    assert_eq!(gateway.readyz().await.0, 200);
    assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 200);
    assert_eq!(
        field(&redis, "kg:q:{t:marketing}", "dn").as_deref(),
        Some("1")
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn open_mode_admits_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let store = "on_error = \"open\"\ntimeout = \"200ms\"";
    let gateway = TestGateway::start(config(&upstream, &redis.url(), store, "")).await;
    redis.kill();
    // Past the team's limit: nothing is counted, everything is admitted.
    for _ in 0..MARKETING_RPM + 5 {
        let response = gateway.generate(TOKEN_MARKETING).await;
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key("x-ratelimit-limit"));
    }
    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["store"]["on_error"], "open");
    assert_eq!(body["store"]["state"], "degraded");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_stalled_redis_takes_the_timeout_path_and_latency_stays_bounded() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let upstream = MockUpstream::start().await;
    let store = "on_error = \"local\"\ntimeout = \"200ms\"";
    let gateway = TestGateway::start(config(&upstream, &redis.url(), store, "")).await;
    assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 200);

    let sleeper = redis.sleep_in_background(3);
    for _ in 0..12 {
        let started = Instant::now();
        let status = gateway.generate(TOKEN_MARKETING).await.status().as_u16();
        // Redis answers nothing for 3 s; an answer within a second did not wait for it.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert!(status == 200 || status == 429, "{status}");
    }
    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(body["store"]["state"], "degraded");
    assert!(
        body["store"]["last_error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{body}"
    );

    sleeper.join().unwrap();
    gateway
        .wait_store_state("ok", Duration::from_secs(15))
        .await;
    let before: u64 = field(&redis, "kg:q:{t:marketing}", "dn")
        .unwrap()
        .parse()
        .unwrap();
    // Redis holds the first admission and the one whose script waited out the sleep.
    assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 200);
    let after: u64 = field(&redis, "kg:q:{t:marketing}", "dn")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(after, before + 1, "the admission is counted in Redis again");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_replica_starts_while_redis_is_down_and_joins_it_later() {
    let port = common::redis::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let upstream = MockUpstream::start().await;
    let store = "on_error = \"local\"\ntimeout = \"200ms\"\nexpected_replicas = 2";
    let gateway = TestGateway::start(config(&upstream, &url, store, "")).await;

    let response = gateway.generate(TOKEN_MARKETING).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-ratelimit-limit"],
        "5",
        "10 / 2 from memory"
    );
    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(body["store"]["state"], "degraded");

    let redis = RedisServer::start_on(port, &[]);
    gateway
        .wait_store_state("ok", Duration::from_secs(15))
        .await;
    let response = gateway.generate(TOKEN_MARKETING).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-ratelimit-limit"],
        "10",
        "the fleet-wide limit again"
    );
    assert_eq!(
        field(&redis, "kg:q:{t:marketing}", "dn").as_deref(),
        Some("1")
    );
    gateway.shutdown().await;
}

/// A token of a team on a plan big enough for local slices.
/// A team `bulk` on a plan of a million a minute and a day, with one key (`TOKEN_BULK`):
/// room enough for slices.
fn bulk_team() -> String {
    format!(
        "[plans.bulk]\nrpm = 1000000\nrpd = 1000000\n\
         [[teams]]\nname = \"bulk\"\nplan = \"bulk\"\n\
         [[keys]]\nid = \"bulk-1\"\nteam = \"bulk\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"generate\"]\nenv = \"prod\"\n",
        hash(TOKEN_BULK)
    )
}

const TOKEN_BULK: &str = "kg_prod_bulk_generate_token_000000000000000011";

/// Redis killed while a replica holds slices: the slices' requests and then the local
/// fallback keep answering, nothing waits on the dead store past its timeout, the slices'
/// refunds to it fail without holding anything up (shutdown included), and after the
/// restart decisions reach Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_keep_answering_while_redis_is_killed_and_resume_after_restart() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let extra = bulk_team();
    let store = "on_error = \"local\"\ntimeout = \"200ms\"\nlocal_slices = true";
    let gateway =
        Arc::new(TestGateway::start(config(&upstream, &redis.url(), store, &extra)).await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (gateway, stop) = (gateway.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let status = gateway.generate(TOKEN_BULK).await.status().as_u16();
                seen.push((status, started.elapsed()));
            }
            seen
        }));
    }
    let served = |metrics: &str| {
        common::observe::series(metrics, "keygate_quota_slice_served_total", &[]).unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while served(&gateway.metrics().await) == 0.0 {
        assert!(Instant::now() < deadline, "no request served from a slice");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    redis.kill();
    gateway
        .wait_store_state("degraded", Duration::from_secs(10))
        .await;
    redis.restart();
    gateway
        .wait_store_state("ok", Duration::from_secs(15))
        .await;
    // Decisions reach the restarted (empty) Redis again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while field(&redis, "kg:q:{t:bulk}", "dn").is_none() {
        assert!(
            Instant::now() < deadline,
            "no decision reached Redis after the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut answers = Vec::new();
    for task in load {
        answers.extend(task.await.unwrap());
    }
    assert!(!answers.is_empty());
    for (status, took) in &answers {
        assert_eq!(
            *status, 200,
            "a huge plan, local mode: every request admitted"
        );
        assert!(*took < Duration::from_secs(1), "an answer took {took:?}");
    }
    let started = Instant::now();
    Arc::into_inner(gateway).unwrap().shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown held up"
    );
    logs::assert_clean(ALL_SECRETS);
}

/// `store.local_slices` end to end: a busy team on a big plan is served mostly from its
/// replica's slice, each answer still carrying its own count (but for counts a refund of
/// unused slots made free again), and Redis counts exactly what was admitted once the
/// slice's second is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_slices_serve_a_busy_team_with_each_answer_its_own_count() {
    local_slices_serve_a_busy_team(None).await;
}

/// The same with `server.shards`: decisions from two shard threads take from one slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_slices_serve_a_busy_team_on_shards_too() {
    local_slices_serve_a_busy_team(Some(2)).await;
}

async fn local_slices_serve_a_busy_team(shards: Option<usize>) {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    let extra = bulk_team();
    let store = format!("{STRICT}\nlocal_slices = true");
    let mut config = config(&upstream, &redis.url(), &store, &extra);
    config.server.shards = shards;
    let gateway = Arc::new(TestGateway::start(config).await);
    const REQUESTS: usize = 400;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let mut remaining = Vec::new();
            for _ in 0..REQUESTS / 8 {
                let response = gateway.generate(TOKEN_BULK).await;
                assert_eq!(response.status(), 200);
                remaining.push(
                    response.headers()["x-ratelimit-remaining"]
                        .to_str()
                        .unwrap()
                        .to_string(),
                );
            }
            remaining
        }));
    }
    let mut remaining = std::collections::HashSet::new();
    for task in tasks {
        remaining.extend(task.await.unwrap());
    }
    // Each admission is answered its own count, except that a slice's unused slots,
    // refunded when its second ends, let later admissions count again what earlier ones
    // were answered: repeats are at most the slots given back while answers were given.
    // (Answers copied from the slice's first would repeat for nearly every request.)
    let returned_meanwhile = common::observe::series(
        &gateway.metrics().await,
        "keygate_quota_slice_returned_total",
        &[],
    )
    .unwrap() as usize;
    assert!(
        REQUESTS - remaining.len() <= returned_meanwhile,
        "{} distinct counts for {REQUESTS} admissions, {returned_meanwhile} slots refunded",
        remaining.len()
    );
    let stats = redis.cli(&["INFO", "commandstats"]).unwrap();
    let scripts: usize = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap());
    assert!(
        scripts * 2 < REQUESTS,
        "{scripts} script calls for {REQUESTS} requests: slices served too few"
    );
    let start = Instant::now();
    while field(&redis, "kg:q:{t:bulk}", "n").as_deref() != Some("400") {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "Redis counts {:?}, not the 400 admitted, after the slice's second",
            field(&redis, "kg:q:{t:bulk}", "n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(field(&redis, "kg:q:{t:bulk}", "dn").as_deref(), Some("400"));
    // The operator's view: what the slices took, served and gave back, held now none.
    let metrics = gateway.metrics().await;
    common::observe::promtool_check(&metrics);
    let count = |name: &str| common::observe::series(&metrics, name, &[]).unwrap() as u64;
    let granted = count("keygate_quota_slice_granted_total");
    let served = count("keygate_quota_slice_served_total");
    let returned = count("keygate_quota_slice_returned_total");
    assert_eq!(granted, served + returned, "none held after the second");
    assert!(
        served * 2 > REQUESTS as u64 && served <= REQUESTS as u64,
        "{served} of {REQUESTS} served from slices"
    );
    Arc::into_inner(gateway).unwrap().shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}
