"""Shared test setup. The stubs are made afresh from the proto before any test
module imports them, so the tests always run against the current contract."""

import os
import socket
import uuid

import pytest

import generate

generate.generate()


@pytest.fixture(scope="session")
def target() -> str:
    """host:port of a running Presence server; scripts/test-clients starts one."""
    value = os.environ.get("PRESENCE_TARGET")
    if not value:
        pytest.fail("PRESENCE_TARGET is unset: run scripts/test-clients, or set it to a Presence server's host:port")
    return value


@pytest.fixture(scope="session")
def client_options() -> dict:
    """How to reach the server: plaintext, or TLS trusting $PRESENCE_CA_FILE,
    with the token in $PRESENCE_TOKEN (scripts/test-clients runs the suite
    once against a server with TLS and tokens on)."""
    return {"token": os.environ.get("PRESENCE_TOKEN") or None, "ca_file": os.environ.get("PRESENCE_CA_FILE") or None}


@pytest.fixture
def client(target, client_options):
    from presence_client import PresenceClient

    with PresenceClient(target, **client_options) as presence:
        yield presence


@pytest.fixture
def unique() -> str:
    """A prefix no other test or run uses, so tests never see each other's names."""
    return f"py-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def replica(tmp_path):
    """A second server, started, on the same Redis as PRESENCE_TARGET's (helpers.Replica)."""
    from helpers import Replica

    if os.environ.get("PRESENCE_TOKEN"):
        pytest.skip("a replica runs plaintext: the plaintext run covers it")

    binary = os.environ.get("PRESENCE_BIN")
    if not binary or not os.environ.get("PRESENCE_REDIS_URL"):
        pytest.fail("PRESENCE_BIN or PRESENCE_REDIS_URL is unset: run scripts/test-clients, which exports them")
    server = Replica(binary, tmp_path / "replica.log")
    server.start()
    yield server
    server.stop()
