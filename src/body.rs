//! Owns the body types that flow through the gateway: the inbound body (counted and capped
//! while it streams upstream) and the response body (a fixed error body or the upstream's
//! stream), whose end or drop runs the finish step exactly once.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// The client's request body on its way upstream: streamed frame by frame, counted, and cut
/// off with an error once it passes the configured maximum.
pub struct InboundBody {
    inner: Incoming,
    seen: Arc<AtomicU64>,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl InboundBody {
    pub fn new(
        inner: Incoming,
        seen: Arc<AtomicU64>,
        limit: u64,
        exceeded: Arc<AtomicBool>,
    ) -> Self {
        Self {
            inner,
            seen,
            limit,
            exceeded,
        }
    }
}

impl Body for InboundBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let total = self.seen.fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if total > self.limit {
                        self.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(self.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
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
    Upstream(Incoming),
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

    pub fn upstream(body: Incoming) -> Self {
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
            Inner::Upstream(body) => ready!(Pin::new(body).poll_frame(cx))
                .map(|r| r.map_err(|e| Box::new(e) as BoxError)),
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
