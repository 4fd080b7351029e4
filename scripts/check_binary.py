#!/usr/bin/env python3
"""Runs the presence binary the way the chart's pod would, and checks that
the deployment's assumptions hold for the real thing. Used by
`scripts/check-deploy --with-binary`, after it has built the binary the way
the Dockerfile's build stage does.

  - the environment is the one `helm template` renders for the presence
    container, verbatim, except for what only the cluster can provide: the
    Redis URL (the Secret's value) points at a private redis-server, and the
    listeners are on loopback ports;
  - the gRPC health service answers what the probes ask: "" and
    presence.v1.Presence SERVING;
  - every grpcurl command printed by NOTES.txt works as written (against the
    local port instead of the port-forward's);
  - metrics are served at /metrics, and log lines are JSON (the chart's
    default log format);
  - when Redis goes away, readiness (presence.v1.Presence) goes NOT_SERVING
    while liveness ("") stays SERVING, so Kubernetes takes the pod out of
    the Service instead of restarting it;
  - on SIGTERM the process exits 0 within PRESENCE_SHUTDOWN_GRACE, well
    inside the pod's terminationGracePeriodSeconds.

No fixed sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
import private_redis  # noqa: E402 - the one private-Redis launcher, beside this script

RELEASE = "rel"
NAMESPACE = "presence-ns"
# The private Redis requires this password, so the test also proves that a
# URL with a password works and that the password never reaches the logs.
PASSWORD = "smoke-Pa55word"


def wait_for(what: str, predicate, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def record(self, name: str, ok: bool, detail: str = "") -> None:
        if ok:
            self.passed += 1
            print(f"PASS {name}")
        else:
            self.failed.append(name)
            print(f"FAIL {name}" + (f"\n     - {detail}" if detail else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helm", required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--grpcurl", required=True)
    ap.add_argument("--redis-server", default="redis-server")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    chart = str(args.repo / "helm/presence")
    checks = Checks()

    # What the chart would run.
    rendered = subprocess.run(
        [args.helm, "template", RELEASE, chart, "--namespace", NAMESPACE], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    dep = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    )
    pod = dep["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "presence")
    tgps = pod["terminationGracePeriodSeconds"]
    pre_stop = (((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
    install = subprocess.run(
        [args.helm, "install", RELEASE, chart, "--namespace", NAMESPACE, "--dry-run=client"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    notes = install.split("NOTES:", 1)[1]

    with tempfile.TemporaryDirectory() as tmp:
        redis, redis_info = private_redis.start(
            dir=Path(tmp, "redis"), password=PASSWORD, redis_server=args.redis_server
        )
        redis_port = redis_info["port"]
        grpc_port, metrics_port = private_redis.free_ports(2)
        grpc_addr = f"127.0.0.1:{grpc_port}"

        env = {"PATH": "/usr/bin:/bin", "HOSTNAME": "presence-smoke-0"}  # the container's: nothing else leaks in
        substituted = {
            "PRESENCE_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0",
            "PRESENCE_LISTEN": grpc_addr,
            "PRESENCE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        }
        for e in container["env"]:
            if e["name"] in substituted:
                env[e["name"]] = substituted[e["name"]]
            elif "value" in e:
                env[e["name"]] = e["value"]
            else:
                checks.record(f"env {e['name']} can be reproduced", False, f"valueFrom {e.get('valueFrom')}")
        print("running the binary with the chart's environment:")
        for k in sorted(env):
            shown = "<from the Secret: a private redis-server>" if k == "PRESENCE_REDIS_URL" else env[k]
            print(f"     {k}={shown}")

        log_path = Path(tmp) / "presence.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([args.binary], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:

            def grpcurl(*a: str, timeout: float = 5) -> subprocess.CompletedProcess:
                return subprocess.run(
                    [args.grpcurl, "-plaintext", "-max-time", "3", *a],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )

            def health(service: str) -> str | None:
                r = grpcurl("-d", json.dumps({"service": service}), grpc_addr, "grpc.health.v1.Health/Check")
                return json.loads(r.stdout).get("status") if r.returncode == 0 else None

            try:
                wait_for("liveness SERVING", lambda: proc.poll() is not None or health("") == "SERVING")
            except TimeoutError as e:
                checks.record("starts with the chart's environment", False, str(e))
                raise
            checks.record("starts with the chart's environment", proc.poll() is None, log_path.read_text()[-800:])
            checks.record('liveness probe: service "" is SERVING', health("") == "SERVING")
            try:
                wait_for("readiness SERVING", lambda: health("presence.v1.Presence") == "SERVING", timeout=10)
                checks.record("readiness probe: presence.v1.Presence is SERVING with Redis up", True)
            except TimeoutError as e:
                checks.record("readiness probe: presence.v1.Presence is SERVING with Redis up", False, str(e))

            # NOTES.txt, command by command.
            commands = [line.strip() for line in notes.splitlines() if line.strip().startswith("grpcurl ")]
            checks.record("NOTES print grpcurl commands", len(commands) >= 3, f"{commands}")
            for cmd in commands:
                argv = shlex.split(cmd.replace("127.0.0.1:50051", grpc_addr))
                r = subprocess.run([args.grpcurl, *argv[1:]], capture_output=True, text=True, timeout=10, check=False)
                checks.record(f"NOTES command works: {cmd}", r.returncode == 0, (r.stdout + r.stderr).strip()[:300])
                if "ListOnline" in cmd and r.returncode == 0:
                    checks.record(
                        "ListOnline lists the user ReportUser reported",
                        "alice" in json.loads(r.stdout).get("users", []),
                        r.stdout,
                    )

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
                checks.record("metrics served at /metrics", resp.status == 200 and "# TYPE" in body)

            lines = [line for line in log_path.read_text().splitlines() if line.strip()]
            bad = [line for line in lines if not line.startswith("{")]
            try:
                for line in lines:
                    json.loads(line)
            except json.JSONDecodeError:
                bad.append(line)
            checks.record("logs are JSON lines (PRESENCE_LOG_FORMAT=json)", bool(lines) and not bad, f"{bad[:2]}")
            checks.record("the Redis password is not in the logs", PASSWORD not in log_path.read_text())

            # Redis goes away: out of the Service, not restarted.
            redis.terminate()
            redis.wait(timeout=10)
            try:
                wait_for("readiness NOT_SERVING", lambda: health("presence.v1.Presence") == "NOT_SERVING", timeout=15)
                checks.record("Redis down: readiness goes NOT_SERVING", True)
            except TimeoutError as e:
                checks.record("Redis down: readiness goes NOT_SERVING", False, str(e))
            checks.record('Redis down: liveness "" stays SERVING (no restart loop)', health("") == "SERVING")

            # SIGTERM, as the kubelet sends it after the preStop sleep.
            grace = int(env["PRESENCE_SHUTDOWN_GRACE"].rstrip("s"))
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=grace + 5)
                took = time.monotonic() - start
                checks.record(f"SIGTERM: exits 0 ({took:.1f}s, drain limit {grace}s)", code == 0, f"exit {code}")
                checks.record(
                    f"SIGTERM: done inside terminationGracePeriodSeconds {tgps} - preStop {pre_stop}",
                    took < tgps - pre_stop,
                )
            except subprocess.TimeoutExpired:
                checks.record("SIGTERM: exits within the drain", False, f"still running after {grace + 5}s")
        except Exception as e:  # noqa: BLE001 - any failure is a finding: record it, then clean up below
            checks.record("smoke test ran to the end", False, repr(e))
        finally:
            for p in (proc, redis):
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if checks.failed:
                print("---- presence log (tail) ----")
                print(log_path.read_text()[-2000:])

    print(f"check_binary: {checks.passed} passed, {len(checks.failed)} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
