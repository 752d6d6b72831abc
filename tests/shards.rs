//! `server.shards`: proxy connections handed to shard threads, each with its own event
//! loop. What clients rely on holds there as well: answers with the real key upstream,
//! exact quotas across shards and connections, and a graceful shutdown after which the
//! shards' threads are gone. One test in this binary, so that the threads it counts are
//! its own.

mod common;

use std::time::Duration;

use common::*;

/// Threads of this process named as keygate names its shards.
fn shard_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task lists this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("keygate-shard-"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_connections_answer_and_admit_exactly_the_plan_then_stop_with_the_gateway() {
    let upstream = MockUpstream::start().await;
    let text = standard_config_text(&upstream.url(), "");
    assert!(text.contains("[server]\n"));
    let text = text.replacen("[server]\n", "[server]\nshards = 2\n", 1);
    let gateway = TestGateway::start(config_from(&text)).await;
    assert_eq!(shard_threads(), 2, "two shards, two threads");

    // Clients of their own, so connections of their own, handed out round robin: both
    // shards decide on the same team at once.
    const CLIENTS: u64 = 8;
    let per_client = DESIGN_RPM * 2 / CLIENTS;
    let url = gateway.url("/v1/text-to-image");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url) = (client(), url.clone());
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..per_client {
                let answer = client
                    .post(&url)
                    .bearer_auth(TOKEN_DESIGN_GENERATE)
                    .header("content-type", "application/json")
                    .body(PROMPT_BODY)
                    .send()
                    .await
                    .expect("the gateway answers");
                statuses.push(answer.status().as_u16());
                let body = answer.bytes().await.expect("the whole body");
                assert!(!body.is_empty());
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.unwrap());
    }
    assert_eq!(statuses.len() as u64, CLIENTS * per_client);
    assert_eq!(
        count_status(&statuses, 200) as u64,
        DESIGN_RPM,
        "exactly the plan's minute is admitted across shards"
    );
    assert_eq!(count_status(&statuses, 429) as u64, DESIGN_RPM);
    let received = upstream.received();
    assert_eq!(received.len() as u64, DESIGN_RPM);
    assert!(received
        .iter()
        .all(|r| r.headers["authorization"] == format!("Bearer {REAL_KEY}").as_str()));

    gateway.shutdown().await;
    // A shard's thread leaves once its event loop is dropped, just after the listener
    // returns; there is no event for a thread's end to await here, so it is polled.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while shard_threads() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} shard threads still run after shutdown",
            shard_threads()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
