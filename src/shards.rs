//! Owns the proxy's shards (`server.shards`): threads that each run their own
//! single-threaded event loop. The listener hands every accepted connection to the next
//! shard, and the connection, its requests and the upstream connections they open stay on
//! that thread (calls to Redis run on the quota store's own thread, see
//! [`crate::quota::redis`]).
//! On the 2-core bench one thread's event loop cost ~20 % less CPU a request than tokio's
//! two work-stealing workers (PERFORMANCE.md, session 4).

use std::cell::Cell;
use std::io;

use tokio::runtime::Handle;

use crate::event_loop::EventLoop;

thread_local! {
    /// 1 + this thread's shard number; 0 on every other thread.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Which shard the current thread is: 1 + its number, 0 when it is none. Lets per-thread
/// state (the upstream pool's idle lists) stay with the thread that uses it.
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// Running shards. Dropping this stops them: what still runs on a shard is cancelled.
pub struct Shards {
    loops: Vec<EventLoop>,
    next: usize,
}

impl Shards {
    pub fn start(count: usize) -> io::Result<Shards> {
        let loops = (0..count)
            .map(|number| {
                EventLoop::start(format!("keygate-shard-{number}"), move || {
                    SHARD.with(|shard| shard.set(number + 1));
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Shards { loops, next: 0 })
    }

    /// The shard the next connection goes to: round robin, which spreads connections
    /// evenly however few clients there are (a kernel hash over `SO_REUSEPORT` listeners
    /// would not, with the handful of long-lived connections a sidecar sees).
    pub fn next_in_turn(&mut self) -> &Handle {
        let event_loop = &self.loops[self.next % self.loops.len()];
        self.next = self.next.wrapping_add(1);
        event_loop.handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_round_robin_and_each_shard_knows_its_number() {
        let mut shards = Shards::start(2).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let on_shard = shards.next_in_turn().spawn(async { current() });
            seen.push(runtime.block_on(on_shard).unwrap());
        }
        assert_eq!(seen, [1, 2, 1, 2]);
        assert_eq!(current(), 0, "the test's own thread is no shard");
    }
}
