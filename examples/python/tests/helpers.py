"""Small helpers shared by the test modules."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from presence_client import OnlinePage

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts" / "lib"))
import private_redis  # noqa: E402 (the project's one free-port picker)


def eventually(check, timeout: float = 3.0, interval: float = 0.02):
    """Polls `check` until it returns something truthy or `timeout` passes; returns its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def random_ipv4() -> str:
    """A random private address: just a name here, never contacted."""
    return "10.{}.{}.{}".format(*random.sample(range(1, 255), 3))


def random_group() -> int:
    """A random non-zero IPv6 group, to make documentation addresses unique."""
    return random.randrange(0x1000, 0xFFFF)


def by_bytes(names):
    """The server's order: ascending by UTF-8 bytes."""
    return sorted(names, key=lambda name: name.encode())


def everyone(client, room: str = "", page_size: int = 0) -> OnlinePage:
    """Everyone online in `room`, every page walked into one (with the last page's counts)."""
    pages = list(client.iter_online(room=room, page_size=page_size))
    users = [user for page in pages for user in page.users]
    guests = [guest for page in pages for guest in page.guests]
    return OnlinePage(users, guests, pages[-1].user_count, pages[-1].guest_count, "")


def online(client, users=(), guests=(), room: str = "") -> bool:
    """Whether all these users and guests are online in `room` (CheckOnline)."""
    statuses = client.check_online(users, guests, room=room)
    return all(status.online for status in statuses.users + statuses.guests)


class Replica:
    """Another Presence server on the same Redis and key prefix as the one at
    PRESENCE_TARGET: scripts/test-clients exports the server's environment
    (PRESENCE_BIN, PRESENCE_REDIS_URL, …), and a replica differs only in its
    ports. A test may stop it and start it again on the same port."""

    def __init__(self, binary: str, log_path: Path, env: dict[str, str] | None = None):
        grpc_port, metrics_port = private_redis.free_ports(2)
        self.target = f"127.0.0.1:{grpc_port}"
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        self._env = {
            **os.environ,
            **(env or {}),
            "PRESENCE_LISTEN": self.target,
            "PRESENCE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        }
        self._binary, self._log_path = binary, log_path
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen([self._binary], env=self._env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._serving():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not start; its log:\n{self._log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, as Kubernetes does: watches end with UNAVAILABLE and the process exits."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def metric(self, series: str) -> float:
        """One series' value on the replica's /metrics (0 if absent)."""
        import urllib.request

        text = urllib.request.urlopen(self.metrics, timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def _serving(self) -> bool:
        with grpc.insecure_channel(self.target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="presence.v1.Presence"), timeout=1
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
