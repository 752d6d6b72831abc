//! Owns the request target: one canonical form of the path, and the route table that maps
//! method + path prefix to the scope it needs (deny by default).
//!
//! The canonical path is decided once and used for both the scope check and the forwarded
//! request, so `/v1/./text-to-image`, `//v1/text-to-image` or `/v1/%74ext-to-image` cannot
//! be checked as one path and forwarded as another.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::scope::Scope;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("invalid percent-encoding")]
    BadEscape,
    #[error("encoded '/', '\\' or control character")]
    ForbiddenEscape,
    #[error("encoded '%' followed by hex digits (double encoding)")]
    DoubleEncoded,
    #[error("backslash in path")]
    Backslash,
    #[error("control character in path")]
    ControlCharacter,
    #[error("dot segment with parameters ('..;')")]
    AmbiguousDotSegment,
    #[error("'..' above the root")]
    AboveRoot,
}

/// Returns the canonical form of a request path: dot segments resolved, empty segments
/// collapsed, escapes of unreserved characters decoded, other escapes upper-cased, and
/// every byte outside RFC 3986 `pchar` (non-ASCII, `"`, `{`, `|`, …) percent-encoded.
///
/// Refused outright, because servers behind a proxy disagree on what they mean: encoded
/// slashes and backslashes, literal backslashes, encoded control characters, an encoded
/// `%` that forms another escape (`%252e`: a server that decodes twice sees `.`), and dot
/// segments carrying parameters (`..;x`, which Java servers treat as `..`).
///
/// The result only holds `/`, `pchar` and upper-case `%XX`, and is its own canonical form.
pub fn canonical_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_already_canonical(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for segment in raw[1..].split('/') {
        let decoded = decode_segment(segment)?;
        // RFC 3986 §5.2.4: a path ending in an empty or dot segment keeps its final '/'.
        trailing_slash = true;
        match decoded.as_str() {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            _ => {
                if is_dot_with_parameters(&decoded) {
                    return Err(PathError::AmbiguousDotSegment);
                }
                segments.push(decoded);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(raw.len());
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

/// RFC 3986 `pchar` less `%`: characters a canonical path keeps as they are.
fn is_plain_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `.;x`, `..;x` or `..%3Bx`: a dot segment to servers that strip path parameters.
fn is_dot_with_parameters(segment: &str) -> bool {
    // Most segments: the substring searches below cost ~200 instructions each.
    if !segment.starts_with('.') {
        return false;
    }
    let stem_end = [segment.find(';'), segment.find("%3B")]
        .into_iter()
        .flatten()
        .min();
    matches!(stem_end.map(|end| &segment[..end]), Some("." | ".."))
}

fn is_already_canonical(raw: &str) -> bool {
    if !raw.bytes().all(|b| b == b'/' || is_plain_pchar(b)) {
        return false;
    }
    // Every segment after the leading '/' must be non-empty (except a final trailing one)
    // and neither a dot segment nor one that looks like it to a parameter-stripping server.
    let mut parts = raw[1..].split('/').peekable();
    while let Some(part) = parts.next() {
        let is_last = parts.peek().is_none();
        if part == "." || part == ".." || (part.is_empty() && !is_last) {
            return false;
        }
        if is_dot_with_parameters(part) {
            return false;
        }
    }
    true
}

fn decode_segment(segment: &str) -> Result<String, PathError> {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
                let value = hex_value(hex[0])
                    .zip(hex_value(hex[1]))
                    .map(|(hi, lo)| hi << 4 | lo)
                    .ok_or(PathError::BadEscape)?;
                if value == b'/' || value == b'\\' || value < 0x20 || value == 0x7f {
                    return Err(PathError::ForbiddenEscape);
                }
                if is_unreserved(value) {
                    out.push(value as char);
                } else {
                    push_escape(&mut out, value);
                }
                i += 3;
            }
            b if is_plain_pchar(b) => {
                out.push(b as char);
                i += 1;
            }
            b if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
            other => {
                push_escape(&mut out, other);
                i += 1;
            }
        }
    }
    if has_double_encoding(&out) {
        return Err(PathError::DoubleEncoded);
    }
    Ok(out)
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(byte >> 4)] as char);
    out.push(HEX[usize::from(byte & 0xf)] as char);
}

/// `%25` followed by two hex digits in a decoded segment: `%2541` from the client.
fn has_double_encoding(decoded: &str) -> bool {
    decoded
        .as_bytes()
        .windows(5)
        .any(|w| w[..3] == *b"%25" && hex_value(w[3]).is_some() && hex_value(w[4]).is_some())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One configured route: `match = "POST /v1/text-to-image"`, `scope = "generate"`.
#[derive(Debug, Clone)]
pub struct Route {
    /// `None` matches any method (`match = "* /v1/"`).
    pub method: Option<Method>,
    pub prefix: String,
    pub scope: Scope,
    /// The `match` string as configured; the bounded `route` label of metrics and logs.
    pub label: Arc<str>,
}

impl Route {
    fn matches(&self, method: &Method, path: &str) -> bool {
        if let Some(wanted) = &self.method {
            if wanted != method {
                return false;
            }
        }
        path_has_prefix(path, &self.prefix)
    }
}

/// A prefix matches at segment boundaries only, ignoring ASCII case: `/v1/images` covers
/// `/v1/images`, `/V1/Images/x`, `/v1/images.json`, `/v1/images;v=2` and
/// `/v1/images:upscale`, never `/v1/images-admin` or `/v1/images2`.
///
/// Upstream frameworks often treat case variants, format suffixes and path parameters as
/// the same resource, so the route (and its scope) of the resource must cover them too.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let (path, prefix) = (path.as_bytes(), prefix.as_bytes());
    if path.len() < prefix.len() || !path[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return false;
    }
    match path.get(prefix.len()) {
        None => true,
        Some(_) if prefix.ends_with(b"/") => true,
        Some(next) => !(next.is_ascii_alphanumeric() || matches!(next, b'-' | b'_' | b'~')),
    }
}

/// The routes, most specific first: longest prefix, then an exact method before `*`.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then_with(|| b.method.is_some().cmp(&a.method.is_some()))
        });
        Self { routes }
    }

    pub fn find(&self, method: &Method, canonical_path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| route.matches(method, canonical_path))
    }

    pub fn labels(&self) -> impl Iterator<Item = &Arc<str>> {
        self.routes.iter().map(|r| &r.label)
    }
}

/// Parses a route's `match` string: `"METHOD /prefix"` or `"* /prefix"`.
pub fn parse_route_match(text: &str) -> Result<(Option<Method>, String), String> {
    let mut parts = text.split_whitespace();
    let (Some(method), Some(prefix), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "{text:?} is not \"METHOD /path-prefix\" (e.g. \"POST /v1/text-to-image\")"
        ));
    };
    let method = if method == "*" {
        None
    } else {
        if !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("method {method:?} must be upper-case, like POST"));
        }
        Some(Method::from_bytes(method.as_bytes()).map_err(|_| format!("bad method {method:?}"))?)
    };
    match canonical_path(prefix) {
        Ok(canonical) if canonical == prefix => Ok((method, prefix.to_string())),
        Ok(canonical) => Err(format!(
            "path prefix {prefix:?} is not canonical; write {canonical:?}"
        )),
        Err(e) => Err(format!("path prefix {prefix:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        let cases = [
            ("/v1/text-to-image", Ok("/v1/text-to-image")),
            ("/v1/./text-to-image", Ok("/v1/text-to-image")),
            ("//v1//text-to-image", Ok("/v1/text-to-image")),
            ("/v1/x/../text-to-image", Ok("/v1/text-to-image")),
            ("/v1/%74ext-to-image", Ok("/v1/text-to-image")),
            ("/v1/%2e/text-to-image", Ok("/v1/text-to-image")),
            ("/v1/a%2fb", Err(PathError::ForbiddenEscape)),
            ("/v1/a%5Cb", Err(PathError::ForbiddenEscape)),
            ("/v1/a\\b", Err(PathError::Backslash)),
            ("/../v1", Err(PathError::AboveRoot)),
            ("/v1/%zz", Err(PathError::BadEscape)),
            ("/v1/%4", Err(PathError::BadEscape)),
            ("/v1/a%20b", Ok("/v1/a%20b")),
            ("/v1/a%3fb", Ok("/v1/a%3Fb")),
            ("/", Ok("/")),
            ("/v1/", Ok("/v1/")),
            ("/v1/x/..", Ok("/v1/")),
            ("/v1/x/%2e%2E", Ok("/v1/")),
            ("/v1/.", Ok("/v1/")),
            ("/v1//", Ok("/v1/")),
            ("/v1/\u{e9}", Ok("/v1/%C3%A9")),
            ("/v1/a\"b{c}|", Ok("/v1/a%22b%7Bc%7D%7C")),
            ("/v1/a;b=1/c:d@e", Ok("/v1/a;b=1/c:d@e")),
            ("/v1/..;/x", Err(PathError::AmbiguousDotSegment)),
            ("/v1/.;x", Err(PathError::AmbiguousDotSegment)),
            ("/v1/%2e%2e%3bx/y", Err(PathError::AmbiguousDotSegment)),
            ("/v1/%252e%252e", Err(PathError::DoubleEncoded)),
            ("/v1/%25%32%65", Err(PathError::DoubleEncoded)),
            ("/v1/100%25off", Ok("/v1/100%25off")),
            ("/v1/%00", Err(PathError::ForbiddenEscape)),
            ("/v1/\u{11}x", Err(PathError::ControlCharacter)),
            ("/v1/\u{7f}", Err(PathError::ControlCharacter)),
            ("*", Err(PathError::NotAbsolute)),
        ];
        for (raw, want) in cases {
            let got = canonical_path(raw).map(|c| c.into_owned());
            assert_eq!(got, want.map(str::to_string), "{raw}");
        }
    }

    #[test]
    fn canonical_is_idempotent() {
        for raw in [
            "/a/./b/../c//d/",
            "/%41%2e%2E/x",
            "/v1/a%3fb",
            "/v1/\u{e9}\"/%25",
            "/x/..",
        ] {
            let once = canonical_path(raw).unwrap().into_owned();
            assert_eq!(canonical_path(&once).unwrap(), once);
        }
    }

    fn table() -> RouteTable {
        let route = |m: &str, scope| {
            let (method, prefix) = parse_route_match(m).unwrap();
            Route {
                method,
                prefix,
                scope,
                label: m.into(),
            }
        };
        RouteTable::new(vec![
            route("* /v1/", Scope::Read),
            route("POST /v1/text-to-image", Scope::Generate),
        ])
    }

    #[test]
    fn most_specific_route_wins_and_prefixes_stop_at_segments() {
        let table = table();
        let find = |m: Method, p: &str| table.find(&m, p).map(|r| r.scope);
        assert_eq!(
            find(Method::POST, "/v1/text-to-image"),
            Some(Scope::Generate)
        );
        assert_eq!(
            find(Method::POST, "/v1/text-to-image/x"),
            Some(Scope::Generate)
        );
        assert_eq!(
            find(Method::POST, "/v1/text-to-image-hd"),
            Some(Scope::Read)
        );
        assert_eq!(find(Method::GET, "/v1/models"), Some(Scope::Read));
        for variant in [
            "/V1/TEXT-TO-IMAGE",
            "/v1/Text-To-Image/",
            "/v1/text-to-image.json",
            "/v1/text-to-image.",
            "/v1/text-to-image;jsessionid=1",
            "/v1/text-to-image:batch",
            "/v1/text-to-image%20",
        ] {
            assert_eq!(
                find(Method::POST, variant),
                Some(Scope::Generate),
                "{variant}"
            );
        }
        assert_eq!(find(Method::POST, "/v1/text-to-image2"), Some(Scope::Read));
        assert_eq!(find(Method::GET, "/v2/models"), None);
        assert_eq!(find(Method::GET, "/v1"), None);
    }

    #[test]
    fn route_match_strings_are_validated() {
        assert!(parse_route_match("POST /v1/text-to-image").is_ok());
        assert!(parse_route_match("post /v1").is_err());
        assert!(parse_route_match("POST v1").is_err());
        assert!(parse_route_match("POST /v1/./x").is_err());
        assert!(parse_route_match("POST").is_err());
    }
}
