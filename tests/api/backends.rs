//! The contract every store must keep, run against both: the Redis store on
//! a private redis-server, and the in-memory default.

use std::time::{Duration, Instant};

use presence::{Settings, proto::v1::ReportBatchRequest};
use tonic::Code;

use crate::helpers::{TestApp, eventually, settings, spawn_ready_app, unique};
use crate::redis_server::RedisServer;

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Memory,
    Redis,
}

/// A running service on `backend`, and the Redis behind it (if any), which
/// lives as long as the returned value.
pub async fn start(backend: Backend, tick_interval: Duration) -> (TestApp, Option<RedisServer>) {
    start_with(backend, |settings| settings.tick_interval = tick_interval).await
}

/// As [`start`], with settings of the test's choosing.
pub async fn start_with(backend: Backend, configure: impl FnOnce(&mut Settings)) -> (TestApp, Option<RedisServer>) {
    let redis = match backend {
        Backend::Memory => None,
        Backend::Redis => Some(RedisServer::start()),
    };
    let mut settings = settings(redis.as_ref().map(RedisServer::url));
    configure(&mut settings);
    let app = spawn_ready_app(settings).await;
    (app, redis)
}

pub const LONG: Duration = Duration::from_secs(300);

/// Declares each test twice: on the in-memory store and on Redis.
macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $test() { super::$test(crate::backends::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $test() { super::$test(crate::backends::Backend::Redis).await })*
        }
    };
}
pub(crate) use for_each_backend;

for_each_backend!(
    reported_users_are_listed_sorted_and_counted,
    a_limit_shortens_the_lists_but_not_the_counts,
    reporting_a_name_twice_lists_it_once,
    guests_are_listed_by_canonical_address,
    every_bad_username_is_refused_naming_the_field_and_nothing_is_stored,
    every_bad_ip_address_is_refused_naming_the_field_and_nothing_is_stored,
    a_batch_is_stored_whole_or_not_at_all,
    a_name_stays_listed_for_one_interval_and_is_gone_after_two,
);

async fn reported_users_are_listed_sorted_and_counted(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    for name in ["carol", "alice", "Bob", "émile", "bob"] {
        app.report_user(name).await.expect("report accepted");
    }
    let online = app.list(0).await.expect("listing");
    assert_eq!(online.users, ["Bob", "alice", "bob", "carol", "émile"]);
    assert_eq!(online.user_count, 5);
    assert!(online.guests.is_empty());
    assert_eq!(online.guest_count, 0);
}

async fn a_limit_shortens_the_lists_but_not_the_counts(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    for i in 0..10 {
        app.report_user(&format!("user{i:02}")).await.expect("report accepted");
        app.report_guest(&format!("10.0.0.{i}")).await.expect("report accepted");
    }
    let online = app.list(3).await.expect("listing");
    assert_eq!(online.users, ["user00", "user01", "user02"]);
    assert_eq!(online.guests, ["10.0.0.0", "10.0.0.1", "10.0.0.2"]);
    assert_eq!((online.user_count, online.guest_count), (10, 10));
    let everyone = app.list(0).await.expect("listing");
    assert_eq!(everyone.users.len(), 10);
    let more_than_all = app.list(1000).await.expect("listing");
    assert_eq!(more_than_all.users, everyone.users);
}

async fn reporting_a_name_twice_lists_it_once(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let name = unique("twice");
    app.report_user(&name).await.expect("first report");
    app.report_user(&name).await.expect("second report");
    let online = app.list(0).await.expect("listing");
    assert_eq!(online.users, [name]);
    assert_eq!(online.user_count, 1);
}

async fn guests_are_listed_by_canonical_address(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    for address in [
        "10.0.0.1",
        "::ffff:10.0.0.1",
        "2001:DB8::1",
        "2001:db8:0:0:0:0:0:1",
        "::1",
    ] {
        app.report_guest(address).await.expect("report accepted");
    }
    let online = app.list(0).await.expect("listing");
    assert_eq!(online.guests, ["10.0.0.1", "2001:db8::1", "::1"]);
    assert_eq!(online.guest_count, 3);
}

async fn assert_nothing_stored(app: &TestApp) {
    let online = app.list(0).await.expect("listing");
    assert_eq!((online.user_count, online.guest_count), (0, 0), "{online:?}");
}

async fn every_bad_username_is_refused_naming_the_field_and_nothing_is_stored(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let too_long = "a".repeat(257);
    for bad in ["", " alice", "alice ", "a\nb", "tab\there", "\u{7f}", too_long.as_str()] {
        let status = app.report_user(bad).await.expect_err("a bad name is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(
            status.message().starts_with("username: "),
            "{bad:?}: {}",
            status.message()
        );
    }
    assert_nothing_stored(&app).await;
}

async fn every_bad_ip_address_is_refused_naming_the_field_and_nothing_is_stored(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    for bad in [
        "",
        "1.2.3.4:80",
        "[::1]:443",
        "localhost",
        "10.0.0",
        "10.0.0.256",
        " 10.0.0.1",
    ] {
        let status = app.report_guest(bad).await.expect_err("a bad address is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(
            status.message().starts_with("ip_address: "),
            "{bad:?}: {}",
            status.message()
        );
    }
    assert_nothing_stored(&app).await;
}

async fn a_batch_is_stored_whole_or_not_at_all(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let bad = ReportBatchRequest {
        usernames: vec!["alice".into(), "".into()],
        ip_addresses: vec!["10.0.0.1".into(), "1.2.3.4:80".into()],
        ..Default::default()
    };
    let status = app.client.clone().report_batch(bad).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("usernames[1]"), "{}", status.message());
    assert!(status.message().contains("ip_addresses[1]"), "{}", status.message());
    assert_nothing_stored(&app).await;

    let good = ReportBatchRequest {
        usernames: vec!["bob".into(), "alice".into(), "bob".into()],
        ip_addresses: vec!["::ffff:192.0.2.1".into()],
        ..Default::default()
    };
    app.client.clone().report_batch(good).await.expect("accepted");
    let online = app.list(0).await.expect("listing");
    assert_eq!(online.users, ["alice", "bob"]);
    assert_eq!(online.guests, ["192.0.2.1"]);

    let too_big = ReportBatchRequest {
        usernames: (0..1001).map(|i| format!("u{i}")).collect(),
        ..Default::default()
    };
    let status = app.client.clone().report_batch(too_big).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(app.list(0).await.expect("listing").user_count, 2);
}

/// The contract of the recipe: a name reported at t is listed from the
/// moment its report returns until at least t + T, and not after t + 2T
/// (plus the moment it takes a replica to notice the rotation is due).
pub async fn assert_listed_for_one_interval_then_gone(apps: &[&TestApp], interval: Duration) {
    let name = unique("visitor");
    let reported_at = Instant::now();
    apps[0].report_user(&name).await.expect("report accepted");
    let mut checks = 0;
    while reported_at.elapsed() < interval {
        let app = apps[checks % apps.len()];
        let online = app.list(0).await.expect("listing");
        // Time may have passed T during the call; only a check that began
        // and ended inside [t, t + T) proves anything.
        if reported_at.elapsed() < interval {
            assert!(
                online.users.contains(&name),
                "{name} vanished after {:?} < T",
                reported_at.elapsed()
            );
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checks > 5, "too few checks inside the interval to mean anything");
    let slack = Duration::from_secs(2);
    eventually(&format!("{name} to be gone after 2T"), 2 * interval + slack, || async {
        let online = apps[0].list(0).await.ok()?;
        (!online.users.contains(&name)).then_some(())
    })
    .await;
    assert!(
        reported_at.elapsed() <= 2 * interval + slack,
        "{name} was listed for {:?}, more than 2T",
        reported_at.elapsed()
    );
}

async fn a_name_stays_listed_for_one_interval_and_is_gone_after_two(backend: Backend) {
    let interval = Duration::from_millis(1500);
    let (app, _redis) = start(backend, interval).await;
    assert_listed_for_one_interval_then_gone(&[&app], interval).await;
}
