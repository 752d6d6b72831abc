//! The Redis quota store against a real redis-server, store to store: it makes exactly the
//! memory store's decisions (the reference semantics) at every instant, across minute and
//! day boundaries and DST, keeps constant state, refunds to the exact bucket, and judges
//! windows by Redis's clock however skewed the replicas' clocks are.

mod common;

use std::sync::Arc;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use keygate::clock::{Clock, ManualClock, OffsetClock};
use keygate::config::StoreUrl;
use keygate::quota::calendar::DayCalendar;
use keygate::quota::memory::MemoryStore;
use keygate::quota::redis::RedisStore;
use keygate::quota::{Limits, QuotaStore, Subject, SubjectKind, Window};

use common::redis::{RedisCluster, RedisServer};

fn subject(kind: SubjectKind, id: &str, rpm: u64, rpd: u64) -> Subject {
    Subject {
        kind,
        id: id.into(),
        limits: Limits { rpm, rpd },
    }
}

fn redis_store(server: &RedisServer, clock: Arc<dyn Clock>, calendar: DayCalendar) -> RedisStore {
    RedisStore::open(&StoreUrl::Redis(server.url()), clock, calendar).expect("store opens")
}

/// A small deterministic generator, so a failing sequence can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A ceiling the teams together can reach now and then.
const ROOMY_CEILING: Limits = Limits { rpm: 9, rpd: 60 };
/// A ceiling below each team's own minute: it refuses what the teams admitted.
const TIGHT_CEILING: Limits = Limits { rpm: 4, rpd: 45 };

/// Runs the same random sequence of decisions, refunds and usage reads against the memory
/// store (manual clock) and the Redis store (Redis time moved to the same instants), and
/// requires identical answers. Instants sit half-way into a second so the milliseconds a
/// call takes cannot change a rounded value.
async fn differential(
    url: StoreUrl,
    start: &str,
    tz: TimeZone,
    steps: usize,
    seed: u64,
    ceiling: Limits,
) {
    let start: Timestamp = start.parse().unwrap();
    let manual = Arc::new(ManualClock::new(start));
    let offset = Arc::new(OffsetClock::new());
    let memory = MemoryStore::new(manual.clone(), DayCalendar::new(tz.clone()));
    let redis = RedisStore::open(&url, offset.clone(), DayCalendar::new(tz)).unwrap();

    let upstream = subject(SubjectKind::Upstream, "upstream", ceiling.rpm, ceiling.rpd);
    let team_a = subject(SubjectKind::Team, "design", 6, 40);
    let key_a = subject(SubjectKind::Key, "design-tight", 3, 30);
    let team_b = subject(SubjectKind::Team, "marketing", 5, 25);
    // The same team on a lowered plan (as after a config reload): a window can then hold
    // more than its limit, and room comes back only after several buckets leave.
    let team_a_lowered = subject(SubjectKind::Team, "design", 2, 40);
    let requests: Vec<Vec<Subject>> = vec![
        vec![team_a.clone(), upstream.clone()],
        vec![team_a.clone(), key_a.clone(), upstream.clone()],
        vec![team_b.clone(), upstream.clone()],
        vec![team_b.clone()],
        vec![team_a_lowered, upstream.clone()],
    ];

    let mut rng = XorShift(seed);
    let mut now_ms = start.as_millisecond();
    let mut admissions = Vec::new();
    let (mut admitted, mut refused, mut refunds) = (0, 0, 0);
    for step in 0..steps {
        // Mostly bursts within a second, sometimes a jump of up to 40 s.
        now_ms += match rng.below(10) {
            0..=5 => 0,
            6..=8 => 1000 * rng.below(4) as i64,
            _ => 1000 * rng.below(40) as i64,
        };
        let at = Timestamp::from_millisecond(now_ms).unwrap();
        manual.set(at);
        offset.set(at);
        let which = rng.below(requests.len() as u64) as usize;
        let subjects = &requests[which];
        match rng.below(12) {
            0 if !admissions.is_empty() => {
                let (w, admission) =
                    admissions.swap_remove(rng.below(admissions.len() as u64) as usize);
                let subjects: &Vec<Subject> = &requests[w];
                memory.refund(subjects, admission).await.unwrap();
                redis.refund(subjects, admission).await.unwrap();
                refunds += 1;
            }
            1 => {
                let m = memory.usage(subjects).await.unwrap();
                let r = redis.usage(subjects).await.unwrap();
                assert_eq!(r, m, "usage differs at step {step} ({at})");
            }
            _ => {
                let m = memory.decide(subjects).await.unwrap();
                let r = redis.decide(subjects).await.unwrap();
                let context = format!("step {step} ({at}), request {which}, seed {seed}");
                // On Cluster the ceiling is charged on its own node, with its own clock: in
                // this one-machine test that is the same second and day.
                let r_admission = r.admission.map(|a| {
                    if let Some(ceiling) = a.ceiling {
                        assert_eq!(
                            (ceiling.second, ceiling.day),
                            (a.second, a.day),
                            "{context}"
                        );
                    }
                    keygate::quota::Admission { ceiling: None, ..a }
                });
                assert_eq!(r_admission, m.admission, "admission, {context}");
                assert_eq!(r.denied_by, m.denied_by, "refusal, {context}");
                assert_eq!(
                    r.retry_after_secs, m.retry_after_secs,
                    "Retry-After, {context}"
                );
                assert_eq!(r.usage, m.usage, "usage, {context}");
                match m.admission {
                    Some(admission) => {
                        admitted += 1;
                        admissions.push((which, admission));
                    }
                    None => refused += 1,
                }
            }
        }
    }
    // The sequence must have exercised both answers and refunds to mean anything.
    assert!(
        admitted > steps / 10 && refused > steps / 10 && refunds > 5,
        "{admitted} admitted, {refused} refused, {refunds} refunds"
    );
}

#[tokio::test]
async fn same_decisions_as_memory_through_minutes() {
    let server = RedisServer::start();
    differential(
        StoreUrl::Redis(server.url()),
        "2026-11-27T10:00:00.5Z",
        TimeZone::UTC,
        1500,
        0x9e3779b97f4a7c15,
        ROOMY_CEILING,
    )
    .await;
}

#[tokio::test]
async fn same_decisions_as_memory_across_midnight() {
    // Starts 20 minutes before midnight UTC; the jumps cross it.
    let server = RedisServer::start();
    differential(
        StoreUrl::Redis(server.url()),
        "2026-11-27T23:40:00.5Z",
        TimeZone::UTC,
        1500,
        0x2545f4914f6cdd1d,
        ROOMY_CEILING,
    )
    .await;
}

#[tokio::test]
async fn same_decisions_as_memory_on_a_cluster() {
    // Teams and the ceiling live in different slots: two scripts, compensation on a
    // refusal of the ceiling, and still the memory store's answers.
    let cluster = RedisCluster::start();
    let url = StoreUrl::Cluster(cluster.nodes.iter().map(|n| n.url()).collect());
    differential(
        url,
        "2026-11-27T23:50:00.5Z",
        TimeZone::UTC,
        1200,
        0x1b873593cc9e2d51,
        TIGHT_CEILING,
    )
    .await;
}

#[tokio::test]
async fn same_decisions_as_memory_on_a_dst_day() {
    // Europe/Berlin springs forward on 2026-03-29: that day is 23 hours long, and its
    // midnight (22:00 UTC the day before) is crossed here.
    let tz = TimeZone::get("Europe/Berlin").unwrap();
    let server = RedisServer::start();
    let url = StoreUrl::Redis(server.url());
    differential(
        url,
        "2026-03-28T22:45:00.5Z",
        tz,
        1200,
        0x5851f42d4c957f2d,
        ROOMY_CEILING,
    )
    .await;
}

#[tokio::test]
async fn state_stays_small_whatever_the_traffic() {
    let server = RedisServer::start();
    let clock = Arc::new(OffsetClock::new());
    let store = redis_store(&server, clock.clone(), DayCalendar::utc());
    let team = [subject(
        SubjectKind::Team,
        "design",
        1_000_000_000,
        1_000_000_000,
    )];
    let start: Timestamp = "2026-11-27T10:00:00.5Z".parse().unwrap();
    // Five admissions in each of 300 consecutive seconds, then one 10 minutes later.
    for second in 0..300i64 {
        clock.set(Timestamp::from_millisecond(start.as_millisecond() + second * 1000).unwrap());
        for _ in 0..5 {
            assert!(store.decide(&team).await.unwrap().admitted());
        }
        let fields: usize = server
            .cli(&["HLEN", "kg:q:{t:design}"])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // 61 buckets at most, plus e, n, o, d, dn.
        assert!(fields <= 61 + 5, "{fields} fields after second {second}");
    }
    let usage = store.usage(&team).await.unwrap();
    assert_eq!(usage[0].minute.used, 5 * 61);
    assert_eq!(usage[0].day.used, 5 * 300);
    clock.advance(std::time::Duration::from_secs(600));
    assert!(store.decide(&team).await.unwrap().admitted());
    assert_eq!(
        server.cli(&["HLEN", "kg:q:{t:design}"]).unwrap().trim(),
        "6",
        "one bucket and the marks"
    );
    let ttl: i64 = server
        .cli(&["PTTL", "kg:q:{t:design}"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0, "the hash expires");
}

/// A replica's own clock, off by `skew_ms` from the wall, while Redis runs at wall time
/// plus `shift_ms` (what a test moves).
struct SkewedClock {
    shift_ms: i64,
    skew_ms: i64,
}

impl Clock for SkewedClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millisecond(
            Timestamp::now().as_millisecond() + self.shift_ms + self.skew_ms,
        )
        .unwrap()
    }

    fn offset_from_wall_ms(&self) -> i64 {
        self.shift_ms
    }
}

fn shift_to(at: &str) -> i64 {
    at.parse::<Timestamp>().unwrap().as_millisecond() - Timestamp::now().as_millisecond()
}

#[tokio::test]
async fn skewed_replicas_cannot_widen_the_minute() {
    let server = RedisServer::start();
    let shift_ms = shift_to("2026-11-27T10:00:00.2Z");
    let ahead = redis_store(
        &server,
        Arc::new(SkewedClock {
            shift_ms,
            skew_ms: 25_000,
        }),
        DayCalendar::utc(),
    );
    let behind = redis_store(
        &server,
        Arc::new(SkewedClock {
            shift_ms,
            skew_ms: -25_000,
        }),
        DayCalendar::utc(),
    );
    let team = [subject(SubjectKind::Team, "design", 10, 1000)];
    let mut admitted = 0;
    for i in 0..40 {
        let store = if i % 2 == 0 { &ahead } else { &behind };
        if store.decide(&team).await.unwrap().admitted() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "replica clocks 50 s apart share one window");
}

#[tokio::test]
async fn a_replica_off_near_midnight_still_charges_redis_day() {
    let server = RedisServer::start();
    // Redis says 23:59:58.5; this replica believes it is already 00:00:01.5 tomorrow.
    let shift_ms = shift_to("2026-11-27T23:59:58.5Z");
    let clock = Arc::new(SkewedClock {
        shift_ms,
        skew_ms: 3_000,
    });
    let store = redis_store(&server, clock, DayCalendar::utc());
    let team = [subject(SubjectKind::Team, "design", 100, 2)];
    let first = store.decide(&team).await.unwrap();
    assert_eq!(first.admission.unwrap().day, 20261127);
    assert_eq!(
        first.usage[0].day.reset_secs, 2,
        "the day ends in 1.5 s at Redis time"
    );
    assert!(store.decide(&team).await.unwrap().admitted());
    let refused = store.decide(&team).await.unwrap();
    assert_eq!(refused.denied_by, Some((SubjectKind::Team, Window::Day)));
    assert_eq!(refused.retry_after_secs, 2);
    assert_eq!(
        server
            .cli(&["HGET", "kg:q:{t:design}", "d"])
            .unwrap()
            .trim(),
        "20261127"
    );
}

#[tokio::test]
async fn refunds_go_to_the_bucket_and_day_charged() {
    let server = RedisServer::start();
    let clock = Arc::new(OffsetClock::new());
    let store = redis_store(&server, clock.clone(), DayCalendar::utc());
    let team = [subject(SubjectKind::Team, "design", 2, 100)];
    clock.set("2026-11-27T23:59:30.5Z".parse().unwrap());
    let early = store.decide(&team).await.unwrap().admission.unwrap();
    clock.advance(std::time::Duration::from_secs(10));
    let late = store.decide(&team).await.unwrap().admission.unwrap();
    assert!(!store.decide(&team).await.unwrap().admitted());
    // Refunding the early admission frees its bucket, not the current one.
    store.refund(&team, early).await.unwrap();
    let bucket = early.second.to_string();
    assert_eq!(
        server
            .cli(&["HEXISTS", "kg:q:{t:design}", &bucket])
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        server
            .cli(&["HGET", "kg:q:{t:design}", &late.second.to_string()])
            .unwrap()
            .trim(),
        "1"
    );
    assert_eq!(store.usage(&team).await.unwrap()[0].day.used, 1);
    // After midnight a refund of yesterday's admission leaves today's count alone.
    clock.advance(std::time::Duration::from_secs(25));
    let today = store.decide(&team).await.unwrap().admission.unwrap();
    assert_eq!(today.day, 20261128);
    store.refund(&team, late).await.unwrap();
    let usage = store.usage(&team).await.unwrap();
    assert_eq!(usage[0].day.used, 1, "today's admission is still counted");
    assert_eq!(
        usage[0].minute.used, 1,
        "yesterday's late bucket was refunded"
    );
}

/// Redis forgets the script (a restart, `SCRIPT FLUSH`, a failover to a replica that never
/// saw it): each kind of call loads it again and answers, nothing is lost or doubled.
#[tokio::test]
async fn every_call_loads_the_script_again_when_redis_forgot_it() {
    let server = RedisServer::start();
    let store = redis_store(&server, Arc::new(OffsetClock::new()), DayCalendar::utc());
    let team = [subject(SubjectKind::Team, "design", 100, 1000)];
    let flush = || assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).unwrap().trim(), "OK");
    assert_eq!(store.since_last_answer(), None, "no call yet");
    let first = store.decide(&team).await.unwrap().admission.unwrap();
    assert!(
        store.since_last_answer() < Some(std::time::Duration::from_secs(5)),
        "a decision is an answer"
    );
    flush();
    let decision = store.decide(&team).await.unwrap();
    assert!(decision.admitted(), "a decision after the flush");
    flush();
    assert_eq!(store.usage(&team).await.unwrap()[0].day.used, 2);
    flush();
    store.refund(&team, first).await.unwrap();
    assert_eq!(store.usage(&team).await.unwrap()[0].day.used, 1);
    let loaded = server.cli(&["INFO", "commandstats"]).unwrap();
    assert!(
        loaded.contains("cmdstat_script|load:calls=4,"),
        "one load at the first call and one after each flush: {loaded}"
    );
}

#[tokio::test]
async fn a_redis_clock_stepping_back_does_not_reopen_the_window() {
    let server = RedisServer::start();
    let clock = Arc::new(OffsetClock::new());
    let store = redis_store(&server, clock.clone(), DayCalendar::utc());
    let team = [subject(SubjectKind::Team, "design", 3, 1000)];
    let at: Timestamp = "2026-11-27T10:05:00.5Z".parse().unwrap();
    clock.set(at);
    for _ in 0..2 {
        assert!(store.decide(&team).await.unwrap().admitted());
    }
    // The server's clock is set back two minutes (an NTP step): the counters keep their
    // time, so the charge lands in the latest second they have seen, not two minutes ago.
    clock.set("2026-11-27T10:03:00.5Z".parse().unwrap());
    let admitted = store.decide(&team).await.unwrap();
    assert_eq!(admitted.admission.unwrap().second, at.as_second());
    let refused = store.decide(&team).await.unwrap();
    assert_eq!(refused.denied_by, Some((SubjectKind::Team, Window::Minute)));
    assert_eq!(refused.usage[0].minute.used, 3);
    assert_eq!(
        refused.retry_after_secs, 61,
        "room when the 10:05:00 bucket leaves"
    );
}

/// Decisions of three replicas (stores) fired at once: each store coalesces what arrives
/// while its call is in flight into one script call, and under excess demand exactly the
/// limit is admitted, all-or-nothing over team and ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_decisions_under_concurrency_stay_exact() {
    let server = RedisServer::start();
    let field = |key: &str, field: &str| -> u64 {
        server
            .cli(&["HGET", key, field])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (calls, decisions) =
        concurrent_decisions_stay_exact(StoreUrl::Redis(server.url()), field).await;
    assert_eq!(decisions, 240, "one decision each, one script");
    assert!(
        calls < decisions,
        "{calls} calls for {decisions} decisions: nothing coalesced"
    );
}

/// The same on a Redis Cluster, where a call may only touch one slot: decisions coalesce
/// per hash tag (each team's, and the ceiling's after them), and the ceiling still
/// admits exactly its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_decisions_on_a_cluster_stay_exact() {
    let cluster = RedisCluster::start();
    let url = StoreUrl::Cluster(cluster.nodes.iter().map(|n| n.url()).collect());
    let field = |key: &str, field: &str| -> u64 {
        cluster
            .node_for(key)
            .cli(&["HGET", key, field])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (calls, decisions) = concurrent_decisions_stay_exact(url, field).await;
    // Every decision asks its team; those the team admits ask the ceiling too.
    assert!(decisions > 240, "{decisions}");
    assert!(
        calls < decisions,
        "{calls} calls for {decisions} decisions: nothing coalesced"
    );
}

/// 240 decisions from three stores on `url`, two teams of 50 under a ceiling of 70 a
/// minute: exactly 70 admitted, nothing charged for a refusal (`field` reads a hash field
/// where it lives). Returns the stores' batch statistics, summed.
async fn concurrent_decisions_stay_exact(
    url: StoreUrl,
    field: impl Fn(&str, &str) -> u64,
) -> (u64, u64) {
    let stores: Vec<Arc<RedisStore>> = (0..3)
        .map(|_| {
            Arc::new(
                RedisStore::open(&url, Arc::new(OffsetClock::new()), DayCalendar::utc())
                    .expect("store opens"),
            )
        })
        .collect();
    let ceiling = subject(SubjectKind::Upstream, "upstream", 70, 1000);
    let teams = [
        Arc::new([
            subject(SubjectKind::Team, "design", 50, 1000),
            ceiling.clone(),
        ]),
        Arc::new([subject(SubjectKind::Team, "research", 50, 1000), ceiling]),
    ];
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for i in 0..80 {
            let store = store.clone();
            let subjects = teams[(s + i) % 2].clone();
            tasks.push(tokio::spawn(async move {
                let decision = store.decide(&subjects[..]).await.unwrap();
                (subjects[0].id.clone(), decision.admitted())
            }));
        }
    }
    let mut admitted = std::collections::HashMap::new();
    for task in tasks {
        let (team, yes) = task.await.unwrap();
        *admitted.entry(team.to_string()).or_insert(0u64) += u64::from(yes);
    }
    let (design, research) = (admitted["design"], admitted["research"]);
    assert_eq!(
        design + research,
        70,
        "the ceiling admits exactly its limit"
    );
    assert!(design <= 50 && research <= 50, "{design} {research}");
    assert_eq!(field("kg:q:{upstream}", "n"), 70);
    assert_eq!(field("kg:q:{upstream}", "dn"), 70);
    assert_eq!(
        field("kg:q:{t:design}", "n"),
        design,
        "nothing charged on a refusal"
    );
    assert_eq!(field("kg:q:{t:research}", "dn"), research);
    stores
        .iter()
        .map(|s| s.batch_stats())
        .fold((0, 0), |(c, d), (c2, d2)| (c + c2, d + d2))
}

/// Redis stalls with a batch in flight and more decisions queued behind it: every one of
/// them is answered by `store.on_error` once `store.timeout` passes (local: from this
/// replica's memory; closed: an error), none waits for Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_call_times_out_follows_on_error_for_every_member() {
    use keygate::config::{OnStoreError, StoreConfig};
    use keygate::quota::failover::FailoverStore;
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let team = Arc::new([subject(SubjectKind::Team, "design", 1000, 10_000)]);
    let failover = |mode| {
        let clock: Arc<dyn Clock> = Arc::new(OffsetClock::new());
        let shared = Arc::new(redis_store(&server, clock.clone(), DayCalendar::utc()));
        let settings = StoreConfig {
            url: StoreUrl::Redis(server.url()),
            on_error: mode,
            timeout: std::time::Duration::from_millis(150),
            expected_replicas: 1,
            local_slices: false,
        };
        Arc::new(FailoverStore::new(
            shared,
            &settings,
            clock,
            DayCalendar::utc(),
        ))
    };
    let local = failover(OnStoreError::Local);
    let closed = failover(OnStoreError::Closed);
    for store in [&local, &closed] {
        assert!(
            !store
                .decide(&team[..])
                .await
                .unwrap()
                .admission
                .unwrap()
                .local_fallback
        );
    }
    let sleeper = server.sleep_in_background(2);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for (mode, store) in [("local", &local), ("closed", &closed)] {
        for _ in 0..20 {
            let store = store.clone();
            let team = team.clone();
            tasks.push(tokio::spawn(async move {
                (mode, store.decide(&team[..]).await)
            }));
        }
    }
    let follows_on_error =
        |mode: &str, decided: Result<keygate::quota::Decision, _>| match (mode, decided) {
            ("local", Ok(decision)) => {
                assert!(decision.admission.expect("admitted locally").local_fallback);
            }
            ("closed", Err(_)) => {}
            (mode, other) => panic!("{mode}: {other:?}"),
        };
    for task in tasks {
        let (mode, decided) = task.await.unwrap();
        follows_on_error(mode, decided);
    }
    // Late answers alone are no outage; a Redis silent for twice the timeout is. The next
    // late decisions put each replica in degraded mode.
    for (mode, store) in [("local", &local), ("closed", &closed)] {
        let mut late = 0;
        while !store.health().is_degraded() {
            late += 1;
            assert!(
                late <= 3,
                "{mode}: not degraded after {late} late decisions"
            );
            follows_on_error(mode, store.decide(&team[..]).await);
        }
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "waited {:?} for a sleeping Redis",
        started.elapsed()
    );
    sleeper.join().unwrap();
}

/// A store's calls to Redis run on a thread of their own: a decision reaches Redis, and
/// its answer comes back, while the runtime that asked polls nothing at all — as when a
/// burst of thousands of new connections fills its run queue. On that runtime, the
/// batch call waited its turn behind every one of them at each step, and a 5000-connection
/// burst made decisions miss `store.timeout` (PERFORMANCE.md, session 5).
#[test]
fn decisions_reach_redis_while_the_asking_runtime_is_busy() {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Opened on the runtime, as the gateway opens it.
    let store = runtime
        .block_on(async { redis_store(&server, Arc::new(OffsetClock::new()), DayCalendar::utc()) });
    let team = [subject(SubjectKind::Team, "design", 100, 1000)];
    runtime.block_on(async {
        let mut decision = std::pin::pin!(store.decide(&team));
        assert!(
            futures_util::poll!(&mut decision).is_pending(),
            "queued, not yet answered"
        );
        // The runtime's only thread now blocks: nothing of it runs until Redis has charged
        // the decision and the store has its answer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while server
            .cli(&["HGET", "kg:q:{t:design}", "n"])
            .is_none_or(|n| n.trim() != "1")
            || store.since_last_answer().is_none()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the decision did not reach Redis and come back while the runtime was busy"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let decision = decision.await.unwrap();
        assert!(decision.admitted());
        assert_eq!(decision.usage[0].minute.used, 1);
    });
}

/// Concurrent identical decisions (one team's requests) go to Redis as one decision with
/// their number, and each still gets the answer it would have had alone: exactly the limit
/// admitted, each admission counted at its own place in every window, the rest refused by
/// the state those admissions left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_decisions_sent_together_are_answered_one_by_one() {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let store = Arc::new(redis_store(
        &server,
        Arc::new(OffsetClock::new()),
        DayCalendar::utc(),
    ));
    let ceiling = subject(SubjectKind::Upstream, "upstream", 25, 1000);
    let design = Arc::new([
        subject(SubjectKind::Team, "design", 20, 1000),
        ceiling.clone(),
    ]);
    let research = Arc::new([subject(SubjectKind::Team, "research", 50, 1000), ceiling]);
    assert!(store.decide(&design[..]).await.unwrap().admitted());
    // Redis sleeps with the next call in flight: every decision made meanwhile joins the
    // call after it.
    let sleeper = server.sleep_in_background(1);
    let mut tasks = Vec::new();
    for i in 0..60 {
        let subjects = if i % 6 == 5 {
            research.clone()
        } else {
            design.clone()
        };
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let decision = store.decide(&subjects[..]).await.unwrap();
            (subjects[0].id.to_string(), decision)
        }));
    }
    let mut decisions = Vec::new();
    for task in tasks {
        decisions.push(task.await.unwrap());
    }
    sleeper.join().unwrap();

    let admitted: Vec<_> = decisions.iter().filter(|(_, d)| d.admitted()).collect();
    assert_eq!(
        admitted.len(),
        24,
        "the ceiling's room after the first decision"
    );
    let mut ceiling_used: Vec<u64> = admitted
        .iter()
        .map(|(_, d)| d.usage[1].minute.used)
        .collect();
    ceiling_used.sort_unstable();
    assert_eq!(
        ceiling_used,
        (2..=25).collect::<Vec<_>>(),
        "each counted at its own place"
    );
    for (team, first) in [("design", 2), ("research", 1)] {
        let mut used: Vec<u64> = admitted
            .iter()
            .filter(|(t, _)| t == team)
            .map(|(_, d)| {
                assert_eq!(d.usage[0].minute.used, d.usage[0].day.used, "{team}");
                d.usage[0].minute.used
            })
            .collect();
        used.sort_unstable();
        let count = used.len() as u64;
        assert_eq!(used, (first..first + count).collect::<Vec<_>>(), "{team}");
    }
    for (team, refused) in decisions.iter().filter(|(_, d)| !d.admitted()) {
        let (kind, window) = refused.denied_by.expect("a refusal names its window");
        assert!(refused.retry_after_secs >= 1, "{team}");
        let full = refused.usage.iter().find(|u| u.kind == kind).unwrap();
        assert_eq!(window, Window::Minute, "{team}");
        assert_eq!(
            full.minute.used, full.minute.limit,
            "{team}: refused with room left"
        );
    }
    let field = |key: &str, field: &str| server.cli(&["HGET", key, field]).unwrap();
    assert_eq!(field("kg:q:{upstream}", "n").trim(), "25");
    assert_eq!(field("kg:q:{upstream}", "dn").trim(), "25");
    let (calls, decided) = store.batch_stats();
    assert_eq!(decided, 61);
    assert!(calls <= 4, "{calls} calls for 61 decisions");
}

/// Identical decisions sent together by a replica that has the day wrong (near midnight,
/// before it learned Redis's time): the script answers them all "not that day" at once,
/// each asks again with the day Redis named, and the day's limit is still admitted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_decisions_on_the_wrong_day_each_ask_again() {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    // Redis says 23:59:58.5; this replica believes it is already 00:00:01.5 tomorrow.
    let clock = Arc::new(SkewedClock {
        shift_ms: shift_to("2026-11-27T23:59:58.5Z"),
        skew_ms: 3_000,
    });
    let store = Arc::new(redis_store(&server, clock, DayCalendar::utc()));
    let team = Arc::new([subject(SubjectKind::Team, "design", 100, 5)]);
    // Redis sleeps with the first decision in flight: the others queue with the same
    // wrong day and go out together.
    let sleeper = server.sleep_in_background(1);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (store, team) = (store.clone(), team.clone());
        tasks.push(tokio::spawn(async move { store.decide(&team[..]).await }));
    }
    let mut admitted = Vec::new();
    for task in tasks {
        let decision = task.await.unwrap().expect("a decision after asking again");
        if let Some(admission) = decision.admission {
            admitted.push(admission.day);
        } else {
            assert_eq!(decision.denied_by, Some((SubjectKind::Team, Window::Day)));
        }
    }
    sleeper.join().unwrap();
    assert_eq!(
        admitted,
        vec![20261127; 5],
        "the day's limit, on Redis's day"
    );
    let field = |f: &str| server.cli(&["HGET", "kg:q:{t:design}", f]).unwrap();
    assert_eq!(field("d").trim(), "20261127");
    assert_eq!(field("dn").trim(), "5");
    let (calls, decisions) = store.batch_stats();
    assert!(calls < decisions, "{calls} calls for {decisions} decisions");
}
