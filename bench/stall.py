#!/usr/bin/env python3
"""How long does one Redis command stall everyone else?

Redis runs commands one at a time, so while a slow command runs, every other
client waits. This opens two connections to a Redis on loopback: on the first
it sends PING after PING, one at a time, timing each round trip; on the
second it sends the command under test once, and keeps PINGing until the
command has answered and a short tail has passed (to catch work that follows
it). The longest PING round trip from the moment the command was sent is the
stall a client would have seen.

It prints one line of JSON:
  {"max_stall_ms": …, "server_ms": …, "command_ms": …, "baseline_max_ms": …,
   "baseline_p50_ms": …, "pings": …, "reply": …}

server_ms is how long Redis itself ran the command (from SLOWLOG, whose
threshold is set to 0 while this runs and put back after): the stall without
the noise of this machine's scheduler. command_ms is its round trip.

baseline_* are the PING round trips of the same loop just before, with
nothing else running: the noise floor of this machine.

With --for SECONDS and no command, it only watches: it PINGs for that long
while others (a service's background work) use Redis, and prints
  {"max_stall_ms": …, "p50_ms": …, "pings": …, "seconds": …,
   "slowest_ms": …, "slowest_command": […], "slowlog_entries": …}
where slowest_* is the longest command Redis itself ran meanwhile (SLOWLOG,
its threshold set to --slowlog-us while this runs: 0 would log every
command and overflow the log), with its first arguments.

Only the standard library; only the loopback address given.

  bench/stall.py --port 6390 -- RENAME '{presence:users}:current' '{presence:users}:old'
  bench/stall.py --port 6390 --for 25
"""

import argparse
import json
import select
import socket
import statistics
import sys
import time

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


def encode(args):
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Incomplete(Exception):
    pass


def parse(buf, pos=0):
    """One RESP2 value from buf at pos: (value, next pos), or Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    pos = end + 2
    if kind == b"+":
        return line.decode(), pos
    if kind == b"-":
        return {"error": line.decode()}, pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise Incomplete
        return buf[pos:pos + n].decode(errors="replace"), pos + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not RESP: {buf[pos - 1:pos + 20]!r}")


def ping(sock):
    """One PING round trip, in seconds."""
    start = time.perf_counter()
    sock.sendall(PING)
    got = b""
    while not got.endswith(PONG):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        got += chunk
    return time.perf_counter() - start


def call(sock, *args):
    """Sends one command and waits for its whole reply."""
    sock.sendall(encode(args))
    buf = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        buf += chunk
        try:
            return parse(buf)[0]
        except Incomplete:
            continue


def server_time_us(sock, name):
    """How long Redis itself spent on the last `name` command, from SLOWLOG."""
    for entry in call(sock, "SLOWLOG", "GET", "-1"):
        if entry[3] and entry[3][0].upper() == name.upper():
            return entry[2]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--baseline", type=float, default=0.5, help="seconds of PINGs before the command (as long as the tail)")
    parser.add_argument("--tail", type=float, default=0.5, help="seconds of PINGs after it answered")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    parser.add_argument("--for", dest="watch_for", type=float, metavar="SECONDS",
                        help="no command: PING for this long while others use Redis")
    parser.add_argument("--slowlog-us", type=int, default=100,
                        help="with --for: log commands slower than this (µs) to find the slowest")
    parser.add_argument("command", nargs="*", help="the command under test and its arguments")
    args = parser.parse_args()
    if not (args.host.startswith("127.") or args.host in ("localhost", "::1")):
        sys.exit("stall.py: loopback addresses only")
    if (args.watch_for is None) == (not args.command):
        sys.exit("stall.py: give either a command or --for SECONDS")
    if args.watch_for is not None:
        return watch(args)

    pinger = socket.create_connection((args.host, args.port), timeout=args.timeout)
    worker = socket.create_connection((args.host, args.port), timeout=args.timeout)
    for sock in (pinger, worker):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # Every command is logged with its own execution time while this runs,
    # so the command's server-side time is exact, whatever the client noise.
    saved = {key: call(worker, "CONFIG", "GET", key)[1] for key in ("slowlog-log-slower-than", "slowlog-max-len")}
    call(worker, "CONFIG", "SET", "slowlog-log-slower-than", "0", "slowlog-max-len", "100000")
    call(worker, "SLOWLOG", "RESET")

    baseline = []
    until = time.perf_counter() + args.baseline
    while time.perf_counter() < until:
        baseline.append(ping(pinger))

    worker.sendall(encode(args.command))
    sent = time.perf_counter()
    deadline = sent + args.timeout
    buf, reply, answered, stall, pings = b"", None, None, 0.0, 0
    while answered is None or time.perf_counter() < answered + args.tail:
        if time.perf_counter() > deadline:
            sys.exit("stall.py: the command did not answer in time")
        stall = max(stall, ping(pinger))
        pings += 1
        if answered is None and select.select([worker], [], [], 0)[0]:
            buf += worker.recv(1 << 20)
            try:
                reply, _ = parse(buf)
                answered = time.perf_counter()
            except Incomplete:
                pass
    server_us = server_time_us(worker, args.command[0])
    call(worker, "CONFIG", "SET", *[item for pair in saved.items() for item in pair])
    call(worker, "SLOWLOG", "RESET")
    print(json.dumps({
        "max_stall_ms": round(stall * 1000, 3),
        "server_ms": None if server_us is None else round(server_us / 1000, 3),
        "command_ms": round((answered - sent) * 1000, 3),
        "baseline_max_ms": round(max(baseline) * 1000, 3),
        "baseline_p50_ms": round(statistics.median(baseline) * 1000, 3),
        "pings": pings,
        "reply": reply,
    }))
    if isinstance(reply, dict) and "error" in reply:
        sys.exit(1)


def watch(args):
    """--for: the longest PING round trip, and Redis's slowest command, over
    a span of time in which others work."""
    pinger = socket.create_connection((args.host, args.port), timeout=args.timeout)
    admin = socket.create_connection((args.host, args.port), timeout=args.timeout)
    pinger.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    saved = {key: call(admin, "CONFIG", "GET", key)[1] for key in ("slowlog-log-slower-than", "slowlog-max-len")}
    call(admin, "CONFIG", "SET", "slowlog-log-slower-than", str(args.slowlog_us), "slowlog-max-len", "100000")
    call(admin, "SLOWLOG", "RESET")
    rtts = []
    start = time.perf_counter()
    try:
        while time.perf_counter() < start + args.watch_for:
            rtts.append(ping(pinger))
        seconds = time.perf_counter() - start
        entries = call(admin, "SLOWLOG", "GET", "-1")
    finally:
        call(admin, "CONFIG", "SET", *[item for pair in saved.items() for item in pair])
        call(admin, "SLOWLOG", "RESET")
    slowest = max(entries, key=lambda e: e[2], default=None)
    print(json.dumps({
        "max_stall_ms": round(max(rtts) * 1000, 3),
        "p50_ms": round(statistics.median(rtts) * 1000, 3),
        "pings": len(rtts),
        "seconds": round(seconds, 3),
        "slowest_ms": None if slowest is None else round(slowest[2] / 1000, 3),
        # The command and its first arguments (a script's SHA and keys).
        "slowest_command": None if slowest is None else [str(a)[:80] for a in slowest[3][:4]],
        "slowlog_entries": len(entries),
        "slowlog_threshold_us": args.slowlog_us,
    }))


if __name__ == "__main__":
    main()
