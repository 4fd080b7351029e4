#!/usr/bin/env python3
"""Checks the chart's Prometheus rules and Grafana dashboard with the real
tools. Run by scripts/check-deploy, which installs helm, promtool and
Prometheus (Debian's 2.42), redis-server and grpcurl, and builds `presence`
and `presence-load` first.

The rules and the dashboard are taken from what `helm template presence
helm/presence --namespace presence` renders, so job="presence" and
namespace="presence", as the chart's ServiceMonitor would label the series.

  1. promtool check rules, on the default render and on one with every
     prometheusRule value changed;
  2. promtool test rules with helm/presence/tests/alerts.test.yaml, which must
     hold a firing and a quiet case for every alert; then, as self-tests, on
     renders with another latency threshold and another series selector,
     where it must fail;
  3. live (--live): a private redis-server, the real service (tick interval
     2s) and a real Prometheus scraping it every second with the rendered
     rules loaded. Calls of every kind (an invalid one, a cancelled stream),
     then a Redis outage (SIGSTOP: timeouts, shed calls, NOT_SERVING). Then:
       - PresenceNotServing, PresenceUnavailable and PresenceLatencyHigh go
         pending during the outage, PresenceNoReplicaScraped once the service
         stops; every rule evaluates without error;
       - every query of the dashboard returns data that is not NaN, with the
         labels its legend names; its variables list the release;
       - every selector of the dashboard and of the rules matches series
         (metric names and label values exist), and every label a query
         groups or matches by exists on them; as self-tests, a misspelt
         metric, a misspelt label and a label value that never occurs are
         reported.

It stops exactly the processes it started, by PID. No fixed sleeps: every
wait polls with a deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
import private_redis  # noqa: E402 - the one private-Redis launcher
from promql import Selector, grouping_labels, selectors  # noqa: E402

RELEASE = NAMESPACE = "presence"
TEST_FILE = "helm/presence/tests/alerts.test.yaml"
# Grafana's own variables, as a query of this short test can use them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "1m"}
TICK_INTERVAL = "2s"
REDIS_TIMEOUT = "300ms"


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def record(self, name: str, problems: list[str]) -> None:
        if problems:
            self.failed.append(name)
            print(f"FAIL {name}")
            for p in problems[:20]:
                print(f"     - {p}")
        else:
            self.passed += 1
            print(f"PASS {name}")


def wait_for(what: str, predicate, timeout: float = 20.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- The chart's rules and dashboard -----------------------------------------


def render(helm: str, chart: Path, *sets: str) -> tuple[dict, dict]:
    """The rules file (its groups) and the dashboard JSON the chart renders."""
    argv = [helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    argv += ["--set", "prometheusRule.enabled=true", "--set", "dashboard.enabled=true"]
    for s in sets:
        argv += ["--set", s]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and "presence.json" in d.get("data", {}))
    return {"groups": rule["spec"]["groups"]}, json.loads(configmap["data"]["presence.json"])


def rules_of(rules: dict) -> list[dict]:
    return [r for g in rules["groups"] for r in g["rules"]]


def dashboard_queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, expression, legend format) of every panel target."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"], t.get("legendFormat", "")))
    return out


def promtool(promtool_bin: str, work: Path, rules: dict, *args: str) -> subprocess.CompletedProcess:
    """Runs promtool in WORK, beside rules.yaml and a copy of the tests."""
    (work / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    return subprocess.run([promtool_bin, *args], cwd=work, capture_output=True, text=True)


def both_directions(tests: dict, alerts: list[str]) -> list[str]:
    """Every alert has a case where it fires and one where it stays quiet."""
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    problems = [f"{a}: no case where it fires" for a in alerts if a not in fires]
    problems += [f"{a}: no case where it stays quiet" for a in alerts if a not in quiet]
    problems += [f"tests name {a}, which the rules do not have" for a in (fires | quiet) - set(alerts)]
    return problems


def static_checks(args: argparse.Namespace, repo: Path, work: Path, report: Report) -> tuple[dict, dict]:
    chart = repo / "helm/presence"
    rules, dashboard = render(args.helm, chart)
    alerts = [r["alert"] for r in rules_of(rules) if "alert" in r]

    def run(name: str, rules: dict, *argv: str) -> subprocess.CompletedProcess:
        r = promtool(args.promtool, work, rules, *argv)
        if name:
            report.record(name, [] if r.returncode == 0 else [r.stdout + r.stderr])
        return r

    run(f"promtool check rules: {len(rules_of(rules))} rules", rules, "check", "rules", "rules.yaml")
    custom, _ = render(
        args.helm,
        chart,
        'prometheusRule.seriesSelector=job="web-presence"\\,cluster=~"eu-.*"',
        "prometheusRule.latencyP99Seconds=0.2",
        "prometheusRule.alertLabels.team=web",
    )
    run("promtool check rules: every prometheusRule value changed", custom, "check", "rules", "rules.yaml")

    tests = yaml.safe_load((repo / TEST_FILE).read_text())
    report.record(f"{TEST_FILE} covers every alert, firing and quiet", both_directions(tests, alerts))
    shutil.copy(repo / TEST_FILE, work / "alerts.test.yaml")
    run(f"promtool test rules: {len(tests['tests'])} cases", rules, "test", "rules", "alerts.test.yaml")

    # Self-tests: the unit tests notice rules that changed under them.
    for what, value, alert in (
        ("a p99 threshold of 200ms", "prometheusRule.latencyP99Seconds=0.2", "PresenceLatencyHigh"),
        ("another job's series", 'prometheusRule.seriesSelector=job="other"', "PresenceNotServing"),
    ):
        r = run("", render(args.helm, chart, value)[0], "test", "rules", "alerts.test.yaml")
        caught = r.returncode != 0 and alert in r.stdout + r.stderr
        report.record(f"self-test: promtool test rules fails on {what}", [] if caught else ["the tests passed"])
    return rules, dashboard


# --- The live check -------------------------------------------------------------


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # a bad query: the body says why
            return json.load(e)

    def query(self, expr: str) -> tuple[list[dict], str | None]:
        answer = self.get("/api/v1/query", query=expr)
        if answer.get("status") != "success":
            return [], f"{answer.get('errorType')}: {answer.get('error')}"
        return answer["data"]["result"], None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alert_states(self) -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in self.get("/api/v1/alerts")["data"]["alerts"]}


def stop(proc: subprocess.Popen) -> None:
    """Stops one process this script started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # in case it was stopped
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr


class Live:
    """A private redis-server, the service and a Prometheus scraping it with
    the chart's rules, in WORK; every process is stopped by stop_all()."""

    def __init__(self, args: argparse.Namespace, work: Path, rules: dict) -> None:
        self.args, self.work, self.rules = args, work, rules
        grpc_port, self.metrics_port, prom_port = private_redis.free_ports(3)
        self.target = f"127.0.0.1:{grpc_port}"
        self.prom = Prometheus(prom_port)
        self.started: list[subprocess.Popen] = []
        self.log = open(work / "processes.log", "w")

    def spawn(self, argv: list[str], **popen) -> subprocess.Popen:
        popen.setdefault("stdout", self.log)
        popen.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(argv, **popen)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop(proc)
        self.log.close()

    def start(self) -> None:
        self.redis, info = private_redis.start(
            dir=self.work / "redis", unix_socket=True, redis_server=self.args.redis_server
        )
        self.started.append(self.redis)
        env = dict(
            os.environ,
            PRESENCE_REDIS_URL=info["url"],
            PRESENCE_LISTEN=self.target,
            PRESENCE_METRICS_LISTEN=f"127.0.0.1:{self.metrics_port}",
            PRESENCE_TICK_INTERVAL=TICK_INTERVAL,
            PRESENCE_REDIS_TIMEOUT=REDIS_TIMEOUT,
            PRESENCE_LOG_FORMAT="json",
            RUST_LOG="warn",
        )
        self.presence = self.spawn([self.args.presence], env=env)
        wait_for("presence ready (presence_ready 1)", lambda: self.metric("presence_ready") == 1)
        # Scraped with the labels a ServiceMonitor gives: job (the Service's
        # name), namespace and pod.
        labels = {"namespace": NAMESPACE, "pod": "presence-0"}
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": RELEASE,
                    "static_configs": [{"targets": [f"127.0.0.1:{self.metrics_port}"], "labels": labels}],
                }
            ],
        }
        (self.work / "rules.yaml").write_text(yaml.safe_dump(self.rules, sort_keys=False))
        (self.work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.spawn(
            [
                self.args.prometheus,
                f"--config.file={self.work / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.work / 'tsdb'}",
                f"--web.listen-address={self.prom.base.removeprefix('http://')}",
                "--log.level=warn",
            ]
        )
        wait_for("Prometheus ready", self.prom.ready)

    def metric(self, name: str, labels: str = "") -> float | None:
        """A value on the service's own /metrics, or None."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{re.escape(name + labels)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else None

    def load(self, workload: str, *extra: str, concurrency: int = 2, errors_expected: bool = False) -> None:
        argv = [self.args.presence_load, "--target", f"http://{self.target}", "--workload", workload]
        argv += ["--warmup", "0s", "--concurrency", str(concurrency), "--connections", "1", *extra]
        r = subprocess.run(argv, capture_output=True, text=True)
        # Exit status 1: it ran, and some calls failed.
        if r.returncode != 0 and not (errors_expected and r.returncode == 1):
            raise RuntimeError(f"presence-load {workload} failed: {r.stdout}{r.stderr}")

    def grpcurl(self, method: str, body: str, **popen) -> subprocess.Popen:
        argv = [self.args.grpcurl, "-plaintext", "-d", body, self.target, f"presence.v1.Presence/{method}"]
        return self.spawn(argv, **popen)

    def scraped(self) -> None:
        """Waits for a scrape that began after now. rate() never sees what a
        series gained before its first scrape, so each burst of calls goes
        after one call has made its series and a scrape has seen them."""
        now = time.time()
        query = f'timestamp(up{{job="{RELEASE}"}})'
        wait_for("a scrape", lambda: (r := self.prom.query(query)[0]) and float(r[0]["value"][1]) > now)

    def traffic(self) -> None:
        """Calls of every kind, a name repeated (the repeat filter skips it),
        an invalid call, and a WatchOnline stream its caller drops."""
        calls = [("report-zipf", "--names", "50"), ("report-guest",), ("report-batch", "--batch-size", "10"), ("list",)]
        for workload, *extra in calls:
            self.load(workload, "--requests", "1", *extra)
        self.scraped()
        for (workload, *extra), requests in zip(calls, (400, 50, 20, 50)):
            self.load(workload, "--requests", str(requests), *extra)
        bad = self.grpcurl("ReportUser", '{"username": ""}', stdout=subprocess.PIPE, text=True)
        if "InvalidArgument" not in bad.communicate(timeout=10)[0]:
            raise RuntimeError("an empty username was not refused with InvalidArgument")
        watch = self.grpcurl("WatchOnline", "{}", stdout=subprocess.DEVNULL)
        wait_for("a WatchOnline stream open", lambda: self.metric("presence_watch_streams") == 1)
        stop(watch)
        cancelled = '{grpc_type="server_stream",grpc_service="presence.v1.Presence",grpc_method="WatchOnline",'
        cancelled += 'grpc_code="Cancelled"}'
        wait_for("the dropped stream counted Cancelled", lambda: self.metric("grpc_server_handled_total", cancelled))

    def outage(self, report: Report) -> None:
        """Redis stopped (SIGSTOP): calls time out (UNAVAILABLE, slow), the
        report queue fills and sheds, readiness goes NOT_SERVING; the alerts
        on those go pending. Then Redis is back."""
        self.redis.send_signal(signal.SIGSTOP)
        self.load("report-batch", "--batch-size", "1000", "--requests", "1", errors_expected=True)
        self.scraped()
        self.load("report-batch", "--batch-size", "1000", "--requests", "80", concurrency=40, errors_expected=True)
        wait_for("shed calls", lambda: self.metric("presence_shed_total"))
        wait_for("Redis errors", lambda: self.metric("presence_redis_errors_total"))
        wait_for("NOT_SERVING", lambda: self.metric("presence_ready") == 0)
        during = ("PresenceNotServing", "PresenceUnavailable", "PresenceLatencyHigh")
        self.expect_pending(report, "a Redis outage", *during)
        self.redis.send_signal(signal.SIGCONT)
        back = f'presence_ready{{job="{RELEASE}"}} == 1'
        wait_for("Prometheus to see readiness back", lambda: self.prom.query(back)[0])

    def expect_pending(self, report: Report, cause: str, *alerts: str) -> None:
        try:
            states = wait_for(cause, lambda: (s := self.prom.alert_states()) and all(a in s for a in alerts) and s)
        except TimeoutError:
            states = self.prom.alert_states()
        missing = [f"{a} is inactive" for a in alerts if a not in states]
        report.record(f"live: {cause} makes {', '.join(alerts)} pending", missing)

    def selector_problems(self, expr: str) -> list[str]:
        """Every selector matches series; every label grouped or matched by
        is on some of them."""
        problems = []
        sels = selectors(expr)
        for s in sels:
            result, error = self.prom.query(f"count({s.text()})")
            if error or not result:
                problems.append(f"{s.text()} matches no series" + (f" ({error})" if error else ""))
        for label in set(grouping_labels(expr)):
            with_label = [Selector(s.metric, [*s.matchers, (label, "!=", "")]) for s in sels]
            if not any(self.prom.query(f"count({s.text()})")[0] for s in with_label):
                problems.append(f"no series of {[s.metric for s in sels]} has the label {label!r}")
        return problems

    def check_rules(self, report: Report) -> None:
        loaded = [r for g in self.prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        problems = [f"{r['name']}: {r.get('health')} {r.get('lastError', '')}" for r in loaded if r["health"] != "ok"]
        if len(loaded) != len(rules_of(self.rules)):
            problems.append(f"loaded {len(loaded)} rules, the chart has {len(rules_of(self.rules))}")
        report.record(f"live: Prometheus loaded and evaluates all {len(loaded)} rules without error", problems)
        for rule in rules_of(self.rules):
            result, error = self.prom.query(rule["expr"])
            problems = self.selector_problems(rule["expr"]) + ([error] if error else [])
            if "record" in rule and not result:
                problems.append("the recording rule's expression returns no data")
            report.record(f"live: rule {rule.get('alert') or rule['record']}: every selector matches series", problems)

    def check_dashboard(self, report: Report, dashboard: dict) -> None:
        variables, problems = dict(GRAFANA_VARIABLES), []
        for var in dashboard["templating"]["list"]:
            if var["type"] == "datasource":
                if var.get("query") != "prometheus":
                    problems.append(f"variable {var['name']} is not a Prometheus data source")
                continue
            query = substitute(var.get("definition") or var["query"]["query"], variables)
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            if not m:
                problems.append(f"variable {var['name']}: cannot run {query!r}")
                continue
            series = self.prom.get("/api/v1/series", **{"match[]": m.group(1)}).get("data", [])
            values = sorted({s.get(m.group(2)) for s in series} - {None})
            want = {"namespace": NAMESPACE, "job": RELEASE}.get(var["name"])
            if not values or (want and want not in values):
                problems.append(f"variable {var['name']}: {query} gives {values}")
            variables[f"${var['name']}"] = want or (values[0] if values else "")
        report.record("live: the dashboard's variables list the release", problems)

        for title, expr, legend in dashboard_queries(dashboard):
            concrete = substitute(expr, variables)
            result, error = self.prom.query(concrete)
            problems = self.selector_problems(concrete)
            if error:
                problems.append(error)
            elif not [r for r in result if not math.isnan(float(r["value"][1]))]:
                problems.append(f"no data (or only NaN): {concrete}")
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                if any(label not in r["metric"] for r in result):
                    problems.append(f"legend names {label!r}, which the result lacks")
            report.record(f"live: dashboard [{title}] {expr[:70]}", problems)


    def self_test(self, report: Report) -> None:
        """The checks above report a name or a label that does not exist."""
        for what, expr in (
            ("a misspelt metric", f'sum(rate(grpc_server_handle_total{{job="{RELEASE}"}}[1m]))'),
            ("a label value that never occurs", f'max(presence_online{{job="{RELEASE}", kind="user"}})'),
            ("a misspelt label", f'sum by (grpc_status) (rate(grpc_server_handled_total{{job="{RELEASE}"}}[1m]))'),
        ):
            caught = self.selector_problems(expr)
            report.record(f"live: self-test: {what} is reported", [] if caught else [f"{expr} passed"])


def live_checks(args: argparse.Namespace, work: Path, rules: dict, dashboard: dict, report: Report) -> None:
    live = Live(args, work, rules)
    try:
        live.start()
        live.traffic()
        live.outage(report)
        live.check_rules(report)
        live.check_dashboard(report, dashboard)
        live.self_test(report)
        stop(live.presence)
        live.expect_pending(report, "the service stopped", "PresenceNoReplicaScraped")
    except (TimeoutError, RuntimeError, subprocess.SubprocessError) as e:
        live.log.flush()
        report.record("live: the run", [str(e), "log tail:\n" + (work / "processes.log").read_text()[-2000:]])
    finally:
        live.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helm", required=True)
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--live", action="store_true", help="also run the service and a real Prometheus")
    ap.add_argument("--prometheus", default="prometheus")
    ap.add_argument("--presence", help="the presence binary (--live)")
    ap.add_argument("--presence-load", help="the presence-load binary (--live)")
    ap.add_argument("--grpcurl", default="grpcurl")
    ap.add_argument("--redis-server", default="redis-server")
    args = ap.parse_args()
    report = Report()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="check-prometheus-") as tmp:
        work = Path(tmp)
        print("== promtool: the rules as the chart renders them")
        rules, dashboard = static_checks(args, args.repo.resolve(), work, report)
        if args.live:
            print("== live: a real Prometheus scraping the real service")
            live_checks(args, work, rules, dashboard, report)
    print(f"check_prometheus: {report.passed} passed, {len(report.failed)} failed ({time.monotonic() - began:.0f}s)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
