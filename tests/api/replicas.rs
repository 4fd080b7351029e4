//! Many replicas on one Redis: the tick must rotate once per interval in
//! total. With a tick per replica, two rotations back to back would make a
//! name vanish long before its interval is over.

use std::time::{Duration, Instant};

use crate::backends::assert_listed_for_one_interval_then_gone;
use crate::helpers::{TestApp, settings, spawn_app, spawn_replicas, unique};
use crate::redis_server::RedisServer;

fn rotations(metrics: &str, kind: &str) -> u64 {
    let series = format!("presence_ticks_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

#[tokio::test]
async fn three_servers_on_one_redis_keep_a_name_listed_for_one_interval() {
    let interval = Duration::from_millis(1500);
    let redis = RedisServer::start();
    let started = Instant::now();
    let mut settings = settings(Some(redis.url()));
    settings.tick_interval = interval;
    let apps = spawn_replicas(3, settings).await;
    let apps: Vec<&TestApp> = apps.iter().collect();

    // Three rounds, each starting where the last ended, so the report falls
    // at different phases of the rotation.
    for _ in 0..3 {
        assert_listed_for_one_interval_then_gone(&apps, interval).await;
    }

    let elapsed = started.elapsed();
    let most = elapsed.as_millis() / interval.as_millis() + 1;
    for kind in ["users", "guests"] {
        let mut total = 0;
        for app in &apps {
            total += rotations(&app.scrape().await, kind);
        }
        assert!(total >= 2, "{kind}: only {total} rotations in {elapsed:?}");
        assert!(
            u128::from(total) <= most,
            "{kind}: {total} rotations in {elapsed:?}, at most {most} allowed at one per interval"
        );
    }
}

#[tokio::test]
async fn replicas_with_different_prefixes_do_not_share_presence() {
    let redis = RedisServer::start();
    let mut staging = settings(Some(redis.url()));
    staging.key_prefix = "staging".parse().expect("a valid prefix");
    let staging = spawn_app(staging).await;
    let production = spawn_app(settings(Some(redis.url()))).await;
    staging.report_user("only-in-staging").await.expect("report accepted");
    assert_eq!(production.list(0).await.expect("listing").user_count, 0);
    assert_eq!(staging.list(0).await.expect("listing").users, ["only-in-staging"]);

    // The first tick may already have moved it from current to old.
    let mut direct = redis.connection().expect("a direct connection");
    let mut members = Vec::new();
    for key in ["{staging:users}:current", "{staging:users}:old"] {
        let names: Vec<String> = redis::cmd("ZRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut direct)
            .expect("the documented keys are sorted sets");
        members.extend(names);
    }
    assert_eq!(members, ["only-in-staging"]);
    let keys: Vec<String> = redis::cmd("KEYS").arg("{presence:*").query(&mut direct).expect("KEYS");
    assert!(
        keys.iter().all(|k| !k.ends_with(":current") && !k.ends_with(":old")),
        "{keys:?}"
    );
}

/// Replicas skip repeat reports of a name they already put into *current*.
/// That must never shorten the contract: a name last reported at t is
/// listed until t + T, across rotations done by any replica.
#[tokio::test]
async fn a_name_reported_again_and_again_through_three_replicas_stays_listed_one_interval_after_the_last() {
    let interval = Duration::from_millis(1500);
    let redis = RedisServer::start();
    let mut settings = settings(Some(redis.url()));
    settings.tick_interval = interval;
    let apps = spawn_replicas(3, settings).await;

    // Repeat reports through every replica across at least two rotations,
    // checking after each that the name is listed.
    let repeating = Instant::now();
    let mut reports = 0;
    let mut last_report = Instant::now();
    while repeating.elapsed() < 2 * interval + interval / 2 {
        let app = &apps[reports % apps.len()];
        last_report = Instant::now();
        app.report_user("regular").await.expect("report accepted");
        reports += 1;
        let online = apps[(reports + 1) % apps.len()].list(0).await.expect("listing");
        assert!(
            online.users.contains(&"regular".to_owned()),
            "unlisted after {reports} reports"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    // Then silence: still listed one interval after the last report.
    while last_report.elapsed() < interval {
        let online = apps[0].list(0).await.expect("listing");
        if last_report.elapsed() < interval {
            assert!(
                online.users.contains(&"regular".to_owned()),
                "gone {:?} after the last report, before T",
                last_report.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crate::helpers::eventually(
        "the name to be gone after 2T",
        2 * interval + Duration::from_secs(2),
        || async {
            let online = apps[1].list(0).await.ok()?;
            (!online.users.contains(&"regular".to_owned())).then_some(())
        },
    )
    .await;
}

/// A report that starts after a `Leave` returned lists the name again,
/// whichever replicas handle the two calls: no replica's repeat filter may
/// skip it, though each had just skipped repeats of that very name.
#[tokio::test]
async fn a_report_after_a_leave_through_any_replica_lists_the_name_again() {
    let redis = RedisServer::start();
    let apps = spawn_replicas(3, settings(Some(redis.url()))).await;
    for leaver in 0..apps.len() {
        for reporter in (0..apps.len()).filter(|r| *r != leaver) {
            let name = format!("signs-out-{leaver}-{reporter}");
            // Every replica remembers the name: its next report would be
            // skipped.
            for app in &apps {
                app.until_skipped(&name).await;
                // Written after it, so that the probe's look for a lately
                // written name (which forgets all if that name vanished)
                // cannot stand in for the Leave's invalidation.
                app.report_user(&unique("decoy")).await.expect("reported");
            }
            apps[leaver].leave("", &[&name], &[]).await.expect("left");
            assert!(
                !apps[reporter].everyone().await.expect("listing").users.contains(&name),
                "gone once Leave returned"
            );
            apps[reporter].report_user(&name).await.expect("reported");
            assert!(
                apps[leaver].everyone().await.expect("listing").users.contains(&name),
                "{name}: a report through replica {reporter} after a Leave through {leaver} was skipped"
            );
        }
    }
}
