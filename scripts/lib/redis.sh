# The shell side of scripts/lib/private_redis.py, the one launcher of private
# Redis processes that tests, scripts and the benchmark share. Sourced by
# scripts/lib/tools.sh.
# shellcheck shell=bash

PRIVATE_REDIS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/private_redis.py"

# free_ports N: N distinct free loopback ports, space-separated, below the
# kernel's ephemeral range, never 6379.
free_ports() {
    python3 "$PRIVATE_REDIS" free-port --count "${1:-1}"
}

# start_private_redis PREFIX [OPTIONS...]: starts a private redis-server in
# the background, with the launcher's `server` OPTIONS (--dir DIR,
# --password PW, --unix-socket, --tls-dir DIR, -- EXTRA_REDIS_ARGS...), and
# waits until it answers PING. Sets and exports PREFIX_PID, PREFIX_PORT
# (empty on a unix socket), PREFIX_SOCKET, PREFIX_URL and PREFIX_DIR (its
# log is PREFIX_DIR/redis.log). The process is Redis itself, a child of this
# shell: the caller stops it by PREFIX_PID, and removes PREFIX_DIR if it
# gave no --dir.
start_private_redis() {
    local attempt
    for attempt in 1 2 3; do
        _start_private_redis_once "$@" && return 0
        # A port the launcher picked can be taken by someone else just
        # before redis-server binds it; then another is picked. A port given
        # with --port is kept.
        [[ " $* " == *" --port "* ]] && break
    done
    echo "private redis-server did not start (after $attempt attempt(s)): $PRIVATE_REDIS server ${*:2}" >&2
    return 1
}

_start_private_redis_once() {
    local prefix=$1 announced pid port socket url dir option previous="" deadline=$((SECONDS + 15))
    local cli=("${REDIS_CLI:-redis-cli}")
    shift
    for option in "$@"; do
        [ "$option" = "--" ] && break
        case "$previous" in
            --password) cli+=(-a "$option" --no-auth-warning) ;;
            --tls-dir) cli+=(--tls --cacert "$option/ca.pem" --cert "$option/client.pem" --key "$option/client.key") ;;
        esac
        previous=$option
    done
    announced="$(mktemp)"
    python3 "$PRIVATE_REDIS" server "$@" >"$announced" &
    pid=$!
    until [ "$(wc -l <"$announced")" -ge 1 ]; do
        _private_redis_may_wait "$pid" "$deadline" || break
    done
    IFS=$'\x1f' read -r port socket url dir < <(python3 -c 'import json, sys
info = json.load(open(sys.argv[1]))
fields = [info[k] for k in ("port", "socket", "url", "dir")]
print("\x1f".join("" if f is None else str(f) for f in fields))' "$announced" 2>/dev/null) || true
    rm -f "$announced"
    if [ -n "$socket" ]; then cli+=(-s "$socket"); else cli+=(-h 127.0.0.1 -p "$port"); fi
    # It answers, and it is ours: on a port, someone else's could answer. A
    # NOAUTH reply (a password among the redis args) counts.
    until [ -n "$url" ] && "${cli[@]}" INFO server 2>/dev/null | tr -d '\r' | grep -qxE "process_id:$pid|.*NOAUTH.*"; do
        if ! _private_redis_may_wait "$pid" "$deadline"; then
            [ -f "$dir/redis.log" ] && tail -n 5 "$dir/redis.log" >&2
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 1
        fi
    done
    printf -v "${prefix}_PID" '%s' "$pid"
    printf -v "${prefix}_PORT" '%s' "$port"
    printf -v "${prefix}_SOCKET" '%s' "$socket"
    printf -v "${prefix}_URL" '%s' "$url"
    printf -v "${prefix}_DIR" '%s' "$dir"
    export "${prefix}_PID" "${prefix}_PORT" "${prefix}_SOCKET" "${prefix}_URL" "${prefix}_DIR"
}

# True, after a short pause, while PID runs and the DEADLINE (in SECONDS) is
# ahead.
_private_redis_may_wait() {
    kill -0 "$1" 2>/dev/null && [ "$SECONDS" -lt "$2" ] && sleep 0.05
}
