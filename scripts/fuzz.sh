#!/bin/bash
# Runs every cargo-fuzz target for a fixed time (CI: scripts/test.sh runs it
# briefly; by hand, run it longer):
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20)
# Needs the nightly toolchain and cargo-fuzz; installs them if missing. The
# instrumented build goes to a target directory outside the clone
# ($ZEROBOOT_FUZZ_TARGET, default ~/.cache/zeroboot-fuzz-target) so that
# clean clones reuse it. Fails if any target finds a crash.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export CARGO_TARGET_DIR="${ZEROBOOT_FUZZ_TARGET:-$HOME/.cache/zeroboot-fuzz-target}"
for target in $(cargo +nightly fuzz list); do
  # Corpus directories start empty in a clean clone; libFuzzer keeps what
  # it finds there for the next run.
  out=$(cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1 2>&1) || {
    echo "$out" | tail -40 >&2
    echo "fuzz: $target failed" >&2
    exit 1
  }
  runs=$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -1)
  echo "fuzz: $target: ${runs:-?} executions in ${seconds} s, no crash"
done
