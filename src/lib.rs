//! keygate — an API-key gateway in front of a paid HTTP API.
//!
//! Services call keygate with internal per-team tokens; keygate checks the token and its
//! scope, enforces the team's minute and day quota, swaps the token for the real upstream
//! key and streams the request upstream. The real key never leaves the backend.
//!
//! # The request pipeline ([`pipeline`])
//!
//! ```text
//! route ──▶ authenticate ──▶ authorize ──▶ quota ──▶ forward ──▶ finish
//! routing    auth             scope          quota      forward     observe
//! ```
//!
//! Every step returns `Result<_, GatewayError>` ([`error`]); the finish step runs for
//! every request, from one [`context::RequestContext`], when the response body ends.
//!
//! # Modules
//!
//! - [`cli`], [`demo`], [`token`]: the command line and what it runs.
//! - [`config`]: raw TOML → validated [`config::Config`]; [`secret`]: redacted secrets.
//! - [`server`], [`connection`], [`tls`], [`admin`]: listeners, one connection's timers
//!   and close, TLS, `/healthz` `/readyz`; [`shards`]: the optional thread-per-core event
//!   loops proxy connections are handed to; [`event_loop`]: a thread with its own event
//!   loop (each shard, and the quota store's Redis calls); [`boxed_executor`]: how hyper's
//!   HTTP/2 server futures become tasks.
//! - [`gateway`]: shared state and the hot-swappable [`gateway::Snapshot`];
//!   [`in_flight`]: the cap on requests served at once.
//! - [`pipeline`]: the steps above; [`body`]: streamed, counted bodies.
//! - [`routing`]: canonical paths and the route table; [`auth`]: tokens → key records;
//!   [`scope`]: permission levels; [`client_addr`]: who the client is.
//! - [`quota`]: the store trait, window arithmetic, the memory and Redis stores, the
//!   outage modes, quota headers, local slices of a busy team's room (Redis);
//!   [`shared_redis`]: the connection to a fleet's Redis.
//! - [`forward`]: the upstream request and header rewrite; [`upstream_pool`]: the kept-alive
//!   HTTP/1.1 connections to the upstream, [`upstream_h2`]: the shared HTTP/2 ones (opt-in,
//!   on `h2` directly); [`upstream_keys`]: real keys;
//!   [`retry`]: retries of 429 / 503 / failed connects with backoff and key failover;
//!   [`circuit`]: the breaker that answers 503 at once while the upstream is down.
//! - [`context`], [`observe`], [`request_id`], [`telemetry`]: what is recorded;
//!   [`metrics`]: the Prometheus series; [`usage_log`]: one JSON line per request;
//!   [`alerts`]: quota, store and anomaly alerts to webhooks; [`anomaly`]: the detectors,
//!   live and offline; [`throttle`]: 429 for addresses guessing tokens.
//! - [`clock`]: wall or manual time for the quota windows.

pub mod admin;
pub mod admin_api;
pub mod alerts;
pub mod anomaly;
pub mod auth;
pub mod body;
pub mod boxed_executor;
pub mod circuit;
pub mod cli;
pub mod client_addr;
pub mod clock;
pub mod config;
pub mod connection;
pub mod context;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod event_loop;
pub mod forward;
pub mod gateway;
pub mod in_flight;
pub mod key_store;
pub mod metrics;
pub mod observe;
pub mod pipeline;
pub mod quota;
pub mod reload;
pub mod request_id;
pub mod retry;
pub mod routing;
pub mod scope;
pub mod secret;
pub mod server;
pub mod shards;
pub mod shared_redis;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod token;
pub mod upstream_h2;
pub mod upstream_keys;
pub mod upstream_pool;
pub mod usage_log;
pub mod usage_report;
pub mod usage_series;
pub mod usage_stream;
