//! Malformed requests over raw TCP: each is answered 4xx (or the connection is closed where
//! HTTP/1.1 gives no way to answer), never 5xx, never a panic; none reaches the upstream;
//! and the next request on a new connection is served as usual.

mod common;

use std::net::SocketAddr;

use common::raw::{self, RawOutcome};
use common::*;

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exactly this status.
    Status(u16),
    /// Any 4xx, or the connection closed without an answer.
    Refused,
}

fn head(lines: &[&str]) -> Vec<u8> {
    let mut text = lines.join("\r\n");
    text.push_str("\r\n\r\n");
    text.into_bytes()
}

fn with(bytes: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.extend_from_slice(tail);
    out
}

async fn next_request_still_works(gw: SocketAddr, after: &str) {
    let auth = format!("Bearer {TOKEN_DESIGN_GENERATE}");
    let request = format!(
        "POST /v1/text-to-image HTTP/1.1\r\nHost: {gw}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PROMPT_BODY}",
        PROMPT_BODY.len()
    );
    let outcome = raw::exchange(gw, request.as_bytes()).await;
    assert_eq!(
        outcome.response().status,
        200,
        "a good request after {after:?} was not served"
    );
}

#[tokio::test]
async fn malformed_requests_are_refused_with_4xx_and_the_gateway_keeps_serving() {
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config_from(&standard_config_text(&upstream.url(), ""))).await;
    let gw = gateway.proxy_addr();
    let host = format!("Host: {gw}");
    let host = host.as_str();
    let good = format!("Authorization: Bearer {TOKEN_DESIGN_GENERATE}");
    let good = good.as_str();
    let read = format!("Authorization: Bearer {TOKEN_DESIGN_READ}");
    let read = read.as_str();
    let post = "POST /v1/text-to-image HTTP/1.1";
    let get = "GET /v1/models HTTP/1.1";
    let huge_value = "x".repeat(20 * 1024);
    let huge_header = format!("X-Huge: {huge_value}");
    let many_headers: Vec<String> = (0..150).map(|i| format!("X-Many-{i}: {i}")).collect();
    let long_target = format!("GET /v1/{} HTTP/1.1", "a".repeat(70 * 1024));
    let long_method = format!("{} /v1/models HTTP/1.1", "G".repeat(20 * 1024));
    let long_auth = format!("Authorization: Bearer {}", "a".repeat(4096));

    let mut cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        // Authorization
        (
            "no Authorization",
            head(&[post, host, "Content-Length: 0"]),
            Expect::Status(401),
        ),
        (
            "Basic scheme",
            head(&[
                post,
                host,
                "Authorization: Basic dXNlcjpwYXNz",
                "Content-Length: 0",
            ]),
            Expect::Status(401),
        ),
        (
            "Bearer without a token",
            head(&[post, host, "Authorization: Bearer", "Content-Length: 0"]),
            Expect::Status(401),
        ),
        (
            "Bearer with two tokens",
            head(&[post, host, "Authorization: Bearer a b", "Content-Length: 0"]),
            Expect::Status(401),
        ),
        (
            "token with quotes",
            head(&[
                post,
                host,
                "Authorization: Bearer \"kg_x\"",
                "Content-Length: 0",
            ]),
            Expect::Status(401),
        ),
        (
            "duplicated Authorization, both valid",
            head(&[post, host, good, good, "Content-Length: 0"]),
            Expect::Status(401),
        ),
        (
            "duplicated Authorization, valid and read",
            head(&[post, host, read, good, "Content-Length: 0"]),
            Expect::Status(401),
        ),
        (
            "Authorization far too long",
            head(&[post, host, &long_auth, "Content-Length: 0"]),
            Expect::Status(401),
        ),
        (
            "obs-text in the token",
            with(
                format!("{post}\r\n{host}\r\nAuthorization: Bearer kg_").as_bytes(),
                b"\xff\xfe\r\nContent-Length: 0\r\n\r\n",
            ),
            Expect::Status(401),
        ),
        (
            "invalid UTF-8 in the token",
            with(
                format!("{post}\r\n{host}\r\nAuthorization: Bearer kg_").as_bytes(),
                b"\xc3\x28\r\nContent-Length: 0\r\n\r\n",
            ),
            Expect::Status(401),
        ),
        (
            "NUL in Authorization",
            with(
                format!("{post}\r\n{host}\r\nAuthorization: Bearer kg_").as_bytes(),
                b"\x00x\r\nContent-Length: 0\r\n\r\n",
            ),
            Expect::Status(400),
        ),
        (
            "bare CR in Authorization",
            with(
                format!("{post}\r\n{host}\r\nAuthorization: Bearer kg_").as_bytes(),
                b"\rx\r\nContent-Length: 0\r\n\r\n",
            ),
            Expect::Status(400),
        ),
        // Sizes
        (
            "one huge header",
            head(&[get, host, good, &huge_header]),
            Expect::Status(431),
        ),
        (
            "150 headers",
            head(
                &[
                    &[get, host, good][..],
                    &many_headers.iter().map(String::as_str).collect::<Vec<_>>(),
                ]
                .concat(),
            ),
            Expect::Status(431),
        ),
        (
            "70 KiB request target",
            head(&[&long_target, host, good]),
            Expect::Refused,
        ),
        (
            "20 KiB method",
            head(&[&long_method, host, good]),
            Expect::Refused,
        ),
        // Header syntax
        (
            "invalid UTF-8 in a header name",
            with(
                format!("{get}\r\n{host}\r\n{good}\r\nX-").as_bytes(),
                b"\xff\xfe: 1\r\n\r\n",
            ),
            Expect::Status(400),
        ),
        (
            "space before the colon",
            head(&[get, host, good, "X-Foo : 1"]),
            Expect::Status(400),
        ),
        (
            "space in a header name",
            head(&[get, host, good, "X Foo: 1"]),
            Expect::Status(400),
        ),
        (
            "obs-fold continuation line",
            head(&[get, host, good, "X-Foo: 1", " folded"]),
            Expect::Status(400),
        ),
        (
            "header line without a colon",
            head(&[get, host, good, "NoColonHere"]),
            Expect::Status(400),
        ),
        (
            "bare CR line ending",
            with(format!("{get}\r{host}\r\n{good}\r\n\r\n").as_bytes(), b""),
            Expect::Status(400),
        ),
        (
            "no Host on HTTP/1.1",
            head(&[get, good]),
            Expect::Status(400),
        ),
        (
            "two Host headers",
            head(&[get, host, "Host: other.example", good]),
            Expect::Status(400),
        ),
        // Framing
        (
            "Content-Length and Transfer-Encoding, no token",
            head(&[
                post,
                host,
                "Content-Length: 4",
                "Transfer-Encoding: chunked",
            ]),
            Expect::Refused,
        ),
        (
            "Transfer-Encoding not ending in chunked",
            head(&[post, host, good, "Transfer-Encoding: gzip"]),
            Expect::Status(400),
        ),
        (
            "Transfer-Encoding: xchunked",
            head(&[post, host, good, "Transfer-Encoding: xchunked"]),
            Expect::Status(400),
        ),
        (
            "Transfer-Encoding: chunked then identity",
            head(&[
                post,
                host,
                good,
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: identity",
            ]),
            Expect::Status(400),
        ),
        (
            "Transfer-Encoding with a space before the colon",
            head(&[post, host, good, "Transfer-Encoding : chunked"]),
            Expect::Status(400),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            head(&[
                "POST /v1/text-to-image HTTP/1.0",
                host,
                good,
                "Transfer-Encoding: chunked",
            ]),
            Expect::Status(400),
        ),
        (
            "conflicting Content-Lengths",
            head(&[post, host, good, "Content-Length: 5", "Content-Length: 6"]),
            Expect::Status(400),
        ),
        (
            "Content-Length list that disagrees",
            head(&[post, host, good, "Content-Length: 5, 6"]),
            Expect::Status(400),
        ),
        (
            "negative Content-Length",
            head(&[post, host, good, "Content-Length: -1"]),
            Expect::Status(400),
        ),
        (
            "signed Content-Length",
            head(&[post, host, good, "Content-Length: +5"]),
            Expect::Status(400),
        ),
        (
            "hex Content-Length",
            head(&[post, host, good, "Content-Length: 0x10"]),
            Expect::Status(400),
        ),
        (
            "Content-Length overflowing u64",
            head(&[post, host, good, "Content-Length: 99999999999999999999999"]),
            Expect::Status(400),
        ),
        (
            "chunk size that is not hex",
            with(
                &head(&[post, host, good, "Transfer-Encoding: chunked"]),
                b"zz\r\nhello\r\n0\r\n\r\n",
            ),
            Expect::Refused,
        ),
        (
            "chunk size overflowing",
            with(
                &head(&[post, host, good, "Transfer-Encoding: chunked"]),
                b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            ),
            Expect::Refused,
        ),
        (
            "chunk longer than its size",
            with(
                &head(&[post, host, good, "Transfer-Encoding: chunked"]),
                b"2\r\nhello\r\n0\r\n\r\n",
            ),
            Expect::Refused,
        ),
        // Request lines
        ("method only", head(&["GET", host]), Expect::Status(400)),
        (
            "no version",
            head(&["GET /v1/models", host]),
            Expect::Status(400),
        ),
        (
            "HTTP/9.9",
            head(&["GET /v1/models HTTP/9.9", host]),
            Expect::Refused,
        ),
        (
            "HTTP/2.0 on an HTTP/1 connection",
            head(&["GET /v1/models HTTP/2.0", host]),
            Expect::Refused,
        ),
        (
            "extra words after the version",
            head(&["GET /v1/models HTTP/1.1 please", host]),
            Expect::Status(400),
        ),
        (
            "two spaces in the request line",
            head(&["GET  /v1/models HTTP/1.1", host]),
            Expect::Status(400),
        ),
        (
            "tab in the request line",
            head(&["GET\t/v1/models HTTP/1.1", host]),
            Expect::Status(400),
        ),
        (
            "invalid UTF-8 in the path",
            with(
                b"GET /v1/\xff\xfe HTTP/1.1\r\n",
                format!("{host}\r\n{good}\r\n\r\n").as_bytes(),
            ),
            Expect::Status(400),
        ),
        (
            "control character in the path",
            with(
                b"GET /v1/\x01 HTTP/1.1\r\n",
                format!("{host}\r\n{good}\r\n\r\n").as_bytes(),
            ),
            Expect::Status(400),
        ),
        (
            "target not starting with /",
            head(&["GET v1/models HTTP/1.1", host, good]),
            Expect::Refused,
        ),
        (
            "binary garbage",
            b"\x00\x01\x02\x03\xff\xfe\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
        (
            "a TLS ClientHello on the plain port",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
            Expect::Refused,
        ),
        (
            "an HTTP/2 preface then garbage",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ngarbage-not-frames".to_vec(),
            Expect::Refused,
        ),
    ];
    // Lower-case method: a valid extension method that no route allows.
    cases.push((
        "lower-case method",
        head(&[
            "post /v1/text-to-image HTTP/1.1",
            host,
            good,
            "Content-Length: 0",
        ]),
        Expect::Status(403),
    ));

    // Bodies cut off by the client closing its side.
    let cut_off: Vec<(&str, Vec<u8>)> = vec![
        (
            "chunk without its CRLF",
            with(
                &head(&[post, host, good, "Transfer-Encoding: chunked"]),
                b"5\r\nhello",
            ),
        ),
        (
            "chunked body without its last chunk",
            with(
                &head(&[post, host, good, "Transfer-Encoding: chunked"]),
                b"5\r\nhello\r\n",
            ),
        ),
        (
            "Content-Length longer than the body",
            with(&head(&[post, host, good, "Content-Length: 100"]), b"{}"),
        ),
    ];
    for (what, bytes) in &cut_off {
        let outcome = raw::exchange_then_close(gw, bytes).await;
        if let RawOutcome::Response(response) = &outcome {
            assert!(
                (400..500).contains(&response.status),
                "{what}: answered {}",
                response.status
            );
        }
        next_request_still_works(gw, what).await;
    }
    let cases_sent = cases.len() + cut_off.len();

    for (what, bytes, expect) in &cases {
        let outcome = raw::exchange(gw, bytes).await;
        match (expect, &outcome) {
            (Expect::Status(status), _) => {
                let response = outcome.response();
                assert_eq!(response.status, *status, "{what}: {}", response.body_text());
            }
            (Expect::Refused, RawOutcome::Response(response)) => assert!(
                (400..500).contains(&response.status),
                "{what}: answered {}",
                response.status
            ),
            (Expect::Refused, RawOutcome::Closed { .. }) => {}
        }
        if let RawOutcome::Response(response) = &outcome {
            assert!(response.status < 500, "{what}: {}", response.status);
        }
        next_request_still_works(gw, what).await;
    }
    let received = upstream.received();
    let complete: Vec<_> = received
        .iter()
        .filter(|r| r.body_complete)
        .map(|r| {
            format!(
                "{} {} {}",
                r.method,
                r.path_and_query,
                String::from_utf8_lossy(&r.body)
            )
        })
        .collect();
    // A malformed body is streamed until it breaks, so the upstream may see the start of
    // it, always cut off. Complete requests are only the good ones.
    assert_eq!(complete.len(), cases_sent, "{complete:?}");
    assert!(
        complete
            .iter()
            .all(|r| r == &format!("POST /v1/text-to-image {PROMPT_BODY}")),
        "{complete:?}"
    );
    assert_eq!(panics_so_far(), 0);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// Lenient parsing that HTTP allows is safe because keygate re-serialises every request:
/// what the upstream receives is always one well-framed request.
#[tokio::test]
async fn tolerated_oddities_are_reframed_and_cannot_smuggle() {
    let upstream = MockUpstream::start().await;
    let gateway = TestGateway::start(config_from(&standard_config_text(&upstream.url(), ""))).await;
    let gw = gateway.proxy_addr();
    let good = format!("Authorization: Bearer {TOKEN_DESIGN_GENERATE}");
    let smuggled = format!(
        "POST /v1/text-to-image HTTP/1.1\r\nHost: {gw}\r\n{good}\r\nContent-Length: 0\r\n\r\n"
    );

    // Content-Length and Transfer-Encoding together: framed by Transfer-Encoding alone
    // (RFC 9112 §6.3), the connection closed after the answer, so the request hidden
    // after the chunked body is never read as a second request.
    let mut bytes = format!(
        "POST /v1/text-to-image HTTP/1.1\r\nHost: {gw}\r\n{good}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{PROMPT_BODY}\r\n0\r\n\r\n",
        PROMPT_BODY.len()
    );
    bytes.push_str(&smuggled);
    let mut stream = raw::connect(gw).await;
    use tokio::io::AsyncWriteExt;
    stream.write_all(bytes.as_bytes()).await.unwrap();
    let first = raw::read_response(&mut stream).await;
    assert_eq!(first.response().status, 200);
    raw::await_close(&mut stream, raw::RAW_TIMEOUT).await;
    let received = upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, PROMPT_BODY.as_bytes());
    assert!(
        !received[0].headers.contains_key("content-length"),
        "the stale Content-Length must not frame the upstream request: {:?}",
        received[0].headers.keys().collect::<Vec<_>>()
    );

    // Bare LF line endings (RFC 9112 §2.2 lets a recipient accept them), obs-text in a
    // header value: served, and forwarded as one CRLF-framed request.
    let bare_lf = format!("GET /v1/models HTTP/1.1\nHost: {gw}\n{good}\nConnection: close\n\n");
    assert_eq!(
        raw::exchange(gw, bare_lf.as_bytes())
            .await
            .response()
            .status,
        200
    );
    let mut obs_text = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {gw}\r\n{good}\r\nConnection: close\r\nX-Note: caf"
    )
    .into_bytes();
    obs_text.extend_from_slice(b"\xe9\r\n\r\n");
    assert_eq!(raw::exchange(gw, &obs_text).await.response().status, 200);
    let received = upstream.received();
    assert_eq!(received.len(), 3);
    assert_eq!(received[2].headers["x-note"].as_bytes(), b"caf\xe9");

    // A pipelined second request on a keep-alive connection is its own request with its
    // own authentication: no token, no forwarding.
    let pipelined = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {gw}\r\n{good}\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: {gw}\r\nConnection: close\r\n\r\n"
    );
    let mut stream = raw::connect(gw).await;
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let mut both = Vec::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(raw::RAW_TIMEOUT, stream.read_to_end(&mut both))
        .await
        .expect("both answers and the close in time")
        .unwrap();
    let both = String::from_utf8_lossy(&both);
    let statuses: Vec<&str> = both
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &both[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "401"], "{both}");
    assert_eq!(upstream.count(), 4);

    assert_eq!(panics_so_far(), 0);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}
