//! Owns the count of proxied requests being served and its cap,
//! `server.max_requests_in_flight`: what bounds a replica's memory when HTTP/2 clients
//! multiply each connection by its streams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::telemetry::OncePerSecond;

/// Requests being served, against a fixed cap. A request that finds the cap reached is
/// refused at once, never queued: so an atomic count, not a semaphore (tokio's takes a
/// lock on every release to look for waiters there would never be).
pub struct InFlight {
    count: AtomicUsize,
    limit: usize,
    refusals_logged: OncePerSecond,
}

/// One request's place under the cap, given back when dropped.
pub struct InFlightSlot(Arc<InFlight>);

impl InFlight {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            limit,
            refusals_logged: OncePerSecond::new(),
        })
    }

    /// A slot, or `None` when `limit` requests hold one (and a warning, once a second at
    /// most).
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlightSlot> {
        let entered = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            });
        if entered.is_err() && self.refusals_logged.ready() {
            tracing::warn!(
                limit = self.limit,
                "requests refused: server.max_requests_in_flight reached"
            );
        }
        entered.ok().map(|_| InFlightSlot(self.clone()))
    }

    pub fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_and_a_dropped_slot_comes_back() {
        let in_flight = InFlight::new(2);
        let first = in_flight.try_enter().expect("room for two");
        let _second = in_flight.try_enter().expect("room for two");
        assert!(in_flight.try_enter().is_none(), "the third is refused");
        assert_eq!(in_flight.current(), 2, "a refusal holds nothing");
        drop(first);
        assert_eq!(in_flight.current(), 1);
        assert!(in_flight.try_enter().is_some());
    }

    #[test]
    fn threads_racing_for_slots_never_pass_the_cap() {
        let in_flight = InFlight::new(1);
        // Counted apart from the cap's own count: slots actually held at once (a check
        // and an increment that were not one step would let a second in now and then).
        let (held, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(slot) = in_flight.try_enter() {
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            // Held across a switch, so that others try meanwhile.
                            std::thread::yield_now();
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert_eq!(peak.load(Ordering::SeqCst), 1);
        assert_eq!(in_flight.current(), 0, "every slot given back");
    }
}
