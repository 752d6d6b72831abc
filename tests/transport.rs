//! Protocols on both sides: an HTTP/2 client through to an HTTP/1.1 upstream, an HTTPS
//! upstream trusted only through `upstream.ca_file`, an HTTP/2 upstream (h2c and by ALPN)
//! with its stream limit, and TLS on the proxy listener with HTTP/1.1 and HTTP/2 chosen
//! by ALPN.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::upstream::{test_cert, TestCert, OK_JSON};
use common::*;
use keygate::config::{Config, TlsFiles, UpstreamProtocol};
use reqwest::Version;

fn pem_file(pem: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(pem.as_bytes()).expect("temp file writes");
    file
}

fn assert_forwarded_with_the_real_key(received: &common::upstream::Received) {
    assert_eq!(received.method, "POST");
    assert_eq!(received.path_and_query, "/v1/text-to-image");
    assert_eq!(
        received.headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );
    assert_eq!(received.body, PROMPT_BODY.as_bytes());
}

/// A client speaking HTTP/2 without TLS (prior knowledge), as gRPC-style clients do.
fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_http2_client_reaches_an_http1_upstream() {
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config_from(&standard_config_text(&upstream.url(), ""))).await;
    let h2 = h2_client();
    let response = generate_request(&h2, &gateway.proxy, Some(TOKEN_DESIGN_GENERATE))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    let answer = Answer::read(response).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, common::upstream::OK_JSON);
    assert!(answer.header("x-ratelimit-limit").is_some());

    let received = &upstream.received()[0];
    assert_eq!(received.version, http::Version::HTTP_11);
    assert_eq!(received.headers["host"], upstream.addr.to_string());
    assert_forwarded_with_the_real_key(received);

    // Errors over HTTP/2 have the same shape.
    let denied = Answer::read(
        h2.post(gateway.url("/v1/text-to-image"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.body, UNAUTHORIZED_BODY);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn large_bodies_cross_between_an_http2_client_and_an_http1_upstream() {
    const SIZE: usize = 8 * 1024 * 1024;
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config_from(&standard_config_text(&upstream.url(), ""))).await;
    let h2 = h2_client();
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    let response = h2
        .post(gateway.url("/v1/text-to-image"))
        .bearer_auth(TOKEN_DESIGN_GENERATE)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = &upstream.received()[0];
    assert_eq!(received.body_len, SIZE as u64);
    assert_eq!(received.body_sha256, keygate::auth::sha256_hex(&body));

    upstream.set_reply(Reply::Sized(200, SIZE as u64));
    let response = generate_request(&h2, &gateway.proxy, Some(TOKEN_DESIGN_GENERATE))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len(), SIZE);
    assert!(bytes.iter().all(|b| *b == b'x'));
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn an_https_upstream_is_trusted_through_ca_file() {
    let cert = test_cert();
    let upstream = MockUpstream::start_tls(&cert).await;
    let ca = pem_file(&cert.cert_pem);
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.upstream.ca_file = Some(ca.path().to_path_buf());
    let gateway = TestGateway::start(config).await;

    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, common::upstream::OK_JSON);
    let received = &upstream.received()[0];
    assert_forwarded_with_the_real_key(received);
    // The upstream offers h2 by ALPN; keygate takes HTTP/1.1 (see the stream-limit test
    // below) and names the upstream in Host.
    assert_eq!(received.version, http::Version::HTTP_11);
    assert_eq!(
        received.headers["host"],
        format!("localhost:{}", upstream.addr.port())
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// Sends `n` requests the upstream holds unanswered and returns them still in flight
/// (dropping them lets go) once the upstream has them all, with keygate's
/// `keygate_upstream_connections` at that moment.
async fn held_in_flight<'a>(
    gateway: &'a TestGateway,
    upstream: &MockUpstream,
    n: usize,
) -> (
    std::pin::Pin<Box<impl std::future::Future<Output = Vec<reqwest::Response>> + 'a>>,
    f64,
) {
    let mut requests = Box::pin(futures_util::future::join_all(
        (0..n).map(|_| gateway.generate(TOKEN_DESIGN_GENERATE)),
    ));
    tokio::select! {
        () = upstream.wait_for(n, std::time::Duration::from_secs(5)) => {}
        answers = &mut requests => panic!(
            "answered before the upstream held them all: {:?}",
            answers.iter().map(|a| a.status()).collect::<Vec<_>>()
        ),
    }
    let metrics = gateway.metrics().await;
    let connections = common::observe::series(&metrics, "keygate_upstream_connections", &[])
        .expect("keygate_upstream_connections is exported");
    (requests, connections)
}

/// An HTTP/2 upstream takes a limited number of streams per connection (real APIs: ~100).
/// Requests over that limit must reach the upstream at once on more connections, not wait
/// inside keygate for a stream on the first one until they time out.
#[tokio::test]
async fn requests_over_an_http2_upstreams_stream_limit_are_not_held_back() {
    const STREAMS: u32 = 2;
    const REQUESTS: usize = 8;
    let cert = test_cert();
    let upstream = MockUpstream::start_tls_with_stream_limit(&cert, STREAMS).await;
    upstream.set_reply(Reply::Hang);
    let ca = pem_file(&cert.cert_pem);
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.upstream.ca_file = Some(ca.path().to_path_buf());
    let gateway = TestGateway::start(config).await;

    let (requests, connections) = held_in_flight(&gateway, &upstream, REQUESTS).await;
    // One HTTP/1.1 connection per request in flight, though the upstream offered h2.
    assert!(upstream
        .received()
        .iter()
        .all(|r| r.version == http::Version::HTTP_11));
    assert_eq!(connections, REQUESTS as f64);
    drop(requests);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

fn http2_upstream_config(upstream: &MockUpstream, ca: Option<&std::path::Path>) -> Config {
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.upstream.protocol = UpstreamProtocol::Http2;
    config.upstream.ca_file = ca.map(|path| path.to_path_buf());
    config
}

/// With `upstream.protocol = "http2"`, requests in flight share connections up to the
/// stream limit the upstream announces, and the ones past it go out at once on more
/// connections: none waits inside keygate for a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_takes_requests_in_flight_on_shared_connections_within_its_stream_limit()
{
    const STREAMS: u32 = 3;
    const REQUESTS: usize = 10;
    let upstream = MockUpstream::start_with_stream_limit(STREAMS).await;
    upstream.set_reply(Reply::Hang);
    let gateway = TestGateway::start(http2_upstream_config(&upstream, None)).await;

    let (requests, connections) = held_in_flight(&gateway, &upstream, REQUESTS).await;
    // Each connection filled to the limit before the next was opened: ceil(10 / 3).
    assert_eq!(upstream.connections(), 4);
    assert_eq!(connections, 4.0);
    drop(requests);
    for received in upstream.received() {
        assert_eq!(received.version, http::Version::HTTP_2);
        assert_eq!(received.authority, upstream.addr.to_string());
        assert_forwarded_with_the_real_key(&received);
    }
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// With shards, each shard keeps its own HTTP/2 connections to the upstream (a
/// connection's task runs on the shard that opened it): requests from clients spread over
/// both shards are all answered, over exactly one connection a shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_shares_its_own_http2_upstream_connections() {
    const CLIENTS: usize = 8;
    const EACH: usize = 5;
    let upstream = MockUpstream::start().await;
    let text = standard_config_text(&upstream.url(), "").replacen(
        "[server]\n",
        "[server]\nshards = 2\n",
        1,
    );
    let mut config = config_from(&text);
    config.upstream.protocol = UpstreamProtocol::Http2;
    let gateway = TestGateway::start(config).await;

    let statuses = generate_from_own_clients(&gateway, CLIENTS, EACH).await;
    assert_eq!(statuses, [200; CLIENTS * EACH]);
    // One connection a shard: a list shared by the shards would have given one in all.
    assert_eq!(upstream.connections(), 2);
    assert!(upstream
        .received()
        .iter()
        .all(|r| r.version == http::Version::HTTP_2));
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn requests_one_after_another_share_one_http2_upstream_connection() {
    const BIG: u64 = 12 * 1024 * 1024;
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(http2_upstream_config(&upstream, None)).await;
    for _ in 0..5 {
        let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body, common::upstream::OK_JSON);
        assert!(answer.header("x-ratelimit-limit").is_some());
    }
    // More than the connection's and the stream's flow-control windows (5 and 2 MiB):
    // the answer keeps flowing as keygate passes it on.
    upstream.set_reply(Reply::Sized(200, BIG));
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(std::time::Duration::from_secs(30), response.bytes())
        .await
        .expect("the answer flows")
        .unwrap();
    assert_eq!(body.len() as u64, BIG);

    assert_eq!(upstream.connections(), 1);
    let received = upstream.received();
    assert_eq!(received.len(), 6);
    assert!(received
        .iter()
        .all(|r| r.version == http::Version::HTTP_2 && r.authority == upstream.addr.to_string()));
    assert_forwarded_with_the_real_key(&received[0]);
    gateway.wait_team_used("design", 6).await;
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// A TLS upstream (offering h2 by ALPN, or only http/1.1) and a gateway that trusts it
/// through `ca_file` and speaks HTTP/2 to it; the CA file lives as long as the result.
async fn http2_over_tls(offers_h2: bool) -> (MockUpstream, TestGateway, tempfile::NamedTempFile) {
    let cert = test_cert();
    let upstream = if offers_h2 {
        MockUpstream::start_tls(&cert).await
    } else {
        MockUpstream::start_tls_http1_only(&cert).await
    };
    let ca = pem_file(&cert.cert_pem);
    let gateway = TestGateway::start(http2_upstream_config(&upstream, Some(ca.path()))).await;
    (upstream, gateway, ca)
}

#[tokio::test]
async fn an_https_upstream_is_reached_over_http2_by_alpn() {
    let (upstream, gateway, _ca) = http2_over_tls(true).await;

    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, common::upstream::OK_JSON);
    let received = &upstream.received()[0];
    assert_eq!(received.version, http::Version::HTTP_2);
    assert_eq!(
        received.authority,
        format!("localhost:{}", upstream.addr.port())
    );
    assert_forwarded_with_the_real_key(received);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// An upstream that does not agree to h2 gets nothing: the request is a 502 (refunded,
/// as any failed connect), not an HTTP/1.1 request it was not configured for.
#[tokio::test]
async fn an_https_upstream_without_h2_is_a_502_when_http2_is_configured() {
    let (upstream, gateway, _ca) = http2_over_tls(false).await;

    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.body, BAD_GATEWAY_BODY);
    assert_eq!(upstream.count(), 0);
    gateway.wait_team_used("design", 0).await;
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn an_https_upstream_with_an_untrusted_certificate_is_a_502() {
    let cert = test_cert();
    let upstream = MockUpstream::start_tls(&cert).await;
    let config = config_from(&standard_config_text(&upstream.url(), ""));
    let gateway = TestGateway::start(config).await;
    let answer = Answer::read(gateway.generate(TOKEN_MARKETING).await).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.body, BAD_GATEWAY_BODY);
    assert_eq!(
        upstream.count(),
        0,
        "nothing was sent over an unverified connection"
    );
    gateway.wait_team_used("marketing", 0).await;
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// A client that trusts only the test certificate and reaches `localhost` on the gateway.
fn tls_client(cert: &TestCert, gateway: &TestGateway, http1_only: bool) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([root])
        .resolve("localhost", gateway.proxy_addr());
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn the_proxy_listener_speaks_tls_with_http1_and_http2_by_alpn() {
    tls_with_http1_and_http2(None).await;
}

/// The same on shards: the TLS handshake happens on the shard a connection goes to.
#[tokio::test]
async fn the_proxy_listener_speaks_tls_on_shards_too() {
    tls_with_http1_and_http2(Some(2)).await;
}

async fn tls_with_http1_and_http2(shards: Option<usize>) {
    let cert = test_cert();
    let cert_file = pem_file(&cert.cert_pem);
    let key_file = pem_file(&cert.key_pem);
    let upstream = MockUpstream::start().await;
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.server.tls = Some(TlsFiles {
        cert: cert_file.path().to_path_buf(),
        key: key_file.path().to_path_buf(),
    });
    config.server.shards = shards;
    let gateway = TestGateway::start(config).await;
    let base_url = format!("https://localhost:{}", gateway.proxy_addr().port());

    for (http1_only, version) in [(true, Version::HTTP_11), (false, Version::HTTP_2)] {
        let response = generate_request(
            &tls_client(&cert, &gateway, http1_only),
            &base_url,
            Some(TOKEN_DESIGN_GENERATE),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(response.version(), version);
        let answer = Answer::read(response).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body, common::upstream::OK_JSON);
    }
    for received in upstream.received() {
        assert_forwarded_with_the_real_key(&received);
    }
    assert_eq!(upstream.count(), 2);

    // Plain HTTP on the TLS listener gets nowhere.
    let plain = gateway.client.get(gateway.url("/v1/models")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// A plain upstream speaking HTTP/2 with prior knowledge through the `h2` crate, for what
/// hyper's server does not let a test script: it refuses (`REFUSED_STREAM`) its first
/// `refuse` streams, whatever the connection, and reads the others' bodies only once
/// `reading` is true, then answers 200 with the standard JSON; or, answering first, it
/// answers 413 at once on one stream at a time and then sees how the body ends.
struct RawH2Upstream {
    url: String,
    /// Streams seen, refused or not.
    streams: Arc<AtomicUsize>,
    /// Body bytes read, over all streams.
    body_bytes: Arc<AtomicU64>,
    reading: tokio::sync::watch::Sender<bool>,
    /// Streams whose body the client reset instead of ending it.
    resets: tokio::sync::watch::Receiver<usize>,
    connections: Arc<AtomicUsize>,
}

impl RawH2Upstream {
    async fn start(refuse: usize, reading: bool) -> Self {
        Self::start_with(refuse, reading, false).await
    }

    async fn start_answering_first() -> Self {
        Self::start_with(0, true, true).await
    }

    async fn start_with(refuse: usize, reading: bool, answer_first: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let streams = Arc::new(AtomicUsize::new(0));
        let body_bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (reading, may_read) = tokio::sync::watch::channel(reading);
        let (count_reset, resets) = tokio::sync::watch::channel(0);
        let count_reset = Arc::new(count_reset);
        let (seen, read, accepted) = (streams.clone(), body_bytes.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (seen, read, may_read) = (seen.clone(), read.clone(), may_read.clone());
                let count_reset = count_reset.clone();
                tokio::spawn(async move {
                    let mut builder = h2::server::Builder::new();
                    if answer_first {
                        builder.max_concurrent_streams(1);
                    }
                    let Ok(mut connection) = builder.handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        if seen.fetch_add(1, Ordering::SeqCst) < refuse {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let (read, mut may_read) = (read.clone(), may_read.clone());
                        let count_reset = count_reset.clone();
                        tokio::spawn(async move {
                            if answer_first {
                                let mut answer = http::Response::new(());
                                *answer.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
                                let _ = respond.send_response(answer, true);
                            }
                            let _ = may_read.wait_for(|reading| *reading).await;
                            let mut body = request.into_body();
                            loop {
                                match body.data().await {
                                    Some(Ok(chunk)) => {
                                        read.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                                        let _ = body.flow_control().release_capacity(chunk.len());
                                    }
                                    Some(Err(_)) => {
                                        count_reset.send_modify(|resets| *resets += 1);
                                        return;
                                    }
                                    None => break,
                                }
                            }
                            if !answer_first {
                                let answer = http::Response::new(());
                                let mut send = respond.send_response(answer, false).unwrap();
                                let _ = send
                                    .send_data(bytes::Bytes::from_static(OK_JSON.as_bytes()), true);
                            }
                        });
                    }
                });
            }
        });
        Self {
            url,
            streams,
            body_bytes,
            reading,
            resets,
            connections,
        }
    }

    fn gateway_config(&self) -> Config {
        let mut config = config_from(&standard_config_text(&self.url, ""));
        config.upstream.protocol = UpstreamProtocol::Http2;
        config
    }
}

/// A refused stream reached no application (RFC 9113, 8.7): a request whose body keygate
/// holds goes out again at once on another stream; one whose body streams from the client
/// cannot be replayed, so it is a 502 like a failed connect, refunded, and sent only once.
#[tokio::test]
async fn a_refused_http2_stream_is_sent_again_when_its_body_is_held_and_a_502_when_streamed() {
    let upstream = RawH2Upstream::start(2, true).await;
    let streams = &upstream.streams;
    let gateway = TestGateway::start(upstream.gateway_config()).await;

    // A body of unknown length streams from the client as it comes.
    let answer = Answer::read(gateway.generate_chunked(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.body, BAD_GATEWAY_BODY);
    assert_eq!(
        streams.load(Ordering::SeqCst),
        1,
        "a streamed body goes once"
    );
    gateway.wait_team_used("design", 0).await;

    // The next stream is refused too; the held body goes again on the one after.
    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, common::upstream::OK_JSON);
    assert_eq!(streams.load(Ordering::SeqCst), 3);
    gateway.wait_team_used("design", 1).await;
    // The operator sees the one resend and why; the streamed body's refusal is a 502.
    let metrics = gateway.metrics().await;
    let resends = |reason| {
        common::observe::series(
            &metrics,
            "keygate_upstream_resends_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(resends("refused_stream"), Some(1.0));
    assert_eq!(resends("going_away"), Some(0.0));
    assert_eq!(resends("connection_closed"), Some(0.0));
    common::observe::promtool_check(&metrics);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// An upload to an HTTP/2 upstream that is not reading goes no further than the stream's
/// window and the sockets' buffers: keygate reads from the client only what it can send,
/// never the whole body into memory. Then, reading, the upstream gets every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_an_http2_upstream_not_reading_waits_for_its_window() {
    const BIG: u64 = 64 * 1024 * 1024;
    const CHUNK: u64 = 64 * 1024;
    let upstream = RawH2Upstream::start(0, false).await;
    let mut config = upstream.gateway_config();
    config.server.max_body_bytes = 2 * BIG;
    config.upstream.timeout = Duration::from_secs(60);
    let gateway = TestGateway::start(config).await;

    let taken = Arc::new(AtomicU64::new(0));
    let counted = taken.clone();
    let chunks = futures_util::stream::iter((0..BIG / CHUNK).map(move |_| {
        counted.fetch_add(CHUNK, Ordering::SeqCst);
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'p'; CHUNK as usize]))
    }));
    let upload = gateway
        .client
        .post(gateway.url("/v1/text-to-image"))
        .bearer_auth(TOKEN_DESIGN_GENERATE)
        .body(reqwest::Body::wrap_stream(chunks))
        .timeout(Duration::from_secs(60))
        .send();
    let upload = tokio::spawn(upload);
    // Until the client can hand over no more: the bytes taken stop growing.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = taken.load(Ordering::SeqCst);
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    assert!(
        last < BIG / 2,
        "the client handed over {} MiB while the upstream read nothing",
        last >> 20
    );
    assert_eq!(upstream.body_bytes.load(Ordering::SeqCst), 0);

    upstream.reading.send_replace(true);
    let answer = Answer::read(upload.await.unwrap().unwrap()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(upstream.body_bytes.load(Ordering::SeqCst), BIG);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// An upstream may answer before the upload ends (RFC 9113, 8.1): the answer goes to the
/// client, the rest of the upload is not sent (its stream is reset), and the stream is
/// free again at once: the next request goes on the same connection, which takes one
/// stream at a time.
#[tokio::test]
async fn an_http2_upstream_answering_before_the_upload_ends_frees_its_stream() {
    let mut upstream = RawH2Upstream::start_answering_first().await;
    let gateway = TestGateway::start(upstream.gateway_config()).await;
    let gw = gateway.proxy_addr();
    let mut client = common::raw::connect(gw).await;
    let head = format!(
        "POST /v1/text-to-image HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer \
         {TOKEN_DESIGN_GENERATE}\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{{\"prompt\"\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut client, head.as_bytes())
        .await
        .unwrap();
    // The upload goes no further; the answer comes anyway.
    let answer = common::raw::read_response(&mut client).await;
    assert_eq!(answer.response().status, 413);
    tokio::time::timeout(
        Duration::from_secs(5),
        upstream.resets.wait_for(|r| *r == 1),
    )
    .await
    .expect("the rest of the upload is reset, not left open")
    .unwrap();

    let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
    assert_eq!(answer.status, 413);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.streams.load(Ordering::SeqCst), 2);
    drop(client);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// An answer to HEAD names the length of a body it does not carry: the client gets the
/// length and no body, and its connection serves the next request, whichever protocol
/// keygate speaks to the upstream.
#[tokio::test]
async fn an_answer_to_head_carries_its_length_and_no_body_over_either_upstream_protocol() {
    for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
        let upstream = MockUpstream::start().await;
        let route = "[[routes]]\nmatch = \"HEAD /v1/models\"\nscope = \"read\"\n";
        let mut config = config_from(&standard_config_text(&upstream.url(), route));
        config.upstream.protocol = protocol;
        let gateway = TestGateway::start(config).await;
        for _ in 0..2 {
            let response = gateway
                .client
                .head(gateway.url("/v1/models"))
                .bearer_auth(TOKEN_DESIGN_READ)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{protocol:?}");
            assert_eq!(
                response.headers()["content-length"],
                OK_JSON.len().to_string().as_str(),
                "{protocol:?}"
            );
            assert_eq!(response.bytes().await.unwrap().len(), 0);
        }
        let answer = Answer::read(gateway.generate(TOKEN_DESIGN_GENERATE).await).await;
        assert_eq!(answer.status, 200, "{protocol:?}: {}", answer.body);
        assert!(upstream
            .received()
            .iter()
            .take(2)
            .all(|r| r.method == "HEAD"));
        gateway.shutdown().await;
    }
    logs::assert_clean(ALL_SECRETS);
}
