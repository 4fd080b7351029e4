//! Promises under faults and overload, checked on the real binary with a
//! real redis-server behind it: timeouts that hold, a repeat filter that
//! never answers for a Redis it cannot see, load shedding, server limits,
//! connection ageing, a shutdown that always ends, readiness that covers
//! writes, and logs that say one thing per outage.

use std::time::{Duration, Instant};

use presence::proto::v1::{ListOnlineRequest, ReportBatchRequest, ReportUserRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::binary::Binary;
use crate::helpers::{eventually, unique};
use crate::redis_server::RedisServer;

const READY: &str = "presence.v1.Presence";

/// The binary on `redis`, ready, with extra settings.
async fn start(redis: &RedisServer, env: &[(&str, &str)]) -> Binary {
    let url = redis.url();
    let mut all = vec![("PRESENCE_REDIS_URL", url.as_str())];
    all.extend_from_slice(env);
    let binary = Binary::start(&all).await;
    binary.wait_for_health(READY, ServingStatus::Serving).await;
    binary
}

fn report(name: &str) -> ReportUserRequest {
    ReportUserRequest {
        username: name.to_owned(),
        room: String::new(),
    }
}

async fn frozen_redis_gives_unavailable_within(timeout: &str, bound: Duration, at_least: Duration) {
    let redis = RedisServer::start();
    let app = start(&redis, &[("PRESENCE_REDIS_TIMEOUT", timeout)]).await;
    app.until_skipped("regular").await;
    redis.pause();
    for name in ["never-seen", "regular"] {
        let began = Instant::now();
        let status = app
            .report_user(name)
            .await
            .expect_err("a frozen Redis cannot take reports");
        let took = began.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
        // A repeat may wait out the filter's trust (1 s) first.
        let bound = if name == "regular" {
            bound + Duration::from_secs(1)
        } else {
            bound
        };
        assert!(took <= bound, "{name}: UNAVAILABLE after {took:?}, beyond {bound:?}");
        assert!(
            took >= at_least,
            "{name}: after {took:?}: the Redis timeout {timeout} is not the one applied"
        );
    }
    let began = Instant::now();
    let status = app.list(10).await.expect_err("no listing either");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(began.elapsed() <= bound);
    redis.resume();
}

#[tokio::test]
async fn a_100ms_redis_timeout_holds_against_a_frozen_redis_for_new_and_repeat_reports() {
    frozen_redis_gives_unavailable_within("100ms", Duration::from_millis(900), Duration::ZERO).await;
}

#[tokio::test]
async fn a_3s_redis_timeout_holds_against_a_frozen_redis_in_single_mode() {
    frozen_redis_gives_unavailable_within("3s", Duration::from_millis(3900), Duration::from_millis(2500)).await;
}

#[tokio::test]
async fn a_client_deadline_shorter_than_the_redis_timeout_ends_the_call_with_deadline_exceeded() {
    let redis = RedisServer::start();
    let app = start(&redis, &[("PRESENCE_REDIS_TIMEOUT", "5s")]).await;
    redis.pause();
    let mut request = tonic::Request::new(report("hurried"));
    request.set_timeout(Duration::from_millis(300));
    let began = Instant::now();
    let status = app
        .client
        .clone()
        .report_user(request)
        .await
        .expect_err("past its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(began.elapsed() < Duration::from_secs(2), "took {:?}", began.elapsed());
    redis.resume();
    let counted = r#"grpc_server_handled_total{grpc_type="unary",grpc_service="presence.v1.Presence",grpc_method="ReportUser",grpc_code="DeadlineExceeded"}"#;
    eventually("the call to be counted", Duration::from_secs(5), || async {
        (app.metric(counted).await >= 1.0).then_some(())
    })
    .await;
}

/// Keys that vanish without an error (here FLUSHALL) are noticed, and a
/// name reported after is listed again within about a second.
#[tokio::test]
async fn after_flushall_a_reported_name_is_listed_again_within_2_seconds() {
    let redis = RedisServer::start();
    let app = start(&redis, &[]).await;
    app.until_skipped("regular").await;
    let mut direct = redis.connection().expect("a direct connection");
    let _: () = redis::cmd("FLUSHALL").query(&mut direct).expect("FLUSHALL");
    app.assert_listed_again_within_2_seconds("regular", Instant::now())
        .await;
}

/// A ReportUser ("holder") sent to a service whose Redis is frozen, once the
/// service has started it: it holds whatever slot it took until Redis
/// answers.
async fn report_held_by_frozen_redis(
    app: &Binary,
) -> tokio::task::JoinHandle<Result<tonic::Response<presence::proto::v1::ReportUserResponse>, tonic::Status>> {
    let holder = {
        let mut client = app.client.clone();
        tokio::spawn(async move { client.report_user(report("holder")).await })
    };
    let started =
        r#"grpc_server_started_total{grpc_type="unary",grpc_service="presence.v1.Presence",grpc_method="ReportUser"}"#;
    eventually("the holder to be in flight", Duration::from_secs(3), || async {
        (app.metric(started).await >= 1.0).then_some(())
    })
    .await;
    holder
}

/// The report queue is bounded: with Redis stalled, what does not fit is
/// refused at once as overloaded; a report whose caller gave up never
/// reaches Redis; and neither counts as a Redis failure.
#[tokio::test]
async fn overload_is_refused_at_once_and_abandoned_work_never_reaches_redis() {
    let redis = RedisServer::start();
    let app = start(
        &redis,
        &[("PRESENCE_REDIS_TIMEOUT", "5s"), ("PRESENCE_REDIS_POOL_SIZE", "1")],
    )
    .await;
    redis.pause();
    let stalled = Instant::now();
    // One call holds the only connection's slot, stuck on the frozen Redis…
    let holder = report_held_by_frozen_redis(&app).await;
    // …so a caller that gives up waits in the queue, and goes no further.
    let abandoned = unique("abandoned");
    let mut request = tonic::Request::new(report(&abandoned));
    request.set_timeout(Duration::from_millis(200));
    let status = app.client.clone().report_user(request).await.expect_err("gave up");
    // Ours (DEADLINE_EXCEEDED), or the client's own timer (tonic calls it
    // CANCELLED): either way the caller has gone.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // Many batches at once: the queue fills behind the holder. Before it
    // has seen any call end, it holds 65,536 names (64 full batches).
    let batches: Vec<_> = (0..100)
        .map(|b| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                let request = ReportBatchRequest {
                    usernames: (0..1000).map(|i| format!("b{b:03}-{i:04}")).collect(),
                    ..Default::default()
                };
                let began = Instant::now();
                let result = client.report_batch(request).await;
                (result, began.elapsed())
            })
        })
        .collect();
    // What does not fit is refused at once: wait for the refusals, then
    // let Redis answer.
    let shed = r#"presence_shed_total{grpc_method="ReportBatch"}"#;
    eventually("refusals of what does not fit", Duration::from_secs(3), || async {
        (app.metric(shed).await >= 30.0).then_some(())
    })
    .await;
    let resumed = Instant::now();
    assert!(
        resumed - stalled < Duration::from_secs(4),
        "the check took too long to mean anything"
    );
    redis.resume();
    let mut refused = 0;
    for batch in batches {
        let (result, took) = batch.await.expect("the task ends");
        match result {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("overloaded"), "{}", status.message());
                // Waiting on Redis would take its 5 s timeout.
                assert!(
                    took < Duration::from_secs(1),
                    "a refusal must come at once, not after waiting ({took:?})"
                );
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 30,
        "a full queue must refuse what does not fit ({refused} refused)"
    );
    holder
        .await
        .expect("ends")
        .expect("the holder goes through once Redis answers");
    let mut direct = redis.connection().expect("a direct connection");
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("{presence:users}:current")
        .arg(&abandoned)
        .query(&mut direct)
        .expect("ZSCORE");
    assert_eq!(score, None, "the abandoned report was sent to Redis");
    assert!(app.metric(r#"presence_shed_total{grpc_method="ReportBatch"}"#).await >= 1.0);
    assert_eq!(
        app.metric(r#"presence_redis_errors_total{operation="ReportBatch"}"#)
            .await,
        0.0,
        "a full queue is not a Redis failure"
    );
    assert_eq!(
        app.health_of(READY).await.expect("health answers"),
        ServingStatus::Serving
    );
}

/// Past `PRESENCE_MAX_IN_FLIGHT` calls being worked on, a call is refused
/// at once as overloaded instead of queueing behind the others; once the
/// calls in flight end, calls are taken again.
#[tokio::test]
async fn past_the_most_calls_in_flight_a_call_is_refused_at_once_as_overloaded() {
    let redis = RedisServer::start();
    let app = start(
        &redis,
        &[("PRESENCE_REDIS_TIMEOUT", "5s"), ("PRESENCE_MAX_IN_FLIGHT", "1")],
    )
    .await;
    redis.pause();
    // The one call allowed in flight, stuck on the frozen Redis…
    let holder = report_held_by_frozen_redis(&app).await;
    // …so the next one is refused as overloaded, not left to wait on Redis.
    let status = app
        .client
        .clone()
        .list_online(ListOnlineRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("overloaded"), "{}", status.message());
    assert!(
        !holder.is_finished(),
        "the refusal came only after the holder ended: it waited instead of being refused"
    );
    assert_eq!(
        app.metric(r#"presence_shed_total{grpc_method="ListOnline"}"#).await,
        1.0
    );
    redis.resume();
    holder
        .await
        .expect("ends")
        .expect("the holder goes through once Redis answers");
    app.client
        .clone()
        .list_online(ListOnlineRequest::default())
        .await
        .expect("taken again once the slot is free");
}

#[tokio::test]
async fn a_request_over_1_mib_is_resource_exhausted() {
    let redis = RedisServer::start();
    let app = start(&redis, &[]).await;
    let request = ReportBatchRequest {
        usernames: (0..5000).map(|i| format!("{i:0>250}")).collect(),
        ..Default::default()
    };
    let status = app.client.clone().report_batch(request).await.expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // The largest valid batch still goes through.
    let request = ReportBatchRequest {
        usernames: (0..1000).map(|i| format!("{i:0>256}")).collect(),
        ..Default::default()
    };
    app.client
        .clone()
        .report_batch(request)
        .await
        .expect("the largest valid batch");
}

#[tokio::test]
async fn at_most_max_concurrent_streams_calls_run_on_one_connection() {
    let redis = RedisServer::start();
    let app = start(
        &redis,
        &[
            ("PRESENCE_MAX_CONCURRENT_STREAMS", "2"),
            ("PRESENCE_REDIS_TIMEOUT", "5s"),
        ],
    )
    .await;
    redis.pause();
    let started =
        r#"grpc_server_started_total{grpc_type="unary",grpc_service="presence.v1.Presence",grpc_method="ReportUser"}"#;
    let held: Vec<_> = (0..2)
        .map(|i| {
            let mut client = app.client.clone();
            tokio::spawn(async move { client.report_user(report(&format!("held-{i}"))).await })
        })
        .collect();
    eventually("two calls in flight", Duration::from_secs(5), || async {
        (app.metric(started).await >= 2.0).then_some(())
    })
    .await;
    // A third on the same connection waits for a stream: it never starts.
    let mut request = tonic::Request::new(report("third"));
    request.set_timeout(Duration::from_millis(300));
    app.client
        .clone()
        .report_user(request)
        .await
        .expect_err("no stream for it");
    assert_eq!(app.metric(started).await, 2.0, "a third call ran on the connection");
    redis.resume();
    for call in held {
        call.await.expect("ends").expect("the held calls succeed");
    }
}

/// A raw HTTP/2 client that sends its preface and SETTINGS, acknowledges
/// the server's SETTINGS, and otherwise only listens: what the server does
/// to a connection, frame by frame.
async fn raw_http2(address: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connects");
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.expect("SETTINGS");
    stream
}

/// The frames the server sends, as (type, when), until it closes the
/// connection (or 10 s pass: `None`). PINGs are left unanswered.
async fn frames_until_closed(stream: &mut tokio::net::TcpStream) -> Option<Vec<(u8, Duration)>> {
    let began = Instant::now();
    let mut seen = Vec::new();
    let read = async {
        loop {
            let mut header = [0u8; 9];
            if stream.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return;
            }
            let (kind, ack) = (header[3], header[4] & 1 == 1);
            if kind == 4 && !ack {
                stream
                    .write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0])
                    .await
                    .expect("SETTINGS ACK");
            }
            seen.push((kind, began.elapsed()));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.ok()?;
    Some(seen)
}

const PING: u8 = 6;
const GOAWAY: u8 = 7;

/// A client that connects and then never answers (a crashed host) is
/// pinged, and its connection closed once the ping goes unanswered.
#[tokio::test]
async fn a_dead_client_connection_is_noticed_by_http2_keepalive() {
    let redis = RedisServer::start();
    let app = start(
        &redis,
        &[
            ("PRESENCE_HTTP2_KEEPALIVE_INTERVAL", "500ms"),
            ("PRESENCE_HTTP2_KEEPALIVE_TIMEOUT", "500ms"),
        ],
    )
    .await;
    let mut stream = raw_http2(app.grpc_address).await;
    let frames = frames_until_closed(&mut stream).await;
    let frames = frames.expect("the server kept a connection that never answered its pings");
    assert!(
        frames.iter().any(|(kind, _)| *kind == PING),
        "the server never pinged: {frames:?}"
    );
}

/// After the maximum age, a connection gets GOAWAY (so clients open a new
/// one), and is closed after the grace. Seen here on a raw HTTP/2
/// connection; that no call fails across the switch is checked with
/// grpcio in scripts/test-clients (tonic's client does not move a call
/// refused by a GOAWAY to a new connection, which gRPC's own clients do).
#[tokio::test]
async fn an_aged_connection_gets_goaway_then_is_closed_after_the_grace() {
    let redis = RedisServer::start();
    let app = start(
        &redis,
        &[
            ("PRESENCE_MAX_CONNECTION_AGE", "1s"),
            ("PRESENCE_MAX_CONNECTION_AGE_GRACE", "1s"),
        ],
    )
    .await;
    let mut stream = raw_http2(app.grpc_address).await;
    let frames = frames_until_closed(&mut stream)
        .await
        .expect("the aged connection was never closed");
    let goaway = frames
        .iter()
        .find(|(kind, _)| *kind == GOAWAY)
        .map(|(_, at)| *at)
        .unwrap_or_else(|| panic!("no GOAWAY before the close: {frames:?}"));
    assert!(
        goaway >= Duration::from_millis(900),
        "GOAWAY after {goaway:?}, before the age"
    );
}

/// Whatever clients do, SIGTERM ends in exit 0 within the grace and a
/// second: a metrics client stalled half-way through its headers, an idle
/// gRPC connection, an open health Watch stream.
#[tokio::test]
async fn shutdown_ends_within_the_grace_whatever_clients_hold_open() {
    let redis = RedisServer::start();
    let mut app = start(&redis, &[("PRESENCE_SHUTDOWN_GRACE", "2s")]).await;
    let mut stalled = tokio::net::TcpStream::connect(app.metrics_address)
        .await
        .expect("connects");
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: te")
        .await
        .expect("half a request");
    app.report_user("someone").await.expect("a connection in use");
    let mut watch = app
        .health
        .clone()
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("a Watch stream")
        .into_inner();
    watch.message().await.expect("a status").expect("open");
    let signalled = Instant::now();
    app.signal("TERM");
    let status = app.wait_for_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        signalled.elapsed() <= Duration::from_secs(3),
        "exit took {:?}, beyond the 2 s grace and a second",
        signalled.elapsed()
    );
}

/// Readiness covers writes: a Redis that answers reads but refuses writes
/// (a read-only replica; maxmemory reached under noeviction) is not ready.
#[tokio::test]
async fn a_redis_that_refuses_writes_makes_the_service_not_ready() {
    let redis = RedisServer::start();
    let app = start(&redis, &[]).await;
    let mut direct = redis.connection().expect("a direct connection");
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(1)
        .query(&mut direct)
        .expect("REPLICAOF");
    app.wait_for_health(READY, ServingStatus::NotServing).await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut direct)
        .expect("REPLICAOF NO ONE");
    app.wait_for_health(READY, ServingStatus::Serving).await;
    app.report_user("writable").await.expect("writes again");

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut direct)
        .expect("CONFIG SET");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query(&mut direct)
        .expect("CONFIG SET");
    app.wait_for_health(READY, ServingStatus::NotServing).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query(&mut direct)
        .expect("CONFIG SET");
    app.wait_for_health(READY, ServingStatus::Serving).await;
}

/// An outage is one warning when it starts and one line when it ends,
/// however many calls fail in between.
#[tokio::test]
async fn an_outage_is_logged_once_and_summed_up_when_it_ends() {
    let mut redis = RedisServer::start();
    let mut app = start(&redis, &[]).await;
    redis.kill();
    for i in 0..20 {
        app.report_user(&format!("during-{i}")).await.expect_err("no Redis");
    }
    redis.restart();
    eventually("reports to work again", Duration::from_secs(10), || async {
        app.report_user("after").await.ok()
    })
    .await;
    let summary = app.wait_for_log("presence store answers again").await;
    let failed = summary["failed_calls"].as_u64().expect("a count of failed calls");
    assert!(failed >= 20, "{summary}");
    let warnings = app
        .read_logs()
        .iter()
        .filter(|e| {
            e["level"] == "WARN"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("presence store unavailable"))
        })
        .count();
    assert_eq!(warnings, 1, "one warning per outage: {:?}", app.seen);
}

/// A call whose client goes away is counted as Cancelled.
#[tokio::test]
async fn a_cancelled_call_is_counted() {
    let redis = RedisServer::start();
    let app = start(&redis, &[("PRESENCE_REDIS_TIMEOUT", "5s")]).await;
    redis.pause();
    let mut client = app.client.clone();
    let call = tokio::spawn(async move { client.report_user(report("gone")).await });
    let started =
        r#"grpc_server_started_total{grpc_type="unary",grpc_service="presence.v1.Presence",grpc_method="ReportUser"}"#;
    eventually("the call to start", Duration::from_secs(5), || async {
        (app.metric(started).await >= 1.0).then_some(())
    })
    .await;
    call.abort();
    let cancelled = r#"grpc_server_handled_total{grpc_type="unary",grpc_service="presence.v1.Presence",grpc_method="ReportUser",grpc_code="Cancelled"}"#;
    eventually(
        "the call to be counted as cancelled",
        Duration::from_secs(5),
        || async { (app.metric(cancelled).await >= 1.0).then_some(()) },
    )
    .await;
    redis.resume();
}
