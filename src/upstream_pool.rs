//! Owns the connections to the upstream: HTTP/1.1 over TCP or rustls, one request at a
//! time each, kept alive and handed out again most recently used first. The response body
//! gives its connection back once the upstream's answer has been read to its end, and only
//! a connection ready for its next request goes in the list.
//!
//! keygate talks to one origin, so this is a list of idle connections, not hyper-util's
//! general pool (a map keyed by origin, hashed twice a request, a task spawned per request
//! to take the connection back, a boxed request future): the upstream call cost ~14 k of
//! ~104 k instructions a request through it, ~4 k through this (PERFORMANCE.md).
//!
//! With shards ([`crate::shards`]) each shard keeps its own list: a connection's task runs
//! on the shard that opened it, and a request on another shard would hand every exchange
//! over between threads.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

// Tokio's clock, so that tests can move it.
use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::body::{BoxError, UpstreamBody};
use crate::upstream_h2::{AnswerStream, StreamLease};

/// How long an idle connection is kept; upstreams commonly close theirs after 60–75 s, and
/// a connection found closed is skipped anyway.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept at most; more are closed when given back.
const MAX_IDLE: usize = 1024;
/// How often idle connections past [`IDLE_TIMEOUT`] are closed when no request comes to
/// find them (after a burst, say).
pub(crate) const REAP_EVERY: Duration = Duration::from_secs(30);
/// Idle lists: one for the threads that are no shard, one per shard after it (shards past
/// the last list share lists, which only costs hand-offs).
pub(crate) const IDLE_LISTS: usize = 17;

type Sender = SendRequest<UpstreamBody>;

/// The connections to the upstream open now (`keygate_upstream_connections`), both
/// protocols: each counts from its handshake until its task ends.
#[derive(Clone, Default)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    pub fn current(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one more until the returned guard is dropped.
    pub(crate) fn opened(&self) -> OpenConnection {
        self.0.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.0.clone())
    }
}

/// One open connection, held by its task.
pub(crate) struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made: nothing reached the upstream.
    #[error("{0}")]
    Connect(String),
    /// The connection failed while the request was being sent or answered.
    #[error("{0}")]
    Request(#[source] BoxError),
}

/// The connections to one origin.
#[derive(Clone)]
pub struct UpstreamPool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the upstream: what the connector connects to.
    origin: Uri,
    /// Most recently given back at the back.
    idle: [IdleList; IDLE_LISTS],
    /// Whether the task that closes expired idle connections runs (started with the first
    /// connection given back: by then there is a runtime).
    reaping: AtomicBool,
    open: OpenConnections,
}

/// On a cache line of its own: shards take their lists from separate cores.
#[derive(Default)]
#[repr(align(128))]
struct IdleList(Mutex<VecDeque<Idle>>);

impl IdleList {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // A panic while holding the list leaves it consistent: a VecDeque of senders.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl UpstreamPool {
    /// HTTP/1.1 connections to `origin`, counted in `open`.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        open: OpenConnections,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                connector,
                origin,
                idle: std::array::from_fn(|_| IdleList::default()),
                reaping: AtomicBool::new(false),
                open,
            }),
        }
    }

    /// Sends `request` (origin-form URI, Host set) on an idle connection, or a new one. A
    /// kept-alive connection the upstream closed before it took the request gets the same
    /// request again on the next connection: nothing of it was sent.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: connecting (the connector's and the handshake's state, 1.3 KB) is
                // rare once the pool is warm, and inline it would be part of every request's
                // future, on every layer that holds this one.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease::Connection {
                        sender,
                        pool: self.shared.clone(),
                    };
                    return Ok(PooledBody::lent(response.map(AnswerBody::Http1), lease));
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(PoolError::Request(failed.into_error().into())),
                },
            }
        }
    }

    /// The most recently used idle connection that can take a request now. The list holds
    /// connections that were ready when given back; one that is not ready now stays for
    /// later and is never waited on here, whatever keeps it busy.
    fn checkout(&self) -> Option<Sender> {
        let now = Instant::now();
        let mut idle = self.shared.lock();
        let mut busy = Vec::new();
        let ready = loop {
            let Some(candidate) = idle.pop_back() else {
                break None;
            };
            if now - candidate.since > IDLE_TIMEOUT || candidate.sender.is_closed() {
                continue;
            }
            if candidate.sender.is_ready() {
                break Some(candidate.sender);
            }
            busy.push(candidate);
        };
        // Back where they were: newest at the back, as `expire` expects.
        while let Some(candidate) = busy.pop() {
            idle.push_back(candidate);
        }
        ready
    }

    async fn connect(&self) -> Result<Sender, PoolError> {
        let mut connector = self.shared.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| PoolError::Connect(crate::forward::error_chain(e.as_ref())))?;
        let io = connector
            .call(self.shared.origin.clone())
            .await
            .map_err(|e| PoolError::Connect(crate::forward::error_chain(e.as_ref())))?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(crate::forward::error_chain(&e)))?;
        tokio::spawn(Driven {
            connection,
            _open: self.shared.open.opened(),
        });
        Ok(sender)
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.shared.idle.iter().map(|list| list.lock().len()).sum()
    }
}

impl Shared {
    /// This thread's idle list.
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle[crate::shards::current() % IDLE_LISTS].lock()
    }

    fn give_back(self: &Arc<Self>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        if !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
        let now = Instant::now();
        let mut idle = self.lock();
        Self::expire(&mut idle, now);
        while idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    /// Closes the idle connections past [`IDLE_TIMEOUT`]: the oldest are at the front.
    fn expire(idle: &mut VecDeque<Idle>, now: Instant) {
        while idle
            .front()
            .is_some_and(|oldest| now - oldest.since > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
    }
}

/// Closes expired idle connections every [`REAP_EVERY`] until the pool is gone.
async fn reap(pool: Weak<Shared>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        for list in &pool.idle {
            Shared::expire(&mut list.lock(), now);
        }
    }
}

pin_project_lite::pin_project! {
    /// Drives one upstream connection until it closes. Written by hand: an `async` block
    /// awaiting the connection would hold it twice (captured, then awaited), 1.7 KB more
    /// in the task of every upstream connection.
    struct Driven<C> {
        #[pin]
        connection: C,
        _open: OpenConnection,
    }
}

impl<C: Future<Output = Result<(), hyper::Error>>> Future for Driven<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Err(e) = ready!(self.project().connection.poll(cx)) {
            tracing::debug!(error = %e, "upstream connection ended");
        }
        Poll::Ready(())
    }
}

/// What a request holds until its answer has been read: an HTTP/1.1 connection, or a
/// stream of an HTTP/2 one.
enum Lease {
    Connection {
        sender: Sender,
        pool: Arc<Shared>,
    },
    Stream(
        #[expect(dead_code, reason = "held for its Drop, which gives the stream back")] StreamLease,
    ),
}

/// The upstream's answer body. Read to its end, it gives its connection back for the next
/// request; dropped before (the client went away) or broken, the connection is closed.
pub struct PooledBody {
    body: AnswerBody,
    lease: Option<Lease>,
}

/// An answer's bytes as they come: from hyper's HTTP/1.1 client, or from an HTTP/2 stream
/// keygate drives itself.
enum AnswerBody {
    Http1(Incoming),
    Http2(AnswerStream),
}

impl AnswerBody {
    fn is_end_stream(&self) -> bool {
        match self {
            AnswerBody::Http1(body) => body.is_end_stream(),
            AnswerBody::Http2(body) => body.is_end_stream(),
        }
    }
}

impl PooledBody {
    /// An answer over an HTTP/2 stream ([`crate::upstream_h2`]): the stream is given back
    /// as the answer's connection would be.
    pub(crate) fn on_stream(
        response: Response<AnswerStream>,
        stream: StreamLease,
    ) -> Response<Self> {
        Self::lent(response.map(AnswerBody::Http2), Lease::Stream(stream))
    }

    fn lent(response: Response<AnswerBody>, lease: Lease) -> Response<Self> {
        let (parts, body) = response.into_parts();
        let mut body = PooledBody {
            body,
            lease: Some(lease),
        };
        // hyper's server never polls an empty body: give the connection back now.
        if body.body.is_end_stream() {
            body.release();
        }
        Response::from_parts(parts, body)
    }

    fn release(&mut self) {
        let Some(Lease::Connection { mut sender, pool }) = self.lease.take() else {
            // A stream is given back by dropping its lease.
            return;
        };
        if sender.is_ready() {
            pool.give_back(sender);
            return;
        }
        // Not ready yet: the connection is finishing this exchange (a moment), or still
        // sending a request body the upstream answered early (as long as that upload
        // takes). Only ready connections go in the list, so a task waits for this one.
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.give_back(sender);
            }
        });
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match &mut this.body {
            AnswerBody::Http1(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|r| r.map_err(BoxError::from))
            }
            AnswerBody::Http2(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|r| r.map_err(BoxError::from))
            }
        };
        match &frame {
            Some(Ok(_)) if !this.body.is_end_stream() => {}
            Some(Ok(_)) | None => this.release(),
            Some(Err(_)) => this.lease = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            AnswerBody::Http1(body) => body.size_hint(),
            AnswerBody::Http2(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A raw HTTP/1.1 upstream: answers every request on a connection with `answer`, and
    /// closes the connection after `per_connection` answers. Counts connections.
    async fn upstream(answer: &'static str, per_connection: usize) -> (Uri, Arc<AtomicUsize>) {
        let (listener, origin) = listen().await;
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    for _ in 0..per_connection {
                        if read_head(&mut stream).await.is_none() {
                            return;
                        }
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Closed without a word, as an upstream closing a kept-alive connection.
                });
            }
        });
        (origin, connections)
    }

    async fn listen() -> (TcpListener, Uri) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        (listener, origin)
    }

    /// Reads one request head (and whatever came with it); `None` at the end of the stream.
    async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut buffer = [0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
        Some(head)
    }

    /// Waits until `n` connections are idle: one given back while its connection was
    /// still finishing the exchange goes through a task.
    async fn until_idle(pool: &UpstreamPool, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.idle_count() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} idle, not {n}",
                pool.idle_count()
            );
            tokio::task::yield_now().await;
        }
    }

    fn pool(origin: Uri) -> UpstreamPool {
        let connector = crate::forward::https_connector(
            rustls::RootCertStore::empty(),
            Duration::from_secs(1),
            crate::config::UpstreamProtocol::Http1,
        )
        .unwrap();
        UpstreamPool::new(connector, origin, OpenConnections::default())
    }

    fn get() -> Request<UpstreamBody> {
        let mut request = Request::new(UpstreamBody::Held(None));
        *request.uri_mut() = Uri::from_static("/v1/models");
        request.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static("upstream"),
        );
        request
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    // On two worker threads, as in production: the connection's task and the request's
    // run in parallel, and the connection must still be ready when the next request asks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_is_reused_once_its_answer_is_read() {
        let (origin, connections) = upstream(OK, usize::MAX).await;
        let pool = pool(origin);
        for _ in 0..5 {
            let response = pool.send(get()).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
            until_idle(&pool, 1).await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    /// The gauge behind `keygate_upstream_connections` follows a connection from its
    /// handshake to its close.
    #[tokio::test]
    async fn open_connections_are_counted_until_they_close() {
        let (origin, connections) = upstream(OK, usize::MAX).await;
        let pool = pool(origin);
        let open = pool.shared.open.clone();
        let response = pool.send(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        until_idle(&pool, 1).await;
        assert_eq!(open.current(), 1, "kept alive, still open");
        // The pool gone, its idle connection is closed.
        drop(pool);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while open.current() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "still counted as open"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_without_a_body_gives_the_connection_back_unread() {
        let (origin, connections) = upstream("HTTP/1.1 204 No Content\r\n\r\n", usize::MAX).await;
        let pool = pool(origin);
        for _ in 0..3 {
            let response = pool.send(get()).await.unwrap();
            assert_eq!(response.status(), 204);
            until_idle(&pool, 1).await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced_without_an_error() {
        // One answer per connection, then a silent close: every kept-alive connection
        // is stale by the time the next request wants it.
        let (origin, connections) = upstream(OK, 1).await;
        let pool = pool(origin);
        for _ in 0..5 {
            let response = pool.send(get()).await.expect("a fresh connection answers");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_kept_alive_connection_closed_while_idle_is_not_used_again() {
        // Each connection answers once, then waits; the test closes it while it idles.
        let (listener, origin) = listen().await;
        let close = Arc::new(tokio::sync::Notify::new());
        let connections = Arc::new(AtomicUsize::new(0));
        let (counted, closing) = (connections.clone(), close.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let closing = closing.clone();
                tokio::spawn(async move {
                    read_head(&mut stream).await;
                    let _ = stream.write_all(OK.as_bytes()).await;
                    closing.notified().await;
                });
            }
        });
        let pool = pool(origin);
        let response = pool.send(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        until_idle(&pool, 1).await;

        close.notify_one();
        // The connection's task sees the close on its own; wait for it, bounded.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pool
            .shared
            .lock()
            .back()
            .is_some_and(|idle| idle.sender.is_closed())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::task::yield_now().await;
        }
        let response = pool.send(get()).await.expect("a new connection answers");
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_request_body_does_not_hold_up_the_next_request() {
        // The upstream answers a large upload early (as with a 400 or 413) and reads no
        // further: that connection stays busy sending the body. Small requests are
        // answered normally.
        let (listener, origin) = listen().await;
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    while let Some(head) = read_head(&mut stream).await {
                        if String::from_utf8_lossy(&head).contains("content-length: 8388608") {
                            let early = "HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno";
                            let _ = stream.write_all(early.as_bytes()).await;
                            std::future::pending::<()>().await;
                        }
                        if stream.write_all(OK.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let pool = pool(origin);
        let mut upload = get();
        *upload.body_mut() = UpstreamBody::Held(Some(Bytes::from(vec![b'x'; 8 * 1024 * 1024])));
        upload.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("8388608"),
        );
        let early = pool.send(upload).await.unwrap();
        assert_eq!(early.status(), 400);
        early.into_body().collect().await.unwrap();

        let next = tokio::time::timeout(Duration::from_secs(5), pool.send(get()))
            .await
            .expect("the next request is not held up by the busy connection")
            .unwrap();
        assert_eq!(next.into_body().collect().await.unwrap().to_bytes(), "ok");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (origin, connections) = upstream(
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part of it",
            usize::MAX,
        )
        .await;
        let pool = pool(origin);
        let response = pool.send(get()).await.unwrap();
        drop(response);
        assert_eq!(pool.idle_count(), 0, "a half-read connection is not reused");
        let _second = pool.send(get()).await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_idle_timeout_without_traffic() {
        let (origin, _) = upstream(OK, usize::MAX).await;
        let pool = pool(origin);
        let response = pool.send(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        until_idle(&pool, 1).await;
        tokio::time::sleep(IDLE_TIMEOUT).await;
        assert_eq!(pool.idle_count(), 1, "kept for the idle timeout");
        tokio::time::sleep(REAP_EVERY * 2).await;
        assert_eq!(
            pool.idle_count(),
            0,
            "closed once past it, with no request to find it"
        );
    }

    #[tokio::test]
    async fn each_shard_reuses_its_own_connections() {
        let (origin, connections) = upstream(OK, usize::MAX).await;
        let pool = pool(origin);
        let mut shards = crate::shards::Shards::start(2).unwrap();
        let (first, second) = (shards.next_in_turn().clone(), shards.next_in_turn().clone());
        let request_on = |shard: &tokio::runtime::Handle| {
            let pool = pool.clone();
            shard.spawn(async move {
                let response = pool.send(get()).await.unwrap();
                response.into_body().collect().await.unwrap();
            })
        };
        request_on(&first).await.unwrap();
        until_idle(&pool, 1).await;
        request_on(&second).await.unwrap();
        until_idle(&pool, 2).await;
        assert_eq!(
            connections.load(Ordering::SeqCst),
            2,
            "the second shard opened its own"
        );
        for shard in [&first, &second, &first] {
            request_on(shard).await.unwrap();
        }
        until_idle(&pool, 2).await;
        assert_eq!(connections.load(Ordering::SeqCst), 2, "each reused its own");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let closed: Uri = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/", listener.local_addr().unwrap())
                .parse()
                .unwrap()
        };
        let pool = pool(closed);
        assert!(matches!(pool.send(get()).await, Err(PoolError::Connect(_))));
    }
}
