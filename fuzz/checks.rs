//! The properties the fuzz targets check, one function per target. Shared by the cargo-fuzz
//! targets (fuzz_targets/*.rs) and by tests/fuzz_corpus.rs, which runs them over the
//! committed corpus and a bounded number of mutations in every `cargo test`.
//!
//! Each function must never panic except through a failed property.

use std::sync::{Arc, OnceLock};

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use http::Method;
use keygate::auth::{bearer_token as extract, MAX_AUTHORIZATION_BYTES};
use keygate::config::Config;
use keygate::forward::Upstream;
use keygate::routing::{canonical_path, parse_route_match, Route, RouteTable};
use keygate::scope::Scope;

/// `bearer_token` never panics, accepts only `Bearer <b64token>` within the length limit,
/// returns exactly the token between the scheme and optional spaces, and refuses a second
/// Authorization header whatever it holds.
pub fn bearer_token(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value.clone());
    if let Ok(token) = extract(&headers) {
        assert!(data.len() <= MAX_AUTHORIZATION_BYTES);
        assert!(data[..7].eq_ignore_ascii_case(b"Bearer "));
        let body = token.trim_end_matches('=');
        assert!(!body.is_empty(), "a token of padding only");
        assert!(
            body.bytes().all(|b| b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')),
            "a token outside b64token: {token:?}"
        );
        let rest = std::str::from_utf8(&data[7..]).expect("an accepted value is ASCII");
        assert_eq!(rest.trim_matches(' '), token);
    }
    headers.append(AUTHORIZATION, value);
    assert!(
        extract(&headers).is_err(),
        "two Authorization headers were accepted"
    );
}

/// `canonical_path`: the result is absolute, has no empty or dot segment, no backslash, no
/// encoded `/` or `\`, only `pchar`, `/` and upper-case escapes of characters that need
/// them; it is its own canonical form; extra `/`, `/.` or `x/..` segments do not change it;
/// it reaches the upstream URI unchanged; and its route does not depend on ASCII case.
pub fn path_and_route(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(canonical) = canonical_path(raw) else {
        return;
    };
    let path: &str = &canonical;
    assert_canonical_shape(path);
    assert_eq!(canonical_path(path).as_deref(), Ok(path), "not idempotent");

    // The same path written differently canonicalises the same.
    let mut variants = vec![format!("/{path}"), format!("/.{path}")];
    if let Some(rest) = path.strip_prefix('/') {
        variants.push(format!("/x/../{rest}"));
        variants.push(format!("/%2e/{rest}"));
    }
    for variant in &variants {
        assert_eq!(
            canonical_path(variant).as_deref(),
            Ok(path),
            "{variant:?} differs from {raw:?}"
        );
    }

    // What is checked is what is forwarded.
    let uri = upstream()
        .uri(path, None)
        .expect("a canonical path is a valid URI path");
    assert_eq!(uri.path(), path);

    let table = routes();
    for method in [Method::GET, Method::POST, Method::DELETE] {
        let route = |p: &str| table.find(&method, p).map(|r| r.label.clone());
        let found = route(path);
        assert_eq!(
            route(&path.to_ascii_uppercase()),
            found,
            "case changed the route"
        );
        assert_eq!(
            route(&path.to_ascii_lowercase()),
            found,
            "case changed the route"
        );
        if method == Method::POST && path.to_ascii_lowercase().starts_with("/v1/text-to-image/") {
            assert_eq!(found.as_deref(), Some("POST /v1/text-to-image"));
        }
    }
}

fn assert_canonical_shape(path: &str) {
    assert!(path.starts_with('/'), "{path:?}");
    for bad in ["//", "/./", "/../", "\\"] {
        assert!(!path.contains(bad), "{path:?} holds {bad:?}");
    }
    assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{path:?}");
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = &path[i + 1..i + 3];
            assert!(
                hex.bytes()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h)),
                "{path:?}: escape %{hex} not upper-case hex"
            );
            let value = u8::from_str_radix(hex, 16).unwrap();
            assert!(
                !(value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~')),
                "{path:?}: unreserved character left encoded"
            );
            assert!(
                !matches!(value, b'/' | b'\\') && value >= 0x20 && value != 0x7f,
                "{path:?}"
            );
            i += 3;
        } else {
            assert!(
                b == b'/' || b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b),
                "{path:?}: raw byte {b:#04x}"
            );
            i += 1;
        }
    }
}

/// `Config::from_toml` never panics, and a config it accepts builds a gateway snapshot.
pub fn config_from_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        let snapshot = keygate::gateway::Snapshot::build(Arc::new(config), &[], None);
        for label in snapshot.routes.labels() {
            let (_, prefix) = parse_route_match(label).expect("an accepted route re-parses");
            assert_eq!(canonical_path(&prefix).as_deref(), Ok(prefix.as_str()));
        }
    }
}

fn routes() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let route = |text: &str, scope| {
            let (method, prefix) = parse_route_match(text).unwrap();
            Route {
                method,
                prefix,
                scope,
                label: text.into(),
            }
        };
        RouteTable::new(vec![
            route("POST /v1/text-to-image", Scope::Generate),
            route("GET /v1/", Scope::Read),
            route("* /v1/", Scope::Read),
            route("* /admin", Scope::Admin),
        ])
    })
}

fn upstream() -> &'static Upstream {
    static UPSTREAM: OnceLock<Upstream> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        let config = Config::from_toml(
            "[upstream]\nurl = \"https://api.example\"\n[upstream.keys.prod]\nenv = \"UNUSED\"\n",
        )
        .expect("minimal config");
        Upstream::new(&config.upstream, Default::default(), Default::default())
            .expect("upstream client builds")
    })
}
