//! Owns the admin API (SPEC §6) on the admin listener: keys made, listed, revoked and
//! rotated at run time, and current usage. Callers authenticate with an internal token:
//! scope `admin` for keys and all usage, `read` for their own team's usage.
//!
//! Keys made here live in the key store, so every replica sees them (within
//! [`crate::reload::KEY_POLL_INTERVAL`]); keys from the config file are read-only here. A
//! token is returned once, by create and rotate; only its hash is stored.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, ApiKey, KeyOrigin};
use crate::body::ResponseBody;
use crate::config::{parse_duration, MAX_LIMIT, MIN_LIMIT};
use crate::error::{Forbidden, GatewayError};
use crate::gateway::Gateway;
use crate::key_store::{PreviousToken, StoredKey};
use crate::pipeline::json_response;
use crate::quota::{Subject, SubjectKind, WindowUsage};
use crate::scope::Scope;
use crate::token::new_token;

/// Admin request bodies are small JSON objects.
const MAX_ADMIN_BODY: usize = 64 * 1024;
/// The longest grace a rotation may keep an old token alive.
const MAX_GRACE: Duration = Duration::from_secs(30 * 86_400);

pub async fn handle(gateway: Arc<Gateway>, request: Request<Incoming>) -> Response<ResponseBody> {
    match route(&gateway, request).await {
        Ok(response) => response,
        Err(error) => {
            if matches!(error.status().as_u16(), 500..=599) {
                tracing::warn!(error = %error, "admin request failed");
            }
            json_response(error.status(), error.body_bytes())
        }
    }
}

async fn route(
    gateway: &Gateway,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path
        .strip_prefix("/admin/")
        .unwrap_or("")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let method = request.method().clone();
    let known = matches!(
        segments.as_slice(),
        ["usage"] | ["series"] | ["alerts"] | ["keys"] | ["keys", _] | ["keys", _, "rotate"]
    );
    if !known {
        return Err(GatewayError::NotFound);
    }
    let caller = caller(gateway, &request)?;
    match (&method, segments.as_slice()) {
        (&Method::GET, ["usage"]) => usage(gateway, &caller, request.uri().query()).await,
        (&Method::GET, ["series"]) => series(gateway, &caller, request.uri().query()),
        (&Method::GET, ["alerts"]) => alerts(gateway, &caller, request.uri().query()),
        (&Method::GET, ["keys"]) => {
            require(&caller, Scope::Admin)?;
            Ok(list_keys(gateway))
        }
        (&Method::POST, ["keys"]) => {
            require(&caller, Scope::Admin)?;
            let body = read_json(request).await?;
            create_key(gateway, body).await
        }
        (&Method::DELETE, ["keys", id]) => {
            require(&caller, Scope::Admin)?;
            delete_key(gateway, id).await
        }
        (&Method::POST, ["keys", id, "rotate"]) => {
            require(&caller, Scope::Admin)?;
            let id = id.to_string();
            let body = read_json(request).await?;
            rotate_key(gateway, &id, body).await
        }
        _ => Err(GatewayError::MethodNotAllowed),
    }
}

fn caller(gateway: &Gateway, request: &Request<Incoming>) -> Result<Arc<ApiKey>, GatewayError> {
    let snapshot = gateway.snapshot();
    auth::authenticate(&snapshot.keys, request.headers(), gateway.clock.now())
        .map_err(GatewayError::Unauthorized)
}

fn require(caller: &ApiKey, scope: Scope) -> Result<(), GatewayError> {
    if caller.scopes.contains(scope) {
        Ok(())
    } else {
        Err(GatewayError::Forbidden(Forbidden::MissingScope))
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    request: Request<Incoming>,
) -> Result<T, GatewayError> {
    let bytes: Bytes = Limited::new(request.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| {
            GatewayError::InvalidRequest(format!("body must be JSON under {MAX_ADMIN_BODY} bytes"))
        })?
        .to_bytes();
    let bytes = if bytes.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes).map_err(|e| GatewayError::InvalidRequest(format!("body: {e}")))
}

fn created(body: Value) -> Response<ResponseBody> {
    json_response(StatusCode::CREATED, body.to_string())
}

fn ok(body: Value) -> Response<ResponseBody> {
    json_response(StatusCode::OK, body.to_string())
}

fn window_json(window: &WindowUsage) -> Value {
    json!({
        "used": window.used,
        "limit": window.limit,
        "remaining": window.remaining(),
        "reset_secs": window.reset_secs,
    })
}

/// `GET /admin/usage[?team=T]`: `read` sees its own team, `admin` any or all.
async fn usage(
    gateway: &Gateway,
    caller: &ApiKey,
    query: Option<&str>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let wanted = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("team="))
        .map(str::to_string);
    let is_admin = caller.scopes.contains(Scope::Admin);
    if !is_admin && !caller.scopes.contains(Scope::Read) {
        return Err(GatewayError::Forbidden(Forbidden::MissingScope));
    }
    let snapshot = gateway.snapshot();
    let config = &snapshot.config;
    let teams: Vec<_> = match (&wanted, is_admin) {
        (Some(team), _) if !is_admin && team.as_str() != &*caller.team => {
            return Err(GatewayError::Forbidden(Forbidden::MissingScope));
        }
        (Some(team), _) => vec![config.team(team).ok_or(GatewayError::NotFound)?],
        (None, true) => config.teams.iter().collect(),
        (None, false) => config.team(&caller.team).into_iter().collect(),
    };
    let timeout = gateway.edge.store_timeout * 4;
    let mut out = Vec::with_capacity(teams.len());
    for team in teams {
        let subject = [Subject {
            kind: SubjectKind::Team,
            id: team.name.as_str().into(),
            limits: team.limits,
        }];
        let usage = tokio::time::timeout(timeout, gateway.store.usage(&subject))
            .await
            .map_err(|_| GatewayError::StoreUnavailable("usage read timed out".into()))?
            .map_err(|e| GatewayError::StoreUnavailable(e.to_string()))?;
        let Some(usage) = usage.first() else { continue };
        out.push(json!({
            "team": team.name,
            "plan": team.plan,
            "minute": window_json(&usage.minute),
            "day": window_json(&usage.day),
        }));
    }
    let mut body = json!({
        "teams": out,
        "at": gateway.clock.now().to_string(),
        // Who is asking, so a client (the dashboard) knows what else it may read.
        "caller": { "key_id": &*caller.id, "team": &*caller.team, "scopes": caller.scopes.names() },
    });
    if let (true, Some(limits)) = (is_admin, config.upstream.limits) {
        let subject = [Subject {
            kind: SubjectKind::Upstream,
            id: "upstream".into(),
            limits,
        }];
        if let Ok(Ok(usage)) = tokio::time::timeout(timeout, gateway.store.usage(&subject)).await {
            if let Some(usage) = usage.first() {
                body["upstream"] = json!({
                    "minute": window_json(&usage.minute),
                    "day": window_json(&usage.day),
                });
            }
        }
    }
    Ok(ok(body))
}

fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// The teams a caller may see: all configured ones for `admin` (plus requests without a
/// valid token), its own for `read`.
fn visible_teams(gateway: &Gateway, caller: &ApiKey) -> Result<Vec<String>, GatewayError> {
    if caller.scopes.contains(Scope::Admin) {
        let snapshot = gateway.snapshot();
        let mut teams: Vec<String> = snapshot
            .config
            .teams
            .iter()
            .map(|t| t.name.clone())
            .collect();
        if gateway.observer.series.has_unauthenticated() {
            teams.push(crate::usage_series::UNAUTHENTICATED.to_string());
        }
        Ok(teams)
    } else if caller.scopes.contains(Scope::Read) {
        Ok(vec![caller.team.to_string()])
    } else {
        Err(GatewayError::Forbidden(Forbidden::MissingScope))
    }
}

/// `GET /admin/series?minutes=60`: requests per minute per team by outcome class, oldest
/// first, as seen by this replica.
fn series(
    gateway: &Gateway,
    caller: &ApiKey,
    query: Option<&str>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let teams = visible_teams(gateway, caller)?;
    let minutes = match query_param(query, "minutes") {
        None => crate::usage_series::MINUTES,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=crate::usage_series::MINUTES).contains(m))
            .ok_or_else(|| GatewayError::InvalidRequest("minutes must be 1 to 60".into()))?,
    };
    let now = gateway.clock.now().as_second();
    let names: Vec<&str> = teams.iter().map(String::as_str).collect();
    let series = gateway.observer.series.snapshot(&names, minutes, now);
    let first_minute = (now.div_euclid(60) - minutes as i64 + 1) * 60;
    Ok(ok(json!({
        "minutes": minutes,
        "start": Timestamp::from_second(first_minute).map(|t| t.to_string()).unwrap_or_default(),
        "scope": "replica",
        "teams": series,
    })))
}

/// `GET /admin/alerts[?since=RFC3339]`: the latest alerts this replica raised; a `read`
/// caller sees only its team's.
fn alerts(
    gateway: &Gateway,
    caller: &ApiKey,
    query: Option<&str>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let teams = visible_teams(gateway, caller)?;
    let is_admin = caller.scopes.contains(Scope::Admin);
    let since =
        match query_param(query, "since") {
            None => None,
            Some(text) => Some(text.replace("%3A", ":").parse::<Timestamp>().map_err(|_| {
                GatewayError::InvalidRequest("since must be an RFC 3339 time".into())
            })?),
        };
    let alerts: Vec<Value> = gateway
        .observer
        .recent_alerts
        .list()
        .into_iter()
        .filter(|a| {
            since.is_none_or(|s| {
                a["at"]
                    .as_str()
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .is_some_and(|at| at > s)
            })
        })
        .filter(|a| {
            is_admin
                || a["team"]
                    .as_str()
                    .is_some_and(|t| teams.iter().any(|v| v == t))
        })
        .collect();
    Ok(ok(json!({ "alerts": alerts })))
}

fn key_json(key: &ApiKey) -> Value {
    json!({
        "id": &*key.id,
        "team": &*key.team,
        "scopes": key.scopes.names(),
        "env": &*key.env,
        "origin": key.origin.as_str(),
        "created": key.created.map(|t| t.to_string()),
        "expires": key.expires.map(|t| t.to_string()),
        "last_used": key.last_used().map(|t| t.to_string()),
        "rpm": key.rpm,
        "rpd": key.rpd,
    })
}

/// `GET /admin/keys`: never a token or a hash.
fn list_keys(gateway: &Gateway) -> Response<ResponseBody> {
    let snapshot = gateway.snapshot();
    let keys: Vec<Value> = snapshot.by_id.values().map(|k| key_json(k)).collect();
    ok(json!({ "keys": keys }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    id: String,
    team: String,
    scopes: Vec<String>,
    env: String,
    expires: Option<String>,
    rpm: Option<u64>,
    rpd: Option<u64>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn store_error(e: crate::quota::StoreError) -> GatewayError {
    GatewayError::KeyStoreUnavailable(e.to_string())
}

/// `POST /admin/keys`: validates everything at once, then stores the hash of a new token.
async fn create_key(
    gateway: &Gateway,
    request: CreateKey,
) -> Result<Response<ResponseBody>, GatewayError> {
    let snapshot = gateway.snapshot();
    let config = &snapshot.config;
    let now = gateway.clock.now();
    let mut problems = Vec::new();
    if !valid_id(&request.id) {
        problems.push(format!(
            "id {:?} must be 1-128 characters of A-Z a-z 0-9 - _ .",
            request.id
        ));
    }
    if config.team(&request.team).is_none() {
        problems.push(format!("team {:?} is not a configured team", request.team));
    }
    if !config.upstream.keys.contains_key(&request.env) {
        problems.push(format!(
            "env {:?} has no upstream key configured",
            request.env
        ));
    }
    if request.scopes.is_empty() {
        problems.push("scopes must name at least one of read, generate, admin".to_string());
    }
    for scope in &request.scopes {
        if Scope::parse(scope).is_none() {
            problems.push(format!("scope {scope:?} is not read, generate or admin"));
        }
    }
    let expires = match request.expires.as_deref().map(str::parse::<Timestamp>) {
        None => None,
        Some(Ok(at)) if at > now => Some(at),
        Some(Ok(_)) => {
            problems.push("expires must be in the future".to_string());
            None
        }
        Some(Err(_)) => {
            problems.push("expires must be an RFC 3339 time like 2027-06-01T00:00:00Z".to_string());
            None
        }
    };
    for (name, value) in [("rpm", request.rpm), ("rpd", request.rpd)] {
        if let Some(v) = value {
            if !(MIN_LIMIT..=MAX_LIMIT).contains(&v) {
                problems.push(format!(
                    "{name} {v} is out of range ({MIN_LIMIT} to {MAX_LIMIT})"
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(GatewayError::InvalidRequest(problems.join("; ")));
    }
    if snapshot.by_id.contains_key(request.id.as_str()) {
        return Err(GatewayError::Conflict(format!(
            "a key with id {:?} already exists",
            request.id
        )));
    }
    let token = new_token(&request.env).map_err(GatewayError::Internal)?;
    let mut scopes: Vec<String> = request.scopes.clone();
    scopes.sort();
    scopes.dedup();
    let stored = StoredKey {
        id: request.id.clone(),
        team: request.team.clone(),
        scopes,
        env: request.env.clone(),
        token_sha256: auth::sha256_hex(token.as_bytes()),
        created: now.to_string(),
        expires: expires.map(|t| t.to_string()),
        rpm: request.rpm,
        rpd: request.rpd,
        previous: None,
    };
    let fresh = gateway
        .key_store
        .create(stored.clone())
        .await
        .map_err(store_error)?;
    if !fresh {
        return Err(GatewayError::Conflict(format!(
            "a key with id {:?} already exists",
            request.id
        )));
    }
    refresh(gateway).await;
    tracing::info!(key_id = %stored.id, team = %stored.team, "admin key created");
    Ok(created(json!({
        "id": stored.id,
        "token": token,
        "team": stored.team,
        "scopes": stored.scopes,
        "env": stored.env,
        "created": stored.created,
        "expires": stored.expires,
        "rpm": stored.rpm,
        "rpd": stored.rpd,
    })))
}

async fn refresh(gateway: &Gateway) {
    if let Err(e) = gateway.refresh_admin_keys().await {
        tracing::warn!(error = %e, "admin keys written but not re-read; the follower will retry");
    }
}

/// Finds an admin-made key by id, refusing config keys (read-only here).
async fn stored_key(gateway: &Gateway, id: &str) -> Result<StoredKey, GatewayError> {
    if let Some(key) = gateway.snapshot().by_id.get(id) {
        if key.origin == KeyOrigin::Config {
            return Err(GatewayError::Conflict(format!(
                "key {id:?} is defined in the config file and is read-only here"
            )));
        }
    }
    let keys = gateway.key_store.list().await.map_err(store_error)?;
    keys.into_iter()
        .find(|k| k.id == id)
        .ok_or(GatewayError::NotFound)
}

/// `DELETE /admin/keys/{id}`: the token stops working on every replica.
async fn delete_key(gateway: &Gateway, id: &str) -> Result<Response<ResponseBody>, GatewayError> {
    stored_key(gateway, id).await?;
    if !gateway.key_store.delete(id).await.map_err(store_error)? {
        return Err(GatewayError::NotFound);
    }
    refresh(gateway).await;
    tracing::info!(key_id = %id, "admin key revoked");
    Ok(json_response(
        StatusCode::OK,
        json!({ "id": id, "deleted": true }).to_string(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    grace: Option<String>,
}

/// `POST /admin/keys/{id}/rotate {"grace":"24h"}`: a new token; the current one keeps
/// working until the grace ends. A token replaced by an earlier rotation stops now.
async fn rotate_key(
    gateway: &Gateway,
    id: &str,
    request: Rotate,
) -> Result<Response<ResponseBody>, GatewayError> {
    let grace = match request.grace.as_deref() {
        None => Duration::ZERO,
        Some(text) => {
            parse_duration(text).map_err(|e| GatewayError::InvalidRequest(format!("grace: {e}")))?
        }
    };
    if grace > MAX_GRACE {
        return Err(GatewayError::InvalidRequest(
            "grace must be at most 30 days".into(),
        ));
    }
    let mut stored = stored_key(gateway, id).await?;
    let now = gateway.clock.now();
    let until = now
        .checked_add(jiff::SignedDuration::try_from(grace).unwrap_or_default())
        .unwrap_or(now);
    let token = new_token(&stored.env).map_err(GatewayError::Internal)?;
    stored.previous = (!grace.is_zero()).then(|| PreviousToken {
        token_sha256: stored.token_sha256.clone(),
        until: until.to_string(),
    });
    stored.token_sha256 = auth::sha256_hex(token.as_bytes());
    if !gateway
        .key_store
        .replace(stored.clone())
        .await
        .map_err(store_error)?
    {
        return Err(GatewayError::NotFound);
    }
    refresh(gateway).await;
    tracing::info!(key_id = %id, grace = ?grace, "admin key rotated");
    Ok(ok(json!({
        "id": stored.id,
        "token": token,
        "previous_valid_until": stored.previous.as_ref().map(|p| p.until.clone()),
    })))
}
