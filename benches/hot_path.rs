//! The per-request steps before and around the upstream call, each on its own: token lookup
//! (with 10 and with 100 000 keys: the cost must not depend on the count), route match,
//! the upstream header rewrite and building an error body. The quota decision has its own
//! bench (quota_decision.rs), the finish step too (finish.rs).

use std::hint::black_box;
use std::time::Duration;

mod support;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use http::Method;

use keygate::auth::{self, KeyRegistry};
use keygate::error::{AuthFailure, GatewayError, RateLimitSubject};
use keygate::quota::Limits;
use keygate::routing::{self, Route, RouteTable};
use keygate::scope::{Scope, Scopes};

/// Tokens the load is spread over: the same few in both registries, so the comparison is
/// the map's size and nothing else.
const HOT_TOKENS: usize = 10;

fn token(i: usize) -> String {
    format!("kg_bench_{i:08}_secret_token_padding")
}

fn registry(keys: usize) -> KeyRegistry {
    let mut registry = KeyRegistry::default();
    let mut scopes = Scopes::default();
    scopes.insert(Scope::Generate);
    for i in 0..keys {
        let key = support::team_key(
            i,
            100,
            scopes,
            Limits {
                rpm: 100,
                rpd: 10_000,
            },
        );
        registry.insert(auth::sha256(token(i).as_bytes()), key);
    }
    registry
}

fn bearer_headers(i: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", token(i))).unwrap(),
    );
    headers
}

fn token_lookup(c: &mut Criterion) {
    let now = jiff::Timestamp::now();
    let mut group = c.benchmark_group("token_lookup");
    for keys in [10, 100_000] {
        let registry = registry(keys);
        // Spread over the hot tokens, plus one for a key among the last inserted.
        let requests: Vec<HeaderMap> = (0..HOT_TOKENS)
            .map(|i| bearer_headers(i * keys / HOT_TOKENS))
            .collect();
        let mut i = 0usize;
        group.bench_function(format!("{keys}_keys"), |b| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                black_box(auth::authenticate(&registry, black_box(&requests[i]), now).unwrap())
            })
        });
        if keys == 100_000 {
            // Every lookup a different key: the map no longer fits the caches.
            let spread: Vec<HeaderMap> = (0..1024).map(|i| bearer_headers(i * 97)).collect();
            let mut i = 0usize;
            group.bench_function("100000_keys_spread", |b| {
                b.iter(|| {
                    i = (i + 1) % spread.len();
                    black_box(auth::authenticate(&registry, black_box(&spread[i]), now).unwrap())
                })
            });
        }
    }
    let registry = registry(10);
    let unknown = bearer_headers(1_000_000);
    group.bench_function("unknown_token", |b| {
        b.iter(|| black_box(auth::authenticate(&registry, black_box(&unknown), now).is_err()))
    });
    group.finish();
}

fn route(prefix: &str, method: Option<Method>, scope: Scope) -> Route {
    let label = format!("{} {prefix}", method.as_ref().map_or("*", |m| m.as_str()));
    Route {
        method,
        prefix: prefix.to_string(),
        scope,
        label: label.into(),
    }
}

fn route_match(c: &mut Criterion) {
    let table = RouteTable::new(vec![
        route("/v1/text-to-image", Some(Method::POST), Scope::Generate),
        route("/v1/image-to-image", Some(Method::POST), Scope::Generate),
        route("/v1/upscale", Some(Method::POST), Scope::Generate),
        route("/v1/images", Some(Method::GET), Scope::Read),
        route("/v1/", Some(Method::GET), Scope::Read),
        route("/admin/", None, Scope::Admin),
    ]);
    let mut group = c.benchmark_group("route_match");
    group.bench_function("canonical_path_and_find", |b| {
        b.iter(|| {
            let path = routing::canonical_path(black_box("/v1/text-to-image")).unwrap();
            black_box(table.find(&Method::POST, &path).map(|r| r.scope))
        })
    });
    group.bench_function("non_canonical_path_and_find", |b| {
        b.iter(|| {
            let path = routing::canonical_path(black_box("/v1/./%74ext-to-image")).unwrap();
            black_box(table.find(&Method::POST, &path).map(|r| r.scope))
        })
    });
    group.bench_function("no_route", |b| {
        b.iter(|| {
            black_box(
                table
                    .find(&Method::DELETE, black_box("/v2/unknown"))
                    .is_none(),
            )
        })
    });
    group.finish();
}

/// A client request head as an SDK sends it, with a hop-by-hop header to drop.
fn client_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "keygate.internal:8080"),
        ("user-agent", "python-requests/2.32.3"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, deflate"),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
        ("content-length", "66"),
        ("authorization", "Bearer kg_team_alpha_secret_token_0001"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

fn header_rewrite(c: &mut Criterion) {
    let request_id = HeaderValue::from_static("0123456789abcdef-42");
    let peer: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let template = client_headers();
    let mut group = c.benchmark_group("header_rewrite");
    group.bench_function("rewrite_request_headers", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |headers| {
                let forwarded_for = keygate::client_addr::forwarded_for(peer, headers, &[]);
                keygate::forward::rewrite_request_headers(headers, forwarded_for, &request_id);
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn error_body(c: &mut Criterion) {
    let mut group = c.benchmark_group("error_body");
    let unauthorized = GatewayError::Unauthorized(AuthFailure::Unknown);
    group.bench_function("unauthorized", |b| {
        b.iter(|| black_box(black_box(&unauthorized).body_bytes()))
    });
    let limited = GatewayError::RateLimited {
        subject: RateLimitSubject::Team,
        report: None,
        retry_after_secs: 12,
    };
    group.bench_function("rate_limited", |b| {
        b.iter(|| black_box(black_box(&limited).body_bytes()))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = token_lookup, route_match, header_rewrite, error_body
}
criterion_main!(benches);
