//! Owns local slices of quota (`store.local_slices`): room a replica takes from Redis ahead
//! of its requests, for the rest of one of Redis's seconds, so that a busy team's decisions
//! need no call to Redis, nor a hand-off to the store's thread, while its slice lasts.
//! A set is what one script run decides: a decision's subjects, or on Cluster under an
//! upstream ceiling each of its two groups (the ceiling's set is shared by every team).
//!
//! # Why no limit is ever passed
//!
//! A slice is charged in Redis before any of it is used, by the same script and in the same
//! call as a decision of its own: it is that decision made `1 + extra` times in a row, the
//! extra admissions kept here. Each is charged to the one-second bucket of Redis's time at
//! the call, and is only handed out while that second lasts: the slice's deadline is the
//! instant the call was sent plus what was left of Redis's second when the script ran, so
//! it falls at or before the real end of that second. An admission from a slice is then
//! exactly an admission that second would have counted, and the rolling minute and the
//! day see it where it belongs. A test clock moved meanwhile (another offset) voids it.
//!
//! # What it costs
//!
//! Slots a replica holds are used as far as every other replica can tell until the
//! second ends; then the unused ones are refunded to that bucket and day. A slice is
//! at most 1/[`ROOM_SHARE`] of the least room any of its windows had at the last answer,
//! sized to this replica's own demand for the rest of the second (its pace over the last
//! whole period, or over this one so far when that is faster); a set of subjects with
//! less than [`MIN_SLICE`] to take is decided call by call as before. So no more than the
//! limit is ever admitted, and under excess demand the limit is reached within a second
//! of the slices' refunds: a burst that ends within one second may be admitted that
//! many short of it. Off by default.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::calendar::CalendarDay;
use super::{SliceCounters, Subject};

/// A slice is at most this fraction of the least room left in its windows.
pub(crate) const ROOM_SHARE: u64 = 64;
/// Below this, a slice is not worth its call and its refund.
pub(crate) const MIN_SLICE: u64 = 16;
/// Most admissions one slice holds.
const MAX_SLICE: u64 = 1 << 16;
/// The period this replica's demand per set of subjects is counted over.
const PERIOD: Duration = Duration::from_secs(1);
/// The shortest span the current period's pace is read over: a handful of decisions at
/// one instant is not a rate of thousands a second.
const MIN_PACE_SPAN_MS: u64 = 100;

/// A set idle this long, with no slice and no ask, leaves the table at the next sweep.
const IDLE: Duration = Duration::from_secs(60);
/// The table is swept when it has grown past twice its size after the last sweep, and
/// never below this many sets: amortised, no scan on the hot path while it holds steady.
const SWEEP_FLOOR: usize = 1024;

/// The sets of subjects this replica has decided for lately, with their demand and slice.
#[derive(Default)]
pub(crate) struct Slices {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    sets: hashbrown::HashMap<Vec<Subject>, SetState>,
    /// Sets left after the last sweep.
    swept_to: usize,
    counters: SliceCounters,
}

impl Table {
    /// Forgets idle sets once the table has doubled: sets whose limits a reload changed
    /// (a subject carries its limits) or whose keys went away would otherwise stay for the
    /// life of the process.
    fn sweep_when_grown(&mut self, now: Instant) {
        if self.sets.len() <= (self.swept_to * 2).max(SWEEP_FLOOR) {
            return;
        }
        self.sets.retain(|_, state| {
            state.slice.is_some()
                || state.asking
                || state
                    .period_start
                    .is_some_and(|start| now.saturating_duration_since(start) < IDLE)
        });
        self.swept_to = self.sets.len();
    }
}

#[derive(Default)]
struct SetState {
    period_start: Option<Instant>,
    seen: u64,
    /// Decisions in the last whole period, per second.
    rate: u64,
    /// The least room any window had at the last answer from Redis.
    room: u64,
    /// A slice has been asked for and its call has not answered yet.
    asking: bool,
    slice: Option<Slice>,
    /// Grants so far: the live slice is the `generation`-th (its timer's token).
    generation: u64,
}

struct Slice {
    /// The script's answer for the slice's first admission.
    first: Vec<i64>,
    /// The second-bucket of Redis's time it was charged to, and the day.
    second: i64,
    day: CalendarDay,
    offset: i64,
    until: Instant,
    granted: u64,
    taken: u64,
}

/// An admission taken from a slice: the `index`-th of the slice, whose first admission the
/// script answered `first`.
pub(crate) struct Slot {
    pub first: Vec<i64>,
    pub index: u64,
    pub day: CalendarDay,
}

/// What a decision does.
pub(crate) enum Take {
    Slot(Slot),
    /// Ask Redis, and for a slice with it.
    Ask(SliceAsk),
    /// Ask Redis for this decision alone.
    Alone,
}

/// Unused admissions of a slice whose second is over, to be refunded to its bucket and day.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unused {
    pub count: u64,
    pub second: i64,
    pub day: i64,
}

/// A slice granted: when its second is over, [`Slices::expire`] with `generation`.
pub(crate) struct Granted {
    pub until: Instant,
    pub generation: u64,
    /// A slice it replaced before that one's timer ran.
    pub replaced: Option<Unused>,
}

impl Slices {
    /// An admission from this replica's slice for `subjects`, or what to ask Redis.
    /// `ms_left`: this replica's estimate of what is left of Redis's current second, read
    /// only when a slice is to be asked for.
    pub(crate) fn take(
        self: &Arc<Self>,
        subjects: &[Subject],
        offset: i64,
        ms_left: impl FnOnce() -> i64,
        now: Instant,
    ) -> Take {
        let mut guard = self.lock();
        let table = &mut *guard;
        table.sweep_when_grown(now);
        let state = table.sets.entry_ref(subjects).or_default();
        let start = *state.period_start.get_or_insert(now);
        let mut elapsed = now.saturating_duration_since(start);
        if elapsed >= PERIOD {
            state.rate = state.seen * 1000 / (elapsed.as_millis() as u64).max(1);
            state.seen = 0;
            state.period_start = Some(now);
            elapsed = Duration::ZERO;
        }
        state.seen += 1;
        if let Some(slice) = state.slice.as_mut() {
            if slice.offset == offset && now < slice.until && slice.taken < slice.granted {
                let index = slice.taken;
                slice.taken += 1;
                table.counters.served += 1;
                return Take::Slot(Slot {
                    first: slice.first.clone(),
                    index,
                    day: slice.day,
                });
            }
        }
        if state.asking {
            return Take::Alone;
        }
        // The current period's pace counts too: a team that has just turned busy (or whose
        // first second this is) would otherwise get slices sized to the few decisions seen
        // so far, each spent at once, and ask call after call while its demand is known.
        let pace = state.seen * 1000 / (elapsed.as_millis() as u64).max(MIN_PACE_SPAN_MS);
        let demand = state.rate.max(pace) * ms_left().clamp(0, 1000) as u64 / 1000;
        let extra = demand.min(state.room / ROOM_SHARE).min(MAX_SLICE);
        if extra < MIN_SLICE {
            return Take::Alone;
        }
        state.asking = true;
        Take::Ask(SliceAsk {
            slices: self.clone(),
            subjects: subjects.into(),
            extra,
        })
    }

    /// Learns the least room left in `subjects`' windows from an answer of Redis's.
    pub(crate) fn learn_room(&self, subjects: &[Subject], room: u64) {
        if let Some(state) = self.lock().sets.get_mut(subjects) {
            state.room = room;
        }
    }

    /// Ends a slice whose second is over, unless a newer one replaced it: its unused
    /// admissions, if any.
    pub(crate) fn expire(&self, subjects: &[Subject], generation: u64) -> Option<Unused> {
        let mut guard = self.lock();
        let table = &mut *guard;
        let state = table.sets.get_mut(subjects)?;
        if state.generation != generation {
            return None;
        }
        let unused = state.slice.take().and_then(Slice::unused)?;
        table.counters.returned += unused.count;
        Some(unused)
    }

    pub(crate) fn counters(&self) -> SliceCounters {
        self.lock().counters
    }

    /// Ends every live slice now, for a replica that stops: their timers would never run.
    /// Each set's unused admissions with the clock offset they were charged under.
    pub(crate) fn release(&self) -> Vec<(Vec<Subject>, i64, Unused)> {
        let mut guard = self.lock();
        let table = &mut *guard;
        let released: Vec<_> = table
            .sets
            .iter_mut()
            .filter_map(|(subjects, state)| {
                let slice = state.slice.take()?;
                let offset = slice.offset;
                Some((subjects.clone(), offset, slice.unused()?))
            })
            .collect();
        table.counters.returned += released.iter().map(|(_, _, u)| u.count).sum::<u64>();
        released
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Slice {
    fn unused(self) -> Option<Unused> {
        let count = self.granted - self.taken;
        (count > 0).then_some(Unused {
            count,
            second: self.second,
            day: self.day.id,
        })
    }
}

/// A decision that asks Redis for `extra` more admissions for this replica's slice. Dropped
/// without a grant (refused, failed, its caller gone before the call left), the set may
/// ask again.
pub(crate) struct SliceAsk {
    slices: Arc<Slices>,
    subjects: Box<[Subject]>,
    pub extra: u64,
}

impl SliceAsk {
    /// Keeps `granted` admissions, the first answered `first`, charged at `charged_at_ms`
    /// of Redis's time (clock offset included) and `day`, by a call sent at `sent`.
    pub(crate) fn grant(
        &self,
        (first, granted): (Vec<i64>, u64),
        charged_at_ms: i64,
        day: CalendarDay,
        offset: i64,
        sent: Instant,
    ) -> Option<Granted> {
        let ms_left = 1000 - charged_at_ms.rem_euclid(1000);
        let until = sent + Duration::from_millis(ms_left as u64);
        let mut guard = self.slices.lock();
        let table = &mut *guard;
        let state = table.sets.get_mut(&self.subjects[..])?;
        state.generation += 1;
        let generation = state.generation;
        let replaced = state
            .slice
            .replace(Slice {
                first,
                second: charged_at_ms.div_euclid(1000),
                day,
                offset,
                until,
                granted,
                taken: 0,
            })
            .and_then(Slice::unused);
        table.counters.granted += granted;
        table.counters.returned += replaced.as_ref().map_or(0, |u| u.count);
        Some(Granted {
            until,
            generation,
            replaced,
        })
    }

    pub(crate) fn subjects(&self) -> &[Subject] {
        &self.subjects
    }

    pub(crate) fn slices(&self) -> &Arc<Slices> {
        &self.slices
    }
}

impl Drop for SliceAsk {
    fn drop(&mut self) {
        if let Some(state) = self.slices.lock().sets.get_mut(&self.subjects[..]) {
            state.asking = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::{Limits, SubjectKind};

    fn team(id: &str) -> Vec<Subject> {
        vec![Subject {
            kind: SubjectKind::Team,
            id: id.into(),
            limits: Limits {
                rpm: 1_000_000,
                rpd: 1_000_000,
            },
        }]
    }

    fn day() -> CalendarDay {
        crate::quota::calendar::DayCalendar::utc().day_at(jiff::Timestamp::UNIX_EPOCH)
    }

    /// A set that has seen `rate` decisions in its last second with `room` left.
    fn busy(slices: &Arc<Slices>, subjects: &[Subject], rate: u64, room: u64, t0: Instant) {
        for _ in 0..rate {
            assert!(matches!(slices.take(subjects, 0, || 1000, t0), Take::Alone));
        }
        slices.learn_room(subjects, room);
    }

    /// A set busy at `rate` a second, with plenty of room, asking for a slice a second
    /// later with `ms_left` of Redis's second left: the set and that instant.
    fn asking(rate: u64, ms_left: i64) -> (Arc<Slices>, Vec<Subject>, SliceAsk, Instant) {
        let slices = Arc::new(Slices::default());
        let alpha = team("alpha");
        let t0 = Instant::now();
        busy(&slices, &alpha, rate, 1_000_000, t0);
        let t1 = t0 + PERIOD;
        let Take::Ask(ask) = slices.take(&alpha, 0, || ms_left, t1) else {
            panic!("a busy set with room asks for a slice")
        };
        (slices, alpha, ask, t1)
    }

    /// Grants `count` admissions for `ask`, charged at `charged_at_ms` of Redis's time under
    /// clock offset `offset` by a call sent at `sent`; the ask is done with.
    fn grant(ask: SliceAsk, charged_at_ms: i64, count: u64, offset: i64, sent: Instant) -> Granted {
        let first = vec![1, charged_at_ms, 0, 0, 0, 1, 60_000, 1];
        ask.grant((first, count), charged_at_ms, day(), offset, sent)
            .expect("the set is in the table")
    }

    fn unused(count: u64, second: i64) -> Unused {
        Unused {
            count,
            second,
            day: day().id,
        }
    }

    #[test]
    fn the_script_caps_a_slice_at_the_same_share() {
        let script = include_str!("redis_quota.lua");
        assert!(script.contains(&format!("local SLICE_SHARE = {ROOM_SHARE}\n")));
    }

    #[test]
    fn a_slice_is_sized_by_demand_and_room_and_lasts_its_second() {
        // Half a second left of Redis's: half of the last second's demand.
        let (slices, alpha, ask, t1) = asking(1000, 500);
        assert_eq!(ask.extra, 500);
        // One ask at a time.
        assert!(matches!(slices.take(&alpha, 0, || 500, t1), Take::Alone));
        // Redis ran the script 300 ms before its second's end.
        let first = vec![1, 5_000_700, 0, 0, 0, 10, 60_000, 10];
        let granted = ask.grant((first, 3), 5_000_700, day(), 0, t1).unwrap();
        assert_eq!(granted.until, t1 + Duration::from_millis(300));
        assert!(granted.replaced.is_none());
        for index in 0..3 {
            let Take::Slot(slot) = slices.take(&alpha, 0, || 500, t1) else {
                panic!("slot {index}")
            };
            assert_eq!(slot.index, index);
            assert_eq!(slot.first[5], 10);
        }
        assert!(matches!(slices.take(&alpha, 0, || 500, t1), Take::Alone));
        assert_eq!(slices.expire(&alpha, granted.generation), None, "all used");
    }

    #[test]
    fn unused_slots_come_back_once_and_never_after_the_deadline() {
        let (slices, alpha, ask, t1) = asking(100, 1000);
        let granted = grant(ask, 7_000_000, 50, 0, t1);
        assert!(matches!(slices.take(&alpha, 0, || 1000, t1), Take::Slot(_)));
        // Another clock offset (a test moved time) cannot use it.
        assert!(!matches!(
            slices.take(&alpha, 5, || 1000, t1),
            Take::Slot(_)
        ));
        // At the deadline the slice is over, whether or not its timer ran yet.
        let end = t1 + Duration::from_millis(1000);
        assert!(!matches!(
            slices.take(&alpha, 0, || 1000, end),
            Take::Slot(_)
        ));
        assert_eq!(
            slices.expire(&alpha, granted.generation),
            Some(unused(49, 7_000))
        );
        assert_eq!(slices.expire(&alpha, granted.generation), None);
    }

    #[test]
    fn a_stopping_replica_releases_live_slices_once() {
        let (slices, alpha, ask, t1) = asking(100, 1000);
        let granted = grant(ask, 3_000_250, 40, 7, t1);
        assert!(matches!(slices.take(&alpha, 7, || 1000, t1), Take::Slot(_)));
        assert_eq!(
            slices.release(),
            vec![(alpha.clone(), 7, unused(39, 3_000))]
        );
        assert!(slices.release().is_empty());
        assert_eq!(slices.counters().returned, 39);
        // The slice's timer, should it still run, has nothing left to refund.
        assert_eq!(slices.expire(&alpha, granted.generation), None);
    }

    #[test]
    fn idle_sets_leave_the_table_once_it_has_grown() {
        let (slices, alpha, ask, t1) = asking(100, 1000);
        for i in 1..=SWEEP_FLOOR {
            let _ = slices.take(&team(&format!("idle-{i}")), 0, || 1000, t1);
        }
        assert_eq!(slices.lock().sets.len(), SWEEP_FLOOR + 1, "no sweep yet");
        // A minute on, the next new set sweeps every idle one; one asking stays.
        let _ = slices.take(&team("new"), 0, || 1000, t1 + IDLE);
        let table = slices.lock();
        assert!(table.sets.contains_key(&alpha[..]), "an asking set stays");
        assert!(table.sets.contains_key(&team("new")[..]));
        assert_eq!((table.sets.len(), table.swept_to), (2, 1));
        drop(table);
        drop(ask);
    }

    #[test]
    fn a_set_turning_busy_gets_a_slice_at_its_pace_so_far() {
        let slices = Arc::new(Slices::default());
        let alpha = team("alpha");
        let t0 = Instant::now();
        // Its first period: 100 decisions in the first 250 ms, then 500 ms of Redis's
        // second left: 400 a second for half a second, not the 100 seen so far halved.
        for i in 0..100 {
            let at = t0 + Duration::from_micros(2_500 * i);
            assert!(matches!(slices.take(&alpha, 0, || 500, at), Take::Alone));
        }
        slices.learn_room(&alpha, 1_000_000);
        let Take::Ask(ask) = slices.take(&alpha, 0, || 500, t0 + Duration::from_millis(250)) else {
            panic!("a busy set with room asks for a slice")
        };
        assert_eq!(ask.extra, 202);
        drop(ask);
        // A burst at one instant is read over the least span, not as thousands a second.
        let beta = team("beta");
        for _ in 0..30 {
            let _ = slices.take(&beta, 0, || 1000, t0);
        }
        slices.learn_room(&beta, 1_000_000);
        let Take::Ask(ask) = slices.take(&beta, 0, || 1000, t0) else {
            panic!("a burst with room asks for a slice")
        };
        assert_eq!(ask.extra, 31 * 1000 / MIN_PACE_SPAN_MS);
    }

    #[test]
    fn little_room_or_demand_means_no_slice() {
        let slices = Arc::new(Slices::default());
        let t0 = Instant::now();
        let t1 = t0 + PERIOD;
        let quiet = team("quiet");
        busy(&slices, &quiet, MIN_SLICE - 1, 1_000_000, t0);
        assert!(matches!(slices.take(&quiet, 0, || 1000, t1), Take::Alone));
        // Busy, but 1/64 of the room left is under the least slice.
        let full = team("full");
        busy(&slices, &full, 1000, ROOM_SHARE * MIN_SLICE - 1, t0);
        assert!(matches!(slices.take(&full, 0, || 1000, t1), Take::Alone));
        busy(&slices, &full, 0, ROOM_SHARE * MIN_SLICE, t0);
        let Take::Ask(ask) = slices.take(&full, 0, || 1000, t1) else {
            panic!("room for the least slice")
        };
        assert_eq!(ask.extra, MIN_SLICE);
    }

    #[test]
    fn a_grant_replacing_a_slice_before_its_timer_hands_back_its_unused_slots() {
        let (slices, alpha, ask, t1) = asking(1000, 1000);
        let old = grant(ask, 9_000_500, 20, 0, t1);
        for _ in 0..5 {
            assert!(matches!(slices.take(&alpha, 0, || 1000, t1), Take::Slot(_)));
        }
        // Its second is over and its timer has not run yet: the next decision asks anew.
        let t2 = old.until;
        let Take::Ask(ask) = slices.take(&alpha, 0, || 1000, t2) else {
            panic!("an ended slice asks again")
        };
        let new = grant(ask, 9_001_000, 30, 0, t2);
        assert_eq!(
            new.replaced,
            Some(unused(15, 9_000)),
            "the old slice's rest, once"
        );
        assert_eq!(slices.expire(&alpha, old.generation), None);
        let counted = |returned| SliceCounters {
            granted: 50,
            served: 5,
            returned,
        };
        assert_eq!(slices.counters(), counted(15));
        assert_eq!(
            slices.expire(&alpha, new.generation).map(|u| u.count),
            Some(30)
        );
        assert_eq!(
            slices.counters(),
            counted(45),
            "granted = served + returned"
        );
    }
}
