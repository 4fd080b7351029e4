"""The Python client against a running Presence server (PRESENCE_TARGET)."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import by_bytes, everyone, random_group, random_ipv4
from presence_client import PresenceClient, main, open_channel


def rejected(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_a_reported_user_is_listed(client, unique):
    client.report_user(f"{unique}-alice")
    assert f"{unique}-alice" in everyone(client).users


def test_a_reported_guest_is_listed(client):
    address = random_ipv4()
    client.report_guest(address)
    assert address in everyone(client).guests


@pytest.mark.parametrize(
    "reported, listed",
    [
        ("::ffff:{v4}", "{v4}"),  # an IPv4-mapped IPv6 address is its IPv4 address
        ("2001:DB8:{g:X}::0001", "2001:db8:{g:x}::1"),  # lower case, no leading zeros
        ("2001:db8:{g:x}:0:0:0:0:1", "2001:db8:{g:x}::1"),  # the longest zero run is ::
        ("2001:db8:0:0:1:0:0:{g:x}", "2001:db8::1:0:0:{g:x}"),  # the first of equal runs is ::
    ],
)
def test_guests_are_listed_in_canonical_form(client, reported, listed):
    v4, group = random_ipv4(), random_group()
    reported, listed = reported.format(v4=v4, g=group), listed.format(v4=v4, g=group)
    client.report_guest(reported)
    guests = everyone(client).guests
    assert listed in guests
    assert reported not in guests


@pytest.mark.parametrize(
    "username",
    [
        "",
        " {u} leading space",
        "{u} trailing space ",
        "{u}\tcontrol",
        "{u}\x07bell",
        "{u}" + "x" * 257,
        "{u}" + "é" * 128,  # more than 256 bytes, though fewer characters
    ],
    ids=["empty", "leading-space", "trailing-space", "tab", "bell", "too-long", "too-many-bytes"],
)
def test_a_bad_username_is_rejected_naming_the_field(client, unique, username):
    username = username.format(u=unique)
    error = rejected(lambda: client.report_user(username))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "username" in error.details()
    assert not [user for user in everyone(client).users if unique in user], "a rejected name was stored"


def test_a_name_of_exactly_256_bytes_is_accepted(client, unique):
    username = unique + "é" * ((256 - len(unique)) // 2)
    username += "x" * (256 - len(username.encode()))
    assert len(username.encode()) == 256
    client.report_user(username)
    assert username in everyone(client).users


@pytest.mark.parametrize("address", ["", "1.2.3.4:80", "[2001:db8::1]", "2001:db8::1/64", "256.1.1.1", "localhost"])
def test_a_bad_address_is_rejected_naming_the_field(client, address):
    error = rejected(lambda: client.report_guest(address))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ip_address" in error.details()


def test_a_batch_is_stored_whole(client, unique):
    v4, group = random_ipv4(), random_group()
    client.report_batch(usernames=[f"{unique}-b", f"{unique}-a"], ip_addresses=[v4, f"2001:DB8::{group:X}"])
    online = everyone(client)
    assert {f"{unique}-a", f"{unique}-b"} <= set(online.users)
    assert {v4, f"2001:db8::{group:x}"} <= set(online.guests)


def test_a_batch_with_one_bad_entry_stores_nothing(client, unique):
    good_ip = random_ipv4()
    error = rejected(lambda: client.report_batch(usernames=[f"{unique}-ok", " bad"], ip_addresses=[good_ip]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "usernames" in error.details()
    online = everyone(client)
    assert f"{unique}-ok" not in online.users
    assert good_ip not in online.guests


def test_lists_are_sorted_by_bytes(client, unique):
    # Reported out of order; "Z" < "a" < "é" by bytes, whatever the locale says.
    names = [f"{unique}-é", f"{unique}-a", f"{unique}-Z", f"{unique}-b"]
    for name in names:
        client.report_user(name)
    client.report_guest(random_ipv4())
    client.report_guest(f"2001:db8::{random_group():x}")
    online = everyone(client)
    assert online.users == by_bytes(online.users)
    assert online.guests == by_bytes(online.guests)
    assert [user for user in online.users if user.startswith(unique)] == by_bytes(names)


def test_a_page_holds_limit_names_of_each_kind_and_the_counts_of_everyone(client, unique):
    for name in ("a", "b", "c"):
        client.report_user(f"{unique}-{name}")
    client.report_guest(random_ipv4())
    client.report_guest(random_ipv4())

    walked = everyone(client)
    assert walked.user_count == len(walked.users) >= 3
    assert walked.guest_count == len(walked.guests) >= 2

    first_two = client.list_online(limit=2)
    assert first_two.users == walked.users[:2]
    assert first_two.guests == walked.guests[:2]
    assert (first_two.user_count, first_two.guest_count) == (walked.user_count, walked.guest_count)
    assert first_two.next_page_token


def test_reporting_again_does_not_count_twice(client, unique):
    for _ in range(3):
        client.report_user(f"{unique}-again", room=unique)
    assert client.count_online(room=unique).user_count == 1


@pytest.mark.parametrize("service", ["", "presence.v1.Presence"])
def test_health_says_serving(target, client_options, service):
    with open_channel(target, ca_file=client_options["ca_file"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_an_unreachable_server_fails_fast_with_unavailable(closed_port):
    with PresenceClient(f"127.0.0.1:{closed_port}", timeout=5) as nowhere:
        started = time.monotonic()
        error = rejected(lambda: nowhere.list_online())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2


def test_the_command_line_reports_and_lists(target, unique, capsys):
    assert main(["--target", target, "user", f"{unique}-cli"]) == 0
    assert main(["--target", target, "list", "--all"]) == 0
    assert f'"{unique}-cli"' in capsys.readouterr().out
    assert main(["--target", target, "user", " bad"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_a_secured_server_refuses_a_call_without_its_token(target, client_options):
    if not client_options["token"]:
        pytest.skip("the server runs without tokens (scripts/test-clients runs the suite once with them)")
    with PresenceClient(target, ca_file=client_options["ca_file"]) as anonymous:
        error = rejected(lambda: anonymous.list_online())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
