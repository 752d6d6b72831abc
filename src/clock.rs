//! Owns the notion of "now" for quota windows, so tests can move time instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};

use jiff::Timestamp;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;

    /// How far this clock runs ahead of the wall clock, in milliseconds. A shared store
    /// reads its own server's time (one clock for the fleet) and adds this, so tests can
    /// move a Redis-backed window without sleeping. The wall clock answers 0 by definition.
    fn offset_from_wall_ms(&self) -> i64 {
        0
    }
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to; shared by reference between a test and the gateway.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicI64,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self {
            millis: AtomicI64::new(start.as_millisecond()),
        }
    }

    pub fn set(&self, at: Timestamp) {
        self.millis.store(at.as_millisecond(), Ordering::SeqCst);
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.millis
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millisecond(self.millis.load(Ordering::SeqCst)).unwrap_or(Timestamp::MAX)
    }
}

/// The wall clock moved by an adjustable offset: time keeps running, from wherever a test
/// put it. Unlike [`ManualClock`] it also moves a shared store's clock (see
/// [`Clock::offset_from_wall_ms`]), so Redis-backed windows can be tested at any instant.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_ms: AtomicI64,
}

impl OffsetClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes "now" be `at` from this moment on.
    pub fn set(&self, at: Timestamp) {
        let offset = at.as_millisecond() - Timestamp::now().as_millisecond();
        self.offset_ms.store(offset, Ordering::SeqCst);
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let ms = Timestamp::now().as_millisecond() + self.offset_ms.load(Ordering::SeqCst);
        Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX)
    }

    fn offset_from_wall_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }
}
