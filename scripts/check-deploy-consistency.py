#!/usr/bin/env python3
"""Cross-checks the deployment files against each other and against the binary.

Run by scripts/check-deploy-files.sh as
    check-deploy-consistency.py HELP_FILE
where HELP_FILE holds the output of `queue-worker --help` (every environment
variable with its default). Prints one "ok"/"FAIL" line per check; exits 1 when
any check fails. Needs PyYAML.
"""

import re
import sys
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
MIB = 1024 * 1024

# Every env name the OpenFaaS chart's JetStream queue-worker Deployment sets
# (shared/openfaas/openfaas-today.md); the last three only in the
# dedicated-queue chart. Each must appear in the manifest, set or commented.
CHART_ENV = """nats_host nats_port nats_stream nats_durable default_function_name
max_inflight scaling_mode consumer_inactive_threshold consumer_pull_max_messages
gateway_url tls_insecure debug log_encoding nats_stream_replicas ack_wait
limiter_enabled upstream_timeout max_retry_attempts max_retry_wait
initial_retry_wait retry_http_codes backoff queue_name queue_partitions
filter_partition""".split()
# Credentials read from files (issue 12), and the user name that stays plain.
AUTH_ENV = """nats_user nats_token_file nats_password_file nats_creds_file
nats_nkey_seed_file nats_tls_ca_file nats_tls_cert_file nats_tls_key_file""".split()

# Memory model (README "Memory"): base + per in-flight message
# (request held as base64 JSON + decoded body = 1.75 x max_payload, the
# response buffered up to max_response_bytes, ~70 KB for the thread).
BASE = 16 * MIB
REQUEST = int(1.75 * MIB)  # NATS max_payload 1 MiB (the server default)
THREAD = 70 * 1024
# Threads = max_inflight + 13 (measured); sockets = 2 x max_inflight + a few.
EXTRA_TASKS = 64
EXTRA_FILES = 64

failures = 0


def check(ok, what, detail=""):
    global failures
    if ok:
        print(f"ok    {what}")
    else:
        failures += 1
        print(f"FAIL  {what}" + (f": {detail}" if detail else ""), file=sys.stderr)


def help_settings(text):
    """{name: default} from the "Environment variables ... [default]:" block(s)."""
    out = {}
    in_env = False
    for line in text.splitlines():
        if line.strip() and not line.startswith(" "):
            in_env = line.startswith("Environment variables")
            continue
        if in_env:
            m = re.match(r"^  ([a-z][a-z0-9_]*)\s+.*\[([^\[\]]*)\]\s*$", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def memory_needed(inflight, response_cap):
    return BASE + inflight * (REQUEST + response_cap + THREAD)


def systemd_bytes(v):
    m = re.fullmatch(r"(\d+)([KMG]?)", v.strip())
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[m.group(2)]


def k8s_bytes(v):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(v).strip())
    if not m:
        return None
    return int(m.group(1)) * {None: 1, "Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB}[m.group(2)]


def main():
    help_text = Path(sys.argv[1]).read_text(encoding="utf-8")
    settings = help_settings(help_text)
    check(len(settings) >= 20, f"--help lists {len(settings)} environment variables")

    # --- systemd env file --------------------------------------------------
    env_path = SCRIPTS / "systemd/queue-worker.env"
    env_lines = env_path.read_text(encoding="utf-8").splitlines()
    documented = {}  # name -> value of its "#name=value" line
    active = {}
    for line in env_lines:
        m = re.match(r"^(#?)([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if not m:
            continue
        (active if m.group(1) == "" else documented).setdefault(m.group(2), m.group(3))
    missing, wrong = [], []
    for name, default in settings.items():
        if name not in documented:
            missing.append(name)
        elif default != "unset" and not default.startswith("(") and documented[name] != default:
            wrong.append(f"{name}: file says {documented[name]!r}, --help says {default!r}")
    suggestion = "".join(
        f"\n      #{n}={'' if settings[n] == 'unset' or settings[n].startswith('(') else settings[n]}"
        for n in missing
    )
    check(not missing, "env file names every variable --help lists",
          ", ".join(missing) + (f"; add to systemd/queue-worker.env:{suggestion}" if missing else ""))
    check(not wrong, "env file shows the defaults --help prints", "; ".join(wrong))
    unknown = sorted((set(documented) | set(active)) - set(settings))
    check(not unknown, "env file names no variable --help does not know", ", ".join(unknown))

    inflight = int(active.get("max_inflight", settings.get("max_inflight", "50")))
    response_cap = int(active.get("max_response_bytes", settings.get("max_response_bytes", "0")))

    # --- systemd unit --------------------------------------------------------
    unit = (SCRIPTS / "systemd/queue-worker.service").read_text(encoding="utf-8")
    directives = {}
    for line in unit.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            directives.setdefault(m.group(1), []).append(m.group(2))
    unit_env = {}
    for value in directives.get("Environment", []):
        for pair in value.split():
            k, _, v = pair.partition("=")
            unit_env[k] = v
    check(
        all(unit_env.get(k) == v for k, v in active.items() if k in ("max_inflight", "max_response_bytes")),
        "unit Environment= repeats the env file's shipped memory settings",
        f"unit {unit_env}, env file {active}",
    )
    mem_max = systemd_bytes(directives.get("MemoryMax", ["0"])[-1]) or 0
    need = memory_needed(inflight, response_cap)
    check(
        mem_max >= need,
        f"MemoryMax={mem_max // MIB}M holds max_inflight={inflight} x "
        f"max_response_bytes={response_cap} (needs {need / MIB:.0f} MiB)",
    )
    m = re.search(r"allow max_inflight up to (\d+)", unit)
    top = int(m.group(1)) if m else inflight
    tasks = int(directives.get("TasksMax", ["0"])[-1])
    files = int(directives.get("LimitNOFILE", ["0"])[-1].split(":")[-1])
    check(tasks >= top + EXTRA_TASKS, f"TasksMax={tasks} allows max_inflight up to {top} (+{EXTRA_TASKS})")
    check(files >= 2 * top + EXTRA_FILES, f"LimitNOFILE={files} allows max_inflight up to {top} (2x+{EXTRA_FILES})")
    check(
        directives.get("User") == ["queue-worker"],
        "unit runs as the user install.sh creates (User=queue-worker)",
    )

    # --- Kubernetes ----------------------------------------------------------
    k8s = SCRIPTS / "kubernetes"
    docs = [d for d in yaml.safe_load_all((k8s / "queue-worker.yaml").read_text(encoding="utf-8")) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]

    check(deploy["metadata"]["name"] != "queue-worker", "Deployment is not named queue-worker (the Helm chart's name)")
    check(
        pod_labels.get("app") != "queue-worker",
        "pod labels do not match the chart's selector app=queue-worker",
    )
    sel = deploy["spec"]["selector"]["matchLabels"]
    check(all(pod_labels.get(k) == v for k, v in sel.items()), "Deployment selector matches its pod labels")
    check(
        all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items()),
        "Service selector matches the pod labels",
    )

    version = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "Cargo.toml").read_text(encoding="utf-8"), re.M)
    image = f"localhost/queue-worker:{version.group(1)}"
    check(container["image"] == image, f"manifest image is {image} (Cargo.toml version)", container["image"])
    readme = (SCRIPTS / "container/README.md").read_text(encoding="utf-8")
    containerfile = (SCRIPTS / "container/Containerfile").read_text(encoding="utf-8")
    tags = re.findall(r"\s-t\s+(\S+)", readme + containerfile)
    check(tags and all(t == image for t in tags), "container README and Containerfile build that tag", ", ".join(tags))
    kustom = (k8s / "kustomization.yaml").read_text(encoding="utf-8")
    check(f"newTag: {version.group(1)}" in kustom, "kustomization's images example uses that tag")

    for arg in ("RUST_IMAGE", "RUNTIME_IMAGE"):
        m = re.search(rf"^ARG {arg}=(\S+)$", containerfile, re.M)
        ref = m.group(1) if m else ""
        pinned = re.fullmatch(r"[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}", ref) is not None
        floating = re.search(r":(latest|1-[^@]*|[^@]*nightly[^@]*)@", ref) is not None
        check(pinned and not floating, f"{arg} pinned by tag and digest", ref)
    m = re.search(r"rust:(\d+)\.(\d+)\.\d+", containerfile)
    rv = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', (REPO / "Cargo.toml").read_text(encoding="utf-8"), re.M)
    check(
        m and rv and (int(m.group(1)), int(m.group(2))) >= (int(rv.group(1)), int(rv.group(2))),
        "builder image Rust >= rust-version",
    )

    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    manifest_text = (k8s / "queue-worker.yaml").read_text(encoding="utf-8")
    unknown = sorted(set(env) - set(settings) - set(CHART_ENV) - set(AUTH_ENV))
    check(not unknown, "manifest env names are settings or chart names", ", ".join(unknown))
    absent = [n for n in CHART_ENV if not re.search(rf"name: {n}$", manifest_text, re.M)]
    check(not absent, "manifest carries every env name of the OpenFaaS chart", ", ".join(absent))

    k_inflight = int(env.get("max_inflight") or settings["max_inflight"])
    k_cap = int(env.get("max_response_bytes") or settings["max_response_bytes"])
    limit = k8s_bytes(container["resources"]["limits"]["memory"]) or 0
    need = memory_needed(k_inflight, k_cap)
    check(
        limit >= need,
        f"memory limit {limit // MIB}Mi holds max_inflight={k_inflight} x "
        f"max_response_bytes={k_cap} (needs {need / MIB:.0f} MiB)",
    )
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    check(grace > 60, f"terminationGracePeriodSeconds={grace} exceeds drain_timeout (1m)")

    # Secret example + patch: the patch mounts the Secret and names its keys.
    secret = yaml.safe_load((k8s / "nats-credentials.example.yaml").read_text(encoding="utf-8"))
    secret_text = (k8s / "nats-credentials.example.yaml").read_text(encoding="utf-8")
    patch_text = (k8s / "nats-credentials.patch.yaml").read_text(encoding="utf-8")
    patch = yaml.safe_load(patch_text)
    check(patch["metadata"]["name"] == deploy["metadata"]["name"], "credentials patch targets the Deployment")
    vols = patch["spec"]["template"]["spec"]["volumes"]
    check(
        any(v.get("secret", {}).get("secretName") == secret["metadata"]["name"] for v in vols),
        "credentials patch mounts the example Secret",
    )
    mount = patch["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    file_refs = re.findall(rf"value: {re.escape(mount)}/(\S+)", patch_text)
    keys_missing = [k for k in file_refs if not re.search(rf"^\s*#?\s*{re.escape(k)}:", secret_text, re.M)]
    check(file_refs and not keys_missing, "every file the patch names is a key of the Secret example", ", ".join(keys_missing))
    patch_names = set(re.findall(r"name: (nats_[a-z_]+)$", patch_text, re.M))
    check(set(AUTH_ENV) <= patch_names, "credentials patch shows every NATS credential setting",
          ", ".join(sorted(set(AUTH_ENV) - patch_names)))

    sm = yaml.safe_load((k8s / "servicemonitor.yaml").read_text(encoding="utf-8"))
    svc_labels = service["metadata"]["labels"]
    check(
        all(svc_labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
        "ServiceMonitor selects the Service",
    )
    check(
        svc_labels.get(sm["spec"]["jobLabel"]) == "queue-worker",
        'ServiceMonitor jobLabel gives job="queue-worker" (dashboard, alerts)',
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    check(all(e["port"] in ports for e in sm["spec"]["endpoints"]), "ServiceMonitor endpoint ports exist on the Service")

    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
