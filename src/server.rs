//! Owns the listeners: accepting connections on the proxy listener (HTTP/1.1 and HTTP/2,
//! optional TLS) and the admin listener, handing proxy connections to the shards when there
//! are ([`crate::shards`]), the connection cap, the HTTP/1 and HTTP/2 limits, and graceful
//! shutdown on SIGTERM/SIGINT. One connection's life is [`crate::connection`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use std::path::PathBuf;

use crate::alerts::{AlertDedupe, MemoryDedupe, RedisDedupe};
use crate::boxed_executor::BoxedExecutor;
use crate::connection::{self, Timeouts};
use crate::metrics::Metrics;
use crate::shards::Shards;
use crate::shared_redis::SharedRedis;
use crate::telemetry::OncePerSecond;
use crate::usage_log::UsageConsumer;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ServerConfig, StoreUrl};
use crate::gateway::Gateway;
use crate::key_store::redis::RedisKeyStore;
use crate::key_store::{self, KeyStore, MemoryKeyStore};
use crate::observe::Observer;
use crate::quota::calendar::DayCalendar;
use crate::quota::memory::MemoryStore;
use crate::quota::redis::RedisStore;
use crate::quota::QuotaStore;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("store: {0}")]
    Store(String),
    #[error("{0}")]
    Observe(String),
    #[error("cannot listen for SIGTERM/SIGINT: {0}")]
    Signals(String),
    #[error("cannot start the shards' threads: {0}")]
    Shards(std::io::Error),
}

/// How to start a gateway beyond its config: injected clock or stores (tests, the demo),
/// and the file the config came from (watched for changes).
pub struct StartOptions {
    pub clock: Arc<dyn Clock>,
    pub store: Option<Arc<dyn QuotaStore>>,
    pub key_store: Option<Arc<dyn KeyStore>>,
    pub config_path: Option<PathBuf>,
    /// Where alerts are claimed once; by default the store's own (memory: this process).
    pub alert_dedupe: Option<Arc<dyn AlertDedupe>>,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            store: None,
            key_store: None,
            config_path: None,
            alert_dedupe: None,
        }
    }
}

/// How long a stopping replica waits for the store to take back its slices of quota; a
/// store that does not answer by then keeps them charged (the minute's window until it
/// rolls past, the day's count for the day).
const RELEASE_WITHIN: Duration = Duration::from_secs(2);

/// A started gateway: its bound addresses and the handle to stop it.
pub struct RunningGateway {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl RunningGateway {
    /// Stops accepting, lets in-flight requests finish within the shutdown grace, and
    /// returns when every connection is closed.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        // Quota taken ahead of requests (local slices) goes back now: the timers that would
        // give it back at the end of its second die with the process.
        let store = &self.gateway.store;
        match tokio::time::timeout(RELEASE_WITHIN, store.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "quota taken ahead of requests not given back")
            }
            Err(_) => tracing::warn!(
                within = ?RELEASE_WITHIN,
                "quota taken ahead of requests not given back in time"
            ),
        }
    }

    /// Waits until the listeners stop (after [`RunningGateway::shutdown`] from elsewhere,
    /// or a fatal accept error).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// The quota store a config names. A Redis store connects lazily, so a replica starts
/// (degraded, per `store.on_error`) while Redis is down.
pub fn build_store(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn QuotaStore>, StartError> {
    let calendar = DayCalendar::new(config.day_tz.clone());
    match &config.store.url {
        StoreUrl::Memory => Ok(Arc::new(MemoryStore::new(clock, calendar))),
        url @ (StoreUrl::Redis(_) | StoreUrl::Cluster(_)) => Ok(Arc::new(
            RedisStore::open(url, clock, calendar)
                .map_err(StartError::Store)?
                .with_local_slices(config.store.local_slices),
        )),
    }
}

/// Where admin-made keys live: with the quota store, so a fleet on Redis shares them.
pub fn build_key_store(config: &Config) -> Result<Arc<dyn KeyStore>, StartError> {
    match &config.store.url {
        StoreUrl::Memory => Ok(Arc::new(MemoryKeyStore::default())),
        url @ (StoreUrl::Redis(_) | StoreUrl::Cluster(_)) => Ok(Arc::new(
            RedisKeyStore::open(url, key_store::call_timeout(config.store.timeout))
                .map_err(StartError::Store)?,
        )),
    }
}

/// Binds both listeners and starts serving.
pub async fn start(config: Config, options: StartOptions) -> Result<RunningGateway, StartError> {
    let config = Arc::new(config);
    let store = match options.store {
        Some(store) => store,
        None => build_store(&config, options.clock.clone())?,
    };
    let key_store = match options.key_store {
        Some(key_store) => key_store,
        None => build_key_store(&config)?,
    };
    // Alert claims and the usage stream get their own connection to the shared Redis, so
    // neither ever queues behind (or ahead of) a quota decision.
    let redis = SharedRedis::open(&config.store.url).map_err(StartError::Store)?;
    let metrics = Arc::new(Metrics::new());
    let dedupe: Arc<dyn AlertDedupe> = match (options.alert_dedupe, &redis) {
        (Some(dedupe), _) => dedupe,
        (None, Some(redis)) => Arc::new(RedisDedupe::new(redis.clone())),
        (None, None) => Arc::new(MemoryDedupe::default()),
    };
    let mut consumers: Vec<Box<dyn UsageConsumer>> = Vec::new();
    if let (Some(stream), Some(redis)) = (&config.usage_log.redis_stream, &redis) {
        consumers.push(Box::new(crate::usage_stream::start(
            redis.clone(),
            stream.clone(),
            config.usage_log.stream_maxlen,
            metrics.clone(),
        )));
    }
    let (observer, alert_dispatcher) =
        Observer::start(&config, metrics, dedupe, consumers).map_err(StartError::Observe)?;
    // Detached: it ends when the last alert handle (the gateway's) is gone.
    tokio::spawn(alert_dispatcher.run());
    let gateway = Arc::new(
        Gateway::new(config.clone(), store, key_store, options.clock, observer)
            .map_err(StartError::Upstream)?,
    );
    let tls = match &config.server.tls {
        Some(files) => {
            Some(crate::tls::acceptor(&files.cert, &files.key).map_err(StartError::Tls)?)
        }
        None => None,
    };
    let proxy = bind(config.server.listen).await?;
    let admin = bind(config.server.admin_listen).await?;
    let proxy_addr = proxy.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.admin_listen,
        source,
    })?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let settings = Arc::new(config.server.clone());

    let shards = match config.server.shards {
        Some(count) => Some(Shards::start(count).map_err(StartError::Shards)?),
        None => None,
    };
    let proxy_gateway = gateway.clone();
    tasks.spawn(serve_listener(
        proxy,
        settings.clone(),
        tls,
        shards,
        shutdown_rx.clone(),
        // The pipeline's own future, no `async` block around it: hyper keeps it in a box
        // per connection, and a block awaiting it would hold it twice.
        move |endpoints, request| {
            crate::pipeline::handle(proxy_gateway.clone(), endpoints, request)
        },
    ));
    reopen_usage_log_on_hangup(&gateway, &mut tasks, shutdown_rx.clone());
    tasks.spawn(crate::observe::alert_on_store_health(
        gateway.store_health.clone(),
        gateway.observer.alerts.clone(),
        shutdown_rx.clone(),
    ));
    crate::reload::spawn(
        &mut tasks,
        gateway.clone(),
        options.config_path,
        shutdown_rx.clone(),
    );
    let admin_gateway = gateway.clone();
    tasks.spawn(serve_listener(
        admin,
        settings,
        None,
        None,
        shutdown_rx,
        move |_endpoints, request| crate::admin::handle(admin_gateway.clone(), request),
    ));
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        upstream = %config.upstream.url,
        store = gateway.store.kind(),
        tls = config.server.tls.is_some(),
        "keygate listening"
    );
    Ok(RunningGateway {
        proxy_addr,
        admin_addr,
        gateway,
        shutdown,
        tasks,
    })
}

/// SIGHUP asks the usage log writer to reopen its file (after logrotate moved it). The
/// handler is installed here, before `start` returns, so a SIGHUP from then on never takes
/// the default action (terminating the process).
fn reopen_usage_log_on_hangup(
    gateway: &Gateway,
    tasks: &mut JoinSet<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!(
                "cannot listen for SIGHUP: the usage log reopens only when rotated away"
            );
            return;
        };
        let reopen = gateway.observer.usage_log.reopen_flag();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    received = hangup.recv() => match received {
                        Some(()) => reopen.store(true, std::sync::atomic::Ordering::Relaxed),
                        None => break,
                    },
                    _ = shutdown.changed() => break,
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (gateway, tasks, shutdown);
}

/// Connections the kernel may hold for the accept loop. Tokio's default (1024) overflows
/// when thousands of clients connect at once (slow image requests pile up), and each
/// overflow costs the client a SYN retransmit, a second or more; the kernel caps this at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    // SO_REUSEADDR as std's bind sets it: a restart can listen while old connections linger.
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        })
        .map_err(|source| StartError::Bind { addr, source })
}

/// hyper's default; more header lines than this answer 431.
const MAX_HEADER_LINES: usize = 100;
/// HTTP/2 streams a client may reset before the server has even accepted them, the
/// "rapid reset" attack (CVE-2023-44487); over this the connection gets GOAWAY.
const HTTP2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// HTTP/2 streams the server may reset because of a client's protocol errors before it
/// closes the connection.
const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 256;
/// Connections over `max_connections` being answered 503 at once; past this they are
/// closed without an answer, so a flood cannot pile up refusal tasks.
const MAX_PENDING_REFUSALS: usize = 256;
/// How long a refused connection gets to read its 503.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

fn connection_builder(settings: &ServerConfig) -> auto::Builder<BoxedExecutor> {
    let mut builder = auto::Builder::new(BoxedExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        // The header and idle timers run in connection.rs: hyper's header timer would also
        // close idle keep-alive connections after header_read_timeout.
        .header_read_timeout(None)
        // hyper refuses buffers under 8 KiB; the config enforces that minimum too.
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(MAX_HEADER_LINES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(Some(settings.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// The answer to a connection over the cap: a clean 503 on plain HTTP/1, then close.
fn over_capacity_response() -> Vec<u8> {
    let body = crate::error::GatewayError::Overloaded.body();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Resolves once shutdown is asked for (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Accepts connections until shutdown, serves each on its own task (on the next shard's
/// thread when there are shards), then drains them within the shutdown grace. The shards
/// stop when this returns.
async fn serve_listener<F, Fut>(
    listener: TcpListener,
    settings: Arc<ServerConfig>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shards: Option<Shards>,
    mut shutdown: watch::Receiver<bool>,
    service: F,
) where
    F: Fn(connection::Endpoints, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<crate::body::ResponseBody>> + Send + 'static,
{
    let builder = Arc::new(connection_builder(&settings));
    let timeouts = Timeouts {
        header_read: settings.header_read_timeout,
        idle: settings.idle_timeout,
    };
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_PENDING_REFUSALS));
    let listen_addr = listener.local_addr().ok();
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn_over_capacity();
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(refuse(stream, tls.is_some(), slot));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Some(local) = stream.local_addr().ok().or(listen_addr) else {
            continue;
        };
        let builder = builder.clone();
        let service = service.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        let handshake_timeout = settings.header_read_timeout;
        let stream = match &mut shards {
            None => Accepted::Here(stream),
            // Out of this runtime's I/O driver, into the shard's once there: otherwise
            // every read and write would wake this thread to wake the shard's.
            Some(_) => match stream.into_std() {
                Ok(stream) => Accepted::Moving(stream),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot hand the connection to a shard");
                    continue;
                }
            },
        };
        let serve = async move {
            let _permit = permit;
            let stream = match stream {
                Accepted::Here(stream) => stream,
                Accepted::Moving(stream) => match TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "shard cannot take the connection");
                        return;
                    }
                },
            };
            let Some(acceptor) = tls else {
                connection::serve(stream, peer, local, builder, timeouts, service, shutdown).await;
                return;
            };
            // Boxed: a TLS session and its handshake take kilobytes, and a task is sized
            // for the largest state its future can be in, plain connections included.
            Box::pin(async move {
                let handshake = acceptor.accept(stream);
                let stream = match tokio::time::timeout(handshake_timeout, handshake).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                connection::serve(stream, peer, local, builder, timeouts, service, shutdown).await;
            })
            .await;
        };
        match &mut shards {
            Some(shards) => connections.spawn_on(serve, shards.next_in_turn()),
            None => connections.spawn(serve),
        };
    }
    // Closing the listener refuses new connections at the TCP level from here on.
    drop(listener);
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => {
            tracing::warn!(
                grace = ?settings.shutdown_grace,
                open = connections.len(),
                "shutdown grace ran out; closing the remaining connections"
            );
            connections.shutdown().await;
        }
    }
}

/// An accepted connection on its way to the task that serves it.
enum Accepted {
    /// Served on this runtime.
    Here(TcpStream),
    /// Handed to a shard, registered with its I/O driver when it gets there.
    Moving(std::net::TcpStream),
}

fn warn_over_capacity() {
    static WARNED: OncePerSecond = OncePerSecond::new();
    if WARNED.ready() {
        tracing::warn!("connections refused: server.max_connections reached");
    }
}

/// Answers 503 and closes. The client's request is drained after the answer so that the
/// close does not reset the connection before the client has read it.
async fn refuse(mut stream: TcpStream, tls: bool, _slot: OwnedSemaphorePermit) {
    if tls {
        return;
    }
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        stream.write_all(&over_capacity_response()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully: no new connections, in-flight
/// requests get `server.shutdown_grace` to finish.
pub async fn serve_until_signal(config: Config, config_path: PathBuf) -> Result<(), StartError> {
    // Listen for signals before serving, so a signal never meets the default handler
    // (which would end the process at once) once requests are being served.
    let signals = ShutdownSignals::new().map_err(|e| StartError::Signals(e.to_string()))?;
    let options = StartOptions {
        config_path: Some(config_path),
        ..StartOptions::default()
    };
    let running = start(config, options).await?;
    let signal = signals.recv().await;
    tracing::info!(
        signal,
        "shutting down: no new connections, in-flight requests finishing"
    );
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere), registered up front.
pub struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    pub fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the first signal and names it.
    pub async fn recv(mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = self.interrupt.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

pub async fn shutdown_signal() {
    match ShutdownSignals::new() {
        Ok(signals) => {
            signals.recv().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for signals");
            std::future::pending::<()>().await;
        }
    }
}
