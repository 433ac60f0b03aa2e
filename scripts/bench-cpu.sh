#!/usr/bin/env bash
# Server CPU time per request at a fixed rate: the engine against
# `serve --baseline`, alternating, server and client pinned to separate cores.
#
#   bash scripts/bench-cpu.sh [ROUNDS] [RATE] [USERS] [SECONDS]   # defaults: 3 10000 1000000 8
#
# PACING=tick sends in tokio's 1 ms bursts instead of each request at its
# own time (loadgen --pacing): the server then reads and writes many
# requests per system call, and spends less CPU on each.
#
# 1,000,000 users by default: with few users every one of them bursts, the
# burst rules block nearly everything, and the mix is nothing like traffic.
#
# Why this and not only requests/s or p99: on a shared machine, throughput
# and tail latency move with the neighbours, but the CPU seconds the server
# process spends on a fixed number of requests move much less. At a fixed
# open-loop rate the server is not saturated, so what it costs per request
# is read directly from its own user and system time (/proc/PID/stat), and
# "engine - baseline" is what the engine adds to a served request, with
# the network stack's cold caches included (which the in-process benches,
# running decisions back to back, do not see).
#
# Needs: a release build (cargo build --release), taskset. Writes
# target/bench/cpu-*.json (loadgen reports) and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
RATE="${2:-10000}"
USERS="${3:-1000000}"
SECS="${4:-8}"
PACING="${PACING:-exact}"
BIN=target/release/riskgate
OUT=target/bench
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
PORT="${PORT:-50092}"
TICKS=$(getconf CLK_TCK)
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }

SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true' EXIT

# utime + stime of a process, in clock ticks.
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

run() { # mode round
    local flag=""
    [ "$1" = baseline ] && flag="--baseline"
    taskset -c "$SERVER_CPU" "$BIN" serve $flag --listen "127.0.0.1:$PORT" --no-watch \
        >"$OUT/cpu-server-$1.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 50); do
        (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.1
    done
    local before after
    before=$(ticks "$SERVER")
    taskset -c "$CLIENT_CPU" "$BIN" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" \
        --warmup 1s --users "$USERS" --rate "$RATE" --pacing "$PACING" --connections 4 \
        --json-out "$OUT/cpu-$1-$2.json" >/dev/null 2>"$OUT/cpu-$1-$2.txt"
    after=$(ticks "$SERVER")
    kill "$SERVER"
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
    echo "$before $after" >"$OUT/cpu-$1-$2.ticks"
}

for r in $(seq "$ROUNDS"); do
    for mode in baseline engine; do
        run "$mode" "$r"
    done
done

python3 - "$OUT" "$ROUNDS" "$TICKS" "$RATE" "$USERS" <<'PY'
import json, sys, statistics as st
out, rounds, hz, rate, users = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def one(mode, r):
    u0, s0, u1, s1 = map(int, open(f"{out}/cpu-{mode}-{r}.ticks").read().split())
    rep = json.load(open(f"{out}/cpu-{mode}-{r}.json"))
    # Every request the server answered during the run: the measured ones
    # and the warm-up's (1 s at the rate: an open loop keeps its schedule).
    n = rep["requests"] + float(rate)
    return (u1 - u0) / hz * 1e6 / n, (s1 - s0) / hz * 1e6 / n, rep["latency_us"]["p99"], rep["rps"]
rows = {m: [one(m, r) for r in range(1, rounds + 1)] for m in ("baseline", "engine")}
med = lambda m, i: st.median(x[i] for x in rows[m])
pacing = json.load(open(f"{out}/cpu-baseline-1.json")).get("pacing")
print(f"open loop at {rate}/s ({pacing} pacing), {users} users; medians of {rounds}; server CPU per request\n")
print("                      baseline      engine   engine - baseline")
for i, name in ((0, "user us/request"), (1, "system us/request")):
    b, e = med("baseline", i), med("engine", i)
    print(f"  {name:<18} {b:>10.1f}  {e:>10.1f}   {e - b:>10.1f}")
b = med("baseline", 0) + med("baseline", 1)
e = med("engine", 0) + med("engine", 1)
print(f"  {'total us/request':<18} {b:>10.1f}  {e:>10.1f}   {e - b:>10.1f}")
print(f"  {'p99 us':<18} {med('baseline', 2):>10.0f}  {med('engine', 2):>10.0f}")
print(f"  {'requests/s':<18} {med('baseline', 3):>10.0f}  {med('engine', 3):>10.0f}")
PY
