//! Owns the retry decisions of the forward step: which upstream answers are worth another
//! try, how long to wait (exponential backoff with full jitter, never less than the
//! upstream's Retry-After), and the per-request budget that bounds it all.
//!
//! Only what is safe to send twice is retried: a 429 or 503 (the upstream refused the
//! work before doing it) and a connection that failed before any byte went out. A timeout
//! or a connection that broke after the request was sent is never retried: the upstream
//! may already be generating the image, and image generation is paid for per call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use jiff::Timestamp;

use crate::alerts::AlertEvent;
use crate::body::{InboundBody, InboundProgress, UpstreamBody};
use crate::circuit::{CallResult, CircuitPermit};
use crate::config::RetryPolicy;
use crate::forward::ForwardError;
use crate::gateway::Gateway;
use crate::upstream_keys::{UpstreamCredential, REJECTED_REST};
use crate::upstream_pool::PooledBody;

/// The longest Retry-After taken at its word; a larger one is outside any budget anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The client's request, ready to go upstream once or several times.
pub struct Outgoing {
    pub method: Method,
    pub uri: Uri,
    /// Rewritten headers without `Authorization`: each try adds its key's.
    pub headers: HeaderMap,
    pub body: OutgoingBody,
    pub progress: Arc<InboundProgress>,
}

pub enum OutgoingBody {
    /// Sent once; no retry.
    Stream(InboundBody),
    /// Held in memory (small, known length): any try can send it.
    Held(Bytes),
}

/// How the upstream exchange of one request ended.
// One per request, moved twice: boxing the answer would cost an allocation per request to
// save a few hundred bytes of stack.
#[allow(clippy::large_enum_variant)]
pub enum Exchange {
    Answered {
        response: Response<PooledBody>,
        latency: Duration,
        credential: UpstreamCredential,
    },
    Failed(ForwardError),
    /// The circuit was open before the first try: nothing was sent.
    CircuitOpen {
        retry_after_secs: u64,
    },
}

/// Sends the request upstream, retrying a 429, a 503, a key the upstream refused or a
/// failed connect while the policy, the budget and the circuit allow. Only a held body can
/// go twice; a streamed one gets exactly one try. Returns the last outcome and how many
/// retries it took.
pub async fn exchange(
    gateway: &Gateway,
    outgoing: Outgoing,
    mut credential: UpstreamCredential,
) -> (Exchange, u32) {
    let Outgoing {
        method,
        uri,
        headers,
        body,
        progress,
    } = outgoing;
    let request = |headers: HeaderMap, body: UpstreamBody, authorization: &HeaderValue| {
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers;
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, authorization.clone());
        request
    };
    let held = match body {
        OutgoingBody::Stream(body) => {
            let sent = match gateway.circuit.admit() {
                Ok(permit) => {
                    let request = request(
                        headers,
                        UpstreamBody::Streamed(Box::new(body)),
                        &credential.authorization,
                    );
                    try_once(gateway, permit, request, &progress, credential)
                        .await
                        .0
                }
                Err(retry_after_secs) => Exchange::CircuitOpen { retry_after_secs },
            };
            return (sent, 0);
        }
        OutgoingBody::Held(bytes) => bytes,
    };
    // The first try sends the headers themselves; further tries send copies.
    let replay = headers.clone();
    let mut first = Some(headers);
    let mut budget = RetryBudget::new(gateway.retry);
    let env = credential.env.clone();
    let mut last: Option<Exchange> = None;
    loop {
        let permit = match gateway.circuit.admit() {
            Ok(permit) => permit,
            Err(retry_after_secs) => {
                let ended = last.unwrap_or(Exchange::CircuitOpen { retry_after_secs });
                return (ended, budget.retries());
            }
        };
        drop(last.take());
        let request = request(
            first.take().unwrap_or_else(|| replay.clone()),
            UpstreamBody::held(&held),
            &credential.authorization,
        );
        let (exchange, retryable) = try_once(gateway, permit, request, &progress, credential).await;
        let Some((why, retry_after)) = retryable else {
            return (exchange, budget.retries());
        };
        let now_ms = gateway.clock.now().as_millisecond();
        let Ok(next) = gateway.upstream_keys.credential(&env, now_ms) else {
            return (exchange, budget.retries());
        };
        let next_rests = next.rests_for(now_ms);
        let floor = match why {
            // Another key in turn takes the request now; with none, wait for the first
            // key back (its Retry-After, or the backoff when the upstream did not say).
            Retryable::Throttled => next_rests.and(retry_after),
            // A revoked key is only worth a retry with another key.
            Retryable::KeyRejected if next_rests.is_some() => {
                return (exchange, budget.retries());
            }
            Retryable::KeyRejected => None,
            Retryable::Unavailable => retry_after,
            Retryable::ConnectFailed => None,
        };
        let Some(wait) = budget.next_wait(floor) else {
            return (exchange, budget.retries());
        };
        tracing::debug!(
            retry = budget.retries(),
            reason = why.as_str(),
            wait_ms = wait.as_millis() as u64,
            "retrying the upstream call"
        );
        credential = next;
        last = Some(exchange);
        tokio::time::sleep(wait).await;
    }
}

/// One upstream call under a circuit permit: reports the result to the circuit, rests a
/// key the upstream refused, and says whether (and why) another try could help.
async fn try_once(
    gateway: &Gateway,
    permit: CircuitPermit,
    request: Request<UpstreamBody>,
    progress: &InboundProgress,
    credential: UpstreamCredential,
) -> (Exchange, Option<(Retryable, Option<Duration>)>) {
    match gateway.upstream.send(request, progress).await {
        Ok((response, latency)) => {
            let status = response.status();
            permit.record(if status.is_server_error() {
                CallResult::Failed
            } else {
                CallResult::Answered
            });
            // Only a 401, 429 or 503 needs the clock and Retry-After: not every answer.
            let retryable = Retryable::from_status(status).map(|why| {
                let now = gateway.clock.now();
                let retry_after = retry_after(response.headers(), now);
                if matches!(why, Retryable::Throttled | Retryable::KeyRejected) {
                    rest_key(gateway, &credential, status, retry_after, now);
                }
                (why, retry_after)
            });
            let answered = Exchange::Answered {
                response,
                latency,
                credential,
            };
            (answered, retryable)
        }
        Err(error) => {
            let retryable = match &error {
                ForwardError::ClientBody(_) => {
                    // The client's fault says nothing about the upstream.
                    drop(permit);
                    None
                }
                ForwardError::Connect(_) => {
                    permit.record(CallResult::Failed);
                    Some((Retryable::ConnectFailed, None))
                }
                ForwardError::Timeout(_) | ForwardError::Failed(_) => {
                    permit.record(CallResult::Failed);
                    None
                }
            };
            (Exchange::Failed(error), retryable)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retryable {
    /// 429: the upstream's rate limit, usually for the key that was used.
    Throttled,
    /// 503: the upstream as a whole is overloaded or down for maintenance.
    Unavailable,
    /// The connection could not be made: nothing reached the upstream.
    ConnectFailed,
    /// 401 for the real key: revoked or rotated at the upstream; another key may work.
    KeyRejected,
}

impl Retryable {
    pub fn as_str(self) -> &'static str {
        match self {
            Retryable::Throttled => "throttled",
            Retryable::Unavailable => "unavailable",
            Retryable::ConnectFailed => "connect_failed",
            Retryable::KeyRejected => "key_rejected",
        }
    }

    /// Why an answer with this status may be worth another try.
    pub fn from_status(status: StatusCode) -> Option<Self> {
        match status {
            StatusCode::TOO_MANY_REQUESTS => Some(Retryable::Throttled),
            StatusCode::SERVICE_UNAVAILABLE => Some(Retryable::Unavailable),
            StatusCode::UNAUTHORIZED => Some(Retryable::KeyRejected),
            _ => None,
        }
    }
}

/// Takes a refused key out of turn; a 401 also raises `upstream_key_rejected`, once per
/// key and rest across the fleet.
fn rest_key(
    gateway: &Gateway,
    credential: &UpstreamCredential,
    status: StatusCode,
    retry_after: Option<Duration>,
    now: Timestamp,
) {
    let rested = credential.rest_after(status.as_u16(), retry_after, now.as_millisecond());
    if let (Some(rested_for), StatusCode::UNAUTHORIZED) = (rested, status) {
        gateway.observer.alerts.raise_once(
            AlertEvent::UpstreamKeyRejected {
                env: credential.env.to_string(),
                key_index: credential.index,
                rested_for,
            },
            format!(
                "keygate:alert:upstream_key:{}:{}",
                credential.env, credential.index
            ),
            REJECTED_REST,
        );
    }
}

/// The upstream's `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn retry_after(headers: &HeaderMap, now: Timestamp) -> Option<Duration> {
    let text = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if let Ok(seconds) = text.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        static HTTP_DATE: jiff::fmt::rfc2822::DateTimeParser =
            jiff::fmt::rfc2822::DateTimeParser::new();
        let at = HTTP_DATE.parse_timestamp(text).ok()?;
        // A date in the past means "now".
        Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// One request's retry state: tries made and time left.
#[derive(Debug)]
pub struct RetryBudget {
    policy: RetryPolicy,
    started: tokio::time::Instant,
    retries: u32,
}

impl RetryBudget {
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            started: tokio::time::Instant::now(),
            retries: 0,
        }
    }

    /// Retries made so far (the `X-Keygate-Retries` value).
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The wait before the next try, or `None` when no try is left or the wait would end
    /// past the budget. `at_least` is a floor the upstream asked for (its Retry-After, or
    /// the time until a rested key is back). Counts the retry when it grants one.
    pub fn next_wait(&mut self, at_least: Option<Duration>) -> Option<Duration> {
        if self.retries + 1 >= self.policy.attempts {
            return None;
        }
        let backoff = full_jitter(self.policy.base, self.policy.cap, self.retries);
        let wait = backoff.max(at_least.unwrap_or(Duration::ZERO));
        let elapsed = self.started.elapsed();
        if elapsed + wait > self.policy.budget {
            return None;
        }
        self.retries += 1;
        Some(wait)
    }
}

/// A uniformly random wait in [0, min(cap, base × 2^n)]: "full jitter", which spreads
/// retries of many clients best (AWS Architecture Blog, "Exponential Backoff and Jitter").
pub fn full_jitter(base: Duration, cap: Duration, n: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << n.min(20)).min(cap);
    let ceiling_us = ceiling.as_micros().min(u64::MAX as u128) as u64;
    Duration::from_micros(fastrand::u64(0..=ceiling_us))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy(attempts: u32, budget_ms: u64) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(400),
            budget: Duration::from_millis(budget_ms),
            max_replay_bytes: 1024,
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(2)));
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Fri, 27 Nov 2026 12:00:07 GMT"),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Fri, 27 Nov 2026 11:00:00 GMT"),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::ZERO));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("99999999"));
        assert_eq!(retry_after(&headers, now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling_and_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_millis(400);
        for n in 0..8 {
            let ceiling = (base * (1 << n)).min(cap);
            let waits: Vec<Duration> = (0..200).map(|_| full_jitter(base, cap, n)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "n = {n}");
            // Full jitter, not equal jitter: some waits are in the lower half.
            assert!(waits.iter().any(|w| *w < ceiling / 2), "n = {n}");
        }
    }

    #[test]
    fn attempts_bound_the_retries() {
        let mut budget = RetryBudget::new(policy(3, 60_000));
        assert!(budget.next_wait(None).is_some());
        assert!(budget.next_wait(None).is_some());
        assert_eq!(budget.next_wait(None), None);
        assert_eq!(budget.retries(), 2);
        let mut off = RetryBudget::new(policy(1, 60_000));
        assert_eq!(off.next_wait(None), None);
    }

    #[test]
    fn a_retry_after_past_the_budget_ends_the_retries() {
        let mut budget = RetryBudget::new(policy(5, 1_000));
        assert_eq!(budget.next_wait(Some(Duration::from_secs(2))), None);
        assert_eq!(budget.retries(), 0);
        let wait = budget.next_wait(Some(Duration::from_millis(600))).unwrap();
        assert!(wait >= Duration::from_millis(600));
    }
}
