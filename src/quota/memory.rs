//! Owns the in-process quota store: exact for one replica, and the fallback a replica
//! uses on its own while a shared store is unreachable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::calendar::{CalendarDay, DayCalendar};
use super::window::{ceil_secs, DayCounter, RollingMinute};
use super::{
    Admission, Decision, QuotaStore, StoreFuture, Subject, SubjectKind, SubjectUsage, Window,
    WindowUsage,
};
use crate::clock::Clock;

#[derive(Debug, Default, Clone)]
struct Counters {
    minute: RollingMinute,
    day: DayCounter,
}

#[derive(Debug, Default)]
struct Counts {
    teams: HashMap<Arc<str>, Counters>,
    keys: HashMap<Arc<str>, Counters>,
    upstream: Counters,
}

impl Counts {
    fn get(&self, subject: &Subject) -> Option<&Counters> {
        match subject.kind {
            SubjectKind::Team => self.teams.get(&*subject.id),
            SubjectKind::Key => self.keys.get(&*subject.id),
            SubjectKind::Upstream => Some(&self.upstream),
        }
    }

    fn get_mut(&mut self, subject: &Subject) -> &mut Counters {
        let map = match subject.kind {
            SubjectKind::Team => &mut self.teams,
            SubjectKind::Key => &mut self.keys,
            SubjectKind::Upstream => return &mut self.upstream,
        };
        // Look up by &str first so the common case clones no Arc.
        if !map.contains_key(&*subject.id) {
            map.insert(subject.id.clone(), Counters::default());
        }
        map.get_mut(&*subject.id).expect("inserted above")
    }
}

struct State {
    counts: Counts,
    today: CalendarDay,
}

/// Counters in a single mutex: a decision over team, key and ceiling is one short critical
/// section, so it is atomic without lock ordering.
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    calendar: DayCalendar,
    /// Divides every limit (the `local` outage mode: each of N replicas takes 1/N).
    divisor: u64,
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>, calendar: DayCalendar) -> Self {
        Self::with_divisor(clock, calendar, 1)
    }

    /// A store that enforces `limit / divisor` (at least 1) for every window.
    pub fn with_divisor(clock: Arc<dyn Clock>, calendar: DayCalendar, divisor: u64) -> Self {
        let today = calendar.day_at(clock.now());
        Self {
            clock,
            calendar,
            divisor: divisor.max(1),
            state: Mutex::new(State {
                counts: Counts::default(),
                today,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave counters half-written in a way that
        // matters more than refusing all traffic would, so recover the guard.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn scaled(&self, limit: u64) -> u64 {
        if self.divisor == 1 {
            limit
        } else {
            (limit / self.divisor).max(1)
        }
    }

    /// The decision itself, synchronous: usable directly by a caller that is not async.
    pub fn decide_now(&self, subjects: &[Subject]) -> Decision {
        let now = self.clock.now();
        let now_ms = now.as_millisecond();
        let second = now_ms.div_euclid(1000);
        let mut state = self.lock();
        if !state.today.contains(now_ms) {
            state.today = self.calendar.day_at(now);
        }
        let today = state.today;

        let mut denied_by = None;
        let mut retry_ms = 0i64;
        for subject in subjects {
            let counters = state.counts.get(subject);
            let rpm = self.scaled(subject.limits.rpm);
            let rpd = self.scaled(subject.limits.rpd);
            let minute_used = counters.map_or(0, |c| c.minute.used(second));
            let day_used = counters.map_or(0, |c| c.day.used(today.id));
            if minute_used >= rpm {
                denied_by.get_or_insert((subject.kind, Window::Minute));
                let wait = counters.map_or(60_000, |c| c.minute.millis_until_room(now_ms, rpm));
                retry_ms = retry_ms.max(wait);
            }
            if day_used >= rpd {
                denied_by.get_or_insert((subject.kind, Window::Day));
                retry_ms = retry_ms.max(today.end_ms - now_ms);
            }
        }

        let admission = if denied_by.is_none() {
            for subject in subjects {
                let counters = state.counts.get_mut(subject);
                counters.minute.add(second, 1);
                counters.day.add(today.id, 1);
            }
            Some(Admission {
                second,
                day: today.id,
                ceiling: None,
                local_fallback: false,
            })
        } else {
            None
        };

        let usage = self.usage_locked(&state, subjects, now_ms, second, today);
        Decision::new(admission, denied_by, retry_ms, usage)
    }

    fn usage_locked(
        &self,
        state: &State,
        subjects: &[Subject],
        now_ms: i64,
        second: i64,
        today: CalendarDay,
    ) -> Vec<SubjectUsage> {
        let day_reset = ceil_secs(today.end_ms - now_ms);
        subjects
            .iter()
            .map(|subject| {
                let (minute_used, day_used, minute_reset) = match state.counts.get(subject) {
                    Some(c) => (
                        c.minute.used(second),
                        c.day.used(today.id),
                        ceil_secs(c.minute.millis_until_oldest_expires(now_ms)),
                    ),
                    None => (0, 0, 60),
                };
                SubjectUsage {
                    kind: subject.kind,
                    minute: WindowUsage {
                        used: minute_used,
                        limit: self.scaled(subject.limits.rpm),
                        reset_secs: minute_reset,
                    },
                    day: WindowUsage {
                        used: day_used,
                        limit: self.scaled(subject.limits.rpd),
                        reset_secs: day_reset,
                    },
                }
            })
            .collect()
    }

    pub fn refund_now(&self, subjects: &[Subject], admission: Admission) {
        let mut state = self.lock();
        for subject in subjects {
            let counters = state.counts.get_mut(subject);
            counters.minute.remove(admission.second);
            counters.day.remove(admission.day);
        }
    }

    pub fn usage_now(&self, subjects: &[Subject]) -> Vec<SubjectUsage> {
        let now = self.clock.now();
        let now_ms = now.as_millisecond();
        let state = self.lock();
        let today = if state.today.contains(now_ms) {
            state.today
        } else {
            self.calendar.day_at(now)
        };
        self.usage_locked(&state, subjects, now_ms, now_ms.div_euclid(1000), today)
    }
}

impl QuotaStore for MemoryStore {
    fn decide<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Decision> {
        let decision = self.decide_now(subjects);
        Box::pin(std::future::ready(Ok(decision)))
    }

    fn refund<'a>(&'a self, subjects: &'a [Subject], admission: Admission) -> StoreFuture<'a, ()> {
        self.refund_now(subjects, admission);
        Box::pin(std::future::ready(Ok(())))
    }

    fn usage<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Vec<SubjectUsage>> {
        let usage = self.usage_now(subjects);
        Box::pin(std::future::ready(Ok(usage)))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::quota::Limits;
    use std::time::Duration;

    fn subject(kind: SubjectKind, id: &str, rpm: u64, rpd: u64) -> Subject {
        Subject {
            kind,
            id: id.into(),
            limits: Limits { rpm, rpd },
        }
    }

    fn store_at(at: &str) -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::new(at.parse().unwrap()));
        let store = MemoryStore::new(clock.clone(), DayCalendar::utc());
        (clock, store)
    }

    #[test]
    fn all_or_nothing_across_subjects() {
        let (_clock, store) = store_at("2026-11-27T10:00:00Z");
        let team = subject(SubjectKind::Team, "t", 10, 100);
        let key = subject(SubjectKind::Key, "k", 2, 100);
        let both = [team.clone(), key];
        assert!(store.decide_now(&both).admitted());
        assert!(store.decide_now(&both).admitted());
        let refused = store.decide_now(&both);
        assert_eq!(refused.denied_by, Some((SubjectKind::Key, Window::Minute)));
        // The refused request charged the team nothing.
        assert_eq!(
            store.usage_now(std::slice::from_ref(&team))[0].minute.used,
            2
        );
    }

    #[test]
    fn refund_gives_room_back() {
        let (_clock, store) = store_at("2026-11-27T10:00:00Z");
        let team = [subject(SubjectKind::Team, "t", 1, 100)];
        let admitted = store.decide_now(&team).admission.unwrap();
        assert!(!store.decide_now(&team).admitted());
        store.refund_now(&team, admitted);
        assert!(store.decide_now(&team).admitted());
        assert_eq!(store.usage_now(&team)[0].day.used, 1);
    }

    #[test]
    fn retry_after_points_at_room() {
        let (clock, store) = store_at("2026-11-27T10:00:00Z");
        let team = [subject(SubjectKind::Team, "t", 1, 100)];
        assert!(store.decide_now(&team).admitted());
        clock.advance(Duration::from_secs(20));
        let refused = store.decide_now(&team);
        assert_eq!(refused.retry_after_secs, 41);
        clock.advance(Duration::from_secs(41));
        assert!(store.decide_now(&team).admitted());
    }

    #[test]
    fn divisor_scales_limits() {
        let clock = Arc::new(ManualClock::new("2026-11-27T10:00:00Z".parse().unwrap()));
        let store = MemoryStore::with_divisor(clock, DayCalendar::utc(), 3);
        let team = [subject(SubjectKind::Team, "t", 10, 100)];
        let admitted = (0..10)
            .filter(|_| store.decide_now(&team).admitted())
            .count();
        assert_eq!(admitted, 3);
    }
}
