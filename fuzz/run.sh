#!/usr/bin/env bash
# Builds and runs the fuzz targets on stable Rust for a bounded time, shared between them:
#   decode        the MQTT decoder (beckon-mqtt)
#   records       the broker's TLS 1.3 record reader
#   proxy_header  the PROXY protocol v1/v2 header the broker reads before TLS
#   shared_port   HTTP heads, the WebSocket upgrade and its frames on the broker's shared port
#   http_answers  a proxy's CONNECT answer, HTTP responses and the WebSocket upgrade answer as
#                 the client side (beckon-net) reads them
#   signed        signed wake-ups and relay requests, acks, relay results, the replay guard,
#                 tokens (beckon-identity)
#   config        the broker's configuration file and environment, tenant files
#   api_bodies    the console API's JSON bodies and query strings
#
#   bash fuzz/run.sh [seconds] [target...]   (default 96 s split evenly between the targets, one
#                                            per core at a time; default: every target)
#   bash fuzz/run.sh --build                 only build them (the test command does this in the
#                                            background while its tests run)
#
# Installs cargo-fuzz from crates.io when it is missing. fuzz/seeds/<target> holds the
# committed seeds; new corpus entries go to fuzz/corpus/<target> and each run's log to
# fuzz/logs/<target>.log (both ignored by git). A crash leaves its input in
# fuzz/artifacts/<target> and makes this script fail.
set -euo pipefail
build_only=0
if [[ ${1:-} == --build ]]; then
    build_only=1
    shift
fi
seconds="${1:-96}"
shift || true
cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
declare -A max_len=(
    [decode]=4096 [records]=40000 [proxy_header]=512 [shared_port]=20000
    [http_answers]=20000 [signed]=9000 [config]=8192 [api_bodies]=8192
)
if (($# > 0)); then
    targets=("$@")
else
    targets=(decode records proxy_header shared_port http_answers signed config api_bodies)
fi
each=$((seconds / ${#targets[@]}))
((each > 0)) || each=1
# The workspace's one target folder: the fuzz build lands under its target triple there,
# beside (not over) the tests' build.
target_dir="${CARGO_TARGET_DIR:-$(cd .. && pwd)/target}"
cargo fuzz build --sanitizer none --target-dir "$target_dir"
((build_only == 0)) || exit 0
mkdir -p logs
# One target per core at a time: libFuzzer runs on one thread.
parallel=$(nproc 2>/dev/null || echo 1)
fuzz_one() {
    local target=$1 log="logs/$1.log" status runs
    local dirs=("corpus/$target")
    mkdir -p "corpus/$target"
    [[ -d seeds/$target ]] && dirs+=("seeds/$target")
    # -timeout: one input taking longer than that is a hang, reported like a crash.
    if ! cargo fuzz run "$target" --sanitizer none --target-dir "$target_dir" "${dirs[@]}" -- \
        -max_total_time="$each" -max_len="${max_len[$target]}" -timeout=30 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $target failed; its input is in fuzz/artifacts/$target" >&2
        return 1
    fi
    # libFuzzer's last status line (cov: edges, ft: features, corp: corpus) and its count
    # of executions.
    status=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [^ ]+' || true)
    runs=$(grep -oE 'number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    printf '%-13s %3ss: %s runs, %s\n' "$target" "$each" "${runs:-?}" "${status:-no status line}"
}
for target in "${targets[@]}"; do
    [[ -n ${max_len[$target]:-} ]] || { echo "no fuzz target $target" >&2; exit 2; }
done
failed=0
for ((i = 0; i < ${#targets[@]}; i += parallel)); do
    pids=()
    for target in "${targets[@]:i:parallel}"; do
        fuzz_one "$target" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    ((failed == 0)) || exit 1
done
