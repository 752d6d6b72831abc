//! Owns the upstream side: the request to the pinned origin over [`UpstreamPool`], the
//! rewrite of a client request into an upstream request (origin pinned, token swapped for
//! the real key, hop-by-hop headers dropped), and the classification of upstream failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::body::UpstreamBody;
use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::upstream_h2::{Http2Pool, Resends};
use crate::upstream_pool::{OpenConnections, PoolError, PooledBody, UpstreamPool};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// How many times keygate sent the request upstream again (absent when it did not).
pub const X_KEYGATE_RETRIES: HeaderName = HeaderName::from_static("x-keygate-retries");

/// Whether a header stays on this side of keygate. Hop-by-hop headers (RFC 9110 §7.6.1),
/// plus the ones a client could use to talk to a proxy along the way, never cross in
/// either direction; `Expect` is answered by keygate on the client's hop (hyper sends the
/// 100 Continue). With `client_controlled`, a request also loses what the client must not
/// choose for the upstream: its credentials and Host, claims about who the client is or
/// which host and scheme it used (keygate rebuilds `X-Forwarded-For` itself), the
/// overrides frameworks honour for the method or the path (which would let a request be
/// checked as one route and served as another), and keygate's own `X-Keygate-*` namespace.
///
/// A `match` on the name: comparing every header against 32 `HeaderName`s one by one was
/// ~1 300 instructions a request (callgrind, PERFORMANCE.md).
fn stays_behind(name: &str, client_controlled: bool) -> bool {
    match name {
        "connection"
        | "keep-alive"
        | "proxy-connection"
        | "proxy-authenticate"
        | "proxy-authorization"
        | "te"
        | "trailer"
        | "transfer-encoding"
        | "upgrade"
        | "expect" => true,
        "authorization"
        | "host"
        | "forwarded"
        | "x-forwarded-for"
        | "x-forwarded-host"
        | "x-forwarded-proto"
        | "x-forwarded-port"
        | "x-forwarded-prefix"
        | "x-forwarded-server"
        | "x-forwarded-ssl"
        | "x-real-ip"
        | "x-client-ip"
        | "true-client-ip"
        | "x-cluster-client-ip"
        | "x-original-host"
        | "x-host"
        | "x-original-url"
        | "x-rewrite-url"
        | "x-original-uri"
        | "x-http-method-override"
        | "x-http-method"
        | "x-method-override" => client_controlled,
        _ => client_controlled && name.starts_with("x-keygate-"),
    }
}

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, false);
}

/// One pass over the names a message has (a handful) instead of a removal per name that
/// could be there (32): every removal hashes its name.
fn strip(headers: &mut HeaderMap, client_controlled: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    let mut has_connection = false;
    for name in headers.keys() {
        if stays_behind(name.as_str(), client_controlled) {
            has_connection |= name == header::CONNECTION;
            doomed.push(name.clone());
        }
    }
    if has_connection {
        // The options `Connection` lists name headers of this hop only (RFC 9110 §7.6.1).
        // Matched against the names present: parsing each option into a `HeaderName`
        // (`keep-alive` on nearly every answer) cost more than the rest of the pass.
        let options: Vec<&[u8]> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        for name in headers.keys() {
            let named = options
                .iter()
                .any(|option| option.eq_ignore_ascii_case(name.as_str().as_bytes()));
            if named && !doomed.contains(name) {
                doomed.push(name.clone());
            }
        }
    }
    for name in &doomed {
        headers.remove(name);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("client request body: {0}")]
    ClientBody(crate::body::InboundFailure),
    #[error("{0}")]
    Failed(String),
}

/// The upstream: its pinned origin and the connections to it.
#[derive(Clone)]
pub struct Upstream {
    pool: Connections,
    /// `Host` of every upstream request: the origin's authority.
    host: HeaderValue,
    timeout: Duration,
}

impl Upstream {
    /// `open` counts the connections to it (`keygate_upstream_connections`), `resends` the
    /// requests its HTTP/2 connections sent again (`keygate_upstream_resends_total`).
    pub fn new(
        config: &UpstreamConfig,
        open: OpenConnections,
        resends: Resends,
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca_file) = &config.ca_file {
            let pem = std::fs::read(ca_file)
                .map_err(|e| format!("upstream.ca_file {}: {e}", ca_file.display()))?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| format!("upstream.ca_file {}: {e}", ca_file.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("upstream.ca_file {}: {e}", ca_file.display()))?;
                added += 1;
            }
            if added == 0 {
                return Err(format!(
                    "upstream.ca_file {} holds no certificate",
                    ca_file.display()
                ));
            }
        }
        let connector = https_connector(roots, config.connect_timeout, config.protocol)?;
        let scheme = config.url.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = config
            .url
            .authority()
            .cloned()
            .ok_or_else(|| "upstream.url has no host".to_string())?;
        let host = host_header(&scheme, &authority)?;
        let origin = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        let pool = match config.protocol {
            UpstreamProtocol::Http1 => {
                Connections::Http1(UpstreamPool::new(connector, origin, open))
            }
            // A new connection's settings are part of connecting: the same bound.
            UpstreamProtocol::Http2 => Connections::Http2(Http2Pool::new(
                connector,
                &origin,
                config.connect_timeout,
                open,
                resends,
            )?),
        };
        Ok(Self {
            pool,
            host,
            timeout: config.timeout,
        })
    }

    /// The upstream request target for a canonical path and the client's query, in origin
    /// form (the connection and `Host` pin the origin).
    pub fn uri(&self, canonical_path: &str, query: Option<&str>) -> Result<Uri, String> {
        let path_and_query = match query {
            Some(q) => PathAndQuery::try_from(format!("{canonical_path}?{q}")),
            None => PathAndQuery::try_from(canonical_path),
        }
        .map_err(|e| e.to_string())?;
        Ok(Uri::from(path_and_query))
    }

    /// Whether a request refused before it reached the upstream's application (an HTTP/2
    /// stream refused, or racing a GOAWAY) is sent again by the connections themselves,
    /// retries or not, provided its body is held.
    pub fn resends_refused_requests(&self) -> bool {
        matches!(self.pool, Connections::Http2(_))
    }

    /// Sends a prepared request; the timeout covers connecting and the response head.
    /// While the upstream waits on a slow client upload, the clock restarts: the body's own
    /// stall timer governs then, and its failure is reported as the client's.
    /// Returns the response and how long the upstream took to answer.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        client_body: &crate::body::InboundProgress,
    ) -> Result<(Response<PooledBody>, Duration), ForwardError> {
        // The upstream's version, not the client's: an inbound HTTP/2 version would be
        // refused on an HTTP/1.1 connection (the HTTP/2 pool sets its own).
        *request.version_mut() = Version::HTTP_11;
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        let started = Instant::now();
        let answer = async {
            match &self.pool {
                Connections::Http1(pool) => pool.send(request).await,
                // Boxed: an HTTP/1.1 request's future does not carry the HTTP/2 one's state.
                Connections::Http2(pool) => Box::pin(pool.send(request)).await,
            }
        };
        tokio::pin!(answer);
        let mut deadline = tokio::time::Instant::from_std(started) + self.timeout;
        let answered = loop {
            tokio::select! {
                answered = &mut answer => break answered,
                _ = tokio::time::sleep_until(deadline) => {
                    if client_body.waiting_on_client() {
                        deadline = tokio::time::Instant::now() + self.timeout;
                        continue;
                    }
                    return Err(ForwardError::Timeout(self.timeout));
                }
            }
        };
        match answered {
            Ok(response) => Ok((response, started.elapsed())),
            Err(PoolError::Connect(cause)) => Err(ForwardError::Connect(cause)),
            Err(PoolError::Request(e)) => match client_body.failure() {
                Some(failure) => Err(ForwardError::ClientBody(failure)),
                None => Err(ForwardError::Failed(error_chain(e.as_ref()))),
            },
        }
    }
}

/// The connections to the upstream, by `upstream.protocol`.
#[derive(Clone)]
enum Connections {
    Http1(UpstreamPool),
    Http2(Http2Pool),
}

/// The `Host` of upstream requests: the authority without user info, and without the
/// port when it is the scheme's default (as clients write it; some front ends match on it).
fn host_header(scheme: &Scheme, authority: &http::uri::Authority) -> Result<HeaderValue, String> {
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => 0,
    };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_string(),
    };
    HeaderValue::from_str(&host).map_err(|e| e.to_string())
}

/// An HTTP and HTTPS (rustls with ring) connector trusting `roots`, with a bound on TCP
/// connect, offering by ALPN only the one `protocol` keygate speaks to the upstream: an
/// upstream that offers h2 gets HTTP/1.1 unless `upstream.protocol = "http2"`, and then
/// must take h2. (hyper-util's pool would keep one HTTP/2 connection per origin, and
/// requests over the upstream's stream limit would wait inside keygate for a stream;
/// `upstream_h2` opens more connections instead:
/// `requests_over_an_http2_upstreams_stream_limit_are_not_held_back`.)
pub fn https_connector(
    roots: rustls::RootCertStore,
    connect_timeout: Duration,
    protocol: UpstreamProtocol,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    Ok(match protocol {
        UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
        UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
    })
}

/// Builds the upstream request's headers from the client's: everything the client must
/// not control out (its token included), forwarding headers rebuilt. Each upstream try
/// adds the real key it goes out with.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    forwarded_for: HeaderValue,
    request_id: &HeaderValue,
) {
    strip(headers, true);
    headers.insert(crate::client_addr::X_FORWARDED_FOR, forwarded_for);
    headers.insert(X_REQUEST_ID, request_id.clone());
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_leaves_out_a_default_port() {
        let host = |url: &str| {
            let uri: Uri = url.parse().unwrap();
            host_header(uri.scheme().unwrap(), uri.authority().unwrap()).unwrap()
        };
        assert_eq!(host("https://api.example.com"), "api.example.com");
        assert_eq!(host("https://api.example.com:443"), "api.example.com");
        assert_eq!(host("https://api.example.com:8443"), "api.example.com:8443");
        assert_eq!(host("http://127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host("http://127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(host("http://[::1]:8080"), "[::1]:8080");
        assert_eq!(host("https://user:pw@api.example.com"), "api.example.com");
    }

    #[test]
    fn rewrite_drops_what_the_client_must_not_control() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer kg_internal_token"),
            ("host", "evil.example"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("proxy-authorization", "Basic x"),
            ("x-keygate-team", "admin"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-original-url", "/v1/text-to-image"),
            ("x-http-method-override", "POST"),
            ("expect", "100-continue"),
            ("content-type", "application/json"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        rewrite_request_headers(
            &mut headers,
            HeaderValue::from_static("127.0.0.1"),
            &HeaderValue::from_static("req-1"),
        );
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(headers["x-request-id"], "req-1");
        assert_eq!(headers["content-type"], "application/json");
        for gone in [
            "authorization",
            "host",
            "connection",
            "x-secret-hop",
            "proxy-authorization",
            "x-keygate-team",
            "x-original-url",
            "x-http-method-override",
            "expect",
        ] {
            assert!(!headers.contains_key(gone), "{gone} was forwarded");
        }
    }

    const HOP_BY_HOP: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    ];
    const CLIENT_CONTROLLED: [&str; 23] = [
        "authorization",
        "host",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "x-original-host",
        "x-host",
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-keygate-anything",
    ];

    fn every_listed_header() -> HeaderMap {
        let mut headers = HeaderMap::new();
        for name in HOP_BY_HOP.iter().chain(&CLIENT_CONTROLLED) {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static("x"));
        }
        headers.append(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        headers
    }

    #[test]
    fn a_request_loses_every_listed_header_and_keeps_the_rest() {
        let mut headers = every_listed_header();
        rewrite_request_headers(
            &mut headers,
            HeaderValue::from_static("10.0.0.1"),
            &HeaderValue::from_static("req-2"),
        );
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type", "x-forwarded-for", "x-request-id"]);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1");
    }

    #[test]
    fn an_answer_loses_only_hop_by_hop_headers() {
        let mut headers = every_listed_header();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close,  X-Hop "),
        );
        headers.insert("x-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        let mut expected: Vec<&str> = CLIENT_CONTROLLED.into_iter().collect();
        expected.push("content-type");
        expected.sort_unstable();
        assert_eq!(left, expected);
    }
}
