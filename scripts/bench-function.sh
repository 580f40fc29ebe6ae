#!/usr/bin/env bash
# Issue 14's two measurements, beside scripts/bench.sh (whose helpers it uses):
#
#   FAIR   max_inflight 16: 20,000 requests for a 20 ms function A are queued and the worker
#          starts on them, then 100 for a fast function B are queued. Reports B's completion
#          times (answered by the function minus queued: p50, p99, max) and A's throughput
#          before and while B's requests ran.
#   ADAPT  a function that serves at most 8 requests at once and answers 429 beyond (the bench
#          function server's --max-concurrent 8), 10 ms a call, 5,000 requests, max_inflight
#          64: throughput, 429s, messages given up and time taken, with the limiter and without.
#
#   scripts/bench-function.sh                         # both cases, in static and function mode
#   BENCH_FN_MODES=static scripts/bench-function.sh   # static mode only
#
# Each case runs in each mode of BENCH_FN_MODES; ADAPT in function mode runs with
# limiter_enabled=true and false (in static mode the limiter has no effect). A build whose
# worker refuses scaling_mode=function (its scheduler not wired in yet) gets those runs
# reported as skipped. Prints a markdown table on stdout (progress on stderr) and writes the
# figures as JSON to $BENCH_FN_OUT. Everything runs on 127.0.0.1; every process started here is
# stopped on exit.
#
# Environment (besides bench.sh's NATS_SERVER_BIN, BENCH_SKIP_BUILD, BENCH_BIN_DIR,
# BENCH_WORKER, BENCH_TIMEOUT, BENCH_KEEP_TMP):
#   BENCH_FN_MODES="static function"
#   BENCH_FN_CASES=FAIR,ADAPT
#   BENCH_FN_A=20000 BENCH_FN_B=100 BENCH_FN_A_MS=20   the fairness case
#   BENCH_FN_ADAPT=5000 BENCH_FN_CAPACITY=8 BENCH_FN_ADAPT_MS=10 BENCH_FN_ADAPT_INFLIGHT=64
#   BENCH_FN_RETRY_WAIT=1s BENCH_FN_MAX_RETRY_WAIT=10s   the worker's back-off for 429s in ADAPT
#                            (the defaults, 10s and 120s, make the run without a limiter last
#                            minutes)
#   BENCH_FN_OUT=target/bench/function.json
#   BENCH_TIMEOUT=1200       seconds one run may take (the run without a limiter takes minutes)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# bench.sh's helpers (start_nats, start_function, fill, stop_worker, ...), its temp dir and its
# cleanup trap; no Go peer.
BENCH_CASES=NONE
# shellcheck source=scripts/bench.sh
. "$ROOT/scripts/bench.sh"

MODES=${BENCH_FN_MODES:-static function}
FN_CASES=,${BENCH_FN_CASES:-FAIR,ADAPT},
A_COUNT=${BENCH_FN_A:-20000}
B_COUNT=${BENCH_FN_B:-100}
A_MS=${BENCH_FN_A_MS:-20}
ADAPT_COUNT=${BENCH_FN_ADAPT:-5000}
CAPACITY=${BENCH_FN_CAPACITY:-8}
ADAPT_MS=${BENCH_FN_ADAPT_MS:-10}
ADAPT_INFLIGHT=${BENCH_FN_ADAPT_INFLIGHT:-64}
RETRY_WAIT=${BENCH_FN_RETRY_WAIT:-1s}
MAX_RETRY_WAIT=${BENCH_FN_MAX_RETRY_WAIT:-10s}
FN_OUT=${BENCH_FN_OUT:-target/bench/function.json}
# Without a limiter, 429s and their back-off make ADAPT take minutes (bench.sh's default is 300).
TIMEOUT=${BENCH_TIMEOUT:-1200}
FN_RESULTS=$TMP/function-results.jsonl
: >"$FN_RESULTS"
SKIPPED=()

fn_want() { [[ $FN_CASES == *",$1,"* ]]; }

# fn_record JSON: one run's figures.
fn_record() { printf '%s\n' "$1" >>"$FN_RESULTS"; }

# start_mode_worker MODE MAX_INFLIGHT FN_PORT STREAM [NAME=VALUE...]: like bench.sh's
# start_worker, in scaling_mode MODE with extra settings. Sets WORKER_PID, WORKER_T0,
# WORKER_METRICS and WORKER_LOG.
start_mode_worker() {
    local mode=$1 k=$2 fn_port=$3 stream=$4 port
    shift 4
    port=$(free_port)
    WORKER_METRICS=http://127.0.0.1:$port
    WORKER_LOG=$TMP/worker-$mode.log
    WORKER_T0=$(now_us)
    # shellcheck disable=SC2034 # read by bench.sh's stop_worker (once it wraps workers)
    WRAP_PID="" # no perf/strace wrapper
    env nats_url="$NATS_URL" nats_stream="$stream" queue_name="$stream" nats_durable="$DURABLE" \
        gateway_url="http://127.0.0.1:$fn_port" max_inflight="$k" metrics_port="$port" \
        ack_wait=60s log_encoding=json scaling_mode="$mode" "$@" \
        "$WORKER" >>"$WORKER_LOG" 2>&1 &
    WORKER_PID=$!
    PIDS+=("$WORKER_PID")
}

# Waits until the worker is ready; returns 3 (after reaping it) when this build refuses the
# mode, and dies on any other early exit.
ready_or_refused() {
    if READY_US=$("$CEIL" wait-http --url "$WORKER_METRICS/readyz" --interval-ms 2 \
        --timeout-s 60 --pid "$WORKER_PID" 2>/dev/null); then
        return 0
    fi
    local rc=0
    wait "$WORKER_PID" 2>/dev/null || rc=$?
    forget_pid "$WORKER_PID"
    if [[ $rc == 2 ]] && grep -q "not part of this build" "$WORKER_LOG"; then
        return 3
    fi
    die "worker never became ready (exit $rc); log: $(tail -5 "$WORKER_LOG")"
}

# given_up_total: the sum of queue_worker_given_up_total over the worker's functions.
given_up_total() {
    curl -fsS "$WORKER_METRICS/metrics" |
        awk '/^queue_worker_given_up_total\{/ { s += $2 } END { print s + 0 }'
}

# count_of PORT FUNCTION: answered (200) calls of FUNCTION so far.
count_of() {
    curl -fsS "http://127.0.0.1:$1/_log?function=$2" | awk '$3 == 200 { n++ } END { print n + 0 }'
}

# wait_function_count PORT FUNCTION N: until FUNCTION has N answered calls (BENCH_TIMEOUT).
wait_function_count() {
    local start=$SECONDS
    while (($(count_of "$1" "$2") < $3)); do
        proc_alive "$WORKER_PID" || die "the worker exited; log: $(tail -5 "$WORKER_LOG")"
        ((SECONDS - start < TIMEOUT)) || die "$2 did not reach $3 calls within $TIMEOUT s"
        sleep 0.1
    done
}

case_fair() {   # fairness: A's burst, then B
    local mode=$1 t_b t_b_end log
    new_stream
    reset_count "$FAIR_PORT"
    "$CEIL" fill --nats "$NATS_URL" --stream "$STREAM" --queue "$STREAM" --function A \
        --count "$A_COUNT" --body-size 128 2>>"$TMP/fill.log"
    start_mode_worker "$mode" 16 "$FAIR_PORT" "$STREAM"
    if ! ready_or_refused; then
        log "bench: FAIR in $mode mode: skipped (this build refuses scaling_mode=$mode)"
        SKIPPED+=("FAIR-$mode")
        delete_stream "$STREAM"
        return 0
    fi
    wait_function_count "$FAIR_PORT" A 200   # A's backlog is being worked on
    t_b=$(now_us)
    "$CEIL" fill --nats "$NATS_URL" --stream "$STREAM" --queue "$STREAM" --function B \
        --count "$B_COUNT" --body-size 128 2>>"$TMP/fill.log"
    t_b_end=$(now_us)
    wait_function_count "$FAIR_PORT" B "$B_COUNT"
    "$CEIL" wait-count --url "http://127.0.0.1:$FAIR_PORT/_stats" --target $((A_COUNT + B_COUNT)) \
        --interval-ms 50 --timeout-s "$TIMEOUT" --stall-s "$STALL" --pid "$WORKER_PID" >/dev/null ||
        die "FAIR: not every call was made; log: $(tail -5 "$WORKER_LOG")"
    log=$TMP/fair-$mode.log
    curl -fsS "http://127.0.0.1:$FAIR_PORT/_log" >"$log"
    stop_worker
    delete_stream "$STREAM"
    fn_record "$(python3 - "$log" "$mode" "$t_b" "$t_b_end" "$A_COUNT" "$B_COUNT" "$A_MS" <<'PY'
import json, sys
path, mode, t_b, t_b_end, a_n, b_n, a_ms = sys.argv[1:]
t_b, t_b_end, a_n, b_n, a_ms = int(t_b), int(t_b_end), int(a_n), int(b_n), int(a_ms)
rows = [l.split() for l in open(path) if l.strip()]
a = sorted(int(r[1]) for r in rows if r[3] == "A" and r[2] == "200")
b = sorted(int(r[1]) for r in rows if r[3] == "B" and r[2] == "200")
lat = sorted((d - t_b) / 1000 for d in b)   # ms from the moment B's fill started
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
b_end = b[-1]
def rate(lo, hi):
    n = sum(1 for d in a if lo <= d <= hi)
    return n / ((hi - lo) / 1e6) if hi > lo else None
print(json.dumps({
    "case": "FAIR", "mode": mode, "a": len(a), "b": len(b), "a_ms": a_ms,
    "b_fill_ms": (t_b_end - t_b) / 1000,
    "b_p50_ms": pct(lat, 50), "b_p99_ms": pct(lat, 99), "b_max_ms": lat[-1],
    "a_per_sec": len(a) / ((a[-1] - a[0]) / 1e6),
    "a_per_sec_before_b": rate(a[0], t_b),
    "a_per_sec_while_b": rate(t_b, b_end),
    "a_ideal_per_sec": 16 / (a_ms / 1000),
}))
PY
)"
    log "bench: FAIR $mode: $(tail -1 "$FN_RESULTS")"
}

case_adapt() {   # adaptive concurrency against a capacity-limited function
    local mode=$1 limiter=$2 stats first_us last_us label
    label=$mode
    [[ $mode == static ]] || label="$mode, limiter_enabled=$limiter"
    new_stream
    reset_count "$ADAPT_PORT"
    "$CEIL" fill --nats "$NATS_URL" --stream "$STREAM" --queue "$STREAM" --function narrow \
        --count "$ADAPT_COUNT" --body-size 128 2>>"$TMP/fill.log"
    start_mode_worker "$mode" "$ADAPT_INFLIGHT" "$ADAPT_PORT" "$STREAM" \
        limiter_enabled="$limiter" initial_retry_wait="$RETRY_WAIT" max_retry_wait="$MAX_RETRY_WAIT"
    if ! ready_or_refused; then
        log "bench: ADAPT ($label): skipped (this build refuses scaling_mode=$mode)"
        SKIPPED+=("ADAPT-$mode-limiter=$limiter")
        delete_stream "$STREAM"
        return 0
    fi
    stats=$("$CEIL" wait-count --url "http://127.0.0.1:$ADAPT_PORT/_stats" --target "$ADAPT_COUNT" \
        --interval-ms 20 --timeout-s "$TIMEOUT" --stall-s "$STALL" --pid "$WORKER_PID") ||
        die "ADAPT: the function did not answer $ADAPT_COUNT calls; log: $(tail -5 "$WORKER_LOG")"
    local given_up rejected max_active
    given_up=$(given_up_total)
    stats=$(curl -fsS "http://127.0.0.1:$ADAPT_PORT/_stats")
    stop_worker
    delete_stream "$STREAM"
    first_us=$(json_field "$stats" first_us)
    last_us=$(json_field "$stats" last_us)
    rejected=$(json_field "$stats" rejected)
    max_active=$(json_field "$stats" max_active)
    fn_record "$(printf '{"case":"ADAPT","mode":"%s","limiter":"%s","ok":%s,"rejected":%s,"given_up":%s,"max_active":%s,"seconds":%s,"per_sec":%s,"from_ready_s":%s,"ideal_per_sec":%s}' \
        "$mode" "$limiter" "$(json_field "$stats" count)" "$rejected" "$given_up" "$max_active" \
        "$(calc "($last_us - $first_us) / 1e6")" \
        "$(calc "$ADAPT_COUNT / (($last_us - $first_us) / 1e6)")" \
        "$(calc "($last_us - $READY_US) / 1e6")" \
        "$(calc "$CAPACITY / ($ADAPT_MS / 1000)")")"
    log "bench: ADAPT ($label): $(tail -1 "$FN_RESULTS")"
}

fn_report() {
    mkdir -p "$(dirname "$FN_OUT")"
    python3 - "$FN_RESULTS" "$FN_OUT" "${SKIPPED[*]:-}" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
skipped = sys.argv[3].split() if sys.argv[3] else []
meta = {k: os.environ.get(k) for k in ("NATS_VERSION", "GIT_REV", "DATE", "NPROC", "CPU_MODEL",
                                       "RETRY_WAIT_EFFECTIVE")}
with open(sys.argv[2], "w") as f:
    json.dump({"meta": meta, "results": rows, "skipped": skipped}, f, indent=2)
    f.write("\n")
def fmt(x):
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
p = print
p("## Function mode measurements (issue 14)\n")
p(f"{meta['NATS_VERSION']}; {meta['NPROC']} x {meta['CPU_MODEL']}; rev {meta['GIT_REV']}.\n")
fair = [r for r in rows if r["case"] == "FAIR"]
if fair:
    r0 = fair[0]
    p(f"### Fairness: max_inflight 16, {r0['a']:,} calls of a {r0['a_ms']} ms function A, "
      f"then {r0['b']} of a fast function B\n")
    p("| mode | B p50 ms | B p99 ms | B max ms | A msg/s (ideal "
      f"{fmt(r0['a_ideal_per_sec'])}) | A msg/s before B | A msg/s while B ran |")
    p("|---|---:|---:|---:|---:|---:|---:|")
    for r in fair:
        p(f"| {r['mode']} | {fmt(r['b_p50_ms'])} | {fmt(r['b_p99_ms'])} | {fmt(r['b_max_ms'])} | "
          f"{fmt(r['a_per_sec'])} | {fmt(r['a_per_sec_before_b'])} | {fmt(r['a_per_sec_while_b'])} |")
    p("\nB's times run from the moment its requests started to be queued to the function's "
      "answer.\n")
adapt = [r for r in rows if r["case"] == "ADAPT"]
if adapt:
    p(f"### Adaptive concurrency: capacity-{os.environ.get('CAPACITY')} function (429 beyond), "
      f"{os.environ.get('ADAPT_MS')} ms a call, {os.environ.get('ADAPT_COUNT')} calls, "
      f"max_inflight {os.environ.get('ADAPT_INFLIGHT')}; retries after "
      f"{meta['RETRY_WAIT_EFFECTIVE']}\n")
    p("| mode | limiter | msg/s (ideal) | 429s | 429 share | given up | most at once | "
      "first to last call s |")
    p("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in adapt:
        share = r["rejected"] / (r["rejected"] + r["ok"])
        lim = "no effect" if r["mode"] == "static" else r["limiter"]
        p(f"| {r['mode']} | {lim} | {fmt(r['per_sec'])} ({fmt(r['ideal_per_sec'])}) | "
          f"{r['rejected']:,} | {share:.1%} | {r['given_up']} | {r['max_active']} | "
          f"{fmt(r['seconds'])} |")
    p()
if skipped:
    p("Skipped (this build refuses the mode): " + ", ".join(skipped) + ".\n")
p(f"JSON: {sys.argv[2]}")
PY
}

fn_main() {
    command -v python3 >/dev/null || die "python3 is required"
    command -v curl >/dev/null || die "curl is required"
    build
    [[ -x $FN_BIN && -x $CEIL && -x $WORKER ]] || die "$FN_BIN, $CEIL or $WORKER missing: \
cargo build --release --bin queue-worker --examples (or set BENCH_BIN_DIR, BENCH_WORKER)"
    start_nats
    start_function FAIR_PORT --sleep-ms-for "A=$A_MS" --record
    start_function ADAPT_PORT --max-concurrent "$CAPACITY" --sleep-ms "$ADAPT_MS"
    DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) NPROC=$(nproc)
    CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo none)
    RETRY_WAIT_EFFECTIVE="initial_retry_wait=$RETRY_WAIT, max_retry_wait=$MAX_RETRY_WAIT"
    export NATS_VERSION DATE NPROC CPU_MODEL GIT_REV RETRY_WAIT_EFFECTIVE CAPACITY ADAPT_MS \
        ADAPT_COUNT ADAPT_INFLIGHT
    local mode
    for mode in $MODES; do
        fn_want FAIR && case_fair "$mode"
        if fn_want ADAPT; then
            case_adapt "$mode" true
            [[ $mode == static ]] || case_adapt "$mode" false
        fi
    done
    fn_report
}

fn_main "$@"
