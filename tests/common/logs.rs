//! Captures every log line the gateway writes during a test binary's run (at TRACE for
//! keygate, DEBUG for the HTTP stack), so tests can assert no secret was ever logged.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

static CAPTURED: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn buffer() -> &'static Mutex<Vec<u8>> {
    CAPTURED.get_or_init(|| Mutex::new(Vec::new()))
}

#[derive(Clone, Copy)]
struct Capture;

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        buffer().lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        Capture
    }
}

pub fn install() {
    let filter = EnvFilter::new("keygate=trace,hyper=debug,hyper_util=debug,rustls=debug,info");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Capture)
        .json()
        .try_init();
}

/// Everything logged so far in this test binary.
pub fn captured() -> String {
    String::from_utf8_lossy(&buffer().lock().unwrap()).into_owned()
}

/// Fails when any of the given secrets appears in the captured logs.
pub fn assert_clean(secrets: &[&str]) {
    let logs = captured();
    for secret in secrets {
        assert!(
            !logs.contains(secret),
            "a secret appeared in the logs ({} bytes captured)",
            logs.len()
        );
    }
}
