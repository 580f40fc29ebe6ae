#!/usr/bin/env bash
# Benchmark harness for queue-worker: ceilings (NATS, HTTP) and the worker end to end.
#
#   scripts/bench.sh            # full run: BENCH_COUNT messages per run, BENCH_RUNS runs per case
#   BENCH_QUICK=1 scripts/bench.sh   # smoke run: 2000 messages, 1 run
#
# Prints a markdown table on stdout (progress goes to stderr) and writes the same figures as
# JSON to $BENCH_OUT. Everything runs on 127.0.0.1; every process started here is stopped on
# exit. Needs bash 5, python3, curl, getconf and nats-server (NATS_SERVER_BIN or PATH).
#
# Environment:
#   BENCH_COUNT=20000        messages (and HTTP requests) per run
#   BENCH_RUNS=3             runs per case; the table shows median [min-max]
#   BENCH_QUICK=1            smoke run: count 2000, 1 run, 5000 messages for the flatness case
#   BENCH_OUT=target/bench/results.json
#   BENCH_BODY_SIZE=128      body bytes of the "small" messages (all cases but the body sizes)
#   BENCH_BODY_TOTAL=1073741824  cap on body bytes queued per body-size run (fewer big messages)
#   BENCH_FLAT_COUNT=100000  messages queued for the memory flatness case
#   BENCH_CASES=J,H,E,E10,BODY,IDLE,FLAT,SIZE   the cases to run
#   BENCH_E_INFLIGHT="1 16 100 512"   max_inflight values of the no-op case E
#   BENCH_E10_INFLIGHT="16 100 512"   max_inflight values of the 10 ms case E10
#   BENCH_PEER=1             run the Go peer beside the worker in E and E10 (0: skip it)
#   BENCH_PEER_BIN=target/go/bin/go-worker   the Go peer (built here unless BENCH_SKIP_BUILD=1)
#   BENCH_TIMEOUT=300        seconds one worker run may take before the harness gives up
#   BENCH_STALL=30           ... or may go without a single function call
#   BENCH_SKIP_BUILD=1       do not run cargo or go (use the binaries as they are)
#   BENCH_BIN_DIR=target/release/examples   where bench-function and bench-ceiling are
#   BENCH_WORKER=target/release/queue-worker
#   BENCH_KEEP_TMP=1         keep the temp dir (nats store, logs) for inspection
#   BENCH_PERF=1             run each worker and peer under `perf stat -e task-clock,
#                            context-switches,cpu-migrations,page-faults,raw_syscalls:sys_enter`
#                            (the syscall tracepoint only when tracefs is there: it is mounted when
#                            missing, as root) and add per-message counts to the "Per message"
#                            table; installs linux-perf when missing (as root)
#   BENCH_STRACE=1           run each worker and peer under `strace -f -c` and add its syscall
#                            count per message (strace slows the process down many times: its
#                            msg/s, CPU and context-switch figures are not comparable; not with
#                            BENCH_PERF=1). Each run's perf or strace output is kept in
#                            BENCH_OUT without .json, -counters/CASE.N.txt
#   NATS_SERVER_BIN          nats-server to use (default: the one on PATH)
#
# The Go peer (scripts/bench/go-worker/main.go) is a JetStream queue-worker written the way the
# OpenFaaS one is documented: one pull subscription on the durable consumer, Fetch of as many
# messages as there are free slots (max_inflight), a goroutine per message, in-progress acks
# (+WPI every ack_wait/4) while the call runs, a keep-alive http.Client (MaxIdleConnsPerHost =
# max_inflight), an ack after the call. It reads the worker's env names, finds the stream that
# captures the queue Q as the worker does (or creates OF_<Q> on Q and Q.>, work-queue) and the
# same durable consumer (explicit ack, ack_wait, max_ack_pending, max_waiting). It is built with
# Debian's golang-go and golang-github-nats-io-go-nats-dev (1.22) in GOPATH mode, since the Go
# module proxy may be unreachable:
#   GO111MODULE=off GOPROXY=off GOPATH=$PWD/target/go:/usr/share/gocode \
#       go build -o target/go/bin/go-worker ./scripts/bench/go-worker
# and the harness installs both packages with apt-get when they are missing (as root).
# Every run gets a fresh queue Q (queue_name=bench-PID-N): bench-ceiling fill creates the stream
# OF_<Q> on Q and Q.>, as the worker would, and publishes the requests to Q.noop, as a current
# gateway and `queue-worker publish` do; the worker and the peer find that stream and create the
# consumer. In the E and E10 cases each run of the worker (A) is followed by a run of the peer (B)
# on a fresh stream with the same number of freshly queued messages, the same function server and
# the same settings (A B A B ...), so drift of the machine hits both alike. The table "Beside
# the Go peer" shows both side by side: msg/s from ready, worker CPU seconds (user + system)
# per 10,000 messages and peak RSS (VmHWM); each ratio column is this worker / the Go peer,
# the median of the per-pair ratios (higher is better for msg/s, lower for CPU and RSS).
# A worker run during which the machine counted TCP listen overflows (TcpExtListenOverflows:
# a full backlog drops SYNs, and each such call then waits 1 s) is flagged on stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ ${BENCH_QUICK:-0} == 1 ]]; then
    COUNT=${BENCH_COUNT:-2000}
    RUNS=${BENCH_RUNS:-1}
    FLAT_COUNT=${BENCH_FLAT_COUNT:-5000}
else
    COUNT=${BENCH_COUNT:-20000}
    RUNS=${BENCH_RUNS:-3}
    FLAT_COUNT=${BENCH_FLAT_COUNT:-100000}
fi
OUT=${BENCH_OUT:-target/bench/results.json}
BODY=${BENCH_BODY_SIZE:-128}
BODY_TOTAL=${BENCH_BODY_TOTAL:-1073741824}
CASES=,${BENCH_CASES:-J,H,E,E10,BODY,IDLE,FLAT,SIZE},
TIMEOUT=${BENCH_TIMEOUT:-300}
E_INFLIGHT=${BENCH_E_INFLIGHT:-1 16 100 512}
E10_INFLIGHT=${BENCH_E10_INFLIGHT:-16 100 512}
PEER=${BENCH_PEER:-1}
PEER_BIN=${BENCH_PEER_BIN:-target/go/bin/go-worker}
STALL=${BENCH_STALL:-30}
PERF=${BENCH_PERF:-0}
STRACE=${BENCH_STRACE:-0}
PERF_EVENTS=task-clock,context-switches,cpu-migrations,page-faults
BIN_DIR=${BENCH_BIN_DIR:-target/release/examples}
WORKER=${BENCH_WORKER:-target/release/queue-worker}
FN_BIN=$BIN_DIR/bench-function
CEIL=$BIN_DIR/bench-ceiling
DURABLE=faas-workers
FUNCTION=noop
CLK_TCK=$(getconf CLK_TCK)

PIDS=()          # every process started here, for cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/queue-worker-bench.XXXXXX")
RESULTS=$TMP/results.jsonl
STREAM_SEQ=0
: >"$RESULTS"

log() { printf '%s\n' "$*" >&2; }
die() { log "bench: $*"; exit 1; }
want() { [[ $CASES == *",$1,"* ]]; }
now_us() { local t=$EPOCHREALTIME; echo "${t/[.,]/}"; }
calc() { awk "BEGIN { printf \"%.6g\", $* }"; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in {1..50}; do proc_alive "$pid" || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then log "bench: kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# Running and not a zombie.
proc_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z && ${stat%% *} != X ]]
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# record CASE METRIC UNIT VALUE: one figure of one run.
record() {
    printf '{"case":"%s","metric":"%s","unit":"%s","value":%s}\n' "$1" "$2" "$3" "$4" >>"$RESULTS"
}

# A fresh queue for each run: QUEUE is the queue (queue_name), STREAM the stream that the worker
# creates for it (OF_<queue>, on QUEUE and QUEUE.>); fill creates the same one first.
new_stream() {
    STREAM_SEQ=$((STREAM_SEQ + 1))
    QUEUE=bench-$$-$STREAM_SEQ
    STREAM=OF_$QUEUE
}

build() {
    if [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then return; fi
    log "bench: building"
    cargo build --release --locked --bin queue-worker --examples
    if [[ $PEER == 1 ]] && { want E || want E10; }; then build_peer; fi
}

# The Go peer, in GOPATH mode against Debian's go-nats (see the header).
build_peer() {
    local gocode=/usr/share/gocode
    if ! command -v go >/dev/null || [[ ! -d $gocode/src/github.com/nats-io/nats.go ]]; then
        [[ $(id -u) == 0 ]] || die "the Go peer needs golang-go and golang-github-nats-io-go-nats-dev \
(apt-get install them, or set BENCH_PEER=0)"
        log "bench: installing golang-go and golang-github-nats-io-go-nats-dev"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go \
            golang-github-nats-io-go-nats-dev >&2
    fi
    log "bench: building the Go peer ($(go version))"
    mkdir -p "$ROOT/target/go"
    GO111MODULE=off GOPROXY=off GOFLAGS='' GOPATH="$ROOT/target/go:$gocode" \
        GOCACHE="$ROOT/target/go/cache" go build -o "$PEER_BIN" ./scripts/bench/go-worker
}

# BENCH_PERF / BENCH_STRACE: the tools, and the syscall tracepoint when it can be had.
setup_counters() {
    [[ $PERF == 1 && $STRACE == 1 ]] && die "BENCH_PERF=1 and BENCH_STRACE=1: choose one"
    local tool=""
    [[ $PERF == 1 ]] && tool=perf
    [[ $STRACE == 1 ]] && tool=strace
    [[ -n $tool ]] || return 0
    if ! command -v "$tool" >/dev/null; then
        [[ $(id -u) == 0 ]] || die "BENCH_${tool^^}=1 needs $tool (apt-get install it)"
        log "bench: installing $tool"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "$([[ $tool == perf ]] && echo linux-perf || echo strace)" >&2
    fi
    [[ $tool == perf ]] || return 0
    perf stat -e "$PERF_EVENTS" true >/dev/null 2>"$TMP/perf-check.err" ||
        die "perf stat does not work here: $(tail -3 "$TMP/perf-check.err")"
    if ! perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1 &&
        [[ $(id -u) == 0 && ! -d /sys/kernel/tracing/events ]]; then
        log "bench: mounting tracefs on /sys/kernel/tracing for the syscall tracepoint"
        mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
    fi
    if perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
        PERF_EVENTS+=,raw_syscalls:sys_enter
    else
        log "bench: no raw_syscalls tracepoint: syscalls not counted (BENCH_STRACE=1 counts them)"
    fi
    log "bench: counting $PERF_EVENTS with $(perf --version)"
}

# Sets NATS_PID, NATS_URL, NATS_MON.
start_nats() {
    local bin=${NATS_SERVER_BIN:-$(command -v nats-server || true)}
    [[ -n $bin && -x $bin ]] || die "nats-server not found; set NATS_SERVER_BIN or install it \
(apt-get install nats-server, go install github.com/nats-io/nats-server/v2@latest, \
or a release from https://github.com/nats-io/nats-server/releases)"
    mkdir -p "$TMP/js" "$TMP/ports"
    cat >"$TMP/nats.conf" <<EOF
max_payload: 8MB
jetstream {
  store_dir: "$TMP/js"
  max_memory_store: 1GB
  max_file_store: 20GB
}
EOF
    "$bin" -c "$TMP/nats.conf" -a 127.0.0.1 -p -1 -m -1 --ports_file_dir "$TMP/ports" \
        >"$TMP/nats.log" 2>&1 &
    NATS_PID=$!
    PIDS+=("$NATS_PID")
    local ports=""
    for _ in {1..500}; do
        ports=$(cat "$TMP"/ports/*.ports 2>/dev/null || true)
        [[ -n $ports ]] && break
        proc_alive "$NATS_PID" || die "nats-server exited: $(tail -5 "$TMP/nats.log")"
        sleep 0.02
    done
    [[ -n $ports ]] || die "nats-server wrote no ports file"
    NATS_URL=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["nats"][0])' "$ports")
    NATS_MON=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["monitoring"][0])' "$ports")
    "$CEIL" wait-http --url "$NATS_MON/healthz" --timeout-s 10 --pid "$NATS_PID" >/dev/null
    NATS_VERSION=$("$bin" --version 2>&1 | head -1)
    log "bench: $NATS_VERSION at $NATS_URL (store $TMP/js)"
}

# start_function VAR [bench-function args...]: sets VAR to the port.
start_function() {
    local var=$1 out=$TMP/function-$1.out port=""
    shift
    "$FN_BIN" --port 0 "$@" >"$out" 2>&1 &
    PIDS+=("$!")
    for _ in {1..250}; do
        # The redirection may not exist yet: with set -e, sed's failure would end the script.
        port=$(sed -n '1s/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$out" 2>/dev/null || true)
        [[ -n $port ]] && break
        sleep 0.02
    done
    [[ -n $port ]] || die "bench-function did not start: $(cat "$out")"
    printf -v "$var" '%s' "$port"
    log "bench: function server $* on port $port"
}

reset_count() { curl -fsS -X POST "http://127.0.0.1:$1/_reset" >/dev/null; }

# fill COUNT BODY_BYTES: the fresh stream STREAM on QUEUE and QUEUE.> with COUNT requests,
# published to QUEUE.<function> as a current gateway (and `queue-worker publish`) does.
fill() {
    "$CEIL" fill --nats "$NATS_URL" --stream "$STREAM" --queue "$QUEUE" --count "$1" \
        --body-size "$2" --function "$FUNCTION" 2>>"$TMP/fill.log"
    tail -1 "$TMP/fill.log" >&2
}

delete_stream() {
    "$CEIL" delete-stream --nats "$NATS_URL" --stream "$1" 2>>"$TMP/fill.log"
}

# start_worker MAX_INFLIGHT FN_PORT QUEUE [BINARY]: sets WORKER_PID, WORKER_T0 (us),
# WORKER_METRICS and WORKER_LOG. BINARY is the worker (default) or the Go peer; both find the
# stream that captures QUEUE (the one fill made) and create the durable consumer on it.
start_worker() {
    local port bin=${4:-$WORKER}
    port=$(free_port)
    WORKER_METRICS=http://127.0.0.1:$port
    WORKER_LOG=$TMP/worker.log
    [[ $bin == "$WORKER" ]] || WORKER_LOG=$TMP/peer.log
    # BENCH_PERF / BENCH_STRACE: the binary runs under a counter, WRAP_PID; WORKER_PID is the
    # binary itself (the wrapper's child), so /proc and the signals reach it, not the wrapper.
    local wrap=()
    WRAP_OUT=$TMP/counters.out WRAP_PID=""
    rm -f "$WRAP_OUT"
    if [[ $PERF == 1 ]]; then
        wrap=(perf stat -x ',' -o "$WRAP_OUT" -e "$PERF_EVENTS" --)
    elif [[ $STRACE == 1 ]]; then
        wrap=(strace -f -c -o "$WRAP_OUT")
    fi
    WORKER_T0=$(now_us)
    nats_url=$NATS_URL queue_name=$3 nats_durable=$DURABLE \
        gateway_url=http://127.0.0.1:$2 max_inflight=$1 metrics_port=$port ack_wait=60s \
        log_encoding=json "${wrap[@]}" "$bin" >>"$WORKER_LOG" 2>&1 &
    WORKER_PID=$!
    PIDS+=("$WORKER_PID")
    if ((${#wrap[@]})); then
        WRAP_PID=$WORKER_PID WORKER_PID=""
        local exe child kids
        exe=$(readlink -f "$bin")
        for _ in {1..500}; do
            kids=()   # the file has no newline: read fills kids and fails
            read -ra kids <"/proc/$WRAP_PID/task/$WRAP_PID/children" 2>/dev/null || true
            for child in "${kids[@]}"; do
                [[ $(readlink "/proc/$child/exe" 2>/dev/null) == "$exe" ]] && WORKER_PID=$child
            done
            [[ -n $WORKER_PID ]] && break
            proc_alive "$WRAP_PID" || break
            sleep 0.01
        done
        [[ -n $WORKER_PID ]] || die "${wrap[0]} did not start $bin; log: $(tail -5 "$WORKER_LOG")"
        PIDS+=("$WORKER_PID")
    fi
}

# Sets READY_US: when /readyz (or, while it does not exist, /healthz) first answered 200.
wait_ready() {
    READY_US=$("$CEIL" wait-http --url "$WORKER_METRICS/readyz" \
        --fallback-url "$WORKER_METRICS/healthz" --interval-ms 2 --timeout-s 60 \
        --pid "$WORKER_PID") || die "worker never became ready; log: $(tail -5 "$WORKER_LOG")"
}

# SIGTERM, then wait (SIGKILL after 30 s). Sets WORKER_RC.
stop_worker() {
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    for _ in {1..1500}; do proc_alive "$WORKER_PID" || break; sleep 0.02; done
    if proc_alive "$WORKER_PID"; then
        log "bench: worker did not exit 30 s after SIGTERM; killing it"
        kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
    WORKER_RC=0
    if [[ -n $WRAP_PID ]]; then
        # The wrapper exits with the worker's status once it has written its counts.
        wait "$WRAP_PID" 2>/dev/null || WORKER_RC=$?
        forget_pid "$WRAP_PID"
    else
        wait "$WORKER_PID" 2>/dev/null || WORKER_RC=$?
    fi
    forget_pid "$WORKER_PID"
    [[ $WORKER_RC == 0 ]] || log "bench: worker exited with status $WORKER_RC"
}

# The machine's TcpExtListenOverflows: connections dropped because a listen backlog was full
# (the client sends its SYN again after 1 s). Machine-wide: other processes count too.
listen_overflows() {
    awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; h = 1 }
        else { print $c + 0; exit } }' /proc/net/netstat 2>/dev/null || echo 0
}

# sample_ctx PID: sets CTX_VOL and CTX_NONVOL, the context switches of every thread that PID
# has now (/proc/PID/task/*/status; threads that already exited are not counted).
sample_ctx() {
    local sums
    sums=$(cat /proc/"$1"/task/*/status 2>/dev/null | awk '
        /^voluntary_ctxt_switches:/ { v += $2 } /^nonvoluntary_ctxt_switches:/ { n += $2 }
        END { print v + 0, n + 0 }')
    read -r CTX_VOL CTX_NONVOL <<<"$sums"
}

# record_counters CASE N: the per-message counts of the run's perf stat or strace -c output.
record_counters() {
    local case=$1 n=$2 name value
    [[ -n $WRAP_PID ]] || return 0
    if [[ ! -s $WRAP_OUT ]]; then
        log "bench: $case: no counter output in $WRAP_OUT"
        return 0
    fi
    if [[ $PERF == 1 ]]; then
        # perf stat -x,: value,unit,event,... ("<not counted>" and "<not supported>" skipped)
        while IFS=, read -r value _ name _; do
            [[ $value =~ ^[0-9.]+$ ]] || continue
            case $name in
                task-clock) record "$case" perf_task_clock_us_per_msg us "$(calc "$value * 1000 / $n")" ;;
                context-switches) record "$case" perf_ctxsw_per_msg count "$(calc "$value / $n")" ;;
                cpu-migrations) record "$case" perf_migrations_per_msg count "$(calc "$value / $n")" ;;
                page-faults) record "$case" perf_faults_per_msg count "$(calc "$value / $n")" ;;
                raw_syscalls:sys_enter) record "$case" perf_syscalls_per_msg count "$(calc "$value / $n")" ;;
            esac
        done <"$WRAP_OUT"
    else
        # strace -c: the last line is "100.00 seconds usecs/call calls [errors] total".
        value=$(awk '$NF == "total" { print $4 }' "$WRAP_OUT")
        [[ -n $value ]] && record "$case" strace_syscalls_per_msg count "$(calc "$value / $n")"
    fi
    mkdir -p "${OUT%.json}-counters"
    cp "$WRAP_OUT" "${OUT%.json}-counters/$case.$STREAM_SEQ.txt"
}

# sample_proc PID: sets HWM_KB, RSS_KB (from /proc/PID/status) and CPU_TICKS (utime+stime).
sample_proc() {
    local status stat f
    status=$(cat "/proc/$1/status")
    HWM_KB=$(awk '/^VmHWM:/ { print $2 }' <<<"$status")
    RSS_KB=$(awk '/^VmRSS:/ { print $2 }' <<<"$status")
    stat=$(cat "/proc/$1/stat")
    read -ra f <<<"${stat##*) }"   # f[0] is field 3 (state): utime is field 14, stime 15
    CPU_TICKS=$((f[11] + f[12]))
}

# run_worker_until CASE N MAX_INFLIGHT FN_PORT BODY_BYTES [BINARY]: one end-to-end run of the
# worker (or of BINARY, the Go peer). Rates use the time the function saw its Nth call; "from
# first call" also starts at the function's clock.
run_worker_until() {
    local case=$1 n=$2 k=$3 port=$4 body=$5 bin=${6:-$WORKER} stats first_us last_us cpu_s
    new_stream
    reset_count "$port"
    fill "$n" "$body"
    local overflows
    overflows=$(listen_overflows)
    start_worker "$k" "$port" "$QUEUE" "$bin"
    wait_ready
    stats=$("$CEIL" wait-count --url "http://127.0.0.1:$port/_stats" --target "$n" \
        --interval-ms 20 --timeout-s "$TIMEOUT" --stall-s "$STALL" --pid "$WORKER_PID") ||
        die "$case: the function did not see $n calls; log: $(tail -5 "$WORKER_LOG")"
    sample_proc "$WORKER_PID"
    sample_ctx "$WORKER_PID"
    overflows=$(($(listen_overflows) - overflows))
    if ((overflows > 0)); then
        log "bench: $case: $overflows TCP listen overflow(s) on this machine during the run \
(dropped SYNs: each such call waits 1 s)"
    fi
    record "$case" listen_overflows count "$overflows"
    stop_worker
    delete_stream "$STREAM"
    record_counters "$case" "$n"
    record "$case" proc_ctxsw_per_msg count "$(calc "($CTX_VOL + $CTX_NONVOL) / $n")"
    record "$case" proc_nonvol_ctxsw_per_msg count "$(calc "$CTX_NONVOL / $n")"

    first_us=$(json_field "$stats" first_us)
    last_us=$(json_field "$stats" last_us)
    cpu_s=$(calc "$CPU_TICKS / $CLK_TCK")
    if ((last_us > READY_US)); then
        record "$case" per_sec_ready msg/s "$(calc "$n / (($last_us - $READY_US) / 1e6)")"
        record "$case" body_mb_per_sec MB/s "$(calc "$n * $body / (($last_us - $READY_US) / 1e6) / 1e6")"
    else
        log "bench: $case: all $n calls arrived before the worker reported ready"
    fi
    record "$case" per_sec_start msg/s "$(calc "$n / (($last_us - $WORKER_T0) / 1e6)")"
    if ((last_us > first_us)); then
        record "$case" per_sec_first msg/s "$(calc "$n / (($last_us - $first_us) / 1e6)")"
    fi
    if ((READY_US - first_us > 1000)); then
        log "bench: $case: first call $(((READY_US - first_us) / 1000)) ms before ready"
    fi
    record "$case" hwm_mib MiB "$(calc "$HWM_KB / 1024")"
    record "$case" rss_end_mib MiB "$(calc "$RSS_KB / 1024")"
    record "$case" cpu_s s "$cpu_s"
    record "$case" cpu_s_per_10k s "$(calc "$cpu_s / $n * 10000")"
    record "$case" ready_ms ms "$(calc "($READY_US - $WORKER_T0) / 1000")"
    record "$case" first_call_ms ms "$(calc "($first_us - $WORKER_T0) / 1000")"
    record "$case" messages count "$n"
    log "bench: $case: $n messages in $(calc "($last_us - $WORKER_T0) / 1e6") s from start \
(ready $(calc "($READY_US - $WORKER_T0) / 1000") ms, first call $(calc "($first_us - $WORKER_T0) / 1000") ms), \
peak RSS $(calc "$HWM_KB / 1024") MiB, CPU ${cpu_s} s"
}

json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# ---------------------------------------------------------------------------------------------
# Cases

case_j() {   # JetStream ceiling: bench-ceiling consume
    local run spec threads batch out
    for run in $(seq "$RUNS"); do
        for spec in 16x100 100x1 1x1; do
            threads=${spec%x*} batch=${spec#*x}
            new_stream
            fill "$COUNT" "$BODY"
            out=$("$CEIL" consume --nats "$NATS_URL" --stream "$STREAM" --durable "$DURABLE" \
                --threads "$threads" --batch "$batch" --count "$COUNT")
            delete_stream "$STREAM"
            record "J-$spec" per_sec msg/s "$(json_field "$out" per_sec)"
            log "bench: J $threads threads x batch $batch, run $run: $out"
        done
    done
}

case_h() {   # HTTP ceiling: bench-ceiling http against the no-op function (100 threads, and 1)
    local run out threads
    for run in $(seq "$RUNS"); do
        for threads in 100 1; do
            out=$("$CEIL" http --url "http://127.0.0.1:$FN_PORT/function/$FUNCTION/" \
                --threads "$threads" --count "$COUNT" --body-size "$BODY")
            record "H-$threads" per_sec req/s "$(json_field "$out" per_sec)"
            log "bench: H $threads thread(s), run $run: $out"
        done
    done
}

# The Go peer's runs are recorded as G-... beside the worker's E-... (same suffix).
case_e() {   # worker, no-op function (and the Go peer, interleaved)
    local run k
    for k in $E_INFLIGHT; do
        for run in $(seq "$RUNS"); do
            run_worker_until "E-noop-$k" "$COUNT" "$k" "$FN_PORT" "$BODY"
            if [[ $PEER == 1 ]]; then
                run_worker_until "G-noop-$k" "$COUNT" "$k" "$FN_PORT" "$BODY" "$PEER_BIN"
            fi
        done
    done
}

case_e10() {   # worker, 10 ms function (and the Go peer, interleaved)
    local run k
    for k in $E10_INFLIGHT; do
        for run in $(seq "$RUNS"); do
            run_worker_until "E-10ms-$k" "$COUNT" "$k" "$FN10_PORT" "$BODY"
            record "E-10ms-$k" ideal_per_sec msg/s "$(calc "$k / 0.010")"
            if [[ $PEER == 1 ]]; then
                run_worker_until "G-10ms-$k" "$COUNT" "$k" "$FN10_PORT" "$BODY" "$PEER_BIN"
            fi
        done
    done
}

case_body() {   # worker, body sizes, max_inflight 16
    local run size n
    for size in 1024 65536 921600; do
        n=$((BODY_TOTAL / size))
        if ((n > COUNT)); then n=$COUNT; fi
        if ((n < 100)); then n=100; fi
        for run in $(seq "$RUNS"); do
            run_worker_until "E-body-$size" "$n" 16 "$FN_PORT" "$size"
        done
    done
}

case_idle() {   # worker idle at max_inflight 512 on an empty stream, 10 s
    local run t1 t2 c1 c2
    for run in $(seq "$RUNS"); do
        new_stream
        fill 0 "$BODY"
        start_worker 512 "$FN_PORT" "$QUEUE"
        wait_ready
        sample_proc "$WORKER_PID"
        c1=$CPU_TICKS t1=$(now_us)
        sleep 10
        sample_proc "$WORKER_PID"
        c2=$CPU_TICKS t2=$(now_us)
        stop_worker
        delete_stream "$STREAM"
        record idle-512 ready_ms ms "$(calc "($READY_US - $WORKER_T0) / 1000")"
        record idle-512 rss_mib MiB "$(calc "$RSS_KB / 1024")"
        record idle-512 hwm_mib MiB "$(calc "$HWM_KB / 1024")"
        record idle-512 cpu_pct % "$(calc "($c2 - $c1) / $CLK_TCK / (($t2 - $t1) / 1e6) * 100")"
        log "bench: idle run $run: ready in $(calc "($READY_US - $WORKER_T0) / 1000") ms, \
RSS $(calc "$RSS_KB / 1024") MiB, $((c2 - c1)) ticks in 10 s"
    done
}

case_flat() {   # memory flatness: a long backlog, 10 ms function, max_inflight 16, 15 s of RSS
    local run first="" last max=0 samples=()
    for run in $(seq "$RUNS"); do
        new_stream
        reset_count "$FN10_PORT"
        fill "$FLAT_COUNT" "$BODY"
        start_worker 16 "$FN10_PORT" "$QUEUE"
        wait_ready
        first="" max=0 samples=()
        for _ in {1..15}; do
            sleep 1
            proc_alive "$WORKER_PID" || die "worker exited during the flatness run"
            sample_proc "$WORKER_PID"
            if [[ -z $first ]]; then first=$RSS_KB; fi
            if ((RSS_KB > max)); then max=$RSS_KB; fi
            last=$RSS_KB
            samples+=("$RSS_KB")
        done
        stop_worker
        delete_stream "$STREAM"
        record flat-16-10ms rss_first_mib MiB "$(calc "$first / 1024")"
        record flat-16-10ms rss_last_mib MiB "$(calc "$last / 1024")"
        record flat-16-10ms rss_max_mib MiB "$(calc "$max / 1024")"
        record flat-16-10ms calls count "$(curl -fsS "http://127.0.0.1:$FN10_PORT/_count")"
        log "bench: flatness run $run: RSS kB each second: ${samples[*]}"
    done
}

case_size() {
    [[ -f $WORKER ]] || return 0
    local size stripped
    size=$(stat -c %s "$WORKER")
    ls -l "$WORKER" >&2
    record binary bytes bytes "$size"
    if command -v strip >/dev/null; then
        cp "$WORKER" "$TMP/queue-worker.stripped"
        strip "$TMP/queue-worker.stripped"
        stripped=$(stat -c %s "$TMP/queue-worker.stripped")
        record binary stripped_bytes bytes "$stripped"
    fi
}

# ---------------------------------------------------------------------------------------------
# Report: markdown on stdout, JSON in $OUT.

report() {
    mkdir -p "$(dirname "$OUT")"
    LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg) python3 - "$RESULTS" "$OUT" <<'PY'
import json, statistics, sys, os

results_path, out_path = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(results_path) if l.strip()]
groups = {}
for r in rows:
    g = groups.setdefault((r["case"], r["metric"]), {"case": r["case"], "metric": r["metric"],
                                                     "unit": r["unit"], "values": []})
    g["values"].append(r["value"])
for g in groups.values():
    v = g["values"]
    g.update(median=statistics.median(v), min=min(v), max=max(v), runs=len(v))

def med(case, metric):
    g = groups.get((case, metric))
    return g["median"] if g else None

def ratio(a, b):
    return a / b if a is not None and b else None

def serial(a, b):
    return 1 / (1 / a + 1 / b) if a and b else None

def e(case):
    # msg/s from ready; from the first call when every call came before the worker was ready.
    v = med(case, "per_sec_ready")
    return v if v is not None else med(case, "per_sec_first")

ratios = {
    "E(100)/H": ratio(e("E-noop-100"), med("H-100", "per_sec")),
    "E(1) msg/s": e("E-noop-1"),
    # One thread is latency-bound: a message costs at least a pull and ack (J 1x1) plus an
    # HTTP call (H 1), one after the other; this is E(1) against that serial sum.
    "E(1)/serial(J1x1,H1)": ratio(e("E-noop-1"), serial(med("J-1x1", "per_sec"), med("H-1", "per_sec"))),
    "E10ms(16)/ideal": ratio(e("E-10ms-16"), med("E-10ms-16", "ideal_per_sec")),
    "E10ms(100)/ideal": ratio(e("E-10ms-100"), med("E-10ms-100", "ideal_per_sec")),
}
env = {k: os.environ.get(k) for k in ("BENCH_COUNT_EFFECTIVE", "BENCH_RUNS_EFFECTIVE",
                                      "BENCH_BODY_SIZE_EFFECTIVE", "BENCH_FLAT_COUNT_EFFECTIVE",
                                      "BENCH_WORKER", "NATS_VERSION", "CPU_MODEL", "NPROC",
                                      "KERNEL", "GIT_REV", "DATE", "PEER_VERSION",
                                      "LOADAVG", "LOADAVG_END", "COUNTERS")}

# The Go peer beside the worker: E-x is this worker, G-x the peer on the same case. Each ratio
# is this / Go, the median of the per-pair ratios (run i of E-x against run i of G-x, which ran
# right after it); the ratio of the medians when the runs do not pair up.
def values(case, metric):
    g = groups.get((case, metric))
    return g["values"] if g else []

def pair_ratio(case, metric):
    a, b = values("E-" + case, metric), values("G-" + case, metric)
    if a and b and len(a) == len(b) and all(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return ratio(med("E-" + case, metric), med("G-" + case, metric))

def rate_metric(case):
    both = values("E-" + case, "per_sec_ready"), values("G-" + case, "per_sec_ready")
    runs = len(values("E-" + case, "messages")), len(values("G-" + case, "messages"))
    return "per_sec_ready" if (len(both[0]), len(both[1])) == runs else "per_sec_first"

peer_cases = [(f"noop-{k}", f"no-op, max_inflight {k}") for k in (1, 16, 100, 512)]
peer_cases += [(f"10ms-{k}", f"10 ms function, max_inflight {k} (ideal {k * 100:,}/s)")
               for k in (16, 100, 512)]
peer = []
for c, label in peer_cases:
    if (f"G-{c}", "messages") not in groups or (f"E-{c}", "messages") not in groups:
        continue
    m = rate_metric(c)
    peer.append({"case": c, "label": label, "rate_metric": m,
                 "this_per_sec": med("E-" + c, m), "go_per_sec": med("G-" + c, m),
                 "per_sec_ratio": pair_ratio(c, m),
                 "this_cpu_s_per_10k": med("E-" + c, "cpu_s_per_10k"),
                 "go_cpu_s_per_10k": med("G-" + c, "cpu_s_per_10k"),
                 "cpu_ratio": pair_ratio(c, "cpu_s_per_10k"),
                 "this_hwm_mib": med("E-" + c, "hwm_mib"), "go_hwm_mib": med("G-" + c, "hwm_mib"),
                 "hwm_ratio": pair_ratio(c, "hwm_mib"),
                 "pairs": min(len(values("E-" + c, "messages")), len(values("G-" + c, "messages")))})

doc = {"meta": env, "results": list(groups.values()), "ratios": ratios, "peer": peer}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")

def fmt(x):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"

def fmt3(x):
    return "-" if x is None else fmt(x) if abs(x) >= 100 else f"{x:.3g}"

def cell(case, metric):
    g = groups.get((case, metric))
    if not g:
        return "-"
    if g["runs"] == 1:
        return fmt(g["median"])
    return f"{fmt(g['median'])} [{fmt(g['min'])}–{fmt(g['max'])}]"

def has(case):
    return any(c == case for c, _ in groups)

p = print
p(f"## queue-worker benchmark\n")
p(f"{env['BENCH_COUNT_EFFECTIVE']} messages per run, {env['BENCH_RUNS_EFFECTIVE']} run(s) per case, "
  f"median [min–max]; {env['BENCH_BODY_SIZE_EFFECTIVE']}-byte bodies unless stated. "
  f"{env['NATS_VERSION']}; {env['NPROC']} × {env['CPU_MODEL']}; {env['KERNEL']}; "
  f"load average at start {env['LOADAVG']}, at the end {env['LOADAVG_END']}.\n")

ceilings = [("J-16x100", "J: JetStream consume+ack, 16 threads × batch 100", "per_sec"),
            ("J-100x1", "J: JetStream consume+ack, 100 threads × batch 1", "per_sec"),
            ("J-1x1", "J: JetStream consume+ack, 1 thread × batch 1", "per_sec"),
            ("H-100", "H: HTTP POST to the no-op function, 100 threads", "per_sec"),
            ("H-1", "H: HTTP POST to the no-op function, 1 thread", "per_sec")]
if any(has(c) for c, _, _ in ceilings):
    p("### Ceilings\n\n| Case | per second |\n|---|---:|")
    for c, label, m in ceilings:
        if has(c):
            p(f"| {label} | {cell(c, m)} |")
    p()

e_cases = [(f"E-noop-{k}", f"no-op function, max_inflight {k}") for k in (1, 16, 100, 512)]
e_cases += [(f"E-10ms-{k}", f"10 ms function, max_inflight {k} (ideal {k * 100:,}/s)") for k in (16, 100, 512)]
e_cases += [(f"E-body-{s}", f"{name} bodies, no-op, max_inflight 16")
            for s, name in ((1024, "1 KiB"), (65536, "64 KiB"), (921600, "900 KiB"))]
if any(has(c) for c, _ in e_cases):
    p("### Worker end to end\n")
    p("| Case | msg/s from ready | msg/s from start | msg/s from first call | body MB/s | "
      "peak RSS MiB | CPU s / 10k msg | start-to-ready ms | messages |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, label in e_cases:
        if has(c):
            p(f"| {label} | {cell(c, 'per_sec_ready')} | {cell(c, 'per_sec_start')} | "
              f"{cell(c, 'per_sec_first')} | {cell(c, 'body_mb_per_sec')} | {cell(c, 'hwm_mib')} | {cell(c, 'cpu_s_per_10k')} | "
              f"{cell(c, 'ready_ms')} | {cell(c, 'messages')} |")
    p()

if peer:
    p(f"### Beside the Go peer ({env['PEER_VERSION']})\n")
    p("Interleaved runs (this worker, then the Go peer, on freshly queued messages); medians; "
      "each ratio is this / Go, the median of the per-pair ratios.\n")
    p("| Case | this msg/s | Go msg/s | msg/s ratio | this CPU s/10k | Go CPU s/10k | CPU ratio | "
      "this peak RSS MiB | Go peak RSS MiB | RSS ratio |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in peer:
        star = "" if r["rate_metric"] == "per_sec_ready" else " (from first call)"
        p(f"| {r['label']}{star} | {fmt(r['this_per_sec'])} | {fmt(r['go_per_sec'])} | "
          f"{fmt(r['per_sec_ratio'])} | {fmt(r['this_cpu_s_per_10k'])} | {fmt(r['go_cpu_s_per_10k'])} | "
          f"{fmt(r['cpu_ratio'])} | {fmt(r['this_hwm_mib'])} | {fmt(r['go_hwm_mib'])} | "
          f"{fmt(r['hwm_ratio'])} |")
    p()

# Per message: context switches and syscalls of the whole process (start, the run, the drain),
# divided by the messages of the run; this worker (E-x) beside the Go peer (G-x).
per_msg = [("perf_ctxsw_per_msg", "ctx switches (perf)"),
           ("perf_syscalls_per_msg", "syscalls (perf)"),
           ("strace_syscalls_per_msg", "syscalls (strace -c)"),
           ("perf_task_clock_us_per_msg", "task-clock µs (perf)"),
           ("perf_faults_per_msg", "page faults (perf)"),
           ("perf_migrations_per_msg", "CPU migrations (perf)"),
           ("proc_ctxsw_per_msg", "ctx switches (/proc, at the Nth call)"),
           ("proc_nonvol_ctxsw_per_msg", "of them involuntary (/proc)")]
pm_cases = [c for c, _ in peer_cases if has("E-" + c) or has("G-" + c)]
pm_metrics = [(m, l) for m, l in per_msg if any(values(who + c, m) for c in pm_cases for who in ("E-", "G-"))]
if pm_cases and pm_metrics:
    doc["per_message"] = {c: {m: {"this": med("E-" + c, m), "go": med("G-" + c, m)}
                              for m, _ in pm_metrics} for c in pm_cases}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    p(f"### Per message ({env['COUNTERS']})\n")
    p("Whole-process counts (perf, strace: start to exit; /proc: threads alive at the Nth call) "
      "divided by the messages of the run; medians.\n")
    p("| Case | worker | " + " | ".join(l for _, l in pm_metrics) + " |")
    p("|---|---|" + "---:|" * len(pm_metrics))
    labels = dict(peer_cases)
    for c in pm_cases:
        for who, name in (("E-", "this"), ("G-", "Go")):
            if has(who + c):
                p(f"| {labels[c]} | {name} | "
                  + " | ".join(fmt3(med(who + c, m)) for m, _ in pm_metrics) + " |")
    p()

if has("idle-512"):
    p("### Idle worker (max_inflight 512, empty stream, 10 s)\n")
    p("| start-to-ready ms | RSS MiB | peak RSS MiB | CPU % of one core |\n|---:|---:|---:|---:|")
    p(f"| {cell('idle-512', 'ready_ms')} | {cell('idle-512', 'rss_mib')} | "
      f"{cell('idle-512', 'hwm_mib')} | {cell('idle-512', 'cpu_pct')} |\n")

if has("flat-16-10ms"):
    p(f"### Memory flatness ({env['BENCH_FLAT_COUNT_EFFECTIVE']} queued, 10 ms function, "
      "max_inflight 16, RSS each second for 15 s)\n")
    p("| first MiB | last MiB | max MiB | calls in 15 s |\n|---:|---:|---:|---:|")
    p(f"| {cell('flat-16-10ms', 'rss_first_mib')} | {cell('flat-16-10ms', 'rss_last_mib')} | "
      f"{cell('flat-16-10ms', 'rss_max_mib')} | {cell('flat-16-10ms', 'calls')} |\n")

if any(v is not None for v in ratios.values()):
    p("### Ratios (medians of msg/s from ready)\n\n| Ratio | value |\n|---|---:|")
    for k, v in ratios.items():
        p(f"| {k} | {fmt(v)} |")
    p()

if has("binary"):
    b = med("binary", "bytes")
    s = med("binary", "stripped_bytes")
    p(f"Release binary {env['BENCH_WORKER']}: {b:,.0f} bytes"
      + (f" ({s:,.0f} bytes after strip)" if s is not None else "") + ".\n")
p(f"JSON: {out_path}")
PY
}

# ---------------------------------------------------------------------------------------------

main() {
    command -v python3 >/dev/null || die "python3 is required"
    command -v curl >/dev/null || die "curl is required"
    build
    [[ -x $FN_BIN && -x $CEIL ]] || die "$FN_BIN or $CEIL missing: build the examples \
(cargo build --release --examples) or set BENCH_BIN_DIR"
    if want E || want E10 || want BODY || want IDLE || want FLAT; then
        [[ -x $WORKER ]] || die "$WORKER missing (cargo build --release --bin queue-worker)"
    fi
    PEER_VERSION=none
    if [[ $PEER == 1 ]] && { want E || want E10; }; then
        [[ -x $PEER_BIN ]] || die "$PEER_BIN missing (run without BENCH_SKIP_BUILD=1 to build \
it, or set BENCH_PEER=0)"
        PEER_VERSION="$PEER_BIN, $(go version 2>/dev/null | awk '{ print $3 }'), go-nats \
$(dpkg-query -W -f '${Version}' golang-github-nats-io-go-nats-dev 2>/dev/null || echo '?')"
    fi

    setup_counters
    start_nats
    start_function FN_PORT
    start_function FN10_PORT --sleep-ms 10

    # Context for the report.
    BENCH_COUNT_EFFECTIVE=$COUNT BENCH_RUNS_EFFECTIVE=$RUNS BENCH_BODY_SIZE_EFFECTIVE=$BODY
    BENCH_FLAT_COUNT_EFFECTIVE=$FLAT_COUNT BENCH_WORKER=$WORKER
    DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) NPROC=$(nproc) KERNEL=$(uname -sr)
    CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo none)
    LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
    COUNTERS="/proc/PID/task/*/status"
    [[ $PERF == 1 ]] && COUNTERS="perf stat -e $PERF_EVENTS; $COUNTERS"
    [[ $STRACE == 1 ]] && COUNTERS="strace -f -c; $COUNTERS"
    export BENCH_COUNT_EFFECTIVE BENCH_RUNS_EFFECTIVE BENCH_BODY_SIZE_EFFECTIVE \
        BENCH_FLAT_COUNT_EFFECTIVE BENCH_WORKER NATS_VERSION DATE NPROC KERNEL CPU_MODEL GIT_REV \
        PEER_VERSION LOADAVG COUNTERS

    want J && case_j
    want H && case_h
    want E && case_e
    want E10 && case_e10
    want BODY && case_body
    want IDLE && case_idle
    want FLAT && case_flat
    want SIZE && case_size
    report
}

# Sourced (scripts/bench-function.sh uses the helpers above): define only.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
