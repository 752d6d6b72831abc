//! Owns quota decisions: who is counted (team, key override, upstream ceiling), the
//! [`QuotaStore`] contract every backend implements, and the report a decision yields
//! for headers and logs.
//!
//! A decision is all-or-nothing over every subject of a request: either each subject's
//! minute and day window has room and all are charged, or nothing is charged.

pub mod calendar;
pub mod failover;
pub mod memory;
pub mod redis;
pub mod report;
pub(crate) mod slices;
pub mod window;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use report::QuotaReport;

/// The two windows a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Day,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Day => "day",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    pub rpm: u64,
    pub rpd: u64,
}

/// What a counter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectKind {
    Team,
    /// A key with its own tighter `rpm`/`rpd`.
    Key,
    /// The upstream key's own plan, over all teams and replicas.
    Upstream,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Team => "team",
            SubjectKind::Key => "key",
            SubjectKind::Upstream => "upstream",
        }
    }
}

/// One counted thing with its limits. Built once per key when the config loads, so a
/// decision allocates nothing to describe what it counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    pub kind: SubjectKind,
    pub id: Arc<str>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowUsage {
    pub used: u64,
    pub limit: u64,
    /// Seconds until this window gives room back (minute: the oldest counted request
    /// leaves; day: the day ends).
    pub reset_secs: u64,
}

impl WindowUsage {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectUsage {
    pub kind: SubjectKind,
    pub minute: WindowUsage,
    pub day: WindowUsage,
}

/// Where an admission was charged, so a refund takes back exactly that charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The one-second bucket of the rolling minute.
    pub second: i64,
    /// The calendar day id (`yyyymmdd`).
    pub day: i64,
    /// The upstream ceiling's own charge when it was counted apart from the team, on another
    /// clock (Redis Cluster keeps it on another node); `None`: it is `second` and `day`.
    pub ceiling: Option<Charge>,
    /// Charged to this replica's own memory while the shared store was unreachable
    /// (`store.on_error = "local"`), so the refund goes there too.
    pub local_fallback: bool,
}

/// One bucket and day a charge went into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub second: i64,
    pub day: i64,
}

#[derive(Debug, Clone)]
pub struct Decision {
    /// `Some` when admitted and charged.
    pub admission: Option<Admission>,
    /// The first subject and window that had no room, when refused.
    pub denied_by: Option<(SubjectKind, Window)>,
    /// When refused: seconds until every refusing window has room again.
    pub retry_after_secs: u64,
    /// Usage of each subject after the decision, in the request's subject order.
    pub usage: Vec<SubjectUsage>,
}

impl Decision {
    /// A decision from its parts; `retry_ms` (the longest wait of any refusing window) is
    /// only reported when refused, in whole seconds, never 0.
    pub fn new(
        admission: Option<Admission>,
        denied_by: Option<(SubjectKind, Window)>,
        retry_ms: i64,
        usage: Vec<SubjectUsage>,
    ) -> Self {
        Self {
            admission,
            denied_by,
            retry_after_secs: if admission.is_some() {
                0
            } else {
                window::ceil_secs(retry_ms)
            },
            usage,
        }
    }

    pub fn admitted(&self) -> bool {
        self.admission.is_some()
    }

    pub fn report(&self) -> QuotaReport {
        QuotaReport::from_usage(&self.usage)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("store unreachable: {0}")]
    Unreachable(String),
    #[error("store answered unexpectedly: {0}")]
    Protocol(String),
    /// Not asked: the store is in an outage (degraded mode); the last error it gave.
    #[error("store degraded, not asked (last error: {0})")]
    Degraded(String),
}

/// When a store last answered a call, for telling a slow store from a silent one. Tokio's
/// clock, so that tests with paused time see the same silence the replica does.
pub(crate) struct LastAnswer {
    epoch: tokio::time::Instant,
    /// Milliseconds after `epoch`, plus one; 0 before the first answer.
    at_ms: std::sync::atomic::AtomicU64,
}

impl LastAnswer {
    pub(crate) fn new() -> LastAnswer {
        LastAnswer {
            epoch: tokio::time::Instant::now(),
            at_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub(crate) fn record(&self) {
        self.at_ms
            .fetch_max(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How long ago the last answer came; `None` before the first.
    pub(crate) fn since(&self) -> Option<std::time::Duration> {
        let at = self.at_ms.load(std::sync::atomic::Ordering::Relaxed);
        (at > 0).then(|| std::time::Duration::from_millis(self.now_ms().saturating_sub(at)))
    }
}

/// What a replica's local slices of quota (`store.local_slices`) did since it started, in
/// admissions: granted by the store = served + returned + held now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SliceCounters {
    /// Granted by the store into this replica's slices.
    pub granted: u64,
    /// Answered from a slice, with no call to the store.
    pub served: u64,
    /// Given back unused (the slice's second over, a newer slice, or shutdown).
    pub returned: u64,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A place where quota counters live. The memory store serves one process; a shared store
/// (Redis) makes the same decisions exact across replicas.
pub trait QuotaStore: Send + Sync + 'static {
    /// Checks every subject's minute and day window and, when all have room, charges each
    /// one: atomically with respect to every other decision on the same store.
    fn decide<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Decision>;

    /// Takes back an admission whose upstream call failed.
    fn refund<'a>(&'a self, subjects: &'a [Subject], admission: Admission) -> StoreFuture<'a, ()>;

    /// Current usage without charging anything.
    fn usage<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Vec<SubjectUsage>>;

    /// Opens a fresh connection and checks the store answers on it: how a replica finds
    /// out that a shared store is back. Stores without a connection answer at once.
    fn reconnect(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// How long ago the store last answered any call, even one whose caller had stopped
    /// waiting; `None` when it does not know. A store whose answers come late because its
    /// callers queue (a burst) is still answering, and that is no outage.
    fn since_last_answer(&self) -> Option<std::time::Duration> {
        None
    }

    /// Gives back what this replica took ahead of its requests (local slices of quota), as
    /// it stops: nothing would once the process is gone. Stores that take nothing ahead
    /// answer at once.
    fn release(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// What local slices of quota did, for `/metrics`; `None` when the store takes none.
    fn slice_counters(&self) -> Option<SliceCounters> {
        None
    }

    /// A short name for logs and `/readyz`: `memory`, `redis`, `redis-cluster`.
    fn kind(&self) -> &'static str;
}
