//! Graceful shutdown of the real binary (`keygate serve --config FILE`): on SIGTERM or
//! SIGINT it stops accepting at once, lets the requests in flight finish within
//! `server.shutdown_grace`, and exits 0. Nothing it prints holds a key or a token.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// A `keygate serve` process with its output collected line by line.
struct Keygate {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    proxy: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Keygate {
    async fn start(config_text: &str) -> Self {
        init();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, config_text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env("KEYGATE_TEST_UNUSED_PROD", REAL_KEY)
            .env("KEYGATE_TEST_UNUSED_DEV", REAL_DEV_KEY)
            .env("KEYGATE_LOG", "info")
            .env("KEYGATE_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the keygate binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (listening_tx, mut listening) = watch::channel(None::<SocketAddr>);
        let listening_tx = Arc::new(listening_tx);
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for pipe in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stderr),
        ] {
            let output = output.clone();
            let listening_tx = listening_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("keygate listening") {
                        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                        let proxy = event["proxy"].as_str().unwrap().parse().unwrap();
                        let _ = listening_tx.send(Some(proxy));
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        let proxy = tokio::time::timeout(
            Duration::from_secs(20),
            listening.wait_for(|addr| addr.is_some()),
        )
        .await
        .unwrap_or_else(|_| panic!("keygate did not start: {:?}", output.lock().unwrap()))
        .expect("output readers alive")
        .expect("address");
        Self {
            child,
            output,
            proxy,
            _dir: dir,
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("the `kill` command (Debian package procps) sends the signal");
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code and how long it took.
    async fn exit(mut self, within: Duration) -> (Option<i32>, Duration, Vec<String>) {
        let started = Instant::now();
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("keygate still running after {within:?}"))
            .unwrap();
        let took = started.elapsed();
        // Give the readers the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let output = self.output.lock().unwrap().clone();
        (status.code(), took, output)
    }
}

fn assert_output_clean(output: &[String]) {
    let all = output.join("\n");
    for secret in ALL_SECRETS {
        assert!(
            !all.contains(secret),
            "a secret appeared in keygate's output"
        );
    }
}

/// Polls until connecting is refused: no event tells when the listener has closed.
async fn await_refused(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // A handshake that met the listener as it closed is reset by the kernel: not
            // accepted either, and the next attempt must then be refused outright.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                assert!(
                    Instant::now() < deadline,
                    "connections reset but never refused"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "still accepting after the signal"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Delayed(Duration::from_millis(1500)));
    let keygate = Keygate::start(&standard_config_text(&upstream.url(), "")).await;
    let base_url = format!("http://{}", keygate.proxy);
    let client = client();
    let in_flight: Vec<_> = (0..5)
        .map(|_| {
            let request = generate_request(&client, &base_url, Some(TOKEN_DESIGN_GENERATE)).send();
            tokio::spawn(async move {
                let response = request.await?;
                let status = response.status().as_u16();
                Ok::<_, reqwest::Error>((status, response.text().await?))
            })
        })
        .collect();
    // All five are at the upstream, waiting for their answers, when the signal comes.
    upstream.wait_for(5, Duration::from_secs(10)).await;
    keygate.signal("TERM");
    await_refused(keygate.proxy).await;

    for request in in_flight {
        let (status, body) = request
            .await
            .unwrap()
            .expect("an in-flight request completed");
        assert_eq!(status, 200);
        assert_eq!(body, common::upstream::OK_JSON);
    }
    let (code, _, output) = keygate.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:?}");
    assert_eq!(upstream.count(), 5);
    assert!(output.iter().any(|l| l.contains("SIGTERM")), "{output:?}");
    assert!(
        output.iter().any(|l| l.contains("all connections closed")),
        "{output:?}"
    );
    assert_output_clean(&output);
}

#[tokio::test]
async fn sigint_on_an_idle_gateway_exits_0_at_once() {
    let upstream = MockUpstream::start().await;
    let keygate = Keygate::start(&standard_config_text(&upstream.url(), "")).await;
    // One request first, leaving an idle keep-alive connection behind.
    let response = client()
        .get(format!("http://{}/v1/models", keygate.proxy))
        .bearer_auth(TOKEN_DESIGN_READ)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    keygate.signal("INT");
    let (code, took, output) = keygate.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:?}");
    assert!(
        took < Duration::from_secs(4),
        "an idle connection held up the shutdown for {took:?}"
    );
    assert!(output.iter().any(|l| l.contains("SIGINT")), "{output:?}");
    assert_output_clean(&output);
}

#[tokio::test]
async fn a_request_outliving_the_grace_is_cut_and_the_process_still_exits_0() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Hang);
    let config = standard_config_text(&upstream.url(), "")
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1s\"")
        .replace("timeout = \"5s\"", "timeout = \"60s\"");
    let keygate = Keygate::start(&config).await;
    let request = generate_request(
        &client(),
        &format!("http://{}", keygate.proxy),
        Some(TOKEN_DESIGN_GENERATE),
    )
    .send();
    let request = tokio::spawn(request);
    upstream.wait_for(1, Duration::from_secs(10)).await;
    keygate.signal("TERM");
    let (code, took, output) = keygate.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:?}");
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the grace"
    );
    assert!(
        output.iter().any(|l| l.contains("shutdown grace ran out")),
        "{output:?}"
    );
    assert!(
        request.await.unwrap().is_err(),
        "the cut request cannot have succeeded"
    );
    assert_output_clean(&output);
}

const TOKEN_BULK: &str = "kg_prod_bulk_generate_token_000000000000000021";

/// With `store.local_slices`, a replica holds admissions charged in Redis ahead of its
/// requests until their second ends; its timer for that dies with the process, so a
/// replica that stops gives them back first, or Redis keeps counting requests never made.
#[tokio::test]
async fn sigterm_gives_back_the_quota_slices_it_held() {
    let redis = common::redis::RedisServer::start();
    let upstream = MockUpstream::start().await;
    let extra = format!(
        "[store]\nurl = \"{}\"\non_error = \"closed\"\ntimeout = \"5s\"\nlocal_slices = true\n\
         [plans.bulk]\nrpm = 1000000\nrpd = 1000000\n\
         [[teams]]\nname = \"bulk\"\nplan = \"bulk\"\n\
         [[keys]]\nid = \"bulk-1\"\nteam = \"bulk\"\ntoken_sha256 = \"{}\"\n\
         scopes = [\"generate\"]\nenv = \"prod\"\n",
        redis.url(),
        hash(TOKEN_BULK)
    );
    let keygate = Keygate::start(&standard_config_text(&upstream.url(), &extra)).await;
    let base_url = format!("http://{}", keygate.proxy);
    let client = client();
    let counted = |field: &str| -> u64 {
        let value = redis.cli(&["HGET", "kg:q:{t:bulk}", field]).unwrap();
        value.trim().parse().unwrap_or(0)
    };
    // Requests until Redis counts more than were made: a slice is held.
    let started = Instant::now();
    let mut admitted = 0;
    while counted("n") <= admitted {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no slice taken after {admitted} requests"
        );
        let batch: Vec<_> = (0..8)
            .map(|_| generate_request(&client, &base_url, Some(TOKEN_BULK)).send())
            .collect();
        for response in futures_util::future::join_all(batch).await {
            assert_eq!(response.unwrap().status(), 200);
            admitted += 1;
        }
    }
    keygate.signal("TERM");
    let (code, _, output) = keygate.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:?}");
    // The slice's own timer could have given it back only had its second ended between
    // the count above and the exit, a few milliseconds of it.
    assert_eq!(counted("n"), admitted, "minute count after the exit");
    assert_eq!(counted("dn"), admitted, "day count after the exit");
    assert_output_clean(&output);
}
