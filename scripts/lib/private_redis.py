#!/usr/bin/env python3
"""The one launcher of private Redis processes, for Rust tests, shell scripts
and the benchmark harness alike. Standard library only.

Subcommands:

  free-port [--count N] [--with-bus]
      Prints N distinct free loopback TCP ports, space-separated. With
      --with-bus, each port's cluster bus port (port + 10000) is free too.

  server [--unix-socket | --port P] [--tls-dir DIR] [--dir DIR]
         [--password PW] [-- EXTRA_REDIS_ARGS...]
      Starts a private redis-server ($REDIS_SERVER, else `redis-server`)
      that keeps nothing (`--save '' --appendonly no`) and listens on
      127.0.0.1 only: on the unix socket DIR/redis.sock with --unix-socket,
      else on TCP port P (a free one when not given); with --tls-dir (made
      by `certs`), on P with TLS only. Arguments after `--` go to
      redis-server as they are (`--cluster-enabled yes`, `--replicaof ...`).
      Its log is DIR/redis.log.

  sentinel --master-port P [--port Q] [--dir DIR] [--master-name NAME]
           [--quorum N] [--down-after-ms MS] [--failover-timeout-ms MS]
           [--tls-dir DIR]
      Starts a Redis Sentinel on 127.0.0.1:Q (a free port when not given)
      monitoring the master on 127.0.0.1:P, from DIR/sentinel.conf (which
      Sentinel rewrites: one DIR per sentinel). Its log is DIR/sentinel.log.
      With --tls-dir (made by `certs`), it serves TLS only on Q and talks TLS
      to the master and replicas (start those with --tls-dir too, and
      `-- --tls-replication yes`).

  certs DIR [--hosts 127.0.0.1,localhost]
      Makes a private test PKI in DIR with the openssl CLI, unless it is
      there already: ca.pem/ca.key; server.pem/server.key for the hosts,
      and client.pem/client.key (mutual TLS), both signed by that CA; and
      an unrelated other-ca.pem/other-ca.key with
      other-client.pem/other-client.key, a client a server must refuse.
      Prints the paths as one line of JSON.

`server` and `sentinel` print one line of JSON on stdout,
  {"pid": ..., "port": P or null, "socket": path or null, "url": ..., "dir": DIR}
then exec the Redis program in place of this one: the caller's child process
IS Redis, so signals sent to it (kill, SIGSTOP, SIGCONT) reach Redis. Without
--dir they work in a new temporary directory, which the caller removes.
Nothing here ever uses port 6379, the machine's shared Redis.

Python callers import this file and call `start(...)`, which runs `server`
as a child process and returns it once Redis answers PING.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_REDIS_PORT = 6379
LOWEST_PORT = 10000
CLUSTER_BUS_OFFSET = 10000


def free_ports(count: int, with_bus: bool = False) -> list[int]:
    # Ports are picked below the kernel's ephemeral range, never bound to 0:
    # a kernel-picked port may be reused as a source port of an outgoing
    # connection before our server binds it.
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    highest = ephemeral_low - (CLUSTER_BUS_OFFSET if with_bus else 0)
    if highest <= LOWEST_PORT + count:
        sys.exit(f"private_redis: no room below the ephemeral range (it starts at {ephemeral_low})")
    held: list[socket.socket] = []  # kept bound until all are chosen, so they differ
    chosen: list[int] = []
    try:
        for _ in range(10000):
            if len(chosen) == count:
                break
            port = random.randrange(LOWEST_PORT, highest)
            wanted = [port, port + CLUSTER_BUS_OFFSET] if with_bus else [port]
            if SHARED_REDIS_PORT in wanted:
                continue
            sockets = [s for s in (bind(p) for p in wanted) if s]
            if len(sockets) == len(wanted):
                held.extend(sockets)
                chosen.append(port)
            else:
                for s in sockets:
                    s.close()
    finally:
        for s in held:
            s.close()
    if len(chosen) < count:
        sys.exit(f"private_redis: found only {len(chosen)} of {count} free ports")
    return chosen


def bind(port: int, reuse: bool = False) -> socket.socket | None:
    s = socket.socket()
    if reuse:  # as redis-server binds: a closed connection's TIME_WAIT is no obstacle
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return s
    except OSError:
        s.close()
        return None


def work_dir(given: str | None, prefix: str) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    path = Path(given).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def redis_program() -> str:
    name = os.environ.get("REDIS_SERVER") or "redis-server"
    program = shutil.which(name)
    if program is None:
        sys.exit(f"private_redis: {name} not found (scripts/lib/tools.sh ensure_redis_server installs it)")
    return program


def announce_and_exec(argv: list[str], *, port: int | None, socket_path: Path | None, url: str, dir: Path) -> None:
    info = {
        "pid": os.getpid(),
        "port": port,
        "socket": str(socket_path) if socket_path else None,
        "url": url,
        "dir": str(dir),
    }
    print(json.dumps(info), flush=True)
    os.execv(argv[0], argv)


def cmd_free_port(args: argparse.Namespace) -> None:
    print(" ".join(str(p) for p in free_ports(args.count, args.with_bus)))


def cmd_server(args: argparse.Namespace) -> None:
    if args.unix_socket and (args.port or args.tls_dir):
        sys.exit("private_redis: --unix-socket goes with neither --port nor --tls-dir")
    program = redis_program()
    dir = work_dir(args.dir, "private-redis-")
    argv = [program, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
    argv += ["--dir", str(dir), "--logfile", str(dir / "redis.log")]
    port, socket_path = None, None
    if args.unix_socket:
        socket_path = dir / "redis.sock"
        argv += ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"]
        url = f"unix://{socket_path}"
    else:
        port = args.port or free_ports(1)[0]
        if args.port and not bind(port, reuse=True):
            sys.exit(f"private_redis: port {port} is in use")
        if args.tls_dir:
            tls = Path(args.tls_dir).resolve()
            argv += ["--port", "0", "--tls-port", str(port)]
            argv += ["--tls-cert-file", str(tls / "server.pem"), "--tls-key-file", str(tls / "server.key")]
            argv += ["--tls-ca-cert-file", str(tls / "ca.pem"), "--tls-auth-clients", "no"]
            url = f"rediss://127.0.0.1:{port}"
        else:
            argv += ["--port", str(port)]
            url = f"redis://127.0.0.1:{port}"
    if args.password:
        argv += ["--requirepass", args.password]
    argv += args.redis_args
    announce_and_exec(argv, port=port, socket_path=socket_path, url=url, dir=dir)


def cmd_sentinel(args: argparse.Namespace) -> None:
    program = redis_program()
    dir = work_dir(args.dir, "private-sentinel-")
    port = args.port or free_ports(1)[0]
    name = args.master_name
    config = dir / "sentinel.conf"
    config.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {dir}\n"
        f"logfile {dir / 'sentinel.log'}\n"
        f"sentinel monitor {name} 127.0.0.1 {args.master_port} {args.quorum}\n"
        f"sentinel down-after-milliseconds {name} {args.down_after_ms}\n"
        f"sentinel failover-timeout {name} {args.failover_timeout_ms}\n"
        f"sentinel parallel-syncs {name} 1\n"
    )
    url = f"redis://127.0.0.1:{port}"
    if args.tls_dir:
        tls = Path(args.tls_dir).resolve()
        text = config.read_text().replace(f"port {port}\n", f"port 0\ntls-port {port}\n", 1)
        config.write_text(
            text
            + f"tls-cert-file {tls / 'server.pem'}\n"
            + f"tls-key-file {tls / 'server.key'}\n"
            + f"tls-ca-cert-file {tls / 'ca.pem'}\n"
            + "tls-auth-clients no\n"
            + "tls-replication yes\n"
        )
        url = f"rediss://127.0.0.1:{port}"
    announce_and_exec([program, str(config), "--sentinel"], port=port, socket_path=None, url=url, dir=dir)


CERT_FILES = [
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
    "other-ca.pem",
    "other-ca.key",
    "other-client.pem",
    "other-client.key",
]

# Only what the certificates need, so the machine's openssl.cnf plays no part.
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""

DAYS = "3650"


def cmd_certs(args: argparse.Namespace) -> None:
    dir = work_dir(args.dir, "private-certs-")
    paths = {name.replace(".", "_").replace("-", "_"): str(dir / name) for name in CERT_FILES}
    # A lock, so tests that share a directory never see half a PKI.
    with open(dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((dir / name).exists() for name in CERT_FILES):
            make_pki(dir, [h.strip() for h in args.hosts.split(",") if h.strip()])
    print(json.dumps({"dir": str(dir), **paths}), flush=True)


def make_pki(dir: Path, hosts: list[str]) -> None:
    if shutil.which("openssl") is None:
        sys.exit("private_redis: the openssl CLI is needed for certs")
    san = ", ".join(f"IP:{h}" if is_ip(h) else f"DNS:{h}" for h in hosts)
    with tempfile.TemporaryDirectory(dir=dir) as tmp:
        work = Path(tmp)
        config = work / "openssl.cnf"
        config.write_text(OPENSSL_CONFIG.format(san=san))
        ca_pair(work, config, "ca", "Presence test CA")
        leaf(work, config, "server", "ca", hosts[0] if hosts else "127.0.0.1", "server")
        leaf(work, config, "client", "ca", "presence-test-client", "client")
        ca_pair(work, config, "other-ca", "Unrelated test CA")
        leaf(work, config, "other-client", "other-ca", "presence-other-client", "client")
        # Files appear only once all are made: a failed run leaves none.
        for name in CERT_FILES:
            os.replace(work / name, dir / name)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def openssl(*argv: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"private_redis: openssl {argv[0]} failed: {result.stderr.strip()}")


def new_key(path: Path) -> None:
    # P-256: quick to make, and accepted by Redis, rustls and gRPC alike.
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def ca_pair(work: Path, config: Path, name: str, subject: str) -> None:
    key, cert = work / f"{name}.key", work / f"{name}.pem"
    new_key(key)
    openssl("req", "-x509", "-new", "-key", key, "-subj", f"/CN={subject}", "-days", DAYS,
            "-config", config, "-extensions", "ca", "-out", cert)


def leaf(work: Path, config: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    key, csr, cert = work / f"{name}.key", work / f"{name}.csr", work / f"{name}.pem"
    new_key(key)
    openssl("req", "-new", "-key", key, "-subj", f"/CN={subject}", "-config", config, "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", work / f"{ca}.pem", "-CAkey", work / f"{ca}.key",
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", DAYS,
            "-extfile", config, "-extensions", extensions, "-out", cert)


def start(
    *,
    dir: str | Path | None = None,
    unix_socket: bool = False,
    port: int | None = None,
    tls_dir: str | Path | None = None,
    password: str | None = None,
    redis_args: list[str] | tuple[str, ...] = (),
    redis_server: str | None = None,
    timeout: float = 15.0,
) -> tuple[subprocess.Popen, dict]:
    """Starts `server` with these options as a child process, and returns it
    (it is Redis itself: the caller stops it) with its announcement, once
    Redis answers PING."""
    argv = [sys.executable, __file__, "server"]
    for flag, value in (("--dir", dir), ("--port", port), ("--tls-dir", tls_dir), ("--password", password)):
        if value is not None:
            argv += [flag, str(value)]
    if unix_socket:
        argv.append("--unix-socket")
    argv += ["--", *redis_args]
    env = dict(os.environ, REDIS_SERVER=redis_server) if redis_server else None
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"the launcher said nothing within {timeout:.0f}s")
        line = proc.stdout.readline()
        proc.stdout.close()  # Redis logs to its file; nothing more comes here
        if not line:
            raise RuntimeError(f"the launcher failed (exit {proc.wait()})")
        info = json.loads(line)
        while not is_up(info, tls_dir, password):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = Path(info["dir"], "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not answer (exit {proc.poll()}); its log:\n{tail}")
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, info


def is_up(info: dict, tls_dir: str | Path | None, password: str | None) -> bool:
    """Redis answers, and it is ours: on a port, someone else's could answer.
    A NOAUTH reply (a password among the redis args) counts."""
    try:
        if info["socket"]:
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(1)
            conn.connect(info["socket"])
        else:
            conn = socket.create_connection(("127.0.0.1", info["port"]), timeout=1)
        if tls_dir:
            context = ssl.create_default_context(cafile=str(Path(tls_dir, "ca.pem")))
            context.load_cert_chain(Path(tls_dir, "client.pem"), Path(tls_dir, "client.key"))
            conn = context.wrap_socket(conn, server_hostname="127.0.0.1")
        with conn:
            commands = [["AUTH", password], ["INFO", "server"]] if password else [["INFO", "server"]]
            conn.sendall(b"".join(resp(c) for c in commands))
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
                if b"-NOAUTH" in reply:
                    return True
                bulk = re.search(rb"\$(\d+)\r\n", reply)
                if bulk and len(reply) >= bulk.end() + int(bulk.group(1)):
                    break
            return f"\r\nprocess_id:{info['pid']}\r\n".encode() in reply
    except OSError:
        return False


def resp(command: list[str]) -> bytes:
    parts = [f"*{len(command)}\r\n".encode()]
    for word in command:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("free-port", help="print free loopback ports")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--with-bus", action="store_true", help="port+10000 free too (Redis Cluster bus)")
    p.set_defaults(run=cmd_free_port)

    p = commands.add_parser("server", help="exec a private redis-server")
    p.add_argument("--unix-socket", action="store_true")
    p.add_argument("--port", type=int)
    p.add_argument("--tls-dir", help="a directory made by `certs`")
    p.add_argument("--dir")
    p.add_argument("--password")
    p.add_argument("redis_args", nargs="*", metavar="-- EXTRA_REDIS_ARGS")
    p.set_defaults(run=cmd_server)

    p = commands.add_parser("sentinel", help="exec a private Redis Sentinel")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--port", type=int)
    p.add_argument("--dir")
    p.add_argument("--master-name", default="mymaster")
    p.add_argument("--quorum", type=int, default=2)
    p.add_argument("--down-after-ms", type=int, default=1000)
    p.add_argument("--failover-timeout-ms", type=int, default=3000)
    p.add_argument("--tls-dir", help="a directory made by `certs`: TLS only")
    p.set_defaults(run=cmd_sentinel)

    p = commands.add_parser("certs", help="make a private test PKI")
    p.add_argument("dir")
    p.add_argument("--hosts", default="127.0.0.1,localhost")
    p.set_defaults(run=cmd_certs)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
