"""A small Python client for Presence (gRPC service presence.v1.Presence).

    from presence_client import PresenceClient

    with PresenceClient("localhost:50051") as presence:
        presence.report_user("alice")                        # on the site
        presence.report_guest("2001:db8::1", room="forum/7")  # in a room (and so on the site)
        page = presence.list_online(limit=10)                 # one page, and page.next_page_token
        for page in presence.iter_online(room="forum/7"):     # every page
            print(page.users, page.guests)
        presence.count_online()                               # Counts(user_count, guest_count)
        presence.check_online(["alice"])                      # online? last seen (UTC datetime or None)
        presence.leave(["alice"])                             # a sign-out: off every list at once
        presence.list_rooms(order="most_online").rooms        # the busiest rooms first
        for event in presence.watch_online(room="forum/7"):   # Snapshot, then Changes; reconnects
            print(event)

Every call takes `room` ("" = the whole site) and keeps a deadline (`timeout`,
2 s unless told). Every call carries the caller's W3C trace context
(`traceparent`, `tracestate`), so a trace continues through Presence: the
current OpenTelemetry span's, if the `opentelemetry-api` package is installed,
or one given explicitly with `with trace_context("00-…-…-01"):`.

Failures are grpc.RpcError: `e.code()` is INVALID_ARGUMENT for a bad name,
address, room or page token (`e.details()` names the field),
UNAVAILABLE when Presence or its Redis is down or overloaded (reports are
idempotent: retrying is safe), DEADLINE_EXCEEDED past the deadline,
UNAUTHENTICATED or PERMISSION_DENIED without the right token.

A secured server (TLS, tokens): PresenceClient("presence:50051", token=TOKEN,
ca_file="ca.pem"), and for mutual TLS client_cert_file= and client_key_file=.
The token is sent as `authorization: Bearer TOKEN` on every call.

From a shell (`--help` for each):
    python presence_client.py [--target HOST:PORT] user NAME | guest IP | list | count
        | check --user NAME --guest IP | leave --user NAME | rooms | watch   [--room R]
    (--token and --ca default to $PRESENCE_TOKEN and $PRESENCE_CA_FILE.)
The stubs are generated from the proto first: `python generate.py`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import contextvars
import dataclasses
import datetime
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Iterable, Iterator

import grpc

try:
    from presence.v1 import presence_pb2, presence_pb2_grpc
except ImportError as error:  # the stubs are build output, not committed
    raise ImportError("no generated stubs: run `python generate.py` in examples/python") from error

try:  # optional: only to pass the current OpenTelemetry trace on
    from opentelemetry import propagate as otel_propagate
except ImportError:
    otel_propagate = None

log = logging.getLogger("presence")

ORDERS = {"name": presence_pb2.ROOM_ORDER_NAME, "most_online": presence_pb2.ROOM_ORDER_MOST_ONLINE}

CHANNEL_OPTIONS = [
    # A watch can sit idle for hours. Pinging while a call is open is how a
    # dead server or a silently dropped connection shows up, as UNAVAILABLE
    # (and the watch reconnects), instead of a stream that waits forever.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # else gRPC stops pinging an idle stream
]


@dataclasses.dataclass(frozen=True)
class OnlinePage:
    """One page of who is online, and the exact counts (of everyone, not of the page)."""

    users: list[str]
    guests: list[str]
    user_count: int
    guest_count: int
    next_page_token: str  # "" on the last page


@dataclasses.dataclass(frozen=True)
class Counts:
    user_count: int
    guest_count: int


@dataclasses.dataclass(frozen=True)
class UserStatus:
    username: str
    online: bool
    last_seen: datetime.datetime | None  # UTC; site-wide; None if unknown


@dataclasses.dataclass(frozen=True)
class GuestStatus:
    ip_address: str  # as the server stores it (canonical form)
    online: bool


@dataclasses.dataclass(frozen=True)
class Statuses:
    """One status per requested name, in request order."""

    users: list[UserStatus]
    guests: list[GuestStatus]


@dataclasses.dataclass(frozen=True)
class Room:
    name: str
    user_count: int
    guest_count: int


@dataclasses.dataclass(frozen=True)
class RoomsPage:
    rooms: list[Room]
    next_page_token: str  # "" on the last page


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Who is online now (the first 1000 names of each kind, and the counts).
    Replaces whatever the watcher knew: it comes first, after a reconnect, and
    as a `resync` when the server could not deliver the changes in between."""

    users: list[str]
    guests: list[str]
    user_count: int
    guest_count: int
    resync: bool


@dataclasses.dataclass(frozen=True)
class Changes:
    """Who joined and left since the last event; the counts are those after."""

    joined_users: list[str]
    left_users: list[str]
    joined_guests: list[str]
    left_guests: list[str]
    user_count: int
    guest_count: int


def open_channel(
    target: str,
    *,
    ca_file: str | None = None,
    client_cert_file: str | None = None,
    client_key_file: str | None = None,
) -> grpc.Channel:
    """A channel to `target`: TLS trusting `ca_file` when given (with a client
    certificate for mutual TLS), else plaintext."""
    if ca_file is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca_file), private_key=read(client_key_file), certificate_chain=read(client_cert_file)
    )
    return grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


class PresenceClient:
    """One channel to a Presence server; safe to share between threads."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 2.0,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
    ):
        if channel is None:
            channel = open_channel(
                target, ca_file=ca_file, client_cert_file=client_cert_file, client_key_file=client_key_file
            )
        self._channel = channel
        traced = grpc.intercept_channel(self._channel, _TraceContext())
        self._stub = presence_pb2_grpc.PresenceStub(traced)
        # Sent with every call when the server wants tokens.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # Every call gets a deadline: without one a call to a hung server waits forever.
        self.timeout = timeout

    # --- Reporting ---------------------------------------------------------------

    def report_user(self, username: str, *, room: str = "", timeout: float | None = None) -> None:
        request = presence_pb2.ReportUserRequest(username=username, room=room)
        self._stub.ReportUser(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def report_guest(self, ip_address: str, *, room: str = "", timeout: float | None = None) -> None:
        request = presence_pb2.ReportGuestRequest(ip_address=ip_address, room=room)
        self._stub.ReportGuest(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def report_batch(
        self,
        usernames: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        *,
        room: str = "",
        timeout: float | None = None,
    ) -> None:
        """All or nothing: one bad entry rejects the whole batch. At most 1000 entries."""
        request = presence_pb2.ReportBatchRequest(usernames=list(usernames), ip_addresses=list(ip_addresses), room=room)
        self._stub.ReportBatch(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def leave(
        self,
        usernames: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        *,
        room: str = "",
        timeout: float | None = None,
    ) -> None:
        """Takes visitors off the lists at once (a sign-out). Room "" means the
        site and every room; a room means that room only. Last seen is kept."""
        request = presence_pb2.LeaveRequest(usernames=list(usernames), ip_addresses=list(ip_addresses), room=room)
        self._stub.Leave(request, timeout=self._deadline(timeout), metadata=self._metadata)

    # --- Reading -----------------------------------------------------------------

    def list_online(
        self, limit: int = 0, *, page_token: str = "", room: str = "", timeout: float | None = None
    ) -> OnlinePage:
        """One page of each list, sorted ascending by bytes. `limit` is the page
        size: 0 means the server's default (100), and it caps it at 1000."""
        request = presence_pb2.ListOnlineRequest(limit=limit, page_token=page_token, room=room)
        reply = self._stub.ListOnline(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return OnlinePage(
            list(reply.users), list(reply.guests), reply.user_count, reply.guest_count, reply.next_page_token
        )

    def iter_online(
        self, *, room: str = "", page_size: int = 0, timeout: float | None = None
    ) -> Iterator[OnlinePage]:
        """Every page, in order; each call has its own deadline. A name online
        during the whole walk comes exactly once; one that comes or goes during
        it may or may not."""
        token = ""
        while True:
            page = self.list_online(page_size, page_token=token, room=room, timeout=timeout)
            yield page
            token = page.next_page_token
            if not token:
                return

    def count_online(self, *, room: str = "", timeout: float | None = None) -> Counts:
        reply = self._stub.CountOnline(presence_pb2.CountOnlineRequest(room=room), timeout=self._deadline(timeout), metadata=self._metadata)
        return Counts(reply.user_count, reply.guest_count)

    def check_online(
        self,
        usernames: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        *,
        room: str = "",
        timeout: float | None = None,
    ) -> Statuses:
        """Whether each one is online (in `room`), and when each user was last
        seen anywhere on the site. At most 1000 entries."""
        request = presence_pb2.CheckOnlineRequest(usernames=list(usernames), ip_addresses=list(ip_addresses), room=room)
        reply = self._stub.CheckOnline(request, timeout=self._deadline(timeout), metadata=self._metadata)
        users = [
            UserStatus(
                user.username,
                user.online,
                # An unset Timestamp reads as 1970: HasField tells "never seen" apart.
                user.last_seen.ToDatetime(tzinfo=datetime.timezone.utc) if user.HasField("last_seen") else None,
            )
            for user in reply.users
        ]
        return Statuses(users, [GuestStatus(guest.ip_address, guest.online) for guest in reply.guests])

    def list_rooms(
        self, limit: int = 0, *, page_token: str = "", order: str = "name", timeout: float | None = None
    ) -> RoomsPage:
        """One page of the rooms with someone online: `order` is "name" or
        "most_online" (most users first, ties by name). Keep the order while paging."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        request = presence_pb2.ListRoomsRequest(limit=limit, page_token=page_token, order=ORDERS[order])
        reply = self._stub.ListRooms(request, timeout=self._deadline(timeout), metadata=self._metadata)
        rooms = [Room(room.name, room.user_count, room.guest_count) for room in reply.rooms]
        return RoomsPage(rooms, reply.next_page_token)

    def watch_online(self, *, room: str = "", timeout: float | None = None) -> Watch:
        """Follows who is online: iterate for a Snapshot, then Changes. See Watch."""
        return Watch(self._stub, room, timeout=timeout, metadata=self._metadata)

    # --- Non-blocking variants ---------------------------------------------------
    # For callers that must not wait (the web middleware): they return a
    # grpc.Future at once; its exception() is None on success.

    def report_user_future(self, username: str, *, room: str = "", timeout: float | None = None) -> grpc.Future:
        request = presence_pb2.ReportUserRequest(username=username, room=room)
        return self._stub.ReportUser.future(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def report_guest_future(self, ip_address: str, *, room: str = "", timeout: float | None = None) -> grpc.Future:
        request = presence_pb2.ReportGuestRequest(ip_address=ip_address, room=room)
        return self._stub.ReportGuest.future(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def leave_future(
        self,
        usernames: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        *,
        room: str = "",
        timeout: float | None = None,
    ) -> grpc.Future:
        request = presence_pb2.LeaveRequest(usernames=list(usernames), ip_addresses=list(ip_addresses), room=room)
        return self._stub.Leave.future(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PresenceClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


class Watch:
    """A WatchOnline that survives restarts: iterate it for Snapshot and Changes.

    When the stream ends with UNAVAILABLE (the server shut down, a connection
    was aged out or dropped, the server is overloaded) it reconnects, backing
    off from `retry_initial` to `retry_max` seconds, and goes on with a fresh
    Snapshot: treat every Snapshot as the whole truth, not as a change. Any
    other error is raised. `timeout` bounds the whole watch, reconnects
    included (None: until cancelled); past it, DEADLINE_EXCEEDED is raised.

    cancel() (from any thread) or leaving the `with` block ends the iteration.
    """

    def __init__(
        self,
        stub,
        room: str = "",
        *,
        timeout: float | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        metadata=None,
    ):
        self._stub, self._room, self._metadata = stub, room, metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self._lock = threading.Lock()  # guards _call against cancel() from another thread
        self._call = None
        self._cancelled = threading.Event()
        self._events = self._run()

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Snapshot | Changes:
        return next(self._events)

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()

    def _run(self) -> Iterator[Snapshot | Changes]:
        backoff = self.retry_initial
        while True:
            with self._lock:
                if self._cancelled.is_set():
                    return
                self._call = call = self._stub.WatchOnline(
                    presence_pb2.WatchOnlineRequest(room=self._room), timeout=self._remaining(), metadata=self._metadata
                )
            try:
                for message in call:
                    event = _event(message)
                    if isinstance(event, Snapshot):
                        backoff = self.retry_initial  # connected: the next outage starts afresh
                    yield event
                return  # the server never ends a watch with OK; if it did, the watch is over
            except grpc.RpcError as error:
                if self._cancelled.is_set():
                    return
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("presence: watch interrupted (%s), reconnecting", error.details())
            finally:
                call.cancel()  # the caller may have stopped iterating (break): end the stream
            # Jittered, so that the watchers of a restarted server come back spread out.
            if self._cancelled.wait(backoff * random.uniform(0.5, 1.0)):
                return
            backoff = min(backoff * 2, self.retry_max)

    def _remaining(self) -> float | None:
        # Zero once past the deadline: the call then fails at once with
        # DEADLINE_EXCEEDED, as any call past its deadline does.
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


def _event(message) -> Snapshot | Changes:
    if message.WhichOneof("event") == "snapshot":
        s = message.snapshot
        return Snapshot(list(s.users), list(s.guests), s.user_count, s.guest_count, s.resync)
    c = message.changes
    return Changes(
        list(c.joined_users),
        list(c.left_users),
        list(c.joined_guests),
        list(c.left_guests),
        c.user_count,
        c.guest_count,
    )


# --- Trace context ---------------------------------------------------------------

TRACE_HEADERS = ("traceparent", "tracestate")
_explicit_trace: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "presence_trace", default=None
)


@contextlib.contextmanager
def trace_context(traceparent: str, tracestate: str = ""):
    """Calls made within carry this W3C trace context (instead of the current
    OpenTelemetry span's), for callers that trace without OpenTelemetry."""
    headers = [("traceparent", traceparent)] + ([("tracestate", tracestate)] if tracestate else [])
    token = _explicit_trace.set(headers)
    try:
        yield
    finally:
        _explicit_trace.reset(token)


def trace_metadata() -> list[tuple[str, str]]:
    """The trace context a call made now carries: `trace_context`'s, else the
    current OpenTelemetry span's (none without one, or without the package).
    Only traceparent and tracestate: never baggage, which may hold anything."""
    explicit = _explicit_trace.get()
    if explicit is not None:
        return explicit
    if otel_propagate is None:
        return []
    carrier: dict[str, str] = {}
    otel_propagate.inject(carrier)
    return [(key, value) for key, value in carrier.items() if key in TRACE_HEADERS]


class _CallDetails(
    collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


class _TraceContext(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the trace context to every call, as it is made (in the caller's thread)."""

    def _traced(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        trace = trace_metadata()
        if not trace:
            return details
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *trace],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._traced(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._traced(details), request)


# --- Command line ----------------------------------------------------------------


def print_watch(events: Iterable[Snapshot | Changes], out=sys.stdout) -> None:
    """Prints joins and leaves as `+ user NAME`, `- guest IP`, each message
    followed by `= N users, M guests online`."""
    users: set[str] = set()
    guests: set[str] = set()
    for event in events:
        if isinstance(event, Snapshot):
            # A snapshot replaces what we knew (nothing, at first): print the
            # difference. It holds the first 1000 names of each kind only.
            joined_users, left_users = set(event.users) - users, users - set(event.users)
            joined_guests, left_guests = set(event.guests) - guests, guests - set(event.guests)
            users, guests = set(event.users), set(event.guests)
        else:
            joined_users, left_users = event.joined_users, event.left_users
            joined_guests, left_guests = event.joined_guests, event.left_guests
            users = (users | set(joined_users)) - set(left_users)
            guests = (guests | set(joined_guests)) - set(left_guests)
        for sign, kind, names in (
            ("-", "user", left_users),
            ("+", "user", joined_users),
            ("-", "guest", left_guests),
            ("+", "guest", joined_guests),
        ):
            for name in sorted(names, key=str.encode):
                print(f"{sign} {kind} {name}", file=out)
        print(f"= {event.user_count} users, {event.guest_count} guests online", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Report to, read and watch a Presence server.")
    parser.add_argument("--target", default=os.environ.get("PRESENCE_TARGET", "localhost:50051"))
    parser.add_argument("--token", default=os.environ.get("PRESENCE_TOKEN"), help="a bearer token")
    parser.add_argument("--ca", default=os.environ.get("PRESENCE_CA_FILE"), help="TLS: the server's CA (PEM)")
    scoped = argparse.ArgumentParser(add_help=False)
    scoped.add_argument("--room", default="", help='a room; "" (the default) is the whole site')
    names = argparse.ArgumentParser(add_help=False)
    names.add_argument("--user", action="append", default=[], metavar="NAME", help="a username (repeatable)")
    names.add_argument("--guest", action="append", default=[], metavar="IP", help="a guest's address (repeatable)")
    paged = argparse.ArgumentParser(add_help=False)
    paged.add_argument("--limit", type=int, default=0, help="page size (0: the server's default, 100)")
    paged.add_argument("--page-token", default="")

    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("user", parents=[scoped], help="report a signed-in user").add_argument("username")
    commands.add_parser("guest", parents=[scoped], help="report a guest by IP address").add_argument("ip_address")
    listing = commands.add_parser("list", parents=[scoped, paged], help="print who is online, as JSON")
    listing.add_argument("--all", action="store_true", help="walk every page into one list")
    commands.add_parser("count", parents=[scoped], help="print how many are online, as JSON")
    commands.add_parser("check", parents=[scoped, names], help="print who of these is online, as JSON")
    commands.add_parser("leave", parents=[scoped, names], help="take these off the lists (a sign-out)")
    rooms = commands.add_parser("rooms", parents=[paged], help="print the rooms with someone online, as JSON")
    rooms.add_argument("--order", choices=list(ORDERS), default="name")
    commands.add_parser("watch", parents=[scoped], help="print joins and leaves as they happen")
    args = parser.parse_args(argv)

    with PresenceClient(args.target, token=args.token or None, ca_file=args.ca or None) as presence:
        try:
            run(presence, args)
        except grpc.RpcError as error:
            print(f"presence: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # the way to stop `watch`
            return 130
    return 0


def run(presence: PresenceClient, args: argparse.Namespace) -> None:
    def show(value) -> None:  # a result as JSON; last_seen as ISO 8601
        print(json.dumps(dataclasses.asdict(value), default=datetime.datetime.isoformat))

    if args.command == "user":
        presence.report_user(args.username, room=args.room)
    elif args.command == "guest":
        presence.report_guest(args.ip_address, room=args.room)
    elif args.command == "list" and args.all:
        pages = list(presence.iter_online(room=args.room, page_size=args.limit))
        users = [user for page in pages for user in page.users]
        guests = [guest for page in pages for guest in page.guests]
        show(OnlinePage(users, guests, pages[-1].user_count, pages[-1].guest_count, ""))
    elif args.command == "list":
        show(presence.list_online(args.limit, page_token=args.page_token, room=args.room))
    elif args.command == "count":
        show(presence.count_online(room=args.room))
    elif args.command == "check":
        show(presence.check_online(args.user, args.guest, room=args.room))
    elif args.command == "leave":
        presence.leave(args.user, args.guest, room=args.room)
    elif args.command == "rooms":
        show(presence.list_rooms(args.limit, page_token=args.page_token, order=args.order))
    elif args.command == "watch":
        logging.basicConfig(format="%(message)s")  # the reconnect warnings, on stderr
        with presence.watch_online(room=args.room) as watch:
            print_watch(watch)


if __name__ == "__main__":
    sys.exit(main())
