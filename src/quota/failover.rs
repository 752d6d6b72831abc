//! Owns what a replica does when its quota store fails: the `store.timeout` bound on every
//! call, the `store.on_error` mode while the store is unreachable or slow, the degraded
//! state ([`StoreHealth`], read by `/readyz`, metrics and alerts), and noticing that the
//! store is back.
//!
//! The first failed call puts the replica in degraded mode (logged once), and so does a
//! slow one once the store has not answered any call for twice `store.timeout`: a burst
//! that makes a few decisions late while the store keeps answering is not an outage, and
//! only those late requests fall back. From then on no request waits for the store:
//! `local` decides from this replica's memory with every limit divided by
//! `store.expected_replicas`, `open` admits, `closed` refuses (503). A
//! background probe reconnects with exponential backoff and, once the store runs a script
//! within `store.timeout` again, shared counting resumes by itself (logged once).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::watch;

use super::calendar::DayCalendar;
use super::memory::MemoryStore;
use super::{
    Admission, Decision, LastAnswer, QuotaStore, StoreError, StoreFuture, Subject, SubjectUsage,
};
use crate::clock::Clock;
use crate::config::{OnStoreError, StoreConfig};

/// First wait before probing a store that just failed.
const PROBE_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between two probes.
const PROBE_MAX: Duration = Duration::from_secs(2);
/// Opening a fresh connection may take longer than a decision may; the store only counts
/// as back when it then answers within `store.timeout`.
const RECONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// An outage that starts this soon after a recovery continues the previous backoff, so a
/// store that answers probes but fails under traffic does not flap at the probe rate.
const FLAP_WINDOW: Duration = Duration::from_secs(30);

/// The store's health as the rest of the gateway sees it.
pub struct StoreHealth {
    kind: &'static str,
    mode: OnStoreError,
    degraded: AtomicBool,
    errors: AtomicU64,
    state: Mutex<HealthState>,
    changes: watch::Sender<bool>,
}

#[derive(Default)]
struct HealthState {
    since: Option<Timestamp>,
    started: Option<Instant>,
    last_error: Option<String>,
    recovered_at: Option<Instant>,
    next_wait: Option<Duration>,
}

impl StoreHealth {
    pub fn new(kind: &'static str, mode: OnStoreError) -> Self {
        Self {
            kind,
            mode,
            degraded: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            state: Mutex::new(HealthState::default()),
            changes: watch::channel(false).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while the shared store is not asked and `store.on_error` decides.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// The most recent store error (kept after recovery, for diagnosis).
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// When the current outage began; `None` while healthy.
    pub fn degraded_since(&self) -> Option<Timestamp> {
        self.lock().since
    }

    /// How long the current outage has lasted; `None` while healthy.
    pub fn down_for(&self) -> Option<Duration> {
        self.lock().started.map(|s| s.elapsed())
    }

    /// Failed or timed-out store calls and probes since start.
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn mode(&self) -> OnStoreError {
        self.mode
    }

    /// `memory`, `redis` or `redis-cluster`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Sees every transition: `true` when degraded mode begins, `false` when it ends.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Counts a call that was late while the store kept answering others: no outage.
    fn record_late(&self, error: &StoreError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.lock().last_error = Some(error.to_string());
    }

    /// Counts an error; `Some(first probe wait)` when it began an outage.
    fn record_error(&self, error: &StoreError, at: Timestamp) -> Option<Duration> {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.last_error = Some(error.to_string());
        if self.degraded.swap(true, Ordering::AcqRel) {
            return None;
        }
        state.since = Some(at);
        state.started = Some(Instant::now());
        let flapping = state
            .recovered_at
            .is_some_and(|r| r.elapsed() < FLAP_WINDOW);
        let wait = match (flapping, state.next_wait) {
            (true, Some(wait)) => wait,
            _ => PROBE_FIRST,
        };
        drop(state);
        self.changes.send_replace(true);
        Some(wait)
    }

    fn record_probe_failure(&self, error: &StoreError, next_wait: Duration) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.last_error = Some(error.to_string());
        state.next_wait = Some(next_wait);
    }

    /// Ends the outage.
    fn record_recovery(&self, next_wait: Duration) {
        let mut state = self.lock();
        state.since = None;
        state.started = None;
        state.recovered_at = Some(Instant::now());
        state.next_wait = Some(next_wait);
        self.degraded.store(false, Ordering::Release);
        drop(state);
        self.changes.send_replace(false);
    }
}

/// `keygate_store_errors_total` and `keygate_store_degraded` come from here.
impl crate::metrics::StoreHealthView for StoreHealth {
    fn errors_total(&self) -> u64 {
        self.error_count()
    }

    fn degraded(&self) -> bool {
        self.is_degraded()
    }
}

/// A quota store behind `store.timeout` and `store.on_error`.
pub struct FailoverStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<dyn QuotaStore>,
    /// Where the store is, without credentials, for the log.
    location: String,
    /// This replica's own counters: only with `on_error = "local"`.
    local: Option<MemoryStore>,
    timeout: Duration,
    expected_replicas: u64,
    health: Arc<StoreHealth>,
    clock: Arc<dyn Clock>,
    /// When the store last answered a call made here, within its timeout.
    last_answer: LastAnswer,
}

impl FailoverStore {
    pub fn new(
        shared: Arc<dyn QuotaStore>,
        settings: &StoreConfig,
        clock: Arc<dyn Clock>,
        calendar: DayCalendar,
    ) -> Self {
        let local = (settings.on_error == OnStoreError::Local).then(|| {
            MemoryStore::with_divisor(clock.clone(), calendar, settings.expected_replicas)
        });
        let health = Arc::new(StoreHealth::new(shared.kind(), settings.on_error));
        Self {
            inner: Arc::new(Inner {
                shared,
                location: crate::shared_redis::redacted(&settings.url),
                local,
                timeout: settings.timeout,
                expected_replicas: settings.expected_replicas,
                health,
                clock,
                last_answer: LastAnswer::new(),
            }),
        }
    }

    pub fn health(&self) -> Arc<StoreHealth> {
        self.inner.health.clone()
    }
}

impl Inner {
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.timeout)))
    }

    fn answered(&self) {
        self.last_answer.record();
    }

    /// Whether the store has answered nothing for twice the timeout (or never): neither a
    /// call made here within its timeout, nor any call at all as the store itself saw it
    /// (a burst queues decisions behind each other, and those that wait past the timeout
    /// still see the store answering the calls ahead of them).
    fn silent(&self) -> bool {
        let limit = 2 * self.timeout;
        let silent_since = |since: Option<Duration>| since.is_none_or(|since| since > limit);
        silent_since(self.last_answer.since()) && silent_since(self.shared.since_last_answer())
    }

    fn not_asked(&self) -> StoreError {
        StoreError::Degraded(self.health.last_error().unwrap_or_default())
    }

    /// The `on_error` answer: a local decision, or the error (`open`/`closed` decide).
    fn fallback_decision(
        &self,
        subjects: &[Subject],
        error: StoreError,
    ) -> Result<Decision, StoreError> {
        let local = self.local.as_ref().ok_or(error)?;
        let mut decision = local.decide_now(subjects);
        if let Some(admission) = decision.admission.as_mut() {
            admission.local_fallback = true;
        }
        Ok(decision)
    }
}

/// Records a failure and, when it began an outage, logs it once and starts the probe. A
/// late answer from a store that keeps answering other calls is only counted.
fn fail(inner: &Arc<Inner>, error: &StoreError) {
    if matches!(error, StoreError::Timeout(_)) && !inner.silent() {
        inner.health.record_late(error);
        return;
    }
    let Some(first_wait) = inner.health.record_error(error, inner.clock.now()) else {
        return;
    };
    let consequence = match inner.health.mode() {
        OnStoreError::Local => format!(
            "each replica enforces every limit / {} from its own memory",
            inner.expected_replicas
        ),
        OnStoreError::Open => "requests are admitted without quota".to_string(),
        OnStoreError::Closed => "requests are refused with 503".to_string(),
    };
    tracing::warn!(
        store = inner.health.kind(),
        location = %inner.location,
        mode = inner.health.mode().as_str(),
        %error,
        "quota store unreachable: degraded mode, {consequence}, until it answers again"
    );
    tokio::spawn(probe(Arc::downgrade(inner), first_wait));
}

/// Reconnects with exponential backoff until the store answers within the timeout.
async fn probe(inner: Weak<Inner>, first_wait: Duration) {
    let mut wait = first_wait;
    loop {
        tokio::time::sleep(wait).await;
        // The gateway may be gone (shutdown): then so is the probe.
        let Some(inner) = inner.upgrade() else { return };
        let next_wait = (wait * 2).min(PROBE_MAX);
        let reconnected = tokio::time::timeout(
            RECONNECT_TIMEOUT.max(inner.timeout),
            inner.shared.reconnect(),
        )
        .await
        .unwrap_or(Err(StoreError::Timeout(
            RECONNECT_TIMEOUT.max(inner.timeout),
        )));
        // Back means: answers a (read-only) script call as fast as a decision must be.
        let answered = match reconnected {
            Ok(()) => inner.bounded(inner.shared.usage(&[])).await.map(|_| ()),
            Err(error) => Err(error),
        };
        match answered {
            Ok(()) => {
                // Logged before the state flips, so whoever sees the recovery finds its line.
                let down_for = inner.health.down_for().unwrap_or_default();
                tracing::info!(
                    store = inner.health.kind(),
                    location = %inner.location,
                    down_for_ms = down_for.as_millis() as u64,
                    "quota store answers again: shared counting resumed"
                );
                inner.health.record_recovery(wait);
                return;
            }
            Err(error) => inner.health.record_probe_failure(&error, next_wait),
        }
        wait = next_wait;
    }
}

impl QuotaStore for FailoverStore {
    fn decide<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Decision> {
        Box::pin(async move {
            let inner = &self.inner;
            if inner.health.is_degraded() {
                return inner.fallback_decision(subjects, inner.not_asked());
            }
            match inner.bounded(inner.shared.decide(subjects)).await {
                Ok(decision) => {
                    inner.answered();
                    Ok(decision)
                }
                Err(error) => {
                    fail(inner, &error);
                    inner.fallback_decision(subjects, error)
                }
            }
        })
    }

    fn refund<'a>(&'a self, subjects: &'a [Subject], admission: Admission) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            if admission.local_fallback {
                if let Some(local) = &inner.local {
                    local.refund_now(subjects, admission);
                }
                return Ok(());
            }
            if inner.health.is_degraded() {
                return Err(inner.not_asked());
            }
            let refunded = inner
                .bounded(inner.shared.refund(subjects, admission))
                .await;
            match &refunded {
                Ok(()) => inner.answered(),
                Err(error) => fail(inner, error),
            }
            refunded
        })
    }

    fn usage<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Vec<SubjectUsage>> {
        Box::pin(async move {
            let inner = &self.inner;
            let error = if inner.health.is_degraded() {
                inner.not_asked()
            } else {
                match inner.bounded(inner.shared.usage(subjects)).await {
                    Ok(usage) => {
                        inner.answered();
                        return Ok(usage);
                    }
                    Err(error) => {
                        fail(inner, &error);
                        error
                    }
                }
            };
            match &inner.local {
                Some(local) => Ok(local.usage_now(subjects)),
                None => Err(error),
            }
        })
    }

    fn release(&self) -> StoreFuture<'_, ()> {
        self.inner.shared.release()
    }

    fn slice_counters(&self) -> Option<super::SliceCounters> {
        self.inner.shared.slice_counters()
    }

    fn kind(&self) -> &'static str {
        self.inner.shared.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::StoreUrl;
    use crate::quota::{Limits, SubjectKind};
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;

    /// A store that fails while `down` is set, and counts the calls it gets. While
    /// `answering` is set it says it answered a call a moment ago (to callers before these).
    struct Flaky {
        down: AtomicBool,
        slow: AtomicBool,
        answering: AtomicBool,
        /// When set, the next decision's answer waits for this signal.
        held: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
        calls: AtomicUsize,
        memory: MemoryStore,
    }

    impl QuotaStore for Flaky {
        fn decide<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Decision> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let result = if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unreachable("connection refused".into()))
            } else {
                Ok(self.memory.decide_now(subjects))
            };
            let slow = self.slow.load(Ordering::SeqCst);
            let held = self.held.lock().unwrap().take();
            Box::pin(async move {
                if slow {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                if let Some(signal) = held {
                    let _ = signal.await;
                }
                result
            })
        }
        fn refund<'a>(&'a self, s: &'a [Subject], a: Admission) -> StoreFuture<'a, ()> {
            self.memory.refund_now(s, a);
            Box::pin(std::future::ready(Ok(())))
        }
        fn usage<'a>(&'a self, s: &'a [Subject]) -> StoreFuture<'a, Vec<SubjectUsage>> {
            let result = if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unreachable("connection refused".into()))
            } else {
                Ok(self.memory.usage_now(s))
            };
            Box::pin(std::future::ready(result))
        }
        fn since_last_answer(&self) -> Option<Duration> {
            self.answering
                .load(Ordering::SeqCst)
                .then_some(Duration::ZERO)
        }
        fn kind(&self) -> &'static str {
            "flaky"
        }
    }

    fn setup(mode: OnStoreError) -> (Arc<Flaky>, FailoverStore) {
        let clock = Arc::new(ManualClock::new("2026-11-27T10:00:00Z".parse().unwrap()));
        let flaky = Arc::new(Flaky {
            down: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            answering: AtomicBool::new(false),
            held: Mutex::new(None),
            calls: AtomicUsize::new(0),
            memory: MemoryStore::new(clock.clone(), DayCalendar::utc()),
        });
        let settings = StoreConfig {
            url: StoreUrl::Memory,
            on_error: mode,
            timeout: Duration::from_millis(50),
            expected_replicas: 4,
            local_slices: false,
        };
        let store = FailoverStore::new(flaky.clone(), &settings, clock, DayCalendar::utc());
        (flaky, store)
    }

    fn team(rpm: u64) -> [Subject; 1] {
        [Subject {
            kind: SubjectKind::Team,
            id: "t".into(),
            limits: Limits { rpm, rpd: 1000 },
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn local_mode_divides_limits_and_stops_asking_the_store() {
        let (flaky, store) = setup(OnStoreError::Local);
        let subjects = team(40);
        assert!(store.decide(&subjects).await.unwrap().admitted());
        flaky.down.store(true, Ordering::SeqCst);
        let mut admitted = 0;
        for _ in 0..20 {
            let decision = store.decide(&subjects).await.unwrap();
            if let Some(admission) = decision.admission {
                assert!(admission.local_fallback);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10, "40 / 4 replicas");
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            2,
            "one failed call, then none"
        );
        let health = store.health();
        assert!(health.is_degraded());
        assert_eq!(health.error_count(), 1);
        assert!(health.last_error().unwrap().contains("connection refused"));
        assert!(health.degraded_since().is_some());

        flaky.down.store(false, Ordering::SeqCst);
        let mut changes = health.subscribe();
        tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|d| !*d))
            .await
            .expect("the probe notices the store is back")
            .unwrap();
        assert!(!health.is_degraded());
        assert!(health.degraded_since().is_none());
        let decision = store.decide(&subjects).await.unwrap();
        assert!(!decision.admission.unwrap().local_fallback);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_store_is_given_up_after_the_timeout() {
        let (flaky, store) = setup(OnStoreError::Closed);
        flaky.slow.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let error = store.decide(&team(10)).await.unwrap_err();
        assert!(matches!(error, StoreError::Timeout(_)), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        let error = store.decide(&team(10)).await.unwrap_err();
        assert!(matches!(error, StoreError::Degraded(_)), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_before_the_timeout_counts_though_the_caller_resumes_after_it() {
        let (flaky, store) = setup(OnStoreError::Closed);
        let (answer, held) = tokio::sync::oneshot::channel();
        *flaky.held.lock().unwrap() = Some(held);
        let subjects = team(10);
        let mut asking = std::pin::pin!(store.decide(&subjects));
        let first = std::future::poll_fn(|cx| Poll::Ready(asking.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "waiting for the store");
        // The answer comes 10 ms in, but the caller (a busy worker thread) only looks again
        // at 100 ms, when the 50 ms timer has fired too. The answer is there, so it is the
        // decision: the timeout stands in only for an answer that is not.
        tokio::time::advance(Duration::from_millis(10)).await;
        answer.send(()).unwrap();
        tokio::time::advance(Duration::from_millis(90)).await;
        let again = std::future::poll_fn(|cx| Poll::Ready(asking.as_mut().poll(cx))).await;
        let Poll::Ready(decided) = again else {
            panic!("the answer is in")
        };
        assert!(decided
            .expect("the store's answer, not a timeout")
            .admitted());
        assert_eq!(store.health().error_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_call_while_the_store_keeps_answering_is_no_outage() {
        let (flaky, store) = setup(OnStoreError::Closed);
        let health = store.health();
        store.decide(&team(10)).await.unwrap();
        // One late decision (a burst): it falls back, counted, but the replica stays shared.
        flaky.slow.store(true, Ordering::SeqCst);
        let error = store.decide(&team(10)).await.unwrap_err();
        assert!(matches!(error, StoreError::Timeout(_)), "{error}");
        assert!(!health.is_degraded());
        assert_eq!(health.error_count(), 1);
        flaky.slow.store(false, Ordering::SeqCst);
        store.decide(&team(10)).await.unwrap();
        // Silent for longer than twice the timeout: that is an outage.
        flaky.slow.store(true, Ordering::SeqCst);
        store.decide(&team(10)).await.unwrap_err();
        assert!(!health.is_degraded(), "50 ms of silence");
        store.decide(&team(10)).await.unwrap_err();
        assert!(!health.is_degraded(), "100 ms of silence");
        store.decide(&team(10)).await.unwrap_err();
        assert!(health.is_degraded(), "150 ms of silence");
        let error = store.decide(&team(10)).await.unwrap_err();
        assert!(matches!(error, StoreError::Degraded(_)), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_late_behind_a_burst_while_the_store_answers_are_no_outage() {
        let (flaky, store) = setup(OnStoreError::Closed);
        let health = store.health();
        store.decide(&team(10)).await.unwrap();
        // Every call made here comes back late, but the store keeps answering the calls
        // queued ahead of them.
        flaky.slow.store(true, Ordering::SeqCst);
        flaky.answering.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            let error = store.decide(&team(10)).await.unwrap_err();
            assert!(matches!(error, StoreError::Timeout(_)), "{error}");
        }
        assert!(
            !health.is_degraded(),
            "250 ms of late calls, the store answering"
        );
        assert_eq!(health.error_count(), 5, "each late call is still counted");
        // The store's own answers stop as well: that is an outage.
        flaky.answering.store(false, Ordering::SeqCst);
        store.decide(&team(10)).await.unwrap_err();
        assert!(health.is_degraded());
    }

    #[tokio::test(start_paused = true)]
    async fn local_refunds_go_to_the_local_counters() {
        let (flaky, store) = setup(OnStoreError::Local);
        flaky.down.store(true, Ordering::SeqCst);
        let subjects = team(4);
        let admission = store.decide(&subjects).await.unwrap().admission.unwrap();
        assert!(
            !store.decide(&subjects).await.unwrap().admitted(),
            "4 / 4 = 1"
        );
        store.refund(&subjects, admission).await.unwrap();
        assert!(store.decide(&subjects).await.unwrap().admitted());
    }
}
