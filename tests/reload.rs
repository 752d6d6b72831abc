//! Changes without a restart: config edits (rename-safe), broken edits that keep the last
//! good config, upstream key files replaced by rename, and per-environment upstream keys.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use keygate::config::Config;
use keygate::server::StartOptions;

const NEW_TOKEN: &str = "kg_prod_added_by_reload_token_00000000000000077";
const FILE_KEY_ONE: &str = "sk-upstream-FILE-one-1111111111";
const FILE_KEY_TWO: &str = "sk-upstream-FILE-two-2222222222";

/// Writes like an editor or a Kubernetes volume update: a new file renamed over the old.
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not happen within 5 s");
}

struct FileGateway {
    gateway: TestGateway,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// A gateway started from a config file (keys read from a key file), as `serve` does.
async fn start_from_file(upstream: &MockUpstream, extra: &str) -> FileGateway {
    init();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("imagen-key");
    std::fs::write(&key_path, format!("{FILE_KEY_ONE}\n")).unwrap();
    let text = standard_config_text(&upstream.url(), extra)
        .replace(
            "env = \"KEYGATE_TEST_UNUSED_PROD\"",
            &format!("file = {:?}", key_path.display().to_string()),
        )
        .replace(
            "env = \"KEYGATE_TEST_UNUSED_DEV\"",
            &format!("file = {:?}", key_path.display().to_string()),
        );
    let config_path = dir.path().join("keygate.toml");
    std::fs::write(&config_path, &text).unwrap();
    let config = Config::load(&config_path).unwrap();
    let gateway = TestGateway::start_with_options(
        config,
        StartOptions {
            config_path: Some(config_path.clone()),
            ..StartOptions::default()
        },
    )
    .await;
    FileGateway {
        gateway,
        config_path,
        _dir: dir,
    }
}

fn new_key_stanza() -> String {
    format!(
        "\n[[keys]]\nid = \"added\"\nteam = \"marketing\"\ntoken_sha256 = \"{}\"\nscopes = [\"generate\"]\nenv = \"prod\"\n",
        hash(NEW_TOKEN)
    )
}

#[tokio::test]
async fn an_edit_adds_a_key_and_a_broken_edit_keeps_the_last_good_config() {
    let upstream = MockUpstream::start().await;
    let running = start_from_file(&upstream, "").await;
    let gateway = &running.gateway;
    assert_eq!(gateway.generate(NEW_TOKEN).await.status(), 401);

    let text = std::fs::read_to_string(&running.config_path).unwrap();
    replace_file(&running.config_path, &(text.clone() + &new_key_stanza()));
    eventually("the added key works", || async {
        gateway.generate(NEW_TOKEN).await.status() == 200
    })
    .await;

    let gw = gateway.running.as_ref().unwrap().gateway.clone();
    let rejected_before = gw.reload_stats.rejected.load(Ordering::Relaxed);
    replace_file(
        &running.config_path,
        "[server]\nlisten = \"not an address\"\n[[teams]]\nname = 1\n",
    );
    eventually("the broken edit is rejected", || async {
        gw.reload_stats.rejected.load(Ordering::Relaxed) > rejected_before
    })
    .await;
    assert_eq!(
        gateway.generate(NEW_TOKEN).await.status(),
        200,
        "last good config kept"
    );
    assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);
    let health = gateway
        .client
        .get(format!("{}/healthz", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let problems = logs::captured();
    assert!(
        problems.contains("not an address"),
        "every problem of the broken edit is logged"
    );

    running.gateway.shutdown().await;
    logs::assert_clean(&[FILE_KEY_ONE, FILE_KEY_TWO, NEW_TOKEN, TOKEN_DESIGN_GENERATE]);
}

#[tokio::test]
async fn a_key_file_replaced_by_rename_is_used_on_the_next_request() {
    let upstream = MockUpstream::start().await;
    let running = start_from_file(&upstream, "").await;
    let gateway = &running.gateway;
    assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);
    assert_eq!(
        upstream.received()[0].headers["authorization"],
        format!("Bearer {FILE_KEY_ONE}")
    );

    let key_path = running.config_path.with_file_name("imagen-key");
    replace_file(&key_path, &format!("{FILE_KEY_TWO}\n"));
    eventually("the new upstream key is used", || async {
        gateway.generate(TOKEN_DESIGN_GENERATE).await.status() == 200
            && upstream.received().last().unwrap().headers["authorization"]
                == format!("Bearer {FILE_KEY_TWO}").as_str()
    })
    .await;
    running.gateway.shutdown().await;
    logs::assert_clean(&[FILE_KEY_ONE, FILE_KEY_TWO]);
}

#[tokio::test]
async fn a_dev_token_goes_out_with_the_dev_key() {
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config_from(&standard_config_text(&upstream.url(), ""))).await;
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
}

#[tokio::test]
async fn an_env_without_a_readable_key_shows_on_readyz_and_answers_503() {
    let upstream = MockUpstream::start().await;
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.upstream.keys.insert(
        "dev".into(),
        keygate::config::KeySource::Env("KEYGATE_TEST_SURELY_UNSET_DEV_KEY".into()),
    );
    let gateway = TestGateway::start(config).await;
    let ready = gateway
        .client
        .get(format!("{}/readyz", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready = json_body(ready).await;
    assert_eq!(ready["upstream_keys"][0]["env"], "dev");
    let refused = gateway.generate(TOKEN_DESIGN_DEV).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        json_body(refused).await["error"]["code"],
        "service_unavailable"
    );
    assert_eq!(upstream.count(), 0);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_key_the_upstream_refuses_sits_out_and_traffic_moves_to_the_next() {
    let upstream = MockUpstream::start().await;
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.upstream.keys.insert(
        "prod".into(),
        keygate::config::KeySource::Inline(vec![
            keygate::secret::Secret::new(FILE_KEY_ONE),
            keygate::secret::Secret::new(FILE_KEY_TWO),
        ]),
    );
    let gateway = TestGateway::start(config).await;
    // Both keys are used in turn while the upstream accepts both.
    for _ in 0..2 {
        assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);
    }
    let used: Vec<String> = upstream
        .received()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_string())
        .collect();
    assert!(
        used.contains(&format!("Bearer {FILE_KEY_ONE}"))
            && used.contains(&format!("Bearer {FILE_KEY_TWO}"))
    );

    upstream.refuse_key(FILE_KEY_ONE, 401);
    let mut refused = 0;
    for _ in 0..6 {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        if response.status() == 502 {
            refused += 1;
            let body = response.text().await.unwrap();
            assert!(
                body.contains("bad_gateway"),
                "the client is not told its own token is invalid: {body}"
            );
        } else {
            assert_eq!(response.status(), 200);
        }
    }
    assert!(
        refused <= 1,
        "only the first request meets the refused key ({refused})"
    );
    let after: Vec<_> = upstream.received()[2..]
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_string())
        .collect();
    let with_one = after.iter().filter(|a| a.ends_with(FILE_KEY_ONE)).count();
    assert!(with_one <= 1, "the refused key sits out: {with_one} uses");

    // The refused request was refunded: only the 200s count.
    let gw = gateway.running.as_ref().unwrap().gateway.clone();
    let subjects = gw.snapshot().by_id["design-generate"].subjects.clone();
    let admitted = 8 - refused as u64;
    eventually("only the answered requests count", || {
        let (gw, subjects) = (gw.clone(), subjects.clone());
        async move { gw.store.usage(&subjects).await.unwrap()[0].minute.used == admitted }
    })
    .await;
    gateway.shutdown().await;
    logs::assert_clean(&[FILE_KEY_ONE, FILE_KEY_TWO]);
}

/// A busy neighbour in the config's directory (a usage log written many times a second)
/// fires the directory watch but is not an edit: nothing is reloaded for it, and a real
/// edit afterwards still is.
#[tokio::test]
async fn writes_next_to_the_config_do_not_reload_it() {
    let upstream = MockUpstream::start().await;
    let running = start_from_file(&upstream, "").await;
    let gw = running.gateway.running.as_ref().unwrap().gateway.clone();
    let applied_before = gw.reload_stats.applied.load(Ordering::Relaxed);
    let neighbour = running.config_path.with_file_name("usage.log");
    for i in 0..20 {
        std::fs::write(&neighbour, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the watcher's 50 ms settling time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gw.reload_stats.applied.load(Ordering::Relaxed),
        applied_before,
        "a neighbour's writes reloaded the config"
    );
    let text = std::fs::read_to_string(&running.config_path).unwrap();
    replace_file(&running.config_path, &(text + &new_key_stanza()));
    let gateway = &running.gateway;
    eventually("the added key works", || async {
        gateway.generate(NEW_TOKEN).await.status() == 200
    })
    .await;
}
