//! Owns authentication: pulling the Bearer token out of a request, hashing it, and finding
//! the key record it belongs to. Only SHA-256 digests of tokens are ever held.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use jiff::Timestamp;

use crate::error::AuthFailure;
use crate::quota::Subject;
use crate::scope::Scopes;

/// Longer Authorization values are refused before hashing: real tokens are ~50 bytes.
pub const MAX_AUTHORIZATION_BYTES: usize = 512;

/// Where a key was defined: the config file (read-only at run time) or the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    Config,
    Admin,
}

impl KeyOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::Config => "config",
            KeyOrigin::Admin => "admin",
        }
    }
}

/// A key record: what a token is allowed to do and what it is counted against.
#[derive(Debug)]
pub struct ApiKey {
    pub id: Arc<str>,
    pub team: Arc<str>,
    pub scopes: Scopes,
    pub env: Arc<str>,
    /// When this token stops working: the key's own expiry, or the end of a rotation's
    /// grace for a replaced token.
    pub expires: Option<Timestamp>,
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub origin: KeyOrigin,
    pub created: Option<Timestamp>,
    /// Last use seen by this replica, in Unix milliseconds (0: never). Shared by every
    /// token of the key and carried over when the snapshot is rebuilt.
    pub last_used_ms: Arc<AtomicI64>,
    /// The counters this key's requests are charged to, in order: team, the key's own
    /// override if any, the upstream ceiling if any. Built once, shared by every request.
    pub subjects: Arc<[Subject]>,
}

impl ApiKey {
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }

    /// Records a use. Writes at most once a second so a busy key's cache line stays shared.
    pub fn touch(&self, now: Timestamp) {
        let now_ms = now.as_millisecond();
        if now_ms - self.last_used_ms.load(Ordering::Relaxed) >= 1000 {
            self.last_used_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    pub fn last_used(&self) -> Option<Timestamp> {
        match self.last_used_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Timestamp::from_millisecond(ms).ok(),
        }
    }
}

/// A SHA-256 digest used as a map key. Hashing it again would be wasted work: its first
/// eight bytes are already uniformly distributed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl Hash for TokenDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_ne_bytes(first));
    }
}

/// Passes a `write_u64` through unchanged; only [`TokenDigest`] feeds it.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// All known keys by token digest. Lookup cost does not depend on how many keys exist.
#[derive(Default)]
pub struct KeyRegistry {
    by_digest: HashMap<TokenDigest, Arc<ApiKey>, BuildHasherDefault<DigestHasher>>,
}

impl KeyRegistry {
    pub fn insert(&mut self, digest: [u8; 32], key: Arc<ApiKey>) {
        self.by_digest.insert(TokenDigest(digest), key);
    }

    pub fn get(&self, digest: &[u8; 32]) -> Option<&Arc<ApiKey>> {
        self.by_digest.get(&TokenDigest(*digest))
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ApiKey>> {
        self.by_digest.values()
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    sha256(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Extracts the token of `Authorization: Bearer <token>`. Exactly one Authorization
/// header is accepted; the token must be RFC 6750 `b64token` characters.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthFailure::Missing)?;
    if values.next().is_some() {
        return Err(AuthFailure::Duplicated);
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(AuthFailure::Missing);
    }
    if bytes.len() > MAX_AUTHORIZATION_BYTES || bytes.len() < 8 {
        return Err(AuthFailure::Malformed);
    }
    let (scheme, rest) = bytes.split_at(7);
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return Err(AuthFailure::Malformed);
    }
    let token = trim_spaces(rest);
    let body_len = token.iter().rposition(|b| *b != b'=').map_or(0, |i| i + 1);
    let valid = body_len > 0
        && token[..body_len].iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        });
    if !valid {
        return Err(AuthFailure::Malformed);
    }
    // All bytes are ASCII here, so this cannot fail.
    std::str::from_utf8(token).map_err(|_| AuthFailure::Malformed)
}

fn trim_spaces(mut bytes: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' '] = bytes {
        bytes = rest;
    }
    bytes
}

/// The authenticate step: token → digest → key record, refusing unknown and expired keys.
pub fn authenticate(
    registry: &KeyRegistry,
    headers: &HeaderMap,
    now: Timestamp,
) -> Result<Arc<ApiKey>, AuthFailure> {
    let token = bearer_token(headers)?;
    let key = registry
        .get(&sha256(token.as_bytes()))
        .ok_or(AuthFailure::Unknown)?;
    if key.is_expired(now) {
        return Err(AuthFailure::Expired);
    }
    key.touch(now);
    Ok(key.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        }
        map
    }

    #[test]
    fn extracts_well_formed_tokens() {
        assert_eq!(
            bearer_token(&headers(&[b"Bearer kg_abc-123"])),
            Ok("kg_abc-123")
        );
        assert_eq!(
            bearer_token(&headers(&[b"bearer   kg_abc=="])),
            Ok("kg_abc==")
        );
    }

    #[test]
    fn refuses_bad_authorization() {
        let long = format!("Bearer {}", "a".repeat(10_000));
        let cases: Vec<(Vec<&[u8]>, AuthFailure)> = vec![
            (vec![], AuthFailure::Missing),
            (vec![b""], AuthFailure::Missing),
            (vec![b"Basic dXNlcjpwYXNz"], AuthFailure::Malformed),
            (vec![b"Bearer "], AuthFailure::Malformed),
            (vec![b"Bearer a b"], AuthFailure::Malformed),
            (vec![b"Bearer \xc3\xa9t\xc3\xa9"], AuthFailure::Malformed),
            (vec![long.as_bytes()], AuthFailure::Malformed),
            (vec![b"Bearer x", b"Bearer y"], AuthFailure::Duplicated),
            (vec![b"Bearer ===="], AuthFailure::Malformed),
        ];
        for (values, want) in cases {
            assert_eq!(bearer_token(&headers(&values)), Err(want), "{values:?}");
        }
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
