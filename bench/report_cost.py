#!/usr/bin/env python3
"""CPU time per unique ReportUser, in the service and in Redis, site-wide and
into a room, for capacity planning.

    PY=~/.cache/presence-tools/venv-clients/bin/python   # grpcio (scripts/test-clients makes it)
    cargo build --release --bin presence
    $PY bench/report_cost.py [--calls 60000] [--rooms 1000]

It starts a private redis-server and the release service on free loopback
ports, sends --calls ReportUser calls of never-repeated names (64 in flight),
first site-wide, then each into one of --rooms rooms, and reads each
process's CPU time (user + system, /proc/PID/stat) before and after. CPU time
per call does not depend on how fast this client is: the figures are µs of
each process's CPU per report. One JSON line per kind of report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from memory import ROOT, service_on_private_redis  # also puts the stubs and the launcher on the path

import grpc  # noqa: E402
from presence.v1 import presence_pb2, presence_pb2_grpc  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
IN_FLIGHT = 64


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def send(stub, requests) -> None:
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for future in [pool.submit(stub.ReportUser, request, timeout=30) for request in requests]:
            future.result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=60_000)
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--binary", default=str(ROOT / "target" / "release" / "presence"))
    args = parser.parse_args()
    with service_on_private_redis(args.binary, "presence-cost.") as (presence, redis, _, target):
        with grpc.insecure_channel(target) as channel:
            stub = presence_pb2_grpc.PresenceStub(channel)
            for kind in ("site", "room"):
                run = uuid.uuid4().hex[:8]
                requests = [
                    presence_pb2.ReportUserRequest(
                        username=f"cost-{run}-{i:08}",
                        room=f"room-{i % args.rooms:04}" if kind == "room" else "",
                    )
                    for i in range(args.calls)
                ]
                send(stub, requests[: args.calls // 10])  # warm-up: rooms exist, scripts loaded
                timed = requests[args.calls // 10 :]
                before = (cpu_seconds(presence.pid), cpu_seconds(redis.pid), time.monotonic())
                send(stub, timed)
                after = (cpu_seconds(presence.pid), cpu_seconds(redis.pid), time.monotonic())
                calls = len(timed)
                print(
                    json.dumps(
                        {
                            "report": kind,
                            "calls": calls,
                            "calls_per_sec": round(calls / (after[2] - before[2])),
                            "service_cpu_us_per_call": round((after[0] - before[0]) / calls * 1e6, 1),
                            "redis_cpu_us_per_call": round((after[1] - before[1]) / calls * 1e6, 1),
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
