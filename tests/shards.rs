//! `server.shards`: proxy connections handed to shard threads, each with its own event
//! loop. What clients rely on holds there as well: answers with the real key upstream,
//! exact quotas across shards and connections, HTTP/2, and a graceful shutdown that lets
//! requests in flight on every shard finish, after which the shards' threads are gone.
//! One test in this binary, so that the threads it counts are its own.

mod common;

use std::time::Duration;

use common::upstream::Reply;
use common::*;

/// Threads of this process named as keygate names its shards.
fn shard_threads() -> usize {
    threads_named("keygate-shard-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_connections_answer_admit_exactly_the_plan_and_drain_on_shutdown() {
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
    let statuses = generate_from_own_clients(&gateway, CLIENTS as usize, per_client as usize).await;
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

    // The design team's minute is spent: the rest is the marketing team's (10 a minute).
    // HTTP/2 with prior knowledge, several streams on one connection, on a shard.
    let mut h2 = common::h2c::connect(gateway.proxy_addr()).await;
    for _ in 0..3 {
        let request = common::h2c::get(
            http::Method::GET,
            &gateway.url("/v1/models"),
            TOKEN_MARKETING,
        );
        let (status, body) = common::h2c::send(&mut h2, request).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }

    // Shutdown while requests wait for a slow upstream on both shards: they all finish.
    upstream.set_reply(Reply::Delayed(Duration::from_millis(600)));
    let before = upstream.count();
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let request = client()
                .get(gateway.url("/v1/models"))
                .bearer_auth(TOKEN_MARKETING)
                .send();
            tokio::spawn(async move {
                let answer = request.await?;
                Ok::<_, reqwest::Error>((answer.status().as_u16(), answer.text().await?))
            })
        })
        .collect();
    upstream.wait_for(before + 4, Duration::from_secs(10)).await;
    let stopping = tokio::spawn(gateway.shutdown());
    for request in slow {
        let (status, body) = request
            .await
            .unwrap()
            .expect("an in-flight request finished");
        assert_eq!(status, 200);
        assert_eq!(body, common::upstream::OK_JSON);
    }
    stopping.await.unwrap();
    // A shard's thread leaves once its event loop is dropped, just after the listener
    // returns.
    threads_end("keygate-shard-").await;
}
