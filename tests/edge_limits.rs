//! Limits and timeouts at the edge: request head size (431), body size (413, on the
//! Content-Length and while streaming), the header read timeout (slowloris), the
//! keep-alive idle timeout (HTTP/1 and HTTP/2), a stalled request body (408), upstream
//! connect (502) and response (504) timeouts, the connection cap (503 and close) and the
//! HTTP/2 settings. Time bounds are generous upper limits on events awaited, and lower
//! limits where closing too early is the bug.

mod common;

use std::time::{Duration, Instant};

use common::h2c;
use common::raw::{self, RawOutcome};
use common::*;
use keygate::config::Config;
use tokio::io::AsyncWriteExt;

async fn gateway(upstream: &MockUpstream, adjust: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = config_from(&standard_config_text(&upstream.url(), ""));
    adjust(&mut config);
    TestGateway::start(config).await
}

fn post_head(gw: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "POST /v1/text-to-image HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\nContent-Type: application/json\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn request_heads_over_the_limit_answer_431() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream, |_| {}).await;
    let gw = gateway.proxy_addr();
    let get = |extra: String| {
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\n{extra}Connection: close\r\n\r\n"
        )
    };
    // Default limit 16 KiB: a 12 KiB head is fine, a 20 KiB one is not.
    let fits = get(format!("X-Pad: {}\r\n", "p".repeat(12 * 1024)));
    assert_eq!(
        raw::exchange(gw, fits.as_bytes()).await.response().status,
        200
    );
    let over = get(format!("X-Pad: {}\r\n", "p".repeat(20 * 1024)));
    assert_eq!(
        raw::exchange(gw, over.as_bytes()).await.response().status,
        431
    );
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(
        raw::exchange(gw, get(many).as_bytes())
            .await
            .response()
            .status,
        431
    );

    // HTTP/2: the same limit as SETTINGS_MAX_HEADER_LIST_SIZE; a larger list is refused
    // (by the client library already, or by the gateway), never answered 5xx.
    let mut client = h2c::connect(gw).await;
    let mut big = h2c::get(
        http::Method::GET,
        &format!("http://{gw}/v1/models"),
        TOKEN_DESIGN_GENERATE,
    );
    big.headers_mut()
        .insert("x-pad", "p".repeat(20 * 1024).parse().unwrap());
    match h2c::send(&mut client, big).await {
        Ok((status, _)) => assert_eq!(status, 431),
        Err(e) => assert!(!e.is_io(), "{e}"),
    }
    let (status, _) = h2c::request(
        gw,
        TOKEN_DESIGN_GENERATE,
        http::Method::GET,
        &format!("http://{gw}/v1/models"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(upstream.count(), 2);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn bodies_over_the_limit_answer_413_on_length_and_while_streaming() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream, |c| c.server.max_body_bytes = 1024).await;
    let gw = gateway.proxy_addr();

    let declared = post_head(gw, "Content-Length: 1025\r\n");
    let outcome = raw::exchange(gw, declared.as_bytes()).await;
    assert_eq!(outcome.response().status, 413);
    assert_eq!(outcome.response().body_text(), PAYLOAD_TOO_LARGE_BODY);
    assert_eq!(upstream.count(), 0, "refused before anything was forwarded");

    let exact = format!(
        "{}{}",
        post_head(gw, "Content-Length: 1024\r\nConnection: close\r\n"),
        "x".repeat(1024)
    );
    assert_eq!(
        raw::exchange(gw, exact.as_bytes()).await.response().status,
        200
    );
    assert_eq!(upstream.received()[0].body_len, 1024);

    // Chunked: the limit is only known to be passed mid-stream. The terminating chunk is
    // never sent; the answer must come anyway.
    let mut chunked = post_head(gw, "Transfer-Encoding: chunked\r\n");
    for _ in 0..3 {
        chunked.push_str(&format!("200\r\n{}\r\n", "y".repeat(512)));
    }
    let mut stream = raw::connect(gw).await;
    stream.write_all(chunked.as_bytes()).await.unwrap();
    let outcome = raw::read_response(&mut stream).await;
    assert_eq!(outcome.response().status, 413);
    assert_eq!(outcome.response().body_text(), PAYLOAD_TOO_LARGE_BODY);
    let received = upstream.received();
    assert!(
        received[1..].iter().all(|r| !r.body_complete),
        "an oversized body reached the upstream complete"
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_head_that_never_ends_is_closed_within_the_header_timeout() {
    head_timeouts(None).await;
}

/// The same on shards: a connection's timers run on the shard's own event loop.
#[tokio::test]
async fn a_head_that_never_ends_is_closed_within_the_header_timeout_on_shards_too() {
    head_timeouts(Some(2)).await;
}

async fn head_timeouts(shards: Option<usize>) {
    let upstream = MockUpstream::start().await;
    let timeout = Duration::from_millis(300);
    let gateway = gateway(&upstream, |c| {
        c.server.header_read_timeout = timeout;
        c.server.idle_timeout = Duration::from_secs(30);
        c.server.shards = shards;
    })
    .await;
    let gw = gateway.proxy_addr();
    let bound = Duration::from_secs(5);

    // Silent from the start.
    let mut silent = raw::connect(gw).await;
    let took = raw::await_close(&mut silent, bound).await;
    assert!(
        took >= timeout - Duration::from_millis(50),
        "closed after {took:?}"
    );

    // Half a head, then nothing.
    let mut half = raw::connect(gw).await;
    half.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: {gw}\r\n").as_bytes())
        .await
        .unwrap();
    raw::await_close(&mut half, bound).await;

    // Slowloris: a byte every 50 ms keeps the connection busy but the head never ends.
    let mut trickle = raw::connect(gw).await;
    let (mut reader, mut writer) = trickle.split();
    let writing = async {
        for byte in b"GET /v1/models HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let closing = async {
        use tokio::io::AsyncReadExt;
        let mut sink = [0u8; 1024];
        let started = Instant::now();
        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
        started.elapsed()
    };
    let took = tokio::time::timeout(bound, async {
        tokio::select! {
            took = closing => took,
            _ = writing => panic!("the trickle was never cut off"),
        }
    })
    .await
    .expect("the slowloris connection was closed in time");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");

    // Keep-alive: after a complete exchange, the next head gets the same allowance from
    // its first byte.
    let mut kept = raw::connect(gw).await;
    kept.write_all(
        format!("GET /v1/models HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(raw::read_response(&mut kept).await.response().status, 200);
    kept.write_all(b"GET /v1/models HTTP/1.1\r\n")
        .await
        .unwrap();
    let took = raw::await_close(&mut kept, bound).await;
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_idle_timeout_not_the_header_timeout() {
    let upstream = MockUpstream::start().await;
    let header = Duration::from_millis(200);
    let idle = Duration::from_millis(1500);
    let gateway = gateway(&upstream, |c| {
        c.server.header_read_timeout = header;
        c.server.idle_timeout = idle;
    })
    .await;
    let gw = gateway.proxy_addr();
    let bound = Duration::from_secs(10);

    let mut kept = raw::connect(gw).await;
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\n\r\n"
    );
    kept.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(raw::read_response(&mut kept).await.response().status, 200);
    let took = raw::await_close(&mut kept, bound).await;
    assert!(
        took >= idle - Duration::from_millis(100),
        "an idle HTTP/1 connection was closed after {took:?}, before the idle timeout"
    );

    // HTTP/2: GOAWAY and close once no stream has been open for the idle timeout.
    let tcp = raw::connect(gw).await;
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = connection.await;
        let _ = closed_tx.send(Instant::now());
    });
    let mut client = client.ready().await.unwrap();
    let request = h2c::get(
        http::Method::GET,
        &format!("http://{gw}/v1/models"),
        TOKEN_DESIGN_GENERATE,
    );
    let (status, _) = h2c::send(&mut client, request).await.unwrap();
    assert_eq!(status, 200);
    let answered = Instant::now();
    let closed_at = tokio::time::timeout(bound, closed_rx)
        .await
        .expect("idle HTTP/2 connection closed in time")
        .unwrap();
    let took = closed_at - answered;
    assert!(
        took >= idle - Duration::from_millis(100),
        "closed after {took:?}"
    );
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_stalled_request_body_answers_408_even_when_the_upstream_timeout_is_shorter() {
    let upstream = MockUpstream::start().await;
    // Margins wide enough for a machine running the whole suite at once: the upstream
    // request must have started sending the body before its first deadline (400 ms was
    // once too short for connecting and the first body poll in a full parallel run).
    let gateway = gateway(&upstream, |c| {
        c.server.body_read_timeout = Duration::from_millis(3000);
        c.upstream.timeout = Duration::from_millis(1000);
    })
    .await;
    let gw = gateway.proxy_addr();
    let mut stream = raw::connect(gw).await;
    let started = Instant::now();
    stream
        .write_all(format!("{}{{\"prompt\"", post_head(gw, "Content-Length: 100\r\n")).as_bytes())
        .await
        .unwrap();
    let outcome = raw::read_response(&mut stream).await;
    assert_eq!(
        outcome.response().status,
        408,
        "{}",
        outcome.response().body_text()
    );
    assert_eq!(outcome.response().body_text(), REQUEST_TIMEOUT_BODY);
    assert!(started.elapsed() >= Duration::from_millis(2950));
    assert!(upstream.received().iter().all(|r| !r.body_complete));
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// Over an HTTP/2 upstream, a body streaming from the client (chunked: never held) that
/// stalls ends its stream: 408 to the client, a reset stream for the upstream, which sees
/// the body broken off.
#[tokio::test]
async fn a_stalled_streamed_body_to_an_http2_upstream_answers_408_and_resets_its_stream() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream, |c| {
        c.server.body_read_timeout = Duration::from_millis(1000);
        c.upstream.protocol = keygate::config::UpstreamProtocol::Http2;
    })
    .await;
    let gw = gateway.proxy_addr();
    let mut stream = raw::connect(gw).await;
    let head = post_head(gw, "Transfer-Encoding: chunked\r\n");
    stream
        .write_all(format!("{head}9\r\n{{\"prompt\"\r\n").as_bytes())
        .await
        .unwrap();
    let outcome = raw::read_response(&mut stream).await;
    assert_eq!(outcome.response().status, 408);
    assert_eq!(outcome.response().body_text(), REQUEST_TIMEOUT_BODY);
    upstream.wait_for(1, Duration::from_secs(5)).await;
    let received = &upstream.received()[0];
    assert_eq!(received.version, http::Version::HTTP_2);
    assert_eq!(received.body, "{\"prompt\"");
    assert!(!received.body_complete, "the stream was reset, not ended");
    gateway.wait_team_used("design", 0).await;
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// Sends `head`, then `parts` one every `pace`, while reading the answer.
async fn paced_exchange(
    gw: std::net::SocketAddr,
    head: String,
    parts: Vec<Vec<u8>>,
    pace: Duration,
) -> raw::RawOutcome {
    let (mut reader, mut writer) = raw::connect(gw).await.into_split();
    let sender = tokio::spawn(async move {
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for part in parts {
            tokio::time::sleep(pace).await;
            if writer.write_all(&part).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    });
    let outcome = raw::read_response(&mut reader).await;
    sender.abort();
    outcome
}

/// A gateway asking 1000 B/s of request bodies, with the given pause limit, and the
/// answer to a body of `parts` sent one every `pace`.
async fn upload_at_pace(
    pause_limit: Duration,
    parts: Vec<Vec<u8>>,
    pace: Duration,
) -> (MockUpstream, TestGateway, raw::RawOutcome) {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream, |c| {
        c.server.body_read_timeout = pause_limit;
        c.server.body_min_rate = 1000;
    })
    .await;
    let gw = gateway.proxy_addr();
    let length: usize = parts.iter().map(Vec::len).sum();
    let head = post_head(gw, &format!("Content-Length: {length}\r\n"));
    let outcome = paced_exchange(gw, head, parts, pace).await;
    (upstream, gateway, outcome)
}

#[tokio::test]
async fn a_body_trickling_in_under_the_pause_limit_answers_408() {
    // 5 bytes every 250 ms: every pause is under the limit, the rate far below it.
    let (upstream, gateway, outcome) = upload_at_pace(
        Duration::from_millis(400),
        vec![b"{\"pro".to_vec(); 20],
        Duration::from_millis(250),
    )
    .await;
    assert_eq!(outcome.response().status, 408);
    assert_eq!(outcome.response().body_text(), REQUEST_TIMEOUT_BODY);
    assert!(upstream.received().iter().all(|r| !r.body_complete));
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn a_steady_upload_above_the_minimum_rate_goes_through() {
    // 600 bytes every 150 ms (4000 B/s) for longer than the pause limit.
    let (upstream, gateway, outcome) = upload_at_pace(
        Duration::from_millis(300),
        vec![vec![b' '; 600]; 6],
        Duration::from_millis(150),
    )
    .await;
    assert_eq!(
        outcome.response().status,
        200,
        "{}",
        outcome.response().body_text()
    );
    assert_eq!(upstream.received()[0].body_len, 3600);
    gateway.shutdown().await;
}

#[tokio::test]
async fn upstream_response_timeout_answers_504() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Hang);
    let gateway = gateway(&upstream, |c| {
        c.upstream.timeout = Duration::from_millis(300)
    })
    .await;
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 504);
    let body = json_body(response).await;
    assert_eq!(body["error"]["code"], "gateway_timeout");
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn upstream_connect_timeout_answers_502() {
    // A listener that never accepts, with its accept queue filled: further SYNs are
    // dropped, so a connect to it hangs until the gateway's connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let black_hole = socket.listen(1).unwrap();
    let addr = black_hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }

    let upstream_url = format!("http://{addr}");
    let mut config = config_from(&standard_config_text(&upstream_url, ""));
    config.upstream.connect_timeout = Duration::from_millis(300);
    config.upstream.timeout = Duration::from_secs(10);
    let gateway = TestGateway::start(config).await;
    let started = Instant::now();
    let response = gateway.generate(TOKEN_DESIGN_GENERATE).await;
    assert_eq!(response.status(), 502);
    let body = json_body(response).await;
    assert_eq!(body["error"]["code"], "bad_gateway");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    gateway.shutdown().await;
    drop(fillers);
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn connections_over_the_cap_get_a_clean_503_and_a_freed_slot_is_reused() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream, |c| {
        c.server.max_connections = 2;
        c.server.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let gw = gateway.proxy_addr();
    let first = raw::connect(gw).await;
    let _second = raw::connect(gw).await;

    let good = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\nConnection: close\r\n\r\n"
    );
    // The two slots are taken once the gateway has accepted both: poll until refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let outcome = raw::exchange(gw, good.as_bytes()).await;
        if outcome.status() == Some(503) {
            break outcome;
        }
        assert!(
            Instant::now() < deadline,
            "the third connection was never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let response = refused.response();
    assert_eq!(
        response.body_text(),
        r#"{"error":{"code":"service_unavailable","message":"Service temporarily unavailable. Please try again later."}}"#
    );
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(upstream.count(), 0);

    // A slot comes back when a connection closes.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let outcome = raw::exchange(gw, good.as_bytes()).await;
        if outcome.status() == Some(200) {
            break;
        }
        assert!(
            matches!(outcome, RawOutcome::Response(ref r) if r.status == 503),
            "{outcome:?}"
        );
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// With `max_connections = 1` taken by a stuck connection: polls with fresh requests (503
/// while the slot is taken) until one gets 200, failing when the slot never comes back.
async fn await_slot_freed(gw: std::net::SocketAddr, holder: &str) {
    let good = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\nConnection: close\r\n\r\n"
    );
    let started = Instant::now();
    loop {
        let outcome = raw::exchange(gw, good.as_bytes()).await;
        if outcome.status() == Some(200) {
            return;
        }
        assert_eq!(outcome.status(), Some(503));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{holder} was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_cut_off_after_the_idle_timeout() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Sized(200, 256 * 1024 * 1024));
    let gateway = gateway(&upstream, |c| {
        c.server.max_connections = 1;
        c.server.idle_timeout = Duration::from_millis(500);
    })
    .await;
    let gw = gateway.proxy_addr();
    let mut stalled = raw::connect(gw).await;
    stalled
        .write_all(
            format!("GET /v1/models HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    upstream.wait_for(1, Duration::from_secs(5)).await;
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));

    // The unread answer holds the only connection slot until the gateway gives up on it.
    await_slot_freed(gw, "the connection that stopped reading").await;
    drop(stalled);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn an_http2_client_that_grants_no_window_is_cut_off_after_the_idle_timeout() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Sized(200, 16 * 1024 * 1024));
    let gateway = gateway(&upstream, |c| {
        c.server.max_connections = 1;
        c.server.idle_timeout = Duration::from_millis(500);
    })
    .await;
    let gw = gateway.proxy_addr();

    // The client keeps its connection alive (its task reads every frame) but never gives
    // back flow-control window: the server's writes never block, the answer never moves.
    let mut client = h2c::connect(gw).await;
    let (response, _) = client
        .send_request(
            h2c::get(
                http::Method::GET,
                &format!("http://{gw}/v1/models"),
                TOKEN_DESIGN_GENERATE,
            ),
            true,
        )
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.data().await.unwrap().unwrap();
    assert!(!first.is_empty());
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));

    // The untaken answer holds the only connection slot until the gateway gives up on it.
    await_slot_freed(gw, "the HTTP/2 connection that granted no window").await;
    drop(body);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// One HTTP/2 connection carries up to `http2_max_concurrent_streams` requests, so the
/// connection cap alone does not bound what is in flight (nor the memory it takes).
#[tokio::test]
async fn requests_over_max_requests_in_flight_get_503_even_on_one_http2_connection() {
    let upstream = MockUpstream::start().await;
    upstream.set_reply(Reply::Hang);
    let gateway = gateway(&upstream, |c| c.server.max_requests_in_flight = 2).await;
    let gw = gateway.proxy_addr();
    let uri = format!("http://{gw}/v1/models");
    let mut client = h2c::connect(gw).await;
    let request = || h2c::get(http::Method::GET, &uri, TOKEN_DESIGN_GENERATE);

    // Two requests the upstream holds take both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (response, _) = client.send_request(request(), true).unwrap();
        held.push(response);
    }
    upstream.wait_for(2, Duration::from_secs(5)).await;
    let (status, body) = h2c::send(&mut client, request()).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(
        body,
        r#"{"error":{"code":"service_unavailable","message":"Service temporarily unavailable. Please try again later."}}"#
    );
    assert_eq!(upstream.count(), 2, "refused before the upstream");
    assert!(
        logs::captured().contains("requests refused: server.max_requests_in_flight reached"),
        "the operator is told, once a second at most"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        common::observe::series(
            &metrics,
            "keygate_rejections_total",
            &[("reason", "overloaded")]
        ),
        Some(1.0)
    );
    let gauge = |name| common::observe::series(&metrics, name, &[]);
    assert_eq!(gauge("keygate_requests_in_flight"), Some(2.0));
    assert_eq!(gauge("keygate_requests_in_flight_limit"), Some(2.0));

    // The client gives up on one (its stream is reset): that slot comes back.
    upstream.set_reply(Reply::Json(200, common::upstream::OK_JSON));
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = h2c::send(&mut client, request()).await.unwrap();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn http2_settings_are_bounded_and_rapid_resets_do_not_hurt() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream, |c| c.server.http2_max_concurrent_streams = 8).await;
    let gw = gateway.proxy_addr();
    let uri = format!("http://{gw}/v1/models");

    let mut client = h2c::connect(gw).await;
    let (status, _) = h2c::send(
        &mut client,
        h2c::get(http::Method::GET, &uri, TOKEN_DESIGN_GENERATE),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        client.current_max_send_streams(),
        8,
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );

    // Rapid reset (CVE-2023-44487): open streams and cancel them at once, many times.
    // Requests without a token keep the quota out of it.
    let mut rapid = h2c::connect(gw).await;
    let mut reset = 0;
    for _ in 0..500 {
        let Ok(ready) = rapid.clone().ready().await else {
            break;
        };
        rapid = ready;
        let request = http::Request::builder().uri(&uri).body(()).unwrap();
        let Ok((_, mut stream)) = rapid.send_request(request, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
    }
    assert!(reset > 0);
    // Whatever became of that connection, the gateway serves everyone else.
    let (status, _) = h2c::request(gw, TOKEN_DESIGN_GENERATE, http::Method::GET, &uri).await;
    assert_eq!(status, 200);
    let good = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {TOKEN_DESIGN_GENERATE}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        raw::exchange(gw, good.as_bytes()).await.response().status,
        200
    );
    assert_eq!(panics_so_far(), 0);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}
