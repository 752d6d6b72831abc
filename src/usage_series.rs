//! Owns the last hour of per-minute request counts per team, split by outcome class, for
//! the dashboard. Fed from the usage log's writer thread (off the request path); kept per
//! replica, in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::usage_log::{UsageConsumer, UsageRecord};

/// Minutes kept.
pub const MINUTES: usize = 60;

/// The outcome classes the dashboard draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Forwarded,
    Denied,
    RateLimited,
    UpstreamError,
    Other,
}

impl Class {
    const ALL: [Class; 5] = [
        Class::Forwarded,
        Class::Denied,
        Class::RateLimited,
        Class::UpstreamError,
        Class::Other,
    ];

    fn of(outcome: &str) -> Class {
        match outcome {
            "forwarded" => Class::Forwarded,
            "unauthorized" | "forbidden" => Class::Denied,
            "rate_limited" => Class::RateLimited,
            "upstream_error" | "upstream_timeout" => Class::UpstreamError,
            _ => Class::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Class::Forwarded => "forwarded",
            Class::Denied => "denied",
            Class::RateLimited => "rate_limited",
            Class::UpstreamError => "upstream_error",
            Class::Other => "other",
        }
    }
}

/// Requests without a valid token have no team; they are counted under this name.
pub const UNAUTHENTICATED: &str = "(no valid token)";

#[derive(Debug, Clone)]
struct Ring {
    minutes: [i64; MINUTES],
    counts: [[u32; 5]; MINUTES],
}

impl Default for Ring {
    fn default() -> Self {
        Self {
            minutes: [i64::MIN; MINUTES],
            counts: [[0; 5]; MINUTES],
        }
    }
}

impl Ring {
    fn add(&mut self, minute: i64, class: Class) {
        let slot = minute.rem_euclid(MINUTES as i64) as usize;
        if self.minutes[slot] != minute {
            self.minutes[slot] = minute;
            self.counts[slot] = [0; 5];
        }
        self.counts[slot][class.index()] += 1;
    }

    fn count(&self, minute: i64, class: Class) -> u32 {
        let slot = minute.rem_euclid(MINUTES as i64) as usize;
        if self.minutes[slot] == minute {
            self.counts[slot][class.index()]
        } else {
            0
        }
    }
}

/// One team's series, oldest minute first.
#[derive(Debug, Serialize)]
pub struct TeamSeries {
    pub team: String,
    pub series: HashMap<&'static str, Vec<u32>>,
}

#[derive(Debug, Default)]
pub struct UsageSeries {
    teams: Mutex<HashMap<String, Ring>>,
}

impl UsageSeries {
    pub fn record(&self, team: Option<&str>, outcome: &str, unix_seconds: i64) {
        let minute = unix_seconds.div_euclid(60);
        let mut teams = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        let team = team.unwrap_or(UNAUTHENTICATED);
        if let Some(ring) = teams.get_mut(team) {
            ring.add(minute, Class::of(outcome));
        } else {
            let mut ring = Ring::default();
            ring.add(minute, Class::of(outcome));
            teams.insert(team.to_string(), ring);
        }
    }

    /// The last `minutes` minutes up to the one containing `now_seconds`, for the given
    /// teams (teams without traffic get zeros).
    pub fn snapshot(&self, teams: &[&str], minutes: usize, now_seconds: i64) -> Vec<TeamSeries> {
        let minutes = minutes.clamp(1, MINUTES);
        let last = now_seconds.div_euclid(60);
        let first = last - minutes as i64 + 1;
        let rings = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        teams
            .iter()
            .map(|team| {
                let ring = rings.get(*team);
                let series = Class::ALL
                    .iter()
                    .map(|class| {
                        let values = (first..=last)
                            .map(|m| ring.map_or(0, |r| r.count(m, *class)))
                            .collect();
                        (class.name(), values)
                    })
                    .collect();
                TeamSeries {
                    team: team.to_string(),
                    series,
                }
            })
            .collect()
    }

    pub fn has_unauthenticated(&self) -> bool {
        self.teams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(UNAUTHENTICATED)
    }
}

/// Feeds the series from the usage log's writer thread.
pub struct SeriesConsumer(pub Arc<UsageSeries>);

impl UsageConsumer for SeriesConsumer {
    fn consume(&mut self, record: &UsageRecord, _line: &str) {
        self.0.record(
            record.team.as_deref(),
            &record.outcome,
            record.ts.as_second(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_minute_and_class() {
        let series = UsageSeries::default();
        let t0 = 1_800_000_040 - 1_800_000_040 % 60;
        series.record(Some("design"), "forwarded", t0);
        series.record(Some("design"), "forwarded", t0 + 59);
        series.record(Some("design"), "rate_limited", t0 + 60);
        series.record(None, "unauthorized", t0 + 60);
        let snap = series.snapshot(&["design", UNAUTHENTICATED, "idle"], 3, t0 + 61);
        assert_eq!(snap[0].series["forwarded"], vec![0, 2, 0]);
        assert_eq!(snap[0].series["rate_limited"], vec![0, 0, 1]);
        assert_eq!(snap[1].series["denied"], vec![0, 0, 1]);
        assert_eq!(snap[2].series["forwarded"], vec![0, 0, 0]);
    }

    #[test]
    fn minutes_older_than_an_hour_are_forgotten() {
        let series = UsageSeries::default();
        series.record(Some("design"), "forwarded", 0);
        series.record(Some("design"), "forwarded", 3600);
        let snap = series.snapshot(&["design"], 60, 3600);
        assert_eq!(snap[0].series["forwarded"].iter().sum::<u32>(), 1);
    }
}
