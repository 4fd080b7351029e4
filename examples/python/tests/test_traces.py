"""The client passes the caller's W3C trace context on, and Presence continues
that trace: against a real server with traces on, whose JSON log lines carry
the trace id of the call they were written in."""

import json
import os
import random

import pytest
from opentelemetry import context, trace

from helpers import Replica, eventually
from presence_client import PresenceClient, trace_context, trace_metadata


def new_trace() -> tuple[str, str]:
    """A trace id, and a sampled traceparent of a caller's span in it."""
    trace_id = f"{random.getrandbits(128) or 1:032x}"
    return trace_id, f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-01"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A replica with traces on and a debug line per traced call. Its collector
    endpoint is a closed port: the spans are lost, but the log shows each
    call's trace id, which is the span's."""
    binary = os.environ.get("PRESENCE_BIN")
    if not binary or not os.environ.get("PRESENCE_REDIS_URL"):
        pytest.fail("PRESENCE_BIN or PRESENCE_REDIS_URL is unset: run scripts/test-clients, which exports them")
    log = tmp_path_factory.mktemp("traced") / "presence.log"
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "PRESENCE_LOG_FORMAT": "json",
        "RUST_LOG": "info,presence::traces=debug",
    }
    server = Replica(binary, log, env=env)
    server.start()
    yield server, log
    server.stop()


def logged_trace_ids(log) -> set[str]:
    ids = set()
    for line in log.read_text().splitlines():
        try:
            ids.add(json.loads(line).get("trace_id"))
        except ValueError:
            pass
    return ids


def reached(log, trace_id: str) -> bool:
    return bool(eventually(lambda: trace_id in logged_trace_ids(log), timeout=10))


def test_an_explicit_traceparent_reaches_presence(traced, unique):
    server, log = traced
    trace_id, traceparent = new_trace()
    with PresenceClient(server.target) as presence, trace_context(traceparent, "caller=1"):
        presence.report_user(f"{unique}-traced")
    assert reached(log, trace_id)


def test_the_current_opentelemetry_span_reaches_presence(traced):
    server, log = traced
    trace_id, _ = new_trace()
    span = trace.NonRecordingSpan(
        trace.SpanContext(
            int(trace_id, 16), random.getrandbits(64) or 1, is_remote=False, trace_flags=trace.TraceFlags(1)
        )
    )
    token = context.attach(trace.set_span_in_context(span))
    try:
        assert dict(trace_metadata())["traceparent"].split("-")[1] == trace_id
        with PresenceClient(server.target) as presence:
            presence.count_online()
    finally:
        context.detach(token)
    assert reached(log, trace_id)


def test_background_reports_and_watches_carry_it_too(traced, unique):
    """What the middleware sends (futures) and a watch's stream."""
    server, log = traced
    report_trace, report_parent = new_trace()
    watch_trace, watch_parent = new_trace()
    with PresenceClient(server.target) as presence:
        with trace_context(report_parent):
            future = presence.report_user_future(f"{unique}-background")
        assert future.exception() is None
        with trace_context(watch_parent):
            with presence.watch_online(timeout=10) as watch:
                next(iter(watch))
    assert reached(log, report_trace)
    assert reached(log, watch_trace)


def test_without_a_trace_nothing_is_added():
    assert trace_metadata() == []
    with trace_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
        assert [key for key, _ in trace_metadata()] == ["traceparent"]
    assert trace_metadata() == []
