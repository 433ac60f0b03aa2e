#!/usr/bin/env bash
# The Redis state backend against the in-memory one, in one run, alternating:
# closed-loop throughput and p99, an open loop at a fixed rate, round trips
# per decision (Redis INFO commandstats) and bytes per key in Redis.
#
#   bash scripts/bench-redis.sh [ROUNDS] [SECONDS]
#
# Needs: a release build (cargo build --release), redis-server and redis-cli,
# taskset. Pinning: SERVER_CPU (riskgate), CLIENT_CPU (loadgen), REDIS_CPU.
# Writes target/bench/redis/*.json and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
SECS="${2:-8}"
BIN=target/release/riskgate
OUT=target/bench/redis
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
REDIS_CPU="${REDIS_CPU:-1}"
CONNS="${CONNS:-4}"
STREAMS="${STREAMS:-16}"
# Long enough that the figures measure Redis, not the fail-open path; the
# share of STATE_UNAVAILABLE decisions is reported below.
STATE_TIMEOUT="${STATE_TIMEOUT:-100ms}"
PORT=50093
RPORT="${RPORT:-6391}"
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }

rcli() { redis-cli -p "$RPORT" "$@"; }
taskset -c "$REDIS_CPU" redis-server --port "$RPORT" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$OUT" >"$OUT/redis-server.log" 2>&1 &
REDIS=$!
SERVER=""
trap 'kill $SERVER $REDIS 2>/dev/null || true' EXIT
for _ in $(seq 50); do rcli ping >/dev/null 2>&1 && break; sleep 0.1; done

start() { # mode
    local state=memory
    [ "$1" = redis ] && state="redis://127.0.0.1:$RPORT/0"
    taskset -c "$SERVER_CPU" "$BIN" serve --listen "127.0.0.1:$PORT" --no-watch \
        --state "$state" --state-timeout "$STATE_TIMEOUT" >"$OUT/server-$1.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 50); do
        (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server did not start" >&2; exit 1
}
stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""; }

loadgen() { # name, extra args...
    local name=$1; shift
    taskset -c "$CLIENT_CPU" "$BIN" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" \
        --warmup 1s --users 1000000 --json-out "$OUT/$name.json" "$@" >/dev/null 2>"$OUT/$name.txt"
}

# Redis counters of one run: every command's calls, keys, memory.
redis_stats() { # name
    {
        rcli info commandstats
        rcli info memory | grep -E '^used_memory:'
        echo "dbsize:$(rcli dbsize)"
    } | tr -d '\r' >"$OUT/$1.redis.txt"
}

for r in $(seq "$ROUNDS"); do
    for mode in memory redis; do
        rcli flushall >/dev/null
        rcli config resetstat >/dev/null
        start "$mode"
        loadgen "closed-$mode-$r" --connections "$CONNS" --streams "$STREAMS"
        # Let the settles after the last answers land before counting.
        sleep 0.5
        stop
        [ "$mode" = redis ] && redis_stats "closed-redis-$r"
    done
done

# Open loop at half the Redis mode's best closed-loop rate, both modes.
peak=$(python3 -c "import json,glob; print(max(json.load(open(f))['rps'] for f in glob.glob('$OUT/closed-redis-*.json')))")
rate=$(python3 -c "print(int($peak/2))")
for r in $(seq "$ROUNDS"); do
    for mode in memory redis; do
        rcli flushall >/dev/null
        start "$mode"
        loadgen "open-$mode-$r" --rate "$rate" --connections "$CONNS"
        stop
    done
done

# Bytes per key: a sample of each kind after one more Redis run.
rcli flushall >/dev/null
start redis
loadgen "fill-redis" --connections "$CONNS" --streams "$STREAMS"
sleep 0.5
stop
(rcli --scan | head -3000 >"$OUT/keys.txt") || true
: >"$OUT/key-bytes.txt"
while read -r key; do
    echo "$key $(rcli memory usage "$key" samples 0)" >>"$OUT/key-bytes.txt"
done <"$OUT/keys.txt"
redis_stats fill-redis

python3 - "$OUT" "$ROUNDS" "$rate" <<'PY'
import json, re, statistics, sys
out, rounds, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def load(name): return json.load(open(f"{out}/{name}.json"))
def med(xs): return statistics.median(xs)
def lat(rep, q):
    return rep["latency_us"][q] / 1000.0
def row(label, kind, field):
    vals = {}
    for mode in ("memory", "redis"):
        reps = [load(f"{kind}-{mode}-{r}") for r in range(1, rounds + 1)]
        vals[mode] = med([field(x) for x in reps])
    ratio = vals["redis"] / vals["memory"] if vals["memory"] else float("nan")
    print(f"| {label} | {vals['memory']:,.2f} | {vals['redis']:,.2f} | {ratio:.2f} |")
print(f"medians of {rounds} rounds, alternating memory / redis")
print("| | memory | redis | redis / memory |")
print("|---|---:|---:|---:|")
row("closed loop, requests/s", "closed", lambda x: x["rps"])
row("closed loop, STATE_UNAVAILABLE share", "closed", lambda x: x["reasons"].get("STATE_UNAVAILABLE", 0) / max(x["requests"], 1))
row("closed loop, p50 ms", "closed", lambda x: lat(x, "p50"))
row("closed loop, p99 ms", "closed", lambda x: lat(x, "p99"))
row(f"open loop {rate:,}/s, p50 ms", "open", lambda x: lat(x, "p50"))
row(f"open loop {rate:,}/s, p99 ms", "open", lambda x: lat(x, "p99"))
row(f"open loop {rate:,}/s, p99.9 ms", "open", lambda x: lat(x, "p999"))
row(f"open loop {rate:,}/s, STATE_UNAVAILABLE share", "open", lambda x: x["reasons"].get("STATE_UNAVAILABLE", 0) / max(x["requests"], 1))
# Round trips: every command Redis ran, per evaluation answered.
for r in range(1, rounds + 1):
    stats = open(f"{out}/closed-redis-{r}.redis.txt").read()
    calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", stats)}
    rep = load(f"closed-redis-{r}")
    answered = rep["requests"] - rep["errors"]
    cmds = {k: v for k, v in calls.items() if k not in ("flushall", "config", "info", "dbsize", "ping", "script")}
    per = {k: round(v / max(answered, 1), 3) for k, v in cmds.items()}
    print(f"round {r}: {answered:,} answered; commands per answered request: {per}")
sizes = {}
for line in open(f"{out}/key-bytes.txt"):
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        continue
    kind = parts[0].split(":")[1] if ":" in parts[0] else "?"
    sizes.setdefault(kind, []).append(int(parts[1]))
names = {"w": "window", "p": "profile", "r": "request record", "e": "login event"}
for kind, xs in sorted(sizes.items()):
    print(f"{names.get(kind, kind)} keys: {len(xs)} sampled, median {med(xs)} bytes, mean {sum(xs)/len(xs):.0f} bytes (MEMORY USAGE)")
fill = open(f"{out}/fill-redis.redis.txt").read()
used = int(re.search(r"used_memory:(\d+)", fill).group(1))
keys = int(re.search(r"dbsize:(\d+)", fill).group(1))
print(f"after one {load('fill-redis')['rps']:,.0f}/s run: {keys:,} keys, used_memory {used/2**20:,.1f} MiB, {used/max(keys,1):,.0f} bytes per key")
PY
