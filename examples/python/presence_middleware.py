"""Reports each web visitor to Presence: a WSGI middleware and a Django one.

    reporter = PresenceReporter(PresenceClient("presence:50051"))
    app = PresenceMiddleware(app, reporter)                      # any WSGI app
    presence = django_middleware(reporter)                       # Django: list it in MIDDLEWARE

Who is reported: the signed-in user (`environ["REMOTE_USER"]`, or your own
`get_user(environ)`), else the guest's IP: REMOTE_ADDR, or an X-Forwarded-For
hop if you say how many proxies in front of you to trust.

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


class PresenceReporter:
    """Sends at most one report per visitor per `every` seconds, in the background."""

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
        # (kind, name) -> when it may be reported again; oldest report first.
        self._due: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def user(self, username: str) -> bool:
        """Reports a signed-in user unless reported lately. True if a report was sent."""
        return self._report("user", username, self._client.report_user_future)

    def guest(self, ip_address: str) -> bool:
        """Reports a guest by IP unless reported lately. True if a report was sent."""
        return self._report("guest", ip_address, self._client.report_guest_future)

    def _report(self, kind: str, name: str, send) -> bool:
        visitor = (kind, name)
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
            future = send(name, timeout=self.timeout)
        except Exception:  # a closed channel, say: log it, never raise into the web request
            log.exception("presence: could not report %s %r", kind, name)
            self._retry_soon(visitor)
            return False
        future.add_done_callback(lambda done: self._finished(visitor, done))
        return True

    def _finished(self, visitor: tuple[str, str], future) -> None:
        # Runs on a gRPC thread once the call is over.
        try:
            error = future.exception()
        except Exception as cancelled:  # a cancelled future raises instead
            error = cancelled
        if error is None:
            return
        code = error.code() if isinstance(error, grpc.RpcError) else None
        detail = f"{code.name}: {error.details()}" if code is not None else repr(error)
        log.warning("presence: reporting %s %r failed: %s", *visitor, detail)
        # A rejected name stays rejected: only transient failures earn an early retry.
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            self._retry_soon(visitor)

    def _retry_soon(self, visitor: tuple[str, str]) -> None:
        with self._lock:
            if visitor in self._due:
                self._due[visitor] = min(self._due[visitor], self._clock() + self.retry_after)


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
    reporter: PresenceReporter, get_user: Callable[[], str | None], environ: dict, trusted_proxies: int
) -> None:
    """Reports the signed-in user if any, else the guest's IP. Logs, never raises."""
    try:
        user = get_user()
    except Exception:
        log.exception("presence: could not tell who is signed in; counting a guest")
        user = None
    try:
        if user:
            reporter.user(user)
        elif (address := client_ip(environ, trusted_proxies)) is not None:
            reporter.guest(address)
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
        trusted_proxies: int = 0,
    ):
        self.app, self.reporter = app, reporter
        self.get_user, self.trusted_proxies = get_user, trusted_proxies

    def __call__(self, environ, start_response):
        try:
            return self.app(environ, start_response)
        finally:
            # After the app ran, so `get_user` sees what inner middleware (an
            # auth layer) put in environ; reporting costs the request nothing.
            report_visitor(self.reporter, lambda: self.get_user(environ), environ, self.trusted_proxies)


def django_middleware(reporter: PresenceReporter, *, trusted_proxies: int = 0):
    """A Django middleware factory. In a module of yours:

        presence = django_middleware(PresenceReporter(PresenceClient("presence:50051")))

    then add "yourapp.module.presence" to settings.MIDDLEWARE, below
    AuthenticationMiddleware so that request.user is set. No Django import here.
    """

    def middleware(get_response):
        def call(request):
            response = get_response(request)
            report_visitor(reporter, lambda: _django_user(request), request.META, trusted_proxies)
            return response

        return call

    return middleware


def _django_user(request) -> str | None:
    user = getattr(request, "user", None)  # set by django.contrib.auth's middleware
    return user.get_username() if user is not None and user.is_authenticated else None
