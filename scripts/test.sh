#!/bin/bash
# The test command from the README, also run by CI (.ci/run):
# installs dependencies, checks formatting and lints, builds, and runs every
# test, including the real-guest tests (which build or reuse the cached
# template under $ZEROBOOT_CACHE, default ~/.cache/zeroboot).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
./scripts/validate-deploy.sh
cargo build --workspace --release
cargo test --workspace --release -- --test-threads=2
# The Python SDK, installed with pip into its own venv, against a real
# `zeroboot serve` (the tests start one from target/release/zeroboot).
python3 -m venv target/sdk-venv
target/sdk-venv/bin/pip install --quiet ./sdk/python
target/sdk-venv/bin/python -m unittest discover -s sdk/python/tests -v
# The TypeScript SDK: built with its locked dev dependencies, tested with
# node's test runner against a real `zeroboot serve`.
(cd sdk/typescript && npm ci --no-audit --no-fund --silent && npm run --silent build && npm test)
# E2B's own SDKs, unmodified and pinned (tests/e2b), from PyPI and npm,
# against a real `zeroboot serve` with the python and code-interpreter
# templates (the tests start one, and restart it once).
python3 -m venv target/e2b-venv
target/e2b-venv/bin/pip install --quiet -r tests/e2b/requirements.txt
target/e2b-venv/bin/python -m unittest discover -s tests/e2b -p 'test_*.py' -v
(cd tests/e2b && npm ci --no-audit --no-fund --silent && npm test)
# Three nodes in network namespaces behind HAProxy: a sandbox's calls
# reach its node, one-shot execs spread and survive a node's death.
python3 scripts/cluster.py test
# Sandboxes' network against an HTTP and a DNS server in a network
# namespace of the test's own: policies, forks, a flood, 1000 forks.
python3 scripts/network.py test
# The OCI image, built from Debian's packages (its Debian root cached in
# the cache directory) and run with podman: import, serve, smoke test.
./scripts/test-image.sh
# API fuzzing with schemathesis against a real server: no 5xx allowed.
./scripts/fuzz-api.sh 200
# Soak, shortened (the full run is scripts/soak.py with its defaults):
# the server's fds, RSS, threads and worker processes stay flat.
python3 scripts/soak.py --execs 1000 --session-execs 200
# Every cargo-fuzz target for 20 s (nightly; scripts/fuzz.sh N for longer).
./scripts/fuzz.sh 20
