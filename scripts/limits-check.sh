#!/usr/bin/env bash
# Runs the worker inside the limits the deployment files ship, under load, to show that the shipped
# settings fit them:
#   memory: the unit's MemoryMax with the env file's max_inflight and max_response_bytes, while
#           4 x max_inflight invocations run with requests near NATS's 1 MiB max_payload and
#           responses just under max_response_bytes; every message must be acked without an OOM;
#   tasks:  the unit's TasksMax with max_inflight at the maximum the unit documents (1024): the
#           worker must get ready (threads = max_inflight + 13).
# Not part of scripts/test.sh (it moves about 1 GB over loopback); run it after changing a limit.
#
#   scripts/limits-check.sh [BINARY]     (default: target/debug/queue-worker; needs root and a
#                                         writable cgroup v1 or v2 hierarchy, nats-server, python3)
#   MEMORY_MAX=128M TASKS_MAX=512 scripts/limits-check.sh     (other limits: both fail)
set -euo pipefail
cd "$(dirname "$0")/.."

bin="$(realpath "${1:-target/debug/queue-worker}")"
unit=scripts/systemd/queue-worker.service
envf=scripts/systemd/queue-worker.env
nats_bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
[ -x "$bin" ] || { echo "no binary $bin (cargo build)" >&2; exit 1; }
[ -x "$nats_bin" ] || { echo "nats-server not found (apt-get install nats-server)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root (cgroups)" >&2; exit 1; }

to_bytes() { python3 -c 'import sys,re; m=re.fullmatch(r"(\d+)([KMG]?)",sys.argv[1]); print(int(m[1])*{"":1,"K":1<<10,"M":1<<20,"G":1<<30}[m[2]])' "$1"; }
# MEMORY_MAX=... and TASKS_MAX=... try other limits than the unit's.
mem_max="$(to_bytes "${MEMORY_MAX:-$(sed -n 's/^MemoryMax=//p' "$unit")}")"
tasks_max="${TASKS_MAX:-$(sed -n 's/^TasksMax=//p' "$unit")}"
top="$(sed -n 's/.*allow max_inflight up to \([0-9]*\).*/\1/p' "$unit")"
inflight="$(sed -n 's/^max_inflight=//p' "$envf")"
cap="$(sed -n 's/^max_response_bytes=//p' "$envf")"

# A cgroup with memory and pids limits, v2 or v1.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cg=/sys/fs/cgroup/qw-limits-$$; mkdir "$cg"
    mem_cg="$cg"; pid_cg="$cg"
    set_mem() { echo "$1" >"$mem_cg/memory.max"; }
    set_pids() { echo "$1" >"$pid_cg/pids.max"; }
    peak() { cat "$mem_cg/memory.peak" 2>/dev/null || echo 0; }
    ooms() { awk '/^oom_kill /{print $2}' "$mem_cg/memory.events"; }
    join() { echo "$1" >"$cg/cgroup.procs"; }
else
    mem_cg=/sys/fs/cgroup/memory/qw-limits-$$; pid_cg=/sys/fs/cgroup/pids/qw-limits-$$
    mkdir "$mem_cg" "$pid_cg"
    set_mem() { echo "$1" >"$mem_cg/memory.limit_in_bytes"; }
    set_pids() { echo "$1" >"$pid_cg/pids.max"; }
    peak() { cat "$mem_cg/memory.max_usage_in_bytes"; }
    ooms() { cat "$mem_cg/memory.failcnt"; }
    join() { echo "$1" >"$mem_cg/cgroup.procs"; echo "$1" >"$pid_cg/cgroup.procs"; }
fi

work="$(mktemp -d)"
pids=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rmdir "$mem_cg" "$pid_cg" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats_port="$(free_port)"; fn_port="$(free_port)"
"$nats_bin" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/js" >"$work/nats.log" 2>&1 & pids+=($!)
# The function: waits, then answers ?n= bytes.
python3 - "$fn_port" >"$work/fn.log" 2>&1 <<'PY' & pids+=($!)
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        q = parse_qs(urlparse(self.path).query)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(float(q["sleep"][0]))
        out = b"x" * int(q["n"][0])
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers()
        self.wfile.write(out)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.1; done
qw() { env -i nats_port="$nats_port" "$@"; }

status() { qw "$bin" status --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["pending"], d["ack_pending"])' 2>/dev/null || echo "? ?"; }
failed=0

# --- memory ----------------------------------------------------------------------
count=$((inflight * 4))
# 760,000 bytes: its base64 JSON stays under the 1 MiB max_payload.
head -c 570000 /dev/urandom | base64 -w0 | head -c 760000 >"$work/body"
qw "$bin" publish big --query "n=$((cap - 4096))&sleep=0.8" --data-file "$work/body" -n "$count" >"$work/publish.log" 2>&1
set_mem "$mem_max"
(join "$BASHPID"; exec env -i nats_port="$nats_port" metrics_port=0 gateway_url="http://127.0.0.1:$fn_port" \
    max_inflight="$inflight" max_response_bytes="$cap" "$bin") >"$work/worker.log" 2>&1 & wpid=$!; pids+=("$wpid")
deadline=$((SECONDS + 120))
while [ "$(status)" != "0 0" ] && [ $SECONDS -lt $deadline ] && kill -0 "$wpid" 2>/dev/null; do sleep 0.5; done
done_count="$(grep -c 'status=200' "$work/worker.log" || true)"
printf 'memory: limit %d MiB, max_inflight=%s, max_response_bytes=%s; %d requests of 760 kB, responses of %d bytes\n' \
    $((mem_max >> 20)) "$inflight" "$cap" "$count" $((cap - 4096))
printf '        peak %d MiB, OOM events %s, %s of %d invoked with 200, queue (pending, ack pending): %s\n' \
    $(($(peak) >> 20)) "$(ooms)" "$done_count" "$count" "$(status)"
if ! kill -0 "$wpid" 2>/dev/null || [ "$done_count" -lt "$count" ] || [ "$(ooms)" != 0 ]; then
    echo "FAIL  memory: the shipped settings do not fit MemoryMax" >&2; failed=1
    tail -5 "$work/worker.log" >&2
else
    echo "ok    memory"
fi
kill -TERM "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true

# --- tasks -----------------------------------------------------------------------
set_mem max 2>/dev/null || set_mem -1
set_pids "$tasks_max"
(join "$BASHPID"; exec env -i nats_port="$nats_port" nats_stream=limits-tasks metrics_port=0 \
    gateway_url="http://127.0.0.1:$fn_port" max_inflight="$top" "$bin") >"$work/tasks.log" 2>&1 & wpid=$!; pids+=("$wpid")
deadline=$((SECONDS + 30))
until grep -qs 'ready in' "$work/tasks.log" || [ $SECONDS -ge $deadline ] || ! kill -0 "$wpid" 2>/dev/null; do sleep 0.2; done
threads="$( (find "/proc/$wpid/task" -mindepth 1 -maxdepth 1 2>/dev/null || true) | wc -l)"
echo "tasks:  TasksMax=$tasks_max, max_inflight=$top: $threads threads"
if grep -q 'ready in' "$work/tasks.log"; then echo "ok    tasks"; else
    echo "FAIL  tasks: the worker did not get ready under TasksMax" >&2; tail -3 "$work/tasks.log" >&2; failed=1
fi
kill -TERM "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true
exit "$failed"
