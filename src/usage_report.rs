//! Owns `keygate usage report`: per-team and per-key totals of a usage log — requests,
//! 429s, errors (5xx) and p50/p95 latency.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::usage_log::UsageRecord;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub rate_limited: u64,
    pub errors: u64,
    latencies_ms: Vec<f64>,
}

impl Totals {
    fn add(&mut self, record: &UsageRecord) {
        self.requests += 1;
        if record.status == 429 {
            self.rate_limited += 1;
        }
        if record.status >= 500 {
            self.errors += 1;
        }
        self.latencies_ms.push(record.latency_ms);
    }

    /// Nearest-rank percentile of the latencies, in milliseconds.
    pub fn percentile(&mut self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        self.latencies_ms.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * self.latencies_ms.len() as f64).ceil() as usize;
        self.latencies_ms[rank.clamp(1, self.latencies_ms.len()) - 1]
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub teams: BTreeMap<String, Totals>,
    /// By (key id, team).
    pub keys: BTreeMap<(String, String), Totals>,
    pub skipped_lines: usize,
}

impl Report {
    pub fn add(&mut self, record: &UsageRecord) {
        let team = record.team.as_deref().unwrap_or("-").to_string();
        let key = record.key_id.as_deref().unwrap_or("-").to_string();
        self.teams.entry(team.clone()).or_default().add(record);
        self.keys.entry((key, team)).or_default().add(record);
    }

    /// The two tables, aligned for a terminal.
    pub fn render(&mut self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>8} {:>8} {:>10} {:>10}",
            "team", "requests", "429s", "errors", "p50_ms", "p95_ms"
        );
        for (team, totals) in &mut self.teams {
            row(&mut out, team, totals);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:>10} {:>8} {:>8} {:>10} {:>10}",
            "key", "team", "requests", "429s", "errors", "p50_ms", "p95_ms"
        );
        for ((key, team), totals) in &mut self.keys {
            let p50 = totals.percentile(50.0);
            let p95 = totals.percentile(95.0);
            let _ = writeln!(
                out,
                "{key:<24} {team:<16} {:>10} {:>8} {:>8} {p50:>10.1} {p95:>10.1}",
                totals.requests, totals.rate_limited, totals.errors
            );
        }
        out
    }
}

fn row(out: &mut String, name: &str, totals: &mut Totals) {
    let p50 = totals.percentile(50.0);
    let p95 = totals.percentile(95.0);
    let _ = writeln!(
        out,
        "{name:<24} {:>10} {:>8} {:>8} {p50:>10.1} {p95:>10.1}",
        totals.requests, totals.rate_limited, totals.errors
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut totals = Totals {
            latencies_ms: (1..=100).map(f64::from).rev().collect(),
            ..Totals::default()
        };
        assert_eq!(totals.percentile(50.0), 50.0);
        assert_eq!(totals.percentile(95.0), 95.0);
        assert_eq!(totals.percentile(100.0), 100.0);
        assert_eq!(Totals::default().percentile(50.0), 0.0);
    }
}
