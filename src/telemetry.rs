//! Owns the process's diagnostic log: tracing to stderr, human-readable on a terminal and
//! JSON otherwise, filtered by `KEYGATE_LOG` (default `info`). stdout stays free for the
//! usage log. Also: warnings a flood must not turn into a flood of lines.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("KEYGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("KEYGATE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // Already initialised (tests, embedding): keep the existing subscriber.
    let _ = result;
}

/// Lets a warning through at most once per wall-clock second: refusals under a flood (over
/// a connection or request cap) must not flood the log as well.
pub struct OncePerSecond(AtomicU64);

impl OncePerSecond {
    pub const fn new() -> Self {
        Self(AtomicU64::new(u64::MAX))
    }

    /// Whether to log now.
    pub fn ready(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.ready_at(now)
    }

    fn ready_at(&self, second: u64) -> bool {
        self.0.swap(second, Ordering::Relaxed) != second
    }
}

impl Default for OncePerSecond {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod once_per_second_tests {
    use super::*;

    #[test]
    fn one_warning_per_second() {
        let gate = OncePerSecond::new();
        assert!(gate.ready_at(0), "the first, even at the epoch");
        assert!(!gate.ready_at(0));
        assert!(gate.ready_at(1));
        assert!(!gate.ready_at(1));
        assert!(!gate.ready_at(1));
        assert!(gate.ready_at(5));
    }
}
