//! Owns what a client is told about its quota: the tightest window of a decision, rendered
//! as `X-RateLimit-*`, the IETF `RateLimit-Policy` / `RateLimit` fields and `Retry-After`.

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use super::{SubjectUsage, WindowUsage};

/// The quota state reported to a client: per window, the subject with the least room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaReport {
    pub minute: WindowUsage,
    pub day: WindowUsage,
}

fn tightest(a: WindowUsage, b: WindowUsage) -> WindowUsage {
    if b.remaining() < a.remaining()
        || (b.remaining() == a.remaining() && b.reset_secs > a.reset_secs)
    {
        b
    } else {
        a
    }
}

impl QuotaReport {
    pub fn from_usage(usage: &[SubjectUsage]) -> Self {
        let mut iter = usage.iter();
        let Some(first) = iter.next() else {
            return Self::default();
        };
        iter.fold(
            QuotaReport {
                minute: first.minute,
                day: first.day,
            },
            |acc, u| QuotaReport {
                minute: tightest(acc.minute, u.minute),
                day: tightest(acc.day, u.day),
            },
        )
    }

    /// The tightest window overall, used for the `X-RateLimit-*` triple.
    pub fn tightest(&self) -> WindowUsage {
        tightest(self.minute, self.day)
    }

    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let t = self.tightest();
        headers.insert(X_RATELIMIT_LIMIT, number(t.limit));
        headers.insert(X_RATELIMIT_REMAINING, number(t.remaining()));
        headers.insert(X_RATELIMIT_RESET, number(t.reset_secs));
        // Built by hand: two `format!`s and their copies were a measurable share of the
        // request path (callgrind, PERFORMANCE.md).
        let mut policy = Vec::with_capacity(48);
        policy.extend_from_slice(b"\"minute\";q=");
        push_number(&mut policy, self.minute.limit);
        policy.extend_from_slice(b";w=60, \"day\";q=");
        push_number(&mut policy, self.day.limit);
        policy.extend_from_slice(b";w=86400");
        let mut state = Vec::with_capacity(64);
        state.extend_from_slice(b"\"minute\";r=");
        push_number(&mut state, self.minute.remaining());
        state.extend_from_slice(b";t=");
        push_number(&mut state, self.minute.reset_secs);
        state.extend_from_slice(b", \"day\";r=");
        push_number(&mut state, self.day.remaining());
        state.extend_from_slice(b";t=");
        push_number(&mut state, self.day.reset_secs);
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(policy)) {
            headers.insert(RATELIMIT_POLICY, v);
        }
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(state)) {
            headers.insert(RATELIMIT, v);
        }
    }
}

/// Appends the decimal digits of `n`.
fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

pub fn write_retry_after(headers: &mut HeaderMap, secs: u64) {
    headers.insert(RETRY_AFTER, number(secs));
}

fn number(n: u64) -> HeaderValue {
    HeaderValue::from(n)
}

pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::SubjectKind;

    fn usage(kind: SubjectKind, m: (u64, u64), d: (u64, u64)) -> SubjectUsage {
        SubjectUsage {
            kind,
            minute: WindowUsage {
                used: m.0,
                limit: m.1,
                reset_secs: 30,
            },
            day: WindowUsage {
                used: d.0,
                limit: d.1,
                reset_secs: 3600,
            },
        }
    }

    #[test]
    fn headers_show_the_tightest_window() {
        let report = QuotaReport::from_usage(&[
            usage(SubjectKind::Team, (10, 100), (9990, 10000)),
            usage(SubjectKind::Upstream, (50, 60), (10, 100_000)),
        ]);
        let mut headers = HeaderMap::new();
        report.write_headers(&mut headers);
        assert_eq!(headers["x-ratelimit-limit"], "10000");
        assert_eq!(headers["x-ratelimit-remaining"], "10");
        assert_eq!(headers["x-ratelimit-reset"], "3600");
        assert_eq!(
            headers["ratelimit-policy"],
            "\"minute\";q=60;w=60, \"day\";q=10000;w=86400"
        );
        assert_eq!(
            headers["ratelimit"],
            "\"minute\";r=10;t=30, \"day\";r=10;t=3600"
        );
    }
}
