//! One quota decision (team + upstream ceiling, all-or-nothing): the memory store against
//! the Redis store on a redis-server this bench starts on a free loopback port. Also prints
//! how many Redis commands one decision costs, from `INFO commandstats`.

use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;

use keygate::clock::SystemClock;
use keygate::config::StoreUrl;
use keygate::quota::calendar::DayCalendar;
use keygate::quota::memory::MemoryStore;
use keygate::quota::redis::RedisStore;
use keygate::quota::{Limits, QuotaStore, Subject, SubjectKind};

/// Decisions in flight at once on the one multiplexed connection, as under gateway load.
const CONCURRENT: usize = 64;

struct Server {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}): install redis-server"));
        let server = Self {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Calls of every command since the last `CONFIG RESETSTAT` (commands a script runs
    /// count too), and of EVALSHA alone (what clients sent).
    fn command_calls(&self) -> (u64, u64, f64) {
        let stats = self.cli(&["INFO", "commandstats"]);
        let mut total = 0;
        let mut evalsha = 0;
        let mut script_usec = 0.0;
        for line in stats.lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            let calls: u64 = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            // Our own INFO/CONFIG calls are not the store's.
            if name == "cmdstat_info" || name.starts_with("cmdstat_config") {
                continue;
            }
            total += calls;
            if name == "cmdstat_evalsha" {
                evalsha = calls;
                script_usec = rest
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("usec_per_call="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0.0);
            }
        }
        (total, evalsha, script_usec)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn subjects() -> Vec<Subject> {
    // Limits no run reaches: every decision admits and charges both subjects.
    let huge = Limits {
        rpm: 1_000_000_000,
        rpd: 1_000_000_000,
    };
    vec![
        Subject {
            kind: SubjectKind::Team,
            id: "design".into(),
            limits: huge,
        },
        Subject {
            kind: SubjectKind::Upstream,
            id: "upstream".into(),
            limits: huge,
        },
    ]
}

fn quota_decision(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Opening a Redis store spawns redis-rs's connection task: inside the runtime.
    let _entered = runtime.enter();
    let subjects = subjects();
    let memory = MemoryStore::new(Arc::new(SystemClock), DayCalendar::utc());
    let server = Server::start();
    let redis = Arc::new(
        RedisStore::open(
            &StoreUrl::Redis(format!("redis://127.0.0.1:{}", server.port)),
            Arc::new(SystemClock),
            DayCalendar::utc(),
        )
        .expect("store opens"),
    );
    // Load the script and connect before measuring.
    runtime
        .block_on(redis.decide(&subjects))
        .expect("redis decides");

    // Commands per decision, measured over a batch.
    server.cli(&["CONFIG", "RESETSTAT"]);
    let batch = 1000u64;
    runtime.block_on(async {
        for _ in 0..batch {
            redis.decide(&subjects).await.expect("redis decides");
        }
    });
    let (total, evalsha, script_usec) = server.command_calls();
    println!(
        "per decision over {batch}: {:.2} command(s) from keygate (EVALSHA), {:.2} commands \
         executed by Redis including the script's own calls, {script_usec:.1} µs in Redis",
        evalsha as f64 / batch as f64,
        total as f64 / batch as f64
    );

    let mut group = c.benchmark_group("quota_decision");
    group.throughput(Throughput::Elements(1));
    group.bench_function("memory", |b| {
        b.iter(|| black_box(memory.decide_now(black_box(&subjects))))
    });
    // Team alone, the common configuration (no upstream ceiling).
    let team_only = &subjects[..1];
    group.bench_function("memory_team_only", |b| {
        b.iter(|| black_box(memory.decide_now(black_box(team_only))))
    });
    // A team at its limit: the refusal path (Retry-After computed from the buckets).
    let full = [Subject {
        kind: SubjectKind::Team,
        id: "full".into(),
        limits: Limits { rpm: 10, rpd: 1000 },
    }];
    for _ in 0..10 {
        memory.decide_now(&full);
    }
    group.bench_function("memory_refused", |b| {
        b.iter(|| black_box(memory.decide_now(black_box(&full))))
    });
    group.bench_function("redis", |b| {
        b.iter(|| {
            black_box(
                runtime
                    .block_on(redis.decide(black_box(&subjects)))
                    .unwrap(),
            )
        })
    });
    group.throughput(Throughput::Elements(CONCURRENT as u64));
    group.bench_function("redis_64_in_flight", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let decisions = (0..CONCURRENT).map(|_| {
                    let redis = redis.clone();
                    let subjects = subjects.clone();
                    tokio::spawn(async move { redis.decide(&subjects).await.unwrap() })
                });
                black_box(join_all(decisions).await)
            })
        })
    });
    group.finish();
    let (calls, decisions) = redis.batch_stats();
    println!(
        "coalescing over the whole bench: {decisions} decisions in {calls} script calls \
         ({:.1} per call)",
        decisions as f64 / calls.max(1) as f64
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = quota_decision
}
criterion_main!(benches);
