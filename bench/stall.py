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

Watch mode (--watch): no command of its own; it PINGs for --duration
seconds, or until process --pid exits, beside work that something else does
(a ListOnline walk through the service, say). It prints
  {"max_stall_ms": …, "p50_ms": …, "pings": …, "seconds": …,
   "server_max_ms": …, "server_max_command": …, "server_max_by_command": {…},
   "slowlog_threshold_us": …, "slowlog_entries": …, "server_events_ms": {…}}
where server_max_ms is the longest any one command ran inside Redis while it
watched (from SLOWLOG, which logs only commands slower than
--slowlog-threshold-us, default 100 µs, so that a busy Redis does not flood
it: 0 means none was slower) and server_max_by_command the same per command
name, server_max_args the slowest one's first arguments (for EVALSHA,
the script's SHA and keys). Every other client's commands count, as they stall the PING loop.
server_events_ms is what Redis's latency monitor saw take 1 ms or more (its
granularity), by event (command, fast-command, expire-cycle, ...): work
inside Redis that SLOWLOG does not show, such as expiring keys.

Only the standard library; only the loopback address given.

  bench/stall.py --port 6390 -- RENAME '{presence:users}:current' '{presence:users}:old'
  bench/stall.py --port 6390 --watch --pid 12345
  bench/stall.py --port 6390 --watch --duration 2
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


def alive(pid):
    """Whether process pid still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def watch(args, pinger, worker):
    """PINGs until the duration passes or the pid exits; SLOWLOG says what ran long in Redis, and
    Redis's latency monitor what else did (an expire cycle, say), at its 1 ms granularity."""
    watched = ("slowlog-log-slower-than", "slowlog-max-len", "latency-monitor-threshold")
    saved = {key: call(worker, "CONFIG", "GET", key)[1] for key in watched}
    call(worker, "CONFIG", "SET", "slowlog-log-slower-than", str(args.slowlog_threshold_us), "slowlog-max-len", "100000")
    call(worker, "CONFIG", "SET", "latency-monitor-threshold", "1")
    call(worker, "SLOWLOG", "RESET")
    call(worker, "LATENCY", "RESET")
    start = time.perf_counter()
    started_unix = time.time()
    until = start + (args.duration if args.duration is not None else args.timeout)
    rtts = []
    worst, worst_at = 0.0, 0.0
    # Checking the pid is a file read: once every 10 ms is plenty.
    next_check = start
    while time.perf_counter() < until:
        rtt = ping(pinger)
        rtts.append(rtt)
        now = time.perf_counter()
        if rtt > worst:
            worst, worst_at = rtt, now - start
        if args.pid is not None and now >= next_check:
            next_check = now + 0.01
            if not alive(args.pid):
                break
    seconds = time.perf_counter() - start
    timed_out = args.pid is not None and alive(args.pid)
    by_command = {}
    slowest = None
    # Before SLOWLOG GET: reading thousands of entries is itself a command of tens of ms.
    # LATENCY LATEST: [event, unix time, latest ms, max ms] for each event that took >= 1 ms.
    events = {str(event[0]): int(event[3]) for event in call(worker, "LATENCY", "LATEST")}
    # Each event's samples, [[unix seconds, ms], ...], to line them up with the PINGs.
    history = {event: call(worker, "LATENCY", "HISTORY", event) for event in events}
    entries = call(worker, "SLOWLOG", "GET", "-1")
    for entry in entries:
        name = (entry[3][0] if entry[3] else "?").upper()
        if name in ("CONFIG", "SLOWLOG", "LATENCY"):
            continue  # this tool's own
        by_command[name] = max(by_command.get(name, 0), entry[2])
        if slowest is None or entry[2] > slowest[2]:
            slowest = entry
    call(worker, "CONFIG", "SET", *[item for pair in saved.items() for item in pair])
    call(worker, "SLOWLOG", "RESET")
    call(worker, "LATENCY", "RESET")
    top = max(by_command, key=by_command.get) if by_command else None
    print(json.dumps({
        "max_stall_ms": round(max(rtts) * 1000, 3),
        "p50_ms": round(statistics.median(rtts) * 1000, 3),
        "pings": len(rtts),
        "seconds": round(seconds, 3),
        "server_max_ms": round(by_command[top] / 1000, 3) if top else 0.0,
        "server_max_command": top,
        # Its first arguments: which script (EVALSHA's SHA) and keys.
        "server_max_args": [str(a)[:80] for a in slowest[3][:4]] if slowest else [],
        "server_max_by_command": {k: round(v / 1000, 3) for k, v in sorted(by_command.items())},
        "slowlog_threshold_us": args.slowlog_threshold_us,
        "slowlog_entries": len(entries),
        # Redis's own events of 1 ms or more (commands, expire cycles, ...), the longest of each
        # kind, in ms: {} when nothing inside Redis took a millisecond.
        "server_events_ms": events,
        "server_event_history": history,
        "started_unix": round(started_unix, 3),
        "worst_ping_unix": round(started_unix + worst_at, 3),
    }))
    if timed_out:
        sys.exit(f"stall.py: process {args.pid} still ran after {args.timeout} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--baseline", type=float, default=0.5, help="seconds of PINGs before the command (as long as the tail)")
    parser.add_argument("--tail", type=float, default=0.5, help="seconds of PINGs after it answered")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    parser.add_argument("--watch", action="store_true", help="no command: PING for --duration, or until --pid exits")
    parser.add_argument("--duration", type=float, help="--watch: seconds to PING")
    parser.add_argument("--pid", type=int, help="--watch: PING until this process exits (at most --timeout)")
    parser.add_argument("--slowlog-threshold-us", type=int, default=100, help="--watch: SLOWLOG only commands slower than this")
    parser.add_argument("command", nargs="*", help="the command under test and its arguments")
    args = parser.parse_args()
    if args.watch == bool(args.command):
        sys.exit("stall.py: give a command, or --watch (not both)")
    if args.watch and (args.duration is None) == (args.pid is None):
        sys.exit("stall.py: --watch needs --duration or --pid (one of them)")
    if not (args.host.startswith("127.") or args.host in ("localhost", "::1")):
        sys.exit("stall.py: loopback addresses only")

    pinger = socket.create_connection((args.host, args.port), timeout=args.timeout)
    worker = socket.create_connection((args.host, args.port), timeout=args.timeout)
    for sock in (pinger, worker):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if args.watch:
        watch(args, pinger, worker)
        return

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


if __name__ == "__main__":
    main()
