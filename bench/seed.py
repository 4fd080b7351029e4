"""The seed, in plain Python: the baseline bench/lists compares ListOnline to.

    python bench/seed.py --listen 127.0.0.1:PORT --redis-url redis://127.0.0.1:RPORT [--workers 50]

A grpcio server for presence.v1.Presence that keeps who is online the way
the classic "who's online with Redis sets" recipe does, and the way the
project's seed did: a report is `SADD` to the set of the current interval;
a list is `SUNION` of the current and the previous interval's sets, sorted,
on every call, and the count is the size of that union. Nothing is cached
and nothing is paged in Redis: every ListOnline reads every name online.

It implements only what the comparison needs: ReportUser and ListOnline
(`limit` as Presence reads it: 0 is 100, above 1000 is 1000; no page
tokens, no rooms, no guests), plus grpc.health.v1 so that
`presence-load --workload wait-serving` can tell when it is up. Other
methods answer UNIMPLEMENTED. Its keys are its own (`seed:current`,
`seed:old`), so it can share a private Redis with the real service.

Concurrency: a `futures.ThreadPoolExecutor` of `--workers` threads (default
50, the benchmark's concurrency, so no call waits for a thread) and a
redis-py connection pool as large, with the hiredis parser when installed.
The GIL keeps the Python work on one core whatever the number of threads;
that is the baseline's nature, not a handicap added here.

It needs grpcio, grpcio-health-checking, grpcio-tools (the stubs are made
from the proto by examples/python/generate.py, as the example client's are)
and redis; bench/lists makes a venv with them (bench/seed-requirements.txt).
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import threading
from concurrent import futures

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "python"))

import generate  # noqa: E402 (examples/python, after the path is set)

generate.generate()

from presence.v1 import presence_pb2, presence_pb2_grpc  # noqa: E402 (made just above)

CURRENT = "seed:current"
OLD = "seed:old"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class Seed(presence_pb2_grpc.PresenceServicer):
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def ReportUser(self, request, context):  # noqa: N802 (the gRPC method's name)
        if not request.username:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "username must not be empty")
        self.redis.sadd(CURRENT, request.username)
        return presence_pb2.ReportUserResponse()

    def ListOnline(self, request, context):  # noqa: N802
        limit = request.limit or DEFAULT_LIMIT
        limit = min(limit, MAX_LIMIT)
        # The recipe: the union of the intervals' sets, sorted, on every call.
        online = self.redis.sunion(CURRENT, OLD)
        names = sorted(online)
        return presence_pb2.ListOnlineResponse(users=names[:limit], user_count=len(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to serve on (loopback)")
    parser.add_argument("--redis-url", required=True, help="redis://host:port of the Redis to use")
    parser.add_argument("--workers", type=int, default=50, help="server threads (and Redis connections)")
    args = parser.parse_args()

    pool = redis.ConnectionPool.from_url(args.redis_url, max_connections=args.workers, decode_responses=True)
    client = redis.Redis(connection_pool=pool)
    client.ping()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    presence_pb2_grpc.add_PresenceServicer_to_server(Seed(client), server)
    checks = health.HealthServicer()
    for service in ("", "presence.v1.Presence"):
        checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    if server.add_insecure_port(args.listen) == 0:
        sys.exit(f"seed: cannot listen on {args.listen}")
    server.start()
    print(f"seed: serving on {args.listen}, {args.workers} workers", file=sys.stderr, flush=True)

    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
