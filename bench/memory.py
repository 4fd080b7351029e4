#!/usr/bin/env python3
"""Redis memory per online user and per room membership, for capacity planning.

    PY=~/.cache/presence-tools/venv-clients/bin/python   # grpcio (scripts/test-clients makes it)
    cargo build --release --bin presence
    $PY bench/memory.py [--people 1000000] [--rooms 1000]

For last seen on (the default) and off (PRESENCE_LAST_SEEN_RETENTION=0), it
starts a private redis-server and the release service on free loopback ports,
puts --people users online site-wide (ReportBatch, 1000 names `pop-NNNNNNNN`
a call) and reads Redis's `used_memory`; then reports each of them into one of
--rooms rooms (`room-NNNN`) and reads it again. It prints one JSON line per
mode: bytes per online user, and bytes per room membership (what a user online
in one room adds to being online on the site). It stops what it started."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
sys.path.insert(0, str(ROOT / "examples" / "python"))

import private_redis  # noqa: E402

import generate  # noqa: E402

generate.generate()

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from presence.v1 import presence_pb2, presence_pb2_grpc  # noqa: E402

BATCH = 1000


def redis_info_memory(port: int) -> int:
    info = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "INFO", "memory"],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError("no used_memory in INFO")


def wait_serving(target: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError("presence exited")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="presence.v1.Presence"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("presence not SERVING")
            time.sleep(0.05)


def report_all(stub, calls) -> None:
    """Sends every (names, room) as a ReportBatch, 16 at a time."""
    with ThreadPoolExecutor(16) as pool:
        for future in [
            pool.submit(stub.ReportBatch, presence_pb2.ReportBatchRequest(usernames=names, room=room), timeout=30)
            for names, room in calls
        ]:
            future.result()


@contextlib.contextmanager
def service_on_private_redis(binary: str, prefix: str, extra_env: dict[str, str] | None = None):
    """A private redis-server and the service on free loopback ports, the
    service SERVING; yields (service process, redis process, redis port,
    gRPC target), and stops both on the way out. Shared by the bench
    scripts that drive the service from Python."""
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        redis, announced = private_redis.start(dir=Path(work) / "redis")
        presence = None
        try:
            grpc_port, metrics_port = private_redis.free_ports(2)
            target = f"127.0.0.1:{grpc_port}"
            env = dict(
                os.environ,
                PRESENCE_REDIS_URL=announced["url"],
                PRESENCE_LISTEN=target,
                PRESENCE_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
                PRESENCE_TICK_INTERVAL="1h",
                **(extra_env or {}),
            )
            with open(Path(work) / "presence.log", "wb") as log:
                presence = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT)
            wait_serving(target, presence)
            yield presence, redis, announced["port"], target
        finally:
            for process in (presence, redis):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(timeout=15)


def measure(binary: str, people: int, rooms: int, last_seen: bool) -> dict:
    extra_env = {} if last_seen else {"PRESENCE_LAST_SEEN_RETENTION": "0"}
    with service_on_private_redis(binary, "presence-memory.", extra_env) as (_, _, port, target):
        names = [f"pop-{i:08}" for i in range(people)]
        with grpc.insecure_channel(target) as channel:
            stub = presence_pb2_grpc.PresenceStub(channel)
            before = redis_info_memory(port)
            report_all(stub, [(names[i : i + BATCH], "") for i in range(0, people, BATCH)])
            online = redis_info_memory(port)
            by_room = [[] for _ in range(rooms)]
            for i, name in enumerate(names):
                by_room[i % rooms].append(name)
            calls = [
                (members[i : i + BATCH], f"room-{r:04}")
                for r, members in enumerate(by_room)
                for i in range(0, len(members), BATCH)
            ]
            report_all(stub, calls)
            in_rooms = redis_info_memory(port)
            count = stub.CountOnline(presence_pb2.CountOnlineRequest(), timeout=10).user_count
            if count != people:
                raise RuntimeError(f"{count} users online, not {people}")
        return {
            "last_seen": last_seen,
            "people": people,
            "rooms": rooms,
            "bytes_per_online_user": round((online - before) / people),
            "bytes_per_room_membership": round((in_rooms - online) / people),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=1_000_000)
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--binary", default=str(ROOT / "target" / "release" / "presence"))
    args = parser.parse_args()
    for last_seen in (True, False):
        print(json.dumps(measure(args.binary, args.people, args.rooms, last_seen)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
