//! Owns the one error type of the request path: its status, its public code and message,
//! and the upstream-shaped JSON body a client receives. Causes are for the log only.

use bytes::Bytes;
use http::StatusCode;

use crate::quota::QuotaReport;

/// Why authentication failed. Only ever logged and counted; the client always sees the
/// same 401 body so it cannot probe which check it tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Duplicated,
    Malformed,
    Unknown,
    Expired,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::Missing,
        AuthFailure::Duplicated,
        AuthFailure::Malformed,
        AuthFailure::Unknown,
        AuthFailure::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Duplicated => "duplicated",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Unknown => "unknown",
            AuthFailure::Expired => "expired",
        }
    }
}

/// Why a request was refused with 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// No route matches the method and path: deny by default.
    NoRoute,
    /// The token lacks the scope the route requires.
    MissingScope,
}

/// Which limit a 429 came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitSubject {
    Team,
    Key,
    Upstream,
    /// A client address that sent too many invalid tokens.
    ClientAddress,
}

impl RateLimitSubject {
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitSubject::Team => "team",
            RateLimitSubject::Key => "key",
            RateLimitSubject::Upstream => "upstream",
            RateLimitSubject::ClientAddress => "client_address",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("authentication failed: {}", .0.as_str())]
    Unauthorized(AuthFailure),
    #[error("forbidden: {0:?}")]
    Forbidden(Forbidden),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("request body stalled for {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("rate limited by {}", .subject.as_str())]
    RateLimited {
        subject: RateLimitSubject,
        report: Option<Box<QuotaReport>>,
        retry_after_secs: u64,
    },
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream timed out after {0:?}")]
    UpstreamTimeout(std::time::Duration),
    #[error("quota store unavailable: {0}")]
    StoreUnavailable(String),
    /// The admin key store (admin API only) did not answer.
    #[error("admin key store unavailable: {0}")]
    KeyStoreUnavailable(String),
    /// keygate itself failed (the system random generator, say): 500, cause in the log.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("no upstream key available for env {0:?}")]
    UpstreamKeyUnavailable(String),
    /// Over `server.max_requests_in_flight`. The listener answers a connection over
    /// `server.max_connections` with the same body, and logs that cause itself.
    #[error("server.max_requests_in_flight reached")]
    Overloaded,
    /// The upstream failed again and again; its circuit is open for the cool-down.
    #[error("upstream circuit open")]
    UpstreamCircuitOpen { retry_after_secs: u64 },
    /// An admin API request that does not validate; the message names what is wrong.
    #[error("invalid admin request: {0}")]
    InvalidRequest(String),
    /// An admin API request that conflicts with existing state (taken id, read-only key).
    #[error("conflict: {0}")]
    Conflict(String),
}

/// Expands to the upstream's error body for a code and message, as a `&'static str`, so
/// every error answer is a constant with no formatting on the request path.
macro_rules! error_body {
    ($code:literal, $message:literal) => {
        concat!(
            r#"{"error":{"code":""#,
            $code,
            r#"","message":""#,
            $message,
            r#""}}"#
        )
    };
}

const BAD_REQUEST: &str = error_body!("bad_request", "Malformed request");
const UNAUTHORIZED: &str = error_body!("unauthorized", "Invalid API key");
const FORBIDDEN: &str = error_body!(
    "forbidden",
    "API key does not have permission for this operation"
);
const NOT_FOUND: &str = error_body!("not_found", "Not found");
const METHOD_NOT_ALLOWED: &str = error_body!("method_not_allowed", "Method not allowed");
const PAYLOAD_TOO_LARGE: &str = error_body!("payload_too_large", "Request body too large");
const REQUEST_TIMEOUT: &str = error_body!("request_timeout", "Request body not received in time");
const RATE_LIMITED: &str = error_body!(
    "rate_limit_exceeded",
    "Rate limit exceeded. Please try again later."
);
const BAD_GATEWAY: &str = error_body!("bad_gateway", "Upstream service unreachable");
const SERVICE_UNAVAILABLE: &str = error_body!(
    "service_unavailable",
    "Service temporarily unavailable. Please try again later."
);
const GATEWAY_TIMEOUT: &str = error_body!("gateway_timeout", "Upstream service timed out");
const INTERNAL_ERROR: &str = error_body!("internal_error", "Internal error");

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) | GatewayError::InvalidRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::StoreUnavailable(_)
            | GatewayError::KeyStoreUnavailable(_)
            | GatewayError::UpstreamKeyUnavailable(_)
            | GatewayError::Overloaded
            | GatewayError::UpstreamCircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The public error code, as in the body.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::NotFound => "not_found",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::RequestTimeout(_) => "request_timeout",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::UpstreamUnreachable(_) => "bad_gateway",
            GatewayError::UpstreamTimeout(_) => "gateway_timeout",
            GatewayError::StoreUnavailable(_)
            | GatewayError::KeyStoreUnavailable(_)
            | GatewayError::UpstreamKeyUnavailable(_)
            | GatewayError::Overloaded
            | GatewayError::UpstreamCircuitOpen { .. } => "service_unavailable",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    /// The whole JSON body the client receives. Never contains the cause; only the admin
    /// API's own validation messages are built per request.
    pub fn body(&self) -> std::borrow::Cow<'static, str> {
        let fixed = match self {
            GatewayError::InvalidRequest(message) | GatewayError::Conflict(message) => {
                let body = serde_json::json!({
                    "error": { "code": self.code(), "message": message }
                });
                return std::borrow::Cow::Owned(body.to_string());
            }
            GatewayError::BadRequest(_) => BAD_REQUEST,
            GatewayError::Unauthorized(_) => UNAUTHORIZED,
            GatewayError::Forbidden(_) => FORBIDDEN,
            GatewayError::NotFound => NOT_FOUND,
            GatewayError::MethodNotAllowed => METHOD_NOT_ALLOWED,
            GatewayError::PayloadTooLarge { .. } => PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout(_) => REQUEST_TIMEOUT,
            GatewayError::RateLimited { .. } => RATE_LIMITED,
            GatewayError::UpstreamUnreachable(_) => BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => GATEWAY_TIMEOUT,
            GatewayError::StoreUnavailable(_)
            | GatewayError::KeyStoreUnavailable(_)
            | GatewayError::UpstreamKeyUnavailable(_)
            | GatewayError::Overloaded
            | GatewayError::UpstreamCircuitOpen { .. } => SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => INTERNAL_ERROR,
        };
        std::borrow::Cow::Borrowed(fixed)
    }

    pub fn body_bytes(&self) -> Bytes {
        match self.body() {
            std::borrow::Cow::Borrowed(fixed) => Bytes::from_static(fixed.as_bytes()),
            std::borrow::Cow::Owned(built) => Bytes::from(built),
        }
    }

    /// Why the gateway refused the request itself; `None` for upstream failures.
    pub fn rejection(&self) -> Option<crate::context::Rejection> {
        use crate::context::Rejection;
        Some(match self {
            GatewayError::BadRequest(_)
            | GatewayError::InvalidRequest(_)
            | GatewayError::Conflict(_)
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed => Rejection::BadRequest,
            GatewayError::PayloadTooLarge { .. } => Rejection::PayloadTooLarge,
            GatewayError::RequestTimeout(_) => Rejection::RequestTimeout,
            GatewayError::Unauthorized(_) => Rejection::Unauthorized,
            GatewayError::Forbidden(Forbidden::MissingScope) => Rejection::ForbiddenScope,
            GatewayError::Forbidden(Forbidden::NoRoute) => Rejection::ForbiddenNoRoute,
            GatewayError::RateLimited { subject, .. } => match subject {
                RateLimitSubject::Team => Rejection::RateLimitedTeam,
                RateLimitSubject::Key => Rejection::RateLimitedKey,
                RateLimitSubject::Upstream => Rejection::RateLimitedUpstream,
                RateLimitSubject::ClientAddress => Rejection::RateLimitedClientAddress,
            },
            GatewayError::StoreUnavailable(_) | GatewayError::KeyStoreUnavailable(_) => {
                Rejection::StoreUnavailable
            }
            GatewayError::UpstreamKeyUnavailable(_) => Rejection::NoUpstreamKey,
            GatewayError::Overloaded => Rejection::Overloaded,
            GatewayError::UpstreamCircuitOpen { .. } => Rejection::UpstreamCircuitOpen,
            GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamTimeout(_)
            | GatewayError::Internal(_) => return None,
        })
    }

    /// The short outcome label used in metrics and the usage log.
    pub fn outcome(&self) -> crate::context::Outcome {
        use crate::context::Outcome;
        match self {
            GatewayError::BadRequest(_)
            | GatewayError::InvalidRequest(_)
            | GatewayError::Conflict(_)
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::RequestTimeout(_) => Outcome::BadRequest,
            GatewayError::Unauthorized(_) => Outcome::Unauthorized,
            GatewayError::Forbidden(_) => Outcome::Forbidden,
            GatewayError::RateLimited { .. } => Outcome::RateLimited,
            GatewayError::UpstreamUnreachable(_) => Outcome::UpstreamError,
            GatewayError::UpstreamTimeout(_) => Outcome::UpstreamTimeout,
            GatewayError::StoreUnavailable(_)
            | GatewayError::KeyStoreUnavailable(_)
            | GatewayError::UpstreamKeyUnavailable(_)
            | GatewayError::Overloaded
            | GatewayError::UpstreamCircuitOpen { .. }
            | GatewayError::Internal(_) => Outcome::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_bodies_are_byte_identical() {
        assert_eq!(
            GatewayError::Unauthorized(AuthFailure::Missing).body(),
            r#"{"error":{"code":"unauthorized","message":"Invalid API key"}}"#
        );
        assert_eq!(
            GatewayError::Forbidden(Forbidden::MissingScope).body(),
            r#"{"error":{"code":"forbidden","message":"API key does not have permission for this operation"}}"#
        );
        let limited = GatewayError::RateLimited {
            subject: RateLimitSubject::Team,
            report: None,
            retry_after_secs: 1,
        };
        assert_eq!(
            limited.body(),
            r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit exceeded. Please try again later."}}"#
        );
    }

    #[test]
    fn every_body_is_json_with_its_code() {
        let all = [
            GatewayError::BadRequest("x"),
            GatewayError::Unauthorized(AuthFailure::Unknown),
            GatewayError::Forbidden(Forbidden::NoRoute),
            GatewayError::NotFound,
            GatewayError::MethodNotAllowed,
            GatewayError::PayloadTooLarge { limit: 1 },
            GatewayError::RequestTimeout(std::time::Duration::from_secs(1)),
            GatewayError::UpstreamUnreachable("refused".into()),
            GatewayError::UpstreamTimeout(std::time::Duration::from_secs(1)),
            GatewayError::StoreUnavailable("down".into()),
            GatewayError::KeyStoreUnavailable("down".into()),
            GatewayError::Internal("refused".into()),
            GatewayError::UpstreamKeyUnavailable("prod".into()),
            GatewayError::Overloaded,
            GatewayError::UpstreamCircuitOpen {
                retry_after_secs: 3,
            },
            GatewayError::InvalidRequest("scopes: unknown scope \"x\"".into()),
            GatewayError::Conflict("id taken".into()),
        ];
        for error in all {
            let body: serde_json::Value = serde_json::from_str(&error.body()).unwrap();
            assert_eq!(body["error"]["code"], error.code());
            let text = error.body();
            assert!(!text.contains("refused") && !text.contains("down"));
        }
    }
}
