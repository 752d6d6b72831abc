//! Owns the admin listener's routes: `/healthz` (alive) and `/readyz` (config loaded,
//! store reachable or degraded, an upstream key readable for every env).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::ResponseBody;
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
        (_, path) if path.starts_with("/admin/") => {
            crate::admin_api::handle(gateway, request).await
        }
        _ => error(GatewayError::NotFound),
    }
}

fn readiness(gateway: &Gateway) -> Response<ResponseBody> {
    let key_problems = gateway.upstream_keys.problems();
    let ready = key_problems.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "store": { "kind": gateway.store.kind(), "state": "ok" },
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
