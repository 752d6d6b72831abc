//! The command line through the real binary: `check` reports every problem and exits 64,
//! `token new` / `token hash` print what an operator pastes into the config, and
//! `keygate demo` shows a newcomer a 200, a 403 and a 429 exactly as it prints them.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const KEYGATE: &str = env!("CARGO_BIN_EXE_keygate");
/// The env var the CLI test configs read their real key from.
const KEY_VAR: &str = "KEYGATE_CLI_TEST_REAL_KEY";

fn keygate(args: &[&str]) -> Command {
    let mut command = Command::new(KEYGATE);
    command.args(args);
    // Nothing from the surrounding environment may change what a test sees.
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYGATE_") || name == "IMAGEN_API_KEY" {
            command.env_remove(name);
        }
    }
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("the keygate binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    file.write_all(text.as_bytes()).expect("config writes");
    file
}

/// A config valid in every respect, whose only key comes from [`KEY_VAR`].
fn valid_config() -> String {
    standard_config_text("https://api.imagen.ai", "")
        .replace("KEYGATE_TEST_UNUSED_PROD", KEY_VAR)
        .replace(
            "[upstream.keys.dev]\nenv = \"KEYGATE_TEST_UNUSED_DEV\"\n",
            "",
        )
        .replace("env = \"dev\"", "env = \"prod\"")
}

fn check(path: &Path) -> Command {
    keygate(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn check_accepts_a_valid_config_when_its_key_is_set() {
    let file = config_file(&valid_config());
    let output = run(check(file.path()).env(KEY_VAR, "sk-cli-test"));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(!stdout.contains("sk-cli-test") && !text(&output.stderr).contains("sk-cli-test"));
}

#[test]
fn check_refuses_a_valid_config_whose_key_is_missing() {
    let file = config_file(&valid_config());
    let output = run(&mut check(file.path()));
    assert_eq!(output.status.code(), Some(64));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("upstream.keys.prod") && stderr.contains(KEY_VAR),
        "{stderr}"
    );
}

#[test]
fn check_accepts_the_reference_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.toml");
    let output = run(check(&path).env("IMAGEN_API_KEY", "sk-reference"));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn check_prints_every_problem_at_once_and_exits_64() {
    let broken = valid_config()
        .replace("plan = \"free\"", "plan = \"platinum\"")
        .replace("timeout = \"5s\"", "timeout = \"soon\"")
        .replace("\nlisten = \"127.0.0.1:0\"", "\nlisten = \"localhost-ish\"")
        .replace("scope = \"read\"", "scope = \"write\"")
        .replace("rpm = 3", "rpm = 0")
        .replace(
            "id = \"design-read\"",
            "id = \"design-read\"\ncolour = \"blue\"",
        )
        + "\n[quotas]\nday_tz = \"Mars/Olympus\"\n";
    let file = config_file(&broken);
    let output = run(check(file.path()).env(KEY_VAR, "sk-cli-test"));
    assert_eq!(output.status.code(), Some(64));
    let stderr = text(&output.stderr);
    for needle in [
        "teams[1].plan: unknown plan \"platinum\"",
        "upstream.timeout: \"soon\"",
        "server.listen: \"localhost-ish\"",
        "routes[1].scope: unknown scope \"write\"",
        "keys[2].rpm: 0 is out of range",
        "colour",
        "quotas.day_tz: \"Mars/Olympus\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(stderr.contains("7 problems"), "{stderr}");
}

#[test]
fn check_reports_a_missing_key_together_with_the_other_problems() {
    let broken = valid_config().replace("plan = \"free\"", "plan = \"platinum\"");
    let file = config_file(&broken);
    let output = run(&mut check(file.path()));
    assert_eq!(output.status.code(), Some(64));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("2 problems"), "{stderr}");
    assert!(stderr.contains("unknown plan \"platinum\""), "{stderr}");
    assert!(
        stderr.contains(&format!("upstream.keys.prod: env var {KEY_VAR} is not set")),
        "{stderr}"
    );
}

#[test]
fn check_sees_environment_overrides() {
    let file = config_file(&valid_config());
    let output = run(check(file.path())
        .env(KEY_VAR, "sk-cli-test")
        .env("KEYGATE_STORE__URL", "mongodb://db:27017"));
    assert_eq!(output.status.code(), Some(64));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("store.url: \"mongodb://db:27017\""),
        "{stderr}"
    );
}

fn sha256_hex(text: &str) -> String {
    keygate::auth::sha256_hex(text.as_bytes())
}

#[test]
fn token_hash_reads_the_argument_or_stdin() {
    let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let output = run(&mut keygate(&["token", "hash", "abc"]));
    assert!(output.status.success());
    assert_eq!(text(&output.stdout), format!("{expected}\n"));

    let mut child = keygate(&["token", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(text(&output.stdout), format!("{expected}\n"));
}

#[tokio::test]
async fn token_new_prints_the_token_once_and_a_stanza_that_works() {
    let output = run(&mut keygate(&[
        "token",
        "new",
        "--team",
        "design",
        "--id",
        "design-new-1",
        "--scopes",
        "generate,read",
        "--env",
        "prod",
    ]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let token = stdout
        .lines()
        .find(|line| line.starts_with("kg_prod_"))
        .unwrap_or_else(|| panic!("no token line in:\n{stdout}"))
        .to_string();
    assert_eq!(stdout.matches(token.as_str()).count(), 1, "{stdout}");
    let hash = sha256_hex(&token);
    assert!(
        stdout.contains(&format!("token_sha256 = \"{hash}\"")),
        "{stdout}"
    );

    // `token hash` agrees, and the printed stanza pasted into a config lets the token in.
    let hashed = run(&mut keygate(&["token", "hash", &token]));
    assert_eq!(text(&hashed.stdout).trim(), hash);
    let stanza = &stdout[stdout.find("[[keys]]").expect("a [[keys]] stanza")..];
    let upstream = MockUpstream::start().await;
    let config = config_from(&standard_config_text(&upstream.url(), stanza));
    let gateway = TestGateway::start(config).await;
    let answer = Answer::read(gateway.generate(&token).await).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        upstream.received()[0].headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );
    gateway.shutdown().await;

    let refused = run(&mut keygate(&[
        "token",
        "new",
        "--team",
        "design",
        "--id",
        "x",
        "--scopes",
        "generate,write",
    ]));
    assert_eq!(refused.status.code(), Some(64));
    assert!(text(&refused.stderr).contains("\"write\""));
}

/// What `keygate demo` printed, parsed the way a newcomer reads it.
struct DemoOutput {
    generate_token: String,
    read_token: String,
    /// The URL and body of the first printed curl line.
    url: String,
    body: String,
    rpm: usize,
    readyz: String,
}

fn parse_demo(printed: &str) -> DemoOutput {
    let value_of = |name: &str| {
        printed
            .lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name}= in:\n{printed}"))
            .to_string()
    };
    let curl = printed
        .lines()
        .find(|line| line.starts_with("curl -i -X POST "))
        .unwrap_or_else(|| panic!("no curl line in:\n{printed}"));
    let url = curl["curl -i -X POST ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let body = curl
        .split_once("-d '")
        .and_then(|(_, rest)| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no -d body in {curl}"))
        .to_string();
    let rpm = printed
        .split_once("may send ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rpm in:\n{printed}"));
    let readyz = printed
        .lines()
        .find_map(|line| line.strip_prefix("curl -i ")?.strip_suffix("/readyz"))
        .map(|admin| format!("{admin}/readyz"))
        .unwrap_or_else(|| panic!("no readyz line in:\n{printed}"));
    DemoOutput {
        generate_token: value_of("GENERATE_TOKEN"),
        read_token: value_of("READ_TOKEN"),
        url,
        body,
        rpm,
        readyz,
    }
}

#[tokio::test]
async fn demo_shows_a_200_a_403_and_a_429_as_printed() {
    let stderr_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = tokio::process::Command::new(KEYGATE)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env_remove("KEYGATE_LOG")
        .stdout(Stdio::piped())
        .stderr(stderr_file.reopen().unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("keygate demo starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Ctrl-C stops the demo") {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the demo did not finish printing:\n{printed}"));
    let demo = parse_demo(&printed);
    let client = client();
    let post = |token: &str| {
        client
            .post(&demo.url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(demo.body.clone())
            .send()
    };

    let ok = post(&demo.generate_token).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["x-ratelimit-limit"],
        demo.rpm.to_string().as_str()
    );
    let image = json_body(ok).await;
    assert!(image["data"][0]["url"].is_string(), "{image}");

    let forbidden = post(&demo.read_token).await.unwrap();
    assert_eq!(forbidden.status(), 403);
    assert_eq!(forbidden.text().await.unwrap(), FORBIDDEN_BODY);

    for _ in 1..demo.rpm {
        assert_eq!(post(&demo.generate_token).await.unwrap().status(), 200);
    }
    let limited = post(&demo.generate_token).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(limited.text().await.unwrap(), RATE_LIMITED_BODY);

    let unknown = post("kg_prod_not_a_real_token").await.unwrap();
    assert_eq!(unknown.status(), 401);
    assert_eq!(client.get(&demo.readyz).send().await.unwrap().status(), 200);

    // SIGTERM stops the demo cleanly.
    let pid = child.id().expect("the demo is running").to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the demo exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let logged = std::fs::read_to_string(stderr_file.path()).unwrap();
    assert!(!logged.is_empty());
    for token in [&demo.generate_token, &demo.read_token] {
        assert!(!logged.contains(token.as_str()), "a demo token was logged");
    }
}
