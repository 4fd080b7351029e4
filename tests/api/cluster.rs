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

/// Every call of the API on a cluster: paging, counts, checks, last seen,
/// leave, rooms and a watch, with the same answers as on one Redis.
#[tokio::test]
async fn on_a_redis_cluster_every_call_answers_as_on_one_redis() {
    let cluster = RedisCluster::start();
    let mut settings = settings(Some(cluster.seed_url()));
    settings.redis_mode = RedisMode::Cluster;
    settings.watch_interval = Duration::from_millis(200);
    let apps = spawn_replicas(2, settings).await;
    let request = presence::proto::v1::ReportBatchRequest {
        usernames: (0..30).map(|i| format!("c{i:02}")).collect(),
        ip_addresses: vec!["10.0.0.1".into()],
        room: "lobby".into(),
    };
    apps[0].client.clone().report_batch(request).await.expect("reported");
    let everyone = apps[1].everyone_in("", 7).await.expect("listing");
    assert_eq!(everyone.users.len(), 30);
    assert!(everyone.pages >= 5, "paged");
    assert_eq!(apps[1].count("lobby").await.expect("counts"), (30, 1));
    let checked = apps[1]
        .check("lobby", &["c01", "zz"], &["10.0.0.1"])
        .await
        .expect("checked");
    assert!(checked.users[0].online && !checked.users[1].online && checked.guests[0].online);
    assert!(checked.users[0].last_seen.is_some());

    let mut watch = apps[1]
        .client
        .clone()
        .watch_online(presence::proto::v1::WatchOnlineRequest { room: "lobby".into() })
        .await
        .expect("watching")
        .into_inner();
    watch.message().await.expect("a message").expect("a snapshot");
    apps[0].leave("", &["c01"], &[]).await.expect("left");
    assert!(
        !apps[1]
            .everyone_in("lobby", 100)
            .await
            .expect("listing")
            .users
            .contains(&"c01".to_owned())
    );
    let left = loop {
        let message = watch.message().await.expect("a message").expect("open");
        if let Some(presence::proto::v1::watch_online_response::Event::Changes(changes)) = message.event
            && !changes.left_users.is_empty()
        {
            break changes.left_users;
        }
    };
    assert_eq!(left, ["c01"]);
    let rooms = apps[0]
        .client
        .clone()
        .list_rooms(presence::proto::v1::ListRoomsRequest::default())
        .await
        .expect("rooms")
        .into_inner();
    assert_eq!(rooms.rooms.len(), 1);
    assert_eq!((rooms.rooms[0].user_count, rooms.rooms[0].guest_count), (29, 1));
}

/// Each room's keys carry their own hash tag, so rooms spread over the
/// cluster's masters.
#[tokio::test]
async fn a_thousand_rooms_spread_over_every_master() {
    let cluster = RedisCluster::start();
    let mut settings = settings(Some(cluster.seed_url()));
    settings.redis_mode = RedisMode::Cluster;
    let app = crate::helpers::spawn_ready_app(settings).await;
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                let request = presence::proto::v1::ReportUserRequest {
                    username: format!("visitor-{i}"),
                    room: format!("thread-{i}"),
                };
                client.report_user(request).await
            })
        })
        .collect();
    for call in calls {
        call.await.expect("ends").expect("reported");
    }
    let mut per_master = std::collections::BTreeMap::new();
    for i in 0..1000 {
        let master = cluster.node_of_key(&format!("{{presence:room:thread-{i}}}:users:current"));
        *per_master.entry(master).or_insert(0) += 1;
    }
    assert_eq!(per_master.len(), 3, "rooms on every master: {per_master:?}");
    for (master, rooms) in &per_master {
        assert!(*rooms > 200, "master {master} holds only {rooms} of 1000 rooms");
        let mut direct = crate::launcher::tcp_connection(*master).expect("a direct connection");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("{presence:room:*}:users:current")
            .query(&mut direct)
            .expect("KEYS");
        assert_eq!(keys.len(), *rooms, "master {master} holds its rooms' keys");
    }
}

/// Keys flushed behind the service's back are noticed on a cluster too.
#[tokio::test]
async fn after_flushall_on_a_cluster_a_reported_name_is_listed_again_within_2_seconds() {
    let cluster = RedisCluster::start();
    let mut settings = settings(Some(cluster.seed_url()));
    settings.redis_mode = RedisMode::Cluster;
    let app = crate::helpers::spawn_ready_app(settings).await;
    app.until_skipped("regular").await;
    for master in cluster.master_ports() {
        let mut direct = crate::launcher::tcp_connection(master).expect("a direct connection");
        let _: () = redis::cmd("FLUSHALL").query(&mut direct).expect("FLUSHALL");
    }
    app.assert_listed_again_within_2_seconds("regular", std::time::Instant::now())
        .await;
}

/// A master fails: its replica is promoted, and the service (the real
/// binary) follows by itself, with no restart.
#[tokio::test]
async fn a_cluster_master_failover_is_followed_without_a_restart() {
    let mut cluster = RedisCluster::start_with_replicas();
    let url = cluster.seed_url();
    let app = crate::binary::Binary::start(&[("PRESENCE_REDIS_URL", &url), ("PRESENCE_REDIS_MODE", "cluster")]).await;
    app.wait_for_health(
        "presence.v1.Presence",
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    app.report_user("before").await.expect("reported");
    let slot = cluster.slot_of_key("{presence:users}:current");
    cluster.kill_master_of_slot(slot);
    cluster.wait_until_healthy();
    crate::helpers::eventually("reports to work again", Duration::from_secs(20), || async {
        app.report_user("after").await.ok()
    })
    .await;
    let users = app.everyone().await.expect("listing").users;
    assert!(users.contains(&"after".to_owned()), "{users:?}");
    app.wait_for_health(
        "presence.v1.Presence",
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
}
