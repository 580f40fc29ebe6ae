#!/usr/bin/env bash
# Installs queue-worker as a systemd service. Run it again to update: it is
# idempotent and never overwrites an existing /etc/queue-worker/env.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/systemd/install.sh [OPTIONS]

Installs queue-worker as a systemd service:
  1. builds the release binary (cargo build --release --locked), or takes
     the one given with --binary, and installs it as /usr/local/bin/queue-worker
  2. creates the system user and group "queue-worker" when missing
     (systemd-sysusers with /usr/lib/sysusers.d/queue-worker.conf, else useradd)
  3. installs /etc/queue-worker/env (root:queue-worker 0640) unless it exists;
     an existing one is kept and the shipped one is put beside it as env.dist
  4. installs /etc/systemd/system/queue-worker.service and enables it
     (it starts at boot; with --now it is also (re)started now)

Options:
  --binary PATH   install this binary instead of building one
  --root DIR      install into DIR as the root file system (a staging
                  directory or an image): no daemon-reload, no start
  --now           start the service now, or restart it if it runs
  --no-enable     install the files only; do not enable the unit
  -h, --help      this text

After installing: set at least nats_url (or nats_host) and gateway_url in
/etc/queue-worker/env, then: systemctl restart queue-worker
EOF
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo/scripts/systemd"
binary=""
root=""
now=0
enable=1

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || { echo "--binary needs a path" >&2; exit 2; }; binary="$2"; shift 2 ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --root) [ $# -ge 2 ] || { echo "--root needs a directory" >&2; exit 2; }; root="$2"; shift 2 ;;
        --root=*) root="${1#*=}"; shift ;;
        --now) now=1; shift ;;
        --no-enable) enable=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }

if [ -n "$root" ]; then
    mkdir -p "$root"
    root="$(cd "$root" && pwd)"
    [ "$now" = 0 ] || { echo "--now cannot be used with --root" >&2; exit 2; }
elif [ "$(id -u)" != 0 ]; then
    echo "run as root (or with --root DIR to stage the files)" >&2
    exit 1
fi

# --- 1. the binary -----------------------------------------------------------
if [ -z "$binary" ]; then
    # Build as the owner of the checkout (with their rustup toolchain), not as
    # root, when run under sudo.
    as_builder() { # COMMAND: run in the checkout, as $SUDO_USER under sudo
        if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
            # A login shell, for the PATH to the user's rustup toolchain.
            sudo -u "$SUDO_USER" -H bash -lc 'cd "$1" && eval "$2"' bash "$repo" "$1"
        else
            (cd "$repo" && eval "$1")
        fi
    }
    as_builder "command -v cargo >/dev/null" || {
        echo "cargo not found${SUDO_USER:+ for $SUDO_USER}: install Rust (https://rustup.rs) or pass --binary PATH" >&2
        exit 1
    }
    say "building the release binary (cargo build --release --locked)"
    as_builder "cargo build --release --locked"
    binary="$repo/target/release/queue-worker"
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then echo "not an executable file: $binary" >&2; exit 1; fi
version="$("$binary" --version 2>/dev/null | head -n 1)" || true
case "$version" in
    "queue-worker "*) ;;
    *) echo "$binary --version does not print \"queue-worker VERSION\": not a queue-worker binary" >&2; exit 1 ;;
esac
say "installing $version as $root/usr/local/bin/queue-worker"
install -D -m 0755 "$binary" "$root/usr/local/bin/queue-worker.new"
mv -f "$root/usr/local/bin/queue-worker.new" "$root/usr/local/bin/queue-worker"

# --- 2. the system user --------------------------------------------------------
mkdir -p "$root/usr/lib/sysusers.d"
printf '%s\n' \
    '# queue-worker.service runs as this user (scripts/systemd/install.sh).' \
    'u queue-worker - "OpenFaaS queue-worker" / /usr/sbin/nologin' \
    >"$root/usr/lib/sysusers.d/queue-worker.conf"
chmod 0644 "$root/usr/lib/sysusers.d/queue-worker.conf"
has_user() {
    if [ -n "$root" ]; then
        grep -q '^queue-worker:' "$root/etc/passwd" 2>/dev/null
    else
        getent passwd queue-worker >/dev/null
    fi
}
if has_user; then
    say "system user queue-worker exists"
elif command -v systemd-sysusers >/dev/null; then
    say "creating system user queue-worker (systemd-sysusers)"
    if [ -n "$root" ]; then
        mkdir -p "$root/etc"
        systemd-sysusers --root="$root" queue-worker.conf
    else
        systemd-sysusers queue-worker.conf
    fi
else
    say "creating system user queue-worker (useradd)"
    useradd ${root:+--root "$root"} --system --user-group --no-create-home \
        --home-dir / --shell /usr/sbin/nologin --comment "OpenFaaS queue-worker" queue-worker
fi

# --- 3. the env file -----------------------------------------------------------
install -d -m 0755 "$root/etc/queue-worker"
group=root
if has_user; then group=queue-worker; fi
# chown by name must see the user database of the root we install into.
chgrp_in_root() {
    if [ -n "$root" ]; then
        local gid
        gid="$(awk -F: -v g="$group" '$1 == g { print $3 }' "$root/etc/group" 2>/dev/null)"
        chgrp "${gid:-0}" "$1"
    else
        chgrp "$group" "$1"
    fi
}
env_file="$root/etc/queue-worker/env"
if [ -e "$env_file" ]; then
    install -m 0640 "$here/queue-worker.env" "$env_file.dist"
    chgrp_in_root "$env_file.dist"
    say "kept the existing /etc/queue-worker/env; the shipped one is /etc/queue-worker/env.dist"
    if ! cmp -s "$here/queue-worker.env" "$env_file"; then
        echo "    compare them for new settings: diff -u /etc/queue-worker/env /etc/queue-worker/env.dist"
    fi
else
    install -m 0640 "$here/queue-worker.env" "$env_file"
    chgrp_in_root "$env_file"
    say "installed /etc/queue-worker/env (every setting with its default)"
fi

# --- 4. the unit ---------------------------------------------------------------
install -D -m 0644 "$here/queue-worker.service" "$root/etc/systemd/system/queue-worker.service"
say "installed /etc/systemd/system/queue-worker.service"

running_systemd=0
if [ -z "$root" ] && [ -d /run/systemd/system ]; then running_systemd=1; fi

if [ "$running_systemd" = 1 ]; then
    systemctl daemon-reload
fi
if [ "$enable" = 1 ]; then
    if [ -n "$root" ]; then
        # Offline: creates the multi-user.target.wants symlink inside the root.
        systemctl --root="$root" enable queue-worker.service
        say "enabled queue-worker.service in $root"
    elif [ "$running_systemd" = 1 ]; then
        systemctl enable queue-worker.service
        say "enabled queue-worker.service (starts at boot)"
    else
        systemctl enable queue-worker.service >/dev/null 2>&1 || true
        say "systemd is not running here: enabled offline where possible; start it on a systemd host"
    fi
fi
if [ "$now" = 1 ]; then
    if [ "$running_systemd" = 1 ]; then
        systemctl restart queue-worker.service
        say "started: systemctl status queue-worker; journalctl -u queue-worker -f"
    else
        echo "systemd is not running: cannot start the service now" >&2
        exit 1
    fi
elif [ -z "$root" ]; then
    cat <<'EOF'
Next:
  1. edit /etc/queue-worker/env: nats_url (or nats_host) and gateway_url at least
  2. systemctl restart queue-worker
  3. curl -fsS http://127.0.0.1:8081/healthz; journalctl -u queue-worker -f
EOF
fi
