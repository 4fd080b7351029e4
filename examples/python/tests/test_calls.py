"""Paging, counts, checks, Leave and rooms, against a real server (PRESENCE_TARGET).

Most tests work in a room of their own (named after `unique`), so that what
they assert on is exact, whatever else is online on the site.
"""

import datetime

import grpc
import pytest

from helpers import by_bytes, everyone, online, random_group, random_ipv4
from presence_client import Counts, GuestStatus, Room, main


def rejected(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def names(unique, count):
    return [f"{unique}-{i:04}" for i in range(count)]


# --- Paging -------------------------------------------------------------------


def test_paging_walks_every_name_exactly_once_in_order(client, unique):
    users = names(unique, 260)
    group = random_group()
    guests = [f"2001:db8:{group:x}::{i + 1:x}" for i in range(40)]
    client.report_batch(users, guests, room=unique)

    pages = list(client.iter_online(room=unique, page_size=7))
    assert [user for page in pages for user in page.users] == by_bytes(users)
    assert [guest for page in pages for guest in page.guests] == by_bytes(guests)
    assert all(len(page.users) <= 7 and len(page.guests) <= 7 for page in pages)
    assert all((page.user_count, page.guest_count) == (260, 40) for page in pages)
    assert all(page.next_page_token for page in pages[:-1]) and pages[-1].next_page_token == ""

    # On the site, among everyone else, each of them still comes exactly once.
    walked = everyone(client, page_size=50)
    assert sorted(user for user in walked.users if user.startswith(unique)) == sorted(users)


def test_a_limit_of_0_means_100_and_above_1000_means_1000(client, unique):
    users = names(unique, 1010)
    client.report_batch(users[:505], room=unique)  # at most 1000 entries a batch
    client.report_batch(users[505:], room=unique)

    default = client.list_online(0, room=unique)
    assert default.users == by_bytes(users)[:100] and default.next_page_token
    capped = client.list_online(5000, room=unique)
    assert capped.users == by_bytes(users)[:1000] and capped.user_count == 1010
    rest = client.list_online(5000, page_token=capped.next_page_token, room=unique)
    assert rest.users == by_bytes(users)[1000:] and rest.next_page_token == ""


def test_a_bad_page_token_is_rejected_naming_the_field(client, unique):
    error = rejected(lambda: client.list_online(page_token="not-a-token"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in error.details()


def test_a_page_token_of_another_room_is_rejected(client, unique):
    client.report_batch(names(unique, 3), room=f"{unique}-a")
    token = client.list_online(1, room=f"{unique}-a").next_page_token
    assert token
    error = rejected(lambda: client.list_online(1, page_token=token, room=f"{unique}-b"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in error.details()


# --- Counts and checks ----------------------------------------------------------


def test_count_is_the_number_online_in_the_room(client, unique):
    client.report_batch([f"{unique}-a", f"{unique}-b", f"{unique}-c"], [random_ipv4(), random_ipv4()], room=unique)
    client.report_user(f"{unique}-a", room=unique)  # again: still one
    assert client.count_online(room=unique) == Counts(3, 2)
    page = client.list_online(room=unique)
    assert (page.user_count, page.guest_count) == (3, 2)
    assert client.count_online(room=f"{unique}-empty") == Counts(0, 0)
    site = client.count_online()
    assert site.user_count >= 3 and site.guest_count >= 2


def test_check_says_who_is_online_in_request_order_and_when_each_user_was_last_seen(client, unique):
    seen, never = f"{unique}-seen", f"{unique}-never"
    v4, absent = random_ipv4(), random_ipv4()
    client.report_user(seen)
    client.report_guest(v4)

    statuses = client.check_online([never, seen], [f"::FFFF:{v4}", absent])
    assert [(user.username, user.online) for user in statuses.users] == [(never, False), (seen, True)]
    assert statuses.users[0].last_seen is None
    last_seen = statuses.users[1].last_seen
    assert last_seen.utcoffset() == datetime.timedelta(0)
    # A sanity bound, not a timing assertion: it catches seconds read as milliseconds.
    assert abs(datetime.datetime.now(datetime.timezone.utc) - last_seen) < datetime.timedelta(hours=1)
    # Guests come back in canonical form.
    assert statuses.guests == [GuestStatus(v4, True), GuestStatus(absent, False)]


def test_check_in_a_room_says_online_there_with_last_seen_site_wide(client, unique):
    user = f"{unique}-reader"
    client.report_user(user, room=f"{unique}-a")
    here, elsewhere = (client.check_online([user], room=f"{unique}-{r}").users[0] for r in "ab")
    assert here.online and not elsewhere.online
    assert elsewhere.last_seen is not None


def test_a_bad_check_names_the_bad_entry(client, unique):
    error = rejected(lambda: client.check_online([f"{unique}-ok", " bad"], ["nope"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "usernames[1]" in error.details() and "ip_addresses[0]" in error.details()
    error = rejected(lambda: client.check_online(names(unique, 1001)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- Leave ----------------------------------------------------------------------


def test_leave_takes_visitors_off_at_once_and_a_later_report_lists_them_again(client, unique):
    user, guest = f"{unique}-bye", random_ipv4()
    client.report_user(user)
    client.report_guest(guest)
    assert online(client, [user], [guest])

    client.leave([user], [guest])
    statuses = client.check_online([user], [guest])
    assert not statuses.users[0].online and not statuses.guests[0].online
    assert statuses.users[0].last_seen is not None, "Leave keeps last seen"
    walked = everyone(client)
    assert user not in walked.users and guest not in walked.guests

    client.report_user(user)
    client.report_guest(guest)
    walked = everyone(client)
    assert user in walked.users and guest in walked.guests


# --- Rooms ----------------------------------------------------------------------


def test_a_report_into_a_room_lists_in_the_room_and_on_the_site(client, unique):
    user, guest = f"{unique}-in-room", random_ipv4()
    client.report_user(user, room=unique)
    client.report_guest(guest, room=unique)
    in_room = client.list_online(room=unique)
    assert (in_room.users, in_room.guests) == ([user], [guest])
    site = everyone(client)
    assert user in site.users and guest in site.guests
    assert not online(client, [user], room=f"{unique}-other")


def test_leave_in_a_room_removes_from_that_room_only(client, unique):
    user = f"{unique}-two-rooms"
    client.report_user(user, room=f"{unique}-a")
    client.report_user(user, room=f"{unique}-b")
    client.leave([user], room=f"{unique}-a")
    assert not online(client, [user], room=f"{unique}-a")
    assert online(client, [user], room=f"{unique}-b")
    assert online(client, [user])


def test_leave_on_the_site_removes_from_every_room(client, unique):
    user = f"{unique}-gone"
    client.report_user(user, room=f"{unique}-a")
    client.report_user(user, room=f"{unique}-b")
    client.leave([user])
    assert not any(online(client, [user], room=room) for room in ("", f"{unique}-a", f"{unique}-b"))


def all_rooms(client, order, limit):
    rooms, token = [], ""
    while True:
        page = client.list_rooms(limit, page_token=token, order=order)
        assert len(page.rooms) <= limit
        rooms += page.rooms
        token = page.next_page_token
        if not token:
            return rooms


def ours(rooms, unique):
    return [room for room in rooms if room.name.startswith(unique)]


def test_list_rooms_by_name_or_busiest_first_page_by_page(client, unique):
    users = {"a": 1, "b": 3, "c": 2}
    for room, count in users.items():
        client.report_batch(names(f"{unique}-{room}", count), room=f"{unique}-{room}")
    client.report_guest(random_ipv4(), room=f"{unique}-a")  # guests do not make a room busier

    by_name = ours(all_rooms(client, "name", limit=2), unique)
    assert by_name == [Room(f"{unique}-{r}", users[r], 1 if r == "a" else 0) for r in "abc"]
    busiest = ours(all_rooms(client, "most_online", limit=2), unique)
    assert [room.name for room in busiest] == [f"{unique}-{r}" for r in "bca"]

    everyone_by_name = all_rooms(client, "name", limit=1000)
    assert [room.name for room in everyone_by_name] == by_bytes(room.name for room in everyone_by_name)
    busiest_first = all_rooms(client, "most_online", limit=1000)
    assert [room.user_count for room in busiest_first] == sorted((r.user_count for r in busiest_first), reverse=True)


def test_list_rooms_busiest_first_breaks_ties_by_name(client, unique):
    for room in ("x", "y", "z"):
        client.report_batch(names(f"{unique}-{room}", 2), room=f"{unique}-{room}")
    busiest = ours(all_rooms(client, "most_online", limit=2), unique)
    assert [room.name for room in busiest] == [f"{unique}-{r}" for r in "xyz"]


def test_a_rooms_page_token_of_the_other_order_is_rejected(client, unique):
    for room in ("a", "b"):
        client.report_user(f"{unique}-{room}", room=f"{unique}-{room}")
    token = client.list_rooms(1, order="name").next_page_token
    assert token
    error = rejected(lambda: client.list_rooms(1, page_token=token, order="most_online"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in error.details()


def test_an_unknown_room_order_is_refused_before_calling(client):
    with pytest.raises(ValueError, match="most_online"):
        client.list_rooms(order="busiest")


@pytest.mark.parametrize("room", ["bell\x07", "x" * 129])
def test_a_bad_room_is_rejected_naming_the_field(client, unique, room):
    error = rejected(lambda: client.report_user(f"{unique}-x", room=room))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "room" in error.details()
    assert not online(client, [f"{unique}-x"])


# --- Command line ---------------------------------------------------------------


def test_the_command_line_speaks_rooms_count_check_leave(target, unique, capsys):
    cli = ["--target", target]
    user, room = f"{unique}-cli", f"{unique}-room"
    assert main([*cli, "user", user, "--room", room]) == 0
    assert main([*cli, "count", "--room", room]) == 0
    assert capsys.readouterr().out.strip() == '{"user_count": 1, "guest_count": 0}'
    assert main([*cli, "check", "--room", room, "--user", user]) == 0
    assert '"online": true' in capsys.readouterr().out
    assert main([*cli, "rooms", "--order", "most_online", "--limit", "1000"]) == 0
    assert f'"name": "{room}"' in capsys.readouterr().out
    assert main([*cli, "leave", "--user", user]) == 0
    assert main([*cli, "list", "--room", room]) == 0
    assert '"users": []' in capsys.readouterr().out
    assert main([*cli, "list", "--page-token", "junk"]) == 1
    assert "INVALID_ARGUMENT: page_token" in capsys.readouterr().err
