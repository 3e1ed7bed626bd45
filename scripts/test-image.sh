#!/bin/bash
# The OCI image (scripts/build-image.sh), run with podman as a user would:
# /dev/kvm passed in, the python template imported from an archive the
# host exported (`zeroboot template export`), then an API smoke test over
# the published port: a one-shot exec, and a sandbox's create, exec, files
# and delete. Needs root, podman, buildah, debootstrap and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e /dev/kvm ] || { echo "test-image: /dev/kvm is missing" >&2; exit 1; }
tag="zeroboot:test-$(git rev-parse --short=12 HEAD)"
./scripts/build-image.sh "$tag"
work=$(mktemp -d)
name="zeroboot-image-test-$$"
cleanup() {
  podman rm -f "$name" >/dev/null 2>&1 || true
  podman rmi -f "$tag" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
target/release/zeroboot template export python -o "$work/python.zbt"
key="image-test-key-0123456789abcdef"
echo "$key" >"$work/api-keys"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# As the DaemonSet's init container and server do, in one container. With
# runc: crun refuses a host whose cgroups are v1 with a v2 hierarchy beside
# them ("hybrid"), as this one's are. Open files and processes set to what
# a confined host grants (podman's defaults ask for more): plenty for one
# server and its workers.
podman --runtime runc run -d --name "$name" --device /dev/kvm \
  --ulimit nofile=16384:16384 --ulimit nproc=16384:16384 \
  -v "$work:/var/lib/zeroboot-import:ro" -p "127.0.0.1:$port:8080" \
  --entrypoint sh "$tag" -c \
  'zeroboot template import /var/lib/zeroboot-import/python.zbt &&
   exec zeroboot serve --listen 0.0.0.0:8080 --api-keys /var/lib/zeroboot-import/api-keys' >/dev/null
url="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
  curl -fsS "$url/v1/health" >/dev/null 2>&1 && break
  podman container exists "$name" && [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] ||
    { podman logs "$name" >&2; echo "test-image: the container exited" >&2; exit 1; }
  sleep 0.2
done
call() {
  curl -fsS -H "Authorization: Bearer $key" -H 'Content-Type: application/json' "$@"
}
fail() {
  podman logs "$name" 2>&1 | tail -20 >&2
  echo "test-image: $*" >&2
  exit 1
}
out=$(call "$url/v1/exec" -d '{"code": "import numpy; print(numpy.arange(7).sum() * 2)"}')
echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["stdout"] == "42\n", r' ||
  fail "one-shot exec: $out"
id=$(call "$url/v1/sandboxes" -d '{}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
call "$url/v1/sandboxes/$id/exec" -d '{"code": "x = 6 * 7"}' >/dev/null
call -X PUT "$url/v1/sandboxes/$id/files/home/user/note.txt" -H 'Content-Type: application/octet-stream' \
  --data-binary 'from the host' >/dev/null
out=$(call "$url/v1/sandboxes/$id/exec" -d '{"code": "print(x, open(\"/home/user/note.txt\").read())"}')
echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["stdout"] == "42 from the host\n", r' ||
  fail "sandbox exec: $out"
call -X DELETE "$url/v1/sandboxes/$id" >/dev/null
status=$(curl -s -o /dev/null -w '%{http_code}' "$url/v1/exec" -d '{"code": "1"}')
[ "$status" = 401 ] || fail "an exec without a key got $status"
echo "test-image: $tag serves: one-shot exec, sandbox exec and files, API keys enforced"
