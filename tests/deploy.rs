//! The deploy files are applied as they are, so they are checked like code: every YAML
//! parses, Kubernetes manifests validate against the API schema, the alert rules pass
//! promtool, the configs they carry are valid keygate configs, and every metric the rules
//! and the dashboard name exists on a running gateway's /metrics.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files_with(ext: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &[&str], out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, ext, out);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ext.contains(&e))
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), ext, &mut out);
    out.sort();
    out
}

fn run(tool: &str, args: &[&str], install_hint: &str) -> (bool, String) {
    let output = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}); {install_hint} — .ci/run installs it on a fresh machine")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Loads every document of a YAML file as JSON, through Python's YAML parser.
fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let script =
        "import json,sys,yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let (ok, text) = run(
        "python3",
        &["-c", script, path.to_str().unwrap()],
        "install python3 and PyYAML (`pip install pyyaml`)",
    );
    assert!(ok, "{} does not parse as YAML:\n{text}", path.display());
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_yaml_file_parses() {
    let files = files_with(&["yaml", "yml"]);
    assert!(
        files.len() >= 10,
        "deploy/ holds {} YAML files",
        files.len()
    );
    for file in files {
        let docs = yaml_documents(&file);
        assert!(!docs.is_empty(), "{} is empty", file.display());
    }
    let dashboard = std::fs::read_to_string(deploy_dir().join("grafana/keygate.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(dashboard["panels"].as_array().unwrap().len() >= 8);
}

#[test]
fn kubernetes_manifests_validate_against_the_schema() {
    let manifests: Vec<PathBuf> = files_with(&["yaml"])
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "k8s"))
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    assert!(manifests.len() >= 8);
    let mut args = vec!["-m", "kubernetes_validate", "--strict"];
    args.extend(manifests.iter().map(|p| p.to_str().unwrap()));
    let (ok, text) = run("python3", &args, "`pip install kubernetes-validate`");
    assert!(ok, "kubernetes-validate --strict failed:\n{text}");
    assert!(!text.contains("failed"), "{text}");
}

#[test]
fn kustomizations_name_existing_files_and_the_sidecar_is_locked_down() {
    for variant in ["sidecar", "fleet"] {
        let dir = deploy_dir().join("k8s").join(variant);
        let kustomization = &yaml_documents(&dir.join("kustomization.yaml"))[0];
        for resource in kustomization["resources"].as_array().unwrap() {
            let file = dir.join(resource.as_str().unwrap());
            assert!(
                file.is_file(),
                "{} names missing {}",
                variant,
                file.display()
            );
        }
    }
    let deployment = &yaml_documents(&deploy_dir().join("k8s/sidecar/deployment.yaml"))[0];
    let spec = &deployment["spec"]["template"]["spec"];
    let sidecar = &spec["initContainers"][0];
    assert_eq!(sidecar["restartPolicy"], "Always", "native sidecar form");
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(sidecar["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert!(
        spec["terminationGracePeriodSeconds"].as_u64().unwrap() > 30,
        "longer than shutdown_grace"
    );
    let service = &yaml_documents(&deploy_dir().join("k8s/sidecar/service.yaml"))[0];
    let ports: Vec<&serde_json::Value> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert!(
        ports
            .iter()
            .all(|p| p["targetPort"] != 9090 && p["targetPort"] != "admin"),
        "the admin port stays in the pod"
    );
}

#[test]
fn configs_shipped_in_deploy_files_are_valid() {
    let mut checked = 0;
    for file in files_with(&["yaml"]) {
        for doc in yaml_documents(&file) {
            if doc["kind"] == "ConfigMap" {
                if let Some(text) = doc["data"]["keygate.toml"].as_str() {
                    keygate::config::Config::from_toml(text)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                    checked += 1;
                }
            }
        }
    }
    let compose = std::fs::read_to_string(deploy_dir().join("compose/keygate.toml")).unwrap();
    keygate::config::Config::from_toml(&compose)
        .unwrap_or_else(|e| panic!("compose/keygate.toml: {e}"));
    assert_eq!(checked, 2, "sidecar and fleet ConfigMaps");
}

/// Peak memory per request in flight to an HTTPS upstream, with room: 51 KB measured
/// (5000 in flight, PERFORMANCE.md session 6), and what a replica holds with none.
const BYTES_PER_REQUEST_IN_FLIGHT: u64 = 56 * 1024;
const BASE_BYTES: u64 = 32 * 1024 * 1024;

fn quantity_bytes(quantity: &str) -> u64 {
    let units = [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| quantity.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or_else(|| panic!("memory quantity {quantity:?}: use Ki, Mi or Gi"));
    number.parse::<u64>().unwrap() * unit
}

/// A replica at its connection cap answers the next client 503; over its memory limit it is
/// killed with every request in flight. So the cap must come first.
#[test]
fn memory_limits_hold_max_requests_in_flight() {
    for (variant, container) in [("sidecar", "initContainers"), ("fleet", "containers")] {
        let dir = deploy_dir().join("k8s").join(variant);
        let deployment = &yaml_documents(&dir.join("deployment.yaml"))[0];
        let keygate = &deployment["spec"]["template"]["spec"][container][0];
        assert_eq!(keygate["name"], "keygate", "{variant}");
        let limit = quantity_bytes(keygate["resources"]["limits"]["memory"].as_str().unwrap());
        let configmap = &yaml_documents(&dir.join("configmap.yaml"))[0];
        let config =
            keygate::config::Config::from_toml(configmap["data"]["keygate.toml"].as_str().unwrap())
                .unwrap();
        // HTTP/2 streams included: the connection cap alone would not bound them.
        let cap = config.server.max_requests_in_flight as u64;
        let needed = BASE_BYTES + cap * BYTES_PER_REQUEST_IN_FLIGHT;
        assert!(
            needed <= limit,
            "{variant}: {cap} requests in flight need ~{} MiB, the limit is {} MiB",
            needed >> 20,
            limit >> 20
        );
    }
}

#[test]
fn dockerfile_copies_what_exists_and_the_context_keeps_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(deploy_dir().join("docker/Dockerfile")).unwrap();
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(
                root.join(source).exists(),
                "Dockerfile copies missing {source}"
            );
            let top = source.split('/').next().unwrap();
            assert!(
                !ignore.lines().any(|l| l.trim_end_matches('/') == top),
                ".dockerignore excludes {source}"
            );
        }
    }
    assert!(dockerfile.contains("USER 65532"), "non-root runtime");
    assert!(dockerfile.contains("distroless"), "no shell at run time");
}

#[test]
fn alert_rules_pass_promtool() {
    let rules = deploy_dir().join("prometheus/alerts.yaml");
    let (ok, text) = run(
        "promtool",
        &["check", "rules", rules.to_str().unwrap()],
        "`apt-get install prometheus`",
    );
    assert!(ok, "promtool check rules failed:\n{text}");
}

/// `keygate_*` names in a text, with histogram series suffixes folded to the family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("keygate_") {
        let start = i + pos;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if before_ok {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(family.to_string());
        }
        i = end;
    }
    names
}

/// On a gateway with every optional family: a Redis store with local slices.
#[tokio::test]
async fn every_metric_the_rules_and_dashboard_name_is_exported() {
    let redis = common::redis::RedisServer::start();
    let upstream = MockUpstream::start().await;
    let store = format!("[store]\nurl = \"{}\"\nlocal_slices = true", redis.url());
    let gateway =
        TestGateway::start(config_from(&standard_config_text(&upstream.url(), &store))).await;
    gateway.generate(TOKEN_DESIGN_GENERATE).await;
    gateway.generate("kg_prod_unknown").await;
    let metrics = gateway
        .client
        .get(format!("{}/metrics", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let exported: BTreeSet<String> = metrics
        .text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let mut named = metric_names(
        &std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yaml")).unwrap(),
    );
    named.extend(metric_names(
        &std::fs::read_to_string(deploy_dir().join("grafana/keygate.json")).unwrap(),
    ));
    assert!(named.len() >= 10, "{named:?}");
    let missing: Vec<&String> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named by rules or dashboard but not exported: {missing:?}"
    );
    gateway.shutdown().await;
}
