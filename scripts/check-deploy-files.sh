#!/usr/bin/env bash
# Validate the deployment and observability files under scripts/:
#   - every JSON file under scripts/grafana parses   (python3 -m json.tool)
#   - every YAML file under scripts/prometheus and scripts/kubernetes parses
#     (python3 + PyYAML; skipped with a message when PyYAML is missing)
#   - promtool check/test rules on the alert rules   (only if promtool exists)
#   - kubectl kustomize on scripts/kubernetes        (only if kubectl exists)
#   - kubernetes-validate --strict (Kubernetes JSON schemas, offline) on every
#     manifest, the kustomize output and the output with the NATS credentials
#     Secret and patch enabled (only if kubernetes-validate exists: scripts/test.sh
#     installs it into target/tools/venv)
#   - systemd-analyze verify on the unit             (only if it exists)
#   - the systemd env example only holds NAME=value lines and comments
#   - check-deploy-consistency.py: the env file names every variable that
#     `queue-worker --help` lists, with its default; memory, task and file
#     limits hold the shipped settings; image tag, names, labels, chart env
#     names, pinned base images (needs a built binary and PyYAML)
#   - scripts/systemd/install.sh: --help, and two staged installs into a
#     temporary --root (idempotent, env file kept), the staged unit verified
#     (needs root); shellcheck on the shell scripts (only if it exists)
#   - systemd/nspawn-check.sh: the README's systemd steps in a booted systemd-nspawn
#     container (needs root and systemd-nspawn; QW_SKIP_NSPAWN=1 skips it)
# Exits non-zero on the first class of failures found; optional tools that
# are not installed are reported as skipped.
#
# Usage: scripts/check-deploy-files.sh   (from any directory)
set -euo pipefail

scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(dirname "$scripts_dir")"
failures=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The worker binary whose --help is the list of settings: $QUEUE_WORKER_BIN, or
# the newer of target/debug and target/release (scripts/test.sh builds debug).
bin="${QUEUE_WORKER_BIN:-}"
if [ -z "$bin" ]; then
    for b in "$repo_dir/target/debug/queue-worker" "$repo_dir/target/release/queue-worker"; do
        if [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; }; then bin="$b"; fi
    done
fi

pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*" >&2; failures=$((failures + 1)); }
skip() { printf 'skip  %s\n' "$*"; }

if ! command -v python3 >/dev/null 2>&1; then
    echo "python3 is required" >&2
    exit 1
fi

# --- JSON (Grafana dashboards) ---------------------------------------------
json_count=0
while IFS= read -r -d '' f; do
    json_count=$((json_count + 1))
    if python3 -m json.tool "$f" >/dev/null; then
        pass "json  ${f#"$scripts_dir"/}"
    else
        fail "json  ${f#"$scripts_dir"/}"
    fi
done < <(find "$scripts_dir/grafana" -type f -name '*.json' -print0 | sort -z)
[ "$json_count" -gt 0 ] || fail "no JSON file found under scripts/grafana"

# --- YAML (Prometheus rules, Kubernetes manifests) ---------------------------
yaml_files=()
while IFS= read -r -d '' f; do
    yaml_files+=("$f")
done < <(find "$scripts_dir/prometheus" "$scripts_dir/kubernetes" -type f \
    \( -name '*.yaml' -o -name '*.yml' \) -print0 | sort -z)

if python3 -c 'import yaml' >/dev/null 2>&1; then
    for f in "${yaml_files[@]}"; do
        # safe_load_all: Kubernetes files hold several documents.
        if python3 - "$f" <<'PY'
import sys, yaml
try:
    with open(sys.argv[1], encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
except yaml.YAMLError as e:
    sys.exit(str(e))
if not docs:
    sys.exit(f"{sys.argv[1]}: no YAML document")
PY
        then
            pass "yaml  ${f#"$scripts_dir"/}"
        else
            fail "yaml  ${f#"$scripts_dir"/}"
        fi
    done
else
    skip "YAML parsing: PyYAML is not installed (pip install pyyaml)"
fi

# --- Prometheus rules --------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
    if promtool check rules "$scripts_dir/prometheus/alerts.yaml" >/dev/null; then
        pass "promtool check rules prometheus/alerts.yaml"
    else
        fail "promtool check rules prometheus/alerts.yaml"
    fi
    # The test file names alerts.yaml relative to its own directory.
    if (cd "$scripts_dir/prometheus" && promtool test rules alerts.test.yaml >/dev/null); then
        pass "promtool test rules prometheus/alerts.test.yaml"
    else
        fail "promtool test rules prometheus/alerts.test.yaml"
    fi
else
    skip "promtool not found (Debian: apt-get install prometheus)"
fi

# --- Kustomize -----------------------------------------------------------------
if command -v kubectl >/dev/null 2>&1; then
    if kubectl kustomize "$scripts_dir/kubernetes" >/dev/null; then
        pass "kubectl kustomize kubernetes/"
    else
        fail "kubectl kustomize kubernetes/"
    fi
else
    skip "kubectl not found: kustomization not rendered"
fi

# --- Kubernetes schemas ----------------------------------------------------------
kv="${KUBERNETES_VALIDATE:-}"
if [ -z "$kv" ]; then
    if command -v kubernetes-validate >/dev/null 2>&1; then
        kv="$(command -v kubernetes-validate)"
    elif [ -x "$repo_dir/target/tools/venv/bin/kubernetes-validate" ]; then
        kv="$repo_dir/target/tools/venv/bin/kubernetes-validate"
    fi
fi
validate() { # name file: strict schema check against the Kubernetes OpenAPI schemas
    if out="$("$kv" --strict --quiet "$2" 2>&1)"; then
        pass "schema $1"
        [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/      /'
    else
        printf '%s\n' "$out" >&2
        fail "schema $1"
    fi
}
if [ -n "$kv" ]; then
    # servicemonitor.yaml: no offline schema for the Prometheus Operator CRD;
    # check-deploy-consistency.py checks its selector, port and job label.
    for f in queue-worker.yaml nats-credentials.example.yaml nats-external.example.yaml; do
        validate "kubernetes/$f" "$scripts_dir/kubernetes/$f"
    done
    if command -v kubectl >/dev/null 2>&1; then
        kubectl kustomize "$scripts_dir/kubernetes" >"$tmp/kustomized.yaml" \
            && validate "kubectl kustomize kubernetes/" "$tmp/kustomized.yaml"
        # The same with the NATS credentials Secret and patch enabled.
        cp -r "$scripts_dir/kubernetes" "$tmp/k8s-credentials"
        cat >"$tmp/k8s-credentials/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: openfaas
resources:
  - queue-worker.yaml
  - nats-credentials.example.yaml
patches:
  - path: nats-credentials.patch.yaml
EOF
        if kubectl kustomize "$tmp/k8s-credentials" >"$tmp/credentials.yaml" \
            && grep -q 'secretName: queue-worker-rs-nats' "$tmp/credentials.yaml"; then
            validate "kustomize with nats-credentials patch" "$tmp/credentials.yaml"
        else
            fail "kustomize with nats-credentials patch"
        fi
    fi
else
    skip "kubernetes-validate not found (pip install kubernetes-validate; scripts/test.sh installs it)"
fi

# --- systemd -----------------------------------------------------------------
unit="$scripts_dir/systemd/queue-worker.service"
verify_unit() { # name unit-file [binary]: systemd-analyze verify, ExecStart on an existing binary
    local exe="${3:-}"
    mkdir -p "$tmp/verify"
    # verify fails when ExecStart= points to a missing file: point it at the
    # given (built or staged) binary, else at /bin/true.
    if [ -z "$exe" ] && [ -x /usr/local/bin/queue-worker ]; then exe=/usr/local/bin/queue-worker; fi
    if [ -z "$exe" ]; then
        exe=/bin/true
        echo "note  no queue-worker binary: verifying $1 with ExecStart=/bin/true"
    fi
    sed "s#^ExecStart=/usr/local/bin/queue-worker#ExecStart=$exe#" "$2" >"$tmp/verify/queue-worker.service"
    # systemd-analyze verify exits 0 even for some warnings; treat any
    # output line naming the unit as a failure.
    if out="$(systemd-analyze verify "$tmp/verify/queue-worker.service" 2>&1)" \
        && ! grep -q 'queue-worker.service' <<<"$out"; then
        pass "systemd-analyze verify $1"
    else
        printf '%s\n' "$out" >&2
        fail "systemd-analyze verify $1"
    fi
}
if command -v systemd-analyze >/dev/null 2>&1; then
    verify_unit systemd/queue-worker.service "$unit" "$bin"
else
    skip "systemd-analyze not found: unit not verified"
fi

# EnvironmentFile= syntax: blank lines, comments, or NAME=value.
env_file="$scripts_dir/systemd/queue-worker.env"
if bad="$(grep -nvE '^[[:space:]]*(#.*)?$|^[A-Za-z_][A-Za-z0-9_]*=' "$env_file")"; then
    printf '%s\n' "$bad" >&2
    fail "env   systemd/queue-worker.env has lines that are not NAME=value or comments"
else
    pass "env   systemd/queue-worker.env"
fi

# --- Settings, limits, names and tags (against the binary's --help) ----------------
if [ -z "$bin" ]; then
    skip "no built queue-worker (cargo build, or set QUEUE_WORKER_BIN): env file not compared with --help"
elif ! python3 -c 'import yaml' >/dev/null 2>&1; then
    skip "consistency checks: PyYAML is not installed"
elif ! "$bin" --help >"$tmp/help.txt" 2>&1; then
    fail "$bin --help"
elif python3 "$scripts_dir/check-deploy-consistency.py" "$tmp/help.txt"; then
    pass "consistency of the deployment files with $(basename "$(dirname "$bin")")/queue-worker --help"
else
    fail "consistency of the deployment files (lines marked FAIL above)"
fi

# --- install.sh ------------------------------------------------------------------
installer="$scripts_dir/systemd/install.sh"
if "$installer" --help | grep -q -- '--root DIR' && ! "$installer" --bogus >/dev/null 2>&1; then
    pass "install.sh --help (and an unknown option fails)"
else
    fail "install.sh --help"
fi
if [ -z "$bin" ]; then
    skip "install.sh staged install: no built binary"
elif [ "$(id -u)" != 0 ]; then
    skip "install.sh staged install: needs root (file groups)"
elif ! command -v systemd-sysusers >/dev/null 2>&1 && ! command -v useradd >/dev/null 2>&1; then
    skip "install.sh staged install: neither systemd-sysusers nor useradd"
else
    stage="$tmp/root"
    problems=()
    "$installer" --root "$stage" --binary "$bin" >"$tmp/install1.log" 2>&1 || problems+=("first run failed")
    echo "nats_url=nats://kept.example:4222" >>"$stage/etc/queue-worker/env"
    "$installer" --root "$stage" --binary "$bin" >"$tmp/install2.log" 2>&1 || problems+=("second run failed")
    [ -x "$stage/usr/local/bin/queue-worker" ] || problems+=("no /usr/local/bin/queue-worker")
    cmp -s "$bin" "$stage/usr/local/bin/queue-worker" || problems+=("installed binary differs")
    cmp -s "$unit" "$stage/etc/systemd/system/queue-worker.service" || problems+=("unit not installed")
    [ -L "$stage/etc/systemd/system/multi-user.target.wants/queue-worker.service" ] || problems+=("unit not enabled")
    grep -q '^queue-worker:' "$stage/etc/passwd" 2>/dev/null || problems+=("user not created")
    [ "$(grep -c '^queue-worker:' "$stage/etc/passwd" 2>/dev/null)" = 1 ] || problems+=("user created twice")
    grep -q '^nats_url=nats://kept.example:4222$' "$stage/etc/queue-worker/env" || problems+=("env file overwritten")
    cmp -s "$scripts_dir/systemd/queue-worker.env" "$stage/etc/queue-worker/env.dist" || problems+=("no env.dist")
    [ "$(stat -c %a "$stage/etc/queue-worker/env")" = 640 ] || problems+=("env file mode not 0640")
    gid="$(awk -F: '$1 == "queue-worker" { print $3 }' "$stage/etc/group")"
    [ -n "$gid" ] && [ "$(stat -c %g "$stage/etc/queue-worker/env")" = "$gid" ] || problems+=("env file group not queue-worker")
    if [ ${#problems[@]} -eq 0 ]; then
        pass "install.sh --root: two runs, binary, user, env kept, unit enabled"
    else
        cat "$tmp/install1.log" "$tmp/install2.log" >&2
        fail "install.sh --root: ${problems[*]}"
    fi
    if command -v systemd-analyze >/dev/null 2>&1; then
        verify_unit "staged /etc/systemd/system/queue-worker.service" \
            "$stage/etc/systemd/system/queue-worker.service" "$stage/usr/local/bin/queue-worker"
    fi
fi

# The README's systemd steps for real, in a booted throwaway container (about 10 s).
if [ "${QW_SKIP_NSPAWN:-0}" = 1 ]; then
    skip "nspawn-check: QW_SKIP_NSPAWN=1"
elif [ -z "$bin" ] || [ "$(id -u)" != 0 ] || ! command -v systemd-nspawn >/dev/null 2>&1; then
    skip "nspawn-check: needs root, a built binary and systemd-nspawn (apt-get install systemd-container)"
elif "$scripts_dir/systemd/nspawn-check.sh" "$bin" >"$tmp/nspawn.log" 2>&1; then
    pass "systemd/nspawn-check.sh: install.sh, start, limits, /healthz, drain on stop under systemd"
else
    cat "$tmp/nspawn.log" >&2
    fail "systemd/nspawn-check.sh"
fi

if command -v shellcheck >/dev/null 2>&1; then
    shell_scripts=("$installer" "$scripts_dir/check-deploy-files.sh" "$scripts_dir/limits-check.sh"
        "$scripts_dir/systemd/nspawn-check.sh")
    if shellcheck "${shell_scripts[@]}"; then
        pass "shellcheck install.sh check-deploy-files.sh limits-check.sh nspawn-check.sh"
    else
        fail "shellcheck install.sh check-deploy-files.sh limits-check.sh nspawn-check.sh"
    fi
else
    skip "shellcheck not found"
fi

if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed" >&2
    exit 1
fi
echo "all deployment files are valid"
