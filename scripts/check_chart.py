#!/usr/bin/env python3
"""Checks the deployment files: the Helm chart (helm/presence) and the
Dockerfile, offline, with real tools. Run by scripts/check-deploy, which
installs helm, kubernetes-validate and PyYAML first.

What it does, in order:
  1. helm lint --strict, with the default values and with each optional
     feature switched on;
  2. helm template for a set of scenarios (defaults on several Kubernetes
     versions, each optional feature, each kind of store), then for every
     rendered manifest:
       - validation against the Kubernetes API schemas of that version
         (kubernetes-validate, strict: unknown fields fail). Only the
         Prometheus Operator's ServiceMonitor has no schema there; it gets
         structural checks instead;
       - the assertions that matter: gRPC probes with the right service names
         on the gRPC port, the Redis URL from a secretKeyRef, a restricted
         security context, capacity-keeping rollouts, and so on;
  3. bad values that must make rendering fail, each with the message
     expected;
  4. NOTES.txt: the commands it prints name real Services, ports and RPCs,
     and it never prints the Redis URL;
  5. the Dockerfile against the chart and Cargo.toml (ports, user, binary,
     COPY sources vs .dockerignore, toolchain vs rust-version);
  6. mutation self-tests: each assertion is run on a deliberately broken copy
     of a good render and must report it, so no check passes vacuously.

Each check prints PASS or FAIL with the reason; the last line is
"check_chart: N passed, M failed" and the exit status is 1 on any failure.
"""

from __future__ import annotations

import argparse
import base64
import copy
import fnmatch
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

# --- The service's contract (README, src/settings.rs) -----------------------

GRPC_PORT = 50051
METRICS_PORT = 9090
LIVENESS_SERVICE = ""  # the overall status: SERVING while the process is up
READINESS_SERVICE = "presence.v1.Presence"  # SERVING only while Redis answers
ENV_CONTRACT = {
    "PRESENCE_LISTEN",
    "PRESENCE_REDIS_URL",
    "PRESENCE_REDIS_MODE",
    "PRESENCE_TICK_INTERVAL",
    "PRESENCE_KEY_PREFIX",
    "PRESENCE_METRICS_LISTEN",
    "PRESENCE_REDIS_POOL_SIZE",
    "PRESENCE_REDIS_TIMEOUT",
    "PRESENCE_LOG_FORMAT",
    "PRESENCE_SHUTDOWN_GRACE",
    "PRESENCE_GUEST_ADDRESSES",
    "RUST_LOG",
}
# Set only when the feature is on (see "Securing a deployment" below).
ENV_OPTIONAL = {
    "PRESENCE_TLS_CERT",
    "PRESENCE_TLS_KEY",
    "PRESENCE_TLS_CLIENT_CA",
    "PRESENCE_HEALTH_LISTEN",
    "PRESENCE_AUTH_TOKENS_FILE",
    "PRESENCE_GUEST_HASH_KEY_FILE",
    "PRESENCE_REDIS_CA",
}
# The humantime subset the chart's schema admits.
DURATION = re.compile(r"^[1-9][0-9]*(ns|us|ms|s|m|h|d)( ?[0-9]+(ns|us|ms|s|m|h|d))*$")

RELEASE = "rel"
NAMESPACE = "presence-ns"
DEFAULT_KUBE = "1.35.0"
# Kinds with no schema in kubernetes-validate, and why that is acceptable.
SCHEMALESS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "a CRD of the Prometheus Operator",
    ("cert-manager.io/v1", "Certificate"): "a CRD of cert-manager",
}


# --- Reporting --------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def record(self, name: str, problems: list[str]) -> None:
        if problems:
            self.failed.append(name)
            print(f"FAIL {name}")
            for p in problems:
                print(f"     - {p}")
        else:
            self.passed += 1
            print(f"PASS {name}")

    def note(self, text: str) -> None:
        print(f"NOTE {text}")


# --- Running helm -----------------------------------------------------------


@dataclass
class Helm:
    binary: str
    chart: Path

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, check=False)

    def template(self, sets: list[str], kube: str = DEFAULT_KUBE) -> subprocess.CompletedProcess:
        return self.run("template", RELEASE, str(self.chart), "--namespace", NAMESPACE, "--kube-version", kube, *sets)

    def lint(self, sets: list[str], kube: str = DEFAULT_KUBE) -> subprocess.CompletedProcess:
        return self.run("lint", "--strict", str(self.chart), "--namespace", NAMESPACE, "--kube-version", kube, *sets)

    def notes(self, sets: list[str]) -> tuple[int, str]:
        # `helm install --dry-run=client` needs no cluster and prints NOTES.
        r = self.run("install", RELEASE, str(self.chart), "--namespace", NAMESPACE, "--dry-run=client", *sets)
        if r.returncode != 0:
            return r.returncode, r.stderr
        return 0, r.stdout.split("NOTES:", 1)[1] if "NOTES:" in r.stdout else ""


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# --- Scenarios --------------------------------------------------------------

EXTERNAL_URL = "redis://:s3cret-Pa55@redis.prod.internal:6379/0"


@dataclass
class Scenario:
    name: str
    sets: list[str] = field(default_factory=list)
    kube: str = DEFAULT_KUBE
    store: str = "trial"  # trial | url | existing | memory
    replicas: int | None = 2  # None: the HPA owns it
    pdb: bool = True
    hpa: bool = False
    service_monitor: bool = False
    network_policy: bool = True  # on by default
    egress: bool = False
    headless: bool = False
    prestop_sleep: bool = True  # the native sleep action needs 1.30+
    secured: "Secured | None" = None  # see "Securing a deployment" below


def sets(*assignments: str) -> list[str]:
    """helm arguments: --set for each KEY=VALUE."""
    return [arg for a in assignments for arg in ("--set", a)]


EXTERNAL = sets("trialRedis.enabled=false") + ["--set-string", f"redis.url={EXTERNAL_URL}"]
EXISTING = sets("trialRedis.enabled=false", "redis.existingSecret=presence-redis", "redis.existingSecretKey=url")
EGRESS_TO_REDIS = ["--set-json", 'networkPolicy.egress.redisTo=[{"ipBlock":{"cidr":"10.20.0.0/16"}}]']
EVERYTHING = sets(
    "autoscaling.enabled=true",
    "serviceMonitor.enabled=true",
    "networkPolicy.enabled=true",
    "networkPolicy.egress.enabled=true",
    "service.headless=true",
)

SCENARIOS = [
    Scenario("defaults"),
    Scenario("defaults on Kubernetes 1.28", kube="1.28.0", prestop_sleep=False),
    Scenario("defaults on Kubernetes 1.30", kube="1.30.0"),
    Scenario("defaults on Kubernetes 1.37", kube="1.37.0"),
    Scenario("HPA", ["--set", "autoscaling.enabled=true"], replicas=None, hpa=True),
    Scenario(
        "HPA with minReplicas 1",
        ["--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=1"],
        replicas=None,
        hpa=True,
        pdb=False,
    ),
    Scenario("one replica (no PDB)", ["--set", "replicaCount=1"], replicas=1, pdb=False),
    Scenario("PDB switched off", ["--set", "podDisruptionBudget.enabled=false"], pdb=False),
    Scenario("ServiceMonitor", ["--set", "serviceMonitor.enabled=true"], service_monitor=True),
    Scenario("NetworkPolicy", ["--set", "networkPolicy.enabled=true"], network_policy=True),
    Scenario("NetworkPolicy switched off", ["--set", "networkPolicy.enabled=false"], network_policy=False),
    Scenario(
        "NetworkPolicy with egress, external Redis",
        EXISTING + sets("networkPolicy.enabled=true", "networkPolicy.egress.enabled=true") + EGRESS_TO_REDIS,
        store="existing",
        network_policy=True,
        egress=True,
    ),
    Scenario("trial Redis", ["--set", "trialRedis.enabled=true"]),
    Scenario("external Redis URL", EXTERNAL, store="url"),
    Scenario("existing Secret", EXISTING, store="existing"),
    Scenario(
        "in-memory, one replica",
        ["--set", "trialRedis.enabled=false", "--set", "inMemory.enabled=true", "--set", "replicaCount=1"],
        store="memory",
        replicas=1,
        pdb=False,
    ),
    Scenario("headless Service", ["--set", "service.headless=true"], headless=True),
    Scenario(
        "everything on, Kubernetes 1.28",
        EVERYTHING,
        kube="1.28.0",
        replicas=None,
        hpa=True,
        service_monitor=True,
        network_policy=True,
        egress=True,
        headless=True,
        prestop_sleep=False,
    ),
    Scenario(
        "everything on, external Redis",
        EVERYTHING + EXTERNAL + EGRESS_TO_REDIS,
        store="url",
        replicas=None,
        hpa=True,
        service_monitor=True,
        network_policy=True,
        egress=True,
        headless=True,
    ),
]

# Values that must not render, and a piece of the message each must give.
BAD_VALUES = [
    ("replicas as a word", ["--set", "replicaCount=two"], "/replicaCount"),
    ("replicas zero", ["--set", "replicaCount=0"], "/replicaCount"),
    ("tick interval without a unit", ["--set-string", "config.tickInterval=5"], "/config/tickInterval"),
    ("tick interval in months (5M)", ["--set", "config.tickInterval=5M"], "/config/tickInterval"),
    ("tick interval not a duration", ["--set", "config.tickInterval=fast"], "/config/tickInterval"),
    ("tick interval below 100ms", ["--set", "config.tickInterval=50ms"], "100ms to 24h"),
    ("redis timeout above 60s", ["--set", "config.redisTimeout=2m"], "1ms to 60s"),
    ("unknown log format", ["--set", "config.logFormat=yaml"], "/config/logFormat"),
    ("unknown Redis mode", ["--set", "redis.mode=sentinel"], "/redis/mode"),
    ("key prefix with a brace", ["--set", "config.keyPrefix=a{b}"], "/config/keyPrefix"),
    ("pool size above 1024", ["--set", "config.redisPoolSize=5000"], "/config/redisPoolSize"),
    (
        "Redis URL without a scheme",
        ["--set", "trialRedis.enabled=false", "--set", "redis.url=localhost:6379"],
        "/redis/url",
    ),
    ("misspelt top-level key", ["--set", "replicas=3"], "additional properties"),
    ("probe given its own action", ["--set", "readinessProbe.httpGet.port=80"], "/readinessProbe"),
    ("no store at all", ["--set", "trialRedis.enabled=false"], "needs a store"),
    ("external URL with the trial Redis still on", ["--set", "redis.url=redis://r:6379"], "exactly one store"),
    (
        "in-memory with 2 replicas",
        ["--set", "trialRedis.enabled=false", "--set", "inMemory.enabled=true"],
        "replicaCount=1",
    ),
    (
        "in-memory with autoscaling",
        [
            "--set",
            "trialRedis.enabled=false",
            "--set",
            "inMemory.enabled=true",
            "--set",
            "replicaCount=1",
            "--set",
            "autoscaling.enabled=true",
        ],
        "cannot autoscale",
    ),
    ("grace period shorter than the drain", ["--set", "terminationGracePeriodSeconds=10"], "must be longer"),
    (
        "HPA min above max",
        [
            "--set",
            "autoscaling.enabled=true",
            "--set",
            "autoscaling.minReplicas=5",
            "--set",
            "autoscaling.maxReplicas=3",
        ],
        "above autoscaling.maxReplicas",
    ),
    (
        "egress policy with external Redis and no redisTo",
        EXISTING + ["--set", "networkPolicy.enabled=true", "--set", "networkPolicy.egress.enabled=true"],
        "redisTo",
    ),
]

# helm lint --strict runs with these (the defaults and each optional feature).
LINT_SETS = [
    ("defaults", []),
    ("HPA", ["--set", "autoscaling.enabled=true"]),
    ("ServiceMonitor", ["--set", "serviceMonitor.enabled=true"]),
    ("NetworkPolicy", ["--set", "networkPolicy.enabled=true"]),
    ("headless Service", ["--set", "service.headless=true"]),
    ("external Redis URL", EXTERNAL),
    ("existing Secret", EXISTING),
    ("in-memory", ["--set", "trialRedis.enabled=false", "--set", "inMemory.enabled=true", "--set", "replicaCount=1"]),
    (
        "everything on",
        EVERYTHING + EXTERNAL + EGRESS_TO_REDIS,
    ),
]


# --- Small helpers over rendered manifests ----------------------------------


def of_kind(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    out = []
    for d in docs:
        if d.get("kind") != kind:
            continue
        labels = d.get("metadata", {}).get("labels", {}) or {}
        if component is None or labels.get("app.kubernetes.io/component") == component:
            out.append(d)
    return out


def selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def server(docs: list[dict]) -> tuple[dict | None, list[str]]:
    deps = of_kind(docs, "Deployment", "server")
    if len(deps) != 1:
        return None, [f"expected one presence Deployment, found {len(deps)}"]
    return deps[0], []


def presence_container(dep: dict) -> dict:
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "presence")


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def container_port(container: dict, name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """Every pod spec the chart renders: Deployments' templates and bare Pods."""
    out = []
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d.get("kind") == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", d["spec"]))
    return out


# --- Assertions: each returns the problems it found (empty: passed) ---------


def check_schemas(docs: list[dict], sc: Scenario) -> list[str]:
    problems = []
    for d in docs:
        ident = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        try:
            kv.validate(d, sc.kube, True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{ident} against Kubernetes {sc.kube}: {path}: {e.message}")
        except kv.SchemaNotFoundError:
            if (d.get("apiVersion"), d.get("kind")) not in SCHEMALESS:
                problems.append(f"{ident}: no schema for {d.get('apiVersion')} in Kubernetes {sc.kube}")
    return problems


def check_restricted(docs: list[dict], sc: Scenario) -> list[str]:
    """The "restricted" Pod Security Standard, plus a read-only root
    filesystem, for every pod the chart creates."""
    problems = []
    for ident, spec in pod_specs(docs):
        psc = spec.get("securityContext", {}) or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{ident}: {flag} is set")
        for v in spec.get("volumes", []) or []:
            if "hostPath" in v:
                problems.append(f"{ident}: hostPath volume {v['name']}")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            csc = c.get("securityContext", {}) or {}
            where = f"{ident} container {c['name']}"

            # The container's setting wins over the pod's.
            effective = {**psc, **csc}
            if effective.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            uid = effective.get("runAsUser")
            if not isinstance(uid, int) or uid == 0:
                problems.append(f"{where}: runAsUser is {uid!r}, not a numeric non-root uid")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile is {seccomp!r}")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                problems.append(f"{where}: privileged")
            caps = csc.get("capabilities", {}) or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                problems.append(f"{where}: adds capabilities {caps.get('add')}")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
        # Pod-level too, as asked: the pod itself must say non-root + seccomp.
        if psc.get("runAsNonRoot") is not True or (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{ident}: pod securityContext lacks runAsNonRoot/seccompProfile RuntimeDefault")
    if not pod_specs(docs):
        problems.append("no pod specs rendered")
    return problems


def check_labels(docs: list[dict], sc: Scenario) -> list[str]:
    problems = []
    want = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart")
    for d in docs:
        labels = d.get("metadata", {}).get("labels", {}) or {}
        missing = [k for k in want if k not in labels]
        if missing:
            problems.append(f"{d['kind']}/{d['metadata']['name']}: missing labels {missing}")
        if labels.get("app.kubernetes.io/instance") not in (None, RELEASE):
            problems.append(f"{d['kind']}/{d['metadata']['name']}: instance label is not the release")
    return problems


def check_probes(docs: list[dict], sc: Scenario) -> list[str]:
    dep, problems = server(docs)
    if not dep:
        return problems
    c = presence_container(dep)
    grpc_port = container_port(c, "grpc")
    if grpc_port != GRPC_PORT:
        problems.append(f"container port 'grpc' is {grpc_port}, not {GRPC_PORT}")
    # With TLS on the gRPC port, the probes use the plaintext health port.
    probe_port = container_port(c, "health") or grpc_port
    if "PRESENCE_TLS_CERT" in env_map(c) and probe_port == grpc_port:
        problems.append("TLS on the gRPC port, yet no health port for the probes")
    want = {"startupProbe": LIVENESS_SERVICE, "livenessProbe": LIVENESS_SERVICE, "readinessProbe": READINESS_SERVICE}
    for probe, service in want.items():
        p = c.get(probe)
        if not p:
            problems.append(f"{probe} missing")
            continue
        other = {"httpGet", "tcpSocket", "exec"} & set(p)
        if other:
            problems.append(f"{probe} uses {sorted(other)}, not a native gRPC probe")
        g = p.get("grpc")
        if not g:
            problems.append(f"{probe} is not a gRPC probe")
            continue
        if g.get("port") != probe_port:
            problems.append(f"{probe} probes port {g.get('port')}, want {probe_port}")
        if g.get("service") != service:
            problems.append(f"{probe} asks for service {g.get('service')!r}, want {service!r}")
    return problems


def check_rollout(docs: list[dict], sc: Scenario) -> list[str]:
    dep, problems = server(docs)
    if not dep:
        return problems
    spec = dep["spec"]
    strategy = spec.get("strategy", {})
    if strategy.get("type") != "RollingUpdate":
        problems.append(f"strategy is {strategy.get('type')}, not RollingUpdate")
    ru = strategy.get("rollingUpdate", {}) or {}
    if ru.get("maxUnavailable") not in (0, "0%"):
        problems.append(f"maxUnavailable is {ru.get('maxUnavailable')!r}: a rollout would drop capacity")
    if not ru.get("maxSurge"):
        problems.append("maxSurge is 0: with maxUnavailable 0 the rollout could never progress")
    if sc.replicas is None:
        if "replicas" in spec:
            problems.append("the HPA owns the replica count, but the Deployment sets replicas")
    elif spec.get("replicas") != sc.replicas:
        problems.append(f"replicas is {spec.get('replicas')}, want {sc.replicas}")

    pod = spec["template"]["spec"]
    c = presence_container(dep)
    env = env_map(c)
    grace = int(env.get("PRESENCE_SHUTDOWN_GRACE", {}).get("value", "0s").rstrip("s") or 0)
    pre_stop = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
    tgps = pod.get("terminationGracePeriodSeconds")
    if not isinstance(tgps, int) or tgps <= grace + pre_stop:
        problems.append(f"terminationGracePeriodSeconds {tgps!r} does not exceed preStop {pre_stop}s + drain {grace}s")
    if sc.prestop_sleep and not pre_stop:
        problems.append("no preStop sleep on a cluster that supports it")
    if not sc.prestop_sleep and c.get("lifecycle"):
        problems.append("a preStop sleep on a cluster older than 1.30, which rejects it")
    if pod.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks is not false: Services would inject PRESENCE_* variables")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("the service account token is mounted, though Presence never calls the API")

    tsc = pod.get("topologySpreadConstraints") or []
    keys = {t.get("topologyKey") for t in tsc}
    if "kubernetes.io/hostname" not in keys:
        problems.append("no topology spread across nodes")
    pod_labels = spec["template"]["metadata"]["labels"]
    for t in tsc:
        if not selects(t.get("labelSelector", {}).get("matchLabels", {}), pod_labels):
            problems.append(f"spread on {t.get('topologyKey')} does not select the pods")
    if not selects(spec["selector"]["matchLabels"], pod_labels):
        problems.append("the Deployment's selector does not match its pods")
    res = c.get("resources", {})
    if not res.get("requests", {}).get("cpu") or not res.get("limits", {}).get("memory"):
        problems.append("no CPU request or memory limit")
    return problems


def check_env(docs: list[dict], sc: Scenario) -> list[str]:
    dep, problems = server(docs)
    if not dep:
        return problems
    c = presence_container(dep)
    env = env_map(c)
    unknown = {n for n in env if n.startswith("PRESENCE_")} - ENV_CONTRACT - ENV_OPTIONAL
    if unknown:
        problems.append(f"variables the service does not read: {sorted(unknown)}")
    for name in ENV_CONTRACT - {"PRESENCE_REDIS_URL"}:
        if "value" not in env.get(name, {}):
            problems.append(f"{name} is not set")
    v = {n: e.get("value") for n, e in env.items()}
    if not str(v.get("PRESENCE_LISTEN", "")).endswith(f":{container_port(c, 'grpc')}"):
        problems.append(f"PRESENCE_LISTEN {v.get('PRESENCE_LISTEN')!r} is not the 'grpc' container port")
    if not str(v.get("PRESENCE_METRICS_LISTEN", "")).endswith(f":{container_port(c, 'metrics')}"):
        problems.append(f"PRESENCE_METRICS_LISTEN {v.get('PRESENCE_METRICS_LISTEN')!r} is not the 'metrics' port")
    for name in ("PRESENCE_TICK_INTERVAL", "PRESENCE_REDIS_TIMEOUT", "PRESENCE_SHUTDOWN_GRACE"):
        if name in v and not (DURATION.match(str(v[name])) or re.fullmatch(r"0s", str(v[name]))):
            problems.append(f"{name} {v[name]!r} is not a duration the service parses")
    if v.get("PRESENCE_LOG_FORMAT") != "json":
        problems.append(f"PRESENCE_LOG_FORMAT is {v.get('PRESENCE_LOG_FORMAT')!r}; the chart's default is json")
    if not str(v.get("PRESENCE_REDIS_POOL_SIZE", "")).isdigit():
        problems.append("PRESENCE_REDIS_POOL_SIZE is not a number")
    return problems


def check_store(docs: list[dict], sc: Scenario) -> list[str]:
    """Where the Redis URL comes from: always a secretKeyRef, to a Secret
    that holds the right URL; nothing at all for the in-memory store."""
    dep, problems = server(docs)
    if not dep:
        return problems
    env = env_map(presence_container(dep))
    url_env = env.get("PRESENCE_REDIS_URL")
    secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    redis_deps = of_kind(docs, "Deployment", "trial-redis")
    annotations = dep["spec"]["template"]["metadata"].get("annotations") or {}

    if sc.store == "memory":
        if url_env:
            problems.append("in-memory store, yet PRESENCE_REDIS_URL is set")
        if secrets or redis_deps:
            problems.append("in-memory store, yet a Secret or a trial Redis is rendered")
        return problems

    if not url_env:
        return problems + ["PRESENCE_REDIS_URL is not set"]
    if "value" in url_env:
        problems.append("PRESENCE_REDIS_URL is a plain value: it must come from a Secret")
    ref = (url_env.get("valueFrom") or {}).get("secretKeyRef")
    if not ref:
        return problems + ["PRESENCE_REDIS_URL does not come from a secretKeyRef"]

    if sc.store == "existing":
        if (ref.get("name"), ref.get("key")) != ("presence-redis", "url"):
            problems.append(f"secretKeyRef is {ref}, want the existing Secret presence-redis, key url")
        if secrets:
            problems.append(f"existingSecret given, yet the chart renders Secrets {sorted(secrets)}")
        if "checksum/redis-secret" in annotations:
            problems.append("a checksum of a Secret the chart does not own")
        return problems

    secret = secrets.get(ref.get("name"))
    if not secret:
        return problems + [f"secretKeyRef names {ref.get('name')}, which the chart does not render"]
    raw = (secret.get("data") or {}).get(ref.get("key"))
    url = base64.b64decode(raw).decode() if raw else None
    if "checksum/redis-secret" not in annotations:
        problems.append("no checksum/redis-secret annotation: a new URL would not roll the pods")

    if sc.store == "url":
        if url != EXTERNAL_URL:
            problems.append(f"the Secret holds {url!r}, not the URL given in redis.url")
        if redis_deps:
            problems.append("external Redis, yet the trial Redis is rendered")
    elif sc.store == "trial":
        if len(redis_deps) != 1:
            return problems + [f"expected one trial Redis Deployment, found {len(redis_deps)}"]
        rd = redis_deps[0]
        rsvc = of_kind(docs, "Service", "trial-redis")
        if len(rsvc) != 1:
            return problems + ["no Service for the trial Redis"]
        host = f"{rsvc[0]['metadata']['name']}.{NAMESPACE}.svc"
        if url != f"redis://{host}:6379/0":
            problems.append(f"the Secret holds {url!r}, not the trial Redis' Service {host}:6379")
        if not selects(rsvc[0]["spec"]["selector"], rd["spec"]["template"]["metadata"]["labels"]):
            problems.append("the trial Redis Service does not select the trial Redis pod")
        if selects(rsvc[0]["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]):
            problems.append("the trial Redis Service also selects presence pods")
        rc = rd["spec"]["template"]["spec"]["containers"][0]
        if not re.match(r"^(docker\.io/)?(library/)?redis:7(\.|$|-)", rc["image"]):
            problems.append(f"trial Redis image {rc['image']!r} is not redis:7")
        args = rc.get("args", [])
        if "--save" not in args or args[args.index("--save") + 1] != "":
            problems.append('trial Redis does not disable RDB snapshots (--save "")')
        if "--appendonly" not in args or args[args.index("--appendonly") + 1] != "no":
            problems.append("trial Redis does not disable the AOF")
        if rd["spec"].get("replicas") != 1:
            problems.append("trial Redis must be exactly one pod")
        vols = rd["spec"]["template"]["spec"].get("volumes", [])
        if any("persistentVolumeClaim" in v for v in vols):
            problems.append("trial Redis has a persistent volume")
    return problems


def check_service(docs: list[dict], sc: Scenario) -> list[str]:
    dep, problems = server(docs)
    if not dep:
        return problems
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    c = presence_container(dep)
    svcs = [s for s in of_kind(docs, "Service", "server") if s["spec"].get("clusterIP") != "None"]
    if len(svcs) != 1:
        return problems + [f"expected one ClusterIP Service for presence, found {len(svcs)}"]
    svc = svcs[0]
    if svc["spec"].get("type") != "ClusterIP":
        problems.append(f"Service type {svc['spec'].get('type')}, want ClusterIP")
    if not selects(svc["spec"]["selector"], pod_labels):
        problems.append("the Service does not select the presence pods")
    ports = {p.get("name"): p for p in svc["spec"]["ports"]}
    grpc = ports.get("grpc")
    if not grpc:
        problems.append("no Service port named grpc")
    else:
        if grpc.get("appProtocol") not in ("kubernetes.io/h2c", "grpc", "https"):
            problems.append(f"grpc port appProtocol is {grpc.get('appProtocol')!r}")
        if grpc.get("targetPort") not in ("grpc", GRPC_PORT) or grpc.get("port") != GRPC_PORT:
            problems.append(f"grpc port maps {grpc.get('port')} -> {grpc.get('targetPort')}")
    metrics = ports.get("metrics")
    if not metrics:
        problems.append("no Service port named metrics")
    elif metrics.get("targetPort") not in ("metrics", container_port(c, "metrics")):
        problems.append(f"metrics port targets {metrics.get('targetPort')}")
    headless = [s for s in of_kind(docs, "Service", "server") if s["spec"].get("clusterIP") == "None"]
    if sc.headless != bool(headless):
        problems.append(f"headless Service rendered: {bool(headless)}, expected: {sc.headless}")
    for h in headless:
        if not selects(h["spec"]["selector"], pod_labels):
            problems.append("the headless Service does not select the presence pods")
    return problems


def check_optional(docs: list[dict], sc: Scenario) -> list[str]:
    """HPA, PDB, ServiceMonitor, NetworkPolicy: present exactly when
    expected, and pointing at the right things."""
    dep, problems = server(docs)
    if not dep:
        return problems
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    name = dep["metadata"]["name"]

    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    if sc.hpa != bool(hpas):
        problems.append(f"HPA rendered: {bool(hpas)}, expected: {sc.hpa}")
    for h in hpas:
        if h["apiVersion"] != "autoscaling/v2":
            problems.append(f"HPA is {h['apiVersion']}, want autoscaling/v2")
        ref = h["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", name):
            problems.append(f"HPA scales {ref}, not Deployment/{name}")
        if h["spec"]["minReplicas"] > h["spec"]["maxReplicas"]:
            problems.append("HPA minReplicas above maxReplicas")

    pdbs = of_kind(docs, "PodDisruptionBudget")
    if sc.pdb != bool(pdbs):
        problems.append(f"PDB rendered: {bool(pdbs)}, expected: {sc.pdb}")
    for p in pdbs:
        if not selects(p["spec"]["selector"]["matchLabels"], pod_labels):
            problems.append("the PDB does not select the presence pods")
        if "minAvailable" in p["spec"] and "maxUnavailable" in p["spec"]:
            problems.append("the PDB sets both minAvailable and maxUnavailable")

    sms = of_kind(docs, "ServiceMonitor")
    if sc.service_monitor != bool(sms):
        problems.append(f"ServiceMonitor rendered: {bool(sms)}, expected: {sc.service_monitor}")
    for sm in sms:
        # No schema for this CRD offline: check what it must point at.
        svcs = [
            s
            for s in of_kind(docs, "Service")
            if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        scraped = [s for s in svcs if any(p.get("name") == "metrics" for p in s["spec"]["ports"])]
        if len(scraped) != 1:
            problems.append(f"ServiceMonitor reaches {len(scraped)} Services with a metrics port, want 1")
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("port") != "metrics" or ep.get("path") != "/metrics":
                problems.append(f"ServiceMonitor endpoint {ep} is not port metrics, path /metrics")
        if not sm["spec"].get("endpoints"):
            problems.append("ServiceMonitor has no endpoints")

    nps = of_kind(docs, "NetworkPolicy")
    if sc.network_policy != bool(nps):
        problems.append(f"NetworkPolicy rendered: {bool(nps)}, expected: {sc.network_policy}")
    if nps:
        own = [n for n in nps if selects(n["spec"]["podSelector"]["matchLabels"], pod_labels)]
        if len(own) != 1:
            problems.append(f"{len(own)} NetworkPolicies select the presence pods, want 1")
        else:
            allowed = {p.get("port") for rule in own[0]["spec"].get("ingress", []) for p in rule.get("ports", [])}
            if not {"grpc", "metrics"} <= allowed:
                problems.append(f"presence NetworkPolicy opens {allowed}, not grpc and metrics")
            has_egress = "Egress" in own[0]["spec"].get("policyTypes", [])
            if has_egress != sc.egress:
                problems.append(f"egress restricted: {has_egress}, expected: {sc.egress}")
            if has_egress:
                ports = {
                    (p.get("port"), p.get("protocol"))
                    for r in own[0]["spec"].get("egress", [])
                    for p in r.get("ports", [])
                }
                if (53, "UDP") not in ports or (6379, "TCP") not in ports:
                    problems.append(f"egress allows {sorted(ports, key=str)}, not DNS and Redis")
        redis_pods = of_kind(docs, "Deployment", "trial-redis")
        if redis_pods:
            rlabels = redis_pods[0]["spec"]["template"]["metadata"]["labels"]
            guard = [n for n in nps if selects(n["spec"]["podSelector"]["matchLabels"], rlabels)]
            if len(guard) != 1:
                problems.append("the trial Redis (no password) has no NetworkPolicy")
            else:
                peers = [p for r in guard[0]["spec"].get("ingress", []) for p in r.get("from", [])]
                if not peers or not all(
                    selects(p.get("podSelector", {}).get("matchLabels", {}), pod_labels)
                    and "namespaceSelector" not in p
                    for p in peers
                ):
                    problems.append("the trial Redis accepts connections from more than the presence pods")
    return problems


def check_secrecy(docs: list[dict], sc: Scenario, text: str) -> list[str]:
    """The external URL (with its password) appears only base64-encoded in
    the Secret, never in clear anywhere in the render."""
    if sc.store != "url":
        return []
    problems = []
    if "s3cret-Pa55" in text:
        problems.append("the Redis password appears in clear in the rendered manifests")
    if (
        sum(
            1
            for s in of_kind(docs, "Secret")
            if any(base64.b64decode(v).decode() == EXTERNAL_URL for v in (s.get("data") or {}).values())
        )
        != 1
    ):
        problems.append("the URL is not in exactly one Secret")
    return problems


# --- Securing a deployment: TLS, tokens, guest modes, rediss (issue 9) ----


@dataclass
class Secured:
    """What a scenario turns on, so that check_security knows what to find."""

    tls: str = ""  # "" | "existing" | "cert-manager"
    mtls: bool = False
    tokens: bool = False
    test_token: bool = False
    guests: str = "plain"
    redis_ca: bool = False


TLS_EXISTING = sets("tls.enabled=true", "tls.existingSecret=presence-tls")
TLS_CERT_MANAGER = sets(
    "tls.enabled=true", "tls.certManager.enabled=true", "tls.certManager.issuerRef.name=internal-ca"
)
MTLS = sets("tls.clientCa.existingSecret=presence-clients")
TOKENS = sets("auth.existingSecret=presence-tokens", "tests.readTokenSecret=presence-test-token")
HASHED = sets("guests.addresses=hashed", "guests.hashKeySecret=presence-guest-key")
REDISS = EXISTING + sets("redis.caSecret=presence-redis-ca")
SECURE_BASE = "everything secured"

SECURE_SCENARIOS = [
    Scenario("TLS from an existing Secret", TLS_EXISTING, secured=Secured(tls="existing")),
    Scenario(
        "TLS from cert-manager, mutual TLS",
        TLS_CERT_MANAGER + MTLS + sets("service.headless=true"),
        headless=True,
        secured=Secured(tls="cert-manager", mtls=True),
    ),
    Scenario("tokens", TOKENS, secured=Secured(tokens=True, test_token=True)),
    Scenario(
        "tokens without a test token (no test pod)",
        sets("auth.existingSecret=presence-tokens"),
        secured=Secured(tokens=True),
    ),
    Scenario("guests truncated", sets("guests.addresses=truncated"), secured=Secured(guests="truncated")),
    Scenario("guests hashed", HASHED, secured=Secured(guests="hashed")),
    Scenario("rediss with a private CA", REDISS, store="existing", secured=Secured(redis_ca=True)),
    Scenario(
        SECURE_BASE,
        TLS_CERT_MANAGER + MTLS + TOKENS + HASHED + REDISS
        + sets("networkPolicy.egress.enabled=true", "networkPolicy.grpcFromNamespaces={web,admin}")
        + EGRESS_TO_REDIS,
        store="existing",
        egress=True,
        secured=Secured(tls="cert-manager", mtls=True, tokens=True, test_token=True, guests="hashed", redis_ca=True),
    ),
]

SECURE_BAD_VALUES = [
    ("TLS without a certificate", sets("tls.enabled=true"), "tls.enabled needs a certificate"),
    ("cert-manager without TLS", sets("tls.certManager.enabled=true"), "set tls.enabled=true"),
    ("cert-manager without an issuer", sets("tls.enabled=true", "tls.certManager.enabled=true"), "issuerRef.name"),
    ("two certificate sources", TLS_CERT_MANAGER + sets("tls.existingSecret=x"), "two sources"),
    ("issuer of an unknown kind", TLS_CERT_MANAGER + sets("tls.certManager.issuerRef.kind=Vault"), "/tls/certManager"),
    ("a client CA without TLS", MTLS, "needs tls.enabled=true"),
    ("hashed guests without a key", sets("guests.addresses=hashed"), "needs guests.hashKeySecret"),
    ("a hash key for plain guests", sets("guests.hashKeySecret=k"), "only with guests.addresses=hashed"),
    ("an unknown guest mode", sets("guests.addresses=anonymous"), "/guests/addresses"),
    ("a Redis CA for the trial Redis", sets("redis.caSecret=ca"), "no TLS"),
    (
        "a Redis CA with a redis:// URL",
        sets("trialRedis.enabled=false", "redis.url=redis://r:6379", "redis.caSecret=ca"),
        "rediss://",
    ),
    ("a namespace name that is not one", ["--set-json", 'networkPolicy.grpcFromNamespaces=["Web App"]'], "/networkPolicy"),
]

SECURE_LINT_SETS = [
    ("TLS, mutual TLS, tokens, hashed guests, rediss", TLS_CERT_MANAGER + MTLS + TOKENS + HASHED + REDISS),
]


def mounted_secret(pod: dict, container: dict, path: str) -> tuple[str | None, list[str]]:
    """The Secret a file path is read from, if it is in a Secret volume
    mounted as a directory (a subPath mount never sees updates)."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if len(mounts) != 1:
        return None, [f"{path} is not in exactly one mounted volume"]
    mount = mounts[0]
    problems = []
    if "subPath" in mount or "subPathExpr" in mount:
        problems.append(f"{path}: mounted with subPath, so updates never reach the process")
    volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), {})
    secret = volume.get("secret")
    if not secret:
        return None, problems + [f"{path}: volume {mount['name']} is not a Secret"]
    mode = secret.get("defaultMode", 0o644)
    if mode & 0o007:
        problems.append(f"{path}: Secret volume mode {oct(mode)} is readable by others")
    return secret.get("secretName"), problems


def check_security(docs: list[dict], sc: Scenario) -> list[str]:
    """TLS, mutual TLS, tokens, guest mode and the Redis CA: each file from
    the right Secret, mounted so that rotation reaches the process; probes
    on the health port with TLS; the NetworkPolicy never opens a port to
    everyone."""
    dep, problems = server(docs)
    if not dep:
        return problems
    want = sc.secured or Secured()
    pod = dep["spec"]["template"]["spec"]
    c = presence_container(dep)
    env = {n: e.get("value") for n, e in env_map(c).items()}

    def from_secret(variable: str, secret: str | None) -> None:
        path = env.get(variable)
        if secret is None:
            if path is not None:
                problems.append(f"{variable} is set, though its feature is off")
            return
        if not path:
            problems.append(f"{variable} is not set")
            return
        name, found = mounted_secret(pod, c, path)
        problems.extend(found)
        if name != secret:
            problems.append(f"{variable} reads Secret {name!r}, want {secret!r}")

    tls_secret = {"existing": "presence-tls", "cert-manager": f"{RELEASE}-presence-tls", "": None}[want.tls]
    from_secret("PRESENCE_TLS_CERT", tls_secret)
    from_secret("PRESENCE_TLS_KEY", tls_secret)
    from_secret("PRESENCE_TLS_CLIENT_CA", "presence-clients" if want.mtls else None)
    from_secret("PRESENCE_AUTH_TOKENS_FILE", "presence-tokens" if want.tokens else None)
    from_secret("PRESENCE_GUEST_HASH_KEY_FILE", "presence-guest-key" if want.guests == "hashed" else None)
    from_secret("PRESENCE_REDIS_CA", "presence-redis-ca" if want.redis_ca else None)
    if env.get("PRESENCE_GUEST_ADDRESSES") != want.guests:
        problems.append(f"PRESENCE_GUEST_ADDRESSES is {env.get('PRESENCE_GUEST_ADDRESSES')!r}, want {want.guests!r}")

    health = container_port(c, "health")
    if bool(want.tls) != bool(health):
        problems.append(f"health port {health}, with TLS {want.tls or 'off'}")
    if want.tls and not str(env.get("PRESENCE_HEALTH_LISTEN", "")).endswith(f":{health}"):
        problems.append(f"PRESENCE_HEALTH_LISTEN {env.get('PRESENCE_HEALTH_LISTEN')!r} is not the health port")
    for svc in of_kind(docs, "Service", "server"):
        for port in svc["spec"]["ports"]:
            if port["name"] == "grpc" and want.tls and port.get("appProtocol") == "kubernetes.io/h2c":
                problems.append(f"Service {svc['metadata']['name']}: a TLS port announced as cleartext (h2c)")
            if port["name"] == "health" or port.get("targetPort") in ("health", health):
                problems.append(f"Service {svc['metadata']['name']} exposes the health port")

    certs = of_kind(docs, "Certificate")
    if (want.tls == "cert-manager") != bool(certs):
        problems.append(f"{len(certs)} cert-manager Certificates, with TLS {want.tls or 'off'}")
    for cert in certs:
        spec = cert["spec"]
        if spec.get("secretName") != tls_secret:
            problems.append(f"the Certificate writes Secret {spec.get('secretName')}, the pods read {tls_secret}")
        names = set(spec.get("dnsNames", []))
        for svc in of_kind(docs, "Service", "server"):
            if f"{svc['metadata']['name']}.{NAMESPACE}.svc" not in names:
                problems.append(f"the Certificate does not name Service {svc['metadata']['name']}")
        if not (spec.get("issuerRef") or {}).get("name"):
            problems.append("the Certificate has no issuer")

    tests = of_kind(docs, "Pod", "test")
    if want.tokens and not want.test_token and tests:
        problems.append("tokens on and no test token, yet a test pod that cannot authenticate is rendered")
    for t in tests:
        args = t["spec"]["containers"][0].get("args", [])
        if want.tls and "-plaintext" in args:
            problems.append("the test pod calls a TLS port in plaintext")
        if want.tokens and not any("Bearer" in a for a in args):
            problems.append("the test pod sends no token")

    for policy in of_kind(docs, "NetworkPolicy", "server"):
        for rule in policy["spec"].get("ingress") or []:
            if not rule.get("from"):
                problems.append(f"NetworkPolicy {policy['metadata']['name']}: a port open to every peer: {rule}")
    return problems


def security_mutations() -> list[tuple[str, object]]:
    """(what is broken, how), each of which check_security must notice in
    the "everything secured" render."""

    def cont(ds):
        return presence_container(server(ds)[0])

    def mount(ds, name):
        return next(m for m in cont(ds)["volumeMounts"] if m["name"] == name)

    def probe_grpc_port(ds):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            cont(ds)[probe]["grpc"]["port"] = GRPC_PORT

    def open_grpc(ds):
        policy = next(d for d in ds if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == f"{RELEASE}-presence")
        policy["spec"]["ingress"][0].pop("from")

    return [
        ("the TLS Secret mounted with subPath", lambda ds: mount(ds, "tls").update(subPath="tls.crt")),
        ("the token file mounted with subPath", lambda ds: mount(ds, "auth").update(subPath="tokens")),
        ("the probes on the TLS port", probe_grpc_port),
        ("the gRPC port open to every pod", open_grpc),
        (
            "the hash key readable by all",
            lambda ds: next(v for v in server(ds)[0]["spec"]["template"]["spec"]["volumes"] if v["name"] == "guest-key")[
                "secret"
            ].update(defaultMode=0o444),
        ),
    ]


SCENARIOS += SECURE_SCENARIOS
BAD_VALUES += SECURE_BAD_VALUES
LINT_SETS += SECURE_LINT_SETS


PER_SCENARIO = [
    ("Kubernetes API schemas", check_schemas),
    ("restricted security context", check_restricted),
    ("standard labels", check_labels),
    ("gRPC probes", check_probes),
    ("rollout, shutdown and placement", check_rollout),
    ("environment matches the service's contract", check_env),
    ("Redis URL source", check_store),
    ("Service ports", check_service),
    ("optional resources", check_optional),
    ("securing the deployment", check_security),
]


# --- The Dockerfile against the chart, Cargo.toml and .dockerignore ---------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path or
    one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


def check_dockerfile(
    repo: Path, values: dict, cargo: dict | None, dockerfile: str | None = None, dockerignore: str | None = None
) -> list[str]:
    """The texts default to the repository's files; the self-tests pass
    broken copies."""
    problems = []
    if dockerfile is None:
        dockerfile = (repo / "Dockerfile").read_text()
    if dockerignore is None:
        dockerignore = (repo / ".dockerignore").read_text()
    ins = dockerfile_instructions(dockerfile)
    froms = [rest for word, rest in ins if word == "FROM"]
    if len(froms) < 2:
        problems.append("not a multi-stage build")
    for f in froms:
        image = f.split()[0]
        if ":" not in image.split("/")[-1] and "@" not in image:
            problems.append(f"base image {image} has no tag")
        if image.endswith(":latest"):
            problems.append(f"base image {image} is :latest")
    rust = next((f.split()[0] for f in froms if f.startswith("rust:")), None)
    m = re.match(r"rust:(\d+)\.(\d+)(?:\.(\d+))?-slim-bookworm$", rust or "")
    if not m:
        problems.append(f"build stage {rust!r} is not a pinned rust:<version>-slim-bookworm")
    final = froms[-1].split()[0] if froms else ""
    if "cc-debian12" not in final and "bookworm" not in final:
        problems.append(f"runtime {final} is not bookworm-based like the build stage (glibc)")

    # The final stage's instructions.
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    final_ins = ins[last_from:]
    users = [rest for w, rest in final_ins if w == "USER"]
    if not users or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]):
        problems.append(f"runtime USER is {users[-1] if users else None!r}, not a numeric non-root uid")
    else:
        uid = int(users[-1].split(":")[0])
        chart_uid = values["securityContext"]["runAsUser"]
        if uid != chart_uid:
            problems.append(f"image USER {uid} differs from the chart's runAsUser {chart_uid}")
    exposed = {int(p.split("/")[0]) for w, rest in final_ins if w == "EXPOSE" for p in rest.split()}
    chart_ports = {values["containerPorts"]["grpc"], values["containerPorts"]["metrics"]}
    if exposed != chart_ports or exposed != {GRPC_PORT, METRICS_PORT}:
        problems.append(f"EXPOSE {sorted(exposed)} vs chart containerPorts {sorted(chart_ports)}")
    entry = [rest for w, rest in final_ins if w == "ENTRYPOINT"]
    try:
        entry_argv = json.loads(entry[-1]) if entry else None
    except json.JSONDecodeError:
        entry_argv = None
    if not entry_argv:
        problems.append("ENTRYPOINT is missing or not in exec form (the binary must be PID 1 to get SIGTERM)")
    elif Path(entry_argv[0]).name != "presence":
        problems.append(f"ENTRYPOINT runs {entry_argv[0]}, not the presence binary")
    if not any(w == "RUN" and "cargo build" in r and "--locked" in r for w, r in ins):
        problems.append("cargo build without --locked: the image would not use Cargo.lock")

    # COPY sources exist and are let through by .dockerignore.
    patterns = [line.strip() for line in dockerignore.splitlines() if line.strip() and not line.startswith("#")]
    for w, rest in ins:
        if w != "COPY" or "--from=" in rest:
            continue
        for src in rest.split()[:-1]:
            if src.startswith("--"):
                continue
            if not (repo / src).exists():
                problems.append(f"COPY {src}: no such file in the repository")
            elif dockerignored(patterns, src.rstrip("/")):
                problems.append(f"COPY {src}: excluded by .dockerignore")
    for junk in (
        "target/release/presence",
        ".git/config",
        "examples/node/node_modules/x/index.js",
        "helm/presence/values.yaml",
        ".env",
    ):
        if not dockerignored(patterns, junk):
            problems.append(f".dockerignore lets {junk} into the build context")

    if cargo:
        bins = [t["name"] for t in cargo["targets"] if "bin" in t["kind"]]
        if "presence" not in bins:
            problems.append(f"Cargo.toml has no `presence` binary (bins: {bins})")
        need = cargo.get("rust_version")
        if m and need:
            have = tuple(int(x) for x in m.groups() if x is not None)
            want = tuple(int(x) for x in need.split("."))
            if have[: len(want)] < want:
                problems.append(f"the build stage's Rust {rust} is older than rust-version {need}")
    return problems


# --- NOTES.txt --------------------------------------------------------------


def check_notes(helm: Helm, repo: Path) -> list[str]:
    problems = []
    proto = (repo / "proto/presence/v1/presence.proto").read_text()
    rpcs = set(re.findall(r"rpc\s+(\w+)\s*\(", proto))
    fields = set(re.findall(r"^\s*(?:repeated\s+)?\w+\s+(\w+)\s*=\s*\d+;", proto, re.MULTILINE))
    for sets, label in ((EXTERNAL, "external URL"), ([], "defaults"), (EXISTING, "existing Secret")):
        rc, notes = helm.notes(sets)
        if rc != 0:
            problems.append(f"{label}: helm install --dry-run failed: {notes.strip()[:200]}")
            continue
        if "s3cret-Pa55" in notes or "redis.prod.internal" in notes:
            problems.append(f"{label}: NOTES print the Redis URL")
        rendered = load_docs(helm.template(sets).stdout)
        svc_names = {s["metadata"]["name"] for s in of_kind(rendered, "Service", "server")}
        dep_names = {d["metadata"]["name"] for d in of_kind(rendered, "Deployment", "server")}
        pf = re.search(r"kubectl --namespace (\S+) port-forward service/(\S+) (\d+):(\d+) (\d+):(\d+)", notes)
        if not pf:
            problems.append(f"{label}: no `kubectl port-forward service/...` command")
        else:
            ns, svc, _, gport, _, mport = pf.groups()
            if ns != NAMESPACE or svc not in svc_names or (int(gport), int(mport)) != (GRPC_PORT, METRICS_PORT):
                problems.append(f"{label}: port-forward targets {ns}/{svc} {gport},{mport}: no such Service port")
        rs = re.search(r"rollout status deployment/(\S+)", notes)
        if not rs or rs.group(1) not in dep_names:
            problems.append(f"{label}: rollout status names no rendered Deployment")
        calls = re.findall(r"grpcurl -plaintext (?:-d '([^']*)' )?127\.0\.0\.1:50051 (\S+)", notes)
        if not any(m == "list" for _, m in calls):
            problems.append(f"{label}: no `grpcurl ... list`")
        for body, method in calls:
            if method == "list":
                continue
            svc, _, rpc = method.partition("/")
            if svc == "presence.v1.Presence" and rpc not in rpcs:
                problems.append(f"{label}: NOTES call {method}, not an RPC of presence.proto")
            elif svc == "grpc.health.v1.Health" and rpc != "Check":
                problems.append(f"{label}: NOTES call {method}")
            elif svc not in ("presence.v1.Presence", "grpc.health.v1.Health"):
                problems.append(f"{label}: NOTES call unknown service {svc}")
            try:
                keys = set(json.loads(body or "{}"))
            except json.JSONDecodeError:
                problems.append(f"{label}: request body {body!r} is not JSON")
                continue
            if svc == "presence.v1.Presence" and keys - fields:
                problems.append(f"{label}: {method} body has fields {sorted(keys - fields)} not in the proto")
    return problems


# --- README values table ----------------------------------------------------


def leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("resources", "behavior", "podSecurityContext", "securityContext"):
            out += leaf_keys(v, path + ".")
        else:
            out.append(path)
    return out


def check_readme(chart: Path, values: dict) -> list[str]:
    """Every values key has a row in the README's table, and every row's
    default is the one in values.yaml."""
    readme = (chart / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| [^|]+ \| ([^|]+) \|", readme, re.MULTILINE))
    keys = leaf_keys(values)
    problems = [f"values key {k} is not in the README's table" for k in keys if k not in rows]
    problems += [f"README documents {k}, which values.yaml does not have" for k in rows if k not in keys]
    for k, default in rows.items():
        default = default.strip()
        if k not in keys or not default.startswith("`"):
            continue  # "see values.yaml"
        actual = values
        for part in k.split("."):
            actual = actual[part]
        try:
            documented = json.loads(default.strip("`"))
        except json.JSONDecodeError:
            problems.append(f"README default of {k} is not JSON: {default}")
            continue
        if documented != actual:
            problems.append(f"README says {k} defaults to {documented!r}, values.yaml has {actual!r}")
    return problems


# --- Mutation self-tests ----------------------------------------------------


def mutations(docs: list[dict]) -> list[tuple[str, str, object]]:
    """(what is broken, which assertion must notice, how to break it)."""

    def dep(ds):
        return next(
            d
            for d in ds
            if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
        )

    def cont(ds):
        return presence_container(dep(ds))

    def env(ds, name):
        return next(e for e in cont(ds)["env"] if e["name"] == name)

    def secret_env_to_value(ds):
        e = env(ds, "PRESENCE_REDIS_URL")
        e.pop("valueFrom")
        e["value"] = "redis://leaked"

    def drop_drop_all(ds):
        cont(ds)["securityContext"]["capabilities"]["drop"] = []

    def root_redis(ds):
        rd = next(d for d in ds if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-redis"))
        rd["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0

    return [
        (
            'readiness asks for service ""',
            "gRPC probes",
            lambda ds: cont(ds)["readinessProbe"]["grpc"].update(service=""),
        ),
        (
            "liveness asks for presence.v1.Presence",
            "gRPC probes",
            lambda ds: cont(ds)["livenessProbe"]["grpc"].update(service=READINESS_SERVICE),
        ),
        (
            "readiness on the metrics port",
            "gRPC probes",
            lambda ds: cont(ds)["readinessProbe"]["grpc"].update(port=METRICS_PORT),
        ),
        (
            "startup probe over HTTP",
            "gRPC probes",
            lambda ds: cont(ds).update(startupProbe={"httpGet": {"path": "/", "port": 9090}}),
        ),
        ("Redis URL as a plain value", "Redis URL source", secret_env_to_value),
        ("capabilities not dropped", "restricted security context", drop_drop_all),
        ("trial Redis as root", "restricted security context", root_redis),
        (
            "writable root filesystem",
            "restricted security context",
            lambda ds: cont(ds)["securityContext"].update(readOnlyRootFilesystem=False),
        ),
        (
            "rollout may drop a pod",
            "rollout, shutdown and placement",
            lambda ds: dep(ds)["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
        ),
        (
            "grace period shorter than the drain",
            "rollout, shutdown and placement",
            lambda ds: dep(ds)["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=10),
        ),
        (
            "misspelt variable",
            "environment matches the service's contract",
            lambda ds: env(ds, "PRESENCE_TICK_INTERVAL").update(name="PRESENCE_TICK"),
        ),
        (
            "gRPC port without appProtocol",
            "Service ports",
            lambda ds: next(s for s in ds if s["kind"] == "Service" and s["metadata"]["name"] == RELEASE + "-presence")[
                "spec"
            ]["ports"][0].pop("appProtocol"),
        ),
        (
            "unknown field in the pod spec",
            "Kubernetes API schemas",
            lambda ds: dep(ds)["spec"]["template"]["spec"].update(terminationGracePeriod=30),
        ),
        (
            "PDB missing with 2 replicas",
            "optional resources",
            lambda ds: ds.remove(next(d for d in ds if d["kind"] == "PodDisruptionBudget")),
        ),
    ]


# --- Main -------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helm", required=True)
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--cargo-metadata", type=Path, help="output of `cargo metadata --locked --no-deps`")
    args = ap.parse_args()
    repo = args.repo.resolve()
    chart = repo / "helm/presence"
    helm = Helm(args.helm, chart)
    report = Report()
    values = yaml.safe_load((chart / "values.yaml").read_text())

    print("== helm lint --strict")
    for label, sets in LINT_SETS:
        r = helm.lint(sets)
        report.record(f"lint: {label}", [] if r.returncode == 0 else [(r.stdout + r.stderr).strip()[-600:]])
    r = helm.lint(["--set", "replicaCount=two"])
    report.record("lint: rejects replicaCount=two", [] if r.returncode != 0 else ["helm lint passed a bad value"])

    print("== helm template, schema validation and assertions")
    good: list[dict] | None = None
    secure_good: list[dict] | None = None
    for sc in SCENARIOS:
        r = helm.template(sc.sets, sc.kube)
        if r.returncode != 0:
            report.record(f"[{sc.name}] renders", [r.stderr.strip()])
            continue
        docs = load_docs(r.stdout)
        report.record(f"[{sc.name}] renders ({len(docs)} manifests, Kubernetes {sc.kube})", [])
        for label, fn in PER_SCENARIO:
            report.record(f"[{sc.name}] {label}", fn(docs, sc))
        report.record(f"[{sc.name}] Redis password never in clear", check_secrecy(docs, sc, r.stdout))
        if sc.name == "defaults":
            good = docs
        if sc.name == SECURE_BASE:
            secure_good = docs
    for (api, kind), why in SCHEMALESS.items():
        report.note(
            f"{kind} ({api}) is {why}: kubernetes-validate has no schema for it, so it gets "
            "structural checks (what it points at) instead"
        )

    print("== the pods roll when the Redis URL changes, and only then")
    sums = []
    for url in ("redis://a.internal:6379/0", "redis://a.internal:6379/0", "redis://b.internal:6379/0"):
        docs = load_docs(
            helm.template(["--set", "trialRedis.enabled=false", "--set-string", f"redis.url={url}"]).stdout
        )
        d, _ = server(docs)
        sums.append(
            (d or {})
            .get("spec", {})
            .get("template", {})
            .get("metadata", {})
            .get("annotations", {})
            .get("checksum/redis-secret")
        )
    report.record(
        "checksum/redis-secret is stable for one URL and changes with it",
        [] if sums[0] and sums[0] == sums[1] != sums[2] else [f"checksums {sums}"],
    )

    print("== bad values fail to render, with a clear message")
    for label, sets, expect in BAD_VALUES:
        r = helm.template(sets)
        if r.returncode == 0:
            report.record(f"rejects {label}", ["rendered without error"])
        elif expect not in r.stderr:
            report.record(f"rejects {label}", [f"failed, but the message lacks {expect!r}: {r.stderr.strip()[:300]}"])
        else:
            report.record(f"rejects {label}", [])

    print("== NOTES.txt")
    report.record("NOTES: commands name real objects and RPCs, and no secret", check_notes(helm, repo))

    print("== README")
    report.record("README values table covers values.yaml", check_readme(chart, values))

    print("== Dockerfile")
    cargo = None
    if args.cargo_metadata and args.cargo_metadata.exists():
        meta = json.loads(args.cargo_metadata.read_text())
        cargo = next(p for p in meta["packages"] if p["id"] in meta["workspace_members"])
    else:
        report.note("no cargo metadata: Dockerfile not checked against Cargo.toml")
    report.record(
        "Dockerfile agrees with the chart, Cargo.toml and .dockerignore", check_dockerfile(repo, values, cargo)
    )

    print("== mutation self-tests: every assertion can fail")
    if good is None:
        report.record("mutation self-tests", ["no good render to mutate"])
    else:
        checks = dict(PER_SCENARIO)
        base = next(s for s in SCENARIOS if s.name == "defaults")
        for what, check_name, mutate in mutations(good):
            docs = copy.deepcopy(good)
            mutate(docs)
            caught = checks[check_name](docs, base)
            report.record(f"'{check_name}' notices: {what}", [] if caught else ["the broken manifest passed"])
        secure = next(s for s in SCENARIOS if s.name == SECURE_BASE)
        for what, mutate in security_mutations() if secure_good else []:
            docs = copy.deepcopy(secure_good)
            mutate(docs)
            caught = check_security(docs, secure) + check_probes(docs, secure)
            report.record(f"'securing the deployment' notices: {what}", [] if caught else ["the broken manifest passed"])
        dockerfile = (repo / "Dockerfile").read_text()
        dockerignore = (repo / ".dockerignore").read_text()
        for what, df, di in (
            ("USER by name", re.sub(r"(?m)^USER .*$", "USER nonroot", dockerfile), dockerignore),
            ("shell-form ENTRYPOINT", re.sub(r"(?m)^ENTRYPOINT .*$", "ENTRYPOINT presence", dockerfile), dockerignore),
            ("metrics port not exposed", re.sub(r"(?m)^EXPOSE 9090$", "EXPOSE 8080", dockerfile), dockerignore),
            ("target/ sent to the daemon", dockerfile, dockerignore + "\n!target/\n"),
        ):
            caught = check_dockerfile(repo, values, cargo, df, di)
            report.record(f"'Dockerfile' check notices: {what}", [] if caught else ["the broken Dockerfile passed"])

    total = report.passed + len(report.failed)
    print()
    if report.failed:
        print(f"{len(report.failed)} of {total} chart checks failed:")
        for name in report.failed:
            print(f"  - {name}")
    print(f"check_chart: {report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
