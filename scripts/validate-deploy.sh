#!/bin/bash
# Validates the Kubernetes manifests under deploy/k8s (or DIR) offline:
#   scripts/validate-deploy.sh [DIR]
# 1. yamllint: YAML syntax, duplicate keys (which YAML parsers otherwise
#    resolve silently to the last one), indentation.
# 2. kubernetes-validate, in strict mode (unknown fields are errors), against
#    the JSON schemas it bundles, generated from Kubernetes' OpenAPI, for the
#    oldest and newest Kubernetes versions we check (K8S_VERSIONS).
#    It reports the first schema error in each object.
#    Resources of a few known CRDs (Gateway API, Envoy Gateway) have no
#    bundled schema: they get the structural checks only, and say so. Any
#    other kind without a schema, such as a misspelt one, is an error.
# 3. Consistency the schemas cannot see: every object names its namespace,
#    each workload's selector matches its pod labels, and each Service
#    selects the pods of some workload here.
# Both tools live in a venv under target/deploy-venv. Only its first creation
# reaches the network (PyPI); later runs reuse it and take about a second.
set -euo pipefail
# DIR is taken relative to where the script was called from.
if [ "$#" -gt 0 ]; then
  dir="$(cd "$1" && pwd)"
fi
cd "$(dirname "$0")/.."
dir="${dir:-deploy/k8s}"
versions="${K8S_VERSIONS:-1.29 1.37}"
venv=target/deploy-venv
requirements="kubernetes-validate==1.37.0 yamllint==1.38.0"

# Reinstall only when the pinned versions change (or the venv is missing).
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
  echo "validate-deploy: installing $requirements into $venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one word per requirement
  "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements
  echo "$requirements" >"$venv/.requirements"
fi

mapfile -t files < <(find "$dir" -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "validate-deploy: no manifests under $dir" >&2
  exit 1
fi

# Both steps run even if the first fails, so that one run shows every problem.
rc=0
echo "validate-deploy: yamllint ${#files[@]} files under $dir"
"$venv/bin/yamllint" --strict --format parsable -d '{
  extends: default,
  rules: {line-length: {max: 120}, document-start: disable, comments: {min-spaces-from-content: 1}}
}' "${files[@]}" || rc=1

"$venv/bin/python" - "$versions" "${files[@]}" <<'EOF' || rc=1
import sys

import kubernetes_validate as kv
import yaml

versions = sys.argv[1].split()
files = sys.argv[2:]
# CRDs whose schemas are not bundled: checked for structure only.
SCHEMALESS_GROUPS = {"gateway.networking.k8s.io", "gateway.envoyproxy.io"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet"}

errors = []
docs = []  # (file, resource)


def fail(where, message):
    errors.append(f"{where}: {message}")
    print(f"FAIL {where}: {message}")


for path in files:
    with open(path) as f:
        try:
            loaded = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            fail(path, f"YAML: {e}")
            continue
    if not loaded:
        fail(path, "no Kubernetes object in file")
    for i, doc in enumerate(loaded):
        where = f"{path}#{i}"
        if not isinstance(doc, dict):
            fail(where, "document is not a mapping")
            continue
        meta = doc.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if not all(isinstance(doc.get(k), str) for k in ("apiVersion", "kind")) or not isinstance(name, str):
            fail(where, "needs apiVersion, kind and metadata.name")
            continue
        docs.append((path, doc))

for path, doc in docs:
    kind, api, meta = doc["kind"], doc["apiVersion"], doc["metadata"]
    where = f"{path} {kind}/{meta['name']}"
    if kind not in CLUSTER_SCOPED and not meta.get("namespace"):
        fail(where, "metadata.namespace is missing (kubectl apply would use the current namespace)")
    group = api.split("/")[0] if "/" in api else ""
    if group in SCHEMALESS_GROUPS:
        print(f"ok   {where}: structure only (no bundled schema for {api})")
        continue
    ok = True
    for version in versions:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            field = ".".join(str(p) for p in e.path) or "(top level)"
            fail(where, f"Kubernetes {version}: {field}: {e.message}")
            ok = False
        except kv.SchemaNotFoundError as e:
            fail(where, e.message)
            ok = False
            break
    if ok:
        print(f"ok   {where}: schema, Kubernetes {', '.join(versions)}")

# Cross-object checks.
pod_labels = []
for path, doc in docs:
    if doc["kind"] not in WORKLOADS:
        continue
    where = f"{path} {doc['kind']}/{doc['metadata']['name']}"
    spec = doc.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        fail(where, f"selector {selector} does not match pod labels {labels}")
    pod_labels.append((doc["metadata"].get("namespace"), labels))
for path, doc in docs:
    if doc["kind"] != "Service":
        continue
    selector = (doc.get("spec") or {}).get("selector") or {}
    ns = doc["metadata"].get("namespace")
    if not any(
        n == ns and all(labels.get(k) == v for k, v in selector.items()) for n, labels in pod_labels
    ):
        fail(f"{path} Service/{doc['metadata']['name']}", f"selector {selector} matches no workload's pods here")

if errors:
    print(f"validate-deploy: {len(errors)} problem(s) in {len(docs)} objects")
    sys.exit(1)
print(
    f"validate-deploy: {len(docs)} objects in {len(files)} files pass the schema and consistency checks "
    f"(kubernetes-validate {kv.__version__}, strict, Kubernetes {', '.join(versions)})"
)
EOF

if [ "$rc" -ne 0 ]; then
  echo "validate-deploy: FAILED for $dir" >&2
  exit 1
fi
echo "validate-deploy: all manifests under $dir are valid"

# The systemd unit (deploy/systemd). systemd-analyze reports problems but
# still exits 0, so any output fails. It also checks that ExecStart names an
# executable: point it at /bin/true, since this runs before the build.
unit=deploy/systemd/zeroboot.service
if [ "$dir" = deploy/k8s ]; then
  command -v systemd-analyze >/dev/null || { echo "validate-deploy: systemd-analyze is missing (package systemd)" >&2; exit 1; }
  tmp=$(mktemp -d)
  sed "s|/usr/local/bin/zeroboot|/bin/true|g" "$unit" >"$tmp/zeroboot.service"
  out=$(systemd-analyze verify "$tmp/zeroboot.service" 2>&1 || echo "systemd-analyze failed")
  rm -rf "$tmp"
  if [ -n "$out" ]; then
    echo "$out" >&2
    echo "validate-deploy: $unit has problems" >&2
    exit 1
  fi
  echo "validate-deploy: $unit passes systemd-analyze verify"
fi
