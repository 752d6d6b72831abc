//! Owns the invalid-token throttle: a client address that sent `limit` refused tokens in
//! the current minute answers 429 for the rest of that minute, before its token is even
//! looked at (guessing tokens stops paying). Counted per replica, in memory.
//!
//! The check runs on every request, so its common case costs one atomic load: nothing is
//! tracked until some address fails.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use jiff::Timestamp;

const SHARDS: usize = 16;

/// Addresses tracked at once. Past it (a spray from many addresses), stale minutes are
/// forgotten first, and new addresses go untracked rather than grow memory.
const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy)]
struct Strikes {
    minute: i64,
    count: u64,
}

pub struct AddressThrottle {
    /// 0 = off.
    limit: u64,
    tracked: AtomicUsize,
    shards: [Mutex<HashMap<IpAddr, Strikes>>; SHARDS],
}

fn minute_of(now: Timestamp) -> (i64, u64) {
    let secs = now.as_second();
    (secs.div_euclid(60), 60 - secs.rem_euclid(60) as u64)
}

impl AddressThrottle {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            tracked: AtomicUsize::new(0),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, Strikes>> {
        let index = match ip {
            IpAddr::V4(v4) => v4.octets()[3] as usize,
            IpAddr::V6(v6) => v6.octets()[15] as usize ^ v6.octets()[7] as usize,
        };
        &self.shards[index % SHARDS]
    }

    /// `Some(retry_after_secs)` when this address is throttled now.
    pub fn check(&self, ip: IpAddr, now: Timestamp) -> Option<u64> {
        if self.limit == 0 || self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let (minute, left) = minute_of(now);
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        match shard.get(&ip).copied() {
            Some(s) if s.minute == minute && s.count >= self.limit => Some(left),
            Some(s) if s.minute < minute => {
                shard.remove(&ip);
                self.tracked.fetch_sub(1, Ordering::Relaxed);
                None
            }
            _ => None,
        }
    }

    /// Counts one refused token from this address.
    pub fn record_failure(&self, ip: IpAddr, now: Timestamp) {
        if self.limit == 0 {
            return;
        }
        let (minute, _) = minute_of(now);
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(strikes) = shard.get_mut(&ip) {
            if strikes.minute != minute {
                *strikes = Strikes { minute, count: 0 };
            }
            strikes.count += 1;
            return;
        }
        if self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED {
            let before = shard.len();
            shard.retain(|_, s| s.minute == minute);
            self.tracked
                .fetch_sub(before - shard.len(), Ordering::Relaxed);
            if self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED {
                return;
            }
        }
        shard.insert(ip, Strikes { minute, count: 1 });
        self.tracked.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_throttled_after_the_limit_until_the_minute_ends() {
        let throttle = AddressThrottle::new(3);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let other: IpAddr = "10.0.0.10".parse().unwrap();
        let t0: Timestamp = "2026-01-01T00:00:10Z".parse().unwrap();
        assert_eq!(throttle.check(ip, t0), None);
        for _ in 0..3 {
            assert_eq!(throttle.check(ip, t0), None);
            throttle.record_failure(ip, t0);
        }
        assert_eq!(throttle.check(ip, t0), Some(50));
        assert_eq!(throttle.check(other, t0), None);
        let next: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        assert_eq!(throttle.check(ip, next), None);
        assert_eq!(throttle.tracked.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_zero_limit_turns_it_off() {
        let throttle = AddressThrottle::new(0);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let t0 = Timestamp::UNIX_EPOCH;
        throttle.record_failure(ip, t0);
        assert_eq!(throttle.check(ip, t0), None);
    }
}
