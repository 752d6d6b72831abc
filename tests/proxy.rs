//! The core promise, end to end: the upstream receives the real key and never an internal
//! token, denied requests never reach it, bodies arrive byte-identical, and every error
//! answer is the spec's.

mod common;

use common::*;

async fn gateway_with_upstream() -> (MockUpstream, TestGateway) {
    let upstream = MockUpstream::start().await;
    let config = config_from(&standard_config_text(&upstream.url(), ""));
    let gateway = TestGateway::start(config).await;
    (upstream, gateway)
}

#[tokio::test]
async fn upstream_receives_the_real_key_and_the_body_unchanged() {
    let (upstream, gateway) = gateway_with_upstream().await;
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.text().await.unwrap(), common::upstream::OK_JSON);

    let received = upstream.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path_and_query, "/v1/text-to-image");
    assert_eq!(
        request.headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );
    assert_eq!(request.headers["host"], upstream.addr.to_string());
    assert_eq!(request.body, PROMPT_BODY.as_bytes());
    let all_headers = format!("{:?}", request.headers);
    assert!(!all_headers.contains(TOKEN_DESIGN_GENERATE));
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn denied_requests_never_reach_the_upstream() {
    let (upstream, gateway) = gateway_with_upstream().await;
    let no_token = gateway
        .client
        .post(gateway.url("/v1/text-to-image"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(no_token.text().await.unwrap(), UNAUTHORIZED_BODY);

    let wrong_scope = gateway.generate(TOKEN_DESIGN_READ).await;
    assert_eq!(wrong_scope.status(), 403);
    assert_eq!(wrong_scope.text().await.unwrap(), FORBIDDEN_BODY);

    let unmatched = gateway
        .client
        .delete(gateway.url("/v1/text-to-image"))
        .bearer_auth(TOKEN_DESIGN_GENERATE)
        .send()
        .await
        .unwrap();
    assert_eq!(unmatched.status(), 403);
    assert_eq!(unmatched.text().await.unwrap(), FORBIDDEN_BODY);

    let expired = gateway.generate(TOKEN_DESIGN_EXPIRED).await;
    assert_eq!(expired.status(), 401);

    assert_eq!(upstream.count(), 0);
    gateway.shutdown().await;
}
