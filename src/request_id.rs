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
        minted(self.prefix, self.counter.fetch_add(1, Ordering::Relaxed))
    }
}

/// `{prefix:016x}{n:08x}`, written by hand while the counter fits its 8 digits: `format!`
/// was ~1 000 instructions a request (callgrind, PERFORMANCE.md).
fn minted(prefix: u64, n: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let Ok(low) = u32::try_from(n) else {
        // After 2^32 requests the counter takes more digits, as `format!` gives it.
        let id = format!("{prefix:016x}{n:08x}");
        return HeaderValue::from_str(&id).expect("hex is a valid header value");
    };
    let mut id = [0u8; 24];
    for (i, digit) in id[..16].iter_mut().enumerate() {
        *digit = HEX[((prefix >> (60 - 4 * i)) & 0xf) as usize];
    }
    for (i, digit) in id[16..].iter_mut().enumerate() {
        *digit = HEX[((low >> (28 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex is a valid header value")
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

    #[test]
    fn a_minted_id_is_the_prefix_and_the_counter_in_hex() {
        for (prefix, n) in [
            (0, 0),
            (0x0123_4567_89ab_cdef, 0xfedc_ba98),
            (u64::MAX, 7),
            (5, u64::from(u32::MAX) + 1),
        ] {
            assert_eq!(minted(prefix, n), format!("{prefix:016x}{n:08x}").as_str());
        }
    }
}
