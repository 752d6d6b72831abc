//! Owns what the finish step does with a completed request context: for now one structured
//! access event per request on the `keygate::access` log target.

use crate::context::RequestContext;

#[derive(Default)]
pub struct Observer {}

impl Observer {
    pub fn record(&self, ctx: &RequestContext) {
        tracing::debug!(
            target: "keygate::access",
            request_id = ctx.request_id_str(),
            team = ctx.team().unwrap_or("-"),
            key_id = ctx.key_id().unwrap_or("-"),
            method = %ctx.method,
            path = %ctx.path,
            status = ctx.status,
            upstream_status = ctx.upstream_status,
            outcome = ctx.outcome.as_str(),
            latency_ms = ctx.latency().as_secs_f64() * 1000.0,
            bytes_in = ctx.bytes_in(),
            bytes_out = ctx.bytes_out,
            cause = ctx.cause.as_deref(),
        );
    }
}
