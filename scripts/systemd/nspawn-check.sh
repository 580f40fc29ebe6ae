#!/usr/bin/env bash
# Boots this machine's own OS in a throwaway systemd-nspawn container (volatile: nothing is
# written to the host) and follows the README's systemd steps inside it, for real: install.sh
# with the given binary, configure, start, check /healthz, /readyz and the applied limits, then
# stop with invocations in flight and check that they drained. NATS and a sample function run on
# the host's loopback, which the container shares.
#
#   scripts/systemd/nspawn-check.sh [BINARY]   (default: target/debug/queue-worker)
#
# Needs root, systemd-nspawn (Debian: apt-get install systemd-container), nats-server, python3
# and curl on the host. Not part of scripts/test.sh (it boots a system).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
bin="$(realpath "${1:-target/debug/queue-worker}")"
[ -x "$bin" ] || { echo "no binary $bin (cargo build)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
command -v systemd-nspawn >/dev/null || { echo "systemd-nspawn not found (apt-get install systemd-container)" >&2; exit 1; }
nats_bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
[ -x "$nats_bin" ] || { echo "nats-server not found" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats_port="$(free_port)"; fn_port="$(free_port)"; metrics_port="$(free_port)"
"$nats_bin" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/js" >"$work/nats.log" 2>&1 & pids+=($!)
python3 scripts/demo/function.py "$fn_port" >"$work/fn.log" 2>&1 & pids+=($!)
mkdir -p "$work/out"

cat >"$work/env" <<EOF
nats_port=$nats_port
gateway_url=http://127.0.0.1:$fn_port
metrics_port=$metrics_port
max_inflight=50
max_response_bytes=4194304
EOF
cat >"$work/runner.service" <<'EOF'
[Unit]
Description=queue-worker nspawn check
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/sh /runner.sh
ExecStopPost=/bin/systemctl --no-block poweroff
EOF
cat >"$work/runner.sh" <<EOF
exec >/out/runner.log 2>&1
set -x
/repo/scripts/systemd/install.sh --binary /qw-bin
cp /test-env /etc/queue-worker/env
systemctl restart queue-worker.service
for i in \$(seq 50); do curl -fsS http://127.0.0.1:$metrics_port/readyz && break; sleep 0.2; done
echo
{
  systemctl show queue-worker.service -p ActiveState -p User -p MemoryMax -p TasksMax -p LimitNOFILE
  echo "uid=\$(stat -c %u /proc/\$(systemctl show -p MainPID --value queue-worker.service))"
  echo "user_uid=\$(id -u queue-worker)"
  echo "healthz=\$(curl -fsS http://127.0.0.1:$metrics_port/healthz)"
  echo "readyz=\$(curl -fsS http://127.0.0.1:$metrics_port/readyz)"
} >/out/state
env nats_port=$nats_port /usr/local/bin/queue-worker publish slow --query ms=3000 -n 3
sleep 1
systemctl stop queue-worker.service
systemctl show queue-worker.service -p Result -p ExecMainStatus >>/out/state
journalctl -u queue-worker.service --no-pager -o cat >/out/journal
systemd-analyze security queue-worker.service --no-pager >/out/security 2>&1 || true
EOF

timeout 180 systemd-nspawn -q -D / --volatile=yes --overlay=/usr::/usr --register=no --keep-unit \
    -M "qw-check-$$" --bind="$work/out:/out" --bind-ro="$work/runner.sh:/runner.sh" \
    --bind-ro="$work/runner.service:/etc/systemd/system/runner.service" \
    --bind-ro="$repo:/repo" --bind-ro="$bin:/qw-bin" --bind-ro="$work/env:/test-env" \
    -b systemd.firstboot=off systemd.wants=runner.service >"$work/console.log" 2>&1 || true

failed=0
expect() { # description, pattern, file
    if grep -qE "$2" "$work/out/$3" 2>/dev/null; then echo "ok    $1"; else echo "FAIL  $1" >&2; failed=1; fi
}
expect "install.sh ran inside a booted systemd" '==> enabled queue-worker.service' runner.log
expect "service active after start" '^ActiveState=active' state
expect "runs as the static user queue-worker" '^User=queue-worker' state
uid="$(sed -n 's/^uid=//p' "$work/out/state" 2>/dev/null)"; user_uid="$(sed -n 's/^user_uid=//p' "$work/out/state" 2>/dev/null)"
if [ -n "$uid" ] && [ "$uid" = "$user_uid" ]; then echo "ok    process uid $uid = queue-worker"; else echo "FAIL  process uid $uid, queue-worker $user_uid" >&2; failed=1; fi
expect "MemoryMax=320M applied" '^MemoryMax=335544320$' state
expect "TasksMax=1088 applied" '^TasksMax=1088$' state
expect "LimitNOFILE=4096 applied" '^LimitNOFILE=4096$' state
expect "/healthz answers ok" '^healthz=ok' state
expect "/readyz answers ok" '^readyz=ok' state
expect "stop drained 3 running invocations" 'shutting down: waiting up to .* for 3 running' journal
if [ "$(grep -c 'invoked slow: 200' "$work/out/journal" 2>/dev/null)" = 3 ]; then echo "ok    all 3 finished with 200 before exit"; else echo "FAIL  not all 3 invocations finished" >&2; failed=1; fi
expect "exited 0 after the drain" '^ExecMainStatus=0$' state
grep -h 'Overall exposure' "$work/out/security" 2>/dev/null || true
if [ "$failed" != 0 ]; then
    echo "--- runner.log" >&2; cat "$work/out/runner.log" >&2 || true
    echo "--- console (tail)" >&2; tail -20 "$work/console.log" >&2
fi
exit "$failed"
