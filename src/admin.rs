//! Owns the admin listener's routes: `/healthz` (alive) and `/readyz` (config loaded,
//! store reachable or degraded, an upstream key readable for every env).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::ResponseBody;
use crate::config::OnStoreError;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::pipeline::json_response;

pub async fn handle(gateway: Arc<Gateway>, request: Request<Incoming>) -> Response<ResponseBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            json_response(StatusCode::OK, r#"{"status":"ok"}"#)
        }
        (&Method::GET | &Method::HEAD, "/readyz") => readiness(&gateway),
        (_, "/healthz" | "/readyz") => error(GatewayError::MethodNotAllowed),
        _ => error(GatewayError::NotFound),
    }
}

fn readiness(gateway: &Gateway) -> Response<ResponseBody> {
    let key_problems = gateway.upstream_keys.problems();
    let health = &gateway.store_health;
    let degraded = health.is_degraded();
    // Degraded `local` and `open` still serve (within their rules); `closed` refuses all.
    let store_serves = !degraded || health.mode() != OnStoreError::Closed;
    let ready = key_problems.is_empty() && store_serves;
    let status = match (ready, degraded) {
        (false, _) => "not_ready",
        (true, true) => "degraded",
        (true, false) => "ready",
    };
    let mut store = json!({
        "kind": health.kind(),
        "state": if degraded { "degraded" } else { "ok" },
        "on_error": health.mode().as_str(),
        "errors": health.error_count(),
    });
    if degraded {
        store["since"] = json!(health.degraded_since().map(|t| t.to_string()));
        store["down_for_ms"] = json!(health.down_for().map(|d| d.as_millis() as u64));
        store["last_error"] = json!(health.last_error());
        store["detail"] = json!(match health.mode() {
            OnStoreError::Local => "store unreachable: each replica enforces limit / store.expected_replicas from memory",
            OnStoreError::Open => "store unreachable: requests are admitted without quota",
            OnStoreError::Closed => "store unreachable: requests are refused with 503",
        });
    }
    let body = json!({
        "status": status,
        "store": store,
        "upstream_keys": key_problems
            .iter()
            .map(|(env, problem)| json!({ "env": env, "problem": problem }))
            .collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, body.to_string())
}

fn error(error: GatewayError) -> Response<ResponseBody> {
    json_response(error.status(), error.body_bytes())
}
