//! Owns the Redis stream copy of the usage log (`usage_log.redis_stream`): every replica
//! appends its lines to one stream (`XADD key MAXLEN ~ N * line <json>`), so one anomaly
//! job can read the whole fleet. The writer thread hands lines over without waiting; a task
//! sends them in pipelined batches on its own connection, so a slow stream never delays a
//! quota decision. Lines that cannot be queued or written are counted as dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::metrics::{Metrics, UsageDrop};
use crate::shared_redis::SharedRedis;
use crate::usage_log::{UsageConsumer, UsageRecord};

/// Lines waiting for the stream task.
const QUEUE_CAPACITY: usize = 8192;

/// Lines sent in one pipeline.
const MAX_BATCH: usize = 256;

/// Bound on one pipeline.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The writer thread's end: queues each line for the stream.
pub struct StreamFeed {
    queue: mpsc::Sender<String>,
    metrics: Arc<Metrics>,
}

impl UsageConsumer for StreamFeed {
    fn consume(&mut self, _record: &UsageRecord, line: &str) {
        if self.queue.try_send(line.to_string()).is_err() {
            self.metrics.usage_line_dropped(UsageDrop::Stream);
        }
    }
}

/// Starts the stream task on the current runtime; it ends when the feed is dropped.
pub fn start(redis: SharedRedis, stream: String, maxlen: u64, metrics: Arc<Metrics>) -> StreamFeed {
    let (queue, lines) = mpsc::channel(QUEUE_CAPACITY);
    tokio::spawn(run(redis, stream, maxlen, metrics.clone(), lines));
    StreamFeed { queue, metrics }
}

async fn run(
    mut redis: SharedRedis,
    stream: String,
    maxlen: u64,
    metrics: Arc<Metrics>,
    mut lines: mpsc::Receiver<String>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_warning: Option<Instant> = None;
    while lines.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut pipeline = redis::pipe();
        for line in &batch {
            pipeline
                .cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(maxlen)
                .arg("*")
                .arg("line")
                .arg(line)
                .ignore();
        }
        let sent =
            tokio::time::timeout(WRITE_TIMEOUT, pipeline.query_async::<()>(&mut redis)).await;
        let failure = match sent {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {WRITE_TIMEOUT:?}")),
        };
        if let Some(failure) = failure {
            for _ in 0..batch.len() {
                metrics.usage_line_dropped(UsageDrop::Stream);
            }
            if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                last_warning = Some(Instant::now());
                tracing::warn!(stream = %stream, lines = batch.len(), failure = %failure, "usage lines not appended to the Redis stream");
            }
        }
        batch.clear();
    }
}
