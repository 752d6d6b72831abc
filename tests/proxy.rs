//! The core promise, end to end: the upstream receives the real key and never an internal
//! token, denied requests never reach it, bodies arrive byte-identical, the request is
//! rewritten as a proxy must, and every error answer is the spec's.

mod common;

use common::raw;
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
    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 200);
    assert!(answer.header("x-request-id").is_some());
    assert_eq!(answer.body, common::upstream::OK_JSON);

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
async fn each_env_gets_its_own_real_key() {
    let (upstream, gateway) = gateway_with_upstream().await;
    assert_eq!(gateway.generate(TOKEN_DESIGN_DEV).await.status(), 200);
    assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);
    let received = upstream.received();
    assert_eq!(
        received[0].headers["authorization"],
        format!("Bearer {REAL_DEV_KEY}")
    );
    assert_eq!(
        received[1].headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn request_body_and_query_arrive_byte_identical() {
    let (upstream, gateway) = gateway_with_upstream().await;
    // Every byte value, several times over, and not valid UTF-8.
    let body: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    let answer = Answer::read(
        gateway
            .client
            .post(gateway.url("/v1/text-to-image?seed=42&style=a%20b"))
            .bearer_auth(TOKEN_DESIGN_GENERATE)
            .header("content-type", "application/octet-stream")
            .body(body.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    let received = &upstream.received()[0];
    assert_eq!(received.body, body);
    assert_eq!(received.body_len, body.len() as u64);
    assert_eq!(
        received.path_and_query,
        "/v1/text-to-image?seed=42&style=a%20b"
    );
    assert_eq!(received.headers["content-type"], "application/octet-stream");
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn proxy_headers_are_rewritten_for_the_upstream() {
    let (upstream, gateway) = gateway_with_upstream().await;
    let authorization = format!("Authorization: Bearer {TOKEN_DESIGN_GENERATE}");
    let head = raw::post_head(
        &[
            authorization.as_bytes(),
            // Connection (in post_head) says close; this one names another header too.
            b"Connection: x-secret-hop",
            b"X-Secret-Hop: must-not-pass",
            b"Keep-Alive: timeout=5",
            b"Proxy-Authorization: Basic cHJveHk6cHJveHk=",
            b"Proxy-Connection: keep-alive",
            b"TE: trailers",
            b"X-Forwarded-For: 6.6.6.6",
            b"Forwarded: for=6.6.6.6",
            b"X-Keygate-Team: marketing",
            b"X-Request-Id: client-chosen-id.42",
            b"X-Custom: kept as is",
        ],
        Some(PROMPT_BODY.len()),
    );
    let response = raw::exchange_while_sending(
        gateway.proxy_addr(),
        head,
        vec![PROMPT_BODY.as_bytes().to_vec()],
    )
    .await
    .response()
    .clone();
    assert_eq!(response.status, 200, "{}", response.body_text());
    assert_eq!(response.header("x-request-id"), Some("client-chosen-id.42"));
    assert_raw_no_secrets(&response);

    let received = &upstream.received()[0];
    let h = &received.headers;
    assert_eq!(h["authorization"], format!("Bearer {REAL_KEY}"));
    assert_eq!(h.get_all("authorization").iter().count(), 1);
    assert_eq!(
        h["host"],
        upstream.addr.to_string(),
        "Host is the upstream's"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "untrusted XFF replaced");
    assert_eq!(h["x-request-id"], "client-chosen-id.42");
    assert_eq!(h["x-custom"], "kept as is");
    assert_eq!(received.body, PROMPT_BODY.as_bytes());
    for gone in [
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "forwarded",
        "x-keygate-team",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    // hyper's client may add its own `connection` for the pooled hop, never the client's.
    for value in h.get_all("connection") {
        assert!(!value.to_str().unwrap().contains("x-secret-hop"));
    }
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_minted_otherwise() {
    let (upstream, gateway) = gateway_with_upstream().await;
    let sane = generate_request(&gateway.client, &gateway.proxy, Some(TOKEN_DESIGN_GENERATE))
        .header("x-request-id", "abc-123_x.y:z")
        .send()
        .await
        .unwrap();
    assert_eq!(sane.headers()["x-request-id"], "abc-123_x.y:z");

    let mut minted = Vec::new();
    for bad in ["has spaces in it", &"x".repeat(129), "semi;colon"] {
        let answer = Answer::read(
            generate_request(&gateway.client, &gateway.proxy, Some(TOKEN_DESIGN_GENERATE))
                .header("x-request-id", bad)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let id = answer.header("x-request-id").unwrap().to_string();
        assert_ne!(id, bad);
        assert!(
            !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
            "{id:?}"
        );
        minted.push(id);
    }
    let received = upstream.received();
    assert_eq!(received[0].headers["x-request-id"], "abc-123_x.y:z");
    // The upstream sees the id the client was given.
    for (request, id) in received[1..].iter().zip(&minted) {
        assert_eq!(request.headers["x-request-id"], id.as_str());
    }
    minted.sort();
    minted.dedup();
    assert_eq!(minted.len(), 3, "minted ids are unique");
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn every_kind_of_bad_credential_answers_401_with_the_spec_body() {
    let (upstream, gateway) = gateway_with_upstream().await;
    let post = || generate_request(&gateway.client, &gateway.proxy, None);
    let ten_kb = format!("Bearer {}", "a".repeat(10 * 1024));
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("missing", post()),
        ("empty", post().header("authorization", "")),
        (
            "basic scheme",
            post().header("authorization", "Basic ZGVzaWduOnNlY3JldA=="),
        ),
        (
            "token without scheme",
            post().header("authorization", TOKEN_DESIGN_GENERATE),
        ),
        (
            "bearer without token",
            post().header("authorization", "Bearer "),
        ),
        ("10 KB", post().header("authorization", ten_kb.as_str())),
        (
            "unknown token",
            post().bearer_auth("kg_prod_not_a_real_token_at_all"),
        ),
        ("expired token", post().bearer_auth(TOKEN_DESIGN_EXPIRED)),
    ];
    let mut ids = Vec::new();
    for (case, request) in cases {
        let answer = Answer::read(request.send().await.unwrap()).await;
        assert_eq!(answer.status, 401, "{case}");
        assert_eq!(answer.body, UNAUTHORIZED_BODY, "{case}");
        assert_eq!(
            answer.header("content-type"),
            Some("application/json"),
            "{case}"
        );
        ids.push(answer.header("x-request-id").expect(case).to_string());
    }

    // What an HTTP client refuses to send, over raw TCP.
    let token_line = format!("Authorization: Bearer {TOKEN_DESIGN_GENERATE}");
    let raw_cases: Vec<(&str, Vec<&[u8]>)> = vec![
        (
            "non-ASCII",
            vec![b"Authorization: Bearer kg_prod_\xc3\xa9t\xc3\xa9_token"],
        ),
        (
            "duplicated (valid token twice)",
            vec![token_line.as_bytes(), token_line.as_bytes()],
        ),
        (
            "duplicated (valid and invalid)",
            vec![token_line.as_bytes(), b"Authorization: Bearer kg_other"],
        ),
    ];
    for (case, lines) in raw_cases {
        let head = raw::post_head(&lines, Some(PROMPT_BODY.len()));
        let response = raw::exchange_while_sending(
            gateway.proxy_addr(),
            head,
            vec![PROMPT_BODY.as_bytes().to_vec()],
        )
        .await
        .response()
        .clone();
        assert_eq!(response.status, 401, "{case}: {}", response.body_text());
        assert_eq!(response.body_text(), UNAUTHORIZED_BODY, "{case}");
        assert_raw_no_secrets(&response);
        ids.push(response.header("x-request-id").expect(case).to_string());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11, "every answer has its own request id");
    assert_eq!(
        upstream.count(),
        0,
        "no denied request reached the upstream"
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn scope_and_unmatched_routes_answer_403_and_never_reach_the_upstream() {
    let (upstream, gateway) = gateway_with_upstream().await;
    let wrong_scope = Answer::read(gateway.generate(TOKEN_DESIGN_READ).await).await;
    assert_eq!(wrong_scope.status, 403);
    assert_eq!(wrong_scope.body, FORBIDDEN_BODY);
    assert!(wrong_scope.header("x-request-id").is_some());

    let unmatched = [
        gateway.client.delete(gateway.url("/v1/text-to-image")),
        gateway.client.get(gateway.url("/v2/models")),
        gateway.client.post(gateway.url("/v1/text-to-image-hd")),
        gateway.client.get(gateway.url("/")),
    ];
    for request in unmatched {
        let answer = Answer::read(
            request
                .bearer_auth(TOKEN_DESIGN_GENERATE)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, 403);
        assert_eq!(answer.body, FORBIDDEN_BODY);
        assert!(answer.header("x-request-id").is_some());
    }
    assert_eq!(upstream.count(), 0);

    // The read scope does open the read route.
    let models = gateway
        .client
        .get(gateway.url("/v1/models"))
        .bearer_auth(TOKEN_DESIGN_READ)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(upstream.count(), 1);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn upstream_client_errors_pass_through_with_quota_headers() {
    let (upstream, gateway) = gateway_with_upstream().await;
    upstream.set_reply(Reply::Json(
        400,
        r#"{"error":{"code":"invalid_prompt","message":"Prompt too long"}}"#,
    ));
    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.body,
        r#"{"error":{"code":"invalid_prompt","message":"Prompt too long"}}"#
    );
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.header("x-ratelimit-limit").is_some());
    assert!(answer.header("x-request-id").is_some());
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_upstream_answer_are_dropped() {
    let (upstream, gateway) = gateway_with_upstream().await;
    upstream.set_reply(Reply::WithHeaders(vec![
        ("connection", "x-upstream-hop"),
        ("x-upstream-hop", "must-not-pass"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic realm=\"upstream\""),
        ("x-ratelimit-limit", "999999"),
        ("x-request-id", "upstream-own-id"),
        ("x-upstream-custom", "kept"),
    ]));
    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, common::upstream::OK_JSON);
    assert_eq!(answer.header("x-upstream-custom"), Some("kept"));
    for gone in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert!(answer.header(gone).is_none(), "{gone} reached the client");
    }
    for value in answer.headers.get_all("connection") {
        assert!(!value.to_str().unwrap().contains("x-upstream-hop"));
    }
    // keygate's own quota state and request id, not the upstream's.
    assert_eq!(answer.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(
        answer.headers.get_all("x-ratelimit-limit").iter().count(),
        1
    );
    let id = answer.header("x-request-id").unwrap();
    assert_eq!(upstream.received()[0].headers["x-request-id"], id);
    assert_ne!(id, "upstream-own-id");
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_for_requests_that_will_be_forwarded() {
    use tokio::io::AsyncWriteExt;
    let (upstream, gateway) = gateway_with_upstream().await;
    // curl sends bodies over 1 KiB like this: the head, then the body after 100 Continue.
    let body = format!(r#"{{"prompt":"{}","model":"imagen-v2"}}"#, "a".repeat(2048));
    let authorization = format!("Authorization: Bearer {TOKEN_DESIGN_GENERATE}");
    let head = raw::post_head(
        &[authorization.as_bytes(), b"Expect: 100-continue"],
        Some(body.len()),
    );
    let mut stream = raw::connect(gateway.proxy_addr()).await;
    stream.write_all(&head).await.unwrap();
    let interim = raw::read_response(&mut stream).await;
    assert_eq!(interim.status(), Some(100));
    stream.write_all(body.as_bytes()).await.unwrap();
    let answer = raw::read_response(&mut stream).await;
    assert_eq!(
        answer.response().status,
        200,
        "{}",
        answer.response().body_text()
    );
    let received = &upstream.received()[0];
    assert_eq!(received.body, body.as_bytes());
    assert!(!received.headers.contains_key("expect"));

    // A request that will be refused is answered without asking for its body.
    let head = raw::post_head(
        &[
            b"Authorization: Bearer kg_prod_unknown_token_000",
            b"Expect: 100-continue",
        ],
        Some(body.len()),
    );
    let mut stream = raw::connect(gateway.proxy_addr()).await;
    stream.write_all(&head).await.unwrap();
    let refused = raw::read_response(&mut stream).await;
    assert_eq!(refused.response().status, 401);
    assert_eq!(refused.response().body_text(), UNAUTHORIZED_BODY);
    assert_eq!(upstream.count(), 1);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_token_stops_working_at_its_expiry_instant() {
    const TOKEN_EXPIRING: &str = "kg_prod_design_expiring_token_00000000000000007";
    let extra = format!(
        "[[keys]]\nid = \"design-expiring\"\nteam = \"design\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"generate\"]\nenv = \"prod\"\nexpires = \"2026-11-27T10:00:00Z\"\n",
        hash(TOKEN_EXPIRING)
    );
    let upstream = MockUpstream::start().await;
    let clock = std::sync::Arc::new(keygate::clock::ManualClock::new(
        "2026-11-27T09:59:59.999Z".parse().unwrap(),
    ));
    let config = config_from(&standard_config_text(&upstream.url(), &extra));
    let gateway = TestGateway::start_with_clock(config, clock.clone()).await;
    assert_eq!(gateway.generate(TOKEN_EXPIRING).await.status(), 200);
    clock.set("2026-11-27T10:00:00Z".parse().unwrap());
    let expired = Answer::read(gateway.generate(TOKEN_EXPIRING).await).await;
    assert_eq!(expired.status, 401);
    assert_eq!(expired.body, UNAUTHORIZED_BODY);
    assert_eq!(upstream.count(), 1);
    gateway.shutdown().await;
    logs::assert_clean(&[TOKEN_EXPIRING]);
}
