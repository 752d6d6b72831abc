//! Test support shared by the integration tests: a recording mock upstream, real
//! `redis-server` processes, an in-process gateway on 127.0.0.1:0, and a log capture that
//! fails a test when a secret shows up in any log line.
#![allow(dead_code)]

pub mod admin;
pub mod canary;
pub mod h2c;
pub mod logs;
pub mod observe;
pub mod raw;
pub mod redis;
pub mod upstream;
pub mod webhook;

use std::sync::{Arc, Once};

use std::time::{Duration, Instant};

use keygate::clock::{Clock, ManualClock, SystemClock};
use keygate::config::{Config, KeySource};
use keygate::gateway::Gateway;
use keygate::quota::{SubjectKind, SubjectUsage};
use keygate::secret::Secret;
use keygate::server::{RunningGateway, StartOptions};

#[allow(unused_imports)]
pub use upstream::MockUpstream;
#[allow(unused_imports)]
pub use upstream::Reply;

/// The real upstream key every test gateway holds. It must never reach a client or a log.
pub const REAL_KEY: &str = "sk-upstream-REAL-test-0123456789abcdef";
/// A second real `prod` key, for failover (set inline by the tests that use it).
pub const REAL_KEY_B: &str = "sk-upstream-REAL-B-test-0123456789abcdef";
/// A second real key, for the `dev` environment.
pub const REAL_DEV_KEY: &str = "sk-upstream-DEV-test-fedcba9876543210";

/// Internal tokens of the standard test config.
pub const TOKEN_DESIGN_GENERATE: &str = "kg_prod_design_generate_token_000000000000001";
pub const TOKEN_DESIGN_READ: &str = "kg_prod_design_read_token_000000000000000000002";
pub const TOKEN_DESIGN_TIGHT: &str = "kg_prod_design_tight_token_00000000000000000003";
pub const TOKEN_DESIGN_EXPIRED: &str = "kg_prod_design_expired_token_000000000000000004";
pub const TOKEN_MARKETING: &str = "kg_prod_marketing_generate_token_000000000005";
pub const TOKEN_DESIGN_DEV: &str = "kg_dev_design_dev_token_00000000000000000000006";

pub const ALL_SECRETS: &[&str] = &[
    REAL_KEY,
    REAL_DEV_KEY,
    TOKEN_DESIGN_GENERATE,
    TOKEN_DESIGN_READ,
    TOKEN_DESIGN_TIGHT,
    TOKEN_DESIGN_EXPIRED,
    TOKEN_MARKETING,
    TOKEN_DESIGN_DEV,
];

pub fn hash(token: &str) -> String {
    keygate::auth::sha256_hex(token.as_bytes())
}

/// Installs the ring crypto provider for reqwest (built without one) and the log capture.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        logs::install();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
    });
}

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Panics anywhere in this test binary so far (gateway tasks included: hyper and tokio
/// swallow a task's panic, the hook still sees it).
pub fn panics_so_far() -> usize {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Plans and limits of the standard config, so tests can name them.
pub const DESIGN_RPM: u64 = 100;
pub const DESIGN_RPD: u64 = 10_000;
pub const MARKETING_RPM: u64 = 10;
pub const MARKETING_RPD: u64 = 100;
pub const TIGHT_KEY_RPM: u64 = 3;

/// Retries and the circuit breaker off: most tests are about one request meeting one
/// fault, and count exactly what the upstream received. tests/resilience.rs turns them on.
pub const HARNESS_RESILIENCE: &str =
    "[upstream.retry]\nattempts = 1\n[upstream.circuit]\nenabled = false\n";

/// The standard config: teams `design` (pro) and `marketing` (free), routes for
/// text-to-image (generate) and `/v1/` (read), memory store, no retries and no circuit
/// breaker. `extra` is appended verbatim.
pub fn standard_config_text(upstream_url: &str, extra: &str) -> String {
    config_text_with_resilience(upstream_url, HARNESS_RESILIENCE, extra)
}

/// The standard config with its own `[upstream.retry]` / `[upstream.circuit]` tables.
pub fn config_text_with_resilience(upstream_url: &str, resilience: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"

[upstream]
url = "{upstream_url}"
timeout = "5s"
connect_timeout = "1s"
[upstream.keys.prod]
env = "KEYGATE_TEST_UNUSED_PROD"
[upstream.keys.dev]
env = "KEYGATE_TEST_UNUSED_DEV"
{resilience}

[plans]
free = {{ rpm = {MARKETING_RPM}, rpd = {MARKETING_RPD} }}
pro = {{ rpm = {DESIGN_RPM}, rpd = {DESIGN_RPD} }}

[[teams]]
name = "design"
plan = "pro"

[[teams]]
name = "marketing"
plan = "free"

[[keys]]
id = "design-generate"
team = "design"
token_sha256 = "{gen}"
scopes = ["generate", "read"]
env = "prod"

[[keys]]
id = "design-read"
team = "design"
token_sha256 = "{read}"
scopes = ["read"]
env = "prod"

[[keys]]
id = "design-tight"
team = "design"
token_sha256 = "{tight}"
scopes = ["generate"]
env = "prod"
rpm = {TIGHT_KEY_RPM}

[[keys]]
id = "design-expired"
team = "design"
token_sha256 = "{expired}"
scopes = ["generate"]
env = "prod"
expires = "2020-01-01T00:00:00Z"

[[keys]]
id = "marketing-generate"
team = "marketing"
token_sha256 = "{marketing}"
scopes = ["generate", "read"]
env = "prod"

[[keys]]
id = "design-dev"
team = "design"
token_sha256 = "{dev}"
scopes = ["generate"]
env = "dev"

[[routes]]
match = "POST /v1/text-to-image"
scope = "generate"

[[routes]]
match = "GET /v1/"
scope = "read"
{extra}
"#,
        gen = hash(TOKEN_DESIGN_GENERATE),
        read = hash(TOKEN_DESIGN_READ),
        tight = hash(TOKEN_DESIGN_TIGHT),
        expired = hash(TOKEN_DESIGN_EXPIRED),
        marketing = hash(TOKEN_MARKETING),
        dev = hash(TOKEN_DESIGN_DEV),
    )
}

/// Parses a config text and gives it the test's real keys in process (no env vars).
pub fn config_from(text: &str) -> Config {
    let mut config = Config::from_toml(text).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    config.upstream.keys.insert(
        "prod".into(),
        KeySource::Inline(vec![Secret::new(REAL_KEY)]),
    );
    config.upstream.keys.insert(
        "dev".into(),
        KeySource::Inline(vec![Secret::new(REAL_DEV_KEY)]),
    );
    config
}

/// A gateway running in this process, with an HTTP client aimed at it.
pub struct TestGateway {
    pub running: Option<RunningGateway>,
    pub proxy: String,
    pub admin: String,
    pub client: reqwest::Client,
    /// The usage log: the config's file, or one in a temp dir when the config says stdout
    /// (so test output stays readable).
    pub usage: observe::UsageFile,
    _usage_dir: Option<tempfile::TempDir>,
}

impl TestGateway {
    pub async fn start(config: Config) -> Self {
        Self::start_with(config, Arc::new(SystemClock)).await
    }

    pub async fn start_with_clock(config: Config, clock: Arc<ManualClock>) -> Self {
        Self::start_with(config, clock).await
    }

    pub async fn start_with(config: Config, clock: Arc<dyn Clock>) -> Self {
        Self::start_with_options(
            config,
            StartOptions {
                clock,
                ..StartOptions::default()
            },
        )
        .await
    }

    /// Starts with any options; a usage log on stdout is moved to a temp file.
    pub async fn start_with_options(mut config: Config, options: StartOptions) -> Self {
        init();
        let mut usage_dir = None;
        let usage_path = match &config.usage_log.path {
            Some(path) => path.clone(),
            None => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("usage.log");
                usage_dir = Some(dir);
                config.usage_log.path = Some(path.clone());
                path
            }
        };
        let running = keygate::server::start(config, options)
            .await
            .expect("gateway starts");
        let proxy = format!("http://{}", running.proxy_addr);
        let admin = format!("http://{}", running.admin_addr);
        Self {
            running: Some(running),
            proxy,
            admin,
            client: client(),
            usage: observe::UsageFile::new(&usage_path),
            _usage_dir: usage_dir,
        }
    }

    /// The proxy listener's address, for raw connections.
    pub fn proxy_addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().expect("gateway running").proxy_addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.proxy, path)
    }

    fn running_gateway(&self) -> &RunningGateway {
        self.running.as_ref().expect("gateway is running")
    }

    pub fn state(&self) -> &Arc<Gateway> {
        &self.running_gateway().gateway
    }

    /// Current usage of a counter, read from the gateway's own store without charging.
    /// `id` is a team name, a key id (for a key with its own limits) or `"upstream"`.
    pub async fn usage(&self, kind: SubjectKind, id: &str) -> SubjectUsage {
        let snapshot = self.state().snapshot();
        let subject = snapshot
            .keys
            .iter()
            .flat_map(|key| key.subjects.iter())
            .find(|s| s.kind == kind && &*s.id == id)
            .unwrap_or_else(|| panic!("no {kind:?} counter named {id:?}"))
            .clone();
        let usage = self
            .state()
            .store
            .usage(std::slice::from_ref(&subject))
            .await
            .expect("store answers");
        usage[0]
    }

    /// Polls a team's usage until its minute and day counts are `used` (a refund is applied
    /// off the request path, so no event marks it).
    pub async fn wait_team_used(&self, team: &str, used: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let usage = self.usage(SubjectKind::Team, team).await;
            if usage.minute.used == used && usage.day.used == used {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "team {team} still counts {usage:?}, wanted {used} in both windows"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `POST /v1/text-to-image` with a token and the seed's JSON body.
    pub async fn generate(&self, token: &str) -> reqwest::Response {
        generate_request(&self.client, &self.proxy, Some(token))
            .send()
            .await
            .expect("request reaches the gateway")
    }

    /// The generate request with the same body, of unknown length (chunked): keygate
    /// streams it through and never holds it.
    pub async fn generate_chunked(&self, token: &str) -> reqwest::Response {
        let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(
            bytes::Bytes::from_static(PROMPT_BODY.as_bytes()),
        )]);
        self.client
            .post(self.url("/v1/text-to-image"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .expect("request reaches the gateway")
    }

    /// `GET /readyz`: status code and JSON body.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let response = self
            .client
            .get(format!("{}/readyz", self.admin))
            .send()
            .await
            .expect("readyz answers");
        let status = response.status().as_u16();
        (status, json_body(response).await)
    }

    /// Polls `/readyz` until the quota store is reported in `state` (`ok` or `degraded`).
    pub async fn wait_store_state(&self, state: &str, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (_, body) = self.readyz().await;
            if body["store"]["state"] == state {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "store not {state} within {within:?}: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The gateway's view of the store: degraded state, errors, since when.
    pub fn store_health(&self) -> std::sync::Arc<keygate::quota::failover::StoreHealth> {
        self.running
            .as_ref()
            .expect("gateway running")
            .gateway
            .store_health
            .clone()
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// Threads of this process whose name starts with `prefix` (Linux: `/proc/self/task`).
pub fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task lists this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Waits up to 5 s for every thread whose name starts with `prefix` to end, and fails the
/// test otherwise. A thread's end has no event to await, so it is polled.
pub async fn threads_end(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads_named(prefix) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} threads named {prefix}* still run",
            threads_named(prefix)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The generate request, unsent: `POST {base_url}/v1/text-to-image` with
/// `Authorization: Bearer <token>` (none when `token` is `None`), `Content-Type:
/// application/json` and [`PROMPT_BODY`]. `base_url` is scheme and authority, e.g.
/// `http://127.0.0.1:8080`. Returned as a builder so a caller can add headers or a query,
/// or build it on a client of its own (HTTP/2, TLS).
pub fn generate_request(
    client: &reqwest::Client,
    base_url: &str,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    let request = client.post(format!("{base_url}/v1/text-to-image"));
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    request
        .header("content-type", "application/json")
        .body(PROMPT_BODY)
}

/// Sends `POST /v1/text-to-image` for every (gateway, token) pair at once and returns the
/// statuses in order.
pub async fn generate_all<'a>(
    requests: impl IntoIterator<Item = (&'a TestGateway, &'a str)>,
) -> Vec<u16> {
    futures_util::future::join_all(
        requests
            .into_iter()
            .map(|(gateway, token)| async move { gateway.generate(token).await.status().as_u16() }),
    )
    .await
}

/// `clients` clients of their own (so connections of their own: with shards, handed to the
/// shards in turn) each send `each` generate requests one after another at once with the
/// others, reading every answer whole. Returns every status, client by client.
pub async fn generate_from_own_clients(
    gateway: &TestGateway,
    clients: usize,
    each: usize,
) -> Vec<u16> {
    let clients = (0..clients).map(|_| {
        let (client, base_url) = (client(), gateway.proxy.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..each {
                let answer = generate_request(&client, &base_url, Some(TOKEN_DESIGN_GENERATE))
                    .send()
                    .await
                    .expect("the gateway answers");
                statuses.push(answer.status().as_u16());
                let body = answer.bytes().await.expect("the whole body");
                assert!(!body.is_empty());
            }
            statuses
        })
    });
    let mut statuses = Vec::new();
    for client in futures_util::future::join_all(clients).await {
        statuses.extend(client.expect("a client task ends"));
    }
    statuses
}

pub fn count_status(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// 300 concurrent requests of team `design` spread over `gateways` (sharing one store):
/// exactly `DESIGN_RPM` reach the upstream, the rest get the spec's 429 with quota headers.
pub async fn assert_fleet_admits_exactly_design_rpm(
    gateways: &[TestGateway],
    upstream: &MockUpstream,
) {
    let before = upstream.count();
    let requests = (0..300).map(|i| (&gateways[i % gateways.len()], TOKEN_DESIGN_GENERATE));
    let answers = generate_all(requests).await;
    let limit = DESIGN_RPM as usize;
    assert_eq!(count_status(&answers, 200), limit, "{answers:?}");
    assert_eq!(count_status(&answers, 429), 300 - limit, "{answers:?}");
    assert_eq!(upstream.count() - before, limit);
    let refused = gateways[gateways.len() - 1]
        .generate(TOKEN_DESIGN_GENERATE)
        .await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(
        refused.headers()["x-ratelimit-limit"],
        DESIGN_RPM.to_string()
    );
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.text().await.unwrap(), RATE_LIMITED_BODY);
}

pub const PROMPT_BODY: &str =
    r#"{"prompt":"A beautiful sunset over mountains","model":"imagen-v2"}"#;

pub fn client() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client builds")
}

/// Parses a JSON body, failing the test with the raw text when it is not JSON.
pub async fn json_body(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.expect("body reads");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Fails when a response's headers or body hold the real key or any internal token.
pub fn assert_no_secrets(headers: &reqwest::header::HeaderMap, body: &[u8]) {
    let text = format!("{headers:?}{}", String::from_utf8_lossy(body));
    for secret in ALL_SECRETS {
        assert!(
            !text.contains(secret),
            "a secret reached the client: {text}"
        );
    }
}

/// [`assert_no_secrets`] for a response read over raw TCP.
pub fn assert_raw_no_secrets(response: &raw::RawResponse) {
    let text = format!("{:?}{}", response.headers, response.body_text());
    for secret in ALL_SECRETS {
        assert!(
            !text.contains(secret),
            "a secret reached the client: {text}"
        );
    }
}

/// A response read whole: status, headers and body, checked for secrets on the way.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.expect("body reads");
        assert_no_secrets(&headers, body.as_bytes());
        Self {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }
}

pub const UNAUTHORIZED_BODY: &str =
    r#"{"error":{"code":"unauthorized","message":"Invalid API key"}}"#;
pub const FORBIDDEN_BODY: &str = r#"{"error":{"code":"forbidden","message":"API key does not have permission for this operation"}}"#;
pub const BAD_REQUEST_BODY: &str =
    r#"{"error":{"code":"bad_request","message":"Malformed request"}}"#;
pub const PAYLOAD_TOO_LARGE_BODY: &str =
    r#"{"error":{"code":"payload_too_large","message":"Request body too large"}}"#;
pub const RATE_LIMITED_BODY: &str = r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit exceeded. Please try again later."}}"#;
pub const BAD_GATEWAY_BODY: &str =
    r#"{"error":{"code":"bad_gateway","message":"Upstream service unreachable"}}"#;
pub const SERVICE_UNAVAILABLE_BODY: &str = r#"{"error":{"code":"service_unavailable","message":"Service temporarily unavailable. Please try again later."}}"#;
pub const REQUEST_TIMEOUT_BODY: &str =
    r#"{"error":{"code":"request_timeout","message":"Request body not received in time"}}"#;
pub const GATEWAY_TIMEOUT_BODY: &str =
    r#"{"error":{"code":"gateway_timeout","message":"Upstream service timed out"}}"#;

/// An address on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port_url() -> String {
    format!("http://127.0.0.1:{}", redis::free_port())
}
