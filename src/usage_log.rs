//! Owns the usage log (SPEC §5): one JSON object per request, one line each, written off the
//! request path. The finish step hands its context to a bounded queue without waiting (a
//! full queue counts a drop); a writer thread turns each context into a [`UsageRecord`],
//! writes it to stdout or a file (reopened on SIGHUP and when rotated away), and hands it
//! to the live consumers (anomaly detection, the Redis stream).

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::context::RequestContext;
use crate::metrics::{Metrics, UsageDrop};

/// Lines waiting for the writer. At ~300 bytes a context this is a few MiB at most; a
/// writer this far behind is stuck, and requests must not wait for it.
pub const QUEUE_CAPACITY: usize = 8192;

/// Lines written between flushes when the queue never runs dry.
const MAX_BATCH: usize = 1024;
/// How long the writer lets lines gather once it has caught up; the queue holds far more
/// than arrive meanwhile.
const GATHER: Duration = Duration::from_millis(20);

/// One request, exactly SPEC §5's fields; `null` where the request never got that far.
/// The names a request shares with its key and route are shared, not copied: the writer
/// builds a record for every request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    #[serde(with = "rfc3339_millis")]
    pub ts: Timestamp,
    pub request_id: String,
    pub team: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    pub env: Option<Arc<str>>,
    pub method: Cow<'static, str>,
    pub path: String,
    pub route: Option<Arc<str>>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub outcome: Cow<'static, str>,
    pub latency_ms: f64,
    pub upstream_latency_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub client_ip: String,
    pub user_agent: Option<String>,
    pub minute_used: Option<u64>,
    pub minute_limit: Option<u64>,
    pub day_used: Option<u64>,
    pub day_limit: Option<u64>,
}

/// An address as `Display` writes it. IPv4, nearly every client, is put together from its
/// octets: the formatter's general path was ~1 300 instructions a line (callgrind).
fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(itoa::Buffer::new().format(octet));
            }
            text
        }
        std::net::IpAddr::V6(v6) => v6.to_string(),
    }
}

/// The method's name, borrowed for the standard ones.
fn method_text(method: &http::Method) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|name| **name == method.as_str()) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(method.as_str().to_string()),
    }
}

/// Milliseconds with three decimals: enough to order lines, short to read.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl UsageRecord {
    pub fn from_context(ctx: RequestContext, latency: Duration) -> Self {
        let bytes_in = ctx.bytes_in();
        let usage = ctx.team_usage;
        let key = ctx.key.as_deref();
        UsageRecord {
            ts: ctx.received_at,
            request_id: ctx.request_id_str().to_string(),
            team: key.map(|k| k.team.clone()),
            key_id: key.map(|k| k.id.clone()),
            env: key.map(|k| k.env.clone()),
            method: method_text(&ctx.method),
            path: ctx.path,
            route: ctx.route,
            status: ctx.status,
            upstream_status: ctx.upstream_status,
            outcome: Cow::Borrowed(ctx.outcome.as_str()),
            latency_ms: millis(latency),
            upstream_latency_ms: ctx.upstream_latency.map(millis),
            bytes_in,
            bytes_out: ctx.bytes_out,
            client_ip: ip_text(ctx.client_ip),
            user_agent: ctx.user_agent,
            minute_used: usage.map(|u| u.minute.used),
            minute_limit: usage.map(|u| u.minute.limit),
            day_used: usage.map(|u| u.day.used),
            day_limit: usage.map(|u| u.day.limit),
        }
    }

    /// The record as one JSON line, exactly as serde_json writes it (field order, escapes,
    /// numbers; a test holds the two to the same bytes). Written by hand because serde's
    /// generic path, escaping strings byte by byte, was ~12 % of the instructions spent per
    /// proxied request (callgrind, PERFORMANCE.md), on the same cores as the requests.
    pub fn to_line(&self) -> String {
        let mut line = JsonLine(String::with_capacity(512));
        line.timestamp("{\"ts\":", self.ts);
        line.string(",\"request_id\":", Some(&self.request_id));
        line.string(",\"team\":", self.team.as_deref());
        line.string(",\"key_id\":", self.key_id.as_deref());
        line.string(",\"env\":", self.env.as_deref());
        line.string(",\"method\":", Some(&self.method));
        line.string(",\"path\":", Some(&self.path));
        line.string(",\"route\":", self.route.as_deref());
        line.integer(",\"status\":", Some(u64::from(self.status)));
        line.integer(",\"upstream_status\":", self.upstream_status.map(u64::from));
        line.string(",\"outcome\":", Some(&self.outcome));
        line.float(",\"latency_ms\":", Some(self.latency_ms));
        line.float(",\"upstream_latency_ms\":", self.upstream_latency_ms);
        line.integer(",\"bytes_in\":", Some(self.bytes_in));
        line.integer(",\"bytes_out\":", Some(self.bytes_out));
        line.string(",\"client_ip\":", Some(&self.client_ip));
        line.string(",\"user_agent\":", self.user_agent.as_deref());
        line.integer(",\"minute_used\":", self.minute_used);
        line.integer(",\"minute_limit\":", self.minute_limit);
        line.integer(",\"day_used\":", self.day_used);
        line.integer(",\"day_limit\":", self.day_limit);
        line.0.push('}');
        line.0
    }
}

/// One JSON object being written field by field; `None` is `null`. Each field comes with
/// its key already quoted and separated (`,"name":`): one copy instead of four pushes.
struct JsonLine(String);

impl JsonLine {
    fn timestamp(&mut self, key: &str, ts: Timestamp) {
        self.0.push_str(key);
        self.0.push('"');
        push_rfc3339_millis(&mut self.0, ts);
        self.0.push('"');
    }

    fn string(&mut self, key: &str, value: Option<&str>) {
        self.0.push_str(key);
        let Some(value) = value else {
            self.0.push_str("null");
            return;
        };
        // No early exit, so the loop has no branch and the compiler may vectorise it: the
        // strings of a line are short and nearly never need escapes.
        let needs_escape = value.bytes().fold(false, |odd, b| {
            odd | (b < 0x20) | (b == b'"') | (b == b'\\')
        });
        if !needs_escape {
            self.0.push('"');
            self.0.push_str(value);
            self.0.push('"');
        } else {
            // Rare (a path or user agent with quotes or control bytes): serde_json's own
            // escapes, so the line stays what it always was.
            self.0
                .push_str(&serde_json::to_string(value).unwrap_or_else(|_| "null".into()));
        }
    }

    fn integer(&mut self, key: &str, value: Option<u64>) {
        self.0.push_str(key);
        match value {
            Some(n) => self.0.push_str(itoa::Buffer::new().format(n)),
            None => self.0.push_str("null"),
        }
    }

    fn float(&mut self, key: &str, value: Option<f64>) {
        self.0.push_str(key);
        match value {
            Some(x) if x.is_finite() => self.0.push_str(zmij::Buffer::new().format_finite(x)),
            // serde_json writes a non-finite float as null too.
            _ => self.0.push_str("null"),
        }
    }
}

/// `{ts:.3}` as jiff writes it (`2026-11-27T10:00:00.500Z`), by hand from 1970 on (jiff's
/// timestamps end in 9999): jiff's formatter was ~1 000 instructions a line. An earlier
/// time, from a clock gone wrong, goes to jiff.
fn push_rfc3339_millis(out: &mut String, ts: Timestamp) {
    const DAYS_TO_10000: i64 = 2_932_897;
    let secs = ts.as_second();
    let days = secs / 86_400;
    // Before 1970 jiff counts whole seconds toward zero and the fraction below it.
    if secs < 0 || ts.subsec_nanosecond() < 0 || days >= DAYS_TO_10000 {
        use std::fmt::Write as _;
        let _ = write!(out, "{ts:.3}");
        return;
    }
    let (year, month, day) = civil_from_days(days);
    let of_day = secs % 86_400;
    let millis = ts.subsec_millisecond();
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: i64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 3, i64::from(millis));
    out.push_str(std::str::from_utf8(&text).expect("digits and separators are ASCII"));
}

/// The proleptic Gregorian date of a day counted from 1970-01-01, for days >= 0 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

mod rfc3339_millis {
    use jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ts: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{ts:.3}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A finished request on its way to the writer.
pub struct Completed {
    pub ctx: RequestContext,
    pub latency: Duration,
}

/// Something that wants every usage record after it is written (live anomaly detection,
/// the Redis stream). Runs on the writer thread: it must not block.
pub trait UsageConsumer: Send + 'static {
    fn consume(&mut self, record: &UsageRecord, line: &str);
}

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageSink {
    Stdout,
    File(PathBuf),
}

/// The request path's handle on the usage log.
pub struct UsageLog {
    queue: SyncSender<Completed>,
    reopen: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl UsageLog {
    /// Starts the writer thread. It ends, after writing what is queued, when the last
    /// handle is dropped.
    pub fn start(
        sink: UsageSink,
        capacity: usize,
        metrics: Arc<Metrics>,
        consumers: Vec<Box<dyn UsageConsumer>>,
    ) -> io::Result<Self> {
        Self::start_with_output(sink, capacity, metrics, consumers, None)
    }

    /// As [`UsageLog::start`], writing to `output` instead of the sink's own stream (tests,
    /// benches); a file sink still reopens its path when rotated.
    pub fn start_with_output(
        sink: UsageSink,
        capacity: usize,
        metrics: Arc<Metrics>,
        consumers: Vec<Box<dyn UsageConsumer>>,
        output: Option<Box<dyn Write + Send>>,
    ) -> io::Result<Self> {
        let (queue, receiver) = sync_channel(capacity.max(1));
        let reopen = Arc::new(AtomicBool::new(false));
        let out = match output {
            Some(output) => Output::Custom(output),
            None => Output::open(&sink)?,
        };
        let writer = Writer {
            sink,
            out,
            reopen: reopen.clone(),
            metrics: metrics.clone(),
            consumers,
            last_error_logged: None,
        };
        std::thread::Builder::new()
            .name("keygate-usage-log".into())
            .spawn(move || writer.run(receiver))?;
        Ok(Self {
            queue,
            reopen,
            metrics,
        })
    }

    /// Hands a finished request to the writer, never waiting: a full queue drops the line
    /// and counts it.
    pub fn enqueue(&self, completed: Completed) {
        match self.queue.try_send(completed) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.usage_line_dropped(UsageDrop::QueueFull);
            }
        }
    }

    /// Asks the writer to reopen its file before the next line (SIGHUP).
    pub fn request_reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    pub fn reopen_flag(&self) -> Arc<AtomicBool> {
        self.reopen.clone()
    }
}

enum Output {
    Stdout(io::Stdout),
    File {
        writer: BufWriter<File>,
        identity: Option<(u64, u64)>,
    },
    Custom(Box<dyn Write + Send>),
}

impl Output {
    fn open(sink: &UsageSink) -> io::Result<Self> {
        match sink {
            UsageSink::Stdout => Ok(Output::Stdout(io::stdout())),
            UsageSink::File(path) => {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                let identity = file_identity(&file.metadata()?);
                Ok(Output::File {
                    writer: BufWriter::with_capacity(64 * 1024, file),
                    identity,
                })
            }
        }
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let w: &mut dyn Write = match self {
            Output::Stdout(stdout) => stdout,
            Output::File { writer, .. } => writer,
            Output::Custom(custom) => custom,
        };
        w.write_all(line.as_bytes())?;
        w.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout(stdout) => stdout.flush(),
            Output::File { writer, .. } => writer.flush(),
            Output::Custom(custom) => custom.flush(),
        }
    }
}

#[cfg(unix)]
fn file_identity(metadata: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((metadata.dev(), metadata.ino()))
}

#[cfg(not(unix))]
fn file_identity(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// True when `path` no longer names the file we hold open: renamed or deleted by a
/// rotation, or replaced.
fn rotated_away(path: &Path, identity: Option<(u64, u64)>) -> bool {
    match std::fs::metadata(path) {
        Ok(metadata) => file_identity(&metadata) != identity,
        Err(_) => true,
    }
}

struct Writer {
    sink: UsageSink,
    out: Output,
    reopen: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    consumers: Vec<Box<dyn UsageConsumer>>,
    last_error_logged: Option<Instant>,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Completed>) {
        while let Ok(first) = receiver.recv() {
            self.reopen_if_needed();
            self.write(first);
            let mut written = 1;
            for next in receiver.try_iter().take(MAX_BATCH - 1) {
                self.write(next);
                written += 1;
            }
            if let Err(e) = self.out.flush() {
                self.write_failed(&e);
            }
            if written < MAX_BATCH {
                // Caught up: let lines gather instead of being woken for each one. A wake
                // per request (a futex call on the request path, a write and an inotify
                // event in the log's directory) cost more than the line itself.
                std::thread::sleep(GATHER);
            }
        }
        let _ = self.out.flush();
    }

    fn reopen_if_needed(&mut self) {
        let UsageSink::File(path) = &self.sink else {
            return;
        };
        let asked = self.reopen.swap(false, Ordering::Relaxed);
        let moved = match &self.out {
            Output::File { identity, .. } => rotated_away(path, *identity),
            _ => false,
        };
        if !(asked || moved) {
            return;
        }
        let _ = self.out.flush();
        match Output::open(&self.sink) {
            Ok(out) => {
                self.out = out;
                tracing::info!(path = %path.display(), signal = asked, "usage log reopened");
            }
            Err(e) => self.write_failed(&e),
        }
    }

    fn write(&mut self, completed: Completed) {
        let record = UsageRecord::from_context(completed.ctx, completed.latency);
        let line = record.to_line();
        if let Err(e) = self.out.write_line(&line) {
            self.metrics.usage_line_dropped(UsageDrop::WriteError);
            self.write_failed(&e);
        }
        for consumer in &mut self.consumers {
            consumer.consume(&record, &line);
        }
    }

    /// Logs a write failure at most every ten seconds: a full disk must not flood the log.
    fn write_failed(&mut self, error: &io::Error) {
        let now = Instant::now();
        if self
            .last_error_logged
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(10))
        {
            return;
        }
        self.last_error_logged = Some(now);
        tracing::warn!(error = %error, sink = ?self.sink, "usage log write failed; lines are being dropped");
    }
}

/// Reads a usage log line by line, handing each record to `f`; returns how many lines
/// were skipped because they are not usage records.
pub fn for_each_record(
    reader: impl io::BufRead,
    mut f: impl FnMut(&UsageRecord),
) -> io::Result<usize> {
    let mut skipped = 0;
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<UsageRecord>(&line) {
            Ok(record) => f(&record),
            Err(_) => skipped += 1,
        }
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Method};
    use std::sync::{Condvar, Mutex};

    fn context(id: &str) -> RequestContext {
        let mut ctx = RequestContext::new(
            HeaderValue::from_str(id).unwrap(),
            Method::POST,
            "10.1.2.3".parse().unwrap(),
            "2026-11-27T10:00:00.5Z".parse().unwrap(),
        );
        ctx.path = "/v1/text-to-image".into();
        ctx.status = 401;
        ctx
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "127.0.0.1",
            "192.168.100.255",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn a_method_reads_as_sent_and_standard_ones_are_not_copied() {
        for name in ["GET", "POST", "DELETE", "PURGE", "X-CUSTOM"] {
            let method: Method = name.parse().unwrap();
            let text = method_text(&method);
            assert_eq!(text, name);
            let standard = !name.starts_with('X') && name != "PURGE";
            assert_eq!(matches!(text, Cow::Borrowed(_)), standard, "{name}");
        }
    }

    #[test]
    fn timestamps_read_as_jiff_writes_them() {
        let mut seconds: Vec<i64> = vec![
            0,
            59,
            86_399,
            86_400,
            951_782_400,     // 2000-02-29
            4_107_542_400,   // 2100-03-01
            253_402_207_200, // jiff's last second, in 9999
            -1,              // before 1970: jiff's own formatting
            -86_401,
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..5_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            seconds.push((state % 253_402_207_200) as i64);
        }
        for second in seconds {
            for nanos in [0, 1_000_000, 500_000_000, 999_999_999, 123_456_789] {
                for nanos in [nanos, -nanos] {
                    let Ok(ts) = Timestamp::new(second, nanos) else {
                        continue;
                    };
                    let mut text = String::new();
                    push_rfc3339_millis(&mut text, ts);
                    assert_eq!(text, format!("{ts:.3}"), "{second}s {nanos}ns");
                }
            }
        }
    }

    #[test]
    fn the_hand_written_line_is_serde_jsons_byte_for_byte() {
        let sparse = UsageRecord::from_context(context("r1"), Duration::from_micros(1500));
        let mut full = sparse.clone();
        full.team = Some("alpha".into());
        full.key_id = Some("k-1".into());
        full.env = Some("prod".into());
        full.route = Some("POST /v1/text-to-image".into());
        full.upstream_status = Some(200);
        full.upstream_latency_ms = Some(0.0);
        full.bytes_in = u64::MAX;
        full.user_agent =
            Some("curl/8.5 \"quoted\" back\\slash tab\t nul\u{0} del\u{7f} é 😀 </script>".into());
        full.path = "/v1/\u{1b}[31m\r\n".into();
        full.minute_used = Some(0);
        full.minute_limit = Some(60);
        full.day_used = Some(12_345_678_901);
        full.day_limit = Some(1);
        for latency in [
            0.0,
            1.5,
            0.001,
            123456.789,
            1e-7,
            1e21,
            f64::NAN,
            f64::INFINITY,
        ] {
            for record in [&sparse, &full] {
                let mut record = record.clone();
                record.latency_ms = latency;
                assert_eq!(
                    record.to_line(),
                    serde_json::to_string(&record).unwrap(),
                    "latency {latency}"
                );
            }
        }
    }

    #[test]
    fn a_record_has_exactly_the_spec_fields_with_nulls() {
        let record = UsageRecord::from_context(context("r1"), Duration::from_micros(1500));
        let value: serde_json::Value = serde_json::from_str(&record.to_line()).unwrap();
        let object = value.as_object().unwrap();
        let fields: Vec<&str> = object.keys().map(String::as_str).collect();
        let mut expected = vec![
            "ts",
            "request_id",
            "team",
            "key_id",
            "env",
            "method",
            "path",
            "route",
            "status",
            "upstream_status",
            "outcome",
            "latency_ms",
            "upstream_latency_ms",
            "bytes_in",
            "bytes_out",
            "client_ip",
            "user_agent",
            "minute_used",
            "minute_limit",
            "day_used",
            "day_limit",
        ];
        let mut got = fields.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        assert_eq!(object["ts"], "2026-11-27T10:00:00.500Z");
        assert_eq!(object["team"], serde_json::Value::Null);
        assert_eq!(object["latency_ms"], 1.5);
        let back: UsageRecord = serde_json::from_str(&record.to_line()).unwrap();
        assert_eq!(back, record);
    }

    /// A sink that blocks until released: the writer is stuck, the queue fills.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cvar) = &*self.0;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cvar.wait(released).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let metrics = Arc::new(Metrics::new());
        let log = UsageLog::start_with_output(
            UsageSink::Stdout,
            4,
            metrics.clone(),
            Vec::new(),
            Some(Box::new(Stuck(gate.clone()))),
        )
        .unwrap();
        // One line is taken by the stuck writer, four wait in the queue, the rest drop.
        for i in 0..20 {
            log.enqueue(Completed {
                ctx: context(&format!("r{i}")),
                latency: Duration::from_millis(1),
            });
        }
        let dropped = metrics.usage_lines_dropped(UsageDrop::QueueFull);
        assert!((15..=16).contains(&dropped), "dropped {dropped}");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }
}
