//! Local slices of quota (`store.local_slices`) against a real redis-server: replicas that
//! take room ahead of their requests still never admit more than a limit, reach exactly
//! the limit under excess demand once the slices' seconds end, give unused slots back to
//! Redis, and never use a slice outside the second it was charged to.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::clock::OffsetClock;
use keygate::config::StoreUrl;
use keygate::quota::calendar::DayCalendar;
use keygate::quota::redis::RedisStore;
use keygate::quota::{Limits, QuotaStore, Subject, SubjectKind};

use common::redis::{RedisCluster, RedisServer};

fn team(id: &str, rpm: u64, rpd: u64) -> Arc<[Subject]> {
    Arc::new([Subject {
        kind: SubjectKind::Team,
        id: id.into(),
        limits: Limits { rpm, rpd },
    }])
}

fn sliced_store(server: &RedisServer, clock: Arc<OffsetClock>) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::open(&StoreUrl::Redis(server.url()), clock, DayCalendar::utc())
            .expect("store opens")
            .with_local_slices(true),
    )
}

/// A subject set under the fleet-wide upstream ceiling: the team first, the ceiling last,
/// as the gateway builds them.
fn team_under_ceiling(id: &str, ceiling_rpm: u64) -> Arc<[Subject]> {
    let unlimited = Limits {
        rpm: 1_000_000,
        rpd: 1_000_000,
    };
    let ceiling = Limits {
        rpm: ceiling_rpm,
        rpd: 1_000_000,
    };
    Arc::new([
        Subject {
            kind: SubjectKind::Team,
            id: id.into(),
            limits: unlimited,
        },
        Subject {
            kind: SubjectKind::Upstream,
            id: "upstream".into(),
            limits: ceiling,
        },
    ])
}

fn field(server: &RedisServer, key: &str, field: &str) -> u64 {
    server
        .cli(&["HGET", key, field])
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Polls `done` every 10 ms until it holds, for at most `limit`: for effects that land
/// when a slice's second ends (a refund), which no event of the store's announces.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Decides for `subjects` on `store` until a decision is answered from the store's slice
/// (fewer decisions sent to Redis than made); returns how many were admitted.
async fn until_sliced(store: &RedisStore, subjects: &[Subject]) -> u64 {
    let start = Instant::now();
    let mut admitted = 0;
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no slice after {admitted} decisions"
        );
        let (_, sent_before) = store.batch_stats();
        assert!(store.decide(subjects).await.unwrap().admitted());
        admitted += 1;
        if store.batch_stats().1 == sent_before {
            return admitted;
        }
    }
}

/// Decides for each set of `subjects` from 16 tasks on each store (shared between the
/// sets) until `admitted` reaches `target` (or 20 s pass); returns how many decisions were
/// made.
async fn hammer(
    stores: &[Arc<RedisStore>],
    sets: &[Arc<[Subject]>],
    admitted: &Arc<AtomicU64>,
    target: u64,
) -> u64 {
    let made = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(admitted.load(Ordering::Relaxed) >= target));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tasks = Vec::new();
    for store in stores {
        for task in 0..16 {
            let (store, subjects) = (store.clone(), sets[task % sets.len()].clone());
            let (admitted, made, stop) = (admitted.clone(), made.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let decision = store.decide(&subjects).await.unwrap();
                    made.fetch_add(1, Ordering::Relaxed);
                    if decision.admitted() && admitted.fetch_add(1, Ordering::Relaxed) + 1 >= target
                    {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    made.load(Ordering::Relaxed)
}

/// Three replicas with slices share one team of 60 000 a minute. The first takes a slice and
/// then has no more requests; the other two decide from 16 tasks each, first up to 40 000
/// (room to spare: most decisions need no call to Redis), then past the limit. Never more
/// than the limit is admitted, and exactly the limit is in the end: the first replica's
/// unused slots come back when their second ends (without that refund they would stay
/// charged for a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_admit_exactly_the_limit_across_replicas_and_never_more() {
    const LIMIT: u64 = 60_000;
    let server = RedisServer::start();
    let stores: Vec<_> = (0..3)
        .map(|_| sliced_store(&server, Arc::new(OffsetClock::new())))
        .collect();
    let subjects = team("busy", LIMIT, 1_000_000);
    let first = until_sliced(&stores[0], &subjects).await;
    assert!(field(&server, "kg:q:{t:busy}", "n") > first, "a slice held");
    let admitted = Arc::new(AtomicU64::new(first));

    let made = hammer(
        &stores[1..],
        std::slice::from_ref(&subjects),
        &admitted,
        40_000,
    )
    .await;
    let sent: u64 = stores[1..].iter().map(|s| s.batch_stats().1).sum();
    assert!(
        sent * 2 < made,
        "{sent} of {made} decisions went to Redis: slices answered too few"
    );

    hammer(&stores[1..], &[subjects], &admitted, LIMIT).await;
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        LIMIT,
        "exactly the limit admitted (within 20 s of excess demand)"
    );
    assert_eq!(field(&server, "kg:q:{t:busy}", "n"), LIMIT);
    assert_eq!(field(&server, "kg:q:{t:busy}", "dn"), LIMIT);
}

/// A slice is charged in Redis before it is used, and what is left of it goes back to
/// Redis's bucket and day when its second ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_slots_go_back_when_their_second_ends() {
    let server = RedisServer::start();
    let store = sliced_store(&server, Arc::new(OffsetClock::new()));
    let subjects = team("steady", 1_000_000, 1_000_000);
    let admitted = until_sliced(&store, &subjects).await;
    let held = field(&server, "kg:q:{t:steady}", "n");
    assert!(
        held > admitted,
        "{admitted} admitted and only {held} charged: a slice is charged before use"
    );
    wait_until(Duration::from_secs(3), "the unused slots refunded", || {
        field(&server, "kg:q:{t:steady}", "n") == admitted
    });
    assert_eq!(field(&server, "kg:q:{t:steady}", "dn"), admitted);
    // The report of a decision after it counts what was admitted, not what was held.
    let decision = store.decide(&subjects).await.unwrap();
    assert_eq!(decision.usage[0].minute.used, admitted + 1);
}

/// A slice belongs to the second of Redis's time it was charged to: a clock moved on (a
/// test's offset) cannot spend it in a later window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_is_never_spent_on_another_clock() {
    let server = RedisServer::start();
    let clock = Arc::new(OffsetClock::new());
    let store = sliced_store(&server, clock.clone());
    let subjects = team("moved", 1_000_000, 1_000_000);
    until_sliced(&store, &subjects).await;
    clock.advance(Duration::from_secs(61));
    let (_, sent_before) = store.batch_stats();
    let decision = store.decide(&subjects).await.unwrap();
    assert_eq!(
        store.batch_stats().1,
        sent_before + 1,
        "decided by Redis, not by the old slice"
    );
    assert_eq!(
        decision.usage[0].minute.used, 1,
        "a fresh minute, a minute later"
    );
}

/// On Cluster the team's keys and the upstream ceiling live in two slots, so a decision is
/// two groups and each keeps its own slice (the ceiling's shared by the teams under it).
/// Two replicas, two teams, one ceiling of 30 000 a minute: with room, most decisions make
/// no call; past the ceiling exactly 30 000 are admitted, and once the slices' seconds are
/// over Redis's ceiling counts 30 000 and the teams' counts add up to it (every team charge
/// the ceiling refused was taken back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_on_a_cluster_keep_team_and_ceiling_exact() {
    const CEILING: u64 = 30_000;
    let cluster = RedisCluster::start();
    let nodes: Vec<String> = cluster
        .url()
        .trim_start_matches("redis+cluster://")
        .split(',')
        .map(|node| format!("redis://{node}"))
        .collect();
    let stores: Vec<_> = (0..2)
        .map(|_| {
            let store = RedisStore::open(
                &StoreUrl::Cluster(nodes.clone()),
                Arc::new(OffsetClock::new()),
                DayCalendar::utc(),
            )
            .expect("store opens");
            Arc::new(store.with_local_slices(true))
        })
        .collect();
    let sets = [
        team_under_ceiling("north", CEILING),
        team_under_ceiling("south", CEILING),
    ];
    let admitted = Arc::new(AtomicU64::new(0));
    let made = hammer(&stores, &sets, &admitted, 20_000).await;
    // Without slices every decision sends two (one a group); with them, few do.
    let sent: u64 = stores.iter().map(|s| s.batch_stats().1).sum();
    assert!(
        sent * 2 < made,
        "{sent} group decisions sent to Redis for {made} decisions: slices answered too few"
    );

    hammer(&stores, &sets, &admitted, CEILING).await;
    assert_eq!(admitted.load(Ordering::Relaxed), CEILING);
    let counted = |key: &str, name: &str| -> u64 {
        cluster
            .node_for(key)
            .cli(&["HGET", key, name])
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(3), "the slices' seconds over", || {
        counted("kg:q:{upstream}", "n") == CEILING
            && counted("kg:q:{t:north}", "n") + counted("kg:q:{t:south}", "n") == CEILING
    });
    assert_eq!(counted("kg:q:{upstream}", "dn"), CEILING);
    assert_eq!(
        counted("kg:q:{t:north}", "dn") + counted("kg:q:{t:south}", "dn"),
        CEILING
    );
}

/// The script gives a slice at most 1/64 of the room its windows have left after the
/// decisions ahead of it, whatever a replica asks for: run on Redis directly, one decision
/// asking for 100 optional admissions more.
#[test]
fn the_script_caps_a_slice_at_a_share_of_the_room_left() {
    let server = RedisServer::start();
    let day = DayCalendar::utc().day_at(jiff::Timestamp::now());
    let decide = |key: &str, rpm: u64| -> String {
        let (id, start, end) = (
            day.id.to_string(),
            day.start_ms.to_string(),
            day.end_ms.to_string(),
        );
        let rpm = rpm.to_string();
        let args = [
            "EVAL",
            include_str!("../src/quota/redis_quota.lua"),
            "1",
            key,
            "decide",
            "1",
            "0",
            &id,
            &start,
            &end,
            "101",
            "100",
            "1",
            "1",
            &rpm,
            "1000000",
        ];
        server
            .cli(&args)
            .expect("the script runs")
            .trim()
            .to_string()
    };
    // 1 000 a minute: the decision, then 15 of its slice (999 / 64), the rest refused.
    let roomy = decide("kg:q:{t:roomy}", 1000);
    assert!(roomy.starts_with("*16,1,"), "{roomy}");
    assert!(roomy.contains(";*85,0,"), "{roomy}");
    assert_eq!(field(&server, "kg:q:{t:roomy}", "n"), 16);
    // 20 a minute: the decision alone, no slice.
    let tight = decide("kg:q:{t:tight}", 20);
    assert!(tight.starts_with("1,"), "{tight}");
    assert!(tight.contains(";*100,0,"), "{tight}");
    assert_eq!(field(&server, "kg:q:{t:tight}", "n"), 1);
}
