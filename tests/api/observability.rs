//! What operators see: health statuses and Prometheus metrics.

use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{settings, spawn_app};
use crate::redis_server::RedisServer;

#[tokio::test]
async fn health_is_serving_overall_and_for_presence_while_redis_answers() {
    let redis = RedisServer::start();
    let app = spawn_app(settings(Some(redis.url()))).await;
    assert_eq!(app.health_of("").await.expect("health answers"), ServingStatus::Serving);
    app.wait_for_health("presence.v1.Presence", ServingStatus::Serving)
        .await;
    let unknown = app.health_of("no.such.Service").await.expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn metrics_count_calls_by_method_and_code_and_show_who_is_online() {
    let redis = RedisServer::start();
    let app = spawn_app(settings(Some(redis.url()))).await;
    app.report_user("alice").await.expect("accepted");
    app.report_user("bob").await.expect("accepted");
    app.report_user("").await.expect_err("refused");
    app.report_guest("10.1.2.3").await.expect("accepted");
    app.list(10).await.expect("listing");
    app.count("").await.expect("counts");
    app.check("", &["alice"], &[]).await.expect("checks");
    app.leave("", &["nobody"], &[]).await.expect("leaves");
    app.client
        .clone()
        .list_rooms(presence::proto::v1::ListRoomsRequest::default())
        .await
        .expect("rooms");
    let mut watch = app
        .client
        .clone()
        .watch_online(presence::proto::v1::WatchOnlineRequest::default())
        .await
        .expect("watching")
        .into_inner();
    watch.message().await.expect("a message").expect("a snapshot");
    drop(watch);

    let handled = |method: &str, code: &str, count: u32| {
        format!(
            "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"presence.v1.Presence\",\
             grpc_method=\"{method}\",grpc_code=\"{code}\"}} {count}"
        )
    };
    // The online gauges follow the backend check, once a second.
    let text = crate::helpers::eventually("the online gauges", std::time::Duration::from_secs(10), || async {
        let text = app.scrape().await;
        text.contains("presence_online{kind=\"users\"} 2").then_some(text)
    })
    .await;
    for expected in [
        handled("ReportUser", "OK", 2),
        handled("ReportUser", "InvalidArgument", 1),
        handled("ReportGuest", "OK", 1),
        handled("ListOnline", "OK", 1),
        handled("CountOnline", "OK", 1),
        handled("CheckOnline", "OK", 1),
        handled("Leave", "OK", 1),
        handled("ListRooms", "OK", 1),
        "grpc_server_msg_sent_total{grpc_type=\"server_stream\",grpc_service=\"presence.v1.Presence\",grpc_method=\"WatchOnline\"} 1".to_owned(),
        "presence_watch_messages_total{type=\"snapshot\"} 1".to_owned(),
        "presence_online{kind=\"guests\"} 1".to_owned(),
        "presence_tick_interval_seconds 300".to_owned(),
        "presence_ready 1".to_owned(),
        "grpc_server_handling_seconds_count{grpc_type=\"unary\",grpc_service=\"presence.v1.Presence\",grpc_method=\"ReportUser\"} 3".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
}

#[tokio::test]
async fn metrics_count_redis_errors() {
    let mut redis = RedisServer::start();
    let app = spawn_app(settings(Some(redis.url()))).await;
    redis.kill();
    app.report_user("nobody").await.expect_err("no Redis");
    let text = app.scrape().await;
    assert!(
        text.contains("presence_redis_errors_total{operation=\"ReportUser\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("grpc_code=\"Unavailable\"} 1"),
        "an UNAVAILABLE call is counted: {text}"
    );
}
