//! Bodies stream through, never buffered whole: a 64 MiB response and a 64 MiB request
//! cross the gateway while the process's peak resident memory grows far less than the
//! body, and a body over `server.max_body_bytes` is refused with 413 whether its length is
//! announced or only discovered while streaming.
//!
//! Peak memory is a process-wide figure, so every test here takes one lock and the memory
//! tests run alone in this test binary.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw;
use common::*;
use futures_util::StreamExt;
use keygate::config::UpstreamProtocol;
use tokio::sync::Mutex;

const BIG: u64 = 64 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// Far below the body size: the gateway, the mock upstream and the client together may
/// hold a few buffers of each body, never the body.
const MAX_RSS_GROWTH_KIB: u64 = 24 * 1024;

static ALONE: Mutex<()> = Mutex::const_new(());

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status reads");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Measures how far the peak RSS rises above the current RSS while `work` runs.
async fn peak_rss_growth_kib<F: std::future::Future<Output = ()>>(work: F) -> u64 {
    // Writing 5 resets VmHWM to the current RSS (Linux ≥ 4.0); without it the peak of an
    // earlier moment could hide this one's.
    std::fs::write("/proc/self/clear_refs", "5").expect("peak RSS can be reset");
    let before = status_kib("VmRSS");
    work.await;
    status_kib("VmHWM").saturating_sub(before)
}

/// The request body: 64 MiB of a repeating, non-uniform pattern, made chunk by chunk.
fn pattern_chunk(index: u64) -> Bytes {
    Bytes::from(
        (0..CHUNK)
            .map(|i| ((index as usize * 31 + i * 7) % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn pattern_sha256() -> String {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for index in 0..BIG / CHUNK as u64 {
        digest.update(&pattern_chunk(index));
    }
    hex(digest.finish().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The standard config, speaking `protocol` to the upstream.
fn config_speaking(upstream: &MockUpstream, protocol: UpstreamProtocol) -> keygate::config::Config {
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.upstream.protocol = protocol;
    config
}

fn version_of(protocol: UpstreamProtocol) -> http::Version {
    match protocol {
        UpstreamProtocol::Http1 => http::Version::HTTP_11,
        UpstreamProtocol::Http2 => http::Version::HTTP_2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_response_streams_through_in_bounded_memory() {
    response_streams_through_in_bounded_memory(UpstreamProtocol::Http1).await;
}

/// From an HTTP/2 upstream, the stream's window opens only as the client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_response_streams_through_from_an_http2_upstream_in_bounded_memory() {
    response_streams_through_in_bounded_memory(UpstreamProtocol::Http2).await;
}

async fn response_streams_through_in_bounded_memory(protocol: UpstreamProtocol) {
    let _alone = ALONE.lock().await;
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Sized(200, BIG));
    let gateway = TestGateway::start(config_speaking(&upstream, protocol)).await;
    // The mock sends b'x' repeated; hash the expectation the same way, chunk by chunk.
    let mut expected = ring::digest::Context::new(&ring::digest::SHA256);
    let x = vec![b'x'; CHUNK];
    for _ in 0..BIG / CHUNK as u64 {
        expected.update(&x);
    }
    let expected = hex(expected.finish().as_ref());

    let mut received = 0u64;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let growth = peak_rss_growth_kib(async {
        let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-ratelimit-limit"));
        let mut stream = response.bytes_stream();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the response keeps flowing")
        {
            let chunk = chunk.expect("the response body reads");
            received += chunk.len() as u64;
            digest.update(&chunk);
        }
    })
    .await;
    assert_eq!(received, BIG);
    assert_eq!(hex(digest.finish().as_ref()), expected);
    assert_eq!(upstream.received()[0].version, version_of(protocol));
    eprintln!("64 MiB response ({protocol:?}): peak RSS grew {growth} KiB");
    assert!(
        growth < MAX_RSS_GROWTH_KIB,
        "peak RSS grew {growth} KiB while streaming a {} KiB response",
        BIG / 1024
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_request_streams_through_in_bounded_memory() {
    request_streams_through_in_bounded_memory(UpstreamProtocol::Http1).await;
}

/// To an HTTP/2 upstream, keygate reads no more of the upload than the stream's window
/// lets it send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_request_streams_through_to_an_http2_upstream_in_bounded_memory() {
    request_streams_through_in_bounded_memory(UpstreamProtocol::Http2).await;
}

async fn request_streams_through_in_bounded_memory(protocol: UpstreamProtocol) {
    let _alone = ALONE.lock().await;
    let expected = pattern_sha256();
    let upstream = MockUpstream::start().await;
    let mut config = config_speaking(&upstream, protocol);
    config.server.max_body_bytes = 2 * BIG;
    // upstream.timeout runs until the response head, so it covers the upload (it restarts
    // only while keygate waits on the client): give a debug build time for 64 MiB.
    config.upstream.timeout = Duration::from_secs(60);
    let gateway = TestGateway::start(config).await;

    let growth = peak_rss_growth_kib(async {
        let chunks = futures_util::stream::iter(
            (0..BIG / CHUNK as u64).map(|index| Ok::<_, std::io::Error>(pattern_chunk(index))),
        );
        let response = gateway
            .client
            .post(gateway.url("/v1/text-to-image"))
            .bearer_auth(TOKEN_DESIGN_GENERATE)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(chunks))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    })
    .await;
    let received = &upstream.received()[0];
    assert_eq!(received.version, version_of(protocol));
    assert_eq!(received.body_len, BIG);
    assert_eq!(received.body_sha256, expected);
    eprintln!("64 MiB request ({protocol:?}): peak RSS grew {growth} KiB");
    assert!(
        growth < MAX_RSS_GROWTH_KIB,
        "peak RSS grew {growth} KiB while streaming a {} KiB request",
        BIG / 1024
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

const SMALL_LIMIT: u64 = 256 * 1024;

async fn gateway_with_small_limit() -> (MockUpstream, TestGateway) {
    let upstream = MockUpstream::start().await;
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    config.server.max_body_bytes = SMALL_LIMIT;
    (upstream, TestGateway::start(config).await)
}

#[tokio::test]
async fn an_announced_body_over_the_limit_is_413_before_it_is_sent() {
    let _alone = ALONE.lock().await;
    let (upstream, gateway) = gateway_with_small_limit().await;
    let authorization = format!("Authorization: Bearer {TOKEN_DESIGN_GENERATE}");
    // Only the head: the gateway must answer without waiting for the body.
    let head = raw::post_head(&[authorization.as_bytes()], Some(SMALL_LIMIT as usize + 1));
    let response = raw::exchange_while_sending(gateway.proxy_addr(), head, vec![])
        .await
        .response()
        .clone();
    assert_eq!(response.status, 413, "{}", response.body_text());
    assert_eq!(response.body_text(), PAYLOAD_TOO_LARGE_BODY);
    assert_raw_no_secrets(&response);
    assert!(response.header("x-request-id").is_some());
    assert_eq!(upstream.count(), 0);

    // Exactly the limit is fine.
    let body = vec![b'a'; SMALL_LIMIT as usize];
    let head = raw::post_head(&[authorization.as_bytes()], Some(body.len()));
    let response = raw::exchange_while_sending(gateway.proxy_addr(), head, vec![body])
        .await
        .response()
        .clone();
    assert_eq!(response.status, 200, "{}", response.body_text());
    assert_eq!(upstream.received()[0].body_len, SMALL_LIMIT);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413_and_not_counted() {
    let _alone = ALONE.lock().await;
    let (_upstream, gateway) = gateway_with_small_limit().await;
    let authorization = format!("Authorization: Bearer {TOKEN_MARKETING}");
    let head = raw::post_head(
        &[authorization.as_bytes(), b"Transfer-Encoding: chunked"],
        None,
    );
    let body = vec![b'b'; SMALL_LIMIT as usize + 1];
    let parts = raw::chunked(&body, 16 * 1024);
    let response = raw::exchange_while_sending(gateway.proxy_addr(), head, parts)
        .await
        .response()
        .clone();
    assert_eq!(response.status, 413, "{}", response.body_text());
    assert_eq!(response.body_text(), PAYLOAD_TOO_LARGE_BODY);
    assert_raw_no_secrets(&response);
    assert!(response.header("x-request-id").is_some());
    gateway.wait_team_used("marketing", 0).await;

    // A chunked body within the limit passes whole.
    let body = vec![b'c'; SMALL_LIMIT as usize];
    let parts = raw::chunked(&body, 16 * 1024);
    let head = raw::post_head(
        &[authorization.as_bytes(), b"Transfer-Encoding: chunked"],
        None,
    );
    let response = raw::exchange_while_sending(gateway.proxy_addr(), head, parts)
        .await
        .response()
        .clone();
    assert_eq!(response.status, 200, "{}", response.body_text());
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}
