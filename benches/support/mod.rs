//! What several benches build the same way: a config key record charged to its team.

use std::sync::Arc;

use keygate::auth::{ApiKey, KeyOrigin};
use keygate::quota::{Limits, Subject, SubjectKind};
use keygate::scope::Scopes;

/// Key `key-{i}` of team `team-{i % teams}`, charged to its team's `limits` only.
pub fn team_key(i: usize, teams: usize, scopes: Scopes, limits: Limits) -> Arc<ApiKey> {
    let team: Arc<str> = format!("team-{}", i % teams).into();
    Arc::new(ApiKey {
        id: format!("key-{i}").into(),
        team: team.clone(),
        scopes,
        env: "prod".into(),
        expires: None,
        rpm: None,
        rpd: None,
        origin: KeyOrigin::Config,
        created: None,
        last_used_ms: Default::default(),
        subjects: vec![Subject {
            kind: SubjectKind::Team,
            id: team,
            limits,
        }]
        .into(),
    })
}
