//! The questions pages ask, on both stores: every page of who is online,
//! counts, whether these people are online and when they were last seen,
//! and sign-outs.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use presence::proto::v1::{CheckOnlineRequest, LeaveRequest, ListRoomsRequest, ReportBatchRequest, RoomOrder};
use tonic::Code;

use crate::backends::{Backend, LONG, for_each_backend, start, start_with};
use crate::helpers::{TestApp, eventually, unique};

for_each_backend!(
    pages_walk_everyone_once_in_byte_order_with_exact_counts_on_every_page,
    the_page_size_is_coerced_not_refused,
    a_token_that_is_not_ours_or_of_another_room_is_refused_naming_page_token,
    a_walk_across_rotations_meets_everyone_online_throughout_exactly_once,
    count_online_gives_the_counts_without_names,
    check_online_answers_in_request_order_with_canonical_guests_and_last_seen,
    online_in_check_online_is_exactly_what_list_online_lists,
    check_and_leave_validate_like_report_batch_and_change_nothing_on_bad_input,
    leave_takes_names_off_at_once_keeps_last_seen_and_a_later_report_lists_again,
    with_last_seen_off_check_online_gives_no_last_seen,
    last_seen_follows_reports_to_within_its_precision,
    under_concurrent_lists_each_shows_every_report_that_returned_before_it_was_asked,
    concurrent_walks_of_different_pages_and_rooms_each_get_their_own_pages,
    the_list_cache_answers_from_the_past_for_at_most_its_age,
);

async fn report_batch(app: &TestApp, users: &[String], guests: &[String]) {
    for chunk in users.chunks(1000) {
        let request = ReportBatchRequest {
            usernames: chunk.to_vec(),
            ip_addresses: Vec::new(),
            room: String::new(),
        };
        app.client.clone().report_batch(request).await.expect("reported");
    }
    for chunk in guests.chunks(1000) {
        let request = ReportBatchRequest {
            usernames: Vec::new(),
            ip_addresses: chunk.to_vec(),
            room: String::new(),
        };
        app.client.clone().report_batch(request).await.expect("reported");
    }
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names
}

async fn pages_walk_everyone_once_in_byte_order_with_exact_counts_on_every_page(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let users: Vec<String> = (0..250)
        .map(|i| format!("user-{i:03}"))
        .chain(["Émile".into(), "zoë".into(), "Bob".into()])
        .collect();
    let guests: Vec<String> = (0..40).map(|i| format!("10.0.{}.{}", i / 10, i % 10)).collect();
    report_batch(&app, &users, &guests).await;

    let mut token = String::new();
    let (mut seen_users, mut seen_guests) = (Vec::new(), Vec::new());
    let mut pages = 0;
    loop {
        let page = app.page("", 7, &token).await.expect("a page");
        pages += 1;
        assert!(page.users.len() <= 7 && page.guests.len() <= 7, "{page:?}");
        assert_eq!((page.user_count, page.guest_count), (253, 40), "counts on page {pages}");
        seen_users.extend(page.users);
        seen_guests.extend(page.guests);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 253usize.div_ceil(7), "pages go on until both lists are done");
    assert_eq!(seen_users, sorted(users.clone()), "every user once, in byte order");
    let mut expected_guests = guests.clone();
    expected_guests.sort();
    assert_eq!(seen_guests, expected_guests);
}

async fn the_page_size_is_coerced_not_refused(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let users: Vec<String> = (0..1500).map(|i| format!("u{i:05}")).collect();
    report_batch(&app, &users, &[]).await;
    assert_eq!(
        app.page("", 0, "").await.expect("a page").users.len(),
        100,
        "0 is the default, 100"
    );
    assert_eq!(app.page("", 1, "").await.expect("a page").users.len(), 1);
    assert_eq!(
        app.page("", 5000, "").await.expect("a page").users.len(),
        1000,
        "above 1000 is 1000"
    );
    assert_eq!(app.page("", u32::MAX, "").await.expect("a page").users.len(), 1000);
}

async fn a_token_that_is_not_ours_or_of_another_room_is_refused_naming_page_token(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let users: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    report_batch(&app, &users, &[]).await;
    for bad in ["x", "not-a-token", "AAAAAAAAAAAA", "%%%", &"A".repeat(10_000)] {
        let status = app.page("", 2, bad).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().starts_with("page_token: "), "{}", status.message());
    }
    let token = app.page("", 2, "").await.expect("a page").next_page_token;
    assert!(!token.is_empty());
    let status = app.page("a-room", 2, &token).await.expect_err("another room's token");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("page_token: "), "{}", status.message());
    // The real one still works.
    assert_eq!(app.page("", 2, &token).await.expect("a page").users, ["u2", "u3"]);
}

/// Names reported again and again stay online the whole walk; the walk is
/// slow enough that Presence rotates several times under it. Each must be
/// met exactly once.
async fn a_walk_across_rotations_meets_everyone_online_throughout_exactly_once(backend: Backend) {
    let interval = Duration::from_millis(600);
    let (app, _redis) = start(backend, interval).await;
    let users: Vec<String> = (0..120).map(|i| format!("steady-{i:03}")).collect();
    report_batch(&app, &users, &[]).await;
    let began = Instant::now();
    let mut last_report = Instant::now();
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        // Keep everyone online: a report at least once per interval.
        if last_report.elapsed() > interval / 3 {
            report_batch(&app, &users, &[]).await;
            last_report = Instant::now();
        }
        let page = app.page("", 2, &token).await.expect("a page");
        seen.extend(page.users);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        began.elapsed() > 2 * interval,
        "the walk should span rotations ({:?})",
        began.elapsed()
    );
    assert_eq!(seen, users, "each name exactly once, in order");
}

async fn count_online_gives_the_counts_without_names(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    assert_eq!(app.count("").await.expect("counts"), (0, 0));
    let users: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let guests: Vec<String> = vec!["10.0.0.1".into(), "::ffff:10.0.0.1".into(), "2001:db8::1".into()];
    report_batch(&app, &users, &guests).await;
    assert_eq!(app.count("").await.expect("counts"), (30, 2));
    let listed = app.list(1).await.expect("listing");
    assert_eq!((listed.user_count, listed.guest_count), (30, 2));
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(timestamp: &prost_types::Timestamp) -> i64 {
    timestamp.seconds * 1000 + i64::from(timestamp.nanos) / 1_000_000
}

async fn check_online_answers_in_request_order_with_canonical_guests_and_last_seen(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let before = unix_ms_now();
    app.report_user("alice").await.expect("reported");
    app.report_guest("2001:DB8::1").await.expect("reported");
    let after = unix_ms_now();
    let answer = app
        .check("", &["nobody", "alice", "alice"], &["::ffff:10.9.9.9", "2001:db8:0::1"])
        .await
        .expect("checked");
    let users: Vec<(&str, bool)> = answer.users.iter().map(|u| (u.username.as_str(), u.online)).collect();
    assert_eq!(users, [("nobody", false), ("alice", true), ("alice", true)]);
    assert_eq!(answer.users[0].last_seen, None, "never reported: no last seen");
    let seen = ms(answer.users[1].last_seen.as_ref().expect("a last seen"));
    assert!(
        before - 1000 <= seen && seen <= after + 1000,
        "last seen {seen} not around {before}..{after}"
    );
    let guests: Vec<(&str, bool)> = answer
        .guests
        .iter()
        .map(|g| (g.ip_address.as_str(), g.online))
        .collect();
    assert_eq!(guests, [("10.9.9.9", false), ("2001:db8::1", true)], "canonical forms");
}

async fn online_in_check_online_is_exactly_what_list_online_lists(backend: Backend) {
    let interval = Duration::from_millis(700);
    let (app, _redis) = start(backend, interval).await;
    let names: Vec<String> = (0..20).map(|i| format!("n{i:02}")).collect();
    report_batch(&app, &names[..10], &[]).await;
    app.leave("", &["n03"], &[]).await.expect("left");
    // Through a rotation and an ageing-out, the two answers always agree.
    let began = Instant::now();
    while began.elapsed() < 3 * interval {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let listed = app.everyone().await.expect("listing").users;
        let checked = app.check("", &refs, &[]).await.expect("checked");
        let listed_again = app.everyone().await.expect("listing").users;
        if listed != listed_again {
            continue; // a rotation fell between the two reads
        }
        let online: Vec<String> = checked
            .users
            .iter()
            .filter(|u| u.online)
            .map(|u| u.username.clone())
            .collect();
        assert_eq!(online, listed, "after {:?}", began.elapsed());
    }
    assert!(
        app.everyone().await.expect("listing").users.is_empty(),
        "all aged out after 2T"
    );
}

async fn check_and_leave_validate_like_report_batch_and_change_nothing_on_bad_input(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    app.report_user("alice").await.expect("reported");
    let bad_users = vec!["alice".to_owned(), String::new()];
    let bad_guests = vec!["1.2.3.4:80".to_owned()];
    let status = app
        .client
        .clone()
        .check_online(CheckOnlineRequest {
            usernames: bad_users.clone(),
            ip_addresses: bad_guests.clone(),
            room: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("usernames[1]") && status.message().contains("ip_addresses[0]"),
        "{}",
        status.message()
    );
    let status = app
        .client
        .clone()
        .leave(LeaveRequest {
            usernames: bad_users,
            ip_addresses: bad_guests,
            room: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        app.everyone().await.expect("listing").users,
        ["alice"],
        "a refused Leave removes nothing"
    );
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let status = app
        .client
        .clone()
        .leave(LeaveRequest {
            usernames: too_many.clone(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = app
        .client
        .clone()
        .check_online(CheckOnlineRequest {
            usernames: too_many,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = app.check("a\nroom", &["alice"], &[]).await.expect_err("bad room");
    assert!(status.message().starts_with("room: "), "{}", status.message());
    assert_eq!(app.everyone().await.expect("listing").users, ["alice"]);
}

async fn leave_takes_names_off_at_once_keeps_last_seen_and_a_later_report_lists_again(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let name = unique("leaver");
    app.report_user(&name).await.expect("reported");
    app.report_user("stays").await.expect("reported");
    app.report_guest("10.1.1.1").await.expect("reported");
    app.leave("", &[&name], &["::ffff:10.1.1.1"]).await.expect("left");
    let everyone = app.everyone().await.expect("listing");
    assert_eq!(everyone.users, ["stays"]);
    assert!(everyone.guests.is_empty(), "the guest left by any form of its address");
    assert_eq!(app.count("").await.expect("counts"), (1, 0));
    let checked = app.check("", &[&name], &[]).await.expect("checked");
    assert!(!checked.users[0].online);
    assert!(checked.users[0].last_seen.is_some(), "a sign-out keeps last seen");
    app.report_user(&name).await.expect("reported");
    assert!(
        app.everyone().await.expect("listing").users.contains(&name),
        "listed again"
    );
    // Leaving someone who is not online is fine.
    app.leave("", &["never-here"], &[]).await.expect("left");
}

async fn with_last_seen_off_check_online_gives_no_last_seen(backend: Backend) {
    let (app, redis) = start_with(backend, |s| s.last_seen_retention = Duration::ZERO).await;
    app.report_user("alice").await.expect("reported");
    let checked = app.check("", &["alice"], &[]).await.expect("checked");
    assert!(checked.users[0].online);
    assert_eq!(checked.users[0].last_seen, None);
    if let Some(redis) = redis {
        let mut direct = redis.connection().expect("a direct connection");
        let exists: bool = ::redis::cmd("EXISTS")
            .arg("{presence:users}:last-seen")
            .query(&mut direct)
            .expect("EXISTS");
        assert!(!exists, "last seen off keeps nothing");
    }
}

async fn last_seen_follows_reports_to_within_its_precision(backend: Backend) {
    let precision = Duration::from_millis(300);
    let (app, _redis) = start_with(backend, |s| s.last_seen_precision = precision).await;
    app.report_user("ada").await.expect("reported");
    let first = ms(app.check("", &["ada"], &[]).await.expect("checked").users[0]
        .last_seen
        .as_ref()
        .expect("a last seen"));
    // Reported again and again: last seen moves on, never lagging the
    // latest report by more than the precision (plus the clock's grain).
    let later = eventually("last seen to move on", Duration::from_secs(10), || async {
        let reported = unix_ms_now();
        app.report_user("ada").await.ok()?;
        let seen = ms(app.check("", &["ada"], &[]).await.ok()?.users[0].last_seen.as_ref()?);
        assert!(
            seen + i64::try_from(precision.as_millis()).unwrap_or(0) + 50 >= reported,
            "last seen {seen} lags the report at {reported} by more than the precision"
        );
        (seen > first).then_some(seen)
    })
    .await;
    assert!(later > first);
    // Guests have no last seen at all: their addresses are not kept.
    let request = CheckOnlineRequest {
        ip_addresses: vec!["10.0.0.1".into()],
        ..Default::default()
    };
    let answer = app
        .client
        .clone()
        .check_online(request)
        .await
        .expect("checked")
        .into_inner();
    assert_eq!(answer.guests.len(), 1);
}

/// Last seen older than the retention is removed from Redis, in steps of
/// a few hundred (more than one step here), and no longer answered.
#[tokio::test]
async fn last_seen_older_than_the_retention_is_pruned() {
    let (app, redis) = start_with(Backend::Redis, |s| s.last_seen_retention = Duration::from_secs(1)).await;
    let redis = redis.expect("a Redis");
    let users: Vec<String> = (0..1200).map(|i| format!("old-{i:04}")).collect();
    report_batch(&app, &users, &[]).await;
    let mut direct = redis.connection().expect("a direct connection");
    let stored: u64 = ::redis::cmd("ZCARD")
        .arg("{presence:users}:last-seen")
        .query(&mut direct)
        .expect("ZCARD");
    assert_eq!(stored, 1200);
    eventually("stale last seen to be pruned", Duration::from_secs(15), || {
        let left: Option<u64> = ::redis::cmd("ZCARD")
            .arg("{presence:users}:last-seen")
            .query(&mut direct)
            .ok();
        async move { (left == Some(0)).then_some(()) }
    })
    .await;
    let checked = app.check("", &["old-0001"], &[]).await.expect("checked");
    assert_eq!(checked.users[0].last_seen, None);
}

/// Identical lists asked at once share Redis reads; none may answer from
/// before its caller asked. Each caller reports its own name, then lists
/// (and counts) while the others do the same: its name must be there.
async fn under_concurrent_lists_each_shows_every_report_that_returned_before_it_was_asked(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let app = std::sync::Arc::new(app);
    let prefix = unique("crowd");
    let callers: Vec<_> = (0..32)
        .map(|caller| {
            let app = app.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move {
                for round in 0..10 {
                    let name = format!("{prefix}-{caller:02}-{round:02}");
                    app.report_user(&name).await.expect("reported");
                    let listed = app.list(1000).await.expect("listed");
                    assert!(
                        listed.users.contains(&name),
                        "{name} was reported before the list was asked, but not listed"
                    );
                    let (users, _) = app.count("").await.expect("counted");
                    assert!(
                        users >= listed.user_count,
                        "a count asked after a list saw fewer users ({users} < {})",
                        listed.user_count
                    );
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("a caller panicked");
    }
    assert_eq!(app.count("").await.expect("counted").0, 320);
}

/// Concurrent identical pages share one read and one encoding: callers
/// asking *different* pages (another place in the walk, another size,
/// another room) must never be given each other's. Walkers of the site and
/// of two rooms, four for each scope and page size, walk three times each
/// (so they drift out of step and ask different pages of one scope and
/// size at once), and meet each name of their scope exactly once per walk,
/// in byte order, with exact counts.
async fn concurrent_walks_of_different_pages_and_rooms_each_get_their_own_pages(backend: Backend) {
    let (app, _redis) = start(backend, LONG).await;
    let app = std::sync::Arc::new(app);
    let rooms = [unique("walk-a"), unique("walk-b")];
    let mut expected: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    for (r, room) in rooms.iter().enumerate() {
        let names: Vec<String> = (0..40 + 25 * r).map(|i| format!("{room}-{i:03}")).collect();
        let request = ReportBatchRequest {
            usernames: names.clone(),
            ip_addresses: Vec::new(),
            room: room.clone(),
        };
        app.client.clone().report_batch(request).await.expect("reported");
        expected[0].1.extend(names.iter().cloned());
        expected.push((room.clone(), sorted(names)));
    }
    expected[0].1 = sorted(std::mem::take(&mut expected[0].1));
    let mut walkers = Vec::new();
    for size in [1u32, 2, 3, 5, 8, 13] {
        for (room, names) in &expected {
            for _ in 0..4 {
                let (app, room, names) = (app.clone(), room.clone(), names.clone());
                walkers.push(tokio::spawn(async move {
                    for _ in 0..3 {
                        let everyone = app.everyone_in(&room, size).await.expect("walked");
                        assert_eq!(everyone.users, names, "room {room:?}, pages of {size}");
                        assert_eq!(
                            everyone.user_count,
                            names.len() as u64,
                            "room {room:?}, pages of {size}"
                        );
                        assert!(
                            everyone.pages <= names.len() / size as usize + 1,
                            "{} pages",
                            everyone.pages
                        );
                    }
                }));
            }
        }
    }
    for walker in walkers {
        walker.await.expect("a walker panicked");
    }
}

/// With `PRESENCE_LIST_CACHE`, lists, counts and lists of rooms may come
/// from the past, but for no longer than the stated age.
async fn the_list_cache_answers_from_the_past_for_at_most_its_age(backend: Backend) {
    const AGE: Duration = Duration::from_secs(2);
    let (app, _redis) = start_with(backend, |s| {
        s.tick_interval = LONG;
        s.list_cache = AGE;
    })
    .await;
    let rooms = |app: &TestApp| {
        let mut client = app.client.clone();
        async move {
            let request = ListRoomsRequest {
                limit: 10,
                page_token: String::new(),
                order: RoomOrder::MostOnline.into(),
            };
            client
                .list_rooms(request)
                .await
                .expect("rooms listed")
                .into_inner()
                .rooms
                .len()
        }
    };
    app.report_user("first").await.expect("reported");
    assert_eq!(app.list(100).await.expect("listed").users, vec!["first".to_owned()]);
    assert_eq!(app.count("").await.expect("counted").0, 1);
    assert_eq!(rooms(&app).await, 0);
    let cached_at = Instant::now();
    app.report_user_in("second", "lobby").await.expect("reported");
    let listed = app.list(100).await.expect("listed");
    let counted = app.count("").await.expect("counted").0;
    let room_count = rooms(&app).await;
    if cached_at.elapsed() < AGE {
        // Asked within the age: the cache answered, without "second".
        assert_eq!(listed.users, vec!["first".to_owned()], "the list was not cached");
        assert_eq!(counted, 1, "the count was not cached");
        assert_eq!(room_count, 0, "the rooms were not cached");
    }
    eventually(
        "the cached answers to pass their age",
        AGE + Duration::from_secs(3),
        || async {
            let listed = app.list(100).await.expect("listed");
            let counted = app.count("").await.expect("counted").0;
            (listed.users.len() == 2 && counted == 2 && rooms(&app).await == 1).then_some(())
        },
    )
    .await;
}

/// Last seen is answered only within the retention, counted on Redis's
/// clock, even for an entry the pruning has not reached yet: one from 8
/// days ago (retention 7 days) has none, one from a day ago has its own.
#[tokio::test]
async fn last_seen_outside_the_retention_is_not_answered_even_before_it_is_pruned() {
    let (app, redis) = start(Backend::Redis, LONG).await;
    let redis = redis.expect("a Redis");
    let mut direct = redis.connection().expect("a direct connection");
    let day = 24 * 3600 * 1000;
    let now = unix_ms_now();
    ::redis::cmd("ZADD")
        .arg("{presence:users}:last-seen")
        .arg(now - 8 * day)
        .arg("gone-long-ago")
        .arg(now - day)
        .arg("yesterday")
        .query::<()>(&mut direct)
        .expect("ZADD");
    let checked = app
        .check("", &["gone-long-ago", "yesterday"], &[])
        .await
        .expect("checked");
    assert_eq!(checked.users[0].last_seen, None, "8 days ago is outside 7 days");
    let seen = ms(checked.users[1].last_seen.as_ref().expect("a day ago is within 7 days"));
    assert_eq!(seen, now - day);
}
