//! Redis Sentinel, the most common highly-available Redis on Kubernetes:
//! the real binary follows a failover by itself.

use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;

use crate::binary::Binary;
use crate::helpers::eventually;
use crate::redis_sentinel::RedisSentinel;

/// Under load, the master is killed (after the sentinel named in the URL,
/// so the others must have been learnt from it): reports succeed again
/// within 10 s of the promotion, readiness goes NOT_SERVING and back.
// Multi-threaded: the sentinel helpers wait by blocking, and the load must
// go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_under_load_without_a_restart() {
    let mut sentinel = RedisSentinel::start();
    let url = sentinel.sentinel_url(0);
    let app = Binary::start(&[
        ("PRESENCE_REDIS_URL", &url),
        ("PRESENCE_REDIS_MODE", "sentinel"),
        ("PRESENCE_REDIS_SENTINEL_MASTER", crate::redis_sentinel::MASTER_NAME),
    ])
    .await;
    app.wait_for_health("presence.v1.Presence", ServingStatus::Serving)
        .await;
    app.report_user("before")
        .await
        .expect("reported through the master the sentinels named");
    assert!(
        app.everyone()
            .await
            .expect("listing")
            .users
            .contains(&"before".to_owned())
    );

    // Load, and a record of what readiness said, while the master dies.
    let load = {
        let api = crate::helpers::Api::new(app.grpc_address, app.metrics_address);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut last_ok = None;
            let until = Instant::now() + Duration::from_secs(40);
            for i in 0.. {
                if Instant::now() > until {
                    break;
                }
                if api.report_user(&format!("load-{i}")).await.is_ok() {
                    last_ok = Some(Instant::now());
                }
                if let Ok(status) = api.health_of("presence.v1.Presence").await
                    && statuses.last() != Some(&status)
                {
                    statuses.push(status);
                }
                if statuses.len() >= 3 && last_ok.is_some_and(|at| at.elapsed() < Duration::from_millis(100)) {
                    return statuses;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    sentinel.kill_sentinel(0);
    let old = sentinel.kill_master();
    let new = sentinel.wait_for_promotion(old, Duration::from_secs(30));
    let promoted = Instant::now();
    assert_ne!(new, old);
    eventually("reports to succeed again", Duration::from_secs(10), || async {
        app.report_user("after").await.ok()
    })
    .await;
    assert!(
        promoted.elapsed() < Duration::from_secs(10),
        "recovered {:?} after the promotion",
        promoted.elapsed()
    );
    let statuses = load.await.expect("the load task ends");
    assert_eq!(
        statuses,
        [
            ServingStatus::Serving,
            ServingStatus::NotServing,
            ServingStatus::Serving
        ],
        "readiness through the failover"
    );
    let users = app.everyone().await.expect("listing").users;
    assert!(users.contains(&"after".to_owned()));
}
