#!/usr/bin/env bash
# How the sink's batch defaults were chosen: runs bench/run.sh's full audit
# drain and its steady-rate latency run for several [sink] settings and
# prints one line each. Usage:
#
#   bench/sweep.sh ["max_events = 25; max_wait = \"10ms\"" ...]
#
# Defaults to the combinations in the README. BENCH_EVENTS (default here
# 30000) and BENCH_SECONDS (default here 10) keep each run short.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ $# -eq 0 ]; then
    set -- \
        'max_events = 50; max_wait = "20ms"; pool_size = 1' \
        'max_events = 50; max_wait = "20ms"; pool_size = 2' \
        'max_events = 25; max_wait = "20ms"; pool_size = 2' \
        'max_events = 25; max_wait = "10ms"; pool_size = 2' \
        'max_events = 16; max_wait = "10ms"; pool_size = 3'
fi
export BENCH_EVENTS=${BENCH_EVENTS:-30000} BENCH_SECONDS=${BENCH_SECONDS:-10}
mkdir -p bench/out
summary=bench/out/sweep.md
echo "| [sink] | full pipeline events/s | p50 ms | p99 ms | commit ms |" > "$summary"
echo "|---|---:|---:|---:|---:|" >> "$summary"
for sink in "$@"; do
    BENCH_SINK="$sink" BENCH_ONLY="audit latency" bench/run.sh >/dev/null 2>bench/out/sweep.log \
        || { echo "bench: run failed for $sink; see bench/out/sweep.log" >&2; exit 1; }
    get() { sed -n "s/.*\\b$2=\\([^ ]*\\).*/\\1/p" "bench/out/$1.result" | head -n 1; }
    echo "| \`$sink\` | $(get audit rate) | $(get latency p50_ms) | $(get latency p99_ms) |" \
        "$(get audit commit_ms) |" | tee -a "$summary"
done
