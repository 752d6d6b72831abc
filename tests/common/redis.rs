//! Real `redis-server` processes for tests: a fresh one on a free port in a temp dir,
//! persistence off, killed when dropped. Never the machine's own Redis on 6379. A
//! [`RedisCluster`] is three such servers joined with `redis-cli --cluster create`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn spawn(port: u16, dir: &Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}); install it (`apt-get install -y redis-server`) \
                 — .ci/run does this on a fresh machine"
            )
        })
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts `redis-server` with extra arguments (e.g. `["--cluster-enabled", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let port = free_port();
        let child = spawn(port, dir.path(), &extra);
        let mut server = Self {
            port,
            extra,
            child: Some(child),
            dir,
        };
        server.wait_ready();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server on port {} exited at start: {status}",
                        self.port
                    );
                }
            }
            if self.cli(&["PING"]).is_some_and(|out| out.trim() == "PONG") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
    }

    /// Runs one `redis-cli` command against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// True when the server answers PING within `within` (false while it is killed or
    /// busy, e.g. in `DEBUG SLEEP`).
    pub fn answers_within(&self, within: Duration) -> bool {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, within) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(within));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    /// Blocks the server for `secs` seconds (`DEBUG SLEEP`, which needs the server started
    /// with `--enable-debug-command yes`) from a background thread, and returns once the
    /// server has stopped answering.
    pub fn sleep_in_background(&self, secs: u32) -> std::thread::JoinHandle<()> {
        let port = self.port;
        let handle = std::thread::spawn(move || {
            let output = Command::new("redis-cli")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "DEBUG",
                    "SLEEP",
                    &secs.to_string(),
                ])
                .output()
                .expect("redis-cli runs");
            let text = String::from_utf8_lossy(&output.stdout);
            assert!(text.trim() == "OK", "DEBUG SLEEP failed: {text}");
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.answers_within(Duration::from_millis(100)) {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} never went to sleep",
                port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        handle
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: persistence is off).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(self.port, self.dir.path(), &self.extra));
        self.wait_ready();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three `--cluster-enabled` masters on free ports, joined with
/// `redis-cli --cluster create … --cluster-replicas 0 --cluster-yes`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // Give the cluster bus its own free port: port + 10000 may be taken or invalid.
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-port",
                    &bus,
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli --cluster create ({e}); install redis-tools")
            });
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_ok();
        cluster
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all_ok = self.nodes.iter().all(|node| {
                node.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            });
            if all_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The node that holds `key`'s slot.
    pub fn node_for(&self, key: &str) -> &RedisServer {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT answers");
        let slots = self.nodes[0]
            .cli(&["CLUSTER", "SLOTS"])
            .expect("CLUSTER SLOTS answers");
        // redis-cli prints CLUSTER SLOTS flattened: start, end, ip, port, id, per range.
        let lines: Vec<&str> = slots.lines().map(str::trim).collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>()) {
                if lines[i + 2] == "127.0.0.1" && (start..=end).contains(&slot) {
                    let port: u16 = lines[i + 3].parse().expect("a port");
                    return self
                        .nodes
                        .iter()
                        .find(|n| n.port == port)
                        .expect("a node of ours");
                }
            }
            i += 1;
        }
        panic!("no node holds slot {slot}:\n{slots}");
    }
}
