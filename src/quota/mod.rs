//! Owns quota decisions: who is counted (team, key override, upstream ceiling), the
//! [`QuotaStore`] contract every backend implements, and the report a decision yields
//! for headers and logs.
//!
//! A decision is all-or-nothing over every subject of a request: either each subject's
//! minute and day window has room and all are charged, or nothing is charged.

pub mod calendar;
pub mod memory;
pub mod report;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
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

    /// A short name for logs and `/readyz`: `memory`, `redis`, `redis-cluster`.
    fn kind(&self) -> &'static str;
}
