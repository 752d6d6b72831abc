//! Owns the quota store a fleet shares: the same decisions as the memory store, made
//! atomically inside Redis so N replicas on one Redis (or one Redis Cluster) never admit
//! more than a limit, and under excess demand admit exactly the limit.
//!
//! # One script, less than one round trip
//!
//! A decision is one decision of an `EVALSHA` of `redis_quota.lua`: it reads every subject's
//! rolling minute and calendar day, and either charges all of them or none. Redis runs a
//! script alone, so concurrent decisions from any number of replicas are serialised there.
//!
//! Decisions do not each pay a round trip: decisions that arrive while a call is in flight
//! wait and then go out together as one call (a `Batcher` per store on a single Redis; on
//! Cluster one per hash tag, as a call may only touch one slot).
//! The script runs them one after the other, each seeing the charges of those before it, so
//! the answers are those of as many calls in a row: exactly the limit is admitted under
//! excess demand, never more. A batch only forms under load, so an idle gateway still sends
//! each decision at once; a decision whose caller gave up (`store.timeout`) before its batch
//! left is dropped from it rather than charged behind the caller's back. Identical
//! decisions in a call (a team's concurrent requests: same subjects, limits, clock and
//! day) go in once with their number: the script admits as many as every window has room
//! for and refuses the rest, and the answer says so in a line the replica expands, each
//! decision getting the answer it would have had alone (any order of concurrent decisions
//! is one they could have arrived in). Redis's work then grows with the teams in a call,
//! not with the requests. The script replicates `memory.rs` exactly: 61 one-second buckets
//! (the current second and the 60 before it), refusal order (subject by subject, minute
//! before day), `Retry-After` and the reset of each window. Refunds and `usage()` are the
//! same script with another verb.
//!
//! Each subject is one hash: a field per second that holds admissions (at most 61; a
//! bucket is deleted by the first call after it leaves the window), the running sum `n`
//! and oldest bucket `o` of those fields, the eviction mark `e`, and `d`/`dn` (the day and
//! its count). A decision reads five fields and touches only the buckets that left the
//! window since the last call, so its cost does not depend on the limit or the traffic;
//! the state is at most 66 small fields, and expires a minute after the day it counts ends.
//!
//! With `store.local_slices`, a busy team's decision also asks for extra admissions in the
//! same run (the script's `optional`, after that decision's own admissions, capped to a
//! share of the room they leave), which the replica hands out for the rest of that second
//! of Redis's without a call: `quota/slices.rs` (crate-private).
//!
//! # A thread of its own
//!
//! Every call to Redis, and the connection's own tasks, run on one thread of the store's
//! (`keygate-quota`, [`crate::event_loop`]), never on the runtime that serves requests.
//! There a batch call and the connection's reads waited their turn behind every ready
//! request task at each step: a burst of 5000 new connections on a slow machine made
//! decisions miss `store.timeout` by the thousand, and the store's answers came so late
//! that the replica judged it down and answered everyone `503` for seconds while Redis was
//! healthy. On its own thread a call goes out and its answer comes back whatever the
//! request runtime has queued; the price is a wake-up between threads a call
//! (PERFORMANCE.md, session 5).
//!
//! # One clock
//!
//! Windows are judged by the Redis server's `TIME`, read inside the script, never by a
//! replica's clock: replicas with skewed clocks cannot widen a window, and a Redis clock
//! that steps back cannot reopen one (a hash remembers the latest second it was charged at).
//!
//! The calendar day lives in `quotas.day_tz`, which Lua cannot resolve. The replica sends
//! the day it believes current — its id and exact start and end instants, computed with the
//! zone's rules (so DST days are 23 or 25 hours) — and the script checks that Redis's
//! `TIME` falls inside it. If not (the replica's clock is off near midnight) the script
//! answers with its own time, the replica computes that instant's day and asks again. The
//! replica also learns its skew from every answer, so the second try is only needed when
//! the skew changes near a midnight. The day reset in the headers is therefore exact.
//!
//! # Keys and Redis Cluster
//!
//! `kg:q:{t:<team>}` is the team's hash and `kg:q:{t:<team>}:k:<key id>` a key override's:
//! one hash tag, so one slot, so one script call on Cluster too. Names are escaped so no
//! team or key id can forge another's key or tag.
//!
//! The upstream ceiling (`kg:q:{upstream}`) counts every team, so on Cluster it lives in
//! another slot than most teams and cannot join their script. There a decision is two
//! scripts in a fixed order: first the team (and key), then the ceiling. When the ceiling
//! refuses, the team's charge is refunded to the exact bucket it went into (compensation).
//! Never more than a limit is admitted: each window is checked and charged atomically on
//! its own node. The price is a transient charge that can refuse a concurrent request of
//! the same team for the instant between the two calls (under-admission, never over), and
//! a second round trip only where a ceiling is configured on Cluster. A team refusal still
//! asks the ceiling for its usage, read-only, so headers and `Retry-After` stay the memory
//! store's. Team first: requests a team may not send anyway never touch the fleet-wide
//! counter. On a single Redis everything is one script and one round trip.
//!
//! Each node of a Cluster has its own clock, so the ceiling's charge is recorded with the
//! second and day of its own node ([`Admission::ceiling`]) and refunded there.
//!
//! # Moving time in tests
//!
//! The script adds `Clock::offset_from_wall_ms` to `TIME`. The wall clock `keygate serve`
//! runs on answers 0 by definition, and nothing a request, the config, the environment or
//! the admin API carries can change the clock a process runs on: only code that builds a
//! gateway in-process (tests) can hand it an [`crate::clock::OffsetClock`]. With it, tests
//! cross minute and day boundaries against a real Redis without sleeping.

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind, ToRedisArgs};
use tokio::sync::oneshot;

use super::calendar::{CalendarDay, DayCalendar};
use super::slices::{SliceAsk, Slices, Take};
use super::window::ceil_secs;
use super::{
    Admission, Charge, Decision, LastAnswer, QuotaStore, StoreError, StoreFuture, Subject,
    SubjectKind, SubjectUsage, Window, WindowUsage,
};
use crate::clock::Clock;
use crate::config::StoreUrl;
use crate::event_loop::EventLoop;
use crate::shared_redis::SharedRedis;

const SCRIPT: &str = include_str!("redis_quota.lua");

/// How often a decision may be told "not that day" before the store gives up: once for a
/// replica whose clock is off near midnight, once more if midnight passes in between.
const DAY_ATTEMPTS: usize = 3;

/// Batch calls in flight at once per store: one, so every decision that arrives meanwhile
/// joins the next call.
const CALLS_IN_FLIGHT: usize = 1;
/// Most decisions in one call: bounds how long one script holds Redis (~5 µs each).
const MAX_BATCH: usize = 128;

pub struct RedisStore {
    url: StoreUrl,
    connection: Arc<ArcSwap<SharedRedis>>,
    script: Arc<Script>,
    /// Where decisions wait to be coalesced into calls.
    batching: Batching,
    clock: Arc<dyn Clock>,
    calendar: DayCalendar,
    /// Redis's time minus this replica's, learned from every answer.
    skew_ms: AtomicI64,
    /// The day most recently used, so a decision computes no time zone rules.
    today: Mutex<Option<CalendarDay>>,
    /// When Redis last answered a decision's script call, whoever still waited for it.
    answers: Arc<LastAnswer>,
    /// The thread every call to Redis runs on, with the connection's own tasks (see "A
    /// thread of its own" above).
    io: EventLoop,
    /// Room taken ahead of requests (`store.local_slices`, [`super::slices`]); `None`: off.
    slices: Option<Arc<Slices>>,
}

/// Which verb the script runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Decide,
    Usage,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Decide => "decide",
            Verb::Usage => "usage",
        }
    }
}

/// One script answer over one group of subjects.
struct Answer {
    admitted: bool,
    now_ms: i64,
    retry_ms: i64,
    /// Index into the group and window of the first refusal.
    denied: Option<(usize, Window)>,
    day: CalendarDay,
    /// Per subject of the group: minute used, minute reset ms, day used.
    windows: Vec<(u64, i64, u64)>,
}

impl Answer {
    fn charge(&self) -> Charge {
        Charge {
            second: self.now_ms.div_euclid(1000),
            day: self.day.id,
        }
    }
}

impl RedisStore {
    /// A store on the Redis (or Cluster) a URL names. Connects lazily: see
    /// [`SharedRedis::open`].
    pub fn open(
        url: &StoreUrl,
        clock: Arc<dyn Clock>,
        calendar: DayCalendar,
    ) -> Result<Self, String> {
        let io = EventLoop::start("keygate-quota".into(), || {})
            .map_err(|e| format!("cannot start the quota store's thread: {e}"))?;
        // Entered so that the tasks redis-rs spawns for the connection run on that thread.
        let connection = {
            let _on_io = io.handle().enter();
            SharedRedis::open(url)?.ok_or_else(|| "memory:// is not a Redis URL".to_string())?
        };
        let cluster = connection.is_cluster();
        let connection = Arc::new(ArcSwap::from_pointee(connection));
        let script = Arc::new(Script::new(SCRIPT));
        let answers = Arc::new(LastAnswer::new());
        let batching = if cluster {
            Batching::PerTag(Mutex::new(hashbrown::HashMap::new()))
        } else {
            Batching::One(Batcher::new(&connection, &script, &answers, &io))
        };
        Ok(Self {
            url: url.clone(),
            connection,
            script,
            batching,
            clock,
            calendar,
            skew_ms: AtomicI64::new(0),
            today: Mutex::new(None),
            answers,
            io,
            slices: None,
        })
    }

    /// Takes local slices of quota ahead of requests (`store.local_slices`): see
    /// `quota/slices.rs`.
    pub fn with_local_slices(mut self, on: bool) -> Self {
        self.slices = on.then(Arc::default);
        self
    }

    /// Runs a call to Redis on the store's own thread and waits for it there. Not
    /// cancelled with the caller: a refund or a usage read, once sent, is seen through.
    async fn on_io<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.io.handle().spawn(call).await.unwrap_or_else(|_| {
            Err(StoreError::Unreachable(
                "the quota store's thread stopped".into(),
            ))
        })
    }

    fn connection(&self) -> SharedRedis {
        SharedRedis::clone(&self.connection.load())
    }

    /// On Cluster the batching is per hash tag (set once, from the connection's kind).
    fn is_cluster(&self) -> bool {
        matches!(self.batching, Batching::PerTag(_))
    }

    /// Script calls that carried decisions, and the decisions they carried, since the store
    /// opened.
    pub fn batch_stats(&self) -> (u64, u64) {
        let stats = |b: &Batcher| {
            (
                b.calls.load(Ordering::Relaxed),
                b.decisions.load(Ordering::Relaxed),
            )
        };
        match &self.batching {
            Batching::One(batcher) => stats(batcher),
            Batching::PerTag(batchers) => batchers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|b| stats(b))
                .fold((0, 0), |(c, d), (c2, d2)| (c + c2, d + d2)),
        }
    }

    /// Queues a decision in its batcher and waits for its raw script answer.
    async fn submit(&self, request: Request) -> Result<Vec<i64>, StoreError> {
        let batcher = match &self.batching {
            Batching::One(batcher) => return batcher.submit(request).await,
            Batching::PerTag(batchers) => {
                let tag = request.keys.first().map_or("", |key| hash_tag(key));
                let mut batchers = batchers.lock().unwrap_or_else(|p| p.into_inner());
                batchers
                    .entry_ref(tag)
                    .or_insert_with(|| {
                        Batcher::new(&self.connection, &self.script, &self.answers, &self.io)
                    })
                    .clone()
            }
        };
        batcher.submit(request).await
    }

    /// The day at Redis's time as far as this replica knows it.
    fn expected_day(&self) -> CalendarDay {
        let at = self.redis_now_ms();
        let mut today = self.today.lock().unwrap_or_else(|p| p.into_inner());
        match *today {
            Some(day) if day.contains(at) => day,
            _ => {
                let day = self.day_at(at);
                *today = Some(day);
                day
            }
        }
    }

    fn day_at(&self, ms: i64) -> CalendarDay {
        let at = jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::MAX);
        self.calendar.day_at(at)
    }

    /// Redis's time as far as this replica knows it.
    fn redis_now_ms(&self) -> i64 {
        self.clock.now().as_millisecond() + self.skew_ms.load(Ordering::Relaxed)
    }

    fn learn_time(&self, redis_now_ms: i64) {
        let skew = redis_now_ms - self.clock.now().as_millisecond();
        self.skew_ms.store(skew, Ordering::Relaxed);
    }

    /// The subject groups that can share one script: everything on a single Redis; on
    /// Cluster the team-tagged subjects first, then the ceiling.
    fn groups<'s>(&self, subjects: &'s [Subject]) -> Vec<Vec<(usize, &'s Subject)>> {
        let indexed = subjects.iter().enumerate();
        if !self.is_cluster() {
            return vec![indexed.collect()];
        }
        let (ceiling, tagged): (Vec<_>, Vec<_>) =
            indexed.partition(|(_, s)| s.kind == SubjectKind::Upstream);
        [tagged, ceiling]
            .into_iter()
            .filter(|group| !group.is_empty())
            .collect()
    }

    async fn run(
        &self,
        verb: Verb,
        group: &[(usize, &Subject)],
        all: &[Subject],
    ) -> Result<Answer, StoreError> {
        let offset = self.clock.offset_from_wall_ms();
        // A slice per group: on Cluster with a ceiling, the team's keys and the ceiling
        // live in two slots and each group keeps its own (the ceiling's is shared by every
        // team under it).
        let slices = match &self.slices {
            Some(slices) if verb == Verb::Decide => {
                group_subjects(group, all).map(|set| (slices, set))
            }
            _ => None,
        };
        let mut slice = None;
        if let Some((slices, set)) = slices {
            let ms_left = || 1000 - self.redis_now_ms().rem_euclid(1000);
            match slices.take(set, offset, ms_left, Instant::now()) {
                Take::Slot(slot) => {
                    let raw = nth_admission(slot.first, slot.index);
                    return parse_answer(1, &raw[1..], group.len(), slot.day);
                }
                Take::Ask(ask) => slice = Some(ask),
                Take::Alone => {}
            }
        }
        let mut day = self.expected_day();
        for _ in 0..DAY_ATTEMPTS {
            // Built per attempt and moved into the call: a second attempt (the day turned
            // under the decision) is rare, a copy for it on every decision is not.
            let keys: Vec<String> = group.iter().map(|(_, s)| redis_key(s, all)).collect();
            let limits: Vec<(u64, u64)> = group
                .iter()
                .map(|(_, s)| (s.limits.rpm, s.limits.rpd))
                .collect();
            let raw = match verb {
                Verb::Decide => {
                    let request = Request {
                        keys,
                        limits,
                        offset,
                        day,
                        slice: slice.take(),
                    };
                    self.submit(request).await?
                }
                Verb::Usage => {
                    let script = self.script.clone();
                    let mut connection = self.connection();
                    let last_answer = self.answers.clone();
                    self.on_io(async move {
                        let mut call = ScriptCall::new(&script, &keys, 2 + decision_args(&keys));
                        call.arg(verb.as_str()).arg(1);
                        add_decision(&mut call, offset, day, (1, 0), 1..=keys.len(), &limits);
                        let text: Vec<u8> = call
                            .invoke(&script, &mut connection)
                            .await
                            .map_err(store_error)?;
                        last_answer.record();
                        let mut answers = parse_answers(&text, 1)?;
                        Ok(answers.swap_remove(0))
                    })
                    .await?
                }
            };
            let (&status, rest) = raw
                .split_first()
                .ok_or_else(|| StoreError::Protocol("empty script answer".into()))?;
            let now_ms = *rest
                .first()
                .ok_or_else(|| StoreError::Protocol("script answer without time".into()))?;
            self.learn_time(now_ms);
            if status == -1 {
                day = self.day_at(now_ms);
                continue;
            }
            let answer = parse_answer(status, rest, group.len(), day)?;
            if let Some((slices, set)) = slices {
                slices.learn_room(set, least_room(group, &answer));
            }
            return Ok(answer);
        }
        Err(StoreError::Protocol(format!(
            "no agreement on the calendar day after {DAY_ATTEMPTS} attempts"
        )))
    }

    async fn refund_group(
        &self,
        group: &[(usize, &Subject)],
        all: &[Subject],
        charge: Charge,
    ) -> Result<(), StoreError> {
        let keys = group.iter().map(|(_, s)| redis_key(s, all)).collect();
        let offset = self.clock.offset_from_wall_ms();
        let call = refund_keys(
            self.connection(),
            self.script.clone(),
            keys,
            offset,
            charge,
            1,
        );
        self.on_io(call).await
    }

    async fn decide_groups(&self, subjects: &[Subject]) -> Result<Decision, StoreError> {
        let groups = self.groups(subjects);
        let mut usage: Vec<Option<SubjectUsage>> = vec![None; subjects.len()];
        let mut charged: Vec<(usize, Charge)> = Vec::new();
        let mut denied_by = None;
        let mut retry_ms = 0i64;
        for (g, group) in groups.iter().enumerate() {
            // After a refusal the rest is only read, so headers still show every window.
            let verb = if denied_by.is_none() {
                Verb::Decide
            } else {
                Verb::Usage
            };
            let answer = match self.run(verb, group, subjects).await {
                Ok(answer) => answer,
                Err(error) => {
                    self.compensate(&groups, subjects, &charged);
                    return Err(error);
                }
            };
            if let Some((i, window)) = answer.denied {
                denied_by.get_or_insert((group[i].1.kind, window));
                retry_ms = retry_ms.max(answer.retry_ms);
            }
            if answer.admitted {
                charged.push((g, answer.charge()));
            }
            fill_usage(&mut usage, group, &answer);
        }
        if denied_by.is_some() && !charged.is_empty() {
            // A later group refused what an earlier one charged: take it back exactly.
            for (g, charge) in &charged {
                let refunded = self.refund_group(&groups[*g], subjects, *charge).await;
                if let Err(error) = refunded {
                    tracing::warn!(%error, "compensating a refused decision did not reach the store");
                }
                for (i, _) in &groups[*g] {
                    if let Some(u) = usage[*i].as_mut() {
                        u.minute.used = u.minute.used.saturating_sub(1);
                        u.day.used = u.day.used.saturating_sub(1);
                        if u.minute.used == 0 {
                            // The refunded charge was the window's only one: empty again.
                            u.minute.reset_secs = 60;
                        }
                    }
                }
            }
            charged.clear();
        }
        let usage: Vec<SubjectUsage> = usage
            .into_iter()
            .map(|u| u.ok_or_else(|| StoreError::Protocol("a subject went unanswered".into())))
            .collect::<Result<_, _>>()?;
        let admission = match (denied_by, charged.as_slice()) {
            (None, [(_, first), rest @ ..]) => Some(Admission {
                second: first.second,
                day: first.day,
                ceiling: rest.first().map(|(_, c)| *c),
                local_fallback: false,
            }),
            _ => None,
        };
        Ok(Decision::new(admission, denied_by, retry_ms, usage))
    }

    /// Takes back charges of a decision that failed half-way, off the request path.
    fn compensate(
        &self,
        groups: &[Vec<(usize, &Subject)>],
        all: &[Subject],
        charged: &[(usize, Charge)],
    ) {
        for (g, charge) in charged {
            let keys = groups[*g].iter().map(|(_, s)| redis_key(s, all)).collect();
            let connection = self.connection();
            let script = self.script.clone();
            let offset = self.clock.offset_from_wall_ms();
            let charge = *charge;
            self.io.handle().spawn(async move {
                if let Err(error) = refund_keys(connection, script, keys, offset, charge, 1).await {
                    tracing::warn!(%error, "compensating a failed decision did not reach the store");
                }
            });
        }
    }
}

/// Appends one decision to a script call: its clock offset and day, how many identical
/// decisions it stands for and how many of those (the last) are for a slice, then each
/// subject's index in KEYS (1-based) with its limits.
fn add_decision(
    call: &mut ScriptCall,
    offset: i64,
    day: CalendarDay,
    (times, optional): (u64, u64),
    key_indexes: impl IntoIterator<Item = usize>,
    limits: &[(u64, u64)],
) {
    call.arg(offset)
        .arg(day.id)
        .arg(day.start_ms)
        .arg(day.end_ms)
        .arg(times)
        .arg(optional)
        .arg(limits.len());
    for (index, (rpm, rpd)) in key_indexes.into_iter().zip(limits) {
        call.arg(index).arg(rpm).arg(rpd);
    }
}

/// How many arguments [`add_decision`] adds for a decision over `keys`.
fn decision_args<K>(keys: &[K]) -> usize {
    7 + 3 * keys.len()
}

/// One `EVALSHA` of the script, written straight into a command sized up front. redis-rs'
/// `ScriptInvocation` kept each key and argument in a `Vec` of its own and copied them all
/// into a command at the call: ~8 allocations a decision (callgrind, PERFORMANCE.md).
struct ScriptCall(Cmd);

impl ScriptCall {
    fn new(script: &Script, keys: &[impl AsRef<str>], args: usize) -> ScriptCall {
        // Digits of the arguments, generously: a short guess only costs a regrowth.
        let bytes = 64 + keys.iter().map(|k| k.as_ref().len()).sum::<usize>() + 14 * args;
        let mut cmd = Cmd::with_capacity(3 + keys.len() + args, bytes);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
        for key in keys {
            cmd.arg(key.as_ref());
        }
        ScriptCall(cmd)
    }

    fn arg(&mut self, arg: impl ToRedisArgs) -> &mut ScriptCall {
        self.0.arg(arg);
        self
    }

    /// Runs the call, loading the script first when Redis does not know it (a restart, a
    /// `SCRIPT FLUSH`, a failover to a replica that never saw it), as redis-rs does.
    async fn invoke<T: FromRedisValue>(
        &self,
        script: &Script,
        connection: &mut SharedRedis,
    ) -> redis::RedisResult<T> {
        match self.0.query_async(connection).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(connection).await?;
                self.0.query_async(connection).await
            }
            answer => answer,
        }
    }
}

/// Where decisions wait to be coalesced: one batcher on a single Redis; on Cluster one per
/// hash tag, since a call may only touch one slot (a team and its keys share a tag, the
/// ceiling has its own). Teams come from the config, so the map stays that small.
enum Batching {
    One(Arc<Batcher>),
    PerTag(Mutex<hashbrown::HashMap<String, Arc<Batcher>>>),
}

/// What Redis Cluster hashes of a key: its hash tag (`{…}`, braces included, when not
/// empty), or else the whole key. Keys with the same result live in the same slot.
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| Some((open, open + 1 + key[open + 1..].find('}')?)))
        .filter(|(open, close)| close - open > 1)
        .map_or(key, |(open, close)| &key[open..=close])
}

/// One decision for a batcher: its hashes (one hash tag: see `groups`) with their limits,
/// the clock offset and day it is made on.
struct Request {
    keys: Vec<String>,
    limits: Vec<(u64, u64)>,
    offset: i64,
    day: CalendarDay,
    /// Also asks for this many more admissions, kept for this replica's slice.
    slice: Option<SliceAsk>,
}

/// One decision waiting for a call.
struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Vec<i64>, StoreError>>,
}

#[derive(Default)]
struct BatchState {
    queue: Vec<Job>,
    calls_in_flight: usize,
}

impl BatchState {
    fn take(&mut self) -> Vec<Job> {
        let n = self.queue.len().min(MAX_BATCH);
        self.queue.drain(..n).collect()
    }
}

/// Coalesces the decisions of one store: while a call is in flight, new decisions queue and
/// then leave together as one script call. The call runs in its own task, so a caller that
/// stops waiting (`store.timeout`) never strands the decisions queued behind it.
struct Batcher {
    connection: Arc<ArcSwap<SharedRedis>>,
    script: Arc<Script>,
    answers: Arc<LastAnswer>,
    state: Mutex<BatchState>,
    calls: AtomicU64,
    decisions: AtomicU64,
    /// Where batch calls run: the store's own thread, next to the Redis connection's
    /// tasks (see "A thread of its own" above).
    runtime: tokio::runtime::Handle,
}

impl Batcher {
    fn new(
        connection: &Arc<ArcSwap<SharedRedis>>,
        script: &Arc<Script>,
        answers: &Arc<LastAnswer>,
        io: &EventLoop,
    ) -> Arc<Batcher> {
        Arc::new(Batcher {
            connection: connection.clone(),
            script: script.clone(),
            answers: answers.clone(),
            state: Mutex::new(BatchState::default()),
            calls: AtomicU64::new(0),
            decisions: AtomicU64::new(0),
            runtime: io.handle().clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a decision and waits for its raw script answer.
    async fn submit(self: &Arc<Self>, request: Request) -> Result<Vec<i64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { request, reply };
        let start = {
            let mut state = self.lock();
            state.queue.push(job);
            if state.calls_in_flight < CALLS_IN_FLIGHT {
                state.calls_in_flight += 1;
                Some(state.take())
            } else {
                None
            }
        };
        if let Some(jobs) = start {
            self.runtime.spawn(self.clone().drive(jobs));
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unreachable(
                "the decision's batch call ended without an answer".into(),
            ))
        })
    }

    /// Sends batches until the queue is empty.
    async fn drive(self: Arc<Self>, mut jobs: Vec<Job>) {
        loop {
            // A caller that gave up has already decided by `store.on_error`: charging it in
            // Redis too would count a request twice.
            jobs.retain(|job| !job.reply.is_closed());
            if !jobs.is_empty() {
                self.calls.fetch_add(1, Ordering::Relaxed);
                self.decisions
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                let sent = Instant::now();
                match self.call(&jobs).await {
                    Ok((answers, grants)) => {
                        for grant in grants {
                            self.keep_slice(&jobs[grant.job].request, grant, sent);
                        }
                        for (job, answer) in jobs.drain(..).zip(answers) {
                            let _ = job.reply.send(Ok(answer));
                        }
                    }
                    Err(error) => {
                        for job in jobs.drain(..) {
                            let _ = job.reply.send(Err(error.clone()));
                        }
                    }
                }
            }
            let mut state = self.lock();
            if state.queue.is_empty() {
                state.calls_in_flight -= 1;
                return;
            }
            jobs = state.take();
        }
    }

    /// Keeps a slice Redis granted with a job's decision, and refunds what is left of it
    /// when its second is over (and what was left of a slice it replaced, now).
    fn keep_slice(&self, job: &Request, grant: SliceGrant, sent: Instant) {
        let Some(ask) = &job.slice else { return };
        let Some(&charged_at_ms) = grant.first.get(1) else {
            return;
        };
        let slice = (grant.first, grant.count);
        let Some(granted) = ask.grant(slice, charged_at_ms, job.day, job.offset, sent) else {
            return;
        };
        let refunds = || SliceRefund {
            connection: self.connection.clone(),
            script: self.script.clone(),
            keys: job.keys.clone(),
            offset: job.offset,
        };
        if let Some(unused) = granted.replaced {
            self.runtime.spawn(refunds().send(unused));
        }
        let slices = ask.slices().clone();
        let subjects: Box<[Subject]> = ask.subjects().into();
        let refund = refunds();
        self.runtime.spawn(async move {
            tokio::time::sleep_until(granted.until.into()).await;
            if let Some(unused) = slices.expire(&subjects, granted.generation) {
                refund.send(unused).await;
            }
        });
    }

    /// One script call for every decision in `jobs`, keys shared between them sent once,
    /// and identical decisions (same subjects, limits, clock and day: a team's concurrent
    /// requests) sent once with their number. The script runs them in a row, so each gets
    /// the answer it would have had alone; the batch's decisions were concurrent, so any
    /// order of them is one they could have arrived in. Answers come back in `jobs`' order.
    /// A job asking for a slice adds its extra admissions after all of its run's own, so a
    /// slice never takes room one of its run's requests needed; a later run of the call that
    /// shares a hash (a key override of the same team) finds at most 1/[`super::slices::ROOM_SHARE`] of
    /// the room taken. The slices granted come back apart.
    async fn call(&self, jobs: &[Job]) -> Result<(Vec<Vec<i64>>, Vec<SliceGrant>), StoreError> {
        type Signature<'j> = (&'j [String], &'j [(u64, u64)], i64, i64);
        let mut runs: Vec<Vec<usize>> = Vec::new();
        let mut run_of: hashbrown::HashMap<Signature<'_>, usize> = hashbrown::HashMap::new();
        for (j, Job { request: job, .. }) in jobs.iter().enumerate() {
            let signature = (&job.keys[..], &job.limits[..], job.offset, job.day.id);
            let run = *run_of.entry(signature).or_insert_with(|| {
                runs.push(Vec::new());
                runs.len() - 1
            });
            runs[run].push(j);
        }
        // Per run: the job whose slice its extra admissions go to, and how many.
        let extras: Vec<Option<(usize, u64)>> = runs
            .iter()
            .map(|run| {
                run.iter()
                    .find_map(|&j| jobs[j].request.slice.as_ref().map(|ask| (j, ask.extra)))
            })
            .collect();
        let mut keys: Vec<&str> = Vec::new();
        let mut indexes: hashbrown::HashMap<&str, usize> = hashbrown::HashMap::new();
        let mut job_indexes: Vec<usize> = Vec::with_capacity(runs.len() * 2);
        let mut args = 2;
        for run in &runs {
            let job = &jobs[run[0]].request;
            for key in &job.keys {
                let index = *indexes.entry(key.as_str()).or_insert_with(|| {
                    keys.push(key);
                    keys.len()
                });
                job_indexes.push(index);
            }
            args += decision_args(&job.keys);
        }
        let mut call = ScriptCall::new(&self.script, &keys, args);
        call.arg(Verb::Decide.as_str()).arg(runs.len());
        let mut at = 0;
        for (run, extra) in runs.iter().zip(&extras) {
            let job = &jobs[run[0]].request;
            let indexes = job_indexes[at..at + job.keys.len()].iter().copied();
            let optional = extra.map_or(0, |(_, n)| n);
            let times = (run.len() as u64 + optional, optional);
            add_decision(&mut call, job.offset, job.day, times, indexes, &job.limits);
            at += job.keys.len();
        }
        let mut connection = SharedRedis::clone(&self.connection.load());
        let text: Vec<u8> = call
            .invoke(&self.script, &mut connection)
            .await
            .map_err(store_error)?;
        self.answers.record();
        let mut entries = parse_entries(&text)?.into_iter();
        let mut answers: Vec<Vec<i64>> = vec![Vec::new(); jobs.len()];
        let mut grants = Vec::new();
        for (run, extra) in runs.iter().zip(&extras) {
            let times = run.len() as u64 + extra.map_or(0, |(_, n)| n);
            let mut run_answers =
                RunAnswers::take(&mut entries, times).ok_or_else(|| malformed_answer(&text))?;
            for &j in run {
                answers[j] = run_answers.next_answer();
            }
            if let (Some((j, _)), Some((first, count))) = (extra, run_answers.admitted_rest()) {
                grants.push(SliceGrant {
                    job: *j,
                    first,
                    count,
                });
            }
        }
        if entries.next().is_some() {
            return Err(StoreError::Protocol(format!(
                "more answers than {} decisions",
                jobs.len()
            )));
        }
        Ok((answers, grants))
    }
}

/// Admissions Redis granted for a job's slice: the first one's answer and their number.
struct SliceGrant {
    job: usize,
    first: Vec<i64>,
    count: u64,
}

/// Where a slice's unused admissions go back to.
struct SliceRefund {
    connection: Arc<ArcSwap<SharedRedis>>,
    script: Arc<Script>,
    keys: Vec<String>,
    offset: i64,
}

impl SliceRefund {
    async fn send(self, unused: super::slices::Unused) {
        let charge = Charge {
            second: unused.second,
            day: unused.day,
        };
        let connection = SharedRedis::clone(&self.connection.load());
        let refunded = refund_keys(
            connection,
            self.script,
            self.keys,
            self.offset,
            charge,
            unused.count,
        );
        if let Err(error) = refunded.await {
            tracing::warn!(%error, count = unused.count, "refunding a slice's unused admissions did not reach the store");
        }
    }
}

/// The script's answer: one decision per `;`, each a list of `,`-separated integers, or
/// `*count,` and a list for `count` identical decisions in a row (when admitted, each next
/// one counted one more in every window: [`nth_admission`]). Parsed straight off the bytes:
/// splitting `str`s and `parse::<i64>` cost ~2 400 instructions a decision (callgrind),
/// more than all the rest of a decision's bookkeeping here.
fn parse_entries(text: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let mut entries = Vec::new();
    for entry in text.split(|&b| b == b';') {
        let (times, entry) = match entry {
            [b'*', rest @ ..] => {
                let comma = rest
                    .iter()
                    .position(|&b| b == b',')
                    .ok_or_else(|| malformed_answer(text))?;
                let times = decimal(&rest[..comma])
                    .filter(|&n| n > 1)
                    .ok_or_else(|| malformed_answer(text))?;
                (times as u64, &rest[comma + 1..])
            }
            entry => (1, entry),
        };
        let numbers = entry
            .split(|&b| b == b',')
            .map(decimal)
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| malformed_answer(text))?;
        entries.push(Entry { times, numbers });
    }
    Ok(entries)
}

fn malformed_answer(text: &[u8]) -> StoreError {
    StoreError::Protocol(format!(
        "unexpected script answer {:?}",
        String::from_utf8_lossy(text)
    ))
}

/// `times` decisions in a row answered alike.
struct Entry {
    times: u64,
    numbers: Vec<i64>,
}

impl Entry {
    fn admitted(&self) -> bool {
        self.numbers.first() == Some(&1)
    }

    /// The answer of this entry's `n`-th decision.
    fn nth(&self, n: u64) -> Vec<i64> {
        if self.admitted() {
            nth_admission(self.numbers.clone(), n)
        } else {
            self.numbers.clone()
        }
    }
}

/// The answer of the `n`-th of identical admissions in a row, the first answered `first`:
/// each next one counted one more in every window.
fn nth_admission(mut first: Vec<i64>, n: u64) -> Vec<i64> {
    // Per subject after the five leading fields: minute used, reset, day used.
    for subject in first.get_mut(5..).unwrap_or_default().chunks_exact_mut(3) {
        subject[0] += n as i64;
        subject[2] += n as i64;
    }
    first
}

/// The answers of one decision made `times` times in a row: one entry, or its admitted
/// entry then its refused one, handed out in order.
struct RunAnswers {
    entries: Vec<Entry>,
    /// The entry handing out, and how many of it have been.
    at: usize,
    given: u64,
}

impl RunAnswers {
    /// The entries that answer `times` decisions; `None` when they do not add up.
    fn take(entries: &mut impl Iterator<Item = Entry>, times: u64) -> Option<RunAnswers> {
        let mut taken = Vec::with_capacity(2);
        let mut counted = 0;
        while counted < times {
            let entry = entries.next()?;
            counted += entry.times;
            taken.push(entry);
        }
        (counted == times).then_some(RunAnswers {
            entries: taken,
            at: 0,
            given: 0,
        })
    }

    fn next_answer(&mut self) -> Vec<i64> {
        while self.entries[self.at].times == self.given {
            self.at += 1;
            self.given = 0;
        }
        let answer = self.entries[self.at].nth(self.given);
        self.given += 1;
        answer
    }

    /// What is left of the admitted entry once every decision of the call had its answer:
    /// the first one's answer and how many.
    fn admitted_rest(&self) -> Option<(Vec<i64>, u64)> {
        let entry = self.entries.get(self.at)?;
        let left = entry.times - self.given;
        (entry.admitted() && left > 0).then(|| (entry.nth(self.given), left))
    }
}

/// The answers of `expected` decisions in a row, every entry expanded.
fn parse_answers(text: &[u8], expected: usize) -> Result<Vec<Vec<i64>>, StoreError> {
    let mut entries = parse_entries(text)?.into_iter();
    let mut run = RunAnswers::take(&mut entries, expected as u64).ok_or_else(|| {
        StoreError::Protocol(format!(
            "fewer answers than {expected} decisions: {:?}",
            String::from_utf8_lossy(text)
        ))
    })?;
    if entries.next().is_some() {
        return Err(StoreError::Protocol(format!(
            "more answers than {expected} decisions"
        )));
    }
    Ok((0..expected).map(|_| run.next_answer()).collect())
}

/// The least room left in any window of a decision's subjects, after it.
fn least_room(group: &[(usize, &Subject)], answer: &Answer) -> u64 {
    group
        .iter()
        .zip(&answer.windows)
        .map(|((_, subject), (minute_used, _, day_used))| {
            (subject.limits.rpm.saturating_sub(*minute_used))
                .min(subject.limits.rpd.saturating_sub(*day_used))
        })
        .min()
        .unwrap_or(0)
}

/// A decimal `i64` with an optional leading `-`, as Lua's `%d` writes it; `None` for
/// anything else (empty, other bytes, out of range).
fn decimal(field: &[u8]) -> Option<i64> {
    let (negative, digits) = match field {
        [b'-', digits @ ..] => (true, digits),
        digits => (false, digits),
    };
    if digits.is_empty() {
        return None;
    }
    // Accumulated negative, so that i64::MIN parses too.
    let mut n: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_sub(i64::from(digit - b'0'))?;
    }
    if negative {
        Some(n)
    } else {
        n.checked_neg()
    }
}

/// Takes `count` admissions back from the bucket and day they were charged to.
async fn refund_keys(
    mut connection: SharedRedis,
    script: Arc<Script>,
    keys: Vec<String>,
    offset: i64,
    charge: Charge,
    count: u64,
) -> Result<(), StoreError> {
    let mut call = ScriptCall::new(&script, &keys, 5);
    call.arg("refund")
        .arg(offset)
        .arg(charge.second)
        .arg(charge.day)
        .arg(count);
    let _: i64 = call
        .invoke(&script, &mut connection)
        .await
        .map_err(store_error)?;
    Ok(())
}

fn fill_usage(usage: &mut [Option<SubjectUsage>], group: &[(usize, &Subject)], answer: &Answer) {
    let day_reset = ceil_secs(answer.day.end_ms - answer.now_ms);
    for ((i, subject), (minute_used, minute_reset_ms, day_used)) in
        group.iter().zip(&answer.windows)
    {
        usage[*i] = Some(SubjectUsage {
            kind: subject.kind,
            minute: WindowUsage {
                used: *minute_used,
                limit: subject.limits.rpm,
                reset_secs: ceil_secs(*minute_reset_ms),
            },
            day: WindowUsage {
                used: *day_used,
                limit: subject.limits.rpd,
                reset_secs: day_reset,
            },
        });
    }
}

fn parse_answer(
    status: i64,
    rest: &[i64],
    subjects: usize,
    day: CalendarDay,
) -> Result<Answer, StoreError> {
    let malformed = || StoreError::Protocol(format!("unexpected script answer {rest:?}"));
    let [now_ms, retry_ms, denied_index, denied_window, windows @ ..] = rest else {
        return Err(malformed());
    };
    if windows.len() != subjects * 3 {
        return Err(malformed());
    }
    let denied = match (*denied_index, *denied_window) {
        (0, _) => None,
        (i, 1) if i >= 1 => Some((i as usize - 1, Window::Minute)),
        (i, 2) if i >= 1 => Some((i as usize - 1, Window::Day)),
        _ => return Err(malformed()),
    };
    Ok(Answer {
        admitted: status == 1,
        now_ms: *now_ms,
        retry_ms: *retry_ms,
        denied,
        day,
        windows: windows
            .chunks_exact(3)
            .map(|w| (w[0].max(0) as u64, w[1], w[2].max(0) as u64))
            .collect(),
    })
}

/// A group's subjects as one slice of the decision's: the set a slice is kept for. Groups
/// are runs of the decision's subjects (the ceiling comes last), so this always is one.
fn group_subjects<'a>(group: &[(usize, &Subject)], all: &'a [Subject]) -> Option<&'a [Subject]> {
    let (first, last) = (group.first()?.0, group.last()?.0);
    (last - first + 1 == group.len()).then(|| &all[first..=last])
}

/// The hash of one subject. A key override shares its team's hash tag, so one decision is
/// one slot on Cluster.
fn redis_key(subject: &Subject, all: &[Subject]) -> String {
    // Pieces pushed, not `format!`ed: this runs for every subject of every decision.
    let team_key = |team: &str, capacity: usize| {
        let mut key = String::with_capacity(capacity);
        key.push_str("kg:q:{t:");
        key.push_str(&escape(team));
        key.push('}');
        key
    };
    match subject.kind {
        SubjectKind::Team => team_key(&subject.id, 9 + subject.id.len()),
        SubjectKind::Key => {
            let team = all
                .iter()
                .find(|s| s.kind == SubjectKind::Team)
                .map_or(&*subject.id, |s| &*s.id);
            let mut key = team_key(team, 12 + team.len() + subject.id.len());
            key.push_str(":k:");
            key.push_str(&escape(&subject.id));
            key
        }
        SubjectKind::Upstream => "kg:q:{upstream}".to_string(),
    }
}

/// Makes a name safe inside a key: no brace can move the hash tag and no colon can make
/// one name read as another's key.
fn escape(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.contains(['%', '{', '}', ':']) {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Sorts a Redis failure into "did not reach Redis" (degraded mode, reconnect) and "Redis
/// answered something unusable".
pub(crate) fn store_error(error: RedisError) -> StoreError {
    if error.is_timeout() {
        StoreError::Unreachable(format!("timed out: {error}"))
    } else if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
    {
        StoreError::Unreachable(error.to_string())
    } else {
        StoreError::Protocol(error.to_string())
    }
}

impl QuotaStore for RedisStore {
    fn decide<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Decision> {
        Box::pin(self.decide_groups(subjects))
    }

    fn refund<'a>(&'a self, subjects: &'a [Subject], admission: Admission) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let own = Charge {
                second: admission.second,
                day: admission.day,
            };
            let groups = self.groups(subjects);
            for group in &groups {
                let is_ceiling = group.iter().all(|(_, s)| s.kind == SubjectKind::Upstream);
                let charge = match admission.ceiling {
                    Some(ceiling) if is_ceiling && groups.len() > 1 => ceiling,
                    _ => own,
                };
                self.refund_group(group, subjects, charge).await?;
            }
            Ok(())
        })
    }

    fn usage<'a>(&'a self, subjects: &'a [Subject]) -> StoreFuture<'a, Vec<SubjectUsage>> {
        Box::pin(async move {
            let mut usage: Vec<Option<SubjectUsage>> = vec![None; subjects.len()];
            for group in self.groups(subjects) {
                let answer = self.run(Verb::Usage, &group, subjects).await?;
                fill_usage(&mut usage, &group, &answer);
            }
            usage
                .into_iter()
                .map(|u| u.ok_or_else(|| StoreError::Protocol("a subject went unanswered".into())))
                .collect()
        })
    }

    fn reconnect(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            // A fresh connection: a half-open one (peer gone without a reset) would
            // otherwise keep failing every probe.
            let fresh = {
                let _on_io = self.io.handle().enter();
                SharedRedis::open(&self.url)
                    .map_err(StoreError::Protocol)?
                    .ok_or_else(|| StoreError::Protocol("not a Redis URL".into()))?
            };
            let mut probe = fresh.clone();
            self.on_io(async move {
                let _: String = redis::cmd("PING")
                    .query_async(&mut probe)
                    .await
                    .map_err(store_error)?;
                Ok(())
            })
            .await?;
            self.connection.store(Arc::new(fresh));
            Ok(())
        })
    }

    fn since_last_answer(&self) -> Option<std::time::Duration> {
        self.answers.since()
    }

    fn slice_counters(&self) -> Option<super::SliceCounters> {
        self.slices.as_ref().map(|slices| slices.counters())
    }

    fn release(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let Some(slices) = &self.slices else {
                return Ok(());
            };
            for (subjects, offset, unused) in slices.release() {
                let refund = SliceRefund {
                    connection: self.connection.clone(),
                    script: self.script.clone(),
                    keys: subjects.iter().map(|s| redis_key(s, &subjects)).collect(),
                    offset,
                };
                self.on_io(async move {
                    refund.send(unused).await;
                    Ok(())
                })
                .await?;
            }
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        if self.is_cluster() {
            "redis-cluster"
        } else {
            "redis"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Limits;

    #[test]
    fn script_answers_parse_as_std_parses_their_numbers() {
        let parsed = parse_answers(b"1,1764000000123,0,0,0,5,60,-1;0,9,1500,1,2", 2).unwrap();
        assert_eq!(
            parsed,
            [
                vec![1, 1_764_000_000_123, 0, 0, 0, 5, 60, -1],
                vec![0, 9, 1500, 1, 2]
            ]
        );
        for field in [
            "0",
            "-0",
            "7",
            "-7",
            "9223372036854775807",
            "-9223372036854775808",
        ] {
            assert_eq!(decimal(field.as_bytes()), field.parse().ok(), "{field}");
        }
        for field in [
            "",
            "-",
            "1-",
            "--1",
            "1 ",
            " 1",
            "0x1",
            "1.5",
            "9223372036854775808",
            "-9223372036854775809",
            "+1",
        ] {
            assert_eq!(decimal(field.as_bytes()), None, "{field:?}");
        }
        for malformed in [&b""[..], b"1,,2", b"1;", b";1", b"1,x", b"\xff"] {
            assert!(
                matches!(parse_answers(malformed, 1), Err(StoreError::Protocol(_)))
                    && matches!(parse_answers(malformed, 2), Err(StoreError::Protocol(_))),
                "{malformed:?}"
            );
        }
        assert!(matches!(
            parse_answers(b"1,2;3", 1),
            Err(StoreError::Protocol(_))
        ));
    }

    #[test]
    fn hash_tags_are_what_redis_cluster_hashes() {
        assert_eq!(hash_tag("kg:q:{t:design}"), "{t:design}");
        assert_eq!(hash_tag("kg:q:{t:design}:k:tight"), "{t:design}");
        assert_eq!(hash_tag("kg:q:{upstream}"), "{upstream}");
        assert_eq!(hash_tag("no-tag"), "no-tag");
        assert_eq!(hash_tag("open{only"), "open{only");
        // An empty tag is no tag: Redis hashes the whole key.
        assert_eq!(hash_tag("a{}b"), "a{}b");
        assert_eq!(hash_tag("a{}b{c}"), "a{}b{c}");
    }

    #[test]
    fn identical_decisions_answered_together_expand_in_a_row() {
        // Three admitted (the first counted 4th in its minute and 9th in its day, over two
        // subjects), then two refused by the state they leave, then one on its own.
        let text = b"*3,1,77,0,0,0,4,5000,9,1,60000,1;*2,0,77,3000,1,1,6,5000,11,3,60000,3;1,78,0,0,0,7,5000,12";
        let parsed = parse_answers(text, 6).unwrap();
        assert_eq!(
            parsed,
            [
                vec![1, 77, 0, 0, 0, 4, 5000, 9, 1, 60000, 1],
                vec![1, 77, 0, 0, 0, 5, 5000, 10, 2, 60000, 2],
                vec![1, 77, 0, 0, 0, 6, 5000, 11, 3, 60000, 3],
                vec![0, 77, 3000, 1, 1, 6, 5000, 11, 3, 60000, 3],
                vec![0, 77, 3000, 1, 1, 6, 5000, 11, 3, 60000, 3],
                vec![1, 78, 0, 0, 0, 7, 5000, 12],
            ]
        );
        // A day the replica got wrong, for three at once: each asks again on its own.
        assert_eq!(
            parse_answers(b"*3,-1,42", 3).unwrap(),
            vec![vec![-1, 42]; 3]
        );
        for (malformed, expected) in [
            (&b"*3,1,2"[..], 2),
            (b"*3,1,2", 4),
            (b"*1,1,2", 1),
            (b"*0,1,2", 0),
            (b"*-2,1,2", 1),
            (b"*,1,2", 1),
            (b"*2", 2),
            (b"*99999999999999999999,1", 1),
        ] {
            assert!(
                matches!(
                    parse_answers(malformed, expected),
                    Err(StoreError::Protocol(_))
                ),
                "{malformed:?}"
            );
        }
    }

    fn subject(kind: SubjectKind, id: &str) -> Subject {
        Subject {
            kind,
            id: id.into(),
            limits: Limits { rpm: 1, rpd: 1 },
        }
    }

    #[test]
    fn a_decision_shares_one_hash_tag() {
        let all = [
            subject(SubjectKind::Team, "design"),
            subject(SubjectKind::Key, "design-tight"),
            subject(SubjectKind::Upstream, "upstream"),
        ];
        assert_eq!(redis_key(&all[0], &all), "kg:q:{t:design}");
        assert_eq!(redis_key(&all[1], &all), "kg:q:{t:design}:k:design-tight");
        assert_eq!(redis_key(&all[2], &all), "kg:q:{upstream}");
    }

    #[test]
    fn names_cannot_move_the_tag_or_forge_a_key() {
        let all = [
            subject(SubjectKind::Team, "a}:k:b"),
            subject(SubjectKind::Key, "x{y}"),
        ];
        assert_eq!(redis_key(&all[0], &all), "kg:q:{t:a%7D%3Ak%3Ab}");
        assert_eq!(redis_key(&all[1], &all), "kg:q:{t:a%7D%3Ak%3Ab}:k:x%7By%7D");
        let other = [
            subject(SubjectKind::Team, "a"),
            subject(SubjectKind::Key, "b"),
        ];
        assert_ne!(redis_key(&all[0], &all), redis_key(&other[1], &other));
    }
}
