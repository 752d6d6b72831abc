//! Owns how hyper's HTTP/2 server futures become tasks: boxed first, then spawned on the
//! current runtime. hyper hands its executor a future per stream (one a request), an enum
//! sized for its largest variant (several KB); spawned as it is, the enum is copied into
//! the task on the way (`spawn`, `bind`, `set_stage`); boxed once, the task moves a pointer
//! (PERFORMANCE.md, session 9; the upstream side, which spawned two a request through
//! hyper's client, now drives `h2` itself and spawns none: [`crate::upstream_h2`]).

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
