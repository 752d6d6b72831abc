//! Owns the arithmetic of the two quota windows: a rolling minute kept in one-second buckets
//! and a calendar day. Both use constant space whatever the limit.

/// Buckets counted by a decision: the current second and the 60 before it. Counting 61
/// buckets means no 60-second span can ever hold more than the limit; the price is that a
/// window may under-admit by at most one bucket's worth.
pub const MINUTE_BUCKETS: usize = 61;

/// A rolling 60-second window in one-second buckets, each stamped with its second so stale
/// buckets are recognised without a sweep.
#[derive(Debug, Clone)]
pub struct RollingMinute {
    stamps: [i64; MINUTE_BUCKETS],
    counts: [u64; MINUTE_BUCKETS],
}

impl Default for RollingMinute {
    fn default() -> Self {
        Self {
            stamps: [i64::MIN; MINUTE_BUCKETS],
            counts: [0; MINUTE_BUCKETS],
        }
    }
}

fn slot(second: i64) -> usize {
    second.rem_euclid(MINUTE_BUCKETS as i64) as usize
}

fn is_live(stamp: i64, now_second: i64) -> bool {
    stamp <= now_second && stamp > now_second - MINUTE_BUCKETS as i64
}

impl RollingMinute {
    pub fn used(&self, now_second: i64) -> u64 {
        self.stamps
            .iter()
            .zip(&self.counts)
            .filter(|(stamp, _)| is_live(**stamp, now_second))
            .map(|(_, count)| *count)
            .sum()
    }

    pub fn add(&mut self, second: i64, n: u64) {
        let i = slot(second);
        if self.stamps[i] != second {
            self.stamps[i] = second;
            self.counts[i] = 0;
        }
        self.counts[i] += n;
    }

    /// Takes back one admission made at `second`, if that bucket still exists.
    pub fn remove(&mut self, second: i64) {
        let i = slot(second);
        if self.stamps[i] == second && self.counts[i] > 0 {
            self.counts[i] -= 1;
        }
    }

    fn live_buckets(&self, now_second: i64) -> Vec<(i64, u64)> {
        let mut live: Vec<(i64, u64)> = self
            .stamps
            .iter()
            .zip(&self.counts)
            .filter(|(stamp, count)| **count > 0 && is_live(**stamp, now_second))
            .map(|(stamp, count)| (*stamp, *count))
            .collect();
        live.sort_unstable();
        live
    }

    /// Milliseconds until one more request fits under `limit` (0 when it fits now).
    pub fn millis_until_room(&self, now_ms: i64, limit: u64) -> i64 {
        let now_second = now_ms.div_euclid(1000);
        let mut used = self.used(now_second);
        if used < limit {
            return 0;
        }
        for (stamp, count) in self.live_buckets(now_second) {
            used -= count;
            if used < limit {
                return bucket_expiry_ms(stamp) - now_ms;
            }
        }
        // Unreachable for limit > 0: every bucket has expired by then.
        MINUTE_BUCKETS as i64 * 1000
    }

    /// Milliseconds until the oldest counted request leaves the window; a full minute
    /// when the window is empty.
    pub fn millis_until_oldest_expires(&self, now_ms: i64) -> i64 {
        let now_second = now_ms.div_euclid(1000);
        match self.live_buckets(now_second).first() {
            Some((stamp, _)) => bucket_expiry_ms(*stamp) - now_ms,
            None => 60_000,
        }
    }
}

/// The instant a bucket stops being counted.
fn bucket_expiry_ms(stamp: i64) -> i64 {
    (stamp + MINUTE_BUCKETS as i64) * 1000
}

/// A counter for one calendar day, identified by its day number.
#[derive(Debug, Clone, Copy, Default)]
pub struct DayCounter {
    day: i64,
    count: u64,
}

impl DayCounter {
    pub fn used(&self, day: i64) -> u64 {
        if self.day == day {
            self.count
        } else {
            0
        }
    }

    pub fn add(&mut self, day: i64, n: u64) {
        if self.day != day {
            self.day = day;
            self.count = 0;
        }
        self.count += n;
    }

    pub fn remove(&mut self, day: i64) {
        if self.day == day && self.count > 0 {
            self.count -= 1;
        }
    }
}

/// Rounds milliseconds up to whole seconds, never below 1: a client told "0" would retry
/// at once and be refused again.
pub fn ceil_secs(ms: i64) -> u64 {
    (ms.max(1) as u64).div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sixty_second_span_exceeds_the_limit() {
        let limit = 10;
        let mut window = RollingMinute::default();
        let mut admitted: Vec<i64> = Vec::new();
        // Try a request every 250 ms for five minutes; admit when the window allows.
        for ms in (0..300_000).step_by(250) {
            let second = ms / 1000;
            if window.used(second) < limit {
                window.add(second, 1);
                admitted.push(ms);
            }
        }
        for (i, start) in admitted.iter().enumerate() {
            let in_span = admitted[i..]
                .iter()
                .take_while(|t| **t < start + 60_000)
                .count();
            assert!(
                in_span as u64 <= limit,
                "{in_span} admitted in 60 s from {start}"
            );
        }
        // Under-admission is bounded: roughly limit per 61 s.
        assert!(admitted.len() >= 4 * limit as usize);
    }

    #[test]
    fn burst_at_59_and_61_cannot_double() {
        let mut window = RollingMinute::default();
        for _ in 0..10 {
            assert!(window.used(59) < 10);
            window.add(59, 1);
        }
        assert_eq!(window.used(61), 10);
        assert_eq!(window.used(119), 10);
        assert_eq!(window.used(120), 0);
        assert_eq!(window.millis_until_room(61_000, 10), 120_000 - 61_000);
    }

    #[test]
    fn refund_only_touches_its_own_bucket() {
        let mut window = RollingMinute::default();
        window.add(5, 2);
        window.remove(5);
        assert_eq!(window.used(5), 1);
        window.remove(4 + MINUTE_BUCKETS as i64); // same slot, other second
        assert_eq!(window.used(5), 1);
    }

    #[test]
    fn day_counter_resets_on_a_new_day() {
        let mut day = DayCounter::default();
        day.add(20261127, 3);
        assert_eq!(day.used(20261127), 3);
        assert_eq!(day.used(20261128), 0);
        day.add(20261128, 1);
        assert_eq!(day.used(20261128), 1);
    }

    #[test]
    fn ceil_secs_never_says_zero() {
        assert_eq!(ceil_secs(0), 1);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(1000), 1);
        assert_eq!(ceil_secs(1001), 2);
    }
}
