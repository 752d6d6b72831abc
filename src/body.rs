//! Owns the body types that flow through the gateway: the inbound body (counted and capped
//! while it streams upstream) and the response body (a fixed error body or the upstream's
//! stream), whose end or drop runs the finish step exactly once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The length a message's `Content-Length` announces, when it is one number.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Why the client's body stopped before its end. The forward step reads it so that a
/// client's fault is answered 4xx, never blamed on the upstream with a 5xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InboundFailure {
    #[error("request body larger than the limit")]
    TooLarge,
    #[error("request body malformed or cut off")]
    Malformed,
    #[error("request body stalled")]
    Stalled,
}

/// How one request body is doing, shared with the forward step: its first failure, and
/// whether the upstream request is currently waiting on the client for more of it.
#[derive(Debug, Default)]
pub struct InboundProgress {
    failure: AtomicU8,
    waiting_on_client: AtomicBool,
}

impl InboundProgress {
    fn fail(&self, failure: InboundFailure) {
        let code = match failure {
            InboundFailure::TooLarge => 1,
            InboundFailure::Malformed => 2,
            InboundFailure::Stalled => 3,
        };
        let _ = self
            .failure
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn failure(&self) -> Option<InboundFailure> {
        match self.failure.load(Ordering::Relaxed) {
            1 => Some(InboundFailure::TooLarge),
            2 => Some(InboundFailure::Malformed),
            3 => Some(InboundFailure::Stalled),
            _ => None,
        }
    }

    /// True while the body is being sent and the next piece has not come from the client
    /// yet: a slow upload, not a slow upstream.
    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Ordering::Relaxed)
    }
}

/// What a request body must keep to: `server.max_body_bytes`, `body_read_timeout` and
/// `body_min_rate`.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: u64,
    pub stall_timeout: Duration,
    /// Bytes per second over the time spent waiting on the client (0: no minimum).
    pub min_rate: u64,
}

/// The client's request body on its way upstream: streamed frame by frame, counted, cut
/// off with an error once it passes the configured maximum, pauses longer than the stall
/// timeout, or trickles in below the minimum rate (slow-body attacks would otherwise hold
/// an upstream connection).
///
/// The rate counts only the time keygate was waiting on the client (a read that found
/// nothing), never the time the upstream took to take what was read: a client held back by
/// a slow upstream is not a slow client.
pub struct InboundBody {
    inner: Incoming,
    seen: Arc<AtomicU64>,
    limits: BodyLimits,
    stall: Option<Pin<Box<Sleep>>>,
    /// Since when the current read has been waiting on the client.
    waiting_since: Option<Instant>,
    /// Time spent waiting on the client so far.
    waited: Duration,
    progress: Arc<InboundProgress>,
}

impl InboundBody {
    pub fn new(
        inner: Incoming,
        seen: Arc<AtomicU64>,
        limits: BodyLimits,
        progress: Arc<InboundProgress>,
    ) -> Self {
        Self {
            inner,
            seen,
            limits,
            stall: None,
            waiting_since: None,
            waited: Duration::ZERO,
            progress,
        }
    }

    /// Whether the body has trickled in slower than the minimum rate, judged once the
    /// client has been waited on for longer than the stall timeout.
    fn too_slow(&self, total: u64) -> bool {
        let min_rate = self.limits.min_rate;
        min_rate > 0
            && self.waited > self.limits.stall_timeout
            && (total as f64) < min_rate as f64 * self.waited.as_secs_f64()
    }

    fn fail(&mut self, failure: InboundFailure) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.progress.fail(failure);
        self.progress
            .waiting_on_client
            .store(false, Ordering::Relaxed);
        Poll::Ready(Some(Err(Box::new(failure))))
    }
}

impl Body for InboundBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                this.progress
                    .waiting_on_client
                    .store(true, Ordering::Relaxed);
                // One timer per body, allocated at its first wait and reset for each.
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::ZERO)));
                if this.waiting_since.is_none() {
                    // A new wait on the client: the pause limit counts from now.
                    let now = Instant::now();
                    this.waiting_since = Some(now);
                    stall.as_mut().reset(now + this.limits.stall_timeout);
                }
                if stall.as_mut().poll(cx).is_ready() {
                    return this.fail(InboundFailure::Stalled);
                }
                return Poll::Pending;
            }
        };
        this.progress
            .waiting_on_client
            .store(false, Ordering::Relaxed);
        if let Some(since) = this.waiting_since.take() {
            this.waited += since.elapsed();
        }
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let total = this.seen.fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if total > this.limits.max_bytes {
                        return this.fail(InboundFailure::TooLarge);
                    }
                    if this.too_slow(total) {
                        return this.fail(InboundFailure::Stalled);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(_)) => this.fail(InboundFailure::Malformed),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of one upstream call: the client's stream, sent once, or a copy held in
/// memory so a retry can send it again.
pub enum UpstreamBody {
    /// Boxed: hyper's client queues each request in a channel per upstream connection
    /// whose slots are sized for the whole request, 32 at a time; inline, this body made
    /// that ~12 KB per connection.
    Streamed(Box<InboundBody>),
    Held(Option<Bytes>),
}

impl UpstreamBody {
    /// A held copy of `bytes`, for one more try.
    pub fn held(bytes: &Bytes) -> Self {
        UpstreamBody::Held((!bytes.is_empty()).then(|| bytes.clone()))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Held(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streamed(body) => body.is_end_stream(),
            UpstreamBody::Held(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streamed(body) => body.size_hint(),
            UpstreamBody::Held(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl InboundBody {
    /// The length hyper read from the request's framing (Content-Length, or no body at
    /// all); `None` for a chunked or HTTP/2 body of unknown length.
    pub fn known_length(&self) -> Option<u64> {
        if self.inner.is_end_stream() {
            return Some(0);
        }
        self.inner.size_hint().exact()
    }

    /// Reads the whole body into memory, with the same limits and stall timer as when it
    /// streams. Only for bodies of a known, small length.
    pub async fn hold(self) -> Result<Bytes, InboundFailure> {
        use http_body_util::BodyExt;
        let progress = self.progress.clone();
        match self.collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(_) => Err(progress.failure().unwrap_or(InboundFailure::Malformed)),
        }
    }
}

/// Called once when a response body is finished or dropped, with the bytes sent and
/// whether the stream completed.
pub trait OnFinish: Send + 'static {
    fn finish(self: Box<Self>, bytes_out: u64, outcome: BodyEnd);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every byte was handed to the connection.
    Complete,
    /// The upstream's stream failed part way.
    UpstreamFailed,
    /// Dropped before the end: the client went away or the connection closed.
    Dropped,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream(crate::upstream_pool::PooledBody),
}

/// What the gateway answers with.
pub struct ResponseBody {
    inner: Inner,
    bytes_out: u64,
    on_finish: Option<Box<dyn OnFinish>>,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            inner: Inner::Full(if bytes.is_empty() { None } else { Some(bytes) }),
            bytes_out: 0,
            on_finish: None,
        }
    }

    pub fn upstream(body: crate::upstream_pool::PooledBody) -> Self {
        Self {
            inner: Inner::Upstream(body),
            bytes_out: 0,
            on_finish: None,
        }
    }

    pub fn with_finish(mut self, on_finish: Box<dyn OnFinish>) -> Self {
        self.on_finish = Some(on_finish);
        // An empty body is never polled to its end by hyper; finish right away.
        if self.is_end_stream() {
            self.run_finish(BodyEnd::Complete);
        }
        self
    }

    fn run_finish(&mut self, end: BodyEnd) {
        if let Some(on_finish) = self.on_finish.take() {
            on_finish.finish(self.bytes_out, end);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.run_finish(BodyEnd::Dropped);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled: Option<Result<Frame<Bytes>, BoxError>> = match &mut this.inner {
            Inner::Full(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            Inner::Upstream(body) => ready!(Pin::new(body).poll_frame(cx)),
        };
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                }
                if this.is_end_stream() {
                    this.run_finish(BodyEnd::Complete);
                }
            }
            Some(Err(_)) => this.run_finish(BodyEnd::UpstreamFailed),
            None => this.run_finish(BodyEnd::Complete),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream(body) => body.size_hint(),
        }
    }
}
