//! Graceful shutdown, seen from a client: the health statuses go
//! NOT_SERVING, and a call already in flight still gets its answer.

use std::time::Duration;

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::helpers::{settings, spawn_ready_app};
use crate::redis_server::RedisServer;

#[tokio::test]
async fn on_shutdown_health_goes_not_serving_and_a_call_in_flight_still_completes() {
    let redis = RedisServer::start();
    let mut settings = settings(Some(redis.url()));
    // Long enough that the call below is still waiting on Redis when the
    // shutdown begins, short enough to bound the test.
    settings.redis_timeout = Duration::from_secs(10);
    settings.shutdown_grace = Duration::from_secs(10);
    let mut app = spawn_ready_app(settings).await;

    let mut watch = app
        .health
        .clone()
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("watch starts")
        .into_inner();
    let first = watch.message().await.expect("a status").expect("the stream is open");
    assert_eq!(first.status(), ServingStatus::Serving);

    // A report that cannot finish while Redis is frozen.
    redis.pause();
    let in_flight = tokio::spawn({
        let client = app.client.clone();
        async move {
            let mut client = client;
            client
                .report_user(presence::proto::v1::ReportUserRequest {
                    username: "last-one".into(),
                    ..Default::default()
                })
                .await
        }
    });

    app.begin_shutdown();
    let next = watch.message().await.expect("a status").expect("the stream is open");
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    assert!(!in_flight.is_finished(), "the report should still be waiting on Redis");

    redis.resume();
    let answer = in_flight.await.expect("the call task ends");
    assert!(answer.is_ok(), "the in-flight call was cut off: {answer:?}");
    app.wait_stopped(Duration::from_secs(10)).await;

    let mut direct = redis.connection().expect("a direct connection");
    let stored: Option<f64> = redis::cmd("ZSCORE")
        .arg("{presence:users}:current")
        .arg("last-one")
        .query(&mut direct)
        .expect("ZSCORE");
    let stored_old: Option<f64> = redis::cmd("ZSCORE")
        .arg("{presence:users}:old")
        .arg("last-one")
        .query(&mut direct)
        .expect("ZSCORE");
    assert!(
        stored.is_some() || stored_old.is_some(),
        "the in-flight report was stored"
    );
}
