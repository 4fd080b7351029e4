//! The same service on a Redis Cluster: every script touches one slot,
//! thanks to the hash tags, so nothing changes but the connection.

use std::time::Duration;

use presence::store::RedisMode;

use crate::backends::assert_listed_for_one_interval_then_gone;
use crate::helpers::{settings, spawn_replicas};
use crate::redis_cluster::RedisCluster;

#[tokio::test]
async fn on_a_redis_cluster_reports_lists_and_ticks_keep_the_contract() {
    let cluster = RedisCluster::start();
    let interval = Duration::from_millis(1500);
    let mut settings = settings(Some(cluster.seed_url()));
    settings.redis_mode = RedisMode::Cluster;
    settings.tick_interval = interval;
    let apps = spawn_replicas(2, settings).await;

    for name in ["carol", "alice", "bob"] {
        apps[0].report_user(name).await.expect("report accepted");
    }
    apps[1].report_guest("::ffff:10.0.0.1").await.expect("report accepted");
    let online = apps[1].list(2).await.expect("listing");
    assert_eq!(online.users, ["alice", "bob"]);
    assert_eq!(online.guests, ["10.0.0.1"]);
    assert_eq!((online.user_count, online.guest_count), (3, 1));

    let apps: Vec<_> = apps.iter().collect();
    assert_listed_for_one_interval_then_gone(&apps, interval).await;
}
