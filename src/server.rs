//! Owns the listeners: accepting connections on the proxy listener (HTTP/1.1 and HTTP/2,
//! optional TLS) and the admin listener, the connection cap, and graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use std::path::PathBuf;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ServerConfig, StoreUrl};
use crate::gateway::Gateway;
use crate::key_store::{KeyStore, MemoryKeyStore};
use crate::observe::Observer;
use crate::quota::calendar::DayCalendar;
use crate::quota::memory::MemoryStore;
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
    #[error("usage log: {0}")]
    UsageLog(String),
}

/// How to start a gateway beyond its config: injected clock or stores (tests, the demo),
/// and the file the config came from (watched for changes).
pub struct StartOptions {
    pub clock: Arc<dyn Clock>,
    pub store: Option<Arc<dyn QuotaStore>>,
    pub key_store: Option<Arc<dyn KeyStore>>,
    pub config_path: Option<PathBuf>,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            store: None,
            key_store: None,
            config_path: None,
        }
    }
}

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

pub fn build_store(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn QuotaStore>, StartError> {
    match &config.store.url {
        StoreUrl::Memory => Ok(Arc::new(MemoryStore::new(
            clock,
            DayCalendar::new(config.day_tz.clone()),
        ))),
        StoreUrl::Redis(_) | StoreUrl::Cluster(_) => Err(StartError::Store(
            "Redis stores are not built into this version yet; use memory://".into(),
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
    let key_store = options
        .key_store
        .unwrap_or_else(|| Arc::new(MemoryKeyStore::default()));
    let observer = Observer::start(&config.usage_log, Vec::new()).map_err(|e| {
        StartError::UsageLog(format!(
            "{}: {e}",
            config
                .usage_log
                .path
                .as_ref()
                .map_or("stdout".into(), |p| p.display().to_string())
        ))
    })?;
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

    let proxy_gateway = gateway.clone();
    tasks.spawn(serve_listener(
        proxy,
        settings.clone(),
        tls,
        shutdown_rx.clone(),
        move |peer, request| {
            let gateway = proxy_gateway.clone();
            async move { Ok::<_, Infallible>(crate::pipeline::handle(gateway, peer, request).await) }
        },
    ));
    reopen_usage_log_on_hangup(&gateway, &mut tasks, shutdown_rx.clone());
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
        shutdown_rx,
        move |_peer, request| {
            let gateway = admin_gateway.clone();
            async move { Ok::<_, Infallible>(crate::admin::handle(gateway, request).await) }
        },
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn connection_builder(settings: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_header_list_size(settings.max_header_bytes as u32)
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

async fn serve_listener<F, Fut>(
    listener: TcpListener,
    settings: Arc<ServerConfig>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    service: F,
) where
    F: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<crate::body::ResponseBody>, Infallible>>
        + Send
        + 'static,
{
    let builder = Arc::new(connection_builder(&settings));
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    loop {
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
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, tls.is_some()));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let service = service.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = settings.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |request| service(peer, request));
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
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
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    match tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => {
            tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace ran out with connections still open")
        }
    }
}

async fn refuse(mut stream: TcpStream, tls: bool) {
    tracing::warn!("connection refused: server.max_connections reached");
    if !tls {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            stream.write_all(&over_capacity_response()),
        )
        .await;
        let _ = stream.shutdown().await;
    }
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn serve_until_signal(config: Config, config_path: PathBuf) -> Result<(), StartError> {
    let options = StartOptions {
        config_path: Some(config_path),
        ..StartOptions::default()
    };
    let running = start(config, options).await?;
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections, in-flight requests finishing");
    running.shutdown().await;
    Ok(())
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
