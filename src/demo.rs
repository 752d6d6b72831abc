//! Owns `keygate demo`: the gateway, an in-process stand-in for the image API and the
//! memory store in one command, offline, with ready-to-paste curl lines that show a 200,
//! a 403 and a 429.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::{Config, KeySource};
use crate::secret::Secret;
use crate::server::{self, StartOptions};
use crate::token::new_token;

/// The demo team's plan: small enough that a newcomer reaches the 429 by hand.
const DEMO_RPM: u64 = 5;

/// Starts an in-process stand-in for the image API that accepts only `real_key`.
pub async fn start_stand_in_upstream(real_key: Secret) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let expected = format!("Bearer {}", real_key.expose());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let expected = expected.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| stand_in(expected.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn stand_in(
    expected_authorization: String,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorized = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected_authorization.as_bytes());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, text) = if !authorized {
        (
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"code":"unauthorized","message":"Invalid API key"}}"#.to_string(),
        )
    } else if method == Method::POST && path == "/v1/text-to-image" {
        let prompt = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("prompt").and_then(|p| p.as_str()).map(str::to_string))
            .unwrap_or_default();
        let created = jiff::Timestamp::now().as_second();
        (
            StatusCode::OK,
            serde_json::json!({
                "id": format!("img_demo_{created}"),
                "created": created,
                "model": "imagen-v2",
                "prompt": prompt,
                "data": [{ "url": format!("https://cdn.example/img_demo_{created}.png") }],
            })
            .to_string(),
        )
    } else if method == Method::GET && path == "/v1/models" {
        (
            StatusCode::OK,
            r#"{"data":[{"id":"imagen-v2"},{"id":"imagen-v1"}]}"#.to_string(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"not_found","message":"Not found"}}"#.to_string(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// The demo's config: one team on a tiny plan, a generate token and a read-only token.
pub fn demo_config(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    upstream: SocketAddr,
    generate_token: &str,
    read_token: &str,
    real_key: Secret,
) -> Result<Config, String> {
    let text = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin_listen}"

[upstream]
url = "http://{upstream}"
timeout = "30s"
[upstream.keys.prod]
env = "KEYGATE_DEMO_UPSTREAM_KEY"

[plans]
demo = {{ rpm = {DEMO_RPM}, rpd = 100 }}

[[teams]]
name = "demo"
plan = "demo"

[[keys]]
id = "demo-generate"
team = "demo"
token_sha256 = "{generate}"
scopes = ["generate", "read"]
env = "prod"

[[keys]]
id = "demo-read"
team = "demo"
token_sha256 = "{read}"
scopes = ["read"]
env = "prod"

[[routes]]
match = "POST /v1/text-to-image"
scope = "generate"

[[routes]]
match = "GET /v1/"
scope = "read"
"#,
        generate = crate::auth::sha256_hex(generate_token.as_bytes()),
        read = crate::auth::sha256_hex(read_token.as_bytes()),
    );
    let mut config = Config::from_toml(&text).map_err(|e| e.to_string())?;
    // The demo's real key exists only in this process; no env var or file is involved.
    config
        .upstream
        .keys
        .insert("prod".to_string(), KeySource::Inline(vec![real_key]));
    Ok(config)
}

pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> Result<(), String> {
    let real_key = Secret::new(new_token("upstream")?.replace("kg_", "sk-demo-"));
    let upstream = start_stand_in_upstream(real_key.clone())
        .await
        .map_err(|e| format!("stand-in upstream: {e}"))?;
    let generate_token = new_token("prod")?;
    let read_token = new_token("prod")?;
    let config = demo_config(
        listen,
        admin_listen,
        upstream,
        &generate_token,
        &read_token,
        real_key,
    )?;
    let running = server::start(config, StartOptions::default())
        .await
        .map_err(|e| format!("{e} (try --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0)"))?;
    let url = format!("http://{}/v1/text-to-image", running.proxy_addr);
    let body = r#"{"prompt":"A beautiful sunset over mountains","model":"imagen-v2"}"#;
    println!(
        r#"
keygate demo is running: gateway on http://{proxy}, admin on http://{admin},
a stand-in image API behind it, quotas in memory. Team "demo" may send {DEMO_RPM} requests a minute.

  GENERATE_TOKEN={generate_token}
  READ_TOKEN={read_token}

# 200: the gateway swaps the team token for the real key (which you never see)
curl -i -X POST {url} -H "Authorization: Bearer $GENERATE_TOKEN" -H 'Content-Type: application/json' -d '{body}'

# 403: a read-only token cannot generate
curl -i -X POST {url} -H "Authorization: Bearer $READ_TOKEN" -H 'Content-Type: application/json' -d '{body}'

# 429: the team's quota is {DEMO_RPM} a minute; watch X-RateLimit-Remaining fall, then Retry-After
for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\n' -X POST {url} -H "Authorization: Bearer $GENERATE_TOKEN" -d '{body}'; done

# 401: an unknown token
curl -i -X POST {url} -H 'Authorization: Bearer kg_prod_not_a_real_token'

# health
curl -i http://{admin}/readyz

Ctrl-C stops the demo."#,
        proxy = running.proxy_addr,
        admin = running.admin_addr,
    );
    server::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}
