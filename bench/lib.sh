# shellcheck shell=bash
# What every bench script shares: the tools (scripts/lib/tools.sh, which
# brings free_ports and start_private_redis), process bookkeeping that stops
# exactly what the script started, output to a results file, and the small
# arithmetic of medians and ratios. Source it from the repository's root,
# after setting RESULTS (the text results) and RAW (raw JSON lines).
#
#   source bench/lib.sh
#   bench_init security          # RESULTS=bench/results/security.txt, RAW=....jsonl, TMP, traps
#   STARTED+=("$pid")            # anything started in the background
#   say "a figure"; progress "a step"; fail "a figure that could not be measured"

# shellcheck source=scripts/lib/tools.sh
source scripts/lib/tools.sh

# bench_init NAME: the results files bench/results/NAME.{txt,jsonl}, a temp
# dir $TMP, and the exit trap that stops every PID in STARTED.
bench_init() {
    RESULTS_DIR=bench/results
    RESULTS="$RESULTS_DIR/$1.txt"
    RAW="$RESULTS_DIR/$1.jsonl"
    TMP="$(mktemp -d -t "presence-bench-$1.XXXXXX")"
    FAILED=0
    STARTED=()
    mkdir -p "$RESULTS_DIR"
    : >"$RESULTS"
    : >"$RAW"
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

# --- processes: only ours, by PID ---------------------------------------------

forget() { local keep=() p; for p in "${STARTED[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; STARTED=("${keep[@]}"); }
stop_pid() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; forget "$1"; }
bench_cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}

# --- output -------------------------------------------------------------------

say() { printf '%s\n' "$*" | tee -a "$RESULTS"; }
progress() { printf '  .. %s\n' "$*" >&2; }
step() { printf '\n==> %s\n' "$*" >&2; }
fail() { FAILED=1; say "FAILED  $*"; }

# --- arithmetic ---------------------------------------------------------------

# median of the numbers given (ignores "nan")
median() {
    printf '%s\n' "$@" | grep -v '^nan$' | sort -g | awk '{ v[NR] = $1 }
        END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# ratio a/b with 2 decimals ("nan" if either is missing)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "nan"; else printf "%.2f", a / b }'; }
# a number with the given decimals
fmt() { awk -v v="$1" -v d="${2:-0}" 'BEGIN { if (v == "nan") print "nan"; else printf "%.*f", d, v }'; }
# met VALUE OP TARGET: "yes", "no", or "?" when unmeasured
met() { awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN { if (v == "nan") print "?"; else if ((op == ">=" && v >= t) || (op == "<=" && v <= t) || (op == "<" && v < t)) print "yes"; else print "no" }'; }
# fields of a JSON object, space-separated ("nan" for null or missing)
jfields() {
    python3 -c 'import json, sys
obj = json.loads(sys.argv[1])
out = []
for key in sys.argv[2:]:
    value = obj.get(key)
    out.append("nan" if value is None else json.dumps(value, separators=(",", ":")).strip("\""))
print(" ".join(out))' "$@"
}
# median of each field over the JSON lines of a file, space-separated
jmedians() {
    python3 -c 'import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
out = []
for key in sys.argv[2:]:
    values = [r[key] for r in rows if r.get(key) is not None]
    out.append(repr(statistics.median(values)) if values else "nan")
print(" ".join(out))' "$@"
}
# CPU seconds a process has used (user + system)
cpu_seconds() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$1/stat"; }
