#!/usr/bin/env bash
# weir's end-to-end benchmark, in one command:
#
#   bench/run.sh
#
# Builds the plugins and weir (release), generates a backlog of events and,
# for each variant, pre-publishes the backlog to a queue of its own and
# times weir draining it into a fresh database:
#
#   B      blackhole sink, no transforms     (what weir itself costs)
#   pg     postgres sink, no transforms
#   full   the transforms of pipelines/audit.toml into postgres
#   C      COPY of the rows `full` stored, into a fresh audit_logs
#
# then publishes a steady stream with the audit pipeline at its default
# settings and times each event from publish to the commit of its row.
# Prints a table; everything else (logs, pipeline files, raw results) goes
# to bench/out/. Only 127.0.0.1 is used; every queue, exchange and database
# it creates is named weirbench_* and deleted at the end.
#
# Knobs (environment):
#   BENCH_EVENTS   backlog size (100000)
#   BENCH_RATE     steady rate, events/s (2000)
#   BENCH_SECONDS  length of the steady run (30)
#   BENCH_SINK, BENCH_SOURCE
#                  `key = value` lines, `;`-separated, added to the [sink] /
#                  [source] of every run, to try other batch settings; the
#                  table's figures are for none, i.e. weir's defaults
#   BENCH_ONLY     a subset of "blackhole postgres audit copy latency"
#   BENCH_WEIR     a weir binary to run instead of target/release/weir, to
#                  compare two builds on the same backlog
#   BENCH_PERF     perf record options (e.g. "-g"): profile each drain into
#                  bench/out/<variant>.perf.data
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EVENTS=${BENCH_EVENTS:-100000}
RATE=${BENCH_RATE:-2000}
SECONDS_STEADY=${BENCH_SECONDS:-30}
ONLY=${BENCH_ONLY:-blackhole postgres audit copy latency}
OUT=bench/out
ADMIN_DB=postgres://postgres@127.0.0.1:5432/test
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
unset DATABASE_URL WEIR_LOG RUST_LOG
RUN=weirbench_$$
WEIR=${BENCH_WEIR:-target/release/weir}
LOAD=target/release/examples/bench-load
mkdir -p "$OUT"
rm -f "$OUT"/*.result "$OUT"/*.perf.data "$OUT"/table.md

log() { echo "bench: $*" >&2; }
wants() { [[ " $ONLY " == *" $1 "* ]]; }
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 "$ADMIN_DB" "$@"; }
db_url() { echo "postgres://postgres@127.0.0.1:5432/$1"; }
created_dbs=()
created_pipelines=()
weir_pid=""

cleanup() {
    if [ -n "$weir_pid" ]; then kill -TERM "$weir_pid" 2>/dev/null || true; fi
    for p in "${created_pipelines[@]}"; do
        timeout 30 "$LOAD" cleanup "$p" 2>/dev/null || true
    done
    for db in "${created_dbs[@]}"; do
        psql_admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
    done
}
trap cleanup EXIT

new_db() {
    psql_admin -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"
    created_dbs+=("$1")
}

split_lines() { # "a = 1; b = 2" -> repeated --flag 'a = 1' --flag 'b = 2'
    local flag=$1 text=$2 part
    IFS=';' read -ra parts <<< "$text"
    for part in "${parts[@]}"; do
        part=$(echo "$part" | sed 's/^ *//; s/ *$//')
        [ -n "$part" ] && printf '%s\0%s\0' "$flag" "$part"
    done
    return 0
}

log "building the plugins and weir (release)"
plugins/build.sh >/dev/null
cargo build --release --locked -p weir --bin weir --example bench-load

log "generating $EVENTS events"
"$WEIR" sample --count "$EVENTS" --seed 7 --duplicate-every 0 > "$OUT/events.ndjson"
"$WEIR" sample --count $((RATE * SECONDS_STEADY)) --seed 8 --duplicate-every 0 \
    > "$OUT/steady.ndjson"

# Starts weir on a pipeline file; sets weir_pid.
start_weir() {
    local pipeline=$1 logfile=$2
    WEIR_LOG=info WEIR_METRICS_ADDR=127.0.0.1:0 "$WEIR" run "$pipeline" \
        </dev/null >/dev/null 2>"$logfile" &
    weir_pid=$!
}

stop_weir() {
    kill -TERM "$weir_pid" 2>/dev/null || true
    timeout 60 tail --pid="$weir_pid" -f /dev/null || kill -KILL "$weir_pid" 2>/dev/null || true
    wait "$weir_pid" 2>/dev/null || true
    weir_pid=""
}

# drain VARIANT: pre-publish the backlog, start weir, time the drain.
drain() {
    local variant=$1 name="${RUN}_$1" db="" pipeline="$OUT/$1.toml"
    local -a extra=()
    if [ "$variant" != blackhole ]; then
        db=$name
        new_db "$db"
    fi
    mapfile -d '' extra < <(split_lines --sink "${BENCH_SINK:-}"; split_lines --source "${BENCH_SOURCE:-}")
    "$LOAD" pipeline --variant "$variant" --prefix "$name" --db "$(db_url "${db:-none}")" \
        "${extra[@]}" > "$pipeline"
    created_pipelines+=("$pipeline")
    timeout 60 "$LOAD" declare "$pipeline"
    log "$variant: publishing the backlog"
    timeout 300 "$LOAD" publish "$pipeline" --events "$OUT/events.ndjson"
    log "$variant: draining"
    start_weir "$pipeline" "$OUT/$variant.log"
    local perf_pid=""
    if [ -n "${BENCH_PERF:-}" ]; then
        perf record -q -e cpu-clock -F 999 $BENCH_PERF -p "$weir_pid" -o "$OUT/$variant.perf.data" \
            2>/dev/null &
        perf_pid=$!
    fi
    timeout 900 "$LOAD" drain --log "$OUT/$variant.log" --pid "$weir_pid" --expect "$EVENTS" \
        --timeout 840 | tee "$OUT/$variant.result"
    if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
    stop_weir
    if [ -n "$db" ]; then
        local rows
        rows=$(psql -X -At "$(db_url "$db")" -c "SELECT count(*) FROM audit_logs")
        echo "rows=$rows" >> "$OUT/$variant.result"
        [ "$rows" = "$EVENTS" ] || log "$variant: WARNING: $rows rows stored, expected $EVENTS"
    fi
}

COLS="event_id, event_type, service, version, payload, metadata, organization_id, user_id, \
ip_address, user_agent, correlation_id, occurred_at, exchange, routing_key, raw_body, anomalies"

# copy_rate SOURCE_DB: COPY the rows of SOURCE_DB into a fresh audit_logs.
copy_rate() {
    local from=$1 db="${RUN}_copy"
    psql -X -q -v ON_ERROR_STOP=1 "$(db_url "$from")" \
        -c "\\copy (SELECT $COLS FROM audit_logs ORDER BY id) TO '$OUT/rows.csv' WITH (FORMAT csv)"
    new_db "$db"
    psql -X -q -v ON_ERROR_STOP=1 "$(db_url "$db")" -f migrations/postgres/0001_audit_logs.sql
    local t0 t1
    t0=$(date +%s.%N)
    timeout 600 psql -X -q -v ON_ERROR_STOP=1 "$(db_url "$db")" \
        -c "\\copy audit_logs ($COLS) FROM '$OUT/rows.csv' WITH (FORMAT csv)"
    t1=$(date +%s.%N)
    python3 -c "print('rate=%.0f seconds=%.2f' % ($EVENTS / ($t1 - $t0), $t1 - $t0))" \
        | tee "$OUT/copy.result"
}

latency() {
    local name="${RUN}_steady" pipeline="$OUT/steady.toml"
    local -a extra=()
    new_db "$name"
    mapfile -d '' extra < <(split_lines --sink "${BENCH_SINK:-}"; split_lines --source "${BENCH_SOURCE:-}")
    "$LOAD" pipeline --variant audit --prefix "$name" --db "$(db_url "$name")" "${extra[@]}" \
        > "$pipeline"
    created_pipelines+=("$pipeline")
    log "steady: $RATE events/s for $SECONDS_STEADY s, audit pipeline at its defaults"
    start_weir "$pipeline" "$OUT/steady.log"
    timeout $((SECONDS_STEADY + 300)) "$LOAD" latency "$pipeline" --events "$OUT/steady.ndjson" \
        --rate "$RATE" --db "$(db_url "$name")" --log "$OUT/steady.log" --pid "$weir_pid" \
        --timeout $((SECONDS_STEADY + 240)) --dump "$OUT/latency.tsv" | tee "$OUT/latency.result"
    stop_weir
}

for v in blackhole postgres audit; do
    if wants "$v"; then drain "$v"; fi
done
if wants copy; then
    wants audit || { log "copy needs the audit run's rows"; exit 1; }
    copy_rate "${RUN}_audit"
fi
if wants latency; then latency; fi

python3 - "$OUT" "$EVENTS" "$RATE" "$(nproc)" <<'EOF' | tee "$OUT/table.md"
import re, sys, pathlib
out, events, rate, cores = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def read(name):
    p = out / f"{name}.result"
    if not p.exists():
        return {}
    return dict(re.findall(r"(\w+)=(\S+)", p.read_text()))
b, pg, full, c, lat = (read(n) for n in ("blackhole", "postgres", "audit", "copy", "latency"))
def num(d, k):
    return float(d[k]) if k in d else None
def mb(d):
    v = num(d, "peak_rss_kb")
    return f"{v / 1024:.0f} MB" if v else "-"
def cpu(d):
    keys = ("weir_cpu_us", "postgres_cpu_us", "broker_cpu_us")
    return " / ".join(d[k] for k in keys) if all(k in d for k in keys) else "-"
rows = [
    ("B: blackhole sink, no transforms", num(b, "rate"), mb(b), cpu(b)),
    ("postgres sink, no transforms", num(pg, "rate"), mb(pg), cpu(pg)),
    ("full audit pipeline into postgres", num(full, "rate"), mb(full), cpu(full)),
    ("C: COPY of the same rows", num(c, "rate"), "-", "-"),
]
print(f"{events} events, {cores} cores, broker and database on this machine\n")
print("| run | events/s | peak RSS | CPU µs/event: weir / PostgreSQL / RabbitMQ |")
print("|---|---:|---:|---:|")
for name, r, m, u in rows:
    print(f"| {name} | {r:,.0f} |" if r else f"| {name} | - |", m, "|", u, "|")
B, C, F = num(b, "rate"), num(c, "rate"), num(full, "rate")
if B and C and F:
    ceiling = 1 / (1 / B + 1 / C)
    print(f"\nserial ceiling 1/(1/B + 1/C) = {ceiling:,.0f} events/s; "
          f"full / ceiling = {F / ceiling:.2f} (target >= 0.80)")
if lat:
    print(f"\nsteady {rate} events/s for the audit pipeline at its defaults "
          f"({lat['events']} events, {lat['rate']} events/s published): "
          f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
          f"publish to commit (target p99 <= 50 ms); peak RSS {mb(lat)}")
EOF
