#!/usr/bin/env bash
# Builds and runs the fuzz targets on stable Rust for a bounded time, shared between them:
#   decode   the MQTT decoder (beckon-mqtt)
#   records  the broker's TLS 1.3 record reader (beckon-broker, feature "fuzzing")
#   bash fuzz/run.sh [seconds]      (default 60, split evenly between the targets)
# Installs cargo-fuzz from crates.io when it is missing. New corpus entries go to
# fuzz/corpus/<target> (ignored by git); fuzz/seeds holds the committed seed packets of the
# decoder. A crash leaves its input in fuzz/artifacts/<target> and makes this script fail.
set -euo pipefail
seconds="${1:-60}"
cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
targets=(decode records)
each=$(( seconds / ${#targets[@]} ))
(( each > 0 )) || each=1
for target in "${targets[@]}"; do
    cargo fuzz build "$target" --sanitizer none
done
mkdir -p corpus/decode corpus/records
cargo fuzz run decode --sanitizer none corpus/decode seeds -- \
    -max_total_time="$each" -max_len=4096 -print_final_stats=1
cargo fuzz run records --sanitizer none corpus/records -- \
    -max_total_time="$each" -max_len=40000 -print_final_stats=1
