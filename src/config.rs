//! Owns configuration: the raw TOML shape (SPEC §2, `deny_unknown_fields`), environment
//! overrides (`KEYGATE_<SECTION>__<KEY>`), and validation into a typed [`Config`] that
//! reports every problem at once, each naming the field and the offending value.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::quota::Limits;
use crate::routing::parse_route_match;
use crate::scope::{Scope, Scopes};
use crate::secret::Secret;

/// Where `serve` and `check` look when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/keygate.toml";

/// Limits accepted for any window (SPEC §4): a "no limit" plan is just a huge one.
pub const MIN_LIMIT: u64 = 1;
pub const MAX_LIMIT: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------
// Raw shape, exactly as written in the file.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    shutdown_grace: Option<String>,
    max_header_bytes: Option<u64>,
    max_body_bytes: Option<u64>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    body_min_rate: Option<u64>,
    idle_timeout: Option<String>,
    max_connections: Option<u64>,
    max_requests_in_flight: Option<u64>,
    http2_max_concurrent_streams: Option<u32>,
    worker_threads: Option<u64>,
    shards: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    ca_file: Option<PathBuf>,
    protocol: Option<String>,
    #[serde(default)]
    keys: BTreeMap<String, RawKeySource>,
    limits: Option<RawLimits>,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    circuit: RawCircuit,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    base: Option<String>,
    cap: Option<String>,
    budget: Option<String>,
    max_replay_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCircuit {
    enabled: Option<bool>,
    failures: Option<u32>,
    cooldown: Option<String>,
    probes: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeySource {
    env: Option<String>,
    file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    rpm: u64,
    rpd: u64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    on_error: Option<String>,
    timeout: Option<String>,
    expected_replicas: Option<u64>,
    local_slices: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    day_tz: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    name: String,
    plan: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    team: String,
    token_sha256: String,
    scopes: Vec<String>,
    env: String,
    expires: Option<String>,
    rpm: Option<u64>,
    rpd: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(rename = "match")]
    matches: String,
    scope: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    thresholds: Option<Vec<f64>>,
    #[serde(default)]
    webhooks: Vec<String>,
    max_attempts: Option<u32>,
    retry_backoff: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAnomalies {
    enabled: Option<bool>,
    warmup: Option<String>,
    rate_factor: Option<f64>,
    rate_min: Option<u64>,
    invalid_tokens_per_minute: Option<u64>,
    upstream_errors_per_minute: Option<u64>,
    dev_key_rpm: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUsageLog {
    path: Option<String>,
    redis_stream: Option<String>,
    stream_maxlen: Option<u64>,
}

const SECTIONS: &[&str] = &[
    "server",
    "upstream",
    "store",
    "quotas",
    "plans",
    "teams",
    "keys",
    "routes",
    "alerts",
    "anomalies",
    "usage_log",
];

// ---------------------------------------------------------------------------------------
// Validated, typed configuration.

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub day_tz: TimeZone,
    pub day_tz_name: String,
    pub plans: BTreeMap<String, Limits>,
    pub teams: Vec<TeamConfig>,
    pub keys: Vec<KeyConfig>,
    pub routes: Vec<RouteConfig>,
    pub alerts: AlertsConfig,
    pub anomalies: AnomalyConfig,
    pub usage_log: UsageLogConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown_grace: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    /// Longest pause between two pieces of a request body (slow-body attacks): 408.
    pub body_read_timeout: Duration,
    /// Bytes per second a request body must average over the time keygate waited on the
    /// client for it, once that time passes `body_read_timeout` (trickle attacks that stay
    /// just under the pause limit): 408. 0 turns it off.
    pub body_min_rate: u64,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Proxied requests served at once, HTTP/2 streams included (a connection can carry
    /// `http2_max_concurrent_streams` of them): what bounds memory under a burst. More
    /// get 503 at once. Defaults to `max_connections`.
    pub max_requests_in_flight: usize,
    pub http2_max_concurrent_streams: u32,
    /// Threads that serve requests; `None`: one per CPU this process may use (its cgroup's
    /// quota included). One suits a sidecar: no hand-offs between threads (PERFORMANCE.md).
    pub worker_threads: Option<usize>,
    /// Threads that each run their own event loop for proxy connections (thread per core):
    /// a connection and everything its requests start stay on one thread. `None`: proxy
    /// connections share the work-stealing runtime of `worker_threads`.
    pub shards: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Origin only: scheme, host and port. Every proxied request goes here.
    pub url: http::Uri,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub protocol: UpstreamProtocol,
    /// The real keys per environment (`prod`, `dev`, …).
    pub keys: BTreeMap<String, KeySource>,
    /// The upstream key's own plan, over all teams and replicas.
    pub limits: Option<Limits>,
    pub retry: RetryPolicy,
    pub circuit: CircuitPolicy,
}

/// `[upstream.retry]`: how the upstream's 429 / 503 and failed connects are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included: 1 turns retries off.
    pub attempts: u32,
    /// Backoff before retry n is a random wait in [0, min(cap, base × 2^(n-1))].
    pub base: Duration,
    pub cap: Duration,
    /// No retry starts once this much time has passed since the first try, and no wait
    /// (a Retry-After included) may end past it.
    pub budget: Duration,
    /// Bodies up to this size (known from Content-Length) are held so they can be sent
    /// again; larger or chunked bodies stream once and are never retried.
    pub max_replay_bytes: u64,
}

impl Default for RetryPolicy {
    /// Image generation takes seconds per call and the upstream asks for backoff on 429:
    /// two retries, waits from a few hundred ms up to 8 s, never more than 20 s in all.
    fn default() -> Self {
        Self {
            attempts: 3,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            budget: Duration::from_secs(20),
            max_replay_bytes: 1024 * 1024,
        }
    }
}

/// `[upstream.circuit]`: when to stop sending requests to a failing upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitPolicy {
    pub enabled: bool,
    /// Consecutive failed upstream calls (connect errors, timeouts, 5xx) that open it.
    pub failures: u32,
    /// How long it stays open, answering 503 at once.
    pub cooldown: Duration,
    /// Calls let through at once to probe an upstream after the cool-down.
    pub probes: u32,
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            failures: 10,
            cooldown: Duration::from_secs(10),
            probes: 1,
        }
    }
}

/// Where a real upstream key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    /// A file holding one key per line; several lines are used in turn.
    File(PathBuf),
    /// Given directly by code (the demo, tests); never from a config file.
    Inline(Vec<Secret>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Memory,
    Redis(String),
    Cluster(Vec<String>),
}

/// `upstream.protocol`: what keygate speaks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default): a connection per request in flight, kept alive between them.
    #[default]
    Http1,
    /// HTTP/2, agreed by ALPN over TLS or with prior knowledge over `http://` (h2c): the
    /// requests in flight share connections, a stream each (`upstream_h2`).
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    Local,
    Open,
    Closed,
}

impl OnStoreError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Local => "local",
            OnStoreError::Open => "open",
            OnStoreError::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: StoreUrl,
    pub on_error: OnStoreError,
    pub timeout: Duration,
    pub expected_replicas: u64,
    /// Take room from Redis ahead of requests, for the rest of a second (`quota::slices`).
    pub local_slices: bool,
}

#[derive(Debug, Clone)]
pub struct TeamConfig {
    pub name: String,
    pub plan: String,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub id: String,
    pub team: String,
    pub token_sha256: [u8; 32],
    pub scopes: Scopes,
    pub env: String,
    pub expires: Option<Timestamp>,
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub method: Option<Method>,
    pub prefix: String,
    pub scope: Scope,
    pub label: String,
}

#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub thresholds: Vec<f64>,
    /// Receivers of every alert. A URL may hold a secret (Slack's do): only its host is
    /// ever logged.
    pub webhooks: Vec<http::Uri>,
    /// Tries per alert and webhook, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled each time (with jitter) up to 30 s.
    pub retry_backoff: Duration,
    /// Bound on one delivery attempt.
    pub timeout: Duration,
}

/// Anomaly detection, live and offline (`keygate usage anomalies`).
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    /// Live detection and the invalid-token throttle; the offline command always runs.
    pub enabled: bool,
    /// A key's history must be this long before its rate or a new address is judged.
    pub warmup: Duration,
    /// A key's minute is a spike at `rate_factor` × its baseline…
    pub rate_factor: f64,
    /// …and at least this many requests.
    pub rate_min: u64,
    /// Invalid tokens from one address in a minute that raise an alert; from then on the
    /// address answers 429 until the minute ends.
    pub invalid_tokens_per_minute: u64,
    /// Upstream failures in a minute that raise an alert.
    pub upstream_errors_per_minute: u64,
    /// A `dev` key at this many requests a minute is used like a production key.
    pub dev_key_rpm: u64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            warmup: Duration::from_secs(30 * 60),
            rate_factor: 5.0,
            rate_min: 30,
            invalid_tokens_per_minute: 20,
            upstream_errors_per_minute: 20,
            dev_key_rpm: 60,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageLogConfig {
    /// `None` is stdout (`path = "-"`).
    pub path: Option<PathBuf>,
    pub redis_stream: Option<String>,
    /// Approximate length the stream is trimmed to (`XADD … MAXLEN ~`).
    pub stream_maxlen: u64,
}

// ---------------------------------------------------------------------------------------
// Errors.

/// Every problem found in a config, each naming the field and the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} problem{}",
            self.source,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, field: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(format!("{field}: {message}"));
    }
}

// ---------------------------------------------------------------------------------------
// Loading.

impl Config {
    /// Loads a TOML file with `KEYGATE_*` environment overrides from the process.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_checked(path, |_| Vec::new())
    }

    /// Like [`Config::load`], plus the problems `more` finds in the validated config. `more`
    /// also runs on a config that has other problems, so they are all reported at once.
    pub fn load_checked(
        path: &Path,
        more: impl FnOnce(&Config) -> Vec<String>,
    ) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("KEYGATE_") && k.contains("__"))
            .collect();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: path.display().to_string(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Self::parse(&text, &path.display().to_string(), env, path.parent(), more)
    }

    /// Parses TOML text alone: no environment, relative paths against the working directory.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(text, "config", HashMap::new(), None)
    }

    /// Parses TOML text with the given `KEYGATE_*` overrides. Relative file paths in the
    /// config are resolved against `base_dir` (the config file's folder) when given.
    pub fn from_toml_with_env(
        text: &str,
        source_name: &str,
        env: HashMap<String, String>,
        base_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        Self::parse(text, source_name, env, base_dir, |_| Vec::new())
    }

    fn parse(
        text: &str,
        source_name: &str,
        env: HashMap<String, String>,
        base_dir: Option<&Path>,
        more: impl FnOnce(&Config) -> Vec<String>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source: source_name.to_string(),
            problems,
        };
        let environment = config::Environment::with_prefix("KEYGATE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("server.trusted_proxies")
            .with_list_parse_key("alerts.webhooks")
            .with_list_parse_key("alerts.thresholds")
            .source(Some(env));
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .map_err(|e| fail(vec![e.to_string()]))?;
        let top: HashMap<String, config::Value> = merged
            .clone()
            .try_deserialize()
            .map_err(|e| fail(vec![e.to_string()]))?;

        let mut problems = Problems::default();
        let mut unknown: Vec<&String> = top
            .keys()
            .filter(|k| !SECTIONS.contains(&k.as_str()))
            .collect();
        unknown.sort();
        for key in unknown {
            problems.add(
                key,
                format!("unknown section (known: {})", SECTIONS.join(", ")),
            );
        }

        let raw = RawConfig {
            server: section(&top, "server", &mut problems),
            upstream: section(&top, "upstream", &mut problems),
            store: section(&top, "store", &mut problems),
            quotas: section(&top, "quotas", &mut problems),
            plans: plans(&top, &mut problems),
            teams: array(&top, "teams", &mut problems),
            keys: array(&top, "keys", &mut problems),
            routes: array(&top, "routes", &mut problems),
            alerts: section(&top, "alerts", &mut problems),
            anomalies: section(&top, "anomalies", &mut problems),
            usage_log: section(&top, "usage_log", &mut problems),
        };
        let config = validate(raw, base_dir, &mut problems);
        problems.0.extend(more(&config));
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems.0))
        }
    }

    pub fn team(&self, name: &str) -> Option<&TeamConfig> {
        self.teams.iter().find(|t| t.name == name)
    }
}

struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    store: RawStore,
    quotas: RawQuotas,
    plans: BTreeMap<String, Option<RawLimits>>,
    teams: Vec<Option<RawTeam>>,
    keys: Vec<Option<RawKey>>,
    routes: Vec<Option<RawRoute>>,
    alerts: RawAlerts,
    anomalies: RawAnomalies,
    usage_log: RawUsageLog,
}

fn clean_serde_error(e: config::ConfigError) -> String {
    e.to_string()
}

/// Deserializes one table section; a missing one is its default. Errors are recorded and
/// the default used, so the other sections are still checked.
fn section<T: DeserializeOwned + Default>(
    top: &HashMap<String, config::Value>,
    name: &str,
    problems: &mut Problems,
) -> T {
    match top.get(name) {
        None => T::default(),
        Some(value) => value.clone().try_deserialize().unwrap_or_else(|e| {
            problems.add(format!("[{name}]"), clean_serde_error(e));
            T::default()
        }),
    }
}

/// Deserializes an array of tables element by element, so every bad element is reported.
fn array<T: DeserializeOwned>(
    top: &HashMap<String, config::Value>,
    name: &str,
    problems: &mut Problems,
) -> Vec<Option<T>> {
    let Some(value) = top.get(name) else {
        return Vec::new();
    };
    let items: Vec<config::Value> = match value.clone().into_array() {
        Ok(items) => items,
        Err(e) => {
            problems.add(
                name,
                format!("must be an array of tables ([[{name}]]): {e}"),
            );
            return Vec::new();
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item.try_deserialize() {
            Ok(v) => Some(v),
            Err(e) => {
                problems.add(format!("{name}[{i}]"), clean_serde_error(e));
                None
            }
        })
        .collect()
}

fn plans(
    top: &HashMap<String, config::Value>,
    problems: &mut Problems,
) -> BTreeMap<String, Option<RawLimits>> {
    let Some(value) = top.get("plans") else {
        return BTreeMap::new();
    };
    let table = match value.clone().into_table() {
        Ok(table) => table,
        Err(e) => {
            problems.add(
                "plans",
                format!("must be a table of name = {{ rpm, rpd }}: {e}"),
            );
            return BTreeMap::new();
        }
    };
    table
        .into_iter()
        .map(|(name, v)| {
            let parsed = v
                .try_deserialize::<RawLimits>()
                .map_err(|e| problems.add(format!("plans.{name}"), clean_serde_error(e)))
                .ok();
            (name, parsed)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Validation.

/// Parses a duration such as `"30s"`, `"50ms"`, `"24h"` or `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let signed: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. \"50ms\", \"30s\", \"24h\")"))?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} must not be negative"))
}

/// A count that must be at least 1 (the default when unset); 0 is a problem, and 1 stands in
/// for it so validation goes on.
fn at_least_one<T: Copy + Ord + From<u8>>(
    value: Option<T>,
    default: T,
    field: &str,
    problems: &mut Problems,
) -> T {
    let value = value.unwrap_or(default);
    if value == T::from(0) {
        problems.add(field, "must be at least 1");
    }
    value.max(T::from(1))
}

fn duration_field(
    value: Option<&str>,
    default: Duration,
    field: &str,
    problems: &mut Problems,
) -> Duration {
    match value {
        None => default,
        Some(text) => match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                problems.add(field, format!("{text:?} must be longer than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                problems.add(field, e);
                default
            }
        },
    }
}

fn socket_field(
    value: Option<&str>,
    default: &str,
    field: &str,
    problems: &mut Problems,
) -> SocketAddr {
    let text = value.unwrap_or(default);
    text.parse().unwrap_or_else(|_| {
        problems.add(
            field,
            format!("{text:?} is not an address like \"127.0.0.1:8080\""),
        );
        default.parse().expect("default address parses")
    })
}

fn limit_field(value: u64, field: &str, problems: &mut Problems) -> u64 {
    if !(MIN_LIMIT..=MAX_LIMIT).contains(&value) {
        problems.add(
            field,
            format!("{value} is out of range ({MIN_LIMIT} to {MAX_LIMIT})"),
        );
    }
    value
}

fn resolve(base_dir: Option<&Path>, path: &Path) -> PathBuf {
    match base_dir {
        Some(dir) if path.is_relative() && !dir.as_os_str().is_empty() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

fn existing_file(
    base_dir: Option<&Path>,
    path: &Path,
    field: &str,
    problems: &mut Problems,
) -> PathBuf {
    let resolved = resolve(base_dir, path);
    if !resolved.is_file() {
        problems.add(
            field,
            format!(
                "{:?} is not a readable file",
                resolved.display().to_string()
            ),
        );
    }
    resolved
}

fn validate(raw: RawConfig, base_dir: Option<&Path>, problems: &mut Problems) -> Config {
    let server = validate_server(raw.server, base_dir, problems);
    let upstream = validate_upstream(raw.upstream, base_dir, problems);
    let store = validate_store(raw.store, problems);

    let day_tz_name = raw.quotas.day_tz.unwrap_or_else(|| "UTC".to_string());
    let day_tz = TimeZone::get(&day_tz_name).unwrap_or_else(|_| {
        problems.add(
            "quotas.day_tz",
            format!("{day_tz_name:?} is not a known time zone (e.g. \"UTC\", \"Europe/Berlin\")"),
        );
        TimeZone::UTC
    });

    let mut plans = BTreeMap::new();
    for (name, limits) in raw.plans {
        if let Some(limits) = limits {
            let field = format!("plans.{name}");
            let rpm = limit_field(limits.rpm, &format!("{field}.rpm"), problems);
            let rpd = limit_field(limits.rpd, &format!("{field}.rpd"), problems);
            plans.insert(name, Limits { rpm, rpd });
        }
    }

    let mut teams: Vec<TeamConfig> = Vec::new();
    for (i, team) in raw.teams.into_iter().enumerate() {
        let Some(team) = team else { continue };
        let field = format!("teams[{i}]");
        if team.name.trim().is_empty() {
            problems.add(format!("{field}.name"), "must not be empty");
        }
        if teams.iter().any(|t| t.name == team.name) {
            problems.add(
                format!("{field}.name"),
                format!("duplicate team {:?}", team.name),
            );
        }
        let limits = match plans.get(&team.plan) {
            Some(limits) => *limits,
            None => {
                problems.add(
                    format!("{field}.plan"),
                    format!(
                        "unknown plan {:?} (known: {})",
                        team.plan,
                        plans.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
                Limits { rpm: 1, rpd: 1 }
            }
        };
        teams.push(TeamConfig {
            name: team.name,
            plan: team.plan,
            limits,
        });
    }

    let mut keys: Vec<KeyConfig> = Vec::new();
    let mut hashes: HashSet<[u8; 32]> = HashSet::new();
    for (i, key) in raw.keys.into_iter().enumerate() {
        let Some(key) = key else { continue };
        let field = format!("keys[{i}]");
        if key.id.trim().is_empty() {
            problems.add(format!("{field}.id"), "must not be empty");
        }
        if keys.iter().any(|k| k.id == key.id) {
            problems.add(
                format!("{field}.id"),
                format!("duplicate key id {:?}", key.id),
            );
        }
        if !teams.iter().any(|t| t.name == key.team) {
            problems.add(
                format!("{field}.team"),
                format!("unknown team {:?}", key.team),
            );
        }
        let token_sha256 = match parse_sha256_hex(&key.token_sha256) {
            Some(hash) => {
                if !hashes.insert(hash) {
                    problems.add(
                        format!("{field}.token_sha256"),
                        "the same hash is used by another key",
                    );
                }
                hash
            }
            None => {
                problems.add(
                    format!("{field}.token_sha256"),
                    format!(
                        "{:?} is not 64 hex digits (use `keygate token hash`)",
                        key.token_sha256
                    ),
                );
                [0; 32]
            }
        };
        let mut scopes = Scopes::default();
        for name in &key.scopes {
            match Scope::parse(name) {
                Some(scope) => scopes.insert(scope),
                None => problems.add(
                    format!("{field}.scopes"),
                    format!("unknown scope {name:?} (known: read, generate, admin)"),
                ),
            }
        }
        if key.scopes.is_empty() {
            problems.add(format!("{field}.scopes"), "must name at least one scope");
        }
        if !upstream.keys.contains_key(&key.env) {
            problems.add(
                format!("{field}.env"),
                format!(
                    "unknown env {:?} (upstream.keys has: {})",
                    key.env,
                    upstream.keys.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        let expires = key.expires.as_deref().and_then(|text| {
            text.parse::<Timestamp>()
                .map_err(|_| {
                    problems.add(
                        format!("{field}.expires"),
                        format!("{text:?} is not an RFC 3339 time like \"2027-06-01T00:00:00Z\""),
                    )
                })
                .ok()
        });
        let rpm = key
            .rpm
            .map(|v| limit_field(v, &format!("{field}.rpm"), problems));
        let rpd = key
            .rpd
            .map(|v| limit_field(v, &format!("{field}.rpd"), problems));
        keys.push(KeyConfig {
            id: key.id,
            team: key.team,
            token_sha256,
            scopes,
            env: key.env,
            expires,
            rpm,
            rpd,
        });
    }

    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, route) in raw.routes.into_iter().enumerate() {
        let Some(route) = route else { continue };
        let field = format!("routes[{i}]");
        let scope = Scope::parse(&route.scope).unwrap_or_else(|| {
            problems.add(
                format!("{field}.scope"),
                format!(
                    "unknown scope {:?} (known: read, generate, admin)",
                    route.scope
                ),
            );
            Scope::Admin
        });
        match parse_route_match(&route.matches) {
            Ok((method, prefix)) => {
                // Prefixes match regardless of ASCII case, so `/V1/x` duplicates `/v1/x`.
                if routes
                    .iter()
                    .any(|r| r.method == method && r.prefix.eq_ignore_ascii_case(&prefix))
                {
                    problems.add(
                        format!("{field}.match"),
                        format!("duplicate route {:?}", route.matches),
                    );
                }
                routes.push(RouteConfig {
                    method,
                    prefix,
                    scope,
                    label: route.matches,
                });
            }
            Err(e) => problems.add(format!("{field}.match"), e),
        }
    }

    let alerts = validate_alerts(raw.alerts, problems);
    let anomalies = validate_anomalies(raw.anomalies, problems);
    if raw
        .usage_log
        .redis_stream
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        problems.add("usage_log.redis_stream", "must name a stream key");
    }
    if raw.usage_log.redis_stream.is_some() && store.url == StoreUrl::Memory {
        problems.add(
            "usage_log.redis_stream",
            "needs a Redis store (store.url = \"redis://…\"): the stream lives there",
        );
    }
    let stream_maxlen = at_least_one(
        raw.usage_log.stream_maxlen,
        1_000_000,
        "usage_log.stream_maxlen",
        problems,
    );
    let usage_log = UsageLogConfig {
        path: match raw.usage_log.path.as_deref() {
            None | Some("-") => None,
            Some("") => {
                problems.add("usage_log.path", "must be \"-\" (stdout) or a file path");
                None
            }
            Some(p) => Some(resolve(base_dir, Path::new(p))),
        },
        redis_stream: raw.usage_log.redis_stream,
        stream_maxlen,
    };

    Config {
        server,
        upstream,
        store,
        day_tz,
        day_tz_name,
        plans,
        teams,
        keys,
        routes,
        alerts,
        anomalies,
        usage_log,
    }
}

fn validate_server(
    raw: RawServer,
    base_dir: Option<&Path>,
    problems: &mut Problems,
) -> ServerConfig {
    let listen = socket_field(
        raw.listen.as_deref(),
        "127.0.0.1:8080",
        "server.listen",
        problems,
    );
    let admin_listen = socket_field(
        raw.admin_listen.as_deref(),
        "127.0.0.1:9090",
        "server.admin_listen",
        problems,
    );
    if listen == admin_listen && listen.port() != 0 {
        problems.add(
            "server.admin_listen",
            format!("{admin_listen} is also server.listen"),
        );
    }
    let tls = match (raw.tls_cert, raw.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: existing_file(base_dir, &cert, "server.tls_cert", problems),
            key: existing_file(base_dir, &key, "server.tls_key", problems),
        }),
        (Some(_), None) => {
            problems.add("server.tls_key", "missing: tls_cert needs tls_key");
            None
        }
        (None, Some(_)) => {
            problems.add("server.tls_cert", "missing: tls_key needs tls_cert");
            None
        }
    };
    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .filter_map(|text| {
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            parsed
                .map_err(|_| {
                    problems.add(
                        "server.trusted_proxies",
                        format!("{text:?} is not a CIDR like \"10.0.0.0/8\" or an address"),
                    )
                })
                .ok()
        })
        .collect();
    let max_header_bytes = raw.max_header_bytes.unwrap_or(16 * 1024);
    // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
    if !(8192..=1024 * 1024).contains(&max_header_bytes) {
        problems.add(
            "server.max_header_bytes",
            format!("{max_header_bytes} is out of range (8192 to 1048576)"),
        );
    }
    let max_connections = count_up_to(
        raw.max_connections.unwrap_or(8192),
        MAX_CAPACITY,
        "server.max_connections",
        problems,
    );
    let max_requests_in_flight = count_up_to(
        raw.max_requests_in_flight.unwrap_or(max_connections as u64),
        MAX_CAPACITY,
        "server.max_requests_in_flight",
        problems,
    );
    let streams = at_least_one(
        raw.http2_max_concurrent_streams,
        256,
        "server.http2_max_concurrent_streams",
        problems,
    );
    let worker_threads = raw
        .worker_threads
        .map(|n| count_up_to(n, MAX_THREADS, "server.worker_threads", problems));
    let shards = raw
        .shards
        .map(|n| count_up_to(n, MAX_THREADS, "server.shards", problems));
    ServerConfig {
        listen,
        admin_listen,
        tls,
        trusted_proxies,
        shutdown_grace: duration_field(
            raw.shutdown_grace.as_deref(),
            Duration::from_secs(30),
            "server.shutdown_grace",
            problems,
        ),
        max_header_bytes: max_header_bytes as usize,
        // Image prompts are small, but image-to-image uploads are not.
        max_body_bytes: raw.max_body_bytes.unwrap_or(32 * 1024 * 1024),
        header_read_timeout: duration_field(
            raw.header_read_timeout.as_deref(),
            Duration::from_secs(10),
            "server.header_read_timeout",
            problems,
        ),
        body_read_timeout: duration_field(
            raw.body_read_timeout.as_deref(),
            Duration::from_secs(30),
            "server.body_read_timeout",
            problems,
        ),
        // Slow mobile uplinks manage tens of KiB/s; a trickle sends a byte now and then.
        body_min_rate: raw.body_min_rate.unwrap_or(1024),
        // Longer than the 60 s idle timeout of common load balancers, so they close an idle
        // connection first and never reuse one keygate has just closed.
        idle_timeout: duration_field(
            raw.idle_timeout.as_deref(),
            Duration::from_secs(75),
            "server.idle_timeout",
            problems,
        ),
        max_connections,
        max_requests_in_flight,
        http2_max_concurrent_streams: streams,
        worker_threads,
        shards,
    }
}

/// More connections or requests at once than this is a typo, not a machine.
const MAX_CAPACITY: u64 = 10_000_000;
/// More threads than this is a typo, not a machine.
const MAX_THREADS: u64 = 1024;

/// A count in `1..=max`; out of it, a problem and the nearest count in it.
fn count_up_to(n: u64, max: u64, field: &str, problems: &mut Problems) -> usize {
    if !(1..=max).contains(&n) {
        problems.add(field, format!("{n} is not in 1..={max}"));
    }
    n.clamp(1, max) as usize
}

fn validate_upstream(
    raw: RawUpstream,
    base_dir: Option<&Path>,
    problems: &mut Problems,
) -> UpstreamConfig {
    let fallback: http::Uri = http::Uri::from_static("https://upstream.invalid");
    let url = match raw.url.as_deref() {
        None => {
            problems.add("upstream.url", "missing (e.g. \"https://api.imagen.ai\")");
            fallback
        }
        Some(text) => match parse_origin(text) {
            Ok(uri) => uri,
            Err(e) => {
                problems.add("upstream.url", format!("{text:?} {e}"));
                fallback
            }
        },
    };
    let mut keys = BTreeMap::new();
    if raw.keys.is_empty() {
        problems.add(
            "upstream.keys",
            "at least one env is needed, e.g. [upstream.keys.prod] env = \"IMAGEN_API_KEY\"",
        );
    }
    for (env, source) in raw.keys {
        let field = format!("upstream.keys.{env}");
        match (source.env, source.file) {
            (Some(var), None) if !var.is_empty() => {
                keys.insert(env, KeySource::Env(var));
            }
            (None, Some(file)) => {
                keys.insert(env, KeySource::File(resolve(base_dir, &file)));
            }
            (Some(_), Some(_)) => problems.add(field, "set either env or file, not both"),
            _ => problems.add(field, "set env = \"VAR\" or file = \"/path\""),
        }
    }
    let protocol = match raw.protocol.as_deref().unwrap_or("http1") {
        "http1" => UpstreamProtocol::Http1,
        "http2" => UpstreamProtocol::Http2,
        other => {
            problems.add(
                "upstream.protocol",
                format!("{other:?} is not http1 or http2"),
            );
            UpstreamProtocol::Http1
        }
    };
    let limits = raw.limits.map(|l| Limits {
        rpm: limit_field(l.rpm, "upstream.limits.rpm", problems),
        rpd: limit_field(l.rpd, "upstream.limits.rpd", problems),
    });
    UpstreamConfig {
        url,
        timeout: duration_field(
            raw.timeout.as_deref(),
            Duration::from_secs(120),
            "upstream.timeout",
            problems,
        ),
        connect_timeout: duration_field(
            raw.connect_timeout.as_deref(),
            Duration::from_secs(5),
            "upstream.connect_timeout",
            problems,
        ),
        ca_file: raw
            .ca_file
            .map(|p| existing_file(base_dir, &p, "upstream.ca_file", problems)),
        protocol,
        keys,
        limits,
        retry: validate_retry(raw.retry, problems),
        circuit: validate_circuit(raw.circuit, problems),
    }
}

fn validate_retry(raw: RawRetry, problems: &mut Problems) -> RetryPolicy {
    let defaults = RetryPolicy::default();
    let attempts = raw.attempts.unwrap_or(defaults.attempts);
    if !(1..=10).contains(&attempts) {
        problems.add(
            "upstream.retry.attempts",
            format!("{attempts} is out of range (1 to 10; 1 turns retries off)"),
        );
    }
    let base = duration_field(
        raw.base.as_deref(),
        defaults.base,
        "upstream.retry.base",
        problems,
    );
    let cap = duration_field(
        raw.cap.as_deref(),
        defaults.cap,
        "upstream.retry.cap",
        problems,
    );
    if cap < base {
        problems.add(
            "upstream.retry.cap",
            format!("{cap:?} is shorter than upstream.retry.base ({base:?})"),
        );
    }
    let budget = duration_field(
        raw.budget.as_deref(),
        defaults.budget,
        "upstream.retry.budget",
        problems,
    );
    let max_replay_bytes = raw.max_replay_bytes.unwrap_or(defaults.max_replay_bytes);
    if max_replay_bytes > 64 * 1024 * 1024 {
        problems.add(
            "upstream.retry.max_replay_bytes",
            format!("{max_replay_bytes} is out of range (0 to 67108864): each held body stays in memory"),
        );
    }
    RetryPolicy {
        attempts: attempts.clamp(1, 10),
        base,
        cap,
        budget,
        max_replay_bytes,
    }
}

fn validate_circuit(raw: RawCircuit, problems: &mut Problems) -> CircuitPolicy {
    let defaults = CircuitPolicy::default();
    CircuitPolicy {
        enabled: raw.enabled.unwrap_or(defaults.enabled),
        failures: at_least_one(
            raw.failures,
            defaults.failures,
            "upstream.circuit.failures",
            problems,
        ),
        cooldown: duration_field(
            raw.cooldown.as_deref(),
            defaults.cooldown,
            "upstream.circuit.cooldown",
            problems,
        ),
        probes: at_least_one(
            raw.probes,
            defaults.probes,
            "upstream.circuit.probes",
            problems,
        ),
    }
}

/// Accepts `http(s)://host[:port]` with an empty or `/` path and nothing else.
pub fn parse_origin(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text.parse().map_err(|_| "is not a URL".to_string())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err("must not carry credentials".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("must be an origin only (no path or query)".into());
    }
    http::Uri::builder()
        .scheme(uri.scheme_str().unwrap_or("https"))
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| e.to_string())
}

fn validate_store(raw: RawStore, problems: &mut Problems) -> StoreConfig {
    let url_text = raw.url.unwrap_or_else(|| "memory://".to_string());
    let url = if url_text == "memory://" {
        StoreUrl::Memory
    } else if let Some(nodes) = url_text.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| format!("redis://{n}"))
            .collect();
        if nodes.is_empty() {
            problems.add("store.url", format!("{url_text:?} names no cluster node"));
        }
        StoreUrl::Cluster(nodes)
    } else if url_text.starts_with("redis://") || url_text.starts_with("rediss://") {
        StoreUrl::Redis(url_text.clone())
    } else {
        problems.add(
            "store.url",
            format!("{url_text:?} is not memory://, redis://, rediss:// or redis+cluster://"),
        );
        StoreUrl::Memory
    };
    let on_error = match raw.on_error.as_deref().unwrap_or("local") {
        "local" => OnStoreError::Local,
        "open" => OnStoreError::Open,
        "closed" => OnStoreError::Closed,
        other => {
            problems.add(
                "store.on_error",
                format!("{other:?} is not local, open or closed"),
            );
            OnStoreError::Local
        }
    };
    let expected_replicas = at_least_one(
        raw.expected_replicas,
        1,
        "store.expected_replicas",
        problems,
    );
    let local_slices = raw.local_slices.unwrap_or(false);
    if local_slices && url == StoreUrl::Memory {
        problems.add(
            "store.local_slices",
            "true needs a shared store (redis:// or redis+cluster://): memory:// already decides in process".to_string(),
        );
    }
    StoreConfig {
        url,
        on_error,
        timeout: duration_field(
            raw.timeout.as_deref(),
            Duration::from_millis(50),
            "store.timeout",
            problems,
        ),
        expected_replicas,
        local_slices,
    }
}

fn validate_alerts(raw: RawAlerts, problems: &mut Problems) -> AlertsConfig {
    let thresholds = raw.thresholds.unwrap_or_else(|| vec![0.8, 0.95, 1.0]);
    for t in &thresholds {
        if !(*t > 0.0 && *t <= 1.0) {
            problems.add("alerts.thresholds", format!("{t} is not in (0, 1]"));
        }
    }
    let mut sorted = thresholds.clone();
    sorted.sort_by(f64::total_cmp);
    sorted.dedup();
    let webhooks = raw
        .webhooks
        .iter()
        .filter_map(|text| match text.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http") | Some("https"))
                    && uri.host().is_some() =>
            {
                Some(uri)
            }
            _ => {
                problems.add("alerts.webhooks", format!("{text:?} is not an http(s) URL"));
                None
            }
        })
        .collect();
    let max_attempts = raw.max_attempts.unwrap_or(5);
    if !(1..=20).contains(&max_attempts) {
        problems.add(
            "alerts.max_attempts",
            format!("{max_attempts} is out of range (1 to 20)"),
        );
    }
    AlertsConfig {
        thresholds: sorted,
        webhooks,
        max_attempts: max_attempts.clamp(1, 20),
        retry_backoff: duration_field(
            raw.retry_backoff.as_deref(),
            Duration::from_millis(500),
            "alerts.retry_backoff",
            problems,
        ),
        timeout: duration_field(
            raw.timeout.as_deref(),
            Duration::from_secs(5),
            "alerts.timeout",
            problems,
        ),
    }
}

fn validate_anomalies(raw: RawAnomalies, problems: &mut Problems) -> AnomalyConfig {
    let defaults = AnomalyConfig::default();
    let rate_factor = raw.rate_factor.unwrap_or(defaults.rate_factor);
    if !(rate_factor.is_finite() && rate_factor > 1.0) {
        problems.add(
            "anomalies.rate_factor",
            format!("{rate_factor} must be greater than 1"),
        );
    }
    let rate_min = at_least_one(
        raw.rate_min,
        defaults.rate_min,
        "anomalies.rate_min",
        problems,
    );
    let invalid_tokens_per_minute = at_least_one(
        raw.invalid_tokens_per_minute,
        defaults.invalid_tokens_per_minute,
        "anomalies.invalid_tokens_per_minute",
        problems,
    );
    let upstream_errors_per_minute = at_least_one(
        raw.upstream_errors_per_minute,
        defaults.upstream_errors_per_minute,
        "anomalies.upstream_errors_per_minute",
        problems,
    );
    let dev_key_rpm = at_least_one(
        raw.dev_key_rpm,
        defaults.dev_key_rpm,
        "anomalies.dev_key_rpm",
        problems,
    );
    let warmup = match raw.warmup.as_deref() {
        None => defaults.warmup,
        Some(text) => parse_duration(text).unwrap_or_else(|e| {
            problems.add("anomalies.warmup", e);
            defaults.warmup
        }),
    };
    AnomalyConfig {
        enabled: raw.enabled.unwrap_or(true),
        warmup,
        rate_factor: if rate_factor.is_finite() && rate_factor > 1.0 {
            rate_factor
        } else {
            defaults.rate_factor
        },
        rate_min,
        invalid_tokens_per_minute,
        upstream_errors_per_minute,
        dev_key_rpm,
    }
}

pub fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b";

    fn minimal() -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:1"
[upstream]
url = "https://api.imagen.ai"
[upstream.keys.prod]
env = "IMAGEN_API_KEY"
[plans]
pro = {{ rpm = 100, rpd = 10000 }}
[[teams]]
name = "design"
plan = "pro"
[[keys]]
id = "design-1"
team = "design"
token_sha256 = "{HASH}"
scopes = ["generate", "read"]
env = "prod"
[[routes]]
match = "POST /v1/text-to-image"
scope = "generate"
"#
        )
    }

    #[test]
    fn minimal_config_validates() {
        let config = Config::from_toml(&minimal()).unwrap();
        assert_eq!(
            config.teams[0].limits,
            Limits {
                rpm: 100,
                rpd: 10000
            }
        );
        assert_eq!(config.store.url, StoreUrl::Memory);
        assert_eq!(config.store.timeout, Duration::from_millis(50));
        assert_eq!(config.upstream.url.to_string(), "https://api.imagen.ai/");
        assert!(config.keys[0].scopes.contains(Scope::Generate));
    }

    #[test]
    fn local_slices_need_a_shared_store() {
        let config = Config::from_toml(&minimal()).unwrap();
        assert!(!config.store.local_slices, "off by default");
        let err = Config::from_toml(&(minimal() + "\n[store]\nlocal_slices = true\n")).unwrap_err();
        assert_eq!(
            err.problems,
            ["store.local_slices: true needs a shared store (redis:// or redis+cluster://): memory:// already decides in process"]
        );
        let shared = minimal() + "\n[store]\nurl = \"redis://127.0.0.1:1\"\nlocal_slices = true\n";
        assert!(Config::from_toml(&shared).unwrap().store.local_slices);
    }

    #[test]
    fn the_upstream_protocol_is_http1_unless_http2_is_asked_for() {
        let config = Config::from_toml(&minimal()).unwrap();
        assert_eq!(config.upstream.protocol, UpstreamProtocol::Http1);
        let http2 = minimal().replace(
            "url = \"https://api.imagen.ai\"",
            "url = \"https://api.imagen.ai\"\nprotocol = \"http2\"",
        );
        let config = Config::from_toml(&http2).unwrap();
        assert_eq!(config.upstream.protocol, UpstreamProtocol::Http2);
        let err = Config::from_toml(&http2.replace("\"http2\"", "\"h3\"")).unwrap_err();
        assert_eq!(
            err.problems,
            ["upstream.protocol: \"h3\" is not http1 or http2"]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = minimal()
            .replace("plan = \"pro\"", "plan = \"platinum\"")
            .replace("env = \"prod\"", "env = \"staging\"")
            .replace("scope = \"generate\"", "scope = \"write\"")
            .replace("url = \"https://api.imagen.ai\"", "url = \"ftp://x\"")
            + "\n[store]\nurl = \"mongodb://x\"\ntimeout = \"fast\"\n[bogus]\nx = 1\n";
        let err = Config::from_toml(&text).unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "teams[0].plan: unknown plan \"platinum\"",
            "keys[0].env: unknown env \"staging\"",
            "routes[0].scope: unknown scope \"write\"",
            "upstream.url: \"ftp://x\"",
            "store.url: \"mongodb://x\"",
            "store.timeout: \"fast\"",
            "bogus: unknown section",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_per_element() {
        let text = minimal().replace("plan = \"pro\"", "plan = \"pro\"\ncolour = \"red\"")
            + "\n[[keys]]\nid = \"x\"\n";
        let err = Config::from_toml(&text).unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("teams[0]") && all.contains("colour"), "{all}");
        assert!(all.contains("keys[1]") && all.contains("team"), "{all}");
    }

    #[test]
    fn environment_overrides_win() {
        let env = HashMap::from([
            (
                "KEYGATE_STORE__URL".to_string(),
                "redis://10.0.0.5:6379".to_string(),
            ),
            (
                "KEYGATE_SERVER__LISTEN".to_string(),
                "0.0.0.0:8080".to_string(),
            ),
            (
                "KEYGATE_STORE__EXPECTED_REPLICAS".to_string(),
                "3".to_string(),
            ),
        ]);
        let config = Config::from_toml_with_env(&minimal(), "t", env, None).unwrap();
        assert_eq!(
            config.store.url,
            StoreUrl::Redis("redis://10.0.0.5:6379".into())
        );
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.store.expected_replicas, 3);
    }

    #[test]
    fn alert_and_anomaly_settings_are_validated_together() {
        let text = minimal()
            + "\n[alerts]\nthresholds = [0.8, 1.5]\nmax_attempts = 0\nretry_backoff = \"soon\"\n\
               [anomalies]\nrate_factor = 0.5\ninvalid_tokens_per_minute = 0\nwarmup = \"x\"\n\
               [usage_log]\nredis_stream = \" \"\nstream_maxlen = 0\n";
        let err = Config::from_toml(&text).unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "alerts.thresholds: 1.5 is not in (0, 1]",
            "alerts.max_attempts: 0 is out of range",
            "alerts.retry_backoff: \"soon\"",
            "anomalies.rate_factor: 0.5 must be greater than 1",
            "anomalies.invalid_tokens_per_minute: must be at least 1",
            "anomalies.warmup: \"x\"",
            "usage_log.redis_stream: must name a stream key",
            "usage_log.stream_maxlen: must be at least 1",
            "usage_log.redis_stream: needs a Redis store",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let config = Config::from_toml(&minimal()).unwrap();
        assert_eq!(config.anomalies, AnomalyConfig::default());
        assert_eq!(config.alerts.max_attempts, 5);
    }

    #[test]
    fn requests_in_flight_default_to_the_connection_cap_and_both_are_bounded() {
        let with =
            |settings: &str| minimal().replacen("[server]", &format!("[server]\n{settings}"), 1);
        let config = Config::from_toml(&minimal()).unwrap();
        assert_eq!(config.server.max_connections, 8192);
        assert_eq!(config.server.max_requests_in_flight, 8192);
        let config = Config::from_toml(&with("max_connections = 100")).unwrap();
        assert_eq!(config.server.max_requests_in_flight, 100);
        let config = Config::from_toml(&with("max_requests_in_flight = 50")).unwrap();
        assert_eq!(config.server.max_requests_in_flight, 50);
        let err = Config::from_toml(&with(
            "max_connections = 0\nmax_requests_in_flight = 10000001",
        ))
        .unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "server.max_connections: 0 is not in 1..=10000000",
            "server.max_requests_in_flight: 10000001 is not in 1..=10000000",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn worker_threads_are_unset_by_default_and_bounded() {
        let config = Config::from_toml(&minimal()).unwrap();
        assert_eq!(config.server.worker_threads, None);
        assert_eq!(config.server.shards, None);
        let with =
            |n: &str| minimal().replacen("[server]", &format!("[server]\nworker_threads = {n}"), 1);
        assert!(minimal().contains("[server]"));
        let config = Config::from_toml(&with("1")).unwrap();
        assert_eq!(config.server.worker_threads, Some(1));
        let shards = minimal().replacen("[server]", "[server]\nshards = 0", 1);
        let err = Config::from_toml(&shards).unwrap_err();
        assert!(
            err.problems
                .contains(&"server.shards: 0 is not in 1..=1024".to_string()),
            "{:?}",
            err.problems
        );
        for (n, problem) in [
            ("0", "server.worker_threads: 0 is not in 1..=1024"),
            ("5000", "server.worker_threads: 5000 is not in 1..=1024"),
        ] {
            let err = Config::from_toml(&with(n)).unwrap_err();
            assert!(
                err.problems.iter().any(|p| p == problem),
                "{:?}",
                err.problems
            );
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("soon").is_err());
    }
}
