#!/usr/bin/env python3
"""Checks that the Dockerfile agrees with the Helm chart, Cargo.toml and
.dockerignore; hadolint (run by scripts/check-deploy beside it) checks the
rest: tags, :latest, apt pins and the like. Standard library and PyYAML.

  - the build stage is a pinned rust:<version>-slim-bookworm, no older than
    Cargo.toml's rust-version, and the runtime is bookworm-based too (glibc);
  - the runtime USER is numeric, the chart's runAsUser; EXPOSE is the chart's
    container ports; ENTRYPOINT runs presence in exec form (PID 1 gets
    SIGTERM); cargo builds with --locked;
  - every COPY source exists and .dockerignore lets it through, while it
    keeps target/, .git and node_modules out of the build context;
  - self-tests: broken copies of the Dockerfile and .dockerignore fail.

The last line is "check_dockerfile: N passed, M failed"; the exit status is 1
on any failure.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from pathlib import Path

import yaml


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path or
    one of its parent folders decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pat) for i in range(len(parts))):
            ignored = not pattern.startswith("!")
    return ignored


def check_dockerfile(
    repo: Path, values: dict, cargo: dict | None, dockerfile: str | None = None, dockerignore: str | None = None
) -> list[str]:
    """The texts default to the repository's files; the self-tests pass
    broken copies."""
    problems = []
    ins = dockerfile_instructions(dockerfile if dockerfile is not None else (repo / "Dockerfile").read_text())
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    rust = next((f for f in froms if f.startswith("rust:")), "")
    m = re.match(r"rust:(\d+)\.(\d+)(?:\.(\d+))?-slim-bookworm$", rust)
    if not m:
        problems.append(f"build stage {rust!r} is not a pinned rust:<version>-slim-bookworm")
    if not froms or ("cc-debian12" not in froms[-1] and "bookworm" not in froms[-1]):
        problems.append(f"runtime {froms[-1:]} is not bookworm-based like the build stage (glibc)")

    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    users = [rest for w, rest in final if w == "USER"]
    if not users or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]):
        problems.append(f"runtime USER is {users[-1:]}, not a numeric non-root uid")
    elif int(users[-1].split(":")[0]) != values["securityContext"]["runAsUser"]:
        problems.append(f"image USER {users[-1]} differs from the chart's runAsUser")
    exposed = {int(p.split("/")[0]) for w, rest in final if w == "EXPOSE" for p in rest.split()}
    if exposed != {values["containerPorts"]["grpc"], values["containerPorts"]["metrics"]}:
        problems.append(f"EXPOSE {sorted(exposed)} vs the chart's containerPorts")
    entry = [rest for w, rest in final if w == "ENTRYPOINT"]
    try:
        entry_argv = json.loads(entry[-1]) if entry else None
    except json.JSONDecodeError:
        entry_argv = None
    if not entry_argv or Path(entry_argv[0]).name != "presence":
        problems.append("ENTRYPOINT does not run presence in exec form (it must be PID 1 to get SIGTERM)")
    if not any(w == "RUN" and "cargo build" in r and "--locked" in r for w, r in ins):
        problems.append("cargo build without --locked: the image would not use Cargo.lock")

    ignore = dockerignore if dockerignore is not None else (repo / ".dockerignore").read_text()
    patterns = [line.strip() for line in ignore.splitlines() if line.strip() and not line.startswith("#")]
    for w, rest in ins:
        if w == "COPY" and "--from=" not in rest:
            for src in [s for s in rest.split()[:-1] if not s.startswith("--")]:
                if not (repo / src).exists() or dockerignored(patterns, src.rstrip("/")):
                    problems.append(f"COPY {src}: not in the repository, or excluded by .dockerignore")
    for junk in ("target/release/presence", ".git/config", "examples/node/node_modules/x/index.js", ".env"):
        if not dockerignored(patterns, junk):
            problems.append(f".dockerignore lets {junk} into the build context")

    if cargo:
        if "presence" not in [t["name"] for t in cargo["targets"] if "bin" in t["kind"]]:
            problems.append("Cargo.toml has no `presence` binary")
        need = cargo.get("rust_version")
        if m and need and tuple(int(x) for x in m.groups() if x) < tuple(int(x) for x in need.split(".")):
            problems.append(f"the build stage's {rust} is older than rust-version {need}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--cargo-metadata", type=Path, help="output of `cargo metadata --locked`")
    args = ap.parse_args()
    repo = args.repo.resolve()
    values = yaml.safe_load((repo / "helm/presence/values.yaml").read_text())
    cargo = None
    if args.cargo_metadata and args.cargo_metadata.exists():
        meta = json.loads(args.cargo_metadata.read_text())
        cargo = next(p for p in meta["packages"] if p["id"] in meta["workspace_members"])
    else:
        print("NOTE no cargo metadata: the Dockerfile is not checked against Cargo.toml")
    results = []
    problems = check_dockerfile(repo, values, cargo)
    results.append(("the Dockerfile agrees with the chart, Cargo.toml and .dockerignore", problems))
    dockerfile, dockerignore = (repo / "Dockerfile").read_text(), (repo / ".dockerignore").read_text()
    for what, df, di in (
        ("USER by name", re.sub(r"(?m)^USER .*$", "USER nonroot", dockerfile), dockerignore),
        ("shell-form ENTRYPOINT", re.sub(r"(?m)^ENTRYPOINT .*$", "ENTRYPOINT presence", dockerfile), dockerignore),
        ("metrics port not exposed", re.sub(r"(?m)^EXPOSE 9090$", "EXPOSE 8080", dockerfile), dockerignore),
        ("target/ sent to the daemon", dockerfile, dockerignore + "\n!target/\n"),
    ):
        caught = check_dockerfile(repo, values, cargo, df, di)
        results.append((f"self-test: notices {what}", [] if caught else ["the broken copy passed"]))
    for name, problems in results:
        print(f"{'FAIL' if problems else 'PASS'} {name}" + "".join(f"\n     - {p}" for p in problems))
    failed = sum(1 for _, problems in results if problems)
    print(f"check_dockerfile: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
