#!/usr/bin/env python3
"""Runs every command of README.md's "Try it with grpcurl" block, as
written, against a real Presence server (the binary given) backed by a
private redis-server, and fails if any command fails.

The block's address (localhost:50051) becomes the server's loopback port;
the alias line is the reader's own setup and is skipped; a WatchOnline
command (a stream, stopped with Ctrl-C by a reader) is stopped after its
first messages instead, and must have shown a snapshot.

Usage: check_readme.py --binary PATH --grpcurl PATH [--readme README.md]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
import private_redis  # noqa: E402 - the one private-Redis launcher

README_ADDRESS = "localhost:50051"


def commands(readme: Path) -> list[str]:
    text = readme.read_text()
    section = text.split("### Try it with grpcurl", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    if not block:
        raise SystemExit("no ```sh block under 'Try it with grpcurl'")
    lines = []
    for line in block.group(1).splitlines():
        line = line.split("   #", 1)[0].strip()
        if line.startswith("grpcurl "):
            lines.append(line)
    return lines


def wait_for(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--grpcurl", required=True)
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    args = parser.parse_args()

    lines = commands(Path(args.readme))
    if len(lines) < 10:
        raise SystemExit(f"only {len(lines)} grpcurl lines found in the README")
    failed = 0
    with tempfile.TemporaryDirectory() as work:
        redis, info = private_redis.start(dir=work)
        grpc_port, metrics_port = private_redis.free_ports(2)
        address = f"127.0.0.1:{grpc_port}"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PRESENCE_REDIS_URL": info["url"],
            "PRESENCE_LISTEN": address,
            "PRESENCE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        }
        with open(Path(work, "presence.log"), "wb") as log:
            server = subprocess.Popen([args.binary], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:

            def serving() -> bool:
                probe = subprocess.run(
                    [args.grpcurl, "-plaintext", "-max-time", "1", "-d", '{"service": "presence.v1.Presence"}',
                     address, "grpc.health.v1.Health/Check"],
                    capture_output=True, text=True, check=False,
                )
                return '"SERVING"' in probe.stdout

            wait_for("the server to be ready", serving)
            for line in lines:
                argv = shlex.split(line.replace(README_ADDRESS, address))
                argv[0] = args.grpcurl
                streaming = "/WatchOnline" in line
                if streaming:
                    argv.insert(1, "-max-time")
                    argv.insert(2, "2")
                result = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
                output = result.stdout + result.stderr
                ok = result.returncode == 0 or (streaming and '"snapshot"' in result.stdout)
                print(("PASS " if ok else "FAIL ") + line)
                if not ok:
                    failed += 1
                    print("     " + output.strip().replace("\n", "\n     ")[:2000])
        finally:
            server.terminate()
            server.wait(timeout=15)
            redis.terminate()
            redis.wait(timeout=15)
    print(f"check-readme: {len(lines) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
