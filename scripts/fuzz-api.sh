#!/bin/bash
# API fuzzing: schemathesis (from PyPI) generates requests from the server's
# own OpenAPI document (/v1/openapi.json), including stateful sequences
# (create a sandbox, then exec, fork, files), against a real `zeroboot serve`
# with real guests, and fails on any 5xx response.
#   scripts/fuzz-api.sh [EXAMPLES_PER_OPERATION]     (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-200}"
venv=target/api-fuzz-venv
version=4.32.5
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$version"
fi
log=$(mktemp)
# Sandboxes it pauses go to a directory of its own, removed at the end.
paused=$(mktemp -d)
target/release/zeroboot serve --listen 127.0.0.1:0 --pause-dir "$paused" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$log" "$paused"' EXIT
url=""
for _ in $(seq 1 300); do
  url=$(sed -n 's/^zeroboot: listening on //p' "$log")
  [ -n "$url" ] && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; echo "zeroboot serve exited" >&2; exit 1; }
  sleep 0.2
done
[ -n "$url" ] || { cat "$log" >&2; echo "zeroboot serve did not start" >&2; exit 1; }
# The port proxy is left out: its 502 and 504 are its documented answers
# when nothing in the sandbox listens or answers (tests/tests/ports.rs).
"$venv/bin/st" run "$url/v1/openapi.json" \
  --checks not_a_server_error \
  --exclude-path-regex '/ports/' \
  --max-examples "$examples" \
  --request-timeout 120 \
  --workers 2 \
  --no-color
