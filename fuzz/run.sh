#!/usr/bin/env bash
# Builds and runs the MQTT decoder fuzz target on stable Rust for a bounded time.
#   bash fuzz/run.sh [seconds]      (default 60)
# Installs cargo-fuzz from crates.io when it is missing. New corpus entries go to
# fuzz/corpus/decode (ignored by git); fuzz/seeds holds the committed seed packets.
# A crash leaves its input in fuzz/artifacts/decode and makes this script fail.
set -euo pipefail
seconds="${1:-60}"
cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
mkdir -p corpus/decode
cargo fuzz build decode --sanitizer none
exec cargo fuzz run decode --sanitizer none corpus/decode seeds -- \
    -max_total_time="$seconds" -max_len=4096 -print_final_stats=1
