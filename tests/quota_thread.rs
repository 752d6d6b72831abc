//! The Redis quota store's own thread (`keygate-quota`): a gateway on Redis runs its
//! calls to Redis there, and the thread ends once the gateway has shut down, so replicas
//! started and stopped in one process (tests, embedders) leave no threads behind. One
//! test in this binary, so that the threads it counts are its own.

mod common;

use common::redis::RedisServer;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_redis_has_one_quota_thread_until_it_shuts_down() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::start().await;
    assert_eq!(threads_named("keygate-quota"), 0);
    let store = format!(
        "[store]\nurl = \"{}\"\non_error = \"closed\"\ntimeout = \"5s\"",
        redis.url()
    );
    let gateway =
        TestGateway::start(config_from(&standard_config_text(&upstream.url(), &store))).await;
    assert_eq!(
        threads_named("keygate-quota"),
        1,
        "one thread for the store"
    );
    assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);
    assert_eq!(
        redis
            .cli(&["HGET", "kg:q:{t:design}", "dn"])
            .map(|n| n.trim().to_string()),
        Some("1".to_string()),
        "the decision was made in Redis"
    );

    gateway.shutdown().await;
    // The thread leaves once the store is dropped, after the last task holding the
    // gateway ends.
    threads_end("keygate-quota").await;
}
