//! Owns the per-request context: everything the pipeline learns about one request, filled
//! in step by step and read once by the finish step.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};
use jiff::Timestamp;

use crate::auth::ApiKey;
use crate::error::AuthFailure;
use crate::quota::{QuotaReport, SubjectUsage};

/// How a request ended, as one bounded label for metrics and the usage log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Forwarded and answered by the upstream below 500.
    Forwarded,
    /// The upstream answered 5xx, could not be reached, or broke off its answer.
    UpstreamError,
    UpstreamTimeout,
    Unauthorized,
    Forbidden,
    RateLimited,
    BadRequest,
    /// The store was closed (`on_error = "closed"`), no upstream key was readable, or the
    /// upstream circuit was open.
    Unavailable,
    /// The client went away before the answer was complete.
    ClientClosed,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Forwarded,
        Outcome::UpstreamError,
        Outcome::UpstreamTimeout,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::BadRequest,
        Outcome::Unavailable,
        Outcome::ClientClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::BadRequest => "bad_request",
            Outcome::Unavailable => "unavailable",
            Outcome::ClientClosed => "client_closed",
        }
    }
}

/// Why the gateway itself refused a request (upstream failures are outcomes, not
/// rejections): one bounded label for `keygate_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    BadRequest,
    PayloadTooLarge,
    /// The request body stalled (`server.body_read_timeout`).
    RequestTimeout,
    Unauthorized,
    ForbiddenScope,
    ForbiddenNoRoute,
    RateLimitedTeam,
    RateLimitedKey,
    RateLimitedUpstream,
    /// A client address that sent too many invalid tokens this minute.
    RateLimitedClientAddress,
    StoreUnavailable,
    NoUpstreamKey,
    Overloaded,
    /// The upstream circuit is open: keygate answered 503 without calling the upstream.
    UpstreamCircuitOpen,
}

impl Rejection {
    pub const ALL: [Rejection; 14] = [
        Rejection::BadRequest,
        Rejection::PayloadTooLarge,
        Rejection::RequestTimeout,
        Rejection::Unauthorized,
        Rejection::ForbiddenScope,
        Rejection::ForbiddenNoRoute,
        Rejection::RateLimitedTeam,
        Rejection::RateLimitedKey,
        Rejection::RateLimitedUpstream,
        Rejection::RateLimitedClientAddress,
        Rejection::StoreUnavailable,
        Rejection::NoUpstreamKey,
        Rejection::Overloaded,
        Rejection::UpstreamCircuitOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BadRequest => "bad_request",
            Rejection::PayloadTooLarge => "payload_too_large",
            Rejection::RequestTimeout => "request_timeout",
            Rejection::Unauthorized => "unauthorized",
            Rejection::ForbiddenScope => "forbidden_scope",
            Rejection::ForbiddenNoRoute => "forbidden_no_route",
            Rejection::RateLimitedTeam => "rate_limited_team",
            Rejection::RateLimitedKey => "rate_limited_key",
            Rejection::RateLimitedUpstream => "rate_limited_upstream",
            Rejection::RateLimitedClientAddress => "rate_limited_client_address",
            Rejection::StoreUnavailable => "store_unavailable",
            Rejection::NoUpstreamKey => "no_upstream_key",
            Rejection::Overloaded => "overloaded",
            Rejection::UpstreamCircuitOpen => "upstream_circuit_open",
        }
    }
}

#[derive(Debug)]
pub struct RequestContext {
    pub request_id: HeaderValue,
    pub received_at: Timestamp,
    pub started: Instant,
    pub method: Method,
    /// The canonical path without query (the raw one, cut short, when it had no canonical form).
    pub path: String,
    pub route: Option<Arc<str>>,
    pub key: Option<Arc<ApiKey>>,
    pub client_ip: IpAddr,
    pub user_agent: Option<String>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub outcome: Outcome,
    /// Why it failed, for the log only.
    pub cause: Option<String>,
    /// Set when the gateway itself refused the request.
    pub rejection: Option<Rejection>,
    /// Set when the token was refused.
    pub auth_failure: Option<AuthFailure>,
    /// The quota decision admitted and charged this request.
    pub admitted: bool,
    pub upstream_latency: Option<Duration>,
    /// How long the quota decision took (answered or failed), the store's queue included.
    pub quota_latency: Option<Duration>,
    /// Upstream calls sent again after a 429, a 503 or a failed connect.
    pub upstream_retries: u32,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: u64,
    /// The team's own usage after the decision (first subject).
    pub team_usage: Option<SubjectUsage>,
    pub quota: Option<QuotaReport>,
}

impl RequestContext {
    pub fn new(request_id: HeaderValue, method: Method, client_ip: IpAddr, now: Timestamp) -> Self {
        Self {
            request_id,
            received_at: now,
            started: Instant::now(),
            method,
            path: String::new(),
            route: None,
            key: None,
            client_ip,
            user_agent: None,
            status: 0,
            upstream_status: None,
            outcome: Outcome::Forwarded,
            cause: None,
            rejection: None,
            auth_failure: None,
            admitted: false,
            upstream_latency: None,
            quota_latency: None,
            upstream_retries: 0,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            team_usage: None,
            quota: None,
        }
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    pub fn latency(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn team(&self) -> Option<&str> {
        self.key.as_deref().map(|k| &*k.team)
    }

    pub fn key_id(&self) -> Option<&str> {
        self.key.as_deref().map(|k| &*k.id)
    }

    pub fn env(&self) -> Option<&str> {
        self.key.as_deref().map(|k| &*k.env)
    }

    pub fn request_id_str(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }
}
