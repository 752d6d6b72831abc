//! Owns the calendar day of the `rpd` window: which day an instant falls in, in the
//! configured zone, and exactly when that day ends (DST-aware).

use jiff::tz::TimeZone;
use jiff::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalendarDay {
    /// `yyyymmdd` of the local date: ordered, and readable in store keys.
    pub id: i64,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl CalendarDay {
    pub fn contains(&self, now_ms: i64) -> bool {
        now_ms >= self.start_ms && now_ms < self.end_ms
    }
}

#[derive(Debug, Clone)]
pub struct DayCalendar {
    tz: TimeZone,
}

impl DayCalendar {
    pub fn new(tz: TimeZone) -> Self {
        Self { tz }
    }

    pub fn utc() -> Self {
        Self::new(TimeZone::UTC)
    }

    pub fn day_at(&self, now: Timestamp) -> CalendarDay {
        let date = now.to_zoned_datetime(self.tz.clone()).date();
        let start = date
            .to_zoned_datetime(self.tz.clone())
            .map(|z| z.timestamp());
        let end = date
            .tomorrow()
            .and_then(|next| next.to_zoned_datetime(self.tz.clone()))
            .map(|z| z.timestamp());
        let id =
            i64::from(date.year()) * 10_000 + i64::from(date.month()) * 100 + i64::from(date.day());
        match (start, end) {
            (Ok(start), Ok(end)) => CalendarDay {
                id,
                start_ms: start.as_millisecond(),
                end_ms: end.as_millisecond(),
            },
            // Only at the edge of jiff's supported range; fall back to a 24 h day.
            _ => {
                let ms = now.as_millisecond();
                let start_ms = ms - ms.rem_euclid(86_400_000);
                CalendarDay {
                    id,
                    start_ms,
                    end_ms: start_ms + 86_400_000,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_day_ends_at_midnight() {
        let cal = DayCalendar::utc();
        let now: Timestamp = "2026-11-27T23:59:59.5Z".parse().unwrap();
        let day = cal.day_at(now);
        assert_eq!(day.id, 20261127);
        assert_eq!(day.end_ms - now.as_millisecond(), 500);
        let next = cal.day_at("2026-11-28T00:00:00Z".parse().unwrap());
        assert_eq!(next.id, 20261128);
        assert_eq!(next.start_ms, day.end_ms);
    }

    #[test]
    fn dst_day_is_23_hours_long() {
        let cal = DayCalendar::new(TimeZone::get("Europe/Berlin").unwrap());
        let day = cal.day_at("2026-03-29T12:00:00Z".parse().unwrap());
        assert_eq!(day.id, 20260329);
        assert_eq!(day.end_ms - day.start_ms, 23 * 3_600_000);
    }
}
