"""The web middleware: who it reports, how often, and that it never gets in the way.

The first tests use a recording client and a fake clock; the last ones go through
a real HTTP server to a real Presence (PRESENCE_TARGET), a closed port and a hung one.
"""

import collections
import concurrent.futures
import socket
import threading
import time
import types
import urllib.request
import wsgiref.simple_server

import grpc
import pytest

from helpers import eventually, online, random_ipv4
from presence_client import PresenceClient
from presence_middleware import PresenceMiddleware, PresenceReporter, django_middleware, remote_user


class FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "made up by the test"


class RecordingClient:
    """Stands in for PresenceClient: records reports as (kind, name, room) and
    sign-outs as ("leave", username, ""), answers OK or `fail_with`."""

    def __init__(self, fail_with=None):
        self.reports, self.fail_with = [], fail_with

    def report_user_future(self, username, *, room, timeout):
        return self._sent("user", username, room)

    def report_guest_future(self, ip_address, *, room, timeout):
        return self._sent("guest", ip_address, room)

    def leave_future(self, usernames=(), ip_addresses=(), *, timeout, room=""):
        assert (list(ip_addresses), room) == ([], ""), "a sign-out leaves the site (and so every room)"
        (username,) = usernames
        return self._sent("leave", username, room)

    def _sent(self, kind, name, room):
        self.reports.append((kind, name, room))
        future = concurrent.futures.Future()
        if self.fail_with is None:
            future.set_result(None)
        else:
            future.set_exception(FakeRpcError(self.fail_with))
        return future


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def get(app, **environ):
    """Calls a WSGI app as a server would; returns (status, body)."""
    request = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "REMOTE_ADDR": "192.0.2.1"}
    request.update(environ)
    request = {key: value for key, value in request.items() if value is not None}
    response = {}
    body = b"".join(app(request, lambda status, headers, exc_info=None: response.update(status=status)))
    return response["status"], body


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def recorder():
    return RecordingClient()


@pytest.fixture
def app(recorder, clock):
    return PresenceMiddleware(hello, PresenceReporter(recorder, clock=clock))


def test_a_signed_in_user_is_reported_once_per_period(app, recorder, clock):
    first = clock.now
    for later in (0, 10, 299.9):
        clock.now = first + later
        assert get(app, REMOTE_USER="alice") == ("200 OK", b"hello")
    assert recorder.reports == [("user", "alice", "")]
    clock.now = first + 300
    get(app, REMOTE_USER="alice")
    assert recorder.reports == [("user", "alice", "")] * 2


def test_each_visitor_has_its_own_period(app, recorder):
    get(app, REMOTE_USER="alice")
    get(app, REMOTE_USER="bob")
    get(app, REMOTE_USER="192.0.2.1")
    get(app)
    get(app, REMOTE_USER="bob")
    assert recorder.reports == [
        ("user", "alice", ""),
        ("user", "bob", ""),
        ("user", "192.0.2.1", ""),  # a user named like an address is still a user
        ("guest", "192.0.2.1", ""),
    ]


@pytest.mark.parametrize("remote_user", [None, ""])
def test_a_visitor_who_is_not_signed_in_is_reported_by_ip(app, recorder, remote_user):
    get(app, REMOTE_USER=remote_user, REMOTE_ADDR="2001:db8::7")
    assert recorder.reports == [("guest", "2001:db8::7", "")]


def test_get_user_can_be_any_callable(recorder):
    app = PresenceMiddleware(hello, PresenceReporter(recorder), get_user=lambda environ: environ.get("HTTP_X_USER"))
    get(app, REMOTE_USER="ignored", HTTP_X_USER="carol")
    assert recorder.reports == [("user", "carol", "")]


@pytest.mark.parametrize(
    "trusted_proxies, forwarded_for, reported",
    [
        (0, "203.0.113.7", "192.0.2.1"),  # not trusted unless asked: anyone can send one
        (1, "198.51.100.1, 203.0.113.7", "203.0.113.7"),  # our proxy appended the last hop
        (2, "198.51.100.1,203.0.113.7", "198.51.100.1"),
        (2, "203.0.113.7", "192.0.2.1"),  # fewer hops than proxies: the header is not theirs
        (1, None, "192.0.2.1"),
        (1, "203.0.113.7:443", None),  # not an address: report nobody, not the proxy
    ],
)
def test_x_forwarded_for_is_used_only_as_far_as_trusted(recorder, trusted_proxies, forwarded_for, reported):
    app = PresenceMiddleware(hello, PresenceReporter(recorder), trusted_proxies=trusted_proxies)
    assert get(app, HTTP_X_FORWARDED_FOR=forwarded_for)[0] == "200 OK"
    assert recorder.reports == ([("guest", reported, "")] if reported else [])


@pytest.mark.parametrize("remote_addr", [None, "", "/run/app.sock", "192.0.2.1:5000"])
def test_a_request_without_a_valid_address_reports_nobody(app, recorder, remote_addr):
    assert get(app, REMOTE_ADDR=remote_addr) == ("200 OK", b"hello")
    assert recorder.reports == []


def test_a_failed_report_is_retried_after_a_while_not_on_every_request(clock, caplog):
    failing = RecordingClient(fail_with=grpc.StatusCode.UNAVAILABLE)
    app = PresenceMiddleware(hello, PresenceReporter(failing, clock=clock, retry_after=30))
    assert get(app, REMOTE_USER="alice")[0] == "200 OK"
    assert "UNAVAILABLE" in caplog.text
    clock.now += 29
    get(app, REMOTE_USER="alice")
    assert len(failing.reports) == 1
    clock.now += 1
    get(app, REMOTE_USER="alice")
    assert len(failing.reports) == 2


def test_a_rejected_name_waits_the_full_period(clock, caplog):
    failing = RecordingClient(fail_with=grpc.StatusCode.INVALID_ARGUMENT)
    app = PresenceMiddleware(hello, PresenceReporter(failing, clock=clock, every=300, retry_after=30))
    get(app, REMOTE_USER="bad\x07name")
    assert "INVALID_ARGUMENT" in caplog.text
    clock.now += 299
    get(app, REMOTE_USER="bad\x07name")
    assert len(failing.reports) == 1
    clock.now += 1
    get(app, REMOTE_USER="bad\x07name")
    assert len(failing.reports) == 2


def test_the_request_succeeds_when_sending_raises(caplog):
    broken = types.SimpleNamespace(report_user_future=None, report_guest_future=None)  # calling None raises
    app = PresenceMiddleware(hello, PresenceReporter(broken))
    assert get(app, REMOTE_USER="alice") == ("200 OK", b"hello")
    assert "could not report user 'alice'" in caplog.text


def test_the_request_succeeds_when_get_user_raises(recorder, caplog):
    app = PresenceMiddleware(hello, PresenceReporter(recorder), get_user=lambda environ: 1 / 0)
    assert get(app) == ("200 OK", b"hello")
    assert recorder.reports == [("guest", "192.0.2.1", "")]
    assert "ZeroDivisionError" in caplog.text


def test_the_apps_own_errors_pass_through_and_the_visitor_still_counts(recorder):
    def failing_app(environ, start_response):
        raise LookupError("the app's own bug")

    with pytest.raises(LookupError):
        get(PresenceMiddleware(failing_app, PresenceReporter(recorder)), REMOTE_USER="alice")
    assert recorder.reports == [("user", "alice", "")]


def test_memory_is_bounded_by_forgetting_the_oldest_visitor(recorder, clock):
    app = PresenceMiddleware(hello, PresenceReporter(recorder, clock=clock, max_visitors=2))
    for name in ("a", "b", "c", "c", "a"):
        clock.now += 1
        get(app, REMOTE_USER=name)
    # "a" was forgotten to make room for "c", so it is reported again; "c" is not.
    assert recorder.reports == [("user", "a", ""), ("user", "b", ""), ("user", "c", ""), ("user", "a", "")]


def test_concurrent_requests_from_one_visitor_report_once(recorder):
    class SlowToAnswer(collections.OrderedDict):
        def get(self, *args):
            answer = super().get(*args)
            time.sleep(0.01)  # widens the gap between "seen lately?" and "mark as seen"
            return answer

    reporter = PresenceReporter(recorder)
    reporter._due = SlowToAnswer()  # white-box: the cache the lock must guard
    app = PresenceMiddleware(hello, reporter)
    start = threading.Barrier(8)

    def visit():
        start.wait()
        get(app, REMOTE_USER="alice")

    threads = [threading.Thread(target=visit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.reports == [("user", "alice", "")]


def test_the_user_is_read_after_the_app_ran(recorder):
    def app_with_its_own_login(environ, start_response):
        environ["REMOTE_USER"] = "erin"  # as an auth layer inside the app would
        return hello(environ, start_response)

    get(PresenceMiddleware(app_with_its_own_login, PresenceReporter(recorder)))
    assert recorder.reports == [("user", "erin", "")]


def test_the_django_middleware_reports_the_signed_in_user_else_the_ip(recorder):
    reporter = PresenceReporter(recorder)
    response = object()
    handler = django_middleware(reporter)(lambda request: response)

    def request(user=None, **meta):
        attrs = {"META": {"REMOTE_ADDR": "192.0.2.9", **meta}}
        if user is not None:
            attrs["user"] = user
        return types.SimpleNamespace(**attrs)

    signed_in = types.SimpleNamespace(is_authenticated=True, get_username=lambda: "dora")
    anonymous = types.SimpleNamespace(is_authenticated=False, get_username=lambda: "")
    assert handler(request(signed_in)) is response
    assert handler(request(anonymous, REMOTE_ADDR="192.0.2.10")) is response
    assert handler(request(REMOTE_ADDR="192.0.2.11")) is response  # no auth middleware at all
    assert recorder.reports == [("user", "dora", ""), ("guest", "192.0.2.10", ""), ("guest", "192.0.2.11", "")]


def forum_of(environ):
    """A room function: the forum in the path (/forum/NAME/...), else the site."""
    parts = environ.get("PATH_INFO", "/").strip("/").split("/")
    return f"forum/{parts[1]}" if len(parts) > 1 and parts[0] == "forum" else None


def test_the_room_function_names_the_room_and_each_room_has_its_own_period(recorder):
    app = PresenceMiddleware(hello, PresenceReporter(recorder), get_room=forum_of)
    get(app, REMOTE_USER="alice", PATH_INFO="/forum/rust/thread/1")
    get(app, REMOTE_USER="alice", PATH_INFO="/forum/rust/thread/2")  # the same room: throttled
    get(app, REMOTE_USER="alice", PATH_INFO="/forum/go")
    get(app, REMOTE_USER="alice", PATH_INFO="/about")
    get(app, PATH_INFO="/forum/rust")
    assert recorder.reports == [
        ("user", "alice", "forum/rust"),
        ("user", "alice", "forum/go"),
        ("user", "alice", ""),
        ("guest", "192.0.2.1", "forum/rust"),
    ]


def test_a_room_function_that_raises_counts_the_visitor_on_the_site(recorder, caplog):
    app = PresenceMiddleware(hello, PresenceReporter(recorder), get_room=lambda environ: environ["NO_SUCH_KEY"])
    assert get(app, REMOTE_USER="alice") == ("200 OK", b"hello")
    assert recorder.reports == [("user", "alice", "")]
    assert "KeyError" in caplog.text


def with_logout(reporter, get_user=remote_user):
    """An app whose /logout signs the user out, as a logout view would."""

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/logout":
            reporter.signed_out(get_user(environ), environ)
        return hello(environ, start_response)

    return app


def test_a_sign_out_sends_leave_and_that_request_counts_as_a_guest(recorder):
    reporter = PresenceReporter(recorder)
    app = PresenceMiddleware(with_logout(reporter), reporter)
    get(app, REMOTE_USER="alice")
    # REMOTE_USER is still set on the way out: reporting it would undo the Leave.
    assert get(app, REMOTE_USER="alice", PATH_INFO="/logout") == ("200 OK", b"hello")
    assert recorder.reports == [("user", "alice", ""), ("leave", "alice", ""), ("guest", "192.0.2.1", "")]


def test_signing_in_again_after_a_sign_out_is_reported_at_once(recorder, clock):
    reporter = PresenceReporter(recorder, clock=clock)
    app = PresenceMiddleware(hello, reporter, get_room=forum_of)
    for user, path in (("alice", "/"), ("alice", "/forum/go"), ("bob", "/")):
        get(app, REMOTE_USER=user, PATH_INFO=path)
    reporter.signed_out("alice")  # say from a session-expiry job: no request
    clock.now += 1
    for user, path in (("alice", "/"), ("alice", "/forum/go"), ("bob", "/")):
        get(app, REMOTE_USER=user, PATH_INFO=path)
    assert recorder.reports[3:] == [("leave", "alice", ""), ("user", "alice", ""), ("user", "alice", "forum/go")]


def test_a_failed_sign_out_is_logged_and_the_request_succeeds(caplog):
    failing = RecordingClient(fail_with=grpc.StatusCode.UNAVAILABLE)
    reporter = PresenceReporter(failing)
    app = PresenceMiddleware(with_logout(reporter), reporter)
    assert get(app, REMOTE_USER="alice", PATH_INFO="/logout") == ("200 OK", b"hello")
    assert "the sign-out of 'alice' failed: UNAVAILABLE" in caplog.text


def test_the_django_middleware_takes_the_room_from_the_request_and_honours_a_sign_out(recorder):
    reporter = PresenceReporter(recorder)
    handler = django_middleware(reporter, get_room=lambda request: request.room)(lambda request: None)
    signed_in = types.SimpleNamespace(is_authenticated=True, get_username=lambda: "dora")
    handler(types.SimpleNamespace(user=signed_in, room="thread/9", META={"REMOTE_ADDR": "192.0.2.9"}))
    # As the user_logged_out receiver would, with a view that left request.user as it was.
    meta = {"REMOTE_ADDR": "192.0.2.9"}
    reporter.signed_out("dora", meta)
    handler(types.SimpleNamespace(user=signed_in, room=None, META=meta))
    assert recorder.reports == [("user", "dora", "thread/9"), ("leave", "dora", ""), ("guest", "192.0.2.9", "")]


# --- Through a real HTTP server, to a real (or a dead) Presence --------------


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """Serves a WSGI app on a loopback port; returns a function that GETs it."""
    servers = []

    def start(app):
        server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

        def fetch(headers=None, path="/"):
            url = f"http://127.0.0.1:{server.server_port}{path}"
            started = time.monotonic()
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as reply:
                return reply.status, reply.read(), time.monotonic() - started

        return fetch

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def web_app(client_options):
    """Makes a site behind one trusted proxy, whose login layer sets an X-User
    header, reporting to the Presence at `target`."""
    clients = []

    def make(target, **reporter_options):
        clients.append(PresenceClient(target, **client_options))
        reporter = PresenceReporter(clients[-1], **reporter_options)
        return PresenceMiddleware(
            hello, reporter, get_user=lambda environ: environ.get("HTTP_X_USER"), trusted_proxies=1
        )

    yield make
    for client in clients:
        client.close()


def test_a_web_request_reports_its_user_and_guest_to_presence(serve, web_app, target, client, unique):
    fetch = serve(web_app(target))
    guest = random_ipv4()
    assert fetch({"X-User": f"{unique}-web"})[:2] == (200, b"hello")
    assert fetch({"X-Forwarded-For": f"203.0.113.50, ::ffff:{guest}"})[:2] == (200, b"hello")
    # Reports are sent in the background: wait for them to land.
    assert eventually(lambda: online(client, users=[f"{unique}-web"]))
    assert eventually(lambda: online(client, guests=[guest]))


def test_a_web_sign_out_leaves_at_once_and_the_room_comes_from_the_path(serve, target, client, client_options, unique):
    name, room = f"{unique}-leaving", f"forum/{unique}"
    with PresenceClient(target, **client_options) as reporting:
        reporter = PresenceReporter(reporting)
        x_user = lambda environ: environ.get("HTTP_X_USER")  # noqa: E731 (the login layer: a header)
        fetch = serve(PresenceMiddleware(with_logout(reporter, x_user), reporter, get_user=x_user, get_room=forum_of))
        assert fetch({"X-User": name}, path=f"/{room}/thread/1")[:2] == (200, b"hello")
        assert eventually(lambda: online(client, users=[name], room=room)), "not reported into the room"
        assert online(client, users=[name]), "a report into a room is a report on the site too"

        assert fetch({"X-User": name}, path="/logout")[:2] == (200, b"hello")
        assert eventually(lambda: not online(client, users=[name], room=room) and not online(client, users=[name]))


def test_a_web_request_succeeds_at_once_when_presence_is_down(serve, web_app, closed_port, caplog):
    fetch = serve(web_app(f"127.0.0.1:{closed_port}"))
    status, body, took = fetch({"X-User": "alice"})
    assert (status, body) == (200, b"hello")
    assert took < 0.15, f"the request waited {took:.3f}s for a dead Presence"
    assert eventually(lambda: "UNAVAILABLE" in caplog.text), "the failed report was not logged"


def test_a_web_request_does_not_wait_for_a_hung_presence(serve, web_app, caplog):
    # Accepts TCP connections (the kernel does, into the backlog) but never speaks.
    with socket.create_server(("127.0.0.1", 0)) as hung:
        fetch = serve(web_app(f"127.0.0.1:{hung.getsockname()[1]}", timeout=0.5))
        status, body, took = fetch({"X-User": "alice"})
        assert (status, body) == (200, b"hello")
        assert took < 0.25, f"the request waited {took:.3f}s for a hung Presence"
        assert eventually(lambda: "DEADLINE_EXCEEDED" in caplog.text), "the timed-out report was not logged"
