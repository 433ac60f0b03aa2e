#!/usr/bin/env bash
# Throughput at 1, 2, 4 and 8 server cores, the engine against the baseline,
# with the load generator on other cores; then the open-loop p99 at a fixed
# rate with 4 server cores; then (when redis-server is at hand) the Redis mode
# with 4 server cores. For machines with 16 or more cores.
#
#   bash scripts/bench-scaling.sh [BIN] [SECONDS] [OUT]
#
# Cores: server on 0..N-1, load generator on CLIENT_CPUS (default 8-14),
# redis-server on REDIS_CPU (default 15). h2load runs only with BODY set: the
# dry-run request as a gRPC frame (bench-grpc.sh writes target/bench/body.bin).
set -euo pipefail
BIN="${1:-target/release/riskgate}"
SECS="${2:-6}"
OUT="${3:-target/bench/scaling}"
CLIENT_CPUS="${CLIENT_CPUS:-8-14}"
REDIS_CPU="${REDIS_CPU:-15}"
CONNS="${CONNS:-16}"
STREAMS="${STREAMS:-32}"
RATE="${RATE:-50000}"
WARM_CORES="${WARM_CORES:-1 4}"
PORT=50095
RPORT=6395
mkdir -p "$OUT"
SERVER=""
REDIS=""
trap 'kill $SERVER $REDIS 2>/dev/null || true' EXIT

start() { # cores, extra serve args...
    local cores=$1; shift
    taskset -c "$cores" "$BIN" serve --listen "127.0.0.1:$PORT" --no-watch "$@" \
        >"$OUT/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 100); do
        (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server did not start" >&2; cat "$OUT/server.log" >&2; exit 1
}
stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""; }
loadgen() { # name, args...
    local name=$1; shift
    taskset -c "$CLIENT_CPUS" "$BIN" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" \
        --warmup 1s --users 1000000 --json-out "$OUT/$name.json" "$@" >/dev/null 2>"$OUT/$name.txt"
}

for n in 1 2 4 8; do
    cores="0-$((n - 1))"
    for mode in baseline engine; do
        flag=()
        [ "$mode" = baseline ] && flag=(--baseline)
        start "$cores" "${flag[@]}"
        loadgen "closed-$mode-$n" --connections "$CONNS" --streams "$STREAMS"
        stop
    done
done

# A warm store (see scripts/bench-grpc.sh): a first pass over 100,000 users
# fills it, the measured pass draws other orders from the same users.
for n in $WARM_CORES; do
    for mode in baseline engine; do
        flag=()
        [ "$mode" = baseline ] && flag=(--baseline)
        start "0-$((n - 1))" "${flag[@]}"
        taskset -c "$CLIENT_CPUS" "$BIN" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" \
            --users 100000 --population warm --seed 2 --connections "$CONNS" --streams "$STREAMS" >/dev/null 2>&1
        taskset -c "$CLIENT_CPUS" "$BIN" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" \
            --warmup 1s --users 100000 --population warm --seed 3 --connections "$CONNS" --streams "$STREAMS" \
            --json-out "$OUT/warm-$mode-$n.json" >/dev/null 2>"$OUT/warm-$mode-$n.txt"
        stop
    done
done

for mode in baseline engine; do
    flag=()
    [ "$mode" = baseline ] && flag=(--baseline)
    start 0-3 "${flag[@]}"
    loadgen "open-$mode-4" --rate "$RATE" --connections "$CONNS"
    stop
done

# h2load, an independent client in C (BODY: a prebuilt gRPC frame of a
# dry-run EvaluateRequest, as scripts/bench-grpc.sh builds it).
BODY="${BODY:-}"
[ -n "$BODY" ] || echo "no BODY: the h2load rows are skipped (BODY=target/bench/body.bin)" >&2
if command -v h2load >/dev/null && [ -n "$BODY" ]; then
    threads=$(taskset -c "$CLIENT_CPUS" nproc)
    for n in 1 2 4 8; do
        for mode in baseline engine; do
            flag=()
            [ "$mode" = baseline ] && flag=(--baseline)
            start "0-$((n - 1))" "${flag[@]}"
            taskset -c "$CLIENT_CPUS" h2load -n 600000 -c 32 -m 32 -t "$threads" -d "$BODY" \
                -H 'content-type: application/grpc' -H 'te: trailers' \
                "http://127.0.0.1:$PORT/riskgate.v1.RiskEngine/Evaluate" >"$OUT/h2load-$mode-$n.txt" 2>&1
            stop
        done
    done
fi

if command -v redis-server >/dev/null; then
    taskset -c "$REDIS_CPU" redis-server --port "$RPORT" --bind 127.0.0.1 --save '' \
        --appendonly no --dir "$OUT" >"$OUT/redis.log" 2>&1 &
    REDIS=$!
    sleep 0.5
    for mode in memory redis; do
        state=memory
        [ "$mode" = redis ] && state="redis://127.0.0.1:$RPORT/0"
        start 0-3 --state "$state"
        loadgen "closed-$mode-4cores" --connections "$CONNS" --streams "$STREAMS"
        stop
        start 0-3 --state "$state"
        loadgen "open-$mode-4cores" --rate "$RATE" --connections "$CONNS"
        stop
    done
fi

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = f"{out}/{n}.json"
    return json.load(open(p)) if os.path.exists(p) else None
print("| server cores | baseline req/s | engine req/s | engine / baseline | engine p99 ms |")
print("|---:|---:|---:|---:|---:|")
for n in (1, 2, 4, 8):
    b, e = load(f"closed-baseline-{n}"), load(f"closed-engine-{n}")
    print(f"| {n} | {b['rps']:,.0f} | {e['rps']:,.0f} | {e['rps']/b['rps']:.2f} | {e['latency_us']['p99']/1000:.2f} |")
for n in (1, 2, 4, 8):
    b, e = load(f"warm-baseline-{n}"), load(f"warm-engine-{n}")
    if b and e:
        print(f"warm store, {n} cores: baseline {b['rps']:,.0f} req/s, engine {e['rps']:,.0f} req/s, ratio {e['rps']/b['rps']:.2f}, engine p99 {e['latency_us']['p99']/1000:.2f} ms")
import re
for n in (1, 2, 4, 8):
    got = {}
    for mode in ("baseline", "engine"):
        p = f"{out}/h2load-{mode}-{n}.txt"
        if os.path.exists(p):
            t = open(p).read()
            m = re.search(r"finished in [^,]+, ([\d.]+) req/s", t)
            ok = re.search(r"(\d+) succeeded", t)
            got[mode] = (float(m.group(1)) if m else 0.0, ok.group(1) if ok else "?")
    if len(got) == 2:
        b, e = got["baseline"], got["engine"]
        print(f"h2load {n} cores: baseline {b[0]:,.0f} req/s ({b[1]} ok), engine {e[0]:,.0f} req/s ({e[1]} ok), ratio {e[0]/b[0]:.2f}")
for name in ("open-baseline-4", "open-engine-4", "closed-memory-4cores", "closed-redis-4cores",
             "open-memory-4cores", "open-redis-4cores"):
    r = load(name)
    if r:
        l = r["latency_us"]
        print(f"{name}: {r['rps']:,.0f} req/s, errors {r['errors']}, p50 {l['p50']/1000:.3f} ms, "
              f"p99 {l['p99']/1000:.3f} ms, p99.9 {l['p999']/1000:.3f} ms, max {l['max']/1000:.1f} ms")
PY
