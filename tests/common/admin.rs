//! The admin API from a test: an admin token added to the standard config, and requests
//! to a gateway's admin listener.

use super::{hash, TestGateway};

/// A config key with scope `admin` (added by [`admin_extra`]).
pub const TOKEN_ADMIN: &str = "kg_prod_platform_admin_token_00000000000000099";

/// Config text for `standard_config_text`'s `extra`: the `platform-admin` key.
pub fn admin_extra() -> String {
    format!(
        r#"
[[keys]]
id = "platform-admin"
team = "design"
token_sha256 = "{}"
scopes = ["admin"]
env = "prod"
"#,
        hash(TOKEN_ADMIN)
    )
}

pub async fn admin(
    gateway: &TestGateway,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> reqwest::Response {
    let mut request = gateway
        .client
        .request(method, format!("{}{path}", gateway.admin))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    request.send().await.expect("admin request")
}

/// `POST /admin/keys` as the admin: status, parsed body and raw body.
pub async fn create(
    gateway: &TestGateway,
    body: serde_json::Value,
) -> (u16, serde_json::Value, String) {
    let response = admin(
        gateway,
        reqwest::Method::POST,
        "/admin/keys",
        TOKEN_ADMIN,
        Some(body),
    )
    .await;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, json, text)
}

/// `DELETE /admin/keys/{id}` as the admin.
pub async fn revoke(gateway: &TestGateway, id: &str) -> reqwest::Response {
    let path = format!("/admin/keys/{id}");
    admin(gateway, reqwest::Method::DELETE, &path, TOKEN_ADMIN, None).await
}
