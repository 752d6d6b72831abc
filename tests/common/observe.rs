//! What an operator sees, for tests: `/metrics` fetched and checked with `promtool`, single
//! series read out of it, and usage-log lines awaited by request id (polled with a deadline:
//! the writer thread has no event to wait on).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::io::Write;

use super::TestGateway;

/// The exact field set of a usage line (SPEC §5).
pub const USAGE_FIELDS: [&str; 21] = [
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

impl TestGateway {
    /// `GET /metrics` on the admin listener; asserts the status and content type.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("admin listener answers");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        response.text().await.unwrap()
    }
}

/// Runs `promtool check metrics` on a scrape and fails the test with its complaints.
pub fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => panic!(
            "promtool is needed to check /metrics and could not be started ({e}); install it \
             with `apt-get install -y prometheus` — .ci/run does this on a fresh machine"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool rejected /metrics ({}):\n{}{}\n--- scrape ---\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// The value of the one series with exactly this name and these labels (in any order).
pub fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (head, value) = line.rsplit_once(' ')?;
            let (series_name, got) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (head, ""),
            };
            if series_name != name {
                return None;
            }
            let mut got: Vec<String> = split_labels(got);
            got.sort();
            (got == wanted).then(|| value.parse().ok())?
        })
}

/// Splits `a="x",b="y, z"` on the commas between labels (values never hold `",`).
fn split_labels(text: &str) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    text.split("\",")
        .map(|part| {
            if part.ends_with('"') {
                part.to_string()
            } else {
                format!("{part}\"")
            }
        })
        .collect()
}

/// A usage log file written by a gateway under test.
pub struct UsageFile {
    pub path: PathBuf,
}

impl UsageFile {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Every line so far, parsed; a line that is not JSON fails the test.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits (polling, up to five seconds) for the line of this request id.
    pub async fn wait_for(&self, request_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self
                .lines()
                .into_iter()
                .find(|l| l["request_id"] == request_id)
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no usage line for request {request_id} in {} within 5 s",
                self.path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}
