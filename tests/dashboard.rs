//! The operator dashboard in a real browser: Debian's chromium, driven by playwright-core
//! (tests/browser/dashboard.mjs), against a gateway with traffic from two teams. The page's
//! numbers must match `/admin/usage`; a `read` token sees only its team; a bad token shows
//! the 401 message. Screenshots land in the test's target tmp dir.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const TOKEN_ADMIN: &str = "kg_prod_dashboard_admin_token_0000000000000042";

#[tokio::test]
async fn dashboard_shows_what_the_admin_api_says() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in tests/browser (.ci/run does)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "chromium is not installed: `apt-get install chromium` (.ci/run does)"
    );

    let upstream = MockUpstream::start().await;
    let extra = format!(
        "\n[[keys]]\nid = \"dash-admin\"\nteam = \"design\"\ntoken_sha256 = \"{}\"\nscopes = [\"admin\"]\nenv = \"prod\"\n",
        hash(TOKEN_ADMIN)
    );
    let gateway =
        TestGateway::start(config_from(&standard_config_text(&upstream.url(), &extra))).await;
    for _ in 0..3 {
        assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 200);
    }
    for _ in 0..2 {
        assert_eq!(gateway.generate(TOKEN_MARKETING).await.status(), 200);
    }
    assert_eq!(gateway.generate(TOKEN_DESIGN_READ).await.status(), 403);

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let admin_base = gateway.admin.clone();
    let shots_arg = shots.display().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.mjs")
            .args([&admin_base, TOKEN_ADMIN, TOKEN_DESIGN_READ, &shots_arg])
            .current_dir(browser_dir)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs (install nodejs)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let page: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("browser script output is not JSON ({e}):\n{stdout}\n{stderr}"));
    assert!(
        page.get("failure").is_none(),
        "browser run failed: {}",
        page["failure"]
    );

    // Bad token: the seed's 401 message, no data.
    assert_eq!(page["bad_token_error"], "Invalid API key");
    assert_eq!(page["bad_token_content_hidden"], true);

    // Admin: every team, numbers as /admin/usage says.
    let usage = json_body(
        gateway
            .client
            .get(format!("{}/admin/usage", gateway.admin))
            .bearer_auth(TOKEN_ADMIN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let shown = page["admin_teams"].as_array().unwrap();
    let api = usage["teams"].as_array().unwrap();
    assert_eq!(shown.len(), api.len());
    for team in api {
        let row = shown
            .iter()
            .find(|r| r["team"] == team["team"])
            .unwrap_or_else(|| panic!("{} not shown", team["team"]));
        assert_eq!(row["minute_used"], team["minute"]["used"]);
        assert_eq!(row["minute_limit"], team["minute"]["limit"]);
        assert_eq!(row["day_used"], team["day"]["used"]);
        assert_eq!(row["day_limit"], team["day"]["limit"]);
    }
    let design = shown.iter().find(|r| r["team"] == "design").unwrap();
    assert_eq!(design["minute_used"], 3);
    let marketing = shown.iter().find(|r| r["team"] == "marketing").unwrap();
    assert_eq!(marketing["minute_used"], 2);
    assert!(design["text"].as_str().unwrap().contains("3 / 100"));
    let series: Vec<&str> = page["admin_series"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        series.contains(&"design") && series.contains(&"marketing"),
        "{series:?}"
    );
    let keys: Vec<&str> = page["admin_keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(keys.contains(&"design-generate") && keys.contains(&"dash-admin"));

    // The token stays in sessionStorage only, and never on the page.
    assert_eq!(page["storage"]["session"], true);
    assert_eq!(page["storage"]["local"], 0);
    assert_eq!(page["token_field_cleared"], true);
    let text = page["page_text"].as_str().unwrap();
    for secret in [TOKEN_ADMIN, REAL_KEY, &hash(TOKEN_DESIGN_GENERATE)] {
        assert!(!text.contains(secret), "a secret is shown on the page");
    }

    // Read token: its own team only, no key list.
    let read: Vec<&str> = page["read_teams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["team"].as_str())
        .collect();
    assert_eq!(read, vec!["design"]);
    let read_series: Vec<&str> = page["read_series"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(read_series, vec!["design"]);
    assert!(page["read_keys_note"].as_str().unwrap().contains("admin"));

    // A strict CSP held, nothing broke, and the narrow layout does not scroll sideways.
    assert!(page["csp"].as_str().unwrap().contains("default-src 'none'"));
    assert_eq!(
        page["console_errors"],
        serde_json::json!([]),
        "console errors (CSP violations show here)"
    );
    assert_eq!(page["narrow_overflow"], false);
    assert!(shots.join("dashboard-admin-1280x800.png").is_file());
    gateway.shutdown().await;
    logs::assert_clean(&[TOKEN_ADMIN, REAL_KEY, TOKEN_DESIGN_READ]);
}

/// The page's own assets and the JSON it reads, without a browser.
#[tokio::test]
async fn assets_are_self_contained_and_series_respect_scopes() {
    let upstream = MockUpstream::start().await;
    let extra = format!(
        "\n[[keys]]\nid = \"dash-admin\"\nteam = \"design\"\ntoken_sha256 = \"{}\"\nscopes = [\"admin\"]\nenv = \"prod\"\n",
        hash(TOKEN_ADMIN)
    );
    let gateway =
        TestGateway::start(config_from(&standard_config_text(&upstream.url(), &extra))).await;
    for path in ["/dashboard", "/dashboard/app.js", "/dashboard/app.css"] {
        let response = gateway
            .client
            .get(format!("{}{path}", gateway.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let csp = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
        // The SVG namespace is a name, not a load.
        let text = response
            .text()
            .await
            .unwrap()
            .replace("http://www.w3.org/2000/svg", "");
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{path} loads nothing from elsewhere"
        );
    }
    gateway.generate(TOKEN_DESIGN_GENERATE).await;
    gateway.generate(TOKEN_DESIGN_READ).await; // 403
    gateway.generate(TOKEN_MARKETING).await;
    gateway.generate("kg_prod_unknown_token").await; // 401

    let series_for = |token: &'static str| {
        let client = gateway.client.clone();
        let url = format!("{}/admin/series?minutes=5", gateway.admin);
        async move {
            // The series is fed by the usage writer thread: wait for all four lines.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let body =
                    json_body(client.get(&url).bearer_auth(token).send().await.unwrap()).await;
                let total: u64 = body["teams"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|t| t["series"].as_object().unwrap().values())
                    .flat_map(|v| v.as_array().unwrap().iter().map(|n| n.as_u64().unwrap()))
                    .sum();
                if total >= 2 || std::time::Instant::now() > deadline {
                    return body;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let own = series_for(TOKEN_DESIGN_READ).await;
    let teams = own["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["team"], "design");
    assert_eq!(teams[0]["series"]["forwarded"].as_array().unwrap().len(), 5);
    assert_eq!(teams[0]["series"]["forwarded"][4], 1);
    assert_eq!(teams[0]["series"]["denied"][4], 1);

    let all = series_for(TOKEN_ADMIN).await;
    let names: Vec<&str> = all["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["team"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"design") && names.contains(&"marketing"),
        "{names:?}"
    );

    let bad = gateway
        .client
        .get(format!("{}/admin/series?minutes=0", gateway.admin))
        .bearer_auth(TOKEN_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let alerts = gateway
        .client
        .get(format!("{}/admin/alerts", gateway.admin))
        .bearer_auth(TOKEN_DESIGN_READ)
        .send()
        .await
        .unwrap();
    assert_eq!(alerts.status(), 200);
    gateway.shutdown().await;
}
