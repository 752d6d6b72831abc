//! Owns how hyper's HTTP/2 futures become tasks: boxed first, then spawned on the current
//! runtime. hyper hands its executor a future per stream (the server's per request, the
//! client's two per request), each an enum sized for its largest variant (several KB);
//! spawned as it is, the enum is copied into the task on the way (`spawn`, `bind`,
//! `set_stage`); boxed once, the task moves a pointer (PERFORMANCE.md, session 9).

use std::future::Future;

/// A [`hyper::rt::Executor`] that spawns each future boxed on the current Tokio runtime.
#[derive(Clone, Copy, Debug, Default)]
pub struct BoxedExecutor;

impl<F> hyper::rt::Executor<F> for BoxedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}
