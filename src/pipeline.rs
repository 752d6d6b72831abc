//! Owns the request path, one visible step at a time:
//! route → authenticate → authorize → quota → forward → finish.
//! Each step returns `Result<_, GatewayError>`; the finish step runs for every request,
//! whatever step ended it, when the response body is done or dropped. Before the first, a
//! request takes its slot under `server.max_requests_in_flight` ([`crate::in_flight`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::auth::{self, ApiKey};
use crate::body::{
    content_length, BodyEnd, BodyLimits, InboundBody, InboundFailure, InboundProgress, OnFinish,
    ResponseBody,
};
use crate::config::OnStoreError;
use crate::connection::Endpoints;
use crate::context::{Outcome, RequestContext};
use crate::error::{Forbidden, GatewayError, RateLimitSubject};
use crate::forward::{self, ForwardError, X_KEYGATE_RETRIES, X_REQUEST_ID};
use crate::gateway::{Gateway, Snapshot};
use crate::quota::{report, Admission, Decision, SubjectKind};
use crate::retry::{self, Exchange, Outgoing, OutgoingBody};
use crate::routing::{self, Route};
use crate::upstream_keys::UpstreamCredential;

/// Longest raw path kept in the context when the path has no canonical form.
const MAX_LOGGED_PATH: usize = 256;
const MAX_USER_AGENT: usize = 256;

/// Serves one proxied request. Never fails: every error becomes the spec's JSON answer.
pub async fn handle(
    gateway: Arc<Gateway>,
    endpoints: Endpoints,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let peer = endpoints.peer;
    let snapshot = gateway.snapshot();
    let request_id = gateway.request_ids.for_request(request.headers());
    let client_ip = gateway.client_ip(peer.ip(), request.headers());
    let mut ctx = RequestContext::new(
        request_id,
        request.method().clone(),
        client_ip,
        gateway.clock.now(),
    );
    ctx.user_agent = request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| truncate(ua, MAX_USER_AGENT).to_string());

    // Before any work: past `server.max_requests_in_flight` a request costs a 503, not
    // memory. The slot is held until the answer's body ends (in `Finish`), or dropped with
    // this future when the client goes first.
    let slot = gateway.requests_in_flight.try_enter();
    let response = if slot.is_none() {
        error_response(&mut ctx, GatewayError::Overloaded)
    } else {
        match run(&gateway, &snapshot, &mut ctx, endpoints, request).await {
            Ok(response) => response,
            Err(error) => error_response(&mut ctx, error),
        }
    };
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(X_REQUEST_ID, ctx.request_id.clone());
    if ctx.upstream_retries > 0 {
        parts
            .headers
            .insert(X_KEYGATE_RETRIES, HeaderValue::from(ctx.upstream_retries));
    }
    ctx.status = parts.status.as_u16();
    let finish = Box::new(Finish {
        gateway,
        ctx,
        _slot: slot,
    });
    Response::from_parts(parts, body.with_finish(finish))
}

async fn run(
    gateway: &Gateway,
    snapshot: &Snapshot,
    ctx: &mut RequestContext,
    endpoints: Endpoints,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let peer = endpoints.peer;
    let target = route(
        snapshot,
        ctx,
        &request,
        endpoints.local,
        gateway.edge.max_body_bytes,
    )?;
    let key = authenticate(gateway, snapshot, ctx, &request)?;
    let route = authorize(&key, target.route)?;
    ctx.route = Some(route.label.clone());
    let credential = gateway
        .upstream_keys
        .credential(&key.env, ctx.received_at.as_millisecond())
        .map_err(|_| GatewayError::UpstreamKeyUnavailable(key.env.to_string()))?;
    let decision = quota(gateway, ctx, &key).await?;
    // Boxed: hyper keeps the service future of every connection in a box sized for it,
    // idle or not, and an async fn's state holds a callee's future (sometimes twice). The
    // forward step inline made this future 21 KB: per connection, and moved on every
    // request. Boxed, the future is ~2 KB and the forward step is allocated when it runs.
    Box::pin(forward(
        gateway, ctx, &key, peer, target, request, credential, decision,
    ))
    .await
}

/// What the request asks for: the canonical path and the route it falls under (if any).
struct Target<'a> {
    path: String,
    route: Option<&'a Route>,
}

/// Step 1 — route: reject what is not a plain origin-form request to some path, then find
/// the route by method and canonical path. Whatever passes, the upstream origin is fixed;
/// these refusals make sure keygate never even looks like a forward proxy.
fn route<'a>(
    snapshot: &'a Snapshot,
    ctx: &mut RequestContext,
    request: &Request<Incoming>,
    local: SocketAddr,
    max_body_bytes: u64,
) -> Result<Target<'a>, GatewayError> {
    let uri = request.uri();
    let path = check_target(request, local).and_then(|()| {
        routing::canonical_path(uri.path()).map_err(|e| {
            GatewayError::BadRequest(match e {
                routing::PathError::NotAbsolute => "request target is not a path",
                _ => "path cannot be canonicalised",
            })
        })
    });
    let path = match path {
        Ok(path) => path.into_owned(),
        Err(e) => {
            // Logged as the client sent it: there is no canonical form.
            ctx.path = truncate(uri.path(), MAX_LOGGED_PATH).to_string();
            return Err(e);
        }
    };
    ctx.path = path.clone();
    if let Some(length) = content_length(request.headers()) {
        if length > max_body_bytes {
            return Err(GatewayError::PayloadTooLarge {
                limit: max_body_bytes,
            });
        }
    }
    let route = snapshot.routes.find(request.method(), &path);
    Ok(Target { path, route })
}

/// What makes a request target unusable before its path is looked at.
fn check_target(request: &Request<Incoming>, local: SocketAddr) -> Result<(), GatewayError> {
    if request.method() == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported"));
    }
    check_target_host(request, local)
}

/// HTTP/1 framing rules about the target host (RFC 9112 §3.2): exactly one Host header on
/// HTTP/1.1, and an absolute-form target (`GET http://host/path`) only when it names this
/// gateway's own listening address. HTTP/2 always carries `:authority`, which is just
/// another Host: ignored, because the upstream origin is pinned.
fn check_target_host(request: &Request<Incoming>, local: SocketAddr) -> Result<(), GatewayError> {
    if request.version() >= Version::HTTP_2 {
        return Ok(());
    }
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(GatewayError::BadRequest("more than one Host header")),
        (None, None) if request.version() == Version::HTTP_11 => {
            return Err(GatewayError::BadRequest("HTTP/1.1 request without Host"));
        }
        _ => {}
    }
    let uri = request.uri();
    if uri.scheme().is_none() && uri.authority().is_none() {
        return Ok(());
    }
    if names_local_address(uri, local) {
        Ok(())
    } else {
        Err(GatewayError::BadRequest(
            "absolute-form target names another host",
        ))
    }
}

/// Whether an absolute-form URI's authority is exactly `ip:port` of the socket the request
/// arrived on (no user info, no name to resolve).
fn names_local_address(uri: &http::Uri, local: SocketAddr) -> bool {
    let Some(authority) = uri.authority() else {
        return false;
    };
    if authority.as_str().contains('@') {
        return false;
    }
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return false,
    };
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let Ok(ip) = host.parse::<std::net::IpAddr>() else {
        return false;
    };
    use crate::client_addr::canonical_ip;
    canonical_ip(ip) == canonical_ip(local.ip())
        && authority.port_u16().unwrap_or(default_port) == local.port()
}

/// Step 2 — authenticate: the Bearer token must hash to a known, unexpired key.
/// An address that sent too many refused tokens this minute is answered 429 before its
/// token is looked at.
fn authenticate(
    gateway: &Gateway,
    snapshot: &Snapshot,
    ctx: &mut RequestContext,
    request: &Request<Incoming>,
) -> Result<Arc<ApiKey>, GatewayError> {
    if let Some(retry_after_secs) = gateway.throttle.check(ctx.client_ip, ctx.received_at) {
        return Err(GatewayError::RateLimited {
            subject: RateLimitSubject::ClientAddress,
            report: None,
            retry_after_secs,
        });
    }
    let key = auth::authenticate(&snapshot.keys, request.headers(), ctx.received_at).map_err(
        |failure| {
            gateway
                .throttle
                .record_failure(ctx.client_ip, ctx.received_at);
            GatewayError::Unauthorized(failure)
        },
    )?;
    ctx.key = Some(key.clone());
    Ok(key)
}

/// Step 3 — authorize: an unmatched route is denied (deny by default); a matched one needs
/// its scope.
fn authorize<'a>(key: &ApiKey, route: Option<&'a Route>) -> Result<&'a Route, GatewayError> {
    let route = route.ok_or(GatewayError::Forbidden(Forbidden::NoRoute))?;
    if key.scopes.contains(route.scope) {
        Ok(route)
    } else {
        Err(GatewayError::Forbidden(Forbidden::MissingScope))
    }
}

/// Step 4 — quota: one decision over the team, the key's override and the upstream
/// ceiling. The store bounds itself by `store.timeout` and decides from local memory in
/// `on_error = "local"`; an error reaching here means `open` (admit) or `closed` (503).
async fn quota(
    gateway: &Gateway,
    ctx: &mut RequestContext,
    key: &ApiKey,
) -> Result<Option<Decision>, GatewayError> {
    let started = std::time::Instant::now();
    let decided = gateway.store.decide(&key.subjects).await;
    ctx.quota_latency = Some(started.elapsed());
    let decision = match decided {
        Ok(decision) => decision,
        Err(error) => match gateway.edge.on_store_error {
            OnStoreError::Open => {
                ctx.cause = Some(format!("store error, admitted (on_error = open): {error}"));
                return Ok(None);
            }
            OnStoreError::Closed | OnStoreError::Local => {
                return Err(GatewayError::StoreUnavailable(error.to_string()));
            }
        },
    };
    ctx.team_usage = decision.usage.first().copied();
    ctx.admitted = decision.admitted();
    let report = decision.report();
    ctx.quota = Some(report);
    if decision.admitted() {
        return Ok(Some(decision));
    }
    let subject = match decision.denied_by.map(|(kind, _)| kind) {
        Some(SubjectKind::Key) => RateLimitSubject::Key,
        Some(SubjectKind::Upstream) => RateLimitSubject::Upstream,
        Some(SubjectKind::Team) | None => RateLimitSubject::Team,
    };
    Err(GatewayError::RateLimited {
        subject,
        report: Some(Box::new(report)),
        retry_after_secs: decision.retry_after_secs,
    })
}

/// Step 5 — forward: rewrite the request for the upstream and stream both bodies, through
/// the circuit breaker and the retry policy ([`retry::exchange`]). A small body of known
/// length is held so it can be sent again; anything else streams once. The admission is
/// charged once, whatever the retries, and given back when the upstream failed.
#[allow(clippy::too_many_arguments)]
async fn forward(
    gateway: &Gateway,
    ctx: &mut RequestContext,
    key: &Arc<ApiKey>,
    peer: SocketAddr,
    target: Target<'_>,
    request: Request<Incoming>,
    credential: UpstreamCredential,
    decision: Option<Decision>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let admission = decision.as_ref().and_then(|d| d.admission);
    let (parts, body) = request.into_parts();
    let http::request::Parts {
        method,
        uri: client_uri,
        mut headers,
        ..
    } = parts;
    let uri = gateway
        .upstream
        .uri(&target.path, client_uri.query())
        .map_err(|_| GatewayError::BadRequest("query cannot be forwarded"))?;
    let forwarded_for =
        crate::client_addr::forwarded_for(peer.ip(), &headers, &gateway.edge.trusted_proxies);
    forward::rewrite_request_headers(&mut headers, forwarded_for, &ctx.request_id);
    let progress = Arc::new(InboundProgress::default());
    let body = InboundBody::new(
        body,
        ctx.bytes_in.clone(),
        BodyLimits {
            max_bytes: gateway.edge.max_body_bytes,
            stall_timeout: gateway.edge.body_read_timeout,
            min_rate: gateway.edge.body_min_rate,
        },
        progress.clone(),
    );
    // A held body can go again: for the retry policy, and over HTTP/2 after a refused
    // stream even with retries off (a refusal is not a failure the upstream saw).
    let replayable = (gateway.retry.attempts > 1 || gateway.upstream.resends_refused_requests())
        && body
            .known_length()
            .is_some_and(|length| length <= gateway.retry.max_replay_bytes);
    let body = if replayable {
        match body.hold().await {
            Ok(bytes) => OutgoingBody::Held(bytes),
            Err(failure) => {
                refund(gateway, key, admission);
                return Err(client_body_error(gateway, failure));
            }
        }
    } else {
        OutgoingBody::Stream(body)
    };
    let outgoing = Outgoing {
        method,
        uri,
        headers,
        body,
        progress,
    };
    // Boxed for the reason `run` boxes this step: inline it doubled this future's size.
    let (exchange, retries) = Box::pin(retry::exchange(gateway, outgoing, credential)).await;
    ctx.upstream_retries = retries;
    let (response, upstream_latency, credential) = match exchange {
        Exchange::Answered {
            response,
            latency,
            credential,
        } => (response, latency, credential),
        Exchange::CircuitOpen { retry_after_secs } => {
            refund(gateway, key, admission);
            return Err(GatewayError::UpstreamCircuitOpen { retry_after_secs });
        }
        Exchange::Failed(error) => {
            refund(gateway, key, admission);
            return Err(match error {
                ForwardError::Timeout(after) => GatewayError::UpstreamTimeout(after),
                ForwardError::ClientBody(failure) => client_body_error(gateway, failure),
                ForwardError::Connect(cause) | ForwardError::Failed(cause) => {
                    GatewayError::UpstreamUnreachable(cause)
                }
            });
        }
    };
    ctx.upstream_latency = Some(upstream_latency);
    let status = response.status();
    ctx.upstream_status = Some(status.as_u16());
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::TOO_MANY_REQUESTS {
        refund(gateway, key, admission);
    }
    // The upstream refusing the real key is the gateway's problem, not the client's: its
    // token was fine, so it must not read "Invalid API key".
    if status == StatusCode::UNAUTHORIZED {
        return Err(GatewayError::UpstreamUnreachable(format!(
            "upstream refused the {} key #{}",
            credential.env, credential.index
        )));
    }
    if status.is_server_error() {
        ctx.outcome = Outcome::UpstreamError;
        refund(gateway, key, admission);
    }
    let (mut parts, body) = response.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers);
    if let Some(report) = &ctx.quota {
        report.write_headers(&mut parts.headers);
    }
    Ok(Response::from_parts(parts, ResponseBody::upstream(body)))
}

/// A client body that failed on its way in is the client's fault: a 4xx, never a 5xx.
fn client_body_error(gateway: &Gateway, failure: InboundFailure) -> GatewayError {
    match failure {
        InboundFailure::TooLarge => GatewayError::PayloadTooLarge {
            limit: gateway.edge.max_body_bytes,
        },
        InboundFailure::Malformed => GatewayError::BadRequest("request body malformed or cut off"),
        InboundFailure::Stalled => GatewayError::RequestTimeout(gateway.edge.body_read_timeout),
    }
}

/// Gives an admission back off the request path: the client's answer does not wait for it.
/// The store bounds the call and sends a local admission's refund to local memory.
fn refund(gateway: &Gateway, key: &Arc<ApiKey>, admission: Option<Admission>) {
    let Some(admission) = admission else { return };
    let store = gateway.store.clone();
    let key = key.clone();
    tokio::spawn(async move {
        if let Err(error) = store.refund(&key.subjects, admission).await {
            tracing::warn!(key_id = %key.id, %error, "refund of a failed upstream call did not reach the store");
        }
    });
}

/// Turns an error into the client's answer; the cause stays in the context for the log.
fn error_response(ctx: &mut RequestContext, error: GatewayError) -> Response<ResponseBody> {
    ctx.outcome = error.outcome();
    ctx.rejection = error.rejection();
    if let GatewayError::Unauthorized(failure) = &error {
        ctx.auth_failure = Some(*failure);
    }
    ctx.cause = Some(error.to_string());
    let mut response = Response::new(ResponseBody::full(error.body_bytes()));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let GatewayError::RateLimited {
        report,
        retry_after_secs,
        ..
    } = &error
    {
        if let Some(report) = report {
            report.write_headers(headers);
        }
        report::write_retry_after(headers, *retry_after_secs);
    }
    if let GatewayError::UpstreamCircuitOpen { retry_after_secs } = &error {
        report::write_retry_after(headers, *retry_after_secs);
    }
    response
}

/// A fixed JSON answer outside the pipeline (admin listener, connection refusals).
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Step 6 — finish: runs once per request when the response body ends or is dropped, and
/// hands the one request context to the observer.
struct Finish {
    gateway: Arc<Gateway>,
    ctx: RequestContext,
    _slot: Option<crate::in_flight::InFlightSlot>,
}

impl OnFinish for Finish {
    fn finish(self: Box<Self>, bytes_out: u64, end: BodyEnd) {
        let Finish {
            gateway, mut ctx, ..
        } = *self;
        ctx.bytes_out = bytes_out;
        match end {
            BodyEnd::Complete => {}
            BodyEnd::UpstreamFailed => {
                ctx.outcome = Outcome::UpstreamError;
                ctx.cause
                    .get_or_insert_with(|| "upstream broke off its answer".into());
            }
            BodyEnd::Dropped => {
                if ctx.outcome == Outcome::Forwarded {
                    ctx.outcome = Outcome::ClientClosed;
                }
            }
        }
        gateway.observer.record(ctx);
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
