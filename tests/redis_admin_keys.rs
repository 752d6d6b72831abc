//! Admin-made keys on a fleet: two keygate instances on one real redis-server (and on a
//! three-master Redis Cluster). A creation, revocation or rotation on A is in force on B
//! within a second; a create with a taken id is refused atomically; a replica that loses
//! Redis keeps the keys it knew and picks changes up again when Redis is back.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::clock::{Clock, OffsetClock, SystemClock};
use keygate::config::StoreUrl;
use keygate::key_store::redis::RedisKeyStore;
use keygate::key_store::{KeyStore, StoredKey};
use serde_json::json;

use common::admin::*;
use common::redis::{RedisCluster, RedisServer};
use common::*;

/// The contract: a change made on one replica is in force on every other within this.
const PROPAGATION: Duration = Duration::from_secs(1);

/// No fallback in the propagation tests: a store failure must show, not be absorbed.
const STRICT: &str = "on_error = \"closed\"\ntimeout = \"5s\"";

async fn start_on(
    upstream: &MockUpstream,
    url: &str,
    store: &str,
    clock: Arc<dyn Clock>,
) -> TestGateway {
    // Probes send a token before it is valid on B, again and again: the invalid-token
    // throttle must not take that for guessing.
    let extra = format!(
        "[store]\nurl = \"{url}\"\n{store}\n{}\n[anomalies]\ninvalid_tokens_per_minute = 1000000\n",
        admin_extra()
    );
    let config = config_from(&standard_config_text(&upstream.url(), &extra));
    TestGateway::start_with(config, clock).await
}

/// Two replicas on one store URL, on one clock.
async fn fleet(
    url: &str,
    store: &str,
    clock: Arc<dyn Clock>,
) -> (MockUpstream, TestGateway, TestGateway) {
    let upstream = MockUpstream::start().await;
    let a = start_on(&upstream, url, store, clock.clone()).await;
    let b = start_on(&upstream, url, store, clock).await;
    (upstream, a, b)
}

/// Polls `probe` until it yields a value, failing the test when that takes longer than
/// `within`. Returns the value and how long it took.
async fn await_within<T, F: Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            let took = start.elapsed();
            assert!(took <= within, "{what} took {took:?}, more than {within:?}");
            return (value, took);
        }
        assert!(
            start.elapsed() <= within,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `gateway` answers `token` with `status` and returns that answer's body.
async fn await_status(gateway: &TestGateway, token: &str, status: u16, what: &str) -> String {
    let (body, _) = await_within(what, PROPAGATION, || async {
        let response = gateway.generate(token).await;
        if response.status().as_u16() == status {
            Some(response.text().await.expect("body reads"))
        } else {
            None
        }
    })
    .await;
    body
}

fn key_body(id: &str) -> serde_json::Value {
    json!({"id": id, "team": "design", "scopes": ["generate"], "env": "prod"})
}

/// Creates a key on `gateway` and returns its one-time token.
async fn create_token(gateway: &TestGateway, id: &str) -> String {
    let (status, made, text) = create(gateway, key_body(id)).await;
    assert_eq!(status, 201, "{text}");
    let token = made["token"].as_str().expect("token").to_string();
    assert!(
        !text.contains(&hash(&token)),
        "a create answer holds the hash"
    );
    token
}

async fn list_keys(gateway: &TestGateway) -> (serde_json::Value, String) {
    let response = admin(
        gateway,
        reqwest::Method::GET,
        "/admin/keys",
        TOKEN_ADMIN,
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    (serde_json::from_str(&text).expect("JSON"), text)
}

fn listed_entry<'a>(listed: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    listed["keys"].as_array()?.iter().find(|k| k["id"] == id)
}

#[tokio::test]
async fn create_list_and_revoke_on_a_reach_b_within_a_second() {
    let redis = RedisServer::start();
    let (upstream, a, b) = fleet(&redis.url(), STRICT, Arc::new(SystemClock)).await;

    let token = create_token(&a, "fleet-ci").await;
    let (_, took) = await_within("B admits a key created on A", PROPAGATION, || async {
        (b.generate(&token).await.status() == 200).then_some(())
    })
    .await;
    eprintln!("creation reached B in {took:?}");
    assert_eq!(
        upstream.received().last().unwrap().headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );

    let (listed, text) = list_keys(&b).await;
    let entry = listed_entry(&listed, "fleet-ci").expect("B lists the key created on A");
    assert_eq!(entry["origin"], "admin");
    assert_eq!(entry["team"], "design");
    assert_eq!(entry["scopes"], json!(["generate"]));
    assert!(entry["created"].is_string());
    assert!(!text.contains(&token) && !text.contains(&hash(&token)));
    assert!(!text.contains("sha256"));
    assert_no_secrets(&reqwest::header::HeaderMap::new(), text.as_bytes());
    // Only the hash is in Redis; the token is nowhere.
    let stored = redis
        .cli(&["HGET", "kg:keys:{admin}", "fleet-ci"])
        .expect("redis-cli");
    assert!(stored.contains(&hash(&token)) && !stored.contains(&token));

    assert_eq!(revoke(&a, "fleet-ci").await.status(), 200);
    let body = await_status(&b, &token, 401, "B refuses a key revoked on A").await;
    assert_eq!(body, UNAUTHORIZED_BODY);
    let (listed, _) = list_keys(&b).await;
    assert!(listed_entry(&listed, "fleet-ci").is_none());

    a.shutdown().await;
    b.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
    logs::assert_clean(&[TOKEN_ADMIN, &token]);
}

#[tokio::test]
async fn rotation_on_a_keeps_the_old_token_on_b_for_the_grace_only() {
    let redis = RedisServer::start();
    let clock = Arc::new(OffsetClock::new());
    let (_upstream, a, b) = fleet(&redis.url(), STRICT, clock.clone()).await;

    let old = create_token(&a, "fleet-rotating").await;
    await_status(&b, &old, 200, "B admits the key created on A").await;

    let rotated = admin(
        &a,
        reqwest::Method::POST,
        "/admin/keys/fleet-rotating/rotate",
        TOKEN_ADMIN,
        Some(json!({"grace": "1h"})),
    )
    .await;
    assert_eq!(rotated.status(), 200);
    let text = rotated.text().await.unwrap();
    let rotated: serde_json::Value = serde_json::from_str(&text).unwrap();
    let new = rotated["token"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    for secret in [&old, &hash(&old), &hash(&new)] {
        assert!(
            !text.contains(secret.as_str()),
            "rotate answer leaks: {text}"
        );
    }

    await_status(&b, &new, 200, "B admits the token rotated on A").await;
    assert_eq!(
        b.generate(&old).await.status(),
        200,
        "old token within grace"
    );

    clock.advance(Duration::from_secs(3600));
    let body = b.generate(&old).await;
    assert_eq!(body.status(), 401, "old token after the grace");
    assert_eq!(body.text().await.unwrap(), UNAUTHORIZED_BODY);
    assert_eq!(b.generate(&new).await.status(), 200);

    let (_, listing) = list_keys(&b).await;
    for secret in [&old, &new, &hash(&old), &hash(&new)] {
        assert!(!listing.contains(secret.as_str()));
    }
    a.shutdown().await;
    b.shutdown().await;
    logs::assert_clean(&[&old, &new, TOKEN_ADMIN]);
}

#[tokio::test]
async fn concurrent_creates_of_one_id_on_two_replicas_make_exactly_one_key() {
    let redis = RedisServer::start();
    let (_upstream, a, b) = fleet(&redis.url(), STRICT, Arc::new(SystemClock)).await;
    for round in 0..5 {
        let id = format!("race-{round}");
        let ((status_a, body_a, _), (status_b, body_b, _)) =
            tokio::join!(create(&a, key_body(&id)), create(&b, key_body(&id)));
        let mut statuses = [status_a, status_b];
        statuses.sort();
        assert_eq!(statuses, [201, 409], "{body_a} {body_b}");
        let (winner, loser) = if status_a == 201 {
            (body_a, body_b)
        } else {
            (body_b, body_a)
        };
        assert_eq!(loser["error"]["code"], "conflict", "{loser}");
        assert!(loser.get("token").is_none());
        // The key in the store is the winner's: its token works on both replicas.
        let token = winner["token"].as_str().unwrap();
        let stored = redis.cli(&["HGET", "kg:keys:{admin}", &id]).unwrap();
        assert!(stored.contains(&hash(token)));
        await_status(&a, token, 200, "A admits the winner").await;
        await_status(&b, token, 200, "B admits the winner").await;
    }
    assert_eq!(redis.cli(&["HLEN", "kg:keys:{admin}"]).unwrap().trim(), "5");
    a.shutdown().await;
    b.shutdown().await;
}

fn stored_key(id: &str, digest: &str) -> StoredKey {
    StoredKey {
        id: id.into(),
        team: "design".into(),
        scopes: vec!["generate".into()],
        env: "prod".into(),
        token_sha256: digest.into(),
        created: "2026-11-27T10:00:00Z".into(),
        expires: None,
        rpm: None,
        rpd: None,
        previous: None,
    }
}

#[tokio::test]
async fn the_store_takes_one_create_per_id_and_bumps_the_version_once_per_write() {
    let redis = RedisServer::start();
    let url = StoreUrl::Redis(redis.url());
    let stores: Vec<RedisKeyStore> = (0..2)
        .map(|_| RedisKeyStore::open(&url, Duration::from_secs(5)).unwrap())
        .collect();
    let before = stores[0].version().await.unwrap();
    let attempts = (0..20).map(|i| {
        let digest = format!("{i:064x}");
        stores[i % 2].create(stored_key("contested", &digest))
    });
    let outcomes = futures_util::future::join_all(attempts).await;
    let won: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| *o.as_ref().unwrap())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    let listed = stores[1].list().await.unwrap();
    assert_eq!(
        listed,
        vec![stored_key("contested", &format!("{:064x}", won[0]))]
    );
    let after_create = stores[1].version().await.unwrap();
    assert_ne!(after_create, before);
    assert_eq!(stores[0].version().await.unwrap(), after_create);

    // Replace and delete write only what exists, and only a write moves the version.
    assert!(!stores[0]
        .replace(stored_key("absent", &"0".repeat(64)))
        .await
        .unwrap());
    assert!(!stores[0].delete("absent").await.unwrap());
    assert_eq!(stores[0].version().await.unwrap(), after_create);
    assert!(stores[0]
        .replace(stored_key("contested", &"f".repeat(64)))
        .await
        .unwrap());
    assert_eq!(
        stores[1].list().await.unwrap()[0].token_sha256,
        "f".repeat(64)
    );
    let after_replace = stores[1].version().await.unwrap();
    assert_ne!(after_replace, after_create);
    assert!(stores[1].delete("contested").await.unwrap());
    assert!(stores[0].list().await.unwrap().is_empty());
    assert_ne!(stores[0].version().await.unwrap(), after_replace);
    assert_eq!(stores[0].kind(), "redis");

    // Redis loses its data (a restart without persistence): the next write must not bring
    // the counter back to a value a replica has already seen, or that replica would take
    // the new key for "no change".
    let mut seen = Vec::new();
    for _ in 0..2 {
        redis.cli(&["FLUSHALL"]).expect("FLUSHALL");
        assert_eq!(stores[1].version().await.unwrap(), 0);
        assert!(stores[1]
            .create(stored_key("one", &"e".repeat(64)))
            .await
            .unwrap());
        seen.push(stores[0].version().await.unwrap());
    }
    assert_ne!(
        seen[0], seen[1],
        "the counter repeated itself after a data loss"
    );
}

#[tokio::test]
async fn create_on_a_is_used_on_b_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let (_upstream, a, b) = fleet(&cluster.url(), STRICT, Arc::new(SystemClock)).await;
    let token = create_token(&a, "cluster-ci").await;
    await_status(&b, &token, 200, "B admits a key created on A (cluster)").await;
    let (listed, _) = list_keys(&b).await;
    assert!(listed_entry(&listed, "cluster-ci").is_some());
    // Hash and counter share a slot: both on the node that holds the tag.
    let node = cluster.node_for("kg:keys:{admin}");
    assert_eq!(node.cli(&["HLEN", "kg:keys:{admin}"]).unwrap().trim(), "1");
    assert_ne!(node.cli(&["GET", "kg:keys:{admin}:v"]).unwrap().trim(), "");

    assert_eq!(revoke(&a, "cluster-ci").await.status(), 200);
    let body = await_status(&b, &token, 401, "B refuses a key revoked on A (cluster)").await;
    assert_eq!(body, UNAUTHORIZED_BODY);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_replica_keeps_its_keys_while_redis_is_down_and_follows_again_after() {
    // Quotas fall back to local counting, so only the key store's behaviour is under test.
    let mut redis = RedisServer::start();
    let store = "on_error = \"local\"\ntimeout = \"250ms\"";
    let (_upstream, a, b) = fleet(&redis.url(), store, Arc::new(SystemClock)).await;
    let known = create_token(&a, "before-outage").await;
    await_status(&b, &known, 200, "B admits the key created on A").await;

    redis.kill();
    let (stale, _) = await_within(
        "B reports stale admin keys on /readyz",
        Duration::from_secs(5),
        || async {
            let (status, ready) = b.readyz().await;
            (ready["admin_keys"]["state"] == "stale").then_some((status, ready))
        },
    )
    .await;
    assert_eq!(stale.0, 200, "stale keys still serve: {}", stale.1);
    assert_eq!(stale.1["admin_keys"]["store"], "redis");
    assert!(stale.1["admin_keys"]["last_error"].is_string());
    assert!(logs::captured().contains("keeping the last known keys"));
    for _ in 0..3 {
        assert_eq!(b.generate(&known).await.status(), 200, "B forgot a key");
    }
    assert_eq!(b.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);

    // A write the store cannot take is the seed's 503, with no token.
    let (status, _, text) = create(&a, key_body("during-outage")).await;
    assert_eq!(status, 503);
    assert_eq!(text, SERVICE_UNAVAILABLE_BODY);

    // Back, but empty (no persistence): the store is the truth again, so the forgotten key
    // goes on B too; that B dropped it shows B reads the store again.
    redis.restart();
    await_within(
        "B re-reads the restarted store",
        Duration::from_secs(5),
        || async { (b.generate(&known).await.status() == 401).then_some(()) },
    )
    .await;
    // A's next create may meet its own connection still recovering: retry until it lands,
    // each time with a new id in case a refused attempt was written after all.
    let mut attempt = 0;
    let (fresh, _) = await_within(
        "A creates a key after the restart",
        Duration::from_secs(5),
        || {
            attempt += 1;
            let (a, id) = (&a, format!("after-outage-{attempt}"));
            async move {
                let (status, made, text) = create(a, key_body(&id)).await;
                match status {
                    201 => Some(made["token"].as_str().unwrap().to_string()),
                    503 => {
                        assert_eq!(text, SERVICE_UNAVAILABLE_BODY);
                        None
                    }
                    other => panic!("create after restart answered {other}: {text}"),
                }
            }
        },
    )
    .await;
    await_status(&b, &fresh, 200, "B admits a key created after the restart").await;
    assert!(logs::captured().contains("admin keys readable again"));
    let (_, ready) = b.readyz().await;
    assert_eq!(ready["admin_keys"]["state"], "current", "{ready}");
    a.shutdown().await;
    b.shutdown().await;
    logs::assert_clean(&[&known, &fresh, TOKEN_ADMIN]);
}
