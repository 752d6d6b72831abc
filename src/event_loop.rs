//! Owns dedicated event-loop threads: a named thread that runs a single-threaded Tokio
//! runtime until its owner drops the handle. The proxy's shards ([`crate::shards`]) are
//! such threads, and so is the quota store's Redis I/O ([`crate::quota::redis`]): work
//! that must not wait its turn behind whatever else a runtime has queued.

use std::io;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A running event-loop thread. Dropping it stops the loop: what still runs there is
/// cancelled, and the thread ends.
pub struct EventLoop {
    handle: Handle,
    /// Dropped with the loop: the thread leaves `block_on` then and drops its runtime
    /// there, where no other runtime is running (Tokio forbids dropping one inside another).
    _stop: oneshot::Sender<()>,
}

impl EventLoop {
    /// Starts a thread called `name`; `on_start` runs on it first (to set thread-locals).
    pub fn start(name: String, on_start: impl FnOnce() + Send + 'static) -> io::Result<EventLoop> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new().name(name).spawn(move || {
            on_start();
            // A current-thread runtime runs its tasks only inside `block_on`.
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
        Ok(EventLoop {
            handle,
            _stop: stop,
        })
    }

    /// Where to spawn onto the loop, or to `enter` it so that what a library spawns while
    /// being set up lands there.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_named_thread() {
        let event_loop = EventLoop::start("keygate-test-loop".into(), || {}).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let name = runtime
            .block_on(
                event_loop
                    .handle()
                    .spawn(async { std::thread::current().name().map(str::to_string) }),
            )
            .unwrap();
        assert_eq!(name.as_deref(), Some("keygate-test-loop"));
    }

    #[test]
    fn dropping_the_loop_ends_its_thread_and_cancels_its_tasks() {
        let event_loop = EventLoop::start("keygate-test-loop".into(), || {}).unwrap();
        let (alive, ended) = std::sync::mpsc::channel::<()>();
        event_loop.handle().spawn(async move {
            let _alive = alive;
            std::future::pending::<()>().await;
        });
        drop(event_loop);
        assert_eq!(
            ended.recv_timeout(std::time::Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
