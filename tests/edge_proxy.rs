//! keygate is never an open proxy: whatever the request line, Host, X-Forwarded-Host or
//! CONNECT say, nothing but `upstream.url`'s origin is ever contacted; the route (and so
//! the scope) is decided on one canonical path, and that path is what the upstream gets;
//! the client cannot choose hop-by-hop, forwarding or keygate's own headers.

mod common;

use common::canary::Canary;
use common::h2c;
use common::observe::UsageFile;
use common::raw::{self, RawOutcome};
use common::*;

async fn gateway_with_upstream(extra: &str) -> (MockUpstream, TestGateway) {
    let upstream = MockUpstream::start().await;
    let config = config_from(&standard_config_text(&upstream.url(), extra));
    let gateway = TestGateway::start(config).await;
    (upstream, gateway)
}

/// An HTTP/1.1 request as bytes. `host: None` leaves Host out.
fn request(
    method: &str,
    target: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let mut text = format!("{method} {target} HTTP/1.1\r\n");
    if let Some(host) = host {
        text.push_str(&format!("Host: {host}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("Connection: close\r\n\r\n");
    text.push_str(body);
    text.into_bytes()
}

/// What the upstream received, without headers (they hold the real key).
fn paths(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .received()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn no_probe_ever_reaches_another_host() {
    let (upstream, gateway) = gateway_with_upstream("").await;
    let canary = Canary::start(false).await;
    let canary6 = Canary::start(true).await;
    let gw = gateway.proxy_addr();
    let c = canary.addr.to_string();
    let c_port = canary.addr.port();
    let c6 = canary6.addr.to_string();
    let own = gw.to_string();
    let auth = bearer(TOKEN_DESIGN_GENERATE);
    let token = [("Authorization", auth.as_str())];

    // (what, request, expected status; None = the connection may be closed instead)
    let probes: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        (
            "absolute-form naming the canary, Host agreeing",
            request(
                "GET",
                &format!("http://{c}/v1/models"),
                Some(&c),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "absolute-form naming the canary, Host naming the gateway",
            request(
                "POST",
                &format!("http://{c}/v1/text-to-image"),
                Some(&own),
                &token,
                PROMPT_BODY,
            ),
            Some(400),
        ),
        (
            "absolute-form https",
            request(
                "GET",
                &format!("https://{c}/v1/models"),
                Some(&c),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "absolute-form without a path",
            request("GET", &format!("http://{c}"), Some(&c), &token, ""),
            Some(400),
        ),
        (
            "absolute-form, other scheme",
            request("GET", &format!("ftp://{c}/v1/models"), Some(&c), &token, ""),
            None,
        ),
        (
            "absolute-form with user info naming the gateway",
            request(
                "GET",
                &format!("http://{own}@{c}/v1/models"),
                Some(&c),
                &token,
                "",
            ),
            None,
        ),
        (
            "absolute-form with user info naming the canary",
            request(
                "GET",
                &format!("http://{c}@{own}/v1/models"),
                Some(&own),
                &token,
                "",
            ),
            None,
        ),
        (
            "absolute-form, IPv4-mapped IPv6 literal",
            request(
                "GET",
                &format!("http://[::ffff:127.0.0.1]:{c_port}/v1/models"),
                Some(&own),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "absolute-form, IPv6 literal",
            request(
                "GET",
                &format!("http://{c6}/v1/models"),
                Some(&c6),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "absolute-form, decimal IPv4",
            request(
                "GET",
                &format!("http://2130706433:{c_port}/v1/models"),
                Some(&own),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "absolute-form, short IPv4",
            request(
                "GET",
                &format!("http://127.1:{c_port}/v1/models"),
                Some(&own),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "absolute-form, localhost",
            request(
                "GET",
                &format!("http://localhost:{c_port}/v1/models"),
                Some(&own),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "CONNECT to the canary",
            request("CONNECT", &c, Some(&c), &token, ""),
            Some(400),
        ),
        (
            "CONNECT to the canary's IPv6 twin",
            request("CONNECT", &c6, Some(&c6), &token, ""),
            Some(400),
        ),
        (
            "CONNECT with an absolute target",
            request("CONNECT", &format!("http://{c}/"), Some(&c), &token, ""),
            Some(400),
        ),
        (
            "OPTIONS *",
            request("OPTIONS", "*", Some(&own), &token, ""),
            Some(400),
        ),
        (
            "//host in the path (a path to the upstream, no route)",
            request("GET", &format!("//{c}/v1/models"), Some(&own), &token, ""),
            Some(403),
        ),
        (
            "@host in the target",
            request("GET", &format!("@{c}/v1/models"), Some(&own), &token, ""),
            None,
        ),
        (
            "encoded slashes towards the host",
            request(
                "GET",
                &format!("/%2F%2F{c}/v1/models"),
                Some(&own),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "encoded dot-dot escaping the root",
            request(
                "GET",
                &format!("/v1/%2e%2e/%2e%2e/{c}/"),
                Some(&own),
                &token,
                "",
            ),
            Some(400),
        ),
        (
            "backslash towards the host",
            request("GET", &format!("/\\{c}/v1/models"), Some(&own), &token, ""),
            None,
        ),
        (
            "double-encoded slash",
            request("GET", &format!("/v1/%252F%252F{c}"), Some(&own), &token, ""),
            Some(400),
        ),
        (
            "two Host headers",
            request(
                "GET",
                "/v1/models",
                Some(&own),
                &[token[0], ("Host", &c)],
                "",
            ),
            Some(400),
        ),
    ];
    for (what, bytes, expected) in &probes {
        let outcome = raw::exchange(gw, bytes).await;
        match (expected, &outcome) {
            (Some(status), _) => {
                let response = outcome.response();
                assert_eq!(response.status, *status, "{what}: {}", response.body_text());
                if *status == 400 {
                    assert_eq!(response.body_text(), BAD_REQUEST_BODY, "{what}");
                }
            }
            (None, RawOutcome::Response(response)) => assert!(
                (400..500).contains(&response.status),
                "{what}: {}",
                response.status
            ),
            (None, RawOutcome::Closed { .. }) => {}
        }
    }
    // None of these were forwarded anywhere, not even to the real upstream.
    assert_eq!(upstream.count(), 0, "{:?}", paths(&upstream));

    // Host, X-Forwarded-Host and Forwarded naming the canary are just ignored: the request
    // goes to the upstream, which sees its own Host and none of those.
    let ignored: Vec<(&str, Vec<u8>)> = vec![
        (
            "Host naming the canary",
            request("GET", "/v1/models", Some(&c), &token, ""),
        ),
        (
            "X-Forwarded-Host naming the canary",
            request(
                "GET",
                "/v1/models",
                Some(&own),
                &[token[0], ("X-Forwarded-Host", &c)],
                "",
            ),
        ),
        (
            "Forwarded host= naming the canary",
            request(
                "GET",
                "/v1/models",
                Some(&own),
                &[token[0], ("Forwarded", &format!("host={c};proto=http"))],
                "",
            ),
        ),
        (
            "X-Original-URL naming the canary",
            request(
                "GET",
                "/v1/models",
                Some(&own),
                &[token[0], ("X-Original-URL", &format!("http://{c}/"))],
                "",
            ),
        ),
        (
            "absolute-form naming the gateway itself",
            request(
                "GET",
                &format!("http://{own}/v1/models"),
                Some(&c),
                &token,
                "",
            ),
        ),
    ];
    for (what, bytes) in &ignored {
        let outcome = raw::exchange(gw, bytes).await;
        assert_eq!(outcome.response().status, 200, "{what}");
    }
    let received = upstream.received();
    assert_eq!(received.len(), ignored.len());
    for request in &received {
        assert_eq!(request.path_and_query, "/v1/models");
        assert_eq!(request.headers["host"], upstream.addr.to_string());
        for gone in ["x-forwarded-host", "forwarded", "x-original-url"] {
            assert!(!request.headers.contains_key(gone), "{gone} was forwarded");
        }
    }

    // HTTP/2: `:authority` naming the canary is another Host (ignored); CONNECT is refused.
    let (status, _) = h2c::request(
        gw,
        TOKEN_DESIGN_GENERATE,
        http::Method::GET,
        &format!("http://{c}/v1/models"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = h2c::request(gw, TOKEN_DESIGN_GENERATE, http::Method::CONNECT, &c).await;
    assert_eq!(status, 400);
    assert_eq!(body, BAD_REQUEST_BODY);
    assert_eq!(upstream.count(), ignored.len() + 1);

    canary.assert_untouched();
    canary6.assert_untouched();
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn the_upstream_receives_only_the_canonical_path() {
    let (upstream, gateway) = gateway_with_upstream("").await;
    let gw = gateway.proxy_addr();
    let own = gw.to_string();
    let generate = bearer(TOKEN_DESIGN_GENERATE);
    // (method, raw target, what the upstream must receive)
    let cases = [
        ("POST", "/v1/text-to-image", "/v1/text-to-image"),
        ("POST", "/v1/./text-to-image", "/v1/text-to-image"),
        ("POST", "//v1//text-to-image", "/v1/text-to-image"),
        ("POST", "/v1/x/../text-to-image", "/v1/text-to-image"),
        ("POST", "/v1/x/%2e%2E/text-to-image", "/v1/text-to-image"),
        ("POST", "/v1/%74ext-to-image", "/v1/text-to-image"),
        ("POST", "/./v1/text-to-image/./", "/v1/text-to-image/"),
        ("POST", "/V1/TEXT-TO-IMAGE", "/V1/TEXT-TO-IMAGE"),
        ("POST", "/v1/text-to-image.json", "/v1/text-to-image.json"),
        (
            "POST",
            "/v1/text-to-image?n=1&q=%2F",
            "/v1/text-to-image?n=1&q=%2F",
        ),
        ("GET", "/v1/models/%7e%41/..//list", "/v1/models/list"),
        ("GET", "/v1/models/caf\u{e9}", "/v1/models/caf%C3%A9"),
        ("GET", "/v1/models/a\"b{c}", "/v1/models/a%22b%7Bc%7D"),
        ("GET", "/v1/models/%3f%23", "/v1/models/%3F%23"),
        ("GET", &format!("http://{own}/v1/./models"), "/v1/models"),
    ];
    for (i, (method, target, forwarded)) in cases.iter().enumerate() {
        let body = if *method == "POST" { PROMPT_BODY } else { "" };
        let outcome = raw::exchange(
            gw,
            &request(
                method,
                target,
                Some(&own),
                &[("Authorization", &generate)],
                body,
            ),
        )
        .await;
        assert_eq!(outcome.response().status, 200, "{target}");
        let received = upstream.received();
        assert_eq!(received.len(), i + 1, "{target}");
        assert_eq!(received[i].method, *method, "{target}");
        assert_eq!(received[i].path_and_query, *forwarded, "{target}");
    }
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

/// A route for every method under `/v1/` needing only `read`: without one canonical path
/// and case- and suffix-blind prefixes, a variant of the generate path would fall to it.
const BROAD_READ_ROUTE: &str = "[[routes]]\nmatch = \"* /v1/\"\nscope = \"read\"\n";

#[tokio::test]
async fn a_read_token_cannot_reach_generate_through_path_tricks() {
    path_tricks_never_reach_generate("").await;
}

#[tokio::test]
async fn a_read_token_cannot_reach_generate_through_path_tricks_with_a_broad_read_route() {
    path_tricks_never_reach_generate(BROAD_READ_ROUTE).await;
}

async fn path_tricks_never_reach_generate(extra_routes: &str) {
    let (upstream, gateway) = gateway_with_upstream(extra_routes).await;
    let gw = gateway.proxy_addr();
    let own = gw.to_string();
    let read = bearer(TOKEN_DESIGN_READ);
    let tricks = [
        "/v1/text-to-image",
        "/v1/./text-to-image",
        "//v1/text-to-image",
        "/v1//text-to-image",
        "/./v1/text-to-image",
        "/v1/x/../text-to-image",
        "/v1/x/%2e%2e/text-to-image",
        "/v1/%2e/text-to-image",
        "/v1/%74ext-to-image",
        "/v1/%74%65%78%74-to-image",
        "/V1/TEXT-TO-IMAGE",
        "/v1/Text-To-Image",
        "/v1/text-to-image/",
        "/v1/text-to-image/.",
        "/v1/text-to-image/..;/",
        "/v1/x/..;/text-to-image",
        "/v1/x/%2e%2e;/text-to-image",
        "/v1/x/..%3B/text-to-image",
        "/v1%2Ftext-to-image",
        "/v1%2ftext-to-image",
        "/v1/text-to-image%2F",
        "/v1%5Ctext-to-image",
        "/v1\\text-to-image",
        "/v1/text-to-image.",
        "/v1/text-to-image..",
        "/v1/text-to-image.json",
        "/v1/text-to-image;x=1",
        "/v1/text-to-image:batch",
        "/v1/text-to-image%20",
        "/v1/text-to-image%00",
        "/v1/text-to-image%09",
        "/v1/x/%252e%252e/text-to-image",
        "/v1/text-to-image?scope=read",
        "/v1/text-to-image#fragment",
        "/v1/text-to-image/../text-to-image",
        "/v1/models/../text-to-image",
        "/v1/models/%2e%2e/text-to-image",
        "/v1/models/..%2ftext-to-image",
        "/%2e%2e/v1/text-to-image",
        "/v1/..",
        &format!("http://{own}/v1/text-to-image"),
        &format!("http://{own}/v1/./text-to-image"),
    ];
    for target in tricks {
        let outcome = raw::exchange(
            gw,
            &request(
                "POST",
                target,
                Some(&own),
                &[("Authorization", &read)],
                PROMPT_BODY,
            ),
        )
        .await;
        let status = outcome.status();
        assert!(
            matches!(status, Some(400) | Some(403)),
            "{target}: {status:?}"
        );
        if status == Some(403) {
            assert_eq!(outcome.response().body_text(), FORBIDDEN_BODY, "{target}");
        }
    }
    assert_eq!(
        upstream.count(),
        0,
        "a read token reached the upstream: {:?}",
        paths(&upstream)
    );

    // A read request is allowed, but overrides that would turn it into a generate call on
    // the upstream never arrive there.
    let overrides = [
        ("X-HTTP-Method-Override", "POST"),
        ("X-HTTP-Method", "POST"),
        ("X-Method-Override", "POST"),
        ("X-Original-URL", "/v1/text-to-image"),
        ("X-Rewrite-URL", "/v1/text-to-image"),
    ];
    for (name, value) in overrides {
        let outcome = raw::exchange(
            gw,
            &request(
                "GET",
                "/v1/text-to-image",
                Some(&own),
                &[("Authorization", &read), (name, value)],
                "",
            ),
        )
        .await;
        assert_eq!(outcome.response().status, 200, "{name}");
    }
    for received in upstream.received() {
        assert_eq!(received.method, "GET");
        for (name, _) in overrides {
            assert!(!received.headers.contains_key(name), "{name} was forwarded");
        }
    }
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn the_client_cannot_choose_hop_by_hop_forwarding_or_keygate_headers() {
    let (upstream, gateway) = gateway_with_upstream("").await;
    let gw = gateway.proxy_addr();
    let own = gw.to_string();
    let generate = bearer(TOKEN_DESIGN_GENERATE);
    let headers = [
        ("Authorization", generate.as_str()),
        ("Connection", "keep-alive, X-Hop-Secret, x-other-hop"),
        ("X-Hop-Secret", "only for the next hop"),
        ("X-Other-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("X-Keygate-Team", "marketing"),
        ("X-Keygate-Key-Id", "admin"),
        ("X-Forwarded-For", "203.0.113.66"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "443"),
        ("X-Real-IP", "203.0.113.66"),
        ("True-Client-IP", "203.0.113.66"),
        ("Forwarded", "for=203.0.113.66;host=evil.example"),
        ("X-Client-Trace", "kept-as-is"),
        ("Content-Type", "application/json"),
    ];
    // Built by hand: `request()` would add `Connection: close`.
    let mut text = format!("POST /v1/text-to-image HTTP/1.1\r\nHost: {own}\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!(
        "Content-Length: {}\r\n\r\n{PROMPT_BODY}",
        PROMPT_BODY.len()
    ));
    let outcome = raw::exchange(gw, text.as_bytes()).await;
    assert_eq!(outcome.response().status, 200);

    let received = upstream.received();
    assert_eq!(received.len(), 1);
    let got = &received[0].headers;
    assert_eq!(got["authorization"], format!("Bearer {REAL_KEY}"));
    assert_eq!(got["host"], upstream.addr.to_string());
    assert_eq!(got["x-forwarded-for"], "127.0.0.1");
    assert_eq!(got["x-client-trace"], "kept-as-is");
    assert_eq!(got["content-type"], "application/json");
    assert!(got.contains_key("x-request-id"));
    assert_eq!(received[0].body, PROMPT_BODY.as_bytes());
    for gone in [
        "x-hop-secret",
        "x-other-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "x-keygate-team",
        "x-keygate-key-id",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
        "true-client-ip",
        "forwarded",
    ] {
        assert!(!got.contains_key(gone), "{gone} reached the upstream");
    }
    assert_eq!(got.get_all("authorization").iter().count(), 1);
    gateway.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}

#[tokio::test]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let with_log = |name: &str| {
        let path = dir.path().join(name);
        let extra = format!("[usage_log]\npath = {:?}\n", path.display().to_string());
        (
            config_from(&standard_config_text(&upstream.url(), &extra)),
            UsageFile::new(&path),
        )
    };
    let (mut config, trusting_log) = with_log("trusting.log");
    // The test client connects from 127.0.0.1: that is the trusted proxy here.
    config.server.trusted_proxies = vec![
        "127.0.0.1/32".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    let trusting = TestGateway::start(config).await;
    let (config, untrusting_log) = with_log("untrusting.log");
    let untrusting = TestGateway::start(config).await;
    let generate = bearer(TOKEN_DESIGN_GENERATE);

    // (gateway, its usage log, claimed headers, X-Forwarded-For sent on, client address)
    let cases = [
        (
            &trusting,
            &trusting_log,
            ("X-Forwarded-For", "203.0.113.5, 198.51.100.7, 10.1.2.3"),
            "203.0.113.5, 198.51.100.7, 10.1.2.3, 127.0.0.1",
            "198.51.100.7",
        ),
        (
            &trusting,
            &trusting_log,
            (
                "Forwarded",
                "for=198.51.100.7;proto=https, for=\"[2001:db8::1]:4711\"",
            ),
            "198.51.100.7, 2001:db8::1, 127.0.0.1",
            "2001:db8::1",
        ),
        (
            &trusting,
            &trusting_log,
            ("X-Forwarded-For", "203.0.113.5, not-an-address, 10.1.2.3"),
            "203.0.113.5, unknown, 10.1.2.3, 127.0.0.1",
            "10.1.2.3",
        ),
        (
            &untrusting,
            &untrusting_log,
            ("X-Forwarded-For", "203.0.113.5, 198.51.100.7"),
            "127.0.0.1",
            "127.0.0.1",
        ),
        (
            &untrusting,
            &untrusting_log,
            ("Forwarded", "for=198.51.100.7"),
            "127.0.0.1",
            "127.0.0.1",
        ),
    ];
    for (gateway, log, claim, forwarded_for, client_ip) in cases {
        let gw = gateway.proxy_addr();
        let outcome = raw::exchange(
            gw,
            &request(
                "POST",
                "/v1/text-to-image",
                Some(&gw.to_string()),
                &[("Authorization", &generate), claim],
                PROMPT_BODY,
            ),
        )
        .await;
        let response = outcome.response();
        assert_eq!(response.status, 200);
        let last = upstream.received().pop().unwrap();
        assert_eq!(last.headers["x-forwarded-for"], forwarded_for, "{claim:?}");
        assert!(!last.headers.contains_key("forwarded"));
        let line = log.wait_for(response.header("x-request-id").unwrap()).await;
        assert_eq!(line["client_ip"], client_ip, "{claim:?}");
    }

    trusting.shutdown().await;
    untrusting.shutdown().await;
    logs::assert_clean(ALL_SECRETS);
}
