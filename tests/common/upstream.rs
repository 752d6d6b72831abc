//! A mock upstream for tests: a hyper server on 127.0.0.1:0 (plain or TLS with an rcgen
//! certificate) that records what it receives and answers as scripted: status, latency,
//! body size, or a fault (hang, dropped connection).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Bodies up to this size are kept whole; larger ones only by length and hash.
const KEEP_BODY_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    /// The authority the request named (HTTP/2 `:authority`; empty for HTTP/1.1 origin-form).
    pub authority: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub body_len: u64,
    pub body_sha256: String,
    /// False when the body broke off (the sender aborted it).
    pub body_complete: bool,
    /// When its head arrived.
    pub at: std::time::Instant,
}

#[derive(Debug, Clone)]
pub enum Reply {
    /// Status with a small JSON body.
    Json(u16, &'static str),
    /// Status with a generated body of this many bytes, streamed in 64 KiB chunks.
    Sized(u16, u64),
    /// Wait, then answer 200 with the standard JSON.
    Delayed(Duration),
    /// Read the request, never answer.
    Hang,
    /// Read the request, then drop the connection without a response.
    Drop,
    /// 200 with the standard JSON and these extra response headers.
    WithHeaders(Vec<(&'static str, &'static str)>),
    /// Status with a small JSON body and these extra response headers.
    JsonWith(u16, &'static str, Vec<(&'static str, &'static str)>),
}

pub const OK_JSON: &str = r#"{"id":"img_123","created":1764201600,"model":"imagen-v2","data":[{"url":"https://cdn.example/img_123.png"}]}"#;

struct Shared {
    reply: Mutex<Reply>,
    /// Replies used one each, in order, before `reply`.
    script: Mutex<std::collections::VecDeque<Reply>>,
    /// Real keys the upstream refuses, with the status it answers them.
    refused_keys: Mutex<Vec<(String, u16)>>,
    received: Mutex<Vec<Received>>,
    count: watch::Sender<usize>,
    /// Connections accepted.
    connections: std::sync::atomic::AtomicUsize,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// A self-signed certificate for `localhost` / 127.0.0.1, and its PEM for `ca_file`.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn test_cert() -> TestCert {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("rcgen makes a certificate");
    TestCert {
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
    }
}

impl MockUpstream {
    pub async fn start() -> Self {
        Self::start_inner(None, None).await
    }

    /// A plain upstream whose HTTP/2 connections (h2c, prior knowledge) take at most
    /// `streams` requests at once.
    pub async fn start_with_stream_limit(streams: u32) -> Self {
        Self::start_inner(None, Some(streams)).await
    }

    /// A TLS upstream; the gateway must trust `cert.cert_pem` through `upstream.ca_file`.
    pub async fn start_tls(cert: &TestCert) -> Self {
        Self::start_tls_inner(cert, None, true).await
    }

    /// A TLS upstream that offers only `http/1.1` by ALPN.
    pub async fn start_tls_http1_only(cert: &TestCert) -> Self {
        Self::start_tls_inner(cert, None, false).await
    }

    /// A TLS upstream whose HTTP/2 connections take at most `streams` requests at once, as
    /// real APIs limit them (commonly 100).
    pub async fn start_tls_with_stream_limit(cert: &TestCert, streams: u32) -> Self {
        Self::start_tls_inner(cert, Some(streams), true).await
    }

    async fn start_tls_inner(cert: &TestCert, streams: Option<u32>, h2: bool) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut cert.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut cert.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Self::start_inner(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            streams,
        )
        .await
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>, streams: Option<u32>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock upstream binds");
        let addr = listener.local_addr().unwrap();
        let (count, _) = watch::channel(0usize);
        let shared = Arc::new(Shared {
            reply: Mutex::new(Reply::Json(200, OK_JSON)),
            script: Mutex::new(Default::default()),
            refused_keys: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
            count,
            connections: Default::default(),
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept_shared.clone();
                shared
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http2().max_concurrent_streams(streams);
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            scheme,
            shared,
            task,
        }
    }

    /// `http://127.0.0.1:PORT` (or `https://localhost:PORT` for TLS).
    pub fn url(&self) -> String {
        match self.scheme {
            "https" => format!("https://localhost:{}", self.addr.port()),
            _ => format!("http://{}", self.addr),
        }
    }

    pub fn set_reply(&self, reply: Reply) {
        *self.shared.reply.lock().unwrap() = reply;
    }

    /// The next requests get these replies, one each, before the standing reply.
    pub fn script(&self, replies: Vec<Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// Answers `status` (401 or 429) to requests carrying this real key.
    pub fn refuse_key(&self, key: &str, status: u16) {
        self.shared
            .refused_keys
            .lock()
            .unwrap()
            .push((format!("Bearer {key}"), status));
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        *self.shared.count.borrow()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have been received (their bodies read).
    pub async fn wait_for(&self, n: usize, within: Duration) {
        let mut rx = self.shared.count.subscribe();
        let reached = tokio::time::timeout(within, rx.wait_for(|c| *c >= n)).await;
        assert!(
            reached.is_ok(),
            "mock upstream saw {} requests, wanted {n} within {within:?}",
            self.count()
        );
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type MockBody = BoxBody<Bytes, Infallible>;

type MockError = Box<dyn std::error::Error + Send + Sync>;

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, MockError> {
    let at = std::time::Instant::now();
    let (parts, mut body) = request.into_parts();
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut kept = Vec::new();
    let mut len = 0u64;
    let mut body_complete = true;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            body_complete = false;
            break;
        };
        if let Some(data) = frame.data_ref() {
            digest.update(data);
            len += data.len() as u64;
            if len <= KEEP_BODY_BYTES {
                kept.extend_from_slice(data);
            }
        }
    }
    if len > KEEP_BODY_BYTES {
        kept.clear();
    }
    let body_sha256 = digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let authorization = parts.headers.get("authorization").cloned();
    shared.received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        authority: parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        version: parts.version,
        headers: parts.headers,
        body: Bytes::from(kept),
        body_len: len,
        body_sha256,
        body_complete,
        at,
    });
    shared.count.send_modify(|c| *c += 1);

    let refused = shared
        .refused_keys
        .lock()
        .unwrap()
        .iter()
        .find(|(key, _)| {
            authorization
                .as_ref()
                .is_some_and(|a| a.as_bytes() == key.as_bytes())
        })
        .map(|(_, status)| *status);
    let reply = match refused {
        Some(429) => Reply::Json(
            429,
            r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit exceeded. Please try again later."}}"#,
        ),
        Some(status) => Reply::Json(
            status,
            r#"{"error":{"code":"unauthorized","message":"Invalid API key"}}"#,
        ),
        None => {
            let scripted = shared.script.lock().unwrap().pop_front();
            scripted.unwrap_or_else(|| shared.reply.lock().unwrap().clone())
        }
    };
    let mut extra_headers = Vec::new();
    let (status, body): (u16, MockBody) = match reply {
        Reply::Json(status, text) => (status, full(text)),
        Reply::WithHeaders(headers) => {
            extra_headers = headers;
            (200, full(OK_JSON))
        }
        Reply::JsonWith(status, text, headers) => {
            extra_headers = headers;
            (status, full(text))
        }
        Reply::Sized(status, size) => (status, sized_body(size)),
        Reply::Delayed(delay) => {
            tokio::time::sleep(delay).await;
            (200, full(OK_JSON))
        }
        Reply::Hang => std::future::pending().await,
        // A service error makes hyper close the connection without an answer.
        Reply::Drop => return Err("mock upstream drops this connection on purpose".into()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    for (name, value) in extra_headers {
        response.headers_mut().append(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        );
    }
    Ok(response)
}

fn full(text: &'static str) -> MockBody {
    Full::new(Bytes::from_static(text.as_bytes())).boxed()
}

fn sized_body(size: u64) -> MockBody {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let full_chunks = size / CHUNK as u64;
    let rest = (size % CHUNK as u64) as usize;
    let chunks = (0..full_chunks)
        .map(move |_| chunk.clone())
        .chain((rest > 0).then(|| Bytes::from(vec![b'x'; rest])))
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    StreamBody::new(stream::iter(chunks)).boxed()
}
