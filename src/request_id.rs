//! Owns `X-Request-Id`: keeping a sane one from the client, or minting a fresh one.

use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderValue};
use ring::rand::SecureRandom;

use crate::forward::X_REQUEST_ID;

/// Longer client ids are replaced: they end up in every log line.
const MAX_CLIENT_ID_LEN: usize = 128;

/// Mints ids as a random per-process prefix plus a counter: unique across replicas without
/// a random draw per request.
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut bytes = [0u8; 8];
        // If the system RNG fails, ids are still unique within this process.
        let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
        Self {
            prefix: u64::from_ne_bytes(bytes),
            counter: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    pub fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(id) = headers.get(X_REQUEST_ID) {
            if is_sane(id.as_bytes()) {
                return id.clone();
            }
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:016x}{:08x}", self.prefix, n);
        HeaderValue::from_str(&id).expect("hex is a valid header value")
    }
}

fn is_sane(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        let ids = RequestIds::default();
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(ids.for_request(&headers), "abc-123");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        let minted = ids.for_request(&headers);
        assert_eq!(minted.len(), 24);
        assert_ne!(minted, ids.for_request(&HeaderMap::new()));
    }
}
