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
        let plan = PlanValues::of(self.minute.limit, self.day.limit);
        // The tightest window is one of the two, so its limit is one of the plan's.
        let limit = if t.limit == self.minute.limit {
            plan.minute_limit
        } else {
            plan.day_limit
        };
        headers.insert(X_RATELIMIT_LIMIT, limit);
        headers.insert(X_RATELIMIT_REMAINING, number(t.remaining()));
        headers.insert(X_RATELIMIT_RESET, number(t.reset_secs));
        headers.insert(RATELIMIT_POLICY, plan.policy);
        // Built by hand: a `format!` and its copies were a measurable share of the request
        // path (callgrind, PERFORMANCE.md).
        let mut state = Vec::with_capacity(64);
        let mut digits = itoa::Buffer::new();
        state.extend_from_slice(b"\"minute\";r=");
        state.extend_from_slice(digits.format(self.minute.remaining()).as_bytes());
        state.extend_from_slice(b";t=");
        state.extend_from_slice(digits.format(self.minute.reset_secs).as_bytes());
        state.extend_from_slice(b", \"day\";r=");
        state.extend_from_slice(digits.format(self.day.remaining()).as_bytes());
        state.extend_from_slice(b";t=");
        state.extend_from_slice(digits.format(self.day.reset_secs).as_bytes());
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(state)) {
            headers.insert(RATELIMIT, v);
        }
    }
}

/// The header values that depend only on the limits, which change with the plan and not
/// with each request.
#[derive(Clone)]
struct PlanValues {
    minute: u64,
    day: u64,
    minute_limit: HeaderValue,
    day_limit: HeaderValue,
    policy: HeaderValue,
}

thread_local! {
    /// The last plan's values on this thread: answers come in runs of one plan, and
    /// cloning a value is a reference count where building it was three allocations.
    static LAST_PLAN: std::cell::RefCell<Option<PlanValues>> =
        const { std::cell::RefCell::new(None) };
}

impl PlanValues {
    fn of(minute: u64, day: u64) -> PlanValues {
        LAST_PLAN.with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some(plan) if plan.minute == minute && plan.day == day => plan.clone(),
                _ => {
                    let plan = PlanValues::build(minute, day);
                    *last = Some(plan.clone());
                    plan
                }
            }
        })
    }

    fn build(minute: u64, day: u64) -> PlanValues {
        let mut digits = itoa::Buffer::new();
        let mut policy = Vec::with_capacity(48);
        policy.extend_from_slice(b"\"minute\";q=");
        policy.extend_from_slice(digits.format(minute).as_bytes());
        policy.extend_from_slice(b";w=60, \"day\";q=");
        policy.extend_from_slice(digits.format(day).as_bytes());
        policy.extend_from_slice(b";w=86400");
        PlanValues {
            minute,
            day,
            minute_limit: number(minute),
            day_limit: number(day),
            policy: HeaderValue::from_maybe_shared(bytes::Bytes::from(policy))
                .expect("digits and quotes are a valid header value"),
        }
    }
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

    #[test]
    fn a_plan_change_on_the_same_thread_shows_the_new_limits() {
        let small = QuotaReport::from_usage(&[usage(SubjectKind::Team, (1, 10), (1, 100))]);
        let large = QuotaReport::from_usage(&[usage(SubjectKind::Team, (1, 20), (1, 200))]);
        for (report, limit, policy) in [
            (small, "10", "\"minute\";q=10;w=60, \"day\";q=100;w=86400"),
            (large, "20", "\"minute\";q=20;w=60, \"day\";q=200;w=86400"),
            (small, "10", "\"minute\";q=10;w=60, \"day\";q=100;w=86400"),
        ] {
            let mut headers = HeaderMap::new();
            report.write_headers(&mut headers);
            assert_eq!(headers["x-ratelimit-limit"], limit);
            assert_eq!(headers["ratelimit-policy"], policy);
        }
    }
}
