//! Owns the admin listener's routes: `/healthz` (alive), `/readyz` (config loaded,
//! store reachable or degraded, an upstream key readable for every env, the upstream
//! circuit's state, whether admin-made keys are current) and `/metrics`
//! (Prometheus text).

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
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(&gateway).await,
        (_, "/healthz" | "/readyz" | "/metrics") => error(GatewayError::MethodNotAllowed),
        (&Method::GET | &Method::HEAD, path) if path.starts_with("/dashboard") => {
            crate::dashboard::asset(path).unwrap_or_else(|| error(GatewayError::NotFound))
        }
        (_, path) if path.starts_with("/admin/") => {
            crate::admin_api::handle(gateway, request).await
        }
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
    // An open circuit does not make a replica unready: the upstream is down for every
    // replica alike, and a load balancer with no ready replica has nowhere better to send.
    let circuit = &gateway.circuit;
    let mut upstream_circuit = json!({ "state": circuit.state().as_str() });
    if let Some(open_for) = circuit.open_for() {
        upstream_circuit["open_for_ms"] = json!(open_for.as_millis() as u64);
    }
    // Stale admin keys do not make a replica unready: it serves the last keys it read,
    // which is what every replica does while the store is away.
    let mut admin_keys = json!({ "store": gateway.key_store.kind(), "state": "current" });
    if let Some((since, error)) = gateway.key_sync.stale() {
        admin_keys["state"] = json!("stale");
        admin_keys["since"] = json!(since.to_string());
        admin_keys["last_error"] = json!(error);
    }
    let body = json!({
        "status": status,
        "store": store,
        "admin_keys": admin_keys,
        "upstream_circuit": upstream_circuit,
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

/// The Prometheus text content type (exposition format 0.0.4).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(gateway: &Gateway) -> Response<ResponseBody> {
    refresh_quota_gauges(gateway).await;
    let body = gateway
        .observer
        .render_metrics(gateway.store.slice_counters());
    let mut response = Response::new(ResponseBody::full(body.into()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    response
}

/// Reads each team's usage from the store, so the quota gauges show the window now and not
/// as the last request left it (a minute window empties without traffic). On a slow or
/// failing store the gauges keep their last values.
async fn refresh_quota_gauges(gateway: &Gateway) {
    let teams = gateway.team_subjects();
    let read = gateway.store.usage(&teams);
    let Ok(Ok(usage)) = tokio::time::timeout(gateway.edge.store_timeout * 4, read).await else {
        return;
    };
    for (team, usage) in teams.iter().zip(usage) {
        gateway.observer.metrics.set_quota(
            &team.id,
            (usage.minute.used, usage.minute.limit),
            (usage.day.used, usage.day.limit),
        );
    }
}

fn error(error: GatewayError) -> Response<ResponseBody> {
    json_response(error.status(), error.body_bytes())
}
