"""Reports each web visitor to Presence: a WSGI middleware and a Django one.

    reporter = PresenceReporter(PresenceClient("presence:50051"))
    app = PresenceMiddleware(app, reporter)                      # any WSGI app
    app = PresenceMiddleware(app, reporter, get_room=forum_of)   # and the room being viewed
    presence = django_middleware(reporter)                       # Django: list it in MIDDLEWARE

Who is reported: the signed-in user (`environ["REMOTE_USER"]`, or your own
`get_user(environ)`), else the guest's IP: REMOTE_ADDR, or an X-Forwarded-For
hop if you say how many proxies in front of you to trust. Where: the room your
`get_room(environ)` names (a forum, a thread; None or "" for the site only). A
visitor reported into a room is online on the site too.

Sign-outs: the app says so, from its logout view, with
`reporter.signed_out(username, environ)`. It sends Leave, so the user is off
every list at once rather than one to two tick intervals later, and marks this
request so that the middleware does not report the user again on the way out
(the request may still carry the old REMOTE_USER); it is counted as a guest
instead. We do not guess sign-outs from REMOTE_USER going missing: the
middleware cannot tell one visitor's requests apart without their session.
The throttle is forgotten in this process only: with several workers, a user
who signs in again may wait out another worker's period before being listed.
A visitor who moves to another room stays listed in the old one until it ages
out (one to two tick intervals); only a sign-out leaves at once.
With Django, connect the signal once (weak=False: a lambda would be collected):

    from django.contrib.auth.signals import user_logged_out
    user_logged_out.connect(
        lambda request, user, **_: user and reporter.signed_out(user.get_username(), request.META),
        weak=False,
    )

Throttled per visitor with an in-process TTL cache rather than the classic
recipe's 5-minute cookie. A cookie throttles only clients that keep cookies
(crawlers, API clients and curl would report on every request), it is the
visitor's to forge or drop, and the Set-Cookie it needs on every response keeps
shared caches from caching pages. The cache costs a few bytes per visitor seen
in the last period, capped at `max_visitors`; with N worker processes a visitor
is reported at most N times a period, which Presence absorbs. Keep `every` at
or below the server's PRESENCE_TICK_INTERVAL, or active visitors may blink out.

Never in the way: a report is sent in the background (a gRPC future with a short
deadline), so the web request does not wait for Presence, even a hung one. A
failure is logged, and that visitor is tried again after `retry_after` seconds,
not on every request, so an outage does not turn into a flood of doomed calls.
A failed Leave is logged only: the user ages out as if it had never been sent.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import threading
import time
from collections.abc import Callable

import grpc

log = logging.getLogger("presence")


# The environ key that marks a request whose user signed out (see signed_out).
SIGNED_OUT = "presence.signed_out"


class PresenceReporter:
    """Sends at most one report per visitor and room per `every` seconds, in the background."""

    def __init__(
        self,
        client,
        *,
        every: float = 300.0,
        retry_after: float = 30.0,
        timeout: float = 0.2,
        max_visitors: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._client = client
        self.every, self.retry_after, self.timeout = every, retry_after, timeout
        self.max_visitors = max_visitors
        self._clock = clock
        self._lock = threading.Lock()  # WSGI servers call us from many threads
        # (kind, name, room) -> when it may be reported again; oldest report first.
        # The room is part of the key: a user reading two threads is in both.
        self._due: collections.OrderedDict[tuple[str, str, str], float] = collections.OrderedDict()

    def user(self, username: str, room: str = "") -> bool:
        """Reports a signed-in user unless reported lately. True if a report was sent."""
        return self._report(("user", username, room), self._client.report_user_future)

    def guest(self, ip_address: str, room: str = "") -> bool:
        """Reports a guest by IP unless reported lately. True if a report was sent."""
        return self._report(("guest", ip_address, room), self._client.report_guest_future)

    def signed_out(self, username: str, environ: dict | None = None) -> bool:
        """Takes a user who signed out off every list (Leave, on the site and so
        in every room), in the background. Pass the request's environ (Django:
        request.META) when calling from within a request, so that the
        middleware counts that request as a guest's. True if Leave was sent."""
        if environ is not None:
            environ[SIGNED_OUT] = username
        with self._lock:
            # Forgotten, so that signing in again is reported at once. Sign-outs
            # are rare next to page views: a scan of the (bounded) cache will do.
            for visitor in [v for v in self._due if v[0] == "user" and v[1] == username]:
                del self._due[visitor]
        try:
            future = self._client.leave_future([username], timeout=self.timeout)
        except Exception:  # a closed channel, say: log it, never raise into the web request
            log.exception("presence: could not send the sign-out of %r", username)
            return False
        future.add_done_callback(lambda done: self._left(username, done))
        return True

    def _report(self, visitor: tuple[str, str, str], send) -> bool:
        kind, name, room = visitor
        now = self._clock()
        with self._lock:
            if now < self._due.get(visitor, now):
                return False
            self._due[visitor] = now + self.every
            self._due.move_to_end(visitor)
            # Forget visitors whose period is over, and the oldest past the cap.
            while self._due and (len(self._due) > self.max_visitors or next(iter(self._due.values())) <= now):
                self._due.popitem(last=False)
        try:
            future = send(name, room=room, timeout=self.timeout)
        except Exception:  # a closed channel, say: log it, never raise into the web request
            log.exception("presence: could not report %s %r%s", kind, name, _in(room))
            self._retry_soon(visitor)
            return False
        future.add_done_callback(lambda done: self._finished(visitor, done))
        return True

    def _finished(self, visitor: tuple[str, str, str], future) -> None:
        # Runs on a gRPC thread once the call is over.
        code, detail = _failure(future)
        if detail is None:
            return
        kind, name, room = visitor
        log.warning("presence: reporting %s %r%s failed: %s", kind, name, _in(room), detail)
        # A rejected name stays rejected: only transient failures earn an early retry.
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            self._retry_soon(visitor)

    def _left(self, username: str, future) -> None:
        _, detail = _failure(future)
        if detail is not None:
            log.warning("presence: the sign-out of %r failed: %s", username, detail)

    def _retry_soon(self, visitor: tuple[str, str, str]) -> None:
        with self._lock:
            if visitor in self._due:
                self._due[visitor] = min(self._due[visitor], self._clock() + self.retry_after)


def _failure(future) -> tuple[grpc.StatusCode | None, str | None]:
    """A finished call's status code and a line for the log; (None, None) if it succeeded."""
    try:
        error = future.exception()
    except Exception as cancelled:  # a cancelled future raises instead
        error = cancelled
    if error is None:
        return None, None
    code = error.code() if isinstance(error, grpc.RpcError) else None
    return code, f"{code.name}: {error.details()}" if code is not None else repr(error)


def _in(room: str) -> str:
    return f" in room {room!r}" if room else ""


def remote_user(environ: dict) -> str | None:
    """The default `get_user`: what the web server's authentication set."""
    return environ.get("REMOTE_USER") or None


def client_ip(environ: dict, trusted_proxies: int = 0) -> str | None:
    """The visitor's IP address, or None if there is no valid one.

    With `trusted_proxies` = N > 0, the address N hops back in X-Forwarded-For:
    each trusted proxy appends the address it got the request from, so the last
    N entries are theirs to vouch for, and anything left of them is whatever the
    visitor sent. With 0 (the default) X-Forwarded-For is ignored: anyone can
    send one.
    """
    address = environ.get("REMOTE_ADDR", "")
    if trusted_proxies > 0:
        hops = [hop.strip() for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        if len(hops) >= trusted_proxies:
            address = hops[-trusted_proxies]
    try:
        ipaddress.ip_address(address)
    except ValueError:  # a Unix socket peer, a port-suffixed hop, junk
        return None
    return address


def report_visitor(
    reporter: PresenceReporter,
    get_user: Callable[[], str | None],
    get_room: Callable[[], str | None],
    environ: dict,
    trusted_proxies: int,
) -> None:
    """Reports the signed-in user if any, else the guest's IP, in the room
    `get_room` names. Logs, never raises."""
    try:
        user = get_user()
    except Exception:
        log.exception("presence: could not tell who is signed in; counting a guest")
        user = None
    if user and environ.get(SIGNED_OUT) == user:
        user = None  # this very request signed them out: reporting them would undo the Leave
    try:
        room = get_room() or ""
    except Exception:
        log.exception("presence: could not tell the room; counting the visitor on the site")
        room = ""
    try:
        if user:
            reporter.user(user, room)
        elif (address := client_ip(environ, trusted_proxies)) is not None:
            reporter.guest(address, room)
    except Exception:
        log.exception("presence: could not report this request's visitor")


class PresenceMiddleware:
    """WSGI middleware: reports who made each request, then gets out of the way."""

    def __init__(
        self,
        app,
        reporter: PresenceReporter,
        *,
        get_user: Callable[[dict], str | None] = remote_user,
        get_room: Callable[[dict], str | None] | None = None,
        trusted_proxies: int = 0,
    ):
        self.app, self.reporter = app, reporter
        self.get_user, self.get_room, self.trusted_proxies = get_user, get_room, trusted_proxies

    def __call__(self, environ, start_response):
        try:
            return self.app(environ, start_response)
        finally:
            # After the app ran, so `get_user` sees what inner middleware (an
            # auth layer) put in environ, and a sign-out the app made is seen;
            # reporting costs the request nothing.
            report_visitor(
                self.reporter,
                lambda: self.get_user(environ),
                lambda: self.get_room(environ) if self.get_room else None,
                environ,
                self.trusted_proxies,
            )


def django_middleware(
    reporter: PresenceReporter,
    *,
    get_room: Callable[[object], str | None] | None = None,
    trusted_proxies: int = 0,
):
    """A Django middleware factory. In a module of yours:

        presence = django_middleware(
            PresenceReporter(PresenceClient("presence:50051")),
            get_room=lambda request: request.resolver_match and request.resolver_match.kwargs.get("forum"),
        )

    then add "yourapp.module.presence" to settings.MIDDLEWARE, below
    AuthenticationMiddleware so that request.user is set. `get_room` takes
    the request. No Django import here.
    """

    def middleware(get_response):
        def call(request):
            response = get_response(request)
            report_visitor(
                reporter,
                lambda: _django_user(request),
                lambda: get_room(request) if get_room else None,
                request.META,
                trusted_proxies,
            )
            return response

        return call

    return middleware


def _django_user(request) -> str | None:
    user = getattr(request, "user", None)  # set by django.contrib.auth's middleware
    return user.get_username() if user is not None and user.is_authenticated else None
