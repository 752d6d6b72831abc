//! Owns one accepted client connection from its first byte to its close: the timers hyper
//! lacks (a request head must arrive within `header_read_timeout` of its first byte, an
//! idle keep-alive connection closes after `idle_timeout`, so does one whose client leaves
//! its answer unread that long) and the graceful close on shutdown. Each request reaches
//! the service with the connection's [`Endpoints`].
//!
//! An unread answer shows in two ways. Over HTTP/1 the socket's writes block (see
//! `WriteStall`). Over HTTP/2 a client can keep reading frames and simply never grant
//! flow-control window: writes never block, but hyper stops asking the response body for
//! more. So each response body records when it last handed hyper something (or was
//! ready) without being asked again; the connection is cut when one waits that long.
//!
//! Why not hyper's own `header_read_timeout`: hyper 1.x starts that timer as soon as a
//! keep-alive connection waits for its next request, so it doubles as an HTTP/1 idle
//! timeout equal to the header timeout (10 s by default). A load balancer that keeps idle
//! connections for 60 s would then keep reusing connections keygate has just closed. Here
//! the two are separate: the idle clock runs while no request is in flight, the header
//! clock from the first byte of a request head (or from accept, for the first request).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::boxed_executor::BoxedExecutor;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Both ends of the connection a request arrived on. Handed to the service with each
/// request rather than kept in its extensions: an extension is two allocations a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the first byte of a request head (or from accept) to its end.
    pub header_read: Duration,
    /// With no request in flight, how long a connection may stay open; also how long a
    /// client may leave an answer unread (writes blocked) before the connection is cut.
    pub idle: Duration,
}

/// Serves one connection until it closes, times out, or finishes closing after shutdown.
pub async fn serve<IO, F, Fut, B>(
    io: IO,
    peer: SocketAddr,
    local: SocketAddr,
    builder: Arc<auto::Builder<BoxedExecutor>>,
    timeouts: Timeouts,
    service: F,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Endpoints, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new(timeouts));
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
        write_stall: WriteStall::new(timeouts.idle),
    });
    let request_activity = activity.clone();
    let endpoints = Endpoints { peer, local };
    let svc = service_fn(move |request: Request<Incoming>| {
        // Taken before the handler runs, released when hyper drops the response body:
        // the connection is busy for exactly that long.
        let guard = request_activity.request_started();
        Answer {
            answer: service(endpoints, request),
            guard: Some(guard),
        }
    });
    // Pinned where it is made: a `let` pinned afterwards keeps a second copy's room in
    // this future (1.6 KB, in every connection's task).
    let mut conn = std::pin::pin!(builder.serve_connection(io, svc));
    let mut draining = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = crate::server::stopped(&mut shutdown), if !draining => {
                // HTTP/1: closes now if idle, after the current response otherwise.
                // HTTP/2: GOAWAY, open streams finish.
                conn.as_mut().graceful_shutdown();
                activity.start_draining();
                draining = true;
            }
            expiry = activity.next_expiry() => match expiry {
                Expiry::HeaderTimeout => {
                    tracing::debug!(%peer, timeout = ?timeouts.header_read, "closed: request head not complete in time");
                    return;
                }
                Expiry::Idle if !draining => {
                    tracing::debug!(%peer, timeout = ?timeouts.idle, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    activity.start_draining();
                    draining = true;
                }
                Expiry::Idle => {
                    tracing::debug!(%peer, "closed: did not finish closing in time");
                    return;
                }
                Expiry::AnswerUntaken => {
                    tracing::debug!(%peer, timeout = ?timeouts.idle, "closed: the client left an answer untaken (no flow-control window)");
                    return;
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    HeaderTimeout,
    Idle,
    /// A response body has had something for the client for `idle` without being asked
    /// for it.
    AnswerUntaken,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// This many bytes of the HTTP/2 preface seen so far; HTTP/1 rules apply meanwhile.
    Undecided(usize),
    Http1,
    /// Requests are HEADERS frames between pings and window updates: no head timer.
    Http2,
}

struct State {
    protocol: Protocol,
    /// Requests whose response body hyper has not dropped yet.
    in_flight: usize,
    /// When the connection last became idle (accept, last response, start of draining).
    idle_since: Instant,
    /// When the pending request head began: accept for the first request, its first byte
    /// for the next ones on a keep-alive connection.
    head_started: Option<Instant>,
    /// Response bodies waiting for hyper to ask for their next frame, by id, since when.
    /// Few at a time (one per open stream at most), so a vector.
    untaken: Vec<(u64, Instant)>,
    /// Closing after shutdown or idleness: an idle connection gets `header_read` to finish.
    draining: bool,
    /// The deadline the watchdog sleeps until (`None`: until a change). A change that
    /// moves the deadline later does not wake it: it finds out when this one passes.
    armed: Option<Instant>,
}

impl State {
    /// When the connection expires, and why, as things stand.
    fn deadline(&self, timeouts: &Timeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight > 0 {
            self.untaken
                .iter()
                .map(|(_, since)| *since)
                .min()
                .map(|since| (since + timeouts.idle, Expiry::AnswerUntaken))
        } else if let Some(started) = self.head_started {
            Some((started + timeouts.header_read, Expiry::HeaderTimeout))
        } else if self.draining {
            Some((self.idle_since + timeouts.header_read, Expiry::Idle))
        } else {
            Some((self.idle_since + timeouts.idle, Expiry::Idle))
        }
    }
}

/// What a connection is doing, shared by its I/O, its requests and its watchdog.
struct Activity {
    state: Mutex<State>,
    timeouts: Timeouts,
    changed: Notify,
    /// Ids for the response bodies of this connection (no lock needed to hand one out).
    next_body: AtomicU64,
}

impl Activity {
    fn new(timeouts: Timeouts) -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                protocol: Protocol::Undecided(0),
                in_flight: 0,
                idle_since: now,
                head_started: Some(now),
                untaken: Vec::new(),
                draining: false,
                armed: None,
            }),
            timeouts,
            changed: Notify::new(),
            next_body: AtomicU64::new(0),
        }
    }

    /// After a change of `state`: wakes the watchdog only when the deadline moved earlier
    /// than the one it sleeps until. A request changes the state four or five times, and
    /// each wake re-polled the whole connection and re-armed a timer.
    fn settle(&self, state: MutexGuard<'_, State>) {
        let earlier = match (state.deadline(&self.timeouts), state.armed) {
            (Some((at, _)), Some(armed)) => at < armed,
            (Some(_), None) => true,
            (None, _) => false,
        };
        drop(state);
        if earlier {
            self.changed.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under a panic elsewhere: every update is one step.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn on_read(&self, bytes: &[u8]) {
        let mut state = self.lock();
        if let Protocol::Undecided(mut matched) = state.protocol {
            state.protocol = Protocol::Http1;
            for &byte in bytes {
                if H2_PREFACE.get(matched) != Some(&byte) {
                    state.protocol = Protocol::Http1;
                    break;
                }
                matched += 1;
                state.protocol = if matched == H2_PREFACE.len() {
                    Protocol::Http2
                } else {
                    Protocol::Undecided(matched)
                };
                if state.protocol == Protocol::Http2 {
                    break;
                }
            }
            if state.protocol == Protocol::Http2 {
                state.head_started = None;
                self.settle(state);
                return;
            }
        }
        if state.protocol != Protocol::Http2 && state.in_flight == 0 && state.head_started.is_none()
        {
            state.head_started = Some(Instant::now());
            self.settle(state);
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        self.settle(state);
        RequestGuard {
            activity: self.clone(),
        }
    }

    fn request_finished(&self) {
        let mut state = self.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
            state.head_started = None;
        }
        self.settle(state);
    }

    fn body_id(&self) -> u64 {
        self.next_body.fetch_add(1, Ordering::Relaxed)
    }

    /// A response body has something for the client (its head, or a frame it just handed
    /// over) and waits to be asked for more.
    fn answer_waiting(&self, body: u64) {
        let mut state = self.lock();
        state.untaken.push((body, Instant::now()));
        self.settle(state);
    }

    fn answer_taken(&self, body: u64) {
        let mut state = self.lock();
        if let Some(at) = state.untaken.iter().position(|(id, _)| *id == body) {
            state.untaken.swap_remove(at);
        }
    }

    fn start_draining(&self) {
        let mut state = self.lock();
        state.idle_since = Instant::now();
        state.head_started = None;
        state.draining = true;
        self.settle(state);
    }

    /// Resolves when the connection has been idle or waiting for a head for too long.
    /// While draining, an idle connection gets `header_read` to finish closing.
    async fn next_expiry(&self) -> Expiry {
        // One timer, moved as the deadline moves.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            let changed = self.changed.notified();
            let deadline = {
                let mut state = self.lock();
                let deadline = state.deadline(&self.timeouts);
                state.armed = deadline.map(|(at, _)| at);
                deadline
            };
            match deadline {
                None => changed.await,
                Some((at, expiry)) => {
                    if Instant::now() >= at {
                        return expiry;
                    }
                    if timer.deadline() != at {
                        timer.as_mut().reset(at);
                    }
                    tokio::select! {
                        _ = changed => {}
                        _ = timer.as_mut() => {}
                    }
                }
            }
        }
    }
}

struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.activity.request_finished();
    }
}

pin_project_lite::pin_project! {
    /// The service's answer, its response body guarded as it comes out. Written by hand:
    /// an `async` block awaiting the answer would hold its future twice (captured, then
    /// awaited), and hyper keeps this future in a box of that size for every connection,
    /// idle or not.
    struct Answer<Fut> {
        #[pin]
        answer: Fut,
        guard: Option<RequestGuard>,
    }
}

impl<Fut, B> Future for Answer<Fut>
where
    Fut: Future<Output = Response<B>>,
    B: Body + Unpin,
{
    type Output = Result<Response<Guarded<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.answer.poll(cx));
        let guard = this
            .guard
            .take()
            .expect("an answer is not polled after it is ready");
        Poll::Ready(Ok(response.map(|body| Guarded::new(body, guard))))
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it, and
/// tells the connection while it waits for hyper to ask for more.
struct Guarded<B> {
    body: B,
    guard: RequestGuard,
    id: u64,
    waiting: bool,
}

impl<B: Body + Unpin> Guarded<B> {
    fn new(body: B, guard: RequestGuard) -> Self {
        let id = guard.activity.body_id();
        let mut guarded = Self {
            body,
            guard,
            id,
            waiting: false,
        };
        if !guarded.body.is_end_stream() {
            guarded.wait();
        }
        guarded
    }

    fn wait(&mut self) {
        self.guard.activity.answer_waiting(self.id);
        self.waiting = true;
    }
}

impl<B> Drop for Guarded<B> {
    fn drop(&mut self) {
        if self.waiting {
            self.guard.activity.answer_taken(self.id);
        }
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        if this.waiting {
            this.guard.activity.answer_taken(this.id);
            this.waiting = false;
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            if !this.body.is_end_stream() {
                this.wait();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's byte stream: reports what it reads to the connection's activity, and
/// fails writes that stay blocked too long — a client that stops reading its answer would
/// otherwise hold the connection (and the upstream one behind it) forever.
struct Watched<IO> {
    inner: IO,
    activity: Arc<Activity>,
    write_stall: WriteStall,
}

/// The clock of one episode of blocked writes.
struct WriteStall {
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    blocked: bool,
}

impl WriteStall {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: None,
            blocked: false,
        }
    }

    /// Passes a write's result through; a write still blocked after the limit fails.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.blocked = false;
            return polled;
        }
        let deadline = Instant::now() + self.limit;
        let timer = match &mut self.timer {
            Some(timer) if self.blocked => timer,
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.blocked = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                self.activity.on_read(read);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_stall.check(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.write_stall.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_stall.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(75),
    };

    #[test]
    fn the_http2_preface_turns_off_the_head_timer() {
        let activity = Activity::new(TIMEOUTS);
        activity.on_read(&H2_PREFACE[..10]);
        assert_eq!(activity.lock().protocol, Protocol::Undecided(10));
        assert!(activity.lock().head_started.is_some());
        activity.on_read(&H2_PREFACE[10..]);
        assert_eq!(activity.lock().protocol, Protocol::Http2);
        assert!(activity.lock().head_started.is_none());
        activity.on_read(b"\0\0\0\x06ping");
        assert!(activity.lock().head_started.is_none());

        let http1 = Activity::new(TIMEOUTS);
        http1.on_read(b"PRI * HTTP/1.1\r\n");
        assert_eq!(http1.lock().protocol, Protocol::Http1);
    }

    #[test]
    fn http1_heads_start_the_timer_only_between_requests() {
        let activity = Arc::new(Activity::new(TIMEOUTS));
        activity.on_read(b"GET / HTTP/1.1\r\n");
        assert_eq!(activity.lock().protocol, Protocol::Http1);
        let guard = activity.request_started();
        assert!(activity.lock().head_started.is_none());
        activity.on_read(b"body bytes");
        assert!(activity.lock().head_started.is_none());
        drop(guard);
        assert_eq!(activity.lock().in_flight, 0);
        assert!(activity.lock().head_started.is_none());
        activity.on_read(b"GET /next");
        assert!(activity.lock().head_started.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_follows_the_state() {
        let activity = Arc::new(Activity::new(TIMEOUTS));
        let started = Instant::now();
        assert_eq!(activity.next_expiry().await, Expiry::HeaderTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        let guard = activity.request_started();
        let released = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(300)).await;
            drop(guard);
        });
        let started = Instant::now();
        assert_eq!(activity.next_expiry().await, Expiry::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(375));
        released.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_waits_for_the_armed_one_and_still_governs() {
        let activity = Arc::new(Activity::new(TIMEOUTS));
        let accepted = Instant::now();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { activity.next_expiry().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(activity.lock().armed, Some(accepted + TIMEOUTS.header_read));

        // A request: no deadline while it runs, later than the armed one: no wake.
        let guard = activity.request_started();
        tokio::task::yield_now().await;
        assert_eq!(activity.lock().armed, Some(accepted + TIMEOUTS.header_read));
        // At the armed deadline the watchdog looks again, finds none, and waits.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(activity.lock().armed, None);
        assert!(
            !watchdog.is_finished(),
            "a request in flight does not expire"
        );

        // Idle from 20 s: a deadline where there was none wakes it.
        tokio::time::sleep(Duration::from_secs(9)).await;
        drop(guard);
        assert_eq!(watchdog.await.unwrap(), Expiry::Idle);
        assert_eq!(accepted.elapsed(), Duration::from_secs(20) + TIMEOUTS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_left_untaken_expires_after_the_idle_timeout() {
        let activity = Arc::new(Activity::new(TIMEOUTS));
        let _guard = activity.request_started();
        let (taken, left) = (activity.body_id(), activity.body_id());
        activity.answer_waiting(taken);
        tokio::time::sleep(Duration::from_secs(30)).await;
        activity.answer_waiting(left);
        activity.answer_taken(taken);
        let started = Instant::now();
        assert_eq!(activity.next_expiry().await, Expiry::AnswerUntaken);
        assert_eq!(started.elapsed(), Duration::from_secs(75));
    }
}
