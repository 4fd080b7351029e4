#!/usr/bin/env python3
"""Checks the Helm chart (helm/presence) offline, with real tools. Run by
scripts/check-deploy, which installs helm, kubernetes-validate and PyYAML.

values.schema.json already refuses mistyped, misspelt and out-of-range
values, so this checks what the schema cannot see:
  1. helm lint --strict on scenarios that together render every template;
  2. helm template of every scenario, each manifest validated against the
     Kubernetes API schemas (strict); the Prometheus Operator's CRDs have no
     schema there and get structural checks (so do cert-manager's). Then
     what must hold in the render: gRPC probes on the right services (on
     the plaintext health port when TLS is on), the Redis URL only from a
     Secret, restricted security contexts, rollouts that keep capacity, the
     environment the service reads, Services that select the pods, optional
     resources present exactly when asked for, NetworkPolicies (on by
     default) letting in exactly the peers listed, TLS/token/key/CA files
     each from its Secret mounted so that rotation reaches the process,
     dashboard queries and alert rules scoped to the release;
  3. bad values that must fail: a few for the schema, and every check the
     templates make themselves, each with its message;
  4. NOTES.txt's commands, the README's values table and runbooks;
  5. self-tests: each check runs on a deliberately broken copy of a good
     render (or README) and must report it.
(scripts/check_prometheus.py runs the rules and the dashboard on a real
Prometheus; scripts/check_dockerfile.py holds the Dockerfile to the chart.)

Each check prints PASS or FAIL with the reason; the last line is
"check_chart: N passed, M failed" and the exit status is 1 on any failure.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
from promql import selectors  # noqa: E402

# --- The service's contract (README, src/settings.rs) -----------------------

GRPC_PORT, METRICS_PORT = 50051, 9090
LIVENESS_SERVICE = ""  # the overall status: SERVING while the process is up
READINESS_SERVICE = "presence.v1.Presence"  # SERVING only while Redis answers
RELEASE, NAMESPACE, DEFAULT_KUBE = "rel", "presence-ns", "1.35.0"
FULLNAME = f"{RELEASE}-presence"
CRDS = {  # no schema in kubernetes-validate: structural checks instead
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
}
CERTIFICATE_FIELDS = {  # cert-manager.io/v1 Certificate spec, as its CRD has it
    "secretName", "secretTemplate", "commonName", "dnsNames", "uris", "emailAddresses", "ipAddresses",
    "otherNames", "duration", "renewBefore", "renewBeforePercentage", "issuerRef", "isCA", "usages",
    "privateKey", "keystores", "encodeUsagesInRequest", "revisionHistoryLimit", "subject",
    "literalSubject", "additionalOutputFormats", "nameConstraints",
}  # fmt: skip
SEVERITIES = ("critical", "warning", "info")
PROM_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def service_env(repo: Path) -> set[str]:
    """The variables the service reads: src/settings.rs, and RUST_LOG."""
    return set(re.findall(r'env = "([A-Z_]+)"', (repo / "src/settings.rs").read_text())) | {"RUST_LOG"}


# --- Reporting and helm -----------------------------------------------------


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


def sets(*assignments: str) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


# --- Scenarios --------------------------------------------------------------

EXTERNAL_URL = "redis://:s3cret-Pa55@redis.prod.internal:6379/0"
EXTERNAL = sets("trialRedis.enabled=false") + ["--set-string", f"redis.url={EXTERNAL_URL}"]
EXISTING = sets("trialRedis.enabled=false", "redis.existingSecret=presence-redis", "redis.existingSecretKey=url")
MEMORY = sets("trialRedis.enabled=false", "inMemory.enabled=true", "replicaCount=1")
EGRESS_TO_REDIS = ["--set-json", 'networkPolicy.egress.redisTo=[{"ipBlock":{"cidr":"10.20.0.0/16"}}]']
OBSERVED = sets("serviceMonitor.enabled=true", "dashboard.enabled=true", "prometheusRule.enabled=true")
OBSERVED_ELSEWHERE = OBSERVED + sets(
    "dashboard.namespace=monitoring",
    "dashboard.labels.grafana_dashboard=presence",
    "prometheusRule.labels.release=kube-prometheus-stack",
    "prometheusRule.alertLabels.team=web",
)
EVERYTHING = OBSERVED + sets(
    "autoscaling.enabled=true",
    "networkPolicy.egress.enabled=true",
    "service.headless=true",
)


@dataclass
class Scenario:
    name: str
    sets: list[str] = field(default_factory=list)
    kube: str = DEFAULT_KUBE
    store: str = "trial"  # trial | url | existing | memory
    replicas: int | None = 2  # None: the HPA owns it
    pdb: bool = True
    lint: bool = False  # helm lint too (the lint scenarios render every template)

    @property
    def values(self) -> dict[str, str]:
        """KEY: VALUE of each --set (--set-string, --set-json) pair."""
        return dict(arg.split("=", 1) for arg in self.sets[1::2])

    def on(self, key: str, default: bool = False) -> bool:
        return self.values.get(key, str(default).lower()) == "true"

    def listed(self, key: str, default: tuple = ()) -> list:
        """A list value: --set KEY={a,b} or --set-json KEY=[...]."""
        raw = self.values.get(key)
        if raw is None:
            return list(default)
        return json.loads(raw) if raw.startswith("[") else [x for x in raw.strip("{}").split(",") if x]

    @property
    def prestop_sleep(self) -> bool:  # the native sleep action needs 1.30+
        return tuple(map(int, self.kube.split(".")[:2])) >= (1, 30)


SCENARIOS = [
    Scenario("defaults", lint=True),
    Scenario("defaults on Kubernetes 1.28", kube="1.28.0"),
    Scenario("defaults on Kubernetes 1.30", kube="1.30.0"),
    Scenario("defaults on Kubernetes 1.37", kube="1.37.0"),
    Scenario("HPA", sets("autoscaling.enabled=true"), replicas=None),
    Scenario("HPA, min 1", sets("autoscaling.enabled=true", "autoscaling.minReplicas=1"), replicas=None, pdb=False),
    Scenario("one replica (no PDB)", sets("replicaCount=1"), replicas=1, pdb=False),
    Scenario("PDB switched off", sets("podDisruptionBudget.enabled=false"), pdb=False),
    Scenario("ServiceMonitor", sets("serviceMonitor.enabled=true")),
    Scenario("dashboard and alerts", OBSERVED_ELSEWHERE),
    Scenario("NetworkPolicy switched off", sets("networkPolicy.enabled=false")),
    Scenario(
        "NetworkPolicy closed (no peer)",
        sets("networkPolicy.grpcFromSameNamespace=false") + ["--set-json", "networkPolicy.metricsFromNamespaces=[]"],
    ),
    Scenario(
        "NetworkPolicy with egress, external Redis",
        EXISTING + sets("networkPolicy.egress.enabled=true") + EGRESS_TO_REDIS,
        store="existing",
    ),
    Scenario("external Redis URL", EXTERNAL, store="url"),
    Scenario(
        "Redis Sentinel",
        EXTERNAL + sets("redis.mode=sentinel", "redis.sentinelMaster=main"),
        store="url",
        lint=True,
    ),
    Scenario("existing Secret", EXISTING, store="existing", lint=True),
    Scenario("in-memory, one replica", MEMORY, store="memory", replicas=1, pdb=False, lint=True),
    Scenario("headless Service", sets("service.headless=true")),
    Scenario("everything on, Kubernetes 1.28", EVERYTHING, kube="1.28.0", replicas=None, lint=True),
    Scenario(
        "everything on, external Redis",
        EVERYTHING + EXTERNAL + EGRESS_TO_REDIS + ["--set-string", 'prometheusRule.seriesSelector=job="presence"'],
        store="url",
        replicas=None,
        lint=True,
    ),
]
MUTATION_BASE = "dashboard and alerts"

# Securing a deployment: TLS, mutual TLS, tokens, guest addresses, rediss.
TLS_EXISTING = sets("tls.enabled=true", "tls.existingSecret=presence-tls")
TLS_CERT_MANAGER = sets("tls.enabled=true", "tls.certManager.enabled=true", "tls.certManager.issuerRef.name=ca")
MTLS = sets("tls.clientCa.existingSecret=presence-clients")
TOKENS = sets("auth.existingSecret=presence-tokens")
HASHED = sets("guests.addresses=hashed", "guests.hashKeySecret=presence-guest-key")
REDISS = EXISTING + sets("redis.caSecret=presence-redis-ca")
PEERS = sets("networkPolicy.grpcFromNamespaces={web,admin}") + [
    "--set-json",
    'networkPolicy.grpcFrom=[{"namespaceSelector":{},"podSelector":{"matchLabels":{"app":"gateway"}}}]',
]
SECURE_BASE = "everything secured"
SCENARIOS += [
    Scenario("TLS from an existing Secret", TLS_EXISTING),
    Scenario("TLS from cert-manager, mutual TLS", TLS_CERT_MANAGER + MTLS),
    Scenario("tokens, no test token (no test pod)", TOKENS),
    Scenario("guests hashed", HASHED),
    Scenario("rediss with a private CA", REDISS, store="existing"),
    Scenario(
        SECURE_BASE,
        TLS_CERT_MANAGER + MTLS + TOKENS + HASHED + REDISS + PEERS + EGRESS_TO_REDIS
        + sets("tests.readTokenSecret=presence-test-token", "networkPolicy.egress.enabled=true")
        + sets("service.headless=true"),
        store="existing",
        lint=True,
    ),
]  # fmt: skip

# Values that must not render, and a piece of the message each must give.
# A few for the schema (type, pattern, enum, unknown keys); then every check
# the templates make themselves.
BAD_VALUES = [
    ("replicas as a word", sets("replicaCount=two"), "/replicaCount"),
    ("tick interval in months (5M)", sets("config.tickInterval=5M"), "/config/tickInterval"),
    ("unknown log format", sets("config.logFormat=yaml"), "/config/logFormat"),
    ("unknown Redis mode", sets("redis.mode=replica"), "/redis/mode"),
    ("key prefix with a brace", sets("config.keyPrefix=a{b}"), "/config/keyPrefix"),
    ("Redis URL without a scheme", sets("trialRedis.enabled=false", "redis.url=localhost:6379"), "/redis/url"),
    ("misspelt top-level key", sets("replicas=3"), "additional properties"),
    ("probe given its own action", sets("readinessProbe.httpGet.port=80"), "/readinessProbe"),
    ("p99 threshold of zero", sets("prometheusRule.latencyP99Seconds=0.0"), "/prometheusRule/latencyP99Seconds"),
    ("series selector not matchers", sets("prometheusRule.seriesSelector=presence"), "/prometheusRule/seriesSelector"),
    ("tick interval below 100ms", sets("config.tickInterval=50ms"), "100ms to 24h"),
    ("redis timeout above 60s", sets("config.redisTimeout=2m"), "1ms to 60s"),
    ("no store at all", sets("trialRedis.enabled=false"), "needs a store"),
    ("external URL with the trial Redis still on", sets("redis.url=redis://r:6379"), "exactly one store"),
    ("in-memory with 2 replicas", sets("trialRedis.enabled=false", "inMemory.enabled=true"), "replicaCount=1"),
    ("in-memory with autoscaling", MEMORY + sets("autoscaling.enabled=true"), "cannot autoscale"),
    ("grace period shorter than the drain", sets("terminationGracePeriodSeconds=10"), "must be longer"),
    (
        "HPA min above max",
        sets("autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=3"),
        "above autoscaling.maxReplicas",
    ),
    (
        "egress policy with external Redis and no redisTo",
        EXISTING + sets("networkPolicy.egress.enabled=true"),
        "redisTo",
    ),
    ("TLS without a certificate", sets("tls.enabled=true"), "tls.enabled needs a certificate"),
    ("cert-manager without TLS", sets("tls.certManager.enabled=true"), "set tls.enabled=true"),
    ("cert-manager without an issuer", sets("tls.enabled=true", "tls.certManager.enabled=true"), "issuerRef.name"),
    ("two certificate sources", TLS_CERT_MANAGER + sets("tls.existingSecret=x"), "two sources"),
    ("a client CA without TLS", MTLS, "needs tls.enabled=true"),
    ("hashed guests without a key", sets("guests.addresses=hashed"), "needs guests.hashKeySecret"),
    ("a hash key for plain guests", sets("guests.hashKeySecret=k"), "only with guests.addresses=hashed"),
    ("a Redis CA for the trial Redis", sets("redis.caSecret=ca"), "no TLS"),
    ("a Redis CA with a redis:// URL", EXTERNAL + sets("redis.caSecret=ca"), "rediss://"),
]


# --- Helpers over rendered manifests ----------------------------------------


def of_kind(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        d
        for d in docs
        if d.get("kind") == kind
        and (component is None or (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == component)
    ]


def selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def server(docs: list[dict]) -> tuple[dict | None, list[str]]:
    deps = of_kind(docs, "Deployment", "server")
    return (deps[0], []) if len(deps) == 1 else (None, [f"expected one presence Deployment, found {len(deps)}"])


def presence_container(dep: dict) -> dict:
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "presence")


def container_port(container: dict, name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


def pod_labels(dep: dict) -> dict:
    return dep["spec"]["template"]["metadata"]["labels"]


def tls_on(container: dict) -> bool:
    return any(e["name"] == "PRESENCE_TLS_CERT" for e in container.get("env", []))


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """Every pod spec the chart renders: workloads' templates and bare Pods."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", d["spec"]))
    return out


# --- Checks: each returns the problems it found (empty: passed) -------------


def check_schemas(docs: list[dict], sc: Scenario) -> list[str]:
    problems = []
    for d in docs:
        ident = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        try:
            kv.validate(d, sc.kube, True)
        except kv.ValidationError as e:
            problems.append(f"{ident} against Kubernetes {sc.kube}: {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError:
            if (d.get("apiVersion"), d.get("kind")) not in CRDS:
                problems.append(f"{ident}: no schema for {d.get('apiVersion')} in Kubernetes {sc.kube}")
    return problems


def check_restricted(docs: list[dict], sc: Scenario) -> list[str]:
    """The "restricted" Pod Security Standard, and a read-only root
    filesystem, for every pod the chart creates."""
    problems = []
    for ident, spec in pod_specs(docs):
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{ident}: pod securityContext lacks runAsNonRoot/seccompProfile RuntimeDefault")
        problems += [f"{ident}: {flag} is set" for flag in ("hostNetwork", "hostPID", "hostIPC") if spec.get(flag)]
        problems += [f"{ident}: hostPath volume {v['name']}" for v in spec.get("volumes") or [] if "hostPath" in v]
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            csc = c.get("securityContext") or {}
            effective = {**psc, **csc}  # the container's setting wins
            caps = csc.get("capabilities") or {}
            for broken, what in (
                (effective.get("runAsNonRoot") is not True, "runAsNonRoot is not true"),
                (not isinstance(effective.get("runAsUser"), int) or effective["runAsUser"] == 0, "runs as root"),
                (effective.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"), "no seccomp"),
                (csc.get("allowPrivilegeEscalation") is not False, "allowPrivilegeEscalation is not false"),
                (bool(csc.get("privileged")), "privileged"),
                ("ALL" not in (caps.get("drop") or []), "capabilities do not drop ALL"),
                (bool(set(caps.get("add") or []) - {"NET_BIND_SERVICE"}), f"adds capabilities {caps.get('add')}"),
                (csc.get("readOnlyRootFilesystem") is not True, "root filesystem is writable"),
            ):
                if broken:
                    problems.append(f"{ident} container {c['name']}: {what}")
    return problems or ([] if pod_specs(docs) else ["no pod specs rendered"])


def check_probes(docs: list[dict], sc: Scenario) -> list[str]:
    dep, problems = server(docs)
    if not dep:
        return problems
    c = presence_container(dep)
    # With TLS on the gRPC port, the kubelet (no TLS, no token) must call the
    # plaintext health port instead.
    port, which = (container_port(c, "health"), "health") if tls_on(c) else (container_port(c, "grpc"), "gRPC")
    want = {"startupProbe": LIVENESS_SERVICE, "livenessProbe": LIVENESS_SERVICE, "readinessProbe": READINESS_SERVICE}
    for probe, service in want.items():
        g = (c.get(probe) or {}).get("grpc")
        if not g or {"httpGet", "tcpSocket", "exec"} & set(c[probe]):
            problems.append(f"{probe} is not a native gRPC probe: {c.get(probe)}")
        elif not port or g.get("port") != port or container_port(c, "grpc") != GRPC_PORT:
            problems.append(f"{probe} probes port {g.get('port')}, the {which} port is {port}")
        elif g.get("service") != service:
            problems.append(f"{probe} asks for service {g.get('service')!r}, want {service!r}")
    return problems


def check_rollout(docs: list[dict], sc: Scenario) -> list[str]:
    dep, problems = server(docs)
    if not dep:
        return problems
    spec, pod, c = dep["spec"], dep["spec"]["template"]["spec"], presence_container(dep)
    ru = spec.get("strategy", {}).get("rollingUpdate") or {}
    if spec.get("strategy", {}).get("type") != "RollingUpdate" or ru.get("maxUnavailable") not in (0, "0%"):
        problems.append(f"strategy {spec.get('strategy')}: a rollout would drop capacity")
    if not ru.get("maxSurge"):
        problems.append("maxSurge is 0: with maxUnavailable 0 the rollout could never progress")
    if sc.replicas is None and "replicas" in spec:
        problems.append("the HPA owns the replica count, but the Deployment sets replicas")
    elif sc.replicas is not None and spec.get("replicas") != sc.replicas:
        problems.append(f"replicas is {spec.get('replicas')}, want {sc.replicas}")

    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    grace = int(str(env.get("PRESENCE_SHUTDOWN_GRACE", "0s")).rstrip("s") or 0)
    pre_stop = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
    tgps = pod.get("terminationGracePeriodSeconds")
    if not isinstance(tgps, int) or tgps <= grace + pre_stop:
        problems.append(f"terminationGracePeriodSeconds {tgps!r} does not exceed preStop {pre_stop}s + drain {grace}s")
    if sc.prestop_sleep != bool(pre_stop):
        problems.append(f"preStop sleep of {pre_stop}s on Kubernetes {sc.kube}: wanted from 1.30 on, refused before")
    if pod.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks is not false: Services would inject PRESENCE_* variables")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("the service account token is mounted, though Presence never calls the API")
    spread = pod.get("topologySpreadConstraints") or []
    if "kubernetes.io/hostname" not in {t.get("topologyKey") for t in spread}:
        problems.append("no topology spread across nodes")
    for t in spread:
        if not selects(t.get("labelSelector", {}).get("matchLabels", {}), pod_labels(dep)):
            problems.append(f"spread on {t.get('topologyKey')} does not select the pods")
    if not selects(spec["selector"]["matchLabels"], pod_labels(dep)):
        problems.append("the Deployment's selector does not match its pods")
    res = c.get("resources", {})
    if not res.get("requests", {}).get("cpu") or not res.get("limits", {}).get("memory"):
        problems.append("no CPU request or memory limit")
    return problems


def check_env(docs: list[dict], sc: Scenario, known: set[str]) -> list[str]:
    """Every variable the chart sets is one the service reads, and the
    listeners are on the container's ports."""
    dep, problems = server(docs)
    if not dep:
        return problems
    c = presence_container(dep)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    unknown = {n for n in env if n.startswith("PRESENCE_") or n == "RUST_LOG"} - known
    if unknown:
        problems.append(f"variables the service does not read: {sorted(unknown)}")
    listeners = [("PRESENCE_LISTEN", "grpc"), ("PRESENCE_METRICS_LISTEN", "metrics")]
    if "PRESENCE_HEALTH_LISTEN" in env or container_port(c, "health"):
        listeners.append(("PRESENCE_HEALTH_LISTEN", "health"))
    for var, port in listeners:
        if not str(env.get(var)).endswith(f":{container_port(c, port)}"):
            problems.append(f"{var} {env.get(var)!r} is not the {port!r} container port")
    if env.get("PRESENCE_REDIS_MODE") == "sentinel" and not env.get("PRESENCE_REDIS_SENTINEL_MASTER"):
        problems.append("sentinel mode without PRESENCE_REDIS_SENTINEL_MASTER")
    return problems


def check_store(docs: list[dict], sc: Scenario) -> list[str]:
    """The Redis URL always comes from a secretKeyRef, to a Secret holding
    the right URL; nothing at all for the in-memory store."""
    dep, problems = server(docs)
    if not dep:
        return problems
    url_env = next((e for e in presence_container(dep).get("env", []) if e["name"] == "PRESENCE_REDIS_URL"), None)
    secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    trial = of_kind(docs, "Deployment", "trial-redis")
    checksum = "checksum/redis-secret" in (dep["spec"]["template"]["metadata"].get("annotations") or {})
    if sc.store == "memory":
        return ["in-memory store, yet a Redis URL, Secret or trial Redis"] if url_env or secrets or trial else []
    ref = ((url_env or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref or "value" in url_env:
        return [f"PRESENCE_REDIS_URL does not come from a secretKeyRef alone: {url_env}"]
    if sc.store == "existing":
        if (ref.get("name"), ref.get("key")) != ("presence-redis", "url"):
            problems.append(f"secretKeyRef is {ref}, want the existing Secret presence-redis, key url")
        if secrets or checksum:
            problems.append("existingSecret given, yet the chart renders (or hashes) a Secret of its own")
        return problems
    raw = (secrets.get(ref.get("name"), {}).get("data") or {}).get(ref.get("key"))
    url = decode(raw) if raw else None
    if not checksum:
        problems.append("no checksum/redis-secret annotation: a new URL would not roll the pods")
    if sc.store == "url":
        if url != EXTERNAL_URL or trial:
            problems.append(f"the Secret holds {url!r}, not redis.url (or the trial Redis is rendered too)")
        return problems
    rsvc = of_kind(docs, "Service", "trial-redis")
    if len(trial) != 1 or len(rsvc) != 1:
        return problems + [f"expected one trial Redis Deployment and Service, found {len(trial)} and {len(rsvc)}"]
    host = f"{rsvc[0]['metadata']['name']}.{NAMESPACE}.svc"
    if url != f"redis://{host}:6379/0":
        problems.append(f"the Secret holds {url!r}, not the trial Redis' Service {host}:6379")
    selector = rsvc[0]["spec"]["selector"]
    if not selects(selector, pod_labels(trial[0])) or selects(selector, pod_labels(dep)):
        problems.append("the trial Redis Service does not select exactly the trial Redis pod")
    args = trial[0]["spec"]["template"]["spec"]["containers"][0].get("args", [])
    flags = dict(zip(args[::2], args[1::2]))
    if (flags.get("--save"), flags.get("--appendonly")) != ("", "no"):
        problems.append(f'the trial Redis keeps data: args {args}, want --save "" --appendonly no')
    if trial[0]["spec"].get("replicas") != 1:
        problems.append("trial Redis must be exactly one pod")
    return problems


def check_service(docs: list[dict], sc: Scenario) -> list[str]:
    dep, problems = server(docs)
    if not dep:
        return problems
    svcs = [s for s in of_kind(docs, "Service", "server") if s["spec"].get("clusterIP") != "None"]
    headless = [s for s in of_kind(docs, "Service", "server") if s["spec"].get("clusterIP") == "None"]
    if len(svcs) != 1 or svcs[0]["spec"].get("type") != "ClusterIP":
        return problems + [f"expected one ClusterIP Service for presence, found {len(svcs)}"]
    ports = {p.get("name"): p for p in svcs[0]["spec"]["ports"]}
    grpc, metrics = ports.get("grpc") or {}, ports.get("metrics") or {}
    cleartext = ("kubernetes.io/h2c", "grpc")  # meshes would speak cleartext HTTP/2 to a TLS port
    tls = tls_on(presence_container(dep))
    for s in svcs + headless:
        p = next((p for p in s["spec"]["ports"] if p.get("name") == "grpc"), {})
        if not p.get("appProtocol") or (p["appProtocol"] in cleartext) == tls:
            problems.append(f"{s['metadata']['name']}: grpc appProtocol {p.get('appProtocol')!r} with TLS {tls}")
    if grpc.get("targetPort") not in ("grpc", GRPC_PORT) or grpc.get("port") != GRPC_PORT:
        problems.append(f"grpc port maps {grpc.get('port')} -> {grpc.get('targetPort')}")
    if metrics.get("targetPort") not in ("metrics", METRICS_PORT):
        problems.append(f"metrics port targets {metrics.get('targetPort')}")
    if sc.on("service.headless") != bool(headless):
        problems.append(f"headless Service rendered: {bool(headless)}, expected: {sc.on('service.headless')}")
    for s in svcs + headless:
        if not selects(s["spec"]["selector"], pod_labels(dep)):
            problems.append(f"Service {s['metadata']['name']} does not select the presence pods")
    return problems


def present(docs: list[dict], kind: str, wanted: bool) -> list[str]:
    found = of_kind(docs, kind)
    return [] if wanted == bool(found) else [f"{kind} rendered: {bool(found)}, expected: {wanted}"]


def check_optional(docs: list[dict], sc: Scenario) -> list[str]:
    """HPA and PDB: present exactly when expected, pointing at the right
    things."""
    dep, problems = server(docs)
    if not dep:
        return problems
    labels = pod_labels(dep)
    problems += present(docs, "HorizontalPodAutoscaler", sc.on("autoscaling.enabled"))
    for h in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
            problems.append(f"HPA scales {ref}, not the presence Deployment")
    problems += present(docs, "PodDisruptionBudget", sc.pdb)
    for p in of_kind(docs, "PodDisruptionBudget"):
        if not selects(p["spec"]["selector"]["matchLabels"], labels):
            problems.append("the PDB does not select the presence pods")
    return problems


def peer(p: dict) -> str:
    """A NetworkPolicyPeer in words: the namespace(s), then the pods."""
    if "ipBlock" in p:
        return f"ipBlock {p['ipBlock'].get('cidr')}"
    ns, pods = p.get("namespaceSelector"), p.get("podSelector") or {}
    if ns is None:
        where = f"namespace {NAMESPACE}"  # the policy's own
    elif not (ns.get("matchLabels") or ns.get("matchExpressions")):
        where = "every namespace"
    elif not ns.get("matchExpressions") and list(ns["matchLabels"]) == ["kubernetes.io/metadata.name"]:
        where = f"namespace {ns['matchLabels']['kubernetes.io/metadata.name']}"
    else:
        where = f"namespaces {json.dumps(ns, sort_keys=True)}"
    everyone = not (pods.get("matchLabels") or pods.get("matchExpressions"))
    return where if everyone else f"{where}, pods {json.dumps(pods, sort_keys=True)}"


def check_network_policy(docs: list[dict], sc: Scenario) -> list[str]:
    """On unless switched off. The presence pods' gRPC and metrics ports let
    in exactly the peers the values list (by default: the release's
    namespace, and `monitoring` for metrics), a port with no peer closed and
    none open to everyone; egress, when restricted, to DNS and Redis; the
    trial Redis (no password) reachable by the presence pods alone."""
    dep, problems = server(docs)
    if not dep:
        return problems
    labels = pod_labels(dep)
    nps = of_kind(docs, "NetworkPolicy")
    problems += present(docs, "NetworkPolicy", sc.on("networkPolicy.enabled", True))
    grpc = {f"namespace {NAMESPACE}"} if sc.on("networkPolicy.grpcFromSameNamespace", True) else set()
    grpc |= {f"namespace {n}" for n in sc.listed("networkPolicy.grpcFromNamespaces")}
    grpc |= {peer(p) for p in sc.listed("networkPolicy.grpcFrom")}
    metrics = {f"namespace {n}" for n in sc.listed("networkPolicy.metricsFromNamespaces", ("monitoring",))}
    metrics |= {peer(p) for p in sc.listed("networkPolicy.metricsFrom")}
    want = {port: peers for port, peers in (("grpc", grpc), ("metrics", metrics)) if peers}
    own = [n for n in nps if selects(n["spec"]["podSelector"]["matchLabels"], labels)]
    if nps and len(own) != 1:
        problems.append(f"{len(own)} NetworkPolicies select the presence pods, want 1")
    elif own:
        spec = own[0]["spec"]
        opened: dict[str, set[str]] = {}
        for rule in spec.get("ingress") or []:
            peers = {peer(p) for p in rule.get("from") or []} or {"every peer"}
            for p in rule.get("ports") or [{}]:
                opened.setdefault(str(p.get("port", "every port")), set()).update(peers)
        if "Ingress" not in spec.get("policyTypes", []):
            problems.append("the presence NetworkPolicy does not restrict ingress (policyTypes)")
        if opened != want:
            problems.append(f"the presence pods let in {opened or 'no one'}, want {want or 'no one'}")
        egress = sc.on("networkPolicy.egress.enabled")
        if ("Egress" in spec.get("policyTypes", [])) != egress:
            problems.append(f"egress restricted: {not egress}, expected: {egress}")
        allowed = {(p.get("port"), p.get("protocol")) for r in spec.get("egress", []) for p in r.get("ports", [])}
        if egress and not {(53, "UDP"), (6379, "TCP")} <= allowed:
            problems.append(f"egress allows {sorted(allowed, key=str)}, not DNS and Redis")
    trial = of_kind(docs, "Deployment", "trial-redis")
    if nps and trial:
        guard = [n for n in nps if selects(n["spec"]["podSelector"]["matchLabels"], pod_labels(trial[0]))]
        peers = [p for n in guard for r in n["spec"].get("ingress", []) for p in r.get("from", [])]
        if len(guard) != 1 or not peers or not all(
            selects(p.get("podSelector", {}).get("matchLabels", {}), labels) and "namespaceSelector" not in p
            for p in peers
        ):
            problems.append("the trial Redis (no password) is not reachable by the presence pods alone")
    return problems


def feature_secrets(sc: Scenario) -> dict[str, str | None]:
    """The file variables of the security features, each with the Secret it
    must be read from (None: the feature is off and the variable unset)."""
    v = sc.values
    tls = v.get("tls.existingSecret") or (f"{FULLNAME}-tls" if sc.on("tls.certManager.enabled") else None)
    return {
        "PRESENCE_TLS_CERT": tls,
        "PRESENCE_TLS_KEY": tls,
        "PRESENCE_TLS_CLIENT_CA": v.get("tls.clientCa.existingSecret"),
        "PRESENCE_AUTH_TOKENS_FILE": v.get("auth.existingSecret"),
        "PRESENCE_GUEST_HASH_KEY_FILE": v.get("guests.hashKeySecret"),
        "PRESENCE_REDIS_CA": v.get("redis.caSecret"),
    }


def mounted_secret(pod: dict, container: dict, path: str) -> tuple[str | None, list[str]]:
    """The Secret a file is read from, and what is wrong with its mount: a
    subPath mount never sees the kubelet's updates (a renewed certificate, a
    rotated token), and a Secret file should not be readable by others."""
    mounts = [m for m in container.get("volumeMounts", []) if f"{path}/".startswith(m["mountPath"].rstrip("/") + "/")]
    if len(mounts) != 1:
        return None, [f"{path} is not in exactly one mounted volume"]
    problems = [f"{path}: mounted with subPath, so updates never reach the process"] if {
        "subPath", "subPathExpr"} & set(mounts[0]) else []  # fmt: skip
    secret = next((v for v in pod.get("volumes", []) if v["name"] == mounts[0]["name"]), {}).get("secret")
    if not secret:
        return None, problems + [f"{path}: volume {mounts[0]['name']} is not a Secret"]
    if secret.get("defaultMode", 0o644) & 0o007:
        problems.append(f"{path}: Secret volume mode {oct(secret.get('defaultMode', 0o644))} is readable by others")
    return secret.get("secretName"), problems


def check_security(docs: list[dict], sc: Scenario) -> list[str]:
    """TLS, mutual TLS, tokens, the guest hash key and the Redis CA: each
    variable set only when its feature is on, to a file of the right Secret,
    mounted as a directory; with TLS a health port no Service exposes, and
    (cert-manager) a Certificate for the Secret the pods read naming every
    Service; the helm test pod speaking TLS and sending the read token, or
    not rendered when tokens are on and it has none."""
    dep, problems = server(docs)
    if not dep:
        return problems
    pod, c = dep["spec"]["template"]["spec"], presence_container(dep)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    secrets = feature_secrets(sc)
    for var, secret in secrets.items():
        if not secret or not env.get(var):
            if secret:
                problems.append(f"{var} is not set, though its feature is on (Secret {secret})")
            elif var in env:
                problems.append(f"{var} is set, though its feature is off")
            continue
        name, found = mounted_secret(pod, c, env[var])
        problems += found + ([] if name == secret else [f"{var} is read from Secret {name!r}, want {secret!r}"])
    guests = sc.values.get("guests.addresses", "plain")
    if env.get("PRESENCE_GUEST_ADDRESSES") != guests:
        problems.append(f"PRESENCE_GUEST_ADDRESSES is {env.get('PRESENCE_GUEST_ADDRESSES')!r}, want {guests!r}")

    tls, health = secrets["PRESENCE_TLS_CERT"], container_port(c, "health")
    if bool(tls) != bool(health):
        problems.append(f"health port {health}, with TLS from {tls!r}")
    servers = of_kind(docs, "Service", "server")
    for s in servers:
        if any(p.get("name") == "health" or p.get("targetPort") in ("health", health) for p in s["spec"]["ports"]):
            problems.append(f"Service {s['metadata']['name']} exposes the health port")
    certs = of_kind(docs, "Certificate")
    problems += present(docs, "Certificate", sc.on("tls.certManager.enabled"))
    for cert in certs:
        spec = cert.get("spec") or {}
        problems += [f"Certificate: no field {k} in cert-manager's" for k in sorted(set(spec) - CERTIFICATE_FIELDS)]
        if spec.get("secretName") != tls:
            problems.append(f"the Certificate writes Secret {spec.get('secretName')!r}, the pods read {tls!r}")
        names = spec.get("dnsNames") or []
        problems += [
            f"the Certificate does not name Service {s['metadata']['name']}"
            for s in servers
            if f"{s['metadata']['name']}.{NAMESPACE}.svc" not in names
        ]
        issuer = spec.get("issuerRef") or {}
        if not issuer.get("name") or issuer.get("kind") not in ("Issuer", "ClusterIssuer"):
            problems.append(f"the Certificate's issuerRef {issuer} names no Issuer or ClusterIssuer")

    tokens, read_token = secrets["PRESENCE_AUTH_TOKENS_FILE"], sc.values.get("tests.readTokenSecret")
    tests = of_kind(docs, "Pod", "test")
    if bool(tests) != bool(read_token or not tokens):
        problems.append(f"{len(tests)} helm test pods, with tokens {tokens!r} and test token {read_token!r}")
    for t in tests:
        tc = t["spec"]["containers"][0]
        args = tc.get("args", [])
        if ("-plaintext" in args) == bool(tls) or f"{FULLNAME}:{GRPC_PORT}" not in args:
            problems.append(f"the test pod calls {args}, with TLS from {tls!r}")
        token = next((e for e in tc.get("env", []) if e["name"] == "PRESENCE_TEST_TOKEN"), {})
        ref = (token.get("valueFrom") or {}).get("secretKeyRef") or {}
        sends = "-expand-headers" in args and "authorization: Bearer ${PRESENCE_TEST_TOKEN}" in args
        if tokens and (not sends or ref.get("name") != read_token):
            problems.append(f"the test pod does not send the read token of Secret {read_token!r}")
    return problems


def check_monitoring(docs: list[dict], sc: Scenario, chart: Path) -> list[str]:
    """ServiceMonitor, dashboard ConfigMap and PrometheusRule: present
    exactly when asked for; scraping the metrics port; the dashboard as
    Grafana's sidecar loads it, every query on its data source variable and
    scoped to one release; every rule well formed and scoped to the
    release's series."""
    values = sc.values
    problems = present(docs, "ServiceMonitor", sc.on("serviceMonitor.enabled"))
    for sm in of_kind(docs, "ServiceMonitor"):
        match = sm["spec"]["selector"]["matchLabels"]
        svcs = [s for s in of_kind(docs, "Service") if selects(match, s["metadata"]["labels"])]
        if len([s for s in svcs if any(p.get("name") == "metrics" for p in s["spec"]["ports"])]) != 1:
            problems.append("the ServiceMonitor does not reach exactly one Service with a metrics port")
        endpoints = sm["spec"].get("endpoints") or [{}]
        if any((ep.get("port"), ep.get("path")) != ("metrics", "/metrics") for ep in endpoints):
            problems.append(f"ServiceMonitor endpoints {endpoints} are not port metrics, path /metrics")

    maps = [c for c in of_kind(docs, "ConfigMap") if any(k.endswith(".json") for k in c.get("data", {}))]
    problems += [] if sc.on("dashboard.enabled") == bool(maps) else [f"dashboard ConfigMaps: {len(maps)}"]
    for cm in maps:
        label = values.get("dashboard.labels.grafana_dashboard", "1")
        if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") != label:
            problems.append(f"the dashboard ConfigMap lacks the sidecar's label grafana_dashboard: {label!r}")
        if cm["metadata"].get("namespace") != values.get("dashboard.namespace", NAMESPACE):
            problems.append(f"the dashboard ConfigMap is in namespace {cm['metadata'].get('namespace')!r}")
        (name, text), *more = cm["data"].items()
        dashboard = json.loads(text)
        if more or dashboard != json.loads((chart / "dashboards" / name).read_text()):
            problems.append(f"the ConfigMap does not hold dashboards/{name} alone, unchanged")
        problems += dashboard_problems(dashboard)

    problems += present(docs, "PrometheusRule", sc.on("prometheusRule.enabled"))
    want = {"job": FULLNAME, "namespace": NAMESPACE}
    if "prometheusRule.seriesSelector" in values:
        want = dict(re.findall(r'(\w+)="([^"]*)"', values["prometheusRule.seriesSelector"]))
    for pr in of_kind(docs, "PrometheusRule"):
        extra = {k.split(".")[-1]: v for k, v in values.items() if k.startswith("prometheusRule.labels.")}
        if not extra.items() <= pr["metadata"]["labels"].items():
            problems.append(f"the PrometheusRule lacks the labels {extra} the operator selects it by")
        alert_labels = {k.split(".")[-1]: v for k, v in values.items() if k.startswith("prometheusRule.alertLabels.")}
        problems += rule_problems(pr["spec"], want, alert_labels)
    return problems


def dashboard_problems(dashboard: dict) -> list[str]:
    problems = []
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if (ds.get("type"), ds.get("query")) != ("datasource", "prometheus"):
        problems.append("no data source variable `datasource` of type prometheus")
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        problems.append(f"panel ids repeat: {ids}")
    for p in panels:
        if p["type"] == "row":
            continue
        for owner in [p, *p.get("targets", [])]:
            if owner.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                problems.append(f"[{p['title']}] data source {owner.get('datasource')}, not the variable")
        if not p.get("targets"):
            problems.append(f"[{p['title']}] has no query")
        for t in p.get("targets", []):
            for s in selectors(t["expr"]):
                if not (s.has("namespace", "=", "$namespace") and s.has("job", "=", "$job")):
                    problems.append(f"[{p['title']}] {s.text()} is not scoped to $namespace and $job")
    return problems


def rule_problems(spec: dict, want: dict[str, str], alert_labels: dict[str, str]) -> list[str]:
    problems = []
    groups = spec.get("groups") or []
    if not groups or len({g.get("name") for g in groups}) != len(groups):
        problems.append("no rule groups, or group names repeat")
    for g in groups:
        recorded = {r["record"] for r in g.get("rules", []) if "record" in r}
        for r in g.get("rules") or [{}]:
            name = r.get("alert") or r.get("record")
            if ("alert" in r) == ("record" in r) or not isinstance(r.get("expr"), str) or not r["expr"].strip():
                problems.append(f"rule {name}: needs one of alert or record, and an expr")
                continue
            if "for" in r and not PROM_DURATION.match(str(r["for"])):
                problems.append(f"rule {name}: for {r['for']!r} is not a Prometheus duration")
            for key in ("labels", "annotations"):
                if not all(isinstance(v, str) for v in (r.get(key) or {}).values()):
                    problems.append(f"rule {name}: {key} must be strings")
            if "alert" in r:
                labels, notes = r.get("labels") or {}, r.get("annotations") or {}
                if labels.get("severity") not in SEVERITIES or alert_labels.items() - labels.items():
                    problems.append(f"alert {name}: labels {labels} lack a severity or {alert_labels}")
                if not notes.get("summary") or name not in notes.get("description", ""):
                    problems.append(f"alert {name}: needs a summary, and a description naming its runbook")
            for s in selectors(r["expr"]):
                if s.metric not in recorded and not all(s.has(k, "=", v) for k, v in want.items()):
                    problems.append(f"rule {name}: {s.text()} is not scoped to {want}")
    return problems


def decode(value: str) -> str:
    return base64.b64decode(value).decode()


def check_secrecy(docs: list[dict], sc: Scenario, text: str) -> list[str]:
    """The external URL (with its password) appears only base64-encoded, in
    one Secret."""
    if sc.store != "url":
        return []
    problems = ["the Redis password appears in clear in the render"] if "s3cret-Pa55" in text else []
    holders = [s for s in of_kind(docs, "Secret") if EXTERNAL_URL in map(decode, (s.get("data") or {}).values())]
    return problems + ([] if len(holders) == 1 else [f"the URL is in {len(holders)} Secrets, not one"])


# --- NOTES.txt and the README ------------------------------------------------


def check_notes(helm: Helm, repo: Path) -> list[str]:
    """The commands NOTES.txt prints name real Services, ports, Deployments,
    RPCs and fields, and it never prints the Redis URL."""
    problems = []
    proto = (repo / "proto/presence/v1/presence.proto").read_text()
    rpcs = set(re.findall(r"rpc\s+(\w+)\s*\(", proto))
    fields = set(re.findall(r"^\s*(?:repeated\s+)?\w+\s+(\w+)\s*=\s*\d+;", proto, re.MULTILINE))
    for values, label in ((EXTERNAL, "external URL"), ([], "defaults"), (EXISTING, "existing Secret")):
        rc, notes = helm.notes(values)
        if rc != 0:
            problems.append(f"{label}: helm install --dry-run failed: {notes.strip()[:200]}")
            continue
        if "s3cret-Pa55" in notes or "redis.prod.internal" in notes:
            problems.append(f"{label}: NOTES print the Redis URL")
        rendered = load_docs(helm.template(values).stdout)
        svc_names = {s["metadata"]["name"] for s in of_kind(rendered, "Service", "server")}
        pf = re.search(r"kubectl --namespace (\S+) port-forward service/(\S+) (\d+):(\d+) (\d+):(\d+)", notes)
        if not pf or (pf[1], int(pf[4]), int(pf[6])) != (NAMESPACE, GRPC_PORT, METRICS_PORT) or pf[2] not in svc_names:
            problems.append(f"{label}: no `kubectl port-forward` to a rendered Service's ports")
        rs = re.search(r"rollout status deployment/(\S+)", notes)
        if not rs or rs[1] not in {d["metadata"]["name"] for d in of_kind(rendered, "Deployment", "server")}:
            problems.append(f"{label}: rollout status names no rendered Deployment")
        calls = re.findall(r"grpcurl -plaintext (?:-d '([^']*)' )?127\.0\.0\.1:50051 (\S+)", notes)
        if ("", "list") not in calls:
            problems.append(f"{label}: no `grpcurl ... list`")
        for body, method in calls:
            service, _, rpc = method.partition("/")
            ok = {"presence.v1.Presence": rpc in rpcs, "grpc.health.v1.Health": rpc == "Check"}.get(service)
            if method != "list" and not ok:
                problems.append(f"{label}: NOTES call {method}, which the service does not have")
            try:
                keys = set(json.loads(body or "{}"))
            except json.JSONDecodeError:
                problems.append(f"{label}: request body {body!r} is not JSON")
                continue
            if service == "presence.v1.Presence" and keys - fields:
                problems.append(f"{label}: {method} body has fields {sorted(keys - fields)} not in the proto")
    return problems


def leaf_keys(values: dict, schema: dict, prefix: str = "") -> list[str]:
    """The values a user sets one by one: maps with their own properties in
    the schema are opened, free-form maps (labels, resources) are one."""
    out = []
    for k, v in values.items():
        props = (schema.get("properties") or {}).get(k, {})
        if isinstance(v, dict) and v and props.get("properties"):
            out += leaf_keys(v, props, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def check_readme(chart: Path, values: dict, schema: dict, alerts: list[str], readme: str | None = None) -> list[str]:
    """Every value has a row in the Values table with the default of
    values.yaml, and every alert a runbook."""
    readme = readme if readme is not None else (chart / "README.md").read_text()
    table = readme.split("\n## Values\n", 1)[-1]
    rows = dict(re.findall(r"^\| `([^`]+)` \| [^|]+ \| ([^|]+) \|", table, re.MULTILINE))
    keys = leaf_keys(values, schema)
    problems = [f"values key {k} is not in the README's table" for k in keys if k not in rows]
    problems += [f"README documents {k}, which values.yaml does not have" for k in rows if k not in keys]
    for k, default in rows.items():
        if k in keys and default.strip().startswith("`"):  # else "see values.yaml"
            actual = values
            for part in k.split("."):
                actual = actual[part]
            try:
                if json.loads(default.strip().strip("`")) != actual:
                    problems.append(f"README says {k} defaults to {default.strip()}, values.yaml has {actual!r}")
            except json.JSONDecodeError:
                problems.append(f"README default of {k} is not JSON: {default}")
    runbooks = set(re.findall(r"^#### (\w+)$", readme, re.MULTILINE))
    problems += [f"alert {a} has no runbook (#### {a})" for a in alerts if a not in runbooks]
    problems += [f"runbook {r} is for no alert" for r in runbooks - set(alerts)]
    return problems


# --- Self-tests: every check can fail ---------------------------------------


def mutations() -> dict[str, list[tuple[str, str, object]]]:
    """For each base scenario: (what is broken, which check must notice, how
    to break its render)."""

    def one(ds, kind, component=None):
        return of_kind(ds, kind, component)[0]

    def pod(ds, component="server"):
        return one(ds, "Deployment", component)["spec"]["template"]["spec"]

    def cont(ds):
        return pod(ds)["containers"][0]

    def env(ds, name):
        return next(e for e in cont(ds)["env"] if e["name"] == name)

    def panel(ds, edit):
        cm = one(ds, "ConfigMap")
        dashboard = json.loads(cm["data"]["presence.json"])
        edit(next(p for p in dashboard["panels"] if p["type"] != "row"))
        cm["data"]["presence.json"] = json.dumps(dashboard)

    def not_serving(ds):
        rules = one(ds, "PrometheusRule")["spec"]["groups"][0]["rules"]
        return next(r for r in rules if r.get("alert") == "PresenceNotServing")

    def unscoped(p):
        p["targets"][0]["expr"] = p["targets"][0]["expr"].replace(', job="$job"', "")

    def probe(ds, name):
        return cont(ds)[name]["grpc"]

    def security_context(ds, component="server"):
        return pod(ds, component)["containers"][0]["securityContext"]

    def mount(ds, name):
        return next(m for m in cont(ds)["volumeMounts"] if m["name"] == name)

    def volume(ds, name):
        return next(v for v in pod(ds)["volumes"] if v["name"] == name)["secret"]

    def ingress(ds, port, component="server"):
        return next(r for r in one(ds, "NetworkPolicy", component)["spec"]["ingress"] if r["ports"][0]["port"] == port)

    def policy_types(ds, types):
        one(ds, "NetworkPolicy", "server")["spec"]["policyTypes"] = types

    def probes_on_grpc(ds):
        for name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe(ds, name).update(port=GRPC_PORT)

    def test_args(ds, edit):
        c = one(ds, "Pod", "test")["spec"]["containers"][0]
        c["args"] = edit(c["args"])

    probes, security, rollout, monitoring = "gRPC probes", "restricted security context", "rollout", "monitoring"
    policy, secured = "NetworkPolicy", "TLS, tokens and Secret files"
    tokens = {"name": "PRESENCE_AUTH_TOKENS_FILE", "value": "/etc/presence/auth/tokens"}
    plain = [
        ('readiness asks for service ""', probes, lambda ds: probe(ds, "readinessProbe").update(service="")),
        ("liveness asks for Presence", probes, lambda ds: probe(ds, "livenessProbe").update(service=READINESS_SERVICE)),
        ("readiness on the metrics port", probes, lambda ds: probe(ds, "readinessProbe").update(port=METRICS_PORT)),
        ("startup probe over HTTP", probes, lambda ds: cont(ds).update(startupProbe={"httpGet": {"port": 9090}})),
        ("Redis URL as a plain value", "Redis URL source", lambda ds: env(ds, "PRESENCE_REDIS_URL").update(value="x")),
        ("capabilities not dropped", security, lambda ds: security_context(ds)["capabilities"].update(drop=[])),
        ("writable root filesystem", security, lambda ds: security_context(ds).update(readOnlyRootFilesystem=False)),
        ("trial Redis as root", security, lambda ds: security_context(ds, "trial-redis").update(runAsUser=0)),
        ("rollout may drop a pod", rollout, lambda ds: server(ds)[0]["spec"].update(strategy={"type": "Recreate"})),
        ("grace period shorter than the drain", rollout, lambda ds: pod(ds).update(terminationGracePeriodSeconds=10)),
        ("misspelt variable", "environment", lambda ds: env(ds, "PRESENCE_TICK_INTERVAL").update(name="PRESENCE_TICK")),
        ("no appProtocol", "Services", lambda ds: one(ds, "Service", "server")["spec"]["ports"][0].pop("appProtocol")),
        ("unknown field in a pod spec", "Kubernetes API schemas", lambda ds: pod(ds).update(terminationGracePeriod=30)),
        ("PDB missing with 2 replicas", "optional resources", lambda ds: ds.remove(one(ds, "PodDisruptionBudget"))),
        ("no label for the sidecar", monitoring, lambda ds: one(ds, "ConfigMap")["metadata"].pop("labels")),
        ("a panel on a fixed data source", monitoring, lambda ds: panel(ds, lambda p: p.update(datasource={}))),
        ("a panel over every job", monitoring, lambda ds: panel(ds, unscoped)),
        ("a rule over every namespace", monitoring, lambda ds: not_serving(ds).update(expr="presence_ready == 0")),
        ("an alert without severity", monitoring, lambda ds: not_serving(ds)["labels"].pop("severity")),
        ("a duration Prometheus cannot read", monitoring, lambda ds: not_serving(ds).update({"for": "2 minutes"})),
        ("ServiceMonitor without endpoint", monitoring, lambda ds: one(ds, "ServiceMonitor")["spec"].pop("endpoints")),
        ("NetworkPolicy missing", policy, lambda ds: ds.remove(one(ds, "NetworkPolicy", "server"))),
        ("metrics open to every namespace", policy, lambda ds: ingress(ds, "metrics")["from"].append(
            {"namespaceSelector": {}})),
        ("ingress not restricted", policy, lambda ds: policy_types(ds, ["Egress"])),
        ("trial Redis open to its namespace", policy, lambda ds: ingress(ds, "redis", "trial-redis")["from"][0].update(
            podSelector={})),
        ("a token file with tokens off", secured, lambda ds: cont(ds)["env"].append(tokens)),
    ]
    secure = [
        ("probes left on the gRPC port with TLS", probes, probes_on_grpc),
        ("the gRPC port open to every pod", policy, lambda ds: ingress(ds, "grpc").pop("from")),
        ("the TLS Secret mounted with subPath", secured, lambda ds: mount(ds, "tls").update(subPath="tls.crt")),
        ("the token file mounted with subPath", secured, lambda ds: mount(ds, "auth").update(subPath="tokens")),
        ("the hash key readable by all", secured, lambda ds: volume(ds, "guest-key").update(defaultMode=0o444)),
        ("the client CA from another Secret", secured, lambda ds: volume(ds, "client-ca").update(secretName="other")),
        ("the Service exposes the health port", secured, lambda ds: one(ds, "Service")["spec"]["ports"].append(
            {"name": "health", "port": 8081, "targetPort": "health"})),
        ("a TLS port announced as h2c", "Services", lambda ds: one(ds, "Service")["spec"]["ports"][0].update(
            appProtocol="kubernetes.io/h2c")),
        ("the Certificate for another Secret", secured, lambda ds: one(ds, "Certificate")["spec"].update(
            secretName="x")),
        ("a misspelt Certificate field", secured, lambda ds: one(ds, "Certificate")["spec"].update(dnsName=["x"])),
        ("the headless Service not in the Certificate", secured, lambda ds: one(ds, "Certificate")["spec"].update(
            dnsNames=[n for n in one(ds, "Certificate")["spec"]["dnsNames"] if "headless" not in n])),
        ("the test pod in plaintext", secured, lambda ds: test_args(ds, lambda a: ["-plaintext", *a[1:]])),
        ("the test pod without its token", secured, lambda ds: test_args(
            ds, lambda a: [x for x in a if "Bearer" not in x])),
    ]
    return {MUTATION_BASE: plain, SECURE_BASE: secure}  # fmt: skip


# --- Main -------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helm", required=True)
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    repo = args.repo.resolve()
    chart = repo / "helm/presence"
    helm = Helm(args.helm, chart)
    report = Report()
    values = yaml.safe_load((chart / "values.yaml").read_text())
    schema = json.loads((chart / "values.schema.json").read_text())
    known_env = service_env(repo)
    checks = {
        "Kubernetes API schemas": check_schemas,
        "restricted security context": check_restricted,
        "gRPC probes": check_probes,
        "rollout": check_rollout,
        "environment": lambda docs, sc: check_env(docs, sc, known_env),
        "Redis URL source": check_store,
        "Services": check_service,
        "optional resources": check_optional,
        "NetworkPolicy": check_network_policy,
        "TLS, tokens and Secret files": check_security,
        "monitoring": lambda docs, sc: check_monitoring(docs, sc, chart),
    }

    print("== helm lint --strict")
    for sc in (s for s in SCENARIOS if s.lint):
        r = helm.lint(sc.sets, sc.kube)
        report.record(f"lint: {sc.name}", [] if r.returncode == 0 else [(r.stdout + r.stderr).strip()[-600:]])

    print("== helm template, schema validation and checks")
    renders: dict[str, list[dict]] = {}
    for sc in SCENARIOS:
        r = helm.template(sc.sets, sc.kube)
        if r.returncode != 0:
            report.record(f"[{sc.name}] renders", [r.stderr.strip()])
            continue
        docs = renders[sc.name] = load_docs(r.stdout)
        report.record(f"[{sc.name}] renders ({len(docs)} manifests, Kubernetes {sc.kube})", [])
        for label, check in checks.items():
            report.record(f"[{sc.name}] {label}", check(docs, sc))
        report.record(f"[{sc.name}] Redis password never in clear", check_secrecy(docs, sc, r.stdout))

    print("== the pods roll when the Redis URL changes, and only then")
    sums = []
    for url in ("redis://a.internal:6379/0", "redis://a.internal:6379/0", "redis://b.internal:6379/0"):
        r = helm.template(sets("trialRedis.enabled=false") + ["--set-string", f"redis.url={url}"])
        dep, _ = server(load_docs(r.stdout))
        sums.append((dep["spec"]["template"]["metadata"].get("annotations") or {}).get("checksum/redis-secret"))
    stable_and_changing = sums[0] and sums[0] == sums[1] != sums[2]
    report.record("checksum/redis-secret stays for a URL, changes with it", [] if stable_and_changing else [sums])

    print("== bad values fail to render, with a clear message")
    for label, bad, expect in BAD_VALUES:
        r = helm.template(bad)
        problem = f"the message lacks {expect!r}: {r.stderr.strip()[:300]}" if r.returncode else "rendered"
        report.record(f"rejects {label}", [] if r.returncode != 0 and expect in r.stderr else [problem])

    print("== NOTES.txt and README")
    report.record("NOTES: commands name real objects and RPCs, and no secret", check_notes(helm, repo))
    base = renders.get(MUTATION_BASE, [])
    groups = [g for pr in of_kind(base, "PrometheusRule") for g in pr["spec"]["groups"]]
    alerts = [r["alert"] for g in groups for r in g["rules"] if "alert" in r]
    report.record("README: the values table, a runbook per alert", check_readme(chart, values, schema, alerts))
    for base_name, broken in mutations().items():
        print(f"== self-tests: every check notices a broken copy of [{base_name}]")
        sc = next(s for s in SCENARIOS if s.name == base_name)
        for what, check_name, mutate in broken if base_name in renders else []:
            docs = copy.deepcopy(renders[base_name])
            try:
                mutate(docs)
            except (KeyError, IndexError, StopIteration) as e:  # the render no longer has what it breaks
                report.record(f"'{check_name}' notices: {what}", [f"cannot break the render: {e!r}"])
                continue
            report.record(f"'{check_name}' notices: {what}", [] if checks[check_name](docs, sc) else ["it passed"])
    readme = (chart / "README.md").read_text()
    for what, text in (
        ("a runbook missing", readme.replace("#### PresenceNoRotation", "#### Rotation")),
        ("a wrong default", readme.replace("| `replicaCount` | int | `2` |", "| `replicaCount` | int | `3` |")),
    ):
        caught = check_readme(chart, values, schema, alerts, text)
        report.record(f"'README' check notices: {what}", [] if caught else ["it passed"])

    print()
    if report.failed:
        print(f"{len(report.failed)} of {report.passed + len(report.failed)} chart checks failed:")
        print("\n".join(f"  - {name}" for name in report.failed))
    print(f"check_chart: {report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
