//! `WatchOnline`, on both stores: a snapshot, then who joined and who left,
//! batched per watch interval; a resync for a watcher that fell behind; a
//! clean end at shutdown.

use std::time::{Duration, Instant};

use presence::proto::v1::{
    OnlineChanges, OnlineSnapshot, ReportBatchRequest, ReportUserRequest, WatchOnlineRequest, WatchOnlineResponse,
    watch_online_response::Event,
};
use tonic::{Code, Streaming};

use crate::backends::{Backend, for_each_backend, start_with};
use crate::helpers::{Api, settings, spawn_replicas};
use crate::redis_server::RedisServer;

for_each_backend!(
    a_watcher_gets_a_snapshot_then_joins_and_leaves,
    a_room_watcher_hears_only_its_room,
    who_ages_out_at_a_rotation_is_announced_as_left,
    changes_come_at_most_once_per_watch_interval,
    changes_come_every_watch_interval_while_users_keep_joining,
    a_watcher_that_falls_behind_gets_a_resync_snapshot,
    at_shutdown_watch_streams_end_with_unavailable,
);

const WATCH_INTERVAL: Duration = Duration::from_millis(200);

async fn watch(api: &Api, room: &str) -> Streaming<WatchOnlineResponse> {
    let request = WatchOnlineRequest { room: room.to_owned() };
    api.client
        .clone()
        .watch_online(request)
        .await
        .expect("watching")
        .into_inner()
}

async fn next(stream: &mut Streaming<WatchOnlineResponse>) -> Event {
    let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open");
    message.event.expect("an event")
}

async fn snapshot(stream: &mut Streaming<WatchOnlineResponse>) -> OnlineSnapshot {
    match next(stream).await {
        Event::Snapshot(snapshot) => snapshot,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// Reads changes until `done` says what was gathered is enough.
async fn changes_until(
    stream: &mut Streaming<WatchOnlineResponse>,
    mut done: impl FnMut(&[OnlineChanges]) -> bool,
) -> Vec<OnlineChanges> {
    let mut seen = Vec::new();
    while !done(&seen) {
        match next(stream).await {
            Event::Changes(changes) => seen.push(changes),
            Event::Snapshot(snapshot) => panic!("an unexpected snapshot: {snapshot:?}"),
        }
    }
    seen
}

fn joined(changes: &[OnlineChanges]) -> Vec<String> {
    changes.iter().flat_map(|c| c.joined_users.clone()).collect()
}

fn left(changes: &[OnlineChanges]) -> Vec<String> {
    changes.iter().flat_map(|c| c.left_users.clone()).collect()
}

async fn a_watcher_gets_a_snapshot_then_joins_and_leaves(backend: Backend) {
    let (app, _redis) = start_with(backend, |s| s.watch_interval = WATCH_INTERVAL).await;
    app.report_user("already").await.expect("reported");
    app.report_guest("10.0.0.1").await.expect("reported");
    let mut stream = watch(&app, "").await;
    let first = snapshot(&mut stream).await;
    assert_eq!(
        (first.users, first.guests),
        (vec!["already".to_owned()], vec!["10.0.0.1".to_owned()])
    );
    assert_eq!((first.user_count, first.guest_count, first.resync), (1, 1, false));

    app.report_user("newcomer").await.expect("reported");
    app.report_user("already").await.expect("a repeat is no join");
    app.report_guest("::ffff:10.0.0.2").await.expect("reported");
    let seen = changes_until(&mut stream, |seen| {
        joined(seen).contains(&"newcomer".to_owned()) && seen.iter().any(|c| !c.joined_guests.is_empty())
    })
    .await;
    assert_eq!(joined(&seen), ["newcomer"], "joined means newly listed");
    let guests: Vec<String> = seen.iter().flat_map(|c| c.joined_guests.clone()).collect();
    assert_eq!(guests, ["10.0.0.2"]);
    let last = seen.last().expect("changes");
    assert_eq!(
        (last.user_count, last.guest_count),
        (2, 2),
        "the counts after the changes"
    );

    app.leave("", &["already"], &[]).await.expect("left");
    let seen = changes_until(&mut stream, |seen| !left(seen).is_empty()).await;
    assert_eq!(left(&seen), ["already"]);
    assert_eq!(seen.last().map(|c| c.user_count), Some(1));
}

async fn a_room_watcher_hears_only_its_room(backend: Backend) {
    let (app, _redis) = start_with(backend, |s| s.watch_interval = WATCH_INTERVAL).await;
    let mut stream = watch(&app, "forum/1").await;
    let first = snapshot(&mut stream).await;
    assert!(first.users.is_empty());
    app.report_user_in("elsewhere", "forum/2").await.expect("reported");
    app.report_user("site-only").await.expect("reported");
    app.report_user_in("here", "forum/1").await.expect("reported");
    let seen = changes_until(&mut stream, |seen| !joined(seen).is_empty()).await;
    assert_eq!(joined(&seen), ["here"]);
    assert_eq!(seen.last().map(|c| c.user_count), Some(1));
}

async fn who_ages_out_at_a_rotation_is_announced_as_left(backend: Backend) {
    let interval = Duration::from_millis(800);
    let (app, _redis) = start_with(backend, |s| {
        s.watch_interval = WATCH_INTERVAL;
        s.tick_interval = interval;
    })
    .await;
    let mut stream = watch(&app, "room").await;
    snapshot(&mut stream).await;
    app.report_user_in("brief", "room").await.expect("reported");
    let seen = changes_until(&mut stream, |seen| !joined(seen).is_empty()).await;
    assert_eq!(joined(&seen), ["brief"]);
    let reported = Instant::now();
    let seen = changes_until(&mut stream, |seen| !left(seen).is_empty()).await;
    assert_eq!(left(&seen), ["brief"], "aged out: left");
    assert!(reported.elapsed() >= interval / 2, "left too soon");
    assert_eq!(seen.last().map(|c| c.user_count), Some(0));
}

async fn changes_come_at_most_once_per_watch_interval(backend: Backend) {
    let interval = Duration::from_millis(500);
    let (app, _redis) = start_with(backend, |s| s.watch_interval = interval).await;
    let mut stream = watch(&app, "").await;
    snapshot(&mut stream).await;
    let began = Instant::now();
    for i in 0..40 {
        app.report_user(&format!("joiner-{i:02}")).await.expect("reported");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let seen = changes_until(&mut stream, |seen| joined(seen).len() >= 40).await;
    let elapsed = began.elapsed();
    let most = (elapsed.as_millis() / interval.as_millis()) as usize + 2;
    assert!(
        seen.len() <= most,
        "{} messages in {elapsed:?} at one per {interval:?}",
        seen.len()
    );
    assert!(seen.len() >= 2, "the joins were spread over more than one interval");
    let mut all = joined(&seen);
    all.sort();
    let expected: Vec<String> = (0..40).map(|i| format!("joiner-{i:02}")).collect();
    assert_eq!(all, expected, "each join once");
}

/// Each interval's joins come at the end of that interval, not every other
/// one: a flush ends a little after its tick, and measured from there the
/// next tick fell a hair short of the interval and was skipped.
async fn changes_come_every_watch_interval_while_users_keep_joining(backend: Backend) {
    let interval = Duration::from_millis(250);
    let (app, _redis) = start_with(backend, |s| s.watch_interval = interval).await;
    let mut stream = watch(&app, "").await;
    snapshot(&mut stream).await;
    let mut client = app.client.clone();
    let joiner = tokio::spawn(async move {
        for i in 0..60 {
            let request = ReportUserRequest {
                username: format!("steady-{i:02}"),
                room: String::new(),
            };
            client.report_user(request).await.expect("reported");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut arrivals = Vec::new();
    let mut joined = 0;
    while joined < 60 {
        match next(&mut stream).await {
            Event::Changes(changes) => {
                joined += changes.joined_users.len();
                arrivals.push(Instant::now());
            }
            Event::Snapshot(snapshot) => panic!("an unexpected snapshot: {snapshot:?}"),
        }
    }
    joiner.await.expect("the joiner ran");
    let mut gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        median < interval * 3 / 2,
        "changes every {median:?} (median) at an interval of {interval:?}: {gaps:?}"
    );
}

async fn a_watcher_that_falls_behind_gets_a_resync_snapshot(backend: Backend) {
    let (app, _redis) = start_with(backend, |s| s.watch_interval = Duration::from_millis(50)).await;
    // A client with small HTTP/2 windows: when it stops reading, the
    // server soon cannot send, and its backlog for this watcher fills.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc_address))
        .expect("a valid URI")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connects");
    let mut stream = presence::proto::v1::presence_client::PresenceClient::new(channel)
        .watch_online(WatchOnlineRequest { room: String::new() })
        .await
        .expect("watching")
        .into_inner();
    snapshot(&mut stream).await;
    // Many big changes while the watcher reads nothing: the transport's
    // window fills, then the server's backlog for it overflows.
    for round in 0..40 {
        let request = ReportBatchRequest {
            usernames: (0..1000)
                .map(|i| format!("crowd-{round:02}-{i:04}-{}", "x".repeat(40)))
                .collect(),
            ..Default::default()
        };
        app.client.clone().report_batch(request).await.expect("reported");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // Now it reads: somewhere in what comes is a snapshot marked resync.
    let deadline = Instant::now() + Duration::from_secs(30);
    let resync = loop {
        assert!(Instant::now() < deadline, "no resync snapshot within 30 s");
        if let Event::Snapshot(snapshot) = next(&mut stream).await {
            break snapshot;
        }
    };
    assert!(resync.resync, "a snapshot after the first must be marked resync");
    assert_eq!(resync.user_count, 40_000);
    assert_eq!(resync.users.len(), 1000, "the first 1000 names");
}

async fn at_shutdown_watch_streams_end_with_unavailable(backend: Backend) {
    let (mut app, _redis) = start_with(backend, |s| s.watch_interval = WATCH_INTERVAL).await;
    let mut stream = watch(&app, "").await;
    snapshot(&mut stream).await;
    app.begin_shutdown();
    let status = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends within the grace")
        .expect_err("the stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    app.wait_stopped(Duration::from_secs(5)).await;
}

/// Changes made through any replica reach watchers on every replica.
#[tokio::test]
async fn changes_through_one_replica_reach_watchers_of_another() {
    let redis = RedisServer::start();
    let mut settings = settings(Some(redis.url()));
    settings.watch_interval = WATCH_INTERVAL;
    let apps = spawn_replicas(2, settings).await;
    let mut stream = watch(&apps[1], "hall").await;
    snapshot(&mut stream).await;
    apps[0].report_user_in("from-afar", "hall").await.expect("reported");
    let seen = changes_until(&mut stream, |seen| !joined(seen).is_empty()).await;
    assert_eq!(joined(&seen), ["from-afar"]);
    apps[0].leave("hall", &["from-afar"], &[]).await.expect("left");
    let seen = changes_until(&mut stream, |seen| !left(seen).is_empty()).await;
    assert_eq!(left(&seen), ["from-afar"]);
}

/// However many watch a room on one replica, that replica follows it with
/// one subscription; and while nothing changes, nothing is sent.
#[tokio::test]
async fn many_watchers_of_a_room_share_one_subscription_and_quiet_sends_nothing() {
    let redis = RedisServer::start();
    let mut settings = settings(Some(redis.url()));
    settings.watch_interval = WATCH_INTERVAL;
    let app = crate::helpers::spawn_ready_app(settings).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut stream = watch(&app, "busy-room").await;
        snapshot(&mut stream).await;
        streams.push(stream);
    }
    let mut direct = redis.connection().expect("a direct connection");
    let subscribers: (String, u64) = ::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("{presence:room:busy-room}:changes")
        .query(&mut direct)
        .expect("PUBSUB NUMSUB");
    assert_eq!(subscribers.1, 1, "one subscription for 20 watchers");
    // Quiet for a few intervals, then one join: it is the first message.
    tokio::time::sleep(4 * WATCH_INTERVAL).await;
    app.report_user_in("late", "busy-room").await.expect("reported");
    for stream in &mut streams {
        match next(stream).await {
            Event::Changes(changes) => assert_eq!(changes.joined_users, ["late"], "nothing before the join"),
            other => panic!("expected the join, got {other:?}"),
        }
    }
}
