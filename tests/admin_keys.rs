//! Key lifecycle through the admin API on a running gateway: create, use, list, revoke,
//! rotate with grace; scopes on the admin API; nothing secret in its answers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::admin::*;
use common::*;
use keygate::clock::ManualClock;
use serde_json::json;

async fn start(clock: Option<Arc<ManualClock>>) -> (MockUpstream, TestGateway) {
    let upstream = MockUpstream::start().await;
    let config = config_from(&standard_config_text(&upstream.url(), &admin_extra()));
    let gateway = match clock {
        Some(clock) => TestGateway::start_with_clock(config, clock).await,
        None => TestGateway::start(config).await,
    };
    (upstream, gateway)
}

#[tokio::test]
async fn create_use_list_and_revoke() {
    let (upstream, gateway) = start(None).await;
    let (status, made, text) = create(
        &gateway,
        json!({"id": "design-ci", "team": "design", "scopes": ["generate"], "env": "prod", "rpm": 5}),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let token = made["token"]
        .as_str()
        .expect("token in the create answer")
        .to_string();
    assert!(token.starts_with("kg_prod_"));
    assert!(
        !text.contains(&hash(&token)),
        "the hash must not be returned"
    );

    let used = gateway.generate(&token).await;
    assert_eq!(used.status(), 200);
    assert_eq!(
        upstream.received()[0].headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );

    let listed = admin(
        &gateway,
        reqwest::Method::GET,
        "/admin/keys",
        TOKEN_ADMIN,
        None,
    )
    .await;
    assert_eq!(listed.status(), 200);
    let listed_text = listed.text().await.unwrap();
    assert!(!listed_text.contains(&token) && !listed_text.contains(&hash(&token)));
    assert!(!listed_text.contains(&hash(TOKEN_DESIGN_GENERATE)));
    let listed: serde_json::Value = serde_json::from_str(&listed_text).unwrap();
    let entry = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "design-ci")
        .expect("new key listed");
    assert_eq!(entry["origin"], "admin");
    assert_eq!(entry["team"], "design");
    assert_eq!(entry["scopes"], json!(["generate"]));
    assert_eq!(entry["rpm"], 5);
    assert!(entry["created"].is_string() && entry["last_used"].is_string());
    let config_key = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "design-generate")
        .unwrap();
    assert_eq!(config_key["origin"], "config");

    let deleted = admin(
        &gateway,
        reqwest::Method::DELETE,
        "/admin/keys/design-ci",
        TOKEN_ADMIN,
        None,
    )
    .await;
    assert_eq!(deleted.status(), 200);
    let refused = gateway.generate(&token).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.text().await.unwrap(), UNAUTHORIZED_BODY);
    assert_eq!(upstream.count(), 1);

    let again = admin(
        &gateway,
        reqwest::Method::DELETE,
        "/admin/keys/design-ci",
        TOKEN_ADMIN,
        None,
    )
    .await;
    assert_eq!(again.status(), 404);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
    logs::assert_clean(&[TOKEN_ADMIN, &token]);
}

#[tokio::test]
async fn invalid_creates_name_every_problem_and_config_keys_are_read_only() {
    let (_upstream, gateway) = start(None).await;
    let (status, body, _) = create(
        &gateway,
        json!({"id": "bad id", "team": "nope", "scopes": ["write"], "env": "staging", "rpm": 0}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_request");
    let message = body["error"]["message"].as_str().unwrap();
    for needle in [
        "id \"bad id\"",
        "team \"nope\"",
        "scope \"write\"",
        "env \"staging\"",
        "rpm 0",
    ] {
        assert!(message.contains(needle), "{needle} missing from {message}");
    }
    let (status, body, _) = create(
        &gateway,
        json!({"id": "design-generate", "team": "design", "scopes": ["read"], "env": "prod"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, _, _) = create(
        &gateway,
        json!({"id": "x", "team": "design", "scopes": ["read"], "env": "prod", "colour": 1}),
    )
    .await;
    assert_eq!(status, 400);

    for (method, path) in [
        (reqwest::Method::DELETE, "/admin/keys/design-generate"),
        (reqwest::Method::POST, "/admin/keys/design-generate/rotate"),
    ] {
        let response = admin(&gateway, method, path, TOKEN_ADMIN, Some(json!({}))).await;
        assert_eq!(response.status(), 409, "{path}");
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn scopes_guard_the_admin_api() {
    let (_upstream, gateway) = start(None).await;
    for token in [TOKEN_DESIGN_GENERATE, TOKEN_DESIGN_READ] {
        let response = admin(&gateway, reqwest::Method::GET, "/admin/keys", token, None).await;
        assert_eq!(response.status(), 403);
        assert_eq!(response.text().await.unwrap(), FORBIDDEN_BODY);
        let (status, _, _) = {
            let r = admin(
                &gateway,
                reqwest::Method::POST,
                "/admin/keys",
                token,
                Some(json!({"id":"x","team":"design","scopes":["admin"],"env":"prod"})),
            )
            .await;
            (r.status().as_u16(), (), ())
        };
        assert_eq!(status, 403);
    }
    let anonymous = gateway
        .client
        .get(format!("{}/admin/keys", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.text().await.unwrap(), UNAUTHORIZED_BODY);

    // A generate-only token cannot even read usage; a read token sees its own team only.
    let generate_only = admin(
        &gateway,
        reqwest::Method::GET,
        "/admin/usage",
        TOKEN_DESIGN_TIGHT,
        None,
    )
    .await;
    assert_eq!(generate_only.status(), 403);
    gateway.generate(TOKEN_DESIGN_GENERATE).await;
    let own = admin(
        &gateway,
        reqwest::Method::GET,
        "/admin/usage",
        TOKEN_DESIGN_READ,
        None,
    )
    .await;
    assert_eq!(own.status(), 200);
    let own = json_body(own).await;
    let teams = own["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["team"], "design");
    assert_eq!(teams[0]["minute"]["used"], 1);
    assert_eq!(teams[0]["minute"]["limit"], DESIGN_RPM);
    let other = admin(
        &gateway,
        reqwest::Method::GET,
        "/admin/usage?team=marketing",
        TOKEN_DESIGN_READ,
        None,
    )
    .await;
    assert_eq!(other.status(), 403);
    let all = json_body(
        admin(
            &gateway,
            reqwest::Method::GET,
            "/admin/usage",
            TOKEN_ADMIN,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(all["teams"].as_array().unwrap().len(), 2);
    gateway.shutdown().await;
}

#[tokio::test]
async fn rotation_keeps_the_old_token_for_the_grace_only() {
    let clock = Arc::new(ManualClock::new("2026-11-27T10:00:00Z".parse().unwrap()));
    let (_upstream, gateway) = start(Some(clock.clone())).await;
    let (_, made, _) = create(
        &gateway,
        json!({"id": "rotating", "team": "design", "scopes": ["generate"], "env": "prod"}),
    )
    .await;
    let old = made["token"].as_str().unwrap().to_string();

    let rotated = admin(
        &gateway,
        reqwest::Method::POST,
        "/admin/keys/rotating/rotate",
        TOKEN_ADMIN,
        Some(json!({"grace": "24h"})),
    )
    .await;
    assert_eq!(rotated.status(), 200);
    let rotated = json_body(rotated).await;
    let new = rotated["token"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(rotated["previous_valid_until"], "2026-11-28T10:00:00Z");

    assert_eq!(
        gateway.generate(&old).await.status(),
        200,
        "old token works during the grace"
    );
    assert_eq!(gateway.generate(&new).await.status(), 200);
    clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(
        gateway.generate(&old).await.status(),
        401,
        "old token stops when the grace ends"
    );
    assert_eq!(gateway.generate(&new).await.status(), 200);

    let bad = admin(
        &gateway,
        reqwest::Method::POST,
        "/admin/keys/rotating/rotate",
        TOKEN_ADMIN,
        Some(json!({"grace": "forever"})),
    )
    .await;
    assert_eq!(bad.status(), 400);
    gateway.shutdown().await;
    logs::assert_clean(&[&old, &new, TOKEN_ADMIN, REAL_KEY]);
}

#[tokio::test]
async fn expired_admin_keys_answer_401() {
    let clock = Arc::new(ManualClock::new("2026-11-27T10:00:00Z".parse().unwrap()));
    let (_upstream, gateway) = start(Some(clock.clone())).await;
    let (status, made, _) = create(
        &gateway,
        json!({"id": "short", "team": "design", "scopes": ["generate"], "env": "prod", "expires": "2026-11-27T11:00:00Z"}),
    )
    .await;
    assert_eq!(status, 201);
    let token = made["token"].as_str().unwrap().to_string();
    assert_eq!(gateway.generate(&token).await.status(), 200);
    clock.advance(Duration::from_secs(3600));
    assert_eq!(gateway.generate(&token).await.status(), 401);
    gateway.shutdown().await;
}

/// A key store whose writer and restart land between a replica's reads: the first counter
/// read sees the store empty, a key is written before the keys are read, and the store
/// restarts empty right after. Models the race of a replica polling a Redis.
struct RacingStore {
    step: std::sync::atomic::AtomicUsize,
    key: keygate::key_store::StoredKey,
}

impl keygate::key_store::KeyStore for RacingStore {
    fn load(&self) -> keygate::quota::StoreFuture<'_, (u64, Vec<keygate::key_store::StoredKey>)> {
        use std::sync::atomic::Ordering;
        // Step 1: the key was written since the counter was read; then the store restarts.
        let loaded = match self
            .step
            .compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => (1, vec![self.key.clone()]),
            Err(_) => (0, Vec::new()),
        };
        Box::pin(std::future::ready(Ok(loaded)))
    }

    fn version(&self) -> keygate::quota::StoreFuture<'_, u64> {
        let _ = self.step.compare_exchange(
            0,
            1,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        Box::pin(std::future::ready(Ok(0)))
    }

    fn create(&self, _: keygate::key_store::StoredKey) -> keygate::quota::StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Ok(false)))
    }

    fn replace(&self, _: keygate::key_store::StoredKey) -> keygate::quota::StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Ok(false)))
    }

    fn delete<'a>(&'a self, _: &'a str) -> keygate::quota::StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(false)))
    }

    fn kind(&self) -> &'static str {
        "racing"
    }
}

#[tokio::test]
async fn a_replica_notes_the_version_its_keys_were_read_at() {
    const TOKEN: &str = "kg_prod_racing_store_token_0000000000000000099";
    let upstream = MockUpstream::start().await;
    let config = config_from(&standard_config_text(&upstream.url(), &admin_extra()));
    let store = Arc::new(RacingStore {
        step: Default::default(),
        key: keygate::key_store::StoredKey {
            id: "raced".into(),
            team: "design".into(),
            scopes: vec!["generate".into()],
            env: "prod".into(),
            token_sha256: hash(TOKEN),
            created: "2026-11-27T00:00:00Z".into(),
            expires: None,
            rpm: None,
            rpd: None,
            previous: None,
        },
    });
    let gateway = TestGateway::start_with_options(
        config,
        keygate::server::StartOptions {
            key_store: Some(store),
            ..Default::default()
        },
    )
    .await;
    // The key read in the race is served, then dropped once the store is seen empty: a
    // replica that noted the counter read before the keys (0) would keep it for good.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut served = false;
    loop {
        match gateway.generate(TOKEN).await.status().as_u16() {
            // 429: the key is known, the team's minute spent by this polling.
            200 | 429 => served = true,
            401 if served => break,
            401 => {}
            other => panic!("unexpected {other}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "served: {served}; the key outlived the store's restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.shutdown().await;
}
