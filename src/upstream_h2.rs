//! Owns the HTTP/2 connections to the upstream (`upstream.protocol = "http2"`): requests in
//! flight share a connection, a stream each, up to the number the upstream allows on it
//! (its `SETTINGS_MAX_CONCURRENT_STREAMS`, at most 256); a request that finds every
//! connection full opens another, so none waits inside keygate for a stream.
//!
//! Why: image generation holds a request for seconds. Over HTTP/1.1 each request in flight
//! holds a connection of its own (a socket, a TLS session, hyper's buffers and channel);
//! over HTTP/2 a hundred share one (PERFORMANCE.md, session 9).
//!
//! A connection counts its streams from the moment it is asked for: requests that come
//! while it connects wait for it (up to 100, until its settings say) instead of each
//! opening one of their own, and those over the limit the upstream then announces move on
//! to another.
//!
//! The connections are driven on the `h2` crate directly, not through hyper's HTTP/2
//! client: hyper's spawns two tasks a request (~5 KB each, for as long as the request is
//! in flight) and hands requests to the connection over a channel; here a request's own
//! future opens its stream, hands a held body to `h2` whole, pumps a streamed one as the
//! windows open, and the answer's body reads the stream (PERFORMANCE.md, session 10).

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;
use std::time::Duration;

// Tokio's clock, so that tests can move it.
use tokio::time::Instant;

use bytes::Bytes;
use http::header;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
#[cfg(test)]
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tower_service::Service;

use crate::body::{content_length, BoxError, InboundBody, UpstreamBody};
use crate::upstream_pool::{
    OpenConnections, PoolError, PooledBody, IDLE_LISTS, IDLE_TIMEOUT, REAP_EVERY,
};

/// Streams on one connection at most, whatever the upstream allows: past a few hundred,
/// what the requests share is one TCP window and one task.
const MAX_STREAMS: usize = 256;
/// Streams a connection is taken to allow until the upstream's settings say: RFC 9113's
/// recommended minimum, and hyper's own assumption.
const ASSUMED_STREAMS: usize = 100;
/// Times a request is sent again after the upstream refused its stream unprocessed, or its
/// connection ended before taking it.
const RESENDS: usize = 3;
/// Pings on a connection, idle or not: a dead one is found before a request is sent on it.
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Flow-control windows and frame limits: hyper's HTTP/2 client defaults, which this pool
/// used before it drove `h2` itself (an answer keeps flowing while the client reads it).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

type Sender = h2::client::SendRequest<Bytes>;

/// Why a request went out again on another stream: the upstream's application never saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResendReason {
    /// The upstream refused the stream (`REFUSED_STREAM`): often its stream limit, lowered.
    RefusedStream,
    /// The stream raced the upstream closing the connection (GOAWAY).
    GoingAway,
    /// The connection had closed or was closing before the stream could open.
    ConnectionClosed,
}

impl ResendReason {
    pub const ALL: [ResendReason; 3] = [
        ResendReason::RefusedStream,
        ResendReason::GoingAway,
        ResendReason::ConnectionClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResendReason::RefusedStream => "refused_stream",
            ResendReason::GoingAway => "going_away",
            ResendReason::ConnectionClosed => "connection_closed",
        }
    }
}

/// Requests the HTTP/2 pool sent again, by reason (`keygate_upstream_resends_total`).
#[derive(Clone, Default)]
pub struct Resends(Arc<[std::sync::atomic::AtomicU64; ResendReason::ALL.len()]>);

impl Resends {
    fn count(&self, reason: ResendReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: ResendReason) -> &std::sync::atomic::AtomicU64 {
        &self.0[reason as usize]
    }
}

/// The HTTP/2 connections to one origin.
#[derive(Clone)]
pub struct Http2Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: what the connector connects to.
    origin: Uri,
    /// The origin's parts, which every request names (`to_absolute_form`).
    scheme: Scheme,
    authority: Authority,
    /// How long a new connection has to connect and send its settings.
    settle_within: Duration,
    /// One list per shard, as the HTTP/1.1 pool's idle lists: a connection's task runs
    /// on the shard that opened it.
    lists: [ConnList; IDLE_LISTS],
    next_id: AtomicU64,
    reaping: AtomicBool,
    open: OpenConnections,
    resends: Resends,
}

#[derive(Default)]
#[repr(align(128))]
struct ConnList(Mutex<Vec<Conn>>);

struct Conn {
    id: u64,
    /// Streams lent: requests on it, and requests waiting for it to connect.
    streams: usize,
    /// Streams it takes: [`ASSUMED_STREAMS`] until the upstream's settings say.
    limit: usize,
    /// Set once connected and the upstream's settings read.
    sender: Option<Sender>,
    /// When `streams` last fell to 0.
    idle_since: Instant,
    settled: watch::Receiver<Settled>,
}

#[derive(Clone)]
enum Settled {
    Connecting,
    Ready,
    Failed(Arc<str>),
}

/// Where a new stream's request goes: a settled connection with room (the common case,
/// one lock a request), or one still connecting, to wait for.
enum Attached {
    Ready(Sender),
    Connecting(watch::Receiver<Settled>),
}

/// A stream lent to one request until its answer has been read or dropped.
pub(crate) struct StreamLease {
    pool: Arc<Shared>,
    list: usize,
    id: u64,
    /// Whether its connection still counts it (not once given back over the limit).
    counted: bool,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        if self.counted {
            let mut conns = self.pool.list(self.list);
            if let Some(conn) = conns.iter_mut().find(|conn| conn.id == self.id) {
                conn.give_back_stream();
            }
        }
    }
}

impl Conn {
    fn give_back_stream(&mut self) {
        self.streams -= 1;
        if self.streams == 0 {
            self.idle_since = Instant::now();
        }
    }
}

impl Http2Pool {
    /// HTTP/2 connections to `origin` (`scheme://authority/`), counted in `open`, each taking
    /// as many requests at once as the upstream allows; a new one has `settle_within` to
    /// connect and send its settings. `connector` must offer only h2 by ALPN
    /// ([`crate::forward::https_connector`]). Requests sent again are counted in `resends`.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: &Uri,
        settle_within: Duration,
        open: OpenConnections,
        resends: Resends,
    ) -> Result<Self, String> {
        let (Some(scheme), Some(authority)) = (origin.scheme(), origin.authority()) else {
            return Err(format!("upstream {origin} is not scheme://host"));
        };
        Ok(Self {
            shared: Arc::new(Shared {
                connector,
                scheme: scheme.clone(),
                authority: authority.clone(),
                origin: origin.clone(),
                settle_within,
                lists: std::array::from_fn(|_| ConnList::default()),
                next_id: AtomicU64::new(0),
                reaping: AtomicBool::new(false),
                open,
                resends,
            }),
        })
    }

    /// Sends `request` (origin-form URI) on a stream of a connection with room, or of a
    /// new one.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        let (response, stream) = self.send_on_stream(request).await?;
        Ok(PooledBody::on_stream(response, stream))
    }

    async fn send_on_stream(
        &self,
        mut request: Request<UpstreamBody>,
    ) -> Result<(Response<AnswerStream>, StreamLease), PoolError> {
        self.to_absolute_form(&mut request)?;
        let mut resends = 0;
        loop {
            let (mut lease, attached) = self.attach();
            let mut sender = match attached {
                Attached::Ready(sender) => sender,
                Attached::Connecting(mut settled) => {
                    let outcome = settled
                        .wait_for(|settled| !matches!(settled, Settled::Connecting))
                        .await
                        .map(|settled| settled.clone());
                    match outcome {
                        Ok(Settled::Ready) => {}
                        Ok(Settled::Failed(cause)) => {
                            return Err(PoolError::Connect(cause.to_string()))
                        }
                        Ok(Settled::Connecting) | Err(_) => {
                            return Err(PoolError::Connect("upstream connection task ended".into()))
                        }
                    }
                    // Over the limit the upstream announced (or its connection already
                    // gone): the lease is given back and the request looks again.
                    let Some(sender) = self.shared.take_stream(&mut lease) else {
                        continue;
                    };
                    sender
                }
            };
            // A held body is kept for one more stream: an upstream closing a connection
            // (GOAWAY, e.g. nginx after `keepalive_requests`) refuses the streams that
            // raced it, and those go out again at once on another connection.
            let again = match request.body() {
                UpstreamBody::Held(bytes) if resends < RESENDS => Some(copy(&request, bytes)),
                _ => None,
            };
            let failure = match exchange(&mut sender, request).await {
                Ok(response) => return Ok((response, lease)),
                Err(failure) => failure,
            };
            let (cause, unsent, reason) = match failure {
                Failure::Unsent(cause, unsent) => {
                    // The connection is closing or gone (maybe before its task has taken
                    // it out of the list): no more for it.
                    self.shared.forget(lease.list, lease.id);
                    (cause, unsent, ResendReason::ConnectionClosed)
                }
                Failure::Refused(Refusal::GoingAway, cause) => {
                    self.shared.forget(lease.list, lease.id);
                    (cause, None, ResendReason::GoingAway)
                }
                Failure::Refused(Refusal::Stream, cause) => {
                    (cause, None, ResendReason::RefusedStream)
                }
                Failure::Failed(cause) => return Err(PoolError::Request(cause)),
            };
            request = match unsent.map(|request| *request).or(again) {
                Some(request) if resends < RESENDS => {
                    self.shared.resends.count(reason);
                    request
                }
                Some(_) => {
                    return Err(PoolError::Connect(format!(
                        "{RESENDS} upstream connections refused the request or ended before \
                         taking it: {}",
                        crate::forward::error_chain(&cause)
                    )))
                }
                None => return Err(PoolError::Connect(crate::forward::error_chain(&cause))),
            };
            resends += 1;
        }
    }

    /// HTTP/2 names the origin in the `:scheme` and `:authority` of every request, not in
    /// `Host` (RFC 9113, 8.3.1).
    fn to_absolute_form(&self, request: &mut Request<UpstreamBody>) -> Result<(), PoolError> {
        let path_and_query = request.uri().path_and_query().cloned();
        let mut uri = Uri::builder()
            .scheme(self.shared.scheme.clone())
            .authority(self.shared.authority.clone());
        if let Some(path_and_query) = path_and_query {
            uri = uri.path_and_query(path_and_query);
        }
        *request.uri_mut() = uri
            .build()
            .map_err(|e| PoolError::Connect(format!("upstream request target: {e}")))?;
        request.headers_mut().remove(header::HOST);
        *request.version_mut() = Version::HTTP_2;
        Ok(())
    }

    /// A stream on the first connection of this thread's list with room, or on a new one
    /// (connecting in its own task, so that a request that goes away does not take the
    /// connection others wait for with it).
    fn attach(&self) -> (StreamLease, Attached) {
        let list = crate::shards::current() % IDLE_LISTS;
        let lease = |id| StreamLease {
            pool: self.shared.clone(),
            list,
            id,
            counted: true,
        };
        let mut conns = self.shared.list(list);
        // The first with room: requests are packed onto the oldest connections, and the
        // newest fall idle and expire when the load falls.
        if let Some(conn) = conns.iter_mut().find(|conn| conn.streams < conn.limit) {
            conn.streams += 1;
            let attached = match &conn.sender {
                Some(sender) => Attached::Ready(sender.clone()),
                None => Attached::Connecting(conn.settled.clone()),
            };
            return (lease(conn.id), attached);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tell, settled) = watch::channel(Settled::Connecting);
        conns.push(Conn {
            id,
            streams: 1,
            limit: ASSUMED_STREAMS,
            sender: None,
            idle_since: Instant::now(),
            settled: settled.clone(),
        });
        drop(conns);
        if !self.shared.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(&self.shared)));
        }
        tokio::spawn(connect_and_drive(
            Arc::downgrade(&self.shared),
            list,
            id,
            tell,
        ));
        (lease(id), Attached::Connecting(settled))
    }

    #[cfg(test)]
    fn connections(&self) -> Vec<(usize, usize)> {
        self.shared
            .lists
            .iter()
            .flat_map(|list| {
                let conns = list.0.lock().unwrap();
                conns
                    .iter()
                    .map(|conn| (conn.streams, conn.limit))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Shared {
    fn list(&self, list: usize) -> MutexGuard<'_, Vec<Conn>> {
        // A panic while holding the list leaves it consistent: plain counts and senders.
        self.lists[list]
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection's sender if the lease fits under the limit its upstream announced;
    /// `None` (the lease given back) if not, or if the connection is gone. Given back
    /// under the list's lock, one at a time: of eight waiting on a connection that takes
    /// two, six leave and two stay.
    fn take_stream(&self, lease: &mut StreamLease) -> Option<Sender> {
        let mut conns = self.list(lease.list);
        let Some(conn) = conns.iter_mut().find(|conn| conn.id == lease.id) else {
            lease.counted = false;
            return None;
        };
        if conn.streams > conn.limit {
            conn.give_back_stream();
            lease.counted = false;
            return None;
        }
        conn.sender.clone()
    }

    /// Records what the upstream's settings allow on connection `id`, and its sender the
    /// first time.
    fn settle(&self, list: usize, id: u64, limit: usize, sender: Option<Sender>) {
        let mut conns = self.list(list);
        if let Some(conn) = conns.iter_mut().find(|conn| conn.id == id) {
            conn.limit = limit;
            if sender.is_some() {
                conn.sender = sender;
            }
        }
    }

    fn forget(&self, list: usize, id: u64) {
        self.list(list).retain(|conn| conn.id != id);
    }
}

/// Connects, then drives the connection until it ends, telling the requests waiting for it
/// once the upstream's settings say how many streams it takes.
async fn connect_and_drive(pool: Weak<Shared>, list: usize, id: u64, tell: watch::Sender<Settled>) {
    let Some(settle_within) = pool.upgrade().map(|pool| pool.settle_within) else {
        return;
    };
    let settle_by = Instant::now() + settle_within;
    let connected = tokio::time::timeout_at(settle_by, Box::pin(connect(&pool)))
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {settle_within:?}")));
    let ended = match connected {
        Ok((sender, connection)) => {
            let Some(_open) = pool.upgrade().map(|pool| pool.open.opened()) else {
                return;
            };
            let settling = Settling {
                pool: &pool,
                list,
                id,
                tell: &tell,
                by: settle_by,
            };
            drive(settling, sender, connection).await
        }
        Err(cause) => Err(cause),
    };
    if let Some(pool) = pool.upgrade() {
        pool.forget(list, id);
    }
    match ended {
        Err(cause) if matches!(*tell.borrow(), Settled::Connecting) => {
            tracing::debug!(cause = %cause, "upstream HTTP/2 connection failed");
            tell.send_replace(Settled::Failed(cause.into()));
        }
        Err(cause) => tracing::debug!(cause = %cause, "upstream HTTP/2 connection ended"),
        Ok(()) => {
            if matches!(*tell.borrow(), Settled::Connecting) {
                tell.send_replace(Settled::Failed(
                    "the upstream closed the connection before its settings".into(),
                ));
            }
        }
    }
}

type Io = TokioIo<hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>;
type Driven = h2::client::Connection<Io, Bytes>;

async fn connect(pool: &Weak<Shared>) -> Result<(Sender, Driven), String> {
    let (mut connector, origin) = {
        let pool = pool.upgrade().ok_or("the pool is gone")?;
        (pool.connector.clone(), pool.origin.clone())
    };
    std::future::poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(|e| crate::forward::error_chain(e.as_ref()))?;
    let io = connector
        .call(origin)
        .await
        .map_err(|e| crate::forward::error_chain(e.as_ref()))?;
    if matches!(io, hyper_rustls::MaybeHttpsStream::Https(_)) && !io.connected().is_negotiated_h2()
    {
        return Err("the upstream did not agree to HTTP/2 (ALPN h2)".into());
    }
    h2::client::Builder::new()
        // No stream before the upstream's settings: a first stream count other than the
        // upstream's own is how requests come to wait inside keygate for a stream.
        .initial_max_send_streams(0)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| crate::forward::error_chain(&e))
}

/// A new connection's place in the pool, and who waits for its settings until when.
struct Settling<'a> {
    pool: &'a Weak<Shared>,
    list: usize,
    id: u64,
    tell: &'a watch::Sender<Settled>,
    by: Instant,
}

/// Polls the connection until it ends; after each poll, passes on what the upstream's
/// settings now allow (the connection reads its frames in this task, so their arrival
/// wakes it). Until they arrive, nothing is sent on it. Pings every [`PING_EVERY`], idle or
/// not, and ends the connection when one goes unanswered for [`PING_TIMEOUT`].
async fn drive(
    settling: Settling<'_>,
    sender: Sender,
    mut connection: Driven,
) -> Result<(), String> {
    let Settling {
        pool,
        list,
        id,
        tell,
        by,
    } = settling;
    let mut pings = connection.ping_pong();
    let mut unsettled = Some(sender);
    let mut allowed = 0;
    let mut settle_by = pin!(tokio::time::sleep_until(by));
    let mut ping_timer = pin!(tokio::time::sleep(PING_EVERY));
    let mut awaiting_pong = false;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(ended) = std::pin::Pin::new(&mut connection).poll(cx) {
            return Poll::Ready(ended.map_err(|e| crate::forward::error_chain(&e)));
        }
        let now_allowed = connection.max_concurrent_send_streams().min(MAX_STREAMS);
        // 0 before the settings (see `initial_max_send_streams`); after them, 0 is the
        // upstream asking for no new streams for now.
        if now_allowed != allowed && (now_allowed > 0 || unsettled.is_none()) {
            allowed = now_allowed;
            let Some(pool) = pool.upgrade() else {
                return Poll::Ready(Ok(()));
            };
            let first = unsettled.take();
            let settling = first.is_some();
            pool.settle(list, id, allowed, first);
            if settling {
                tell.send_replace(Settled::Ready);
            }
        }
        if unsettled.is_some() && settle_by.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err("no HTTP/2 settings from the upstream in time".into()));
        }
        if let Some(pings) = pings.as_mut() {
            if awaiting_pong {
                match pings.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        awaiting_pong = false;
                        ping_timer.as_mut().reset(Instant::now() + PING_EVERY);
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(crate::forward::error_chain(&e)))
                    }
                    Poll::Pending => {}
                }
            }
            if ping_timer.as_mut().poll(cx).is_ready() {
                if awaiting_pong {
                    return Poll::Ready(Err(format!(
                        "no answer to a ping within {PING_TIMEOUT:?}"
                    )));
                }
                if let Err(e) = pings.send_ping(h2::Ping::opaque()) {
                    return Poll::Ready(Err(crate::forward::error_chain(&e)));
                }
                awaiting_pong = true;
                ping_timer.as_mut().reset(Instant::now() + PING_TIMEOUT);
                continue;
            }
        }
        return Poll::Pending;
    })
    .await
}

/// Another request like `request`, with `body`'s bytes (shared, not copied).
fn copy(request: &Request<UpstreamBody>, body: &Option<Bytes>) -> Request<UpstreamBody> {
    let mut copy = Request::new(UpstreamBody::Held(body.clone()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// How the upstream refused a stream before doing anything with it (RFC 9113, 8.7):
/// nothing reached it, as with a failed connect, so the request may be sent again.
enum Refusal {
    /// A GOAWAY before it: the connection takes no new streams.
    GoingAway,
    /// `REFUSED_STREAM` on this one stream.
    Stream,
}

fn refusal(error: &h2::Error) -> Option<Refusal> {
    if error.is_go_away() && error.is_remote() {
        return Some(Refusal::GoingAway);
    }
    (error.reason() == Some(h2::Reason::REFUSED_STREAM)).then_some(Refusal::Stream)
}

/// Why an exchange on a stream got no answer.
enum Failure {
    /// The connection would open no stream for it (closing, or gone): nothing was sent.
    /// The request, when it was not yet given to `h2`.
    /// (Boxed: a request is ten times the size of the other variants, and rare here.)
    Unsent(h2::Error, Option<Box<Request<UpstreamBody>>>),
    /// The upstream refused the stream before processing it.
    Refused(Refusal, h2::Error),
    /// Anything else: the upstream may have seen the request.
    Failed(BoxError),
}

/// Sends `request` on a new stream of `sender`'s connection and waits for the answer's
/// head, sending a streamed body meanwhile. No task is spawned: a held body is handed to
/// `h2` whole (it sends it as the windows allow), a streamed one is pumped here and then by
/// the answer's body ([`AnswerStream`]).
async fn exchange(
    sender: &mut Sender,
    request: Request<UpstreamBody>,
) -> Result<Response<AnswerStream>, Failure> {
    if let Err(cause) = std::future::poll_fn(|cx| sender.poll_ready(cx)).await {
        return Err(Failure::Unsent(cause, Some(Box::new(request))));
    }
    let (mut head, body) = request.into_parts();
    if let Some(length) = body.size_hint().exact() {
        // hyper's HTTP/1.1 client says it for a held body too: the upstream sees the same.
        let has_payload_semantics = !matches!(
            head.method,
            http::Method::GET | http::Method::HEAD | http::Method::DELETE | http::Method::OPTIONS
        );
        if !head.headers.contains_key(header::CONTENT_LENGTH)
            && (length > 0 || has_payload_semantics)
        {
            head.headers
                .insert(header::CONTENT_LENGTH, http::HeaderValue::from(length));
        }
    }
    let end_of_stream = body.is_end_stream();
    let (answer, mut send) = sender
        .send_request(Request::from_parts(head, ()), end_of_stream)
        .map_err(|cause| Failure::Unsent(cause, None))?;
    let mut pump = match body {
        UpstreamBody::Held(Some(bytes)) => {
            // Buffered by `h2` and sent as the windows open; a failure shows in the answer.
            let _ = send.send_data(bytes, true);
            None
        }
        UpstreamBody::Held(None) => None,
        UpstreamBody::Streamed(body) => Some(Pump {
            body,
            send,
            pending: None,
        }),
    };
    let mut answer = pin!(answer);
    let head = std::future::poll_fn(|cx| {
        if let Some(running) = pump.as_mut() {
            if running.poll(cx).is_ready() {
                pump = None;
            }
        }
        answer.as_mut().poll(cx)
    })
    .await;
    match head {
        Ok(response) => {
            let (mut parts, stream) = response.into_parts();
            // The answer goes on to the client over the client's own connection, whatever
            // its version: an HTTP/1.1 one would log a coercion each time.
            parts.version = Version::HTTP_11;
            let remaining = content_length(&parts.headers);
            Ok(Response::from_parts(
                parts,
                AnswerStream {
                    stream,
                    pump,
                    remaining,
                    data_done: false,
                },
            ))
        }
        Err(cause) => Err(match refusal(&cause) {
            Some(refused) => Failure::Refused(refused, cause),
            None => Failure::Failed(Box::new(cause)),
        }),
    }
}

/// Sends a body streamed from the client on its stream as the upstream's windows open:
/// no more of it read than can be sent.
struct Pump {
    body: Box<InboundBody>,
    send: h2::SendStream<Bytes>,
    /// Read from the client, not yet sent.
    pending: Option<Bytes>,
}

impl Pump {
    /// Ready when the body has been sent whole, or the stream failed (the answer tells
    /// the upstream's side; a client body that failed is the client's, and resets it).
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        loop {
            if let Some(data) = self.pending.as_mut() {
                self.send.reserve_capacity(data.len());
                match std::task::ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(0)) => continue,
                    Some(Ok(capacity)) => {
                        let chunk = data.split_to(capacity.min(data.len()));
                        // The last bytes end the stream themselves, not a frame after them.
                        let last = data.is_empty() && self.body.is_end_stream();
                        if data.is_empty() {
                            self.pending = None;
                        }
                        if self.send.send_data(chunk, last).is_err() || last {
                            return Poll::Ready(());
                        }
                    }
                    Some(Err(_)) | None => return Poll::Ready(()),
                }
                continue;
            }
            match std::task::ready!(std::pin::Pin::new(&mut *self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.pending = (!data.is_empty()).then_some(data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = self.send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                None => {
                    let _ = self.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Some(Err(_)) => {
                    self.send.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The upstream's answer body on its stream, with what is left of a streamed request body
/// (an answer may come before the upload ends). Dropped before its end, the stream is
/// reset (`h2` cancels a stream nothing holds any more).
pub(crate) struct AnswerStream {
    stream: h2::RecvStream,
    pump: Option<Pump>,
    /// What the answer's `Content-Length` says is still to come.
    remaining: Option<u64>,
    data_done: bool,
}

impl Body for AnswerStream {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if let Some(pump) = this.pump.as_mut() {
            if pump.poll(cx).is_ready() {
                this.pump = None;
            }
        }
        if !this.data_done {
            match std::task::ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window opens as keygate passes the bytes on.
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(remaining) = this.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // An answer to HEAD says the length of a body it does not carry.
        if self.stream.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

/// Closes connections idle past [`IDLE_TIMEOUT`] every [`REAP_EVERY`] until the pool is
/// gone: dropping a connection's last sender closes it.
async fn reap(pool: Weak<Shared>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        for list in 0..IDLE_LISTS {
            pool.list(list).retain(|conn| {
                conn.streams > 0 || conn.sender.is_none() || now - conn.idle_since <= IDLE_TIMEOUT
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Listens on a free port and serves each connection with `serve`, in a task of its
    /// own. Counts connections.
    async fn listen<F, Served>(serve: F) -> (Uri, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Served + Send + 'static,
        Served: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (origin, connections)
    }

    /// An h2c upstream taking 50 streams a connection: `/hang` is never answered,
    /// anything else gets "ok".
    async fn upstream() -> (Uri, Arc<AtomicUsize>) {
        upstream_settling_after(Duration::ZERO).await
    }

    /// The same, sending its settings `delay` after each connection is accepted.
    async fn upstream_settling_after(delay: Duration) -> (Uri, Arc<AtomicUsize>) {
        listen(move |stream| async move {
            tokio::time::sleep(delay).await;
            let service =
                hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    if request.uri().path() == "/hang" {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(50)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        })
        .await
    }

    fn pool(origin: &Uri) -> Http2Pool {
        pool_settling_within(origin, Duration::from_secs(1))
    }

    fn pool_settling_within(origin: &Uri, settle_within: Duration) -> Http2Pool {
        let connector = crate::forward::https_connector(
            rustls::RootCertStore::empty(),
            Duration::from_secs(1),
            crate::config::UpstreamProtocol::Http2,
        )
        .unwrap();
        Http2Pool::new(
            connector,
            origin,
            settle_within,
            OpenConnections::default(),
            Resends::default(),
        )
        .unwrap()
    }

    fn get(path: &'static str) -> Request<UpstreamBody> {
        let mut request = Request::new(UpstreamBody::Held(None));
        *request.uri_mut() = Uri::from_static(path);
        request
    }

    #[tokio::test]
    async fn a_stream_is_given_back_when_its_answer_is_read_or_its_request_dropped() {
        let (origin, connections) = upstream().await;
        let pool = pool(&origin);
        let response = pool.send(get("/ok")).await.unwrap();
        assert_eq!(pool.connections(), [(1, 50)]);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        assert_eq!(
            pool.connections(),
            [(0, 50)],
            "given back at the answer's end"
        );

        // A request that goes away while the upstream thinks gives its stream back too.
        let waiting = pool.send(get("/hang"));
        assert!(tokio::time::timeout(Duration::from_millis(50), waiting)
            .await
            .is_err());
        assert_eq!(pool.connections(), [(0, 50)]);
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    /// An upstream that refuses the first stream of each connection (REFUSED_STREAM) and
    /// answers the others with the body it received.
    async fn refusing_upstream() -> Uri {
        let (origin, _) = listen(|stream| async move {
            let mut connection = h2::server::handshake(stream).await.unwrap();
            let mut first = true;
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                if std::mem::take(&mut first) {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    let mut received = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        received.extend_from_slice(&chunk);
                    }
                    let mut send = respond.send_response(Response::new(()), false).unwrap();
                    let _ = send.send_data(received.into(), true);
                });
            }
        })
        .await;
        origin
    }

    #[tokio::test]
    async fn a_refused_stream_with_a_held_body_is_sent_again_at_once() {
        let origin = refusing_upstream().await;
        let pool = pool(&origin);
        let mut request = get("/echo");
        *request.body_mut() = UpstreamBody::Held(Some(bytes::Bytes::from_static(b"prompt")));
        let response = pool.send(request).await.expect("sent again");
        assert_eq!(response.collect().await.unwrap().to_bytes(), "prompt");
        // On the same connection: a refused stream is not a connection going away.
        assert_eq!(pool.connections().len(), 1);
    }

    /// Settings that come after the connection's first poll still let the requests
    /// waiting for it go, well before the settle timeout (hyper's client woke nothing for
    /// them: the driver had to look again on a timer; reading the frames itself, it is
    /// woken by their arrival).
    #[tokio::test]
    async fn requests_go_once_late_settings_arrive() {
        let (origin, _) = upstream_settling_after(Duration::from_millis(100)).await;
        let pool = pool_settling_within(&origin, Duration::from_secs(60));
        // Were the settings' arrival to wake nothing, they would wait for the settle timeout.
        let response = tokio::time::timeout(Duration::from_secs(5), pool.send(get("/ok")))
            .await
            .expect("not held until the settle timeout")
            .expect("answered");
        assert_eq!(response.collect().await.unwrap().to_bytes(), "ok");
    }

    /// A connection closed as nginx closes one (lingering close): its write side shut, and
    /// what the client still sends read and dropped for a while. Closed with unread data
    /// instead, the socket would reset, and the reset can take the GOAWAY before it along:
    /// the client then cannot tell which of its requests were never processed.
    struct Lingering(Option<tokio::net::TcpStream>);

    impl Lingering {
        fn stream(&mut self) -> Pin<&mut tokio::net::TcpStream> {
            Pin::new(self.0.as_mut().expect("open until dropped"))
        }
    }

    impl tokio::io::AsyncRead for Lingering {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.stream().poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Lingering {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.stream().poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.stream().poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.stream().poll_shutdown(cx)
        }
    }

    impl Drop for Lingering {
        fn drop(&mut self) {
            if let Some(mut stream) = self.0.take() {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let _ = stream.shutdown().await;
                    let mut sink = [0u8; 4096];
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    })
                    .await;
                });
            }
        }
    }

    /// An upstream that closes each connection gracefully (GOAWAY, then a lingering close)
    /// after `per_connection` requests, as nginx does after `keepalive_requests`, answering
    /// "ok".
    async fn rotating_upstream(per_connection: usize) -> (Uri, Arc<AtomicUsize>) {
        listen(move |stream| async move {
            let mut connection = h2::server::handshake(Lingering(Some(stream)))
                .await
                .unwrap();
            let mut served = 0;
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                served += 1;
                if served == per_connection {
                    connection.graceful_shutdown();
                }
                tokio::spawn(async move {
                    let mut send = respond.send_response(Response::new(()), false).unwrap();
                    let _ = send.send_data(bytes::Bytes::from_static(b"ok"), true);
                });
            }
        })
        .await
    }

    /// Requests that race an upstream's GOAWAY (refused, or never taken by a connection
    /// that ended) go out again on another connection: none is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstream_rotating_its_connections_loses_no_request() {
        use futures_util::StreamExt;
        let (origin, connections) = rotating_upstream(25).await;
        let pool = pool(&origin);
        let answers = futures_util::stream::iter(0..1000)
            .map(|_| {
                let pool = pool.clone();
                async move {
                    let mut request = get("/ok");
                    *request.body_mut() = UpstreamBody::Held(Some(bytes::Bytes::from_static(b"p")));
                    let response = pool.send(request).await?;
                    Ok::<_, PoolError>(response.collect().await.unwrap().to_bytes())
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{} lost: {:?}",
            failed.len(),
            failed.first()
        );
        assert!(answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|body| body == "ok")));
        // Each takes its 25 and the streams that came before its last GOAWAY.
        let connections = connections.load(Ordering::SeqCst);
        assert!(
            connections >= 4,
            "{connections} connections: hardly rotated"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (origin, _) = upstream().await;
        let pool = pool(&origin);
        let response = pool.send(get("/ok")).await.unwrap();
        response.into_body().collect().await.unwrap();
        tokio::time::sleep(IDLE_TIMEOUT).await;
        assert_eq!(pool.connections().len(), 1, "kept for the idle timeout");
        tokio::time::sleep(REAP_EVERY * 2).await;
        assert!(pool.connections().is_empty(), "closed once past it");
    }

    /// An upstream that sends its settings (none: defaults) and acknowledges the client's,
    /// then goes silent: no answer, no pong.
    async fn silent_upstream() -> Uri {
        let (origin, _) = listen(|mut stream| async move {
            use tokio::io::AsyncReadExt;
            let settings_then_ack = [0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0];
            stream.write_all(&settings_then_ack).await.unwrap();
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        origin
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_ping_goes_unanswered_is_closed_with_its_requests() {
        let origin = silent_upstream().await;
        let pool = pool(&origin);
        let started = Instant::now();
        let request = tokio::spawn({
            let pool = pool.clone();
            async move { pool.send(get("/ok")).await.map(|_| ()) }
        });
        while pool.connections() != [(1, MAX_STREAMS)] {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep_until(started + PING_EVERY + PING_TIMEOUT - Duration::from_secs(1))
            .await;
        assert_eq!(
            pool.connections().len(),
            1,
            "kept until the ping's answer is late"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(pool.connections().is_empty(), "closed once it is");
        let failed = tokio::time::timeout(Duration::from_secs(1), request)
            .await
            .expect("the request ends with its connection")
            .unwrap();
        assert!(matches!(failed, Err(PoolError::Request(_))));
    }

    #[tokio::test]
    async fn an_upstream_that_does_not_speak_h2c_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
                .await;
        });
        let pool = pool(&origin);
        match pool.send(get("/ok")).await {
            Err(PoolError::Connect(cause)) => assert!(!cause.is_empty()),
            Err(other) => panic!("not a connect error: {other}"),
            Ok(_) => panic!("answered"),
        }
        assert!(
            pool.connections().is_empty(),
            "the failed connection is forgotten"
        );
    }
}
