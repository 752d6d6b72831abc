//! Shared quotas on a three-master Redis Cluster: several keygate instances stay exact, and
//! the fleet-wide upstream ceiling (in another slot than the teams) holds with the
//! team-first order and compensation, including refunds to both nodes.

mod common;

use std::time::{Duration, Instant};

use keygate::config::Config;

use common::redis::RedisCluster;
use common::*;

const STRICT: &str = "on_error = \"closed\"\ntimeout = \"5s\"";

fn config(upstream: &MockUpstream, cluster: &RedisCluster, extra: &str) -> Config {
    config_from(&standard_config_text(
        &upstream.url(),
        &format!("[store]\nurl = \"{}\"\n{STRICT}\n{extra}", cluster.url()),
    ))
}

/// A hash field, read on the node that holds the key.
fn field(cluster: &RedisCluster, key: &str, field: &str) -> Option<u64> {
    cluster
        .node_for(key)
        .cli(&["HGET", key, field])
        .and_then(|s| s.trim().parse().ok())
}

#[tokio::test]
async fn three_instances_on_a_cluster_admit_exactly_the_limit() {
    let cluster = RedisCluster::start();
    let upstream = MockUpstream::start().await;
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(TestGateway::start(config(&upstream, &cluster, "")).await);
    }
    assert_fleet_admits_exactly_design_rpm(&gateways, &upstream).await;
    assert_eq!(field(&cluster, "kg:q:{t:design}", "dn"), Some(DESIGN_RPM));
    let (_, readiness) = gateways[0].readyz().await;
    assert_eq!(readiness["store"]["kind"], "redis-cluster");
    for gateway in gateways {
        gateway.shutdown().await;
    }
}

#[tokio::test]
async fn upstream_ceiling_on_a_cluster_holds_over_two_teams() {
    let cluster = RedisCluster::start();
    let upstream = MockUpstream::start().await;
    let extra = "[upstream.limits]\nrpm = 15\nrpd = 1000";
    let a = TestGateway::start(config(&upstream, &cluster, extra)).await;
    let b = TestGateway::start(config(&upstream, &cluster, extra)).await;
    let requests = (0..25)
        .flat_map(|i| {
            let gateway = if i % 2 == 0 { &a } else { &b };
            [(gateway, TOKEN_DESIGN_GENERATE), (gateway, TOKEN_MARKETING)]
        })
        .collect::<Vec<_>>();
    let answers = generate_all(requests).await;
    assert_eq!(count_status(&answers, 200), 15, "{answers:?}");
    assert_eq!(count_status(&answers, 429), 35, "{answers:?}");
    assert_eq!(upstream.count(), 15);
    // The ceiling counted exactly the admissions, and every team charge the ceiling
    // refused was compensated: the teams together hold the same 15.
    assert_eq!(field(&cluster, "kg:q:{upstream}", "dn"), Some(15));
    let design = field(&cluster, "kg:q:{t:design}", "dn").unwrap_or(0);
    let marketing = field(&cluster, "kg:q:{t:marketing}", "dn").unwrap_or(0);
    assert_eq!(
        design + marketing,
        15,
        "design {design}, marketing {marketing}"
    );
    assert!(marketing <= MARKETING_RPM);

    let refused = a.generate(TOKEN_MARKETING).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.text().await.unwrap(), RATE_LIMITED_BODY);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn refunds_on_a_cluster_reach_the_team_and_the_ceiling() {
    let cluster = RedisCluster::start();
    let upstream = MockUpstream::start().await;
    let extra = "[upstream.limits]\nrpm = 50\nrpd = 1000";
    let gateway = TestGateway::start(config(&upstream, &cluster, extra)).await;
    upstream.set_reply(Reply::Json(
        500,
        r#"{"error":{"code":"internal","message":"x"}}"#,
    ));
    for _ in 0..4 {
        assert_eq!(gateway.generate(TOKEN_DESIGN_GENERATE).await.status(), 500);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let team = field(&cluster, "kg:q:{t:design}", "dn");
        let ceiling = field(&cluster, "kg:q:{upstream}", "dn");
        if team == Some(0) && ceiling == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refunds did not land: team {team:?}, ceiling {ceiling:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.shutdown().await;
}
