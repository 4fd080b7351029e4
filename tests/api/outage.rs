//! Redis going away and coming back: calls fail fast with UNAVAILABLE, the
//! service reports itself not ready, and it recovers by itself.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{TestApp, eventually, settings, spawn_app, spawn_ready_app};
use crate::redis_server::RedisServer;

/// The promise to clients: a failing Redis is reported within this, with
/// the default Redis timeout.
const UNAVAILABLE_BOUND: Duration = Duration::from_secs(1);

/// The settings of these tests: the default Redis timeout (500 ms).
fn on(redis: &RedisServer) -> presence::Settings {
    let mut settings = settings(Some(redis.url()));
    settings.redis_timeout = Duration::from_millis(500);
    settings
}

/// Reports and listings fail with UNAVAILABLE within the bound, saying
/// nothing of the store's internals.
async fn assert_calls_fail_fast(app: &TestApp) {
    for _ in 0..3 {
        let began = Instant::now();
        let status = app.report_user("during").await.expect_err("no Redis, no report");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(began.elapsed() < UNAVAILABLE_BOUND, "took {:?}", began.elapsed());
        assert!(
            !status.message().contains("redis"),
            "internal detail leaked: {}",
            status.message()
        );
        let began = Instant::now();
        let status = app.list(0).await.expect_err("no Redis, no listing");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(began.elapsed() < UNAVAILABLE_BOUND, "took {:?}", began.elapsed());
    }
    // Every other call too, each within the bound.
    let calls: [(&str, Result<(), tonic::Status>); 6] = [
        ("CountOnline", app.count("").await.map(|_| ())),
        ("CheckOnline", app.check("", &["a"], &["10.0.0.1"]).await.map(|_| ())),
        ("Leave", app.leave("", &["a"], &[]).await),
        ("ReportUser in a room", app.report_user_in("b", "room").await),
        (
            "ListRooms",
            app.client
                .clone()
                .list_rooms(presence::proto::v1::ListRoomsRequest::default())
                .await
                .map(|_| ()),
        ),
        ("WatchOnline", watch_first(app).await),
    ];
    for (call, result) in calls {
        let status = result.expect_err(call);
        assert_eq!(status.code(), Code::Unavailable, "{call}: {status:?}");
    }
}

/// A watch's first message, or how the stream ended.
async fn watch_first(app: &TestApp) -> Result<(), tonic::Status> {
    let request = presence::proto::v1::WatchOnlineRequest { room: String::new() };
    let mut stream = app.client.clone().watch_online(request).await?.into_inner();
    let began = Instant::now();
    let first = stream.message().await;
    assert!(began.elapsed() < 2 * UNAVAILABLE_BOUND, "took {:?}", began.elapsed());
    first.map(|_| ())
}

#[tokio::test]
async fn killing_redis_gives_unavailable_in_bounded_time_and_a_restart_recovers() {
    let mut redis = RedisServer::start();
    let app = spawn_ready_app(on(&redis)).await;
    app.report_user("before")
        .await
        .expect("report accepted while Redis is up");

    redis.kill();

    assert_calls_fail_fast(&app).await;
    app.wait_for_health("presence.v1.Presence", ServingStatus::NotServing)
        .await;
    assert_eq!(app.health_of("").await.expect("health answers"), ServingStatus::Serving);

    redis.restart();

    eventually("reports to succeed again", Duration::from_secs(10), || async {
        app.report_user("after").await.ok()
    })
    .await;
    app.wait_for_health("presence.v1.Presence", ServingStatus::Serving)
        .await;
    let online = app.list(0).await.expect("listing after recovery");
    assert_eq!(
        online.users,
        ["after"],
        "the restarted Redis is empty but for the new report"
    );
}

#[tokio::test]
async fn a_service_started_while_redis_is_down_serves_once_it_is_up() {
    let mut redis = RedisServer::start();
    redis.kill();
    let app = spawn_app(on(&redis)).await;
    assert_eq!(app.health_of("").await.expect("health answers"), ServingStatus::Serving);
    app.wait_for_health("presence.v1.Presence", ServingStatus::NotServing)
        .await;
    let status = app.report_user("early").await.expect_err("no Redis yet");
    assert_eq!(status.code(), Code::Unavailable);

    redis.restart();
    app.wait_for_health("presence.v1.Presence", ServingStatus::Serving)
        .await;
    app.report_user("late").await.expect("report accepted once Redis is up");
}

#[tokio::test]
async fn a_redis_that_hangs_gives_unavailable_in_bounded_time_and_recovers_when_it_answers() {
    let redis = RedisServer::start();
    let app = spawn_ready_app(on(&redis)).await;
    app.report_user("before")
        .await
        .expect("report accepted while Redis answers");

    redis.pause();

    assert_calls_fail_fast(&app).await;
    app.wait_for_health("presence.v1.Presence", ServingStatus::NotServing)
        .await;

    redis.resume();

    eventually("reports to succeed again", Duration::from_secs(10), || async {
        app.report_user("after").await.ok()
    })
    .await;
    app.wait_for_health("presence.v1.Presence", ServingStatus::Serving)
        .await;
    let online = app.list(0).await.expect("listing after recovery");
    assert!(online.users.contains(&"before".to_owned()) && online.users.contains(&"after".to_owned()));
}

/// A replica skips reports of names it already wrote in this interval. If
/// Redis restarts empty, it must notice and write them again.
#[tokio::test]
async fn after_redis_restarts_empty_a_repeated_report_is_stored_again() {
    let mut redis = RedisServer::start();
    let app = spawn_ready_app(on(&redis)).await;
    // Once the filter trusts Redis (a ping came back), repeats are skipped.
    app.until_skipped("regular").await;

    redis.restart();

    eventually("the name to be listed again", Duration::from_secs(10), || async {
        app.report_user("regular").await.ok()?;
        let online = app.list(0).await.ok()?;
        online.users.contains(&"regular".to_owned()).then_some(())
    })
    .await;
}
