#!/usr/bin/env bash
# The main job, end to end on one machine: installs what is missing, starts nats-server with
# JetStream in a throw-away directory, the sample functions, and the worker (memory stream);
# enqueues work, shows the results, a callback, retries and the metrics; stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v curl >/dev/null || missing+=(curl)
nats_bin=$(command -v nats-server || true)
[ -n "$nats_bin" ] || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }

step "building queue-worker (release)"
cargo build --release --locked --quiet
qw="$PWD/target/release/queue-worker"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

nats_port=$(free_port); fn_port=$(free_port); metrics_port=$(free_port)
step "starting nats-server $("$nats_bin" --version | sed 's/.*v//') on 127.0.0.1:$nats_port"
"$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$work/jetstream" >"$work/nats.log" 2>&1 &
pids+=($!)
python3 scripts/demo/function.py "$fn_port" >"$work/callbacks.jsonl" 2>"$work/function.log" &
pids+=($!)
# Publish only once the functions answer: an early request would be retried, not lost.
for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$fn_port/" && break; sleep 0.05; done

export nats_url="nats://127.0.0.1:$nats_port" nats_stream=demo queue_name=demo \
  nats_stream_storage=memory gateway_url="http://127.0.0.1:$fn_port" \
  metrics_port="$metrics_port" max_inflight=16 initial_retry_wait=500ms max_retry_wait=2s
step "starting the worker: max_inflight=$max_inflight, metrics on :$metrics_port"
"$qw" >"$work/worker.log" 2>&1 &
worker=$!
pids+=("$worker")
for _ in $(seq 200); do curl -sf "localhost:$metrics_port/readyz" >/dev/null && break; sleep 0.05; done
curl -sf "localhost:$metrics_port/readyz" >/dev/null || { cat "$work/worker.log"; exit 1; }

metric() { curl -s "localhost:$metrics_port/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$2} END {print s+0}'; }
wait_processed() {
  for _ in $(seq 600); do [ "$(metric queue_worker_messages_processed_total)" -ge "$1" ] && return; sleep 0.05; done
  echo "timed out waiting for $1 processed messages; the worker's log ends with:" >&2
  tail -n 20 "$work/worker.log" >&2; "$qw" status >&2; exit 1
}

step "enqueue one request with a callback: queue-worker publish shout -d 'hello, queue' --callback ..."
"$qw" publish shout -d 'hello, queue' --callback "http://127.0.0.1:$fn_port/callback"
wait_processed 1
sleep 0.2
echo "callback received:"; cat "$work/callbacks.jsonl"

step "a flaky function: 503 twice, then 200 (retried after 0.5s and 1s)"
"$qw" publish flaky --callback "http://127.0.0.1:$fn_port/callback" >/dev/null
wait_processed 2
sleep 0.2
tail -n 1 "$work/callbacks.jsonl"

step "a batch: 2000 requests to shout"
start=$(date +%s.%N)
"$qw" publish shout -d 'batch' -n 2000 >/dev/null
wait_processed 2002
secs=$(echo "$(date +%s.%N) - $start" | bc)
printf '2000 messages enqueued and processed in %.2f s: %.0f messages/s\n' "$secs" "$(echo "2000 / $secs" | bc -l)"

step "queue-worker status"
"$qw" status

step "metrics (excerpt of http://127.0.0.1:$metrics_port/metrics)"
curl -s "localhost:$metrics_port/metrics" | grep -E '^queue_worker_(messages|invocations_total|retries|callbacks|pending|ready)|^process_resident'

step "worker log (last lines)"
tail -n 5 "$work/worker.log"

step "stopping the worker with SIGTERM (drains in-flight work)"
kill -TERM "$worker"
wait "$worker" && echo "worker exited with status 0"
