//! Upstream faults as a client sees them: a timeout is a 504, a refused or dropped
//! connection a 502, each with the spec's body shape, none counted against the quota, and
//! no cause (nor the key) ever in the answer.

mod common;

use std::time::Duration;

use common::*;

async fn gateway_with_timeout(upstream_url: &str, timeout: Duration) -> TestGateway {
    let mut config = config_from(&standard_config_text(upstream_url, ""));
    config.upstream.timeout = timeout;
    TestGateway::start(config).await
}

async fn assert_fault(gateway: &TestGateway, status: u16, body: &str) {
    let answer = Answer::read(gateway.generate(TOKEN_MARKETING).await).await;
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body, body);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.header("x-request-id").is_some());
    // A refused admission must not be reported as spent either.
    gateway.wait_team_used("marketing", 0).await;
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504_and_not_counted() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Hang);
    let gateway = gateway_with_timeout(&upstream.url(), Duration::from_millis(300)).await;
    for _ in 0..MARKETING_RPM + 1 {
        assert_fault(&gateway, 504, GATEWAY_TIMEOUT_BODY).await;
    }
    assert_eq!(upstream.count() as u64, MARKETING_RPM + 1);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn an_upstream_slower_than_the_timeout_is_a_504() {
    let upstream = MockUpstream::start().await;
    // It would answer 200, much later: the 504 shows the gateway did not wait for it.
    upstream.set_reply(Reply::Delayed(Duration::from_secs(30)));
    let gateway = gateway_with_timeout(&upstream.url(), Duration::from_millis(300)).await;
    assert_fault(&gateway, 504, GATEWAY_TIMEOUT_BODY).await;
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_refused_connection_is_a_502_and_not_counted() {
    let gateway = gateway_with_timeout(&closed_port_url(), Duration::from_secs(5)).await;
    for _ in 0..MARKETING_RPM + 1 {
        assert_fault(&gateway, 502, BAD_GATEWAY_BODY).await;
    }
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn an_upstream_dropping_the_connection_is_a_502_and_not_counted() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Drop);
    let gateway = gateway_with_timeout(&upstream.url(), Duration::from_secs(5)).await;
    for _ in 0..MARKETING_RPM + 1 {
        assert_fault(&gateway, 502, BAD_GATEWAY_BODY).await;
    }
    // The gateway recovers once the upstream does.
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    let answer = Answer::read(gateway.generate(TOKEN_MARKETING).await).await;
    assert_eq!(answer.status, 200);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}
