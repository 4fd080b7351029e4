//! Rooms, on both stores: presence per forum or thread, as well as
//! site-wide, and the busiest rooms.

use std::time::{Duration, Instant};

use presence::proto::v1::{
    CountOnlineRequest, ListRoomsRequest, ListRoomsResponse, ReportBatchRequest, WatchOnlineRequest,
};
use tonic::Code;

use crate::backends::{Backend, LONG, for_each_backend, start};
use crate::helpers::{Api, eventually, settings, spawn_ready_app, unique};
use crate::redis_server::RedisServer;

for_each_backend!(
    a_report_into_a_room_lists_the_visitor_there_and_on_the_site,
    a_bad_room_is_refused_naming_room_by_every_call_and_nothing_is_stored,
    leaving_a_room_leaves_that_room_only_and_leaving_the_site_leaves_every_room,
    rooms_are_listed_by_name_or_busiest_first_with_exact_counts_page_by_page,
    a_room_keeps_the_window_of_the_site,
);

async fn rooms(api: &Api, order: i32, limit: u32, token: &str) -> ListRoomsResponse {
    let request = ListRoomsRequest {
        limit,
        page_token: token.to_owned(),
        order,
    };
    api.client
        .clone()
        .list_rooms(request)
        .await
        .expect("rooms")
        .into_inner()
}

fn names(response: &ListRoomsResponse) -> Vec<(String, u64, u64)> {
    response
        .rooms
        .iter()
        .map(|r| (r.name.clone(), r.user_count, r.guest_count))
        .collect()
}

async fn a_report_into_a_room_lists_the_visitor_there_and_on_the_site(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    app.report_user_in("ada", "forum/1").await.expect("reported");
    app.report_guest_in("::ffff:10.0.0.7", "forum/1")
        .await
        .expect("reported");
    app.report_user_in("bob", "forum/2").await.expect("reported");
    app.report_user("cy").await.expect("reported");
    let room = app.everyone_in("forum/1", 10).await.expect("listing");
    assert_eq!(
        (room.users, room.guests),
        (vec!["ada".to_owned()], vec!["10.0.0.7".to_owned()])
    );
    assert_eq!(app.count("forum/1").await.expect("counts"), (1, 1));
    assert_eq!(app.everyone_in("forum/2", 10).await.expect("listing").users, ["bob"]);
    assert!(app.everyone_in("forum/3", 10).await.expect("listing").users.is_empty());
    let site = app.everyone().await.expect("listing");
    assert_eq!(
        site.users,
        ["ada", "bob", "cy"],
        "the site lists everyone, wherever seen"
    );
    assert_eq!(site.guests, ["10.0.0.7"]);
    let checked = app
        .check("forum/1", &["ada", "bob"], &["10.0.0.7"])
        .await
        .expect("checked");
    let online: Vec<bool> = checked.users.iter().map(|u| u.online).collect();
    assert_eq!(online, [true, false], "online in this room");
    assert!(checked.users[1].last_seen.is_some(), "last seen is site-wide");
    assert!(checked.guests[0].online);
    let batch = ReportBatchRequest {
        usernames: vec!["dee".into()],
        ip_addresses: vec!["10.0.0.8".into()],
        room: "forum/2".into(),
    };
    app.client.clone().report_batch(batch).await.expect("reported");
    assert_eq!(app.count("forum/2").await.expect("counts"), (2, 1));
    // Paging in a room goes on by name, as on the site.
    let page = app.page("forum/2", 1, "").await.expect("a page");
    assert_eq!(page.users, ["bob"]);
    let next = app.page("forum/2", 1, &page.next_page_token).await.expect("a page");
    assert_eq!(next.users, ["dee"]);
}

async fn a_bad_room_is_refused_naming_room_by_every_call_and_nothing_is_stored(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    for bad in ["a\nb".to_owned(), "\0".to_owned(), "r".repeat(129)] {
        let refusals = [
            app.report_user_in("ada", &bad).await.err(),
            app.report_guest_in("10.0.0.1", &bad).await.err(),
            app.page(&bad, 10, "").await.err(),
            app.count(&bad).await.err(),
            app.check(&bad, &["ada"], &[]).await.err(),
            app.leave(&bad, &["ada"], &[]).await.err(),
            app.client
                .clone()
                .report_batch(ReportBatchRequest {
                    usernames: vec!["ada".into()],
                    room: bad.clone(),
                    ..Default::default()
                })
                .await
                .err(),
            app.client
                .clone()
                .count_online(CountOnlineRequest { room: bad.clone() })
                .await
                .err(),
            app.client
                .clone()
                .watch_online(WatchOnlineRequest { room: bad.clone() })
                .await
                .err(),
        ];
        for (i, refusal) in refusals.into_iter().enumerate() {
            let status = refusal.unwrap_or_else(|| panic!("call {i} accepted room {bad:?}"));
            assert_eq!(status.code(), Code::InvalidArgument, "call {i}");
            assert!(status.message().starts_with("room: "), "call {i}: {}", status.message());
        }
    }
    let a_room_of_128 = "r".repeat(128);
    app.report_user_in("ada", &a_room_of_128)
        .await
        .expect("128 bytes is a room");
    assert_eq!(
        app.everyone().await.expect("listing").users,
        ["ada"],
        "only the valid report"
    );
}

async fn leaving_a_room_leaves_that_room_only_and_leaving_the_site_leaves_every_room(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    for room in ["a", "b"] {
        app.report_user_in("ada", room).await.expect("reported");
        app.report_guest_in("10.0.0.1", room).await.expect("reported");
    }
    app.report_user_in("bob", "a").await.expect("reported");
    app.leave("a", &["ada"], &["10.0.0.1"]).await.expect("left");
    assert_eq!(app.everyone_in("a", 10).await.expect("listing").users, ["bob"]);
    assert!(app.everyone_in("a", 10).await.expect("listing").guests.is_empty());
    assert_eq!(
        app.everyone_in("b", 10).await.expect("listing").users,
        ["ada"],
        "still in b"
    );
    assert_eq!(
        app.everyone().await.expect("listing").users,
        ["ada", "bob"],
        "still on the site"
    );
    app.leave("", &["ada"], &["10.0.0.1"]).await.expect("left");
    assert!(
        app.everyone_in("b", 10).await.expect("listing").users.is_empty(),
        "gone from every room"
    );
    assert!(app.everyone_in("b", 10).await.expect("listing").guests.is_empty());
    assert_eq!(app.everyone().await.expect("listing").users, ["bob"]);
    assert_eq!(app.everyone_in("a", 10).await.expect("listing").users, ["bob"]);
    // Back in a room after leaving the site.
    app.report_user_in("ada", "b").await.expect("reported");
    assert_eq!(app.everyone_in("b", 10).await.expect("listing").users, ["ada"]);
}

async fn rooms_are_listed_by_name_or_busiest_first_with_exact_counts_page_by_page(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    for (room, users) in [("quiet", 1), ("busy", 5), ("middling", 3), ("also-3", 3)] {
        for i in 0..users {
            app.report_user_in(&format!("{room}-{i}"), room)
                .await
                .expect("reported");
        }
    }
    app.report_guest_in("10.0.0.1", "quiet").await.expect("reported");
    app.report_user_in("gone", "empty").await.expect("reported");
    app.leave("empty", &["gone"], &[]).await.expect("left");

    let by_name = rooms(&app, 1, 0, "").await;
    assert_eq!(
        names(&by_name),
        [
            ("also-3".to_owned(), 3, 0),
            ("busy".to_owned(), 5, 0),
            ("middling".to_owned(), 3, 0),
            ("quiet".to_owned(), 1, 1)
        ],
        "only rooms with someone online, exact counts"
    );
    assert_eq!(by_name.next_page_token, "");
    assert_eq!(
        names(&rooms(&app, 0, 0, "").await),
        names(&by_name),
        "unspecified is by name"
    );

    let busiest: Vec<String> = names(&rooms(&app, 2, 0, "").await).into_iter().map(|r| r.0).collect();
    assert_eq!(
        busiest,
        ["busy", "also-3", "middling", "quiet"],
        "most users first, ties by name"
    );

    // Page by page, busiest first, two at a time: the same rooms.
    let mut token = String::new();
    let mut walked = Vec::new();
    loop {
        let page = rooms(&app, 2, 2, &token).await;
        assert!(page.rooms.len() <= 2);
        walked.extend(names(&page).into_iter().map(|r| r.0));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(walked, busiest);
    // And a token of one order is refused by the other.
    let by_users_token = rooms(&app, 2, 1, "").await.next_page_token;
    let request = ListRoomsRequest {
        limit: 1,
        page_token: by_users_token,
        order: 1,
    };
    let status = app
        .client
        .clone()
        .list_rooms(request)
        .await
        .expect_err("another order's token");
    assert!(status.message().starts_with("page_token: "), "{}", status.message());
}

async fn a_room_keeps_the_window_of_the_site(backend: Backend) {
    let interval = Duration::from_millis(1500);
    let (app, _redis) = start(backend, interval).await;
    let name = unique("roomer");
    let reported = Instant::now();
    app.report_user_in(&name, "thread").await.expect("reported");
    while reported.elapsed() < interval {
        let listed = app.everyone_in("thread", 100).await.expect("listing").users;
        if reported.elapsed() < interval {
            assert!(
                listed.contains(&name),
                "gone from the room after {:?} < T",
                reported.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(
        "the room to be empty after 2T",
        2 * interval + Duration::from_secs(2),
        || async {
            app.everyone_in("thread", 100)
                .await
                .ok()?
                .users
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(reported.elapsed() <= 2 * interval + Duration::from_secs(2));
    assert!(
        rooms(&app, 1, 0, "").await.rooms.is_empty(),
        "an empty room is not listed"
    );
}

/// A room nobody reported into for 2T leaves no key behind in Redis.
#[tokio::test]
async fn a_room_nobody_reported_into_for_two_intervals_has_no_keys_left() {
    // Long enough that the sweep, which may start a second or two into its
    // interval, reaches the room within the interval it is due in.
    let interval = Duration::from_millis(3000);
    let (app, redis) = start(Backend::Redis, interval).await;
    let redis = redis.expect("a Redis");
    app.report_user_in("ada", "ephemeral").await.expect("reported");
    app.report_guest_in("10.0.0.1", "ephemeral").await.expect("reported");
    let reported = Instant::now();
    let mut direct = redis.connection().expect("a direct connection");
    let keys = |direct: &mut ::redis::Connection| -> Vec<String> {
        ::redis::cmd("KEYS")
            .arg("{presence:room:ephemeral}*")
            .query(direct)
            .expect("KEYS")
    };
    assert!(!keys(&mut direct).is_empty(), "the room has keys while in use");
    eventually(
        "the room's keys to be gone",
        2 * interval + Duration::from_secs(3),
        || {
            let left = keys(&mut direct);
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
    assert!(
        reported.elapsed() >= interval,
        "gone too soon: {:?}",
        reported.elapsed()
    );
    // The sweep updates the index just after the room's script removed its
    // keys, or, if they expired first, when it reaches the room.
    eventually("the index to forget the room too", Duration::from_secs(5), || {
        let index: Vec<String> = ::redis::cmd("ZRANGE")
            .arg("{presence:rooms}:names")
            .arg(0)
            .arg(-1)
            .query(&mut direct)
            .expect("ZRANGE");
        async move { index.is_empty().then_some(()) }
    })
    .await;
}

/// A room whose keys all expired before any sweep reached them (no replica
/// ran meanwhile) must not keep its old place in the busiest-first order:
/// its next report starts its versions again above the one the index still
/// holds (they start from Redis's clock), so the index takes its new count.
#[tokio::test]
async fn a_room_whose_keys_expired_unswept_is_ordered_by_its_new_count() {
    let redis = RedisServer::start();
    let mut settings = settings(Some(redis.url()));
    settings.tick_interval = Duration::from_millis(1000);
    let first = spawn_ready_app(settings.clone()).await;
    for name in ["a", "b", "c"] {
        first.report_user_in(name, "faded").await.expect("reported");
    }
    drop(first);
    let mut direct = redis.connection().expect("a direct connection");
    eventually("the room's keys to expire", Duration::from_secs(10), || {
        let left: Vec<String> = ::redis::cmd("KEYS")
            .arg("{presence:room:faded}*")
            .query(&mut direct)
            .expect("KEYS");
        async move { left.is_empty().then_some(()) }
    })
    .await;
    let second = spawn_ready_app(settings).await;
    second.report_user_in("d", "steady").await.expect("reported");
    second.report_user_in("e", "steady").await.expect("reported");
    second.report_user_in("f", "faded").await.expect("reported");
    let listed = names(&rooms(&second, 2, 10, "").await);
    assert_eq!(
        listed,
        [("steady".to_owned(), 2, 0), ("faded".to_owned(), 1, 0)],
        "busiest first, by the counts of now"
    );
}

/// The sweep frees each interval's set of rooms reported into once it has
/// read it for the two intervals after, with `UNLINK` (in the background),
/// instead of leaving it to expire: Redis frees an expiring key on its main
/// thread, and a set of 100,000 rooms took 35 ms to free there
/// (`bench/rooms` e). So the set must go while its expiry is still ahead.
#[tokio::test]
async fn the_sweep_frees_each_seen_set_itself_before_it_would_expire() {
    let interval = Duration::from_millis(2000);
    let (app, redis) = start(Backend::Redis, interval).await;
    let redis = redis.expect("a Redis");
    let mut direct = redis.connection().expect("a direct connection");
    app.report_user_in("ada", "once").await.expect("reported");
    let seen: Vec<String> = ::redis::cmd("KEYS")
        .arg("{presence:rooms}:seen:*")
        .query(&mut direct)
        .expect("KEYS");
    let [seen] = seen.as_slice() else {
        panic!("one seen set after one report: {seen:?}");
    };
    // PTTL of the set at the last look before it went: -2 once gone.
    let mut last_ttl = -2;
    eventually("the seen set to be gone", 3 * interval + Duration::from_secs(3), || {
        let ttl: i64 = ::redis::cmd("PTTL").arg(seen).query(&mut direct).expect("PTTL");
        if ttl != -2 {
            last_ttl = ttl;
        }
        async move { (ttl == -2).then_some(()) }
    })
    .await;
    assert!(
        last_ttl > 500,
        "{seen} was left to expire (last PTTL seen: {last_ttl} ms) instead of being freed by the sweep"
    );
}

/// A room's version (which orders its index updates) outlives every other
/// key of the room, so a room in use keeps one run of versions; were it to
/// expire first, the next report would start a new run from Redis's clock
/// (see `a_room_whose_keys_expired_unswept_is_ordered_by_its_new_count`).
/// The case that matters: the room is rotated by a read, then reported
/// into, which makes a new `current`.
#[tokio::test]
async fn a_rooms_version_outlives_its_other_keys_across_a_rotation() {
    let interval = Duration::from_millis(1000);
    let (app, redis) = start(Backend::Redis, interval).await;
    let redis = redis.expect("a Redis");
    let mut direct = redis.connection().expect("a direct connection");
    let key = |suffix: &str| format!("{{presence:room:hall}}:{suffix}");
    let started_at = |direct: &mut ::redis::Connection| -> Option<u64> {
        ::redis::cmd("GET")
            .arg(key("users:interval"))
            .query(direct)
            .expect("GET")
    };
    app.report_user_in("ada", "hall").await.expect("reported");
    let first = started_at(&mut direct).expect("the room's interval is set by its first report");
    // A read of the room in the next interval rotates it.
    let deadline = Instant::now() + 3 * interval;
    while started_at(&mut direct) == Some(first) {
        assert!(Instant::now() < deadline, "the room never rotated");
        app.everyone_in("hall", 10).await.expect("listing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.report_user_in("bob", "hall").await.expect("reported");
    let pttl = |direct: &mut ::redis::Connection, suffix: &str| -> i64 {
        ::redis::cmd("PTTL").arg(key(suffix)).query(direct).expect("PTTL")
    };
    let version = pttl(&mut direct, "version");
    for other in ["users:current", "users:old", "users:interval"] {
        let ttl = pttl(&mut direct, other);
        assert!(ttl > 0, "{other} expires on its own (PTTL {ttl})");
        assert!(
            version >= ttl - 50,
            "the version (PTTL {version} ms) expires before {other} (PTTL {ttl} ms)"
        );
    }
    let listed = rooms(&app, 1, 10, "").await.rooms;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].name.as_str(), listed[0].user_count), ("hall", 2));
}

/// The rooms index keeps each room's newest counts, whatever order updates
/// from many replicas arrive in: an update older than the one indexed (a
/// lower version, or the same) changes nothing, not even a room's leaving
/// the index, and a newer one always lands. Run on the script itself, as
/// replicas' updates cannot be made to arrive out of order from outside.
#[tokio::test]
async fn the_rooms_index_ignores_an_update_older_than_the_one_it_holds() {
    use presence::keyspace::{INDEX_ROOMS_SCRIPT, KeyPrefix, Keyspace};
    let (_app, redis) = start(Backend::Redis, LONG).await;
    let redis = redis.expect("a Redis");
    let mut direct = redis.connection().expect("a direct connection");
    let index = Keyspace::new(&KeyPrefix::parse("ordering").expect("a prefix")).rooms;
    let script = ::redis::Script::new(INDEX_ROOMS_SCRIPT);
    let mut update = |room: &str, users: u64, guests: u64, version: u64| {
        script
            .key(&index.names)
            .key(&index.users)
            .key(&index.indexed)
            .key(index.seen(0))
            .arg(0)
            .arg(room)
            .arg(users)
            .arg(guests)
            .arg(version)
            .invoke::<i64>(&mut direct)
            .expect("the index script");
        // Each key's members with their scores, in the key's order.
        let mut members = |key: &str| -> Vec<(String, f64)> {
            ::redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(&mut direct)
                .expect("ZRANGE")
        };
        let listed = members(&index.users);
        let names = |members: Vec<(String, f64)>| -> Vec<String> {
            let mut names: Vec<String> = members.into_iter().map(|(room, _)| room).collect();
            names.sort();
            names
        };
        let by_name = names(listed.clone());
        assert_eq!(names(members(&index.names)), by_name, "the names agree");
        assert_eq!(names(members(&index.indexed)), by_name, "the versions agree");
        listed
    };
    let room = |name: &str, users: f64| (name.to_owned(), -users);
    assert_eq!(update("hall", 3, 0, 5), [room("hall", 3.0)]);
    assert_eq!(update("hall", 9, 0, 4), [room("hall", 3.0)], "older: ignored");
    assert_eq!(
        update("hall", 0, 0, 5),
        [room("hall", 3.0)],
        "the same version: ignored"
    );
    // Busiest first: ascending by minus the users online.
    assert_eq!(update("den", 2, 1, 1), [room("hall", 3.0), room("den", 2.0)]);
    assert_eq!(update("den", 0, 0, 1), [room("hall", 3.0), room("den", 2.0)]);
    assert_eq!(
        update("den", 7, 0, 2),
        [room("den", 7.0), room("hall", 3.0)],
        "newer: lands"
    );
    assert_eq!(
        update("yard", 0, 4, 1),
        [room("den", 7.0), room("hall", 3.0), room("yard", 0.0)],
        "guests only: indexed"
    );
    assert_eq!(
        update("hall", 0, 0, 6),
        [room("den", 7.0), room("yard", 0.0)],
        "newer and empty: out of every key"
    );
    assert_eq!(update("den", 1, 0, 1), [room("den", 7.0), room("yard", 0.0)]);
}

/// Keys of the rooms index that an earlier build wrote and nothing reads
/// now (its versions hash and its guests set) do not outlive an upgrade:
/// the replica that takes an interval's sweep removes them. They carry no
/// expiry, so left alone they would stay for ever.
#[tokio::test]
async fn the_index_keys_of_earlier_builds_are_removed_by_the_sweep() {
    let interval = Duration::from_millis(1000);
    let (app, redis) = start(Backend::Redis, interval).await;
    let redis = redis.expect("a Redis");
    let mut direct = redis.connection().expect("a direct connection");
    let retired = ["{presence:rooms}:versions", "{presence:rooms}:guests"];
    ::redis::cmd("HSET")
        .arg(retired[0])
        .arg("hall")
        .arg(7)
        .query::<()>(&mut direct)
        .expect("HSET");
    ::redis::cmd("ZADD")
        .arg(retired[1])
        .arg(-1)
        .arg("hall")
        .query::<()>(&mut direct)
        .expect("ZADD");
    app.report_user_in("ada", "hall").await.expect("reported");
    eventually(
        "the retired index keys to be gone",
        3 * interval + Duration::from_secs(3),
        || {
            let left: u64 = ::redis::cmd("EXISTS")
                .arg(&retired[..])
                .query(&mut direct)
                .expect("EXISTS");
            async move { (left == 0).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        app.count("hall").await.expect("counts"),
        (1, 0),
        "the room itself is untouched"
    );
}
