"""WatchOnline from Python: a snapshot, then joins and leaves (one made by the
Node client), the `watch` command, deadlines, cancelling, and reconnecting
after the server restarts.

Nothing sleeps: each watch has a deadline, and a test waits by reading events
until the one it expects (a watch past its deadline raises DEADLINE_EXCEEDED).
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from presence_client import Changes, PresenceClient, Snapshot

HERE = Path(__file__).resolve().parent.parent
NODE_CLI = HERE.parent / "node" / "presence.js"


def joined(users=(), guests=()):
    """Shows these online: a Changes that has them join, or a resync Snapshot that lists them."""

    def shows(event):
        if isinstance(event, Snapshot):
            return set(users) <= set(event.users) and set(guests) <= set(event.guests)
        return set(users) <= set(event.joined_users) and set(guests) <= set(event.joined_guests)

    return shows


def left(users=(), guests=()):
    """Shows these gone: a Changes that has them leave, or a resync Snapshot without them."""

    def shows(event):
        if isinstance(event, Snapshot):
            return not (set(users) & set(event.users) or set(guests) & set(event.guests))
        return set(users) <= set(event.left_users) and set(guests) <= set(event.left_guests)

    return shows


def until(watch, shows):
    """Reads events until one `shows` what the test waits for; returns it. The
    watch's deadline bounds the wait (DEADLINE_EXCEEDED)."""
    for event in watch:
        if shows(event):
            return event
    pytest.fail("the watch ended")


def test_a_watch_starts_with_a_snapshot_then_gets_a_join_made_from_node(target, client, unique):
    early, from_node = f"{unique}-early", f"{unique}-from-node"
    client.report_user(early, room=unique)
    with client.watch_online(room=unique, timeout=15) as watch:
        assert next(watch) == Snapshot([early], [], 1, 0, resync=False)

        node = subprocess.run(
            ["node", str(NODE_CLI), "--target", target, "user", from_node, "--room", unique],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert node.returncode == 0, node.stderr
        event = until(watch, joined([from_node]))
        assert isinstance(event, Changes) and event.joined_users == [from_node]
        assert (event.user_count, event.guest_count) == (2, 0)

        client.leave([early], room=unique)
        event = until(watch, left([early]))
        assert (event.user_count, event.guest_count) == (1, 0)


def test_guests_come_and_go_in_canonical_form(client, unique):
    with client.watch_online(room=unique, timeout=15) as watch:
        assert next(watch) == Snapshot([], [], 0, 0, resync=False)
        client.report_guest("2001:DB8::0:7", room=unique)
        assert until(watch, joined(guests=["2001:db8::7"])).joined_guests == ["2001:db8::7"]
        client.leave(ip_addresses=["2001:db8::7"], room=unique)
        assert until(watch, left(guests=["2001:db8::7"])).left_guests == ["2001:db8::7"]


def test_a_watch_keeps_its_deadline(client, unique):
    with client.watch_online(room=unique, timeout=0.5) as watch:
        assert isinstance(next(watch), Snapshot)
        with pytest.raises(grpc.RpcError) as caught:
            next(watch)  # nothing happens in this room
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancel_from_another_thread_ends_the_iteration(client, unique):
    watch = client.watch_online(room=unique, timeout=15)
    assert isinstance(next(watch), Snapshot)
    threading.Thread(target=watch.cancel).start()
    assert list(watch) == []


def test_a_bad_room_is_not_retried(client):
    with pytest.raises(grpc.RpcError) as caught:
        next(client.watch_online(room="bell\x07", timeout=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "room" in caught.value.details()


def test_a_watch_reconnects_after_its_server_restarts_and_starts_again_from_a_snapshot(replica, client, unique):
    before, after = f"{unique}-before", f"{unique}-after"
    with PresenceClient(replica.target) as watching, watching.watch_online(room=unique, timeout=30) as watch:
        assert next(watch) == Snapshot([], [], 0, 0, resync=False)
        client.report_user(before, room=unique)  # through the other server: replicas share Redis
        until(watch, joined([before]))

        replica.stop()  # SIGTERM: the stream ends with UNAVAILABLE
        replica.start()  # on the same port
        assert next(watch) == Snapshot([before], [], 1, 0, resync=False)
        client.report_user(after, room=unique)
        until(watch, joined([after]))


class Lines:
    """A process's stdout, line by line, each read with a deadline."""

    def __init__(self, process):
        self._lines = queue.Queue()
        def read():
            for line in process.stdout:
                self._lines.put(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()

    def expect(self, wanted, timeout=10.0):
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line == wanted:
                return
            seen.append(line)
        pytest.fail(f"no line {wanted!r} within {timeout}s; got {seen}")


def test_the_watch_command_prints_joins_and_leaves(target, client, unique):
    process = subprocess.Popen(
        [sys.executable, str(HERE / "presence_client.py"), "--target", target, "watch", "--room", unique],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = Lines(process)
        lines.expect("= 0 users, 0 guests online")  # the snapshot: it is watching
        client.report_user(f"{unique}-ann", room=unique)
        lines.expect(f"+ user {unique}-ann")
        client.report_guest("192.0.2.77", room=unique)
        lines.expect("+ guest 192.0.2.77")
        lines.expect("= 1 users, 1 guests online")
        client.leave([f"{unique}-ann"], room=unique)
        lines.expect(f"- user {unique}-ann")
        lines.expect("= 0 users, 1 guests online")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 130
