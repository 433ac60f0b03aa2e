#!/usr/bin/env bash
# The engine against `serve --baseline` on a machine with cores to spare:
# alternating rounds at each server core count in CORES (closed loop over
# 1,000,000 users on a fresh server, and h2load with the dry-run body), then
# open loops. bench-scaling.sh gives one run per point; this gives medians.
#
#   bash scripts/bench-rounds.sh [BIN] [ROUNDS] [OUT]
#
# CORES         server core counts for the closed loops (default "1 4"); the
#               server runs on cores 0..N-1
# OPEN          open loops, each CORES:SHARE or CORES:RATE, where SHARE is
#               1/4 or 1/2 of that core count's best baseline closed loop
#               and RATE a fixed rate (default "4:1/4 4:1/2 1:1/4 4:50000")
# CLIENT_CPUS   where loadgen and h2load run (default 8-14)
# SECS          seconds a loadgen run measures, after 1 s of warm-up (5)
# BODY          the dry-run request as a gRPC frame (scripts/bench-grpc.sh
#               writes one to target/bench/body.bin); no h2load without it
#
# Writes OUT (default target/bench/rounds) and prints one line a measure:
# the medians of the rounds, their ratio, and each round's ratio.
set -euo pipefail
BIN="${1:-target/release/riskgate}"
ROUNDS="${2:-3}"
OUT="${3:-target/bench/rounds}"
CORES="${CORES:-1 4}"
OPEN="${OPEN:-4:1/4 4:1/2 1:1/4 4:50000}"
CLIENT_CPUS="${CLIENT_CPUS:-8-14}"
SECS="${SECS:-5}"
BODY="${BODY:-}"
[ -n "$BODY" ] || echo "no BODY: the h2load rows are skipped (BODY=target/bench/body.bin, which bench-grpc.sh writes)" >&2
PORT=50096
mkdir -p "$OUT"
SERVER=""
trap 'kill $SERVER 2>/dev/null || true' EXIT

start() { # cores, mode
    local flag=""
    [ "$2" = baseline ] && flag=--baseline
    taskset -c "0-$(($1 - 1))" "$BIN" serve $flag --listen "127.0.0.1:$PORT" --no-watch \
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
    timeout 120 taskset -c "$CLIENT_CPUS" "$BIN" loadgen --addr "127.0.0.1:$PORT" \
        --duration "${SECS}s" --warmup 1s --users 1000000 --connections 16 \
        --json-out "$OUT/$name.json" "$@" >/dev/null 2>"$OUT/$name.txt"
}
h2() { # name
    local threads
    threads=$(taskset -c "$CLIENT_CPUS" nproc)
    timeout 120 taskset -c "$CLIENT_CPUS" h2load -n 600000 -c 32 -m 32 -t "$threads" -d "$BODY" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$PORT/riskgate.v1.RiskEngine/Evaluate" >"$OUT/$1.txt" 2>&1
}

for r in $(seq "$ROUNDS"); do
    for c in $CORES; do
        for mode in baseline engine; do
            start "$c" "$mode"
            loadgen "closed-$mode-$c-$r" --streams 32
            if [ -n "$BODY" ]; then h2 "h2load-$mode-$c-$r"; fi
            stop
        done
    done
done

for spec in $OPEN; do
    c=${spec%%:*}
    what=${spec#*:}
    if [[ "$what" == */* ]]; then
        rate=$(python3 -c "import json; print(int(max(json.load(open(f'$OUT/closed-baseline-$c-{r}.json'))['rps'] for r in range(1, $ROUNDS + 1)) / ${what#*/}))")
    else
        rate=$what
    fi
    for r in $(seq "$ROUNDS"); do
        for mode in baseline engine; do
            start "$c" "$mode"
            loadgen "open-$c-$rate-$mode-$r" --rate "$rate"
            stop
        done
    done
done

python3 - "$OUT" "$ROUNDS" "$CORES" <<'PY'
import glob, json, os, re, sys, statistics as st
out, rounds, cores = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
R = range(1, rounds + 1)
def lg(name): return json.load(open(f"{out}/{name}.json"))
def h2(name):
    t = open(f"{out}/{name}.txt").read()
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", t)
    ok = re.search(r"(\d+) total, .*?(\d+) succeeded", t)
    if not (m and ok and ok.group(1) == ok.group(2)):
        print(f"  WARNING {name}: not every h2load request succeeded")
    return float(m.group(1)) if m else 0.0
def row(label, b, e):
    per = ", ".join(f"{y / x:.2f}" for x, y in zip(b, e))
    print(f"{label:<44}{st.median(b):>10,.0f}{st.median(e):>10,.0f}{st.median(e) / st.median(b):>7.2f}   rounds: {per}")
print(f"{'medians of ' + str(rounds) + ' rounds':<44}{'baseline':>10}{'engine':>10}{'ratio':>7}")
for c in cores:
    row(f"{c} cores, loadgen closed, req/s",
        [lg(f"closed-baseline-{c}-{r}")["rps"] for r in R], [lg(f"closed-engine-{c}-{r}")["rps"] for r in R])
    if os.path.exists(f"{out}/h2load-baseline-{c}-1.txt"):
        row(f"{c} cores, h2load, req/s",
            [h2(f"h2load-baseline-{c}-{r}") for r in R], [h2(f"h2load-engine-{c}-{r}") for r in R])
opens = sorted({re.sub(r"-(baseline|engine)-\d+\.json$", "", os.path.basename(p))
                for p in glob.glob(f"{out}/open-*.json")}, key=lambda s: [int(x) for x in s.split("-")[1:]])
for o in opens:
    c, rate = o.split("-")[1:]
    for k in ("p50", "p99", "p999"):
        row(f"{c} cores, open loop {int(rate):,}/s, {k} us",
            [lg(f"{o}-baseline-{r}")["latency_us"][k] for r in R], [lg(f"{o}-engine-{r}")["latency_us"][k] for r in R])
    late = lambda m: " ".join(str(lg(f"{o}-{m}-{r}")["late"]) for r in R)
    print(f"{'  late sends, each round':<44}{late('baseline'):>10}  {late('engine')}")
for p in sorted(glob.glob(f"{out}/*.json")):
    if json.load(open(p)).get("errors"):
        print(f"  WARNING {os.path.basename(p)}: {json.load(open(p))['errors']} errors")
PY
