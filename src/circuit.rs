//! Owns the upstream circuit breaker: after a run of failed upstream calls keygate stops
//! sending for a cool-down and answers 503 at once, then lets a few probes through and
//! closes again on the first that succeeds.
//!
//! Lock-free on purpose: every proxied request asks it, so the closed state costs one
//! atomic load. Failures are consecutive (a success resets the run), which needs no time
//! window and still trips quickly on a dead upstream, the case that matters: requests
//! piling up for `upstream.timeout` each.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::CircuitPolicy;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// The `keygate_upstream_circuit_state` value.
    pub fn gauge(self) -> u8 {
        self as u8
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }
}

/// What one upstream call says about the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The upstream answered below 500 (a 4xx is the upstream working).
    Answered,
    /// Connect error, timeout, broken connection or 5xx.
    Failed,
}

pub struct CircuitBreaker {
    policy: CircuitPolicy,
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    /// Milliseconds after `epoch` when the circuit last opened.
    opened_at_ms: AtomicU64,
    probes_in_flight: AtomicU32,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

impl CircuitBreaker {
    pub fn new(policy: CircuitPolicy, metrics: Arc<Metrics>) -> Self {
        Self {
            policy,
            state: AtomicU8::new(CircuitState::Closed as u8),
            consecutive_failures: AtomicU32::new(0),
            opened_at_ms: AtomicU64::new(0),
            probes_in_flight: AtomicU32::new(0),
            epoch: Instant::now(),
            metrics,
        }
    }

    pub fn state(&self) -> CircuitState {
        CircuitState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Until when an open circuit stays open, from now; `None` unless open.
    pub fn open_for(&self) -> Option<Duration> {
        if self.state() != CircuitState::Open {
            return None;
        }
        Some(self.remaining_cooldown())
    }

    /// Asks to send one upstream call. `Err` carries the Retry-After seconds for the
    /// client's 503.
    pub fn admit(self: &Arc<Self>) -> Result<CircuitPermit, u64> {
        if !self.policy.enabled {
            return Ok(self.permit(false));
        }
        match self.state() {
            CircuitState::Closed => Ok(self.permit(false)),
            CircuitState::Open => {
                let remaining = self.remaining_cooldown();
                if !remaining.is_zero() {
                    return Err(retry_after_secs(remaining));
                }
                // One caller moves it to half-open; every caller then competes for probes.
                if self
                    .state
                    .compare_exchange(
                        CircuitState::Open as u8,
                        CircuitState::HalfOpen as u8,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    self.probes_in_flight.store(0, Ordering::Release);
                    self.metrics.set_circuit_state(CircuitState::HalfOpen);
                    tracing::info!("upstream circuit half-open: letting probes through");
                }
                self.admit_probe()
            }
            CircuitState::HalfOpen => self.admit_probe(),
        }
    }

    fn admit_probe(self: &Arc<Self>) -> Result<CircuitPermit, u64> {
        let taken = self.probes_in_flight.fetch_add(1, Ordering::AcqRel);
        if taken < self.policy.probes && self.state() == CircuitState::HalfOpen {
            Ok(self.permit(true))
        } else {
            self.release_probe();
            Err(retry_after_secs(self.remaining_cooldown()))
        }
    }

    /// Saturating: a reopen resets the count while older probes may still be out.
    fn release_probe(&self) {
        let _ = self
            .probes_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }

    fn permit(self: &Arc<Self>, probe: bool) -> CircuitPermit {
        CircuitPermit {
            breaker: self.clone(),
            probe,
            settled: false,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn remaining_cooldown(&self) -> Duration {
        let opened = self.opened_at_ms.load(Ordering::Acquire);
        let until = opened + self.policy.cooldown.as_millis() as u64;
        Duration::from_millis(until.saturating_sub(self.now_ms()))
    }

    fn open(&self, from: CircuitState) {
        self.opened_at_ms.store(self.now_ms(), Ordering::Release);
        if self
            .state
            .compare_exchange(
                from as u8,
                CircuitState::Open as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.metrics.set_circuit_state(CircuitState::Open);
            self.metrics.circuit_opened();
            tracing::warn!(
                cooldown_ms = self.policy.cooldown.as_millis() as u64,
                after_failures = self.consecutive_failures.load(Ordering::Relaxed),
                probe_failed = from == CircuitState::HalfOpen,
                "upstream circuit open: answering 503 at once for the cool-down"
            );
        }
    }

    fn record(&self, probe: bool, result: CallResult) {
        match result {
            CallResult::Answered => {
                self.consecutive_failures.store(0, Ordering::Release);
                if probe
                    && self
                        .state
                        .compare_exchange(
                            CircuitState::HalfOpen as u8,
                            CircuitState::Closed as u8,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                {
                    self.metrics.set_circuit_state(CircuitState::Closed);
                    tracing::info!("upstream circuit closed: a probe got an answer");
                }
            }
            CallResult::Failed => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
                if probe {
                    self.open(CircuitState::HalfOpen);
                } else if failures >= self.policy.failures {
                    self.open(CircuitState::Closed);
                }
            }
        }
    }
}

fn retry_after_secs(remaining: Duration) -> u64 {
    remaining.as_secs_f64().ceil().max(1.0) as u64
}

/// Leave to make one upstream call. Report what came of it with [`CircuitPermit::record`];
/// a permit dropped unreported (the call never happened) frees its probe slot.
pub struct CircuitPermit {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    settled: bool,
}

impl CircuitPermit {
    pub fn record(mut self, result: CallResult) {
        self.settled = true;
        if self.probe {
            self.breaker.release_probe();
        }
        if self.breaker.policy.enabled {
            self.breaker.record(self.probe, result);
        }
    }
}

impl Drop for CircuitPermit {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.release_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, cooldown_ms: u64, probes: u32) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(
            CircuitPolicy {
                enabled: true,
                failures,
                cooldown: Duration::from_millis(cooldown_ms),
                probes,
            },
            Arc::new(Metrics::default()),
        ))
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(3, 60_000, 1);
        for _ in 0..2 {
            b.admit().unwrap().record(CallResult::Failed);
        }
        b.admit().unwrap().record(CallResult::Answered);
        for _ in 0..2 {
            b.admit().unwrap().record(CallResult::Failed);
        }
        assert_eq!(b.state(), CircuitState::Closed);
        b.admit().unwrap().record(CallResult::Failed);
        assert_eq!(b.state(), CircuitState::Open);
        let retry_after = b.admit().err().unwrap();
        assert!((1..=60).contains(&retry_after));
    }

    #[test]
    fn half_open_lets_probes_through_and_closes_on_an_answer() {
        let b = breaker(1, 0, 2);
        b.admit().unwrap().record(CallResult::Failed);
        assert_eq!(b.state(), CircuitState::Open);
        let first = b.admit().unwrap();
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let second = b.admit().unwrap();
        assert!(b.admit().is_err(), "only two probes at once");
        drop(second);
        let third = b.admit().unwrap();
        third.record(CallResult::Answered);
        assert_eq!(b.state(), CircuitState::Closed);
        drop(first);
        assert!(b.admit().is_ok());
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = breaker(1, 0, 1);
        b.admit().unwrap().record(CallResult::Failed);
        let probe = b.admit().unwrap();
        probe.record(CallResult::Failed);
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn disabled_never_opens() {
        let b = Arc::new(CircuitBreaker::new(
            CircuitPolicy {
                enabled: false,
                ..CircuitPolicy::default()
            },
            Arc::new(Metrics::default()),
        ));
        for _ in 0..100 {
            b.admit().unwrap().record(CallResult::Failed);
        }
        assert_eq!(b.state(), CircuitState::Closed);
    }
}
