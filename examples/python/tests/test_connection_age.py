"""Connection ageing seen from gRPC's own client: after PRESENCE_MAX_CONNECTION_AGE
the server sends GOAWAY, the client moves new calls to a new connection, and no
call fails across the switch (this is what gRPC's MaxConnectionAge promises)."""

import os
import time

import pytest

from helpers import Replica
from presence_client import PresenceClient


def test_every_call_succeeds_while_aged_connections_are_replaced(tmp_path, unique):
    binary = os.environ.get("PRESENCE_BIN")
    if not binary or not os.environ.get("PRESENCE_REDIS_URL"):
        pytest.fail("PRESENCE_BIN or PRESENCE_REDIS_URL is unset: run scripts/test-clients, which exports them")
    server = Replica(
        binary,
        tmp_path / "aged.log",
        env={"PRESENCE_MAX_CONNECTION_AGE": "1s", "PRESENCE_MAX_CONNECTION_AGE_GRACE": "1s"},
    )
    server.start()
    try:
        before = server.metric("presence_grpc_connections_total")
        calls = 0
        with PresenceClient(server.target) as client:
            # One channel, calls back to back for four ages: every one must succeed.
            until = time.monotonic() + 4
            while time.monotonic() < until:
                client.report_user(f"{unique}-{calls}")
                calls += 1
        connections = server.metric("presence_grpc_connections_total") - before
        assert connections >= 3, f"{connections} connections for {calls} calls over 4 s with a 1 s maximum age"
    finally:
        server.stop()
