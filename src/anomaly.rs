//! Owns anomaly detection over usage records: one [`Detector`], fed live by the usage log
//! writer and offline by `keygate usage anomalies`, so both find the same things.
//!
//! Signals (each fires at most once per subject per [`COOLDOWN_MINUTES`]):
//! - `rate_spike`: a key's requests this minute reach `rate_factor` × its baseline (an
//!   exponentially weighted mean over its active minutes) and at least `rate_min`.
//! - `invalid_tokens`: one client address sent `invalid_tokens_per_minute` 401s this minute.
//! - `new_client_ip`: a key is used from an address it was never used from.
//! - `upstream_errors`: `upstream_errors_per_minute` upstream failures this minute.
//! - `dev_key_volume`: a key of env `dev` reaches `dev_key_rpm` requests this minute.
//!
//! Per-key judgements start after the key's warm-up (its first `warmup` of history), so a
//! restart or the start of a log does not flag every key's first address.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use jiff::Timestamp;
use serde::Serialize;

use crate::config::AnomalyConfig;
use crate::usage_log::UsageRecord;

/// A signal for the same subject is not raised again within this many minutes.
pub const COOLDOWN_MINUTES: i64 = 10;

/// Weight of the newest active minute in a key's baseline: about the last 20 active
/// minutes count.
const BASELINE_ALPHA: f64 = 0.1;

/// Addresses remembered per key. A key seen from more than this many addresses is not one
/// where a new address means anything; it stops being judged for it.
const MAX_ADDRESSES_PER_KEY: usize = 4096;

/// Client addresses tracked for invalid tokens before stale ones are forgotten.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    RateSpike,
    InvalidTokens,
    NewClientIp,
    UpstreamErrors,
    DevKeyVolume,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::RateSpike => "rate_spike",
            Signal::InvalidTokens => "invalid_tokens",
            Signal::NewClientIp => "new_client_ip",
            Signal::UpstreamErrors => "upstream_errors",
            Signal::DevKeyVolume => "dev_key_volume",
        }
    }
}

/// One anomaly: what was seen, against what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub at: Timestamp,
    pub signal: Signal,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub client_ip: Option<String>,
    /// Requests this minute, or (`new_client_ip`) 1.
    pub observed: f64,
    /// The baseline or threshold `observed` is judged against; (`new_client_ip`) how many
    /// addresses the key was known from.
    pub baseline: f64,
}

impl Finding {
    fn observed_text(&self) -> String {
        match self.signal {
            Signal::NewClientIp => {
                format!("new address {}", self.client_ip.as_deref().unwrap_or("-"))
            }
            _ => format!("{}/min", trim_float(self.observed)),
        }
    }

    fn baseline_text(&self) -> String {
        match self.signal {
            Signal::RateSpike => format!("{}/min", trim_float(self.baseline)),
            Signal::NewClientIp => format!("{} known addresses", self.baseline),
            _ => format!("threshold {}/min", trim_float(self.baseline)),
        }
    }

    /// One line for a human (the alert's `text`, Slack-compatible).
    pub fn summary(&self) -> String {
        let subject = match (&self.key_id, &self.team, &self.client_ip) {
            (Some(key), Some(team), _) => format!("key {key} (team {team})"),
            (Some(key), None, _) => format!("key {key}"),
            (None, _, Some(ip)) => format!("client {ip}"),
            _ => "the upstream".to_string(),
        };
        let from = match (self.signal, &self.client_ip, &self.key_id) {
            (Signal::RateSpike | Signal::DevKeyVolume, Some(ip), _) => format!(" from {ip}"),
            _ => String::new(),
        };
        format!(
            "keygate anomaly {}: {subject}{from}: {} vs {}",
            self.signal.as_str(),
            self.observed_text(),
            self.baseline_text()
        )
    }
}

/// The offline command's line: time, key id, team, signal, observed vs baseline.
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0} key={} team={} signal={} observed={} baseline={}",
            self.at,
            self.key_id.as_deref().unwrap_or("-"),
            self.team.as_deref().unwrap_or("-"),
            self.signal.as_str(),
            self.observed_text().replace(' ', "_"),
            self.baseline_text().replace(' ', "_"),
        )?;
        if let Some(ip) = &self.client_ip {
            write!(f, " client_ip={ip}")?;
        }
        Ok(())
    }
}

fn trim_float(value: f64) -> String {
    let rounded = (value * 10.0).round() / 10.0;
    if rounded == rounded.trunc() {
        format!("{rounded:.0}")
    } else {
        format!("{rounded:.1}")
    }
}

/// Requests in the current minute, for one subject.
#[derive(Debug, Default)]
struct MinuteCount {
    minute: i64,
    count: u64,
    last_fired: Option<i64>,
}

impl MinuteCount {
    /// Counts one request in minute `m` and returns the count of the previous minute when
    /// `m` started a new one. A late line (an earlier minute) counts in the current one.
    fn add(&mut self, m: i64) -> Option<u64> {
        let closed = if m > self.minute {
            let closed = (self.count > 0).then_some(self.count);
            self.minute = m;
            self.count = 0;
            closed
        } else {
            None
        };
        self.count += 1;
        closed
    }

    /// True once per cooldown, the first time `condition` holds.
    fn fire(&mut self, condition: bool) -> bool {
        let cooled = self
            .last_fired
            .is_none_or(|at| self.minute - at >= COOLDOWN_MINUTES);
        if condition && cooled {
            self.last_fired = Some(self.minute);
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct KeyState {
    first_seen_ms: i64,
    rate: MinuteCount,
    dev: MinuteCount,
    /// Exponentially weighted mean of the key's requests per active minute.
    baseline: Option<f64>,
    addresses: HashSet<String>,
}

/// Detection state over a stream of usage records, in (roughly) time order.
pub struct Detector {
    settings: AnomalyConfig,
    warmup_ms: i64,
    keys: HashMap<Arc<str>, KeyState>,
    addresses: HashMap<String, MinuteCount>,
    upstream: MinuteCount,
}

impl Detector {
    pub fn new(settings: AnomalyConfig) -> Self {
        Self {
            warmup_ms: i64::try_from(settings.warmup.as_millis()).unwrap_or(i64::MAX),
            settings,
            keys: HashMap::new(),
            addresses: HashMap::new(),
            upstream: MinuteCount::default(),
        }
    }

    /// Takes one record; appends what it reveals to `findings`.
    pub fn observe(&mut self, record: &UsageRecord, findings: &mut Vec<Finding>) {
        let ms = record.ts.as_millisecond();
        let minute = ms.div_euclid(60_000);
        let finding = |signal, observed: u64, baseline: f64, ip: bool| Finding {
            at: record.ts,
            signal,
            team: record.team.as_deref().map(str::to_string),
            key_id: record.key_id.as_deref().map(str::to_string),
            client_ip: ip.then(|| record.client_ip.clone()),
            observed: observed as f64,
            baseline,
        };

        if record.outcome == "unauthorized" {
            if self.addresses.len() >= MAX_TRACKED_ADDRESSES {
                self.addresses
                    .retain(|_, c| minute - c.minute < COOLDOWN_MINUTES);
            }
            let address = self.addresses.entry(record.client_ip.clone()).or_default();
            address.add(minute);
            let limit = self.settings.invalid_tokens_per_minute;
            if address.fire(address.count >= limit) {
                findings.push(finding(
                    Signal::InvalidTokens,
                    address.count,
                    limit as f64,
                    true,
                ));
            }
        }

        if matches!(&*record.outcome, "upstream_error" | "upstream_timeout") {
            self.upstream.add(minute);
            let limit = self.settings.upstream_errors_per_minute;
            if self.upstream.fire(self.upstream.count >= limit) {
                findings.push(Finding {
                    team: None,
                    key_id: None,
                    ..finding(
                        Signal::UpstreamErrors,
                        self.upstream.count,
                        limit as f64,
                        false,
                    )
                });
            }
        }

        let Some(key_id) = &record.key_id else {
            return;
        };
        let key = self.keys.entry(key_id.clone()).or_insert_with(|| KeyState {
            first_seen_ms: ms,
            rate: MinuteCount::default(),
            dev: MinuteCount::default(),
            baseline: None,
            addresses: HashSet::new(),
        });
        let warmed = ms - key.first_seen_ms >= self.warmup_ms;

        if !key.addresses.contains(&record.client_ip) && key.addresses.len() < MAX_ADDRESSES_PER_KEY
        {
            if warmed {
                findings.push(finding(
                    Signal::NewClientIp,
                    1,
                    key.addresses.len() as f64,
                    true,
                ));
            }
            key.addresses.insert(record.client_ip.clone());
        }

        if let Some(closed) = key.rate.add(minute) {
            let sample = closed as f64;
            key.baseline = Some(match key.baseline {
                None => sample,
                Some(mean) => mean + BASELINE_ALPHA * (sample - mean),
            });
        }
        if let Some(baseline) = key.baseline {
            let count = key.rate.count;
            let threshold =
                (self.settings.rate_factor * baseline).max(self.settings.rate_min as f64);
            if warmed && key.rate.fire(count as f64 >= threshold) {
                findings.push(finding(Signal::RateSpike, count, baseline, true));
            }
        }

        if record.env.as_deref() == Some("dev") {
            key.dev.add(minute);
            let limit = self.settings.dev_key_rpm;
            if key.dev.fire(key.dev.count >= limit) {
                findings.push(finding(
                    Signal::DevKeyVolume,
                    key.dev.count,
                    limit as f64,
                    true,
                ));
            }
        }
    }
}

/// Runs the detector over records in order and returns every finding.
pub fn detect_all<'a>(
    settings: AnomalyConfig,
    records: impl IntoIterator<Item = &'a UsageRecord>,
) -> Vec<Finding> {
    let mut detector = Detector::new(settings);
    let mut findings = Vec::new();
    for record in records {
        detector.observe(record, &mut findings);
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(ts: &str, key: Option<(&str, &str, &str)>, ip: &str, outcome: &str) -> UsageRecord {
        UsageRecord {
            ts: ts.parse().unwrap(),
            request_id: "r".into(),
            team: key.map(|k| k.1.into()),
            key_id: key.map(|k| k.0.into()),
            env: key.map(|k| k.2.into()),
            method: "POST".into(),
            path: "/v1/text-to-image".into(),
            route: None,
            status: 200,
            upstream_status: None,
            outcome: outcome.to_string().into(),
            latency_ms: 1.0,
            upstream_latency_ms: None,
            bytes_in: 0,
            bytes_out: 0,
            client_ip: ip.into(),
            user_agent: None,
            minute_used: None,
            minute_limit: None,
            day_used: None,
            day_limit: None,
        }
    }

    fn settings() -> AnomalyConfig {
        AnomalyConfig {
            warmup: Duration::from_secs(600),
            invalid_tokens_per_minute: 5,
            upstream_errors_per_minute: 3,
            dev_key_rpm: 10,
            ..AnomalyConfig::default()
        }
    }

    #[test]
    fn invalid_tokens_fire_once_per_address_and_cooldown() {
        let records: Vec<_> = (0..12)
            .map(|i| {
                record(
                    &format!("2026-01-01T00:00:{i:02}Z"),
                    None,
                    "10.9.9.9",
                    "unauthorized",
                )
            })
            .collect();
        let findings = detect_all(settings(), &records);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].signal, Signal::InvalidTokens);
        assert_eq!(findings[0].observed, 5.0);
        assert_eq!(findings[0].client_ip.as_deref(), Some("10.9.9.9"));
    }

    #[test]
    fn a_dev_key_at_production_volume_is_flagged() {
        let key = Some(("d1", "design", "dev"));
        let records: Vec<_> = (0..15)
            .map(|i| {
                record(
                    &format!("2026-01-01T00:00:{i:02}Z"),
                    key,
                    "10.0.0.1",
                    "forwarded",
                )
            })
            .collect();
        let findings = detect_all(settings(), &records);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].signal, Signal::DevKeyVolume);
        assert_eq!(findings[0].key_id.as_deref(), Some("d1"));
    }

    #[test]
    fn upstream_error_bursts_are_flagged_without_a_key() {
        let key = Some(("k1", "design", "prod"));
        let records: Vec<_> = (0..4)
            .map(|i| {
                record(
                    &format!("2026-01-01T00:00:{i:02}Z"),
                    key,
                    "10.0.0.1",
                    "upstream_error",
                )
            })
            .collect();
        let findings = detect_all(settings(), &records);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].signal, Signal::UpstreamErrors);
        assert_eq!(findings[0].key_id, None);
    }

    #[test]
    fn warm_up_learns_addresses_silently() {
        let key = Some(("k1", "design", "prod"));
        let records = vec![
            record("2026-01-01T00:00:00Z", key, "10.0.0.1", "forwarded"),
            record("2026-01-01T00:05:00Z", key, "10.0.0.2", "forwarded"),
            record("2026-01-01T00:11:00Z", key, "10.0.0.2", "forwarded"),
            record("2026-01-01T00:12:00Z", key, "10.0.0.3", "forwarded"),
            record("2026-01-01T00:13:00Z", key, "10.0.0.3", "forwarded"),
        ];
        let findings = detect_all(settings(), &records);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].signal, Signal::NewClientIp);
        assert_eq!(findings[0].client_ip.as_deref(), Some("10.0.0.3"));
        assert_eq!(findings[0].baseline, 2.0);
        assert!(findings[0].to_string().starts_with(
            "2026-01-01T00:12:00Z key=k1 team=design signal=new_client_ip observed=new_address_10.0.0.3 baseline=2_known_addresses"
        ), "{}", findings[0]);
    }
}
