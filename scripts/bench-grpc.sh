#!/usr/bin/env bash
# gRPC throughput and latency of the engine against `serve --baseline`, in one
# run, alternating, with the server and the client pinned to separate cores.
#
#   bash scripts/bench-grpc.sh [ROUNDS] [SECONDS]
#
# PACING=tick: the open loops send in tokio's 1 ms bursts, as loadgen did
# before session 12 (loadgen --pacing), instead of each request on time.
# PRETOUCH=1GiB: both servers start with --pretouch 1GiB (README,
# "Pretouch"); unset, neither does.
# OPEN_ONLY=PEAK: only the open loops (section 3), at 1/4 and 1/2 of PEAK
# requests/s (the baseline's closed-loop peak from an earlier run): more
# rounds of the tail readings for the same time.
#
# Needs: a release build (cargo build --release), taskset, h2load
# (Debian nghttp2-client), python3 with grpcio-tools (clients/python/requirements.txt).
# Writes target/bench/*.json and prints a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
SECS="${2:-10}"
PACING="${PACING:-exact}"
BIN=target/release/riskgate
OUT=target/bench
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
PORT=50091
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }

# One EvaluateRequest as a gRPC frame for h2load. dry_run: every request is a
# full evaluation (features, rules, combine) that records nothing, so the same
# body can be sent a million times without replays or growing state.
python3 - "$OUT/body.bin" <<'PY'
import struct, sys, tempfile, importlib, os
from grpc_tools import protoc
d = tempfile.mkdtemp()
protoc.main(["protoc", "-Iproto", f"--python_out={d}", "proto/riskgate/v1/riskgate.proto"])
sys.path.insert(0, d)
pb = importlib.import_module("riskgate.v1.riskgate_pb2")
msg = pb.EvaluateRequest(request_id="h2load-1", user_id="u-1", amount=3000, channel="wechat",
    product="phone_credit", target="13800000000", ip="192.0.2.10", device_id="d-1",
    account=pb.Account(real_name_verified=True, status=pb.ACCOUNT_STATUS_ACTIVE,
                       has_purchase_history=True), dry_run=True)
body = msg.SerializeToString()
open(sys.argv[1], "wb").write(struct.pack(">BI", 0, len(body)) + body)
PY

start() { # mode
    local flag=""
    [ "$1" = baseline ] && flag="--baseline"
    [ -n "${PRETOUCH:-}" ] && flag="$flag --pretouch $PRETOUCH"
    taskset -c "$SERVER_CPU" "$BIN" serve $flag --listen "127.0.0.1:$PORT" --no-watch >"$OUT/server-$1.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 50); do
        (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server did not start" >&2; exit 1
}
stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
trap 'kill $SERVER 2>/dev/null || true' EXIT

# Percent of one core that process $1 used over the next $2 seconds ("-"
# when it could not be read: the process had gone).
busy() {
    local a b
    a=$(awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null) || { echo -; return 0; }
    sleep "$2"
    b=$(awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null) || { echo -; return 0; }
    echo $(( (b - a) * 100 / ($(getconf CLK_TCK) * $2) ))
}

# One measured loadgen run, writing $OUT/NAME.json and NAME.txt, and in
# NAME.busy how busy the server's and the client's cores were mid-run: a
# closed loop goes as fast as the slower side, and a ratio means something
# else when the client, not the server, set the pace.
measure() { # name, loadgen args...
    local name=$1; shift
    taskset -c "$CLIENT_CPU" "$BIN" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" \
        --warmup 1s --json-out "$OUT/$name.json" "$@" >/dev/null 2>"$OUT/$name.txt" &
    # From the end of the warm-up second to a second before the end.
    local client=$! span=$((SECS > 1 ? SECS - 1 : 1))
    sleep 1
    busy "$SERVER" "$span" >"$OUT/$name.server" &
    local s=$!
    busy "$client" "$span" >"$OUT/$name.client" &
    wait "$s" $!
    echo "$(cat "$OUT/$name.server") $(cat "$OUT/$name.client")" >"$OUT/$name.busy"
    wait "$client"
}

loadgen() { # name, extra args...
    local name=$1; shift
    measure "$name" --users 1000000 "$@"
}

h2() { # name
    taskset -c "$CLIENT_CPU" h2load -n 200000 -c 16 -m 16 -d "$OUT/body.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$PORT/riskgate.v1.RiskEngine/Evaluate" >"$OUT/$1.txt" 2>&1
}

# 1. Closed loop (loadgen, 4 connections x 16 streams; a fresh server and
# 1,000,000 users, so nearly every user is new) and h2load, alternating.
[ -n "${OPEN_ONLY:-}" ] || for r in $(seq "$ROUNDS"); do
    for mode in baseline engine; do
        start "$mode"
        loadgen "closed-$mode-$r" --connections 4 --streams 16
        h2 "h2load-$mode-$r"
        stop
    done
done

# 2. Closed loop on a warm store: a server that has been up serves mostly
# users it knows. A first pass (seed 2) over a population of 100,000 users
# fills the store; the measured pass (seed 3) draws other orders from the
# same users: both name one population (--population), without which each
# run would send as users of its own. (Section 1 measures the harder case:
# a fresh server, where nearly every one of 1,000,000 users is new, so most
# requests insert keys.)
[ -n "${OPEN_ONLY:-}" ] || for r in $(seq "$ROUNDS"); do
    for mode in baseline engine; do
        start "$mode"
        taskset -c "$CLIENT_CPU" "$BIN" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" \
            --users 100000 --population warm --seed 2 --connections 4 --streams 16 >/dev/null 2>&1
        measure "warm-$mode-$r" --users 100000 --population warm --seed 3 --connections 4 --streams 16
        stop
    done
done

# 3. Open loop at a quarter and a half of the baseline's best closed-loop rate.
peak=${OPEN_ONLY:-$(python3 -c "import json,glob; print(max(json.load(open(f))['rps'] for f in glob.glob('$OUT/closed-baseline-*.json')))")}
for share in 4 2; do
    rate=$(python3 -c "print(int($peak/$share))")
    for r in $(seq "$ROUNDS"); do
        for mode in baseline engine; do
            start "$mode"
            loadgen "open$share-$mode-$r" --rate "$rate" --pacing "$PACING" --connections 4
            stop
        done
    done
done

python3 - "$OUT" "$ROUNDS" "${OPEN_ONLY:-}" <<'PY'
import glob, json, os, re, sys, statistics as st
out, rounds, open_only = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def lg(name): return json.load(open(f"{out}/{name}.json"))
def h2(name):
    t = open(f"{out}/{name}.txt").read()
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", t).group(1))
    ok = re.search(r"(\d+) succeeded", t).group(1)
    return rps, ok
med = lambda xs: st.median(xs)
print(f"rounds: {rounds}; medians; server on one core, client on another\n")
R = range(1, rounds+1)
def row(label, b, e):
    """The medians and their ratio, then each round's ratio (engine/baseline
    of the same round): how far the rounds spread is part of the figure."""
    per = ", ".join(f"{y/x:.2f}" for x, y in zip(b, e))
    print(f"  {label:<29}{med(b):>10.0f}  {med(e):>10.0f}   {med(e)/med(b):>6.2f}   rounds: {per}")
def closed_rows():
    """The closed loops and h2load (sections 1 and 2)."""
    print("closed loop (loadgen 4 x 16)      baseline      engine   engine/baseline")
    row("requests/s", [lg(f"closed-baseline-{r}")["rps"] for r in R], [lg(f"closed-engine-{r}")["rps"] for r in R])
    row("p99 us", [lg(f"closed-baseline-{r}")["latency_us"]["p99"] for r in R],
        [lg(f"closed-engine-{r}")["latency_us"]["p99"] for r in R])
    def busy(kind):
        """Median share of a core the server and the client used, each mode."""
        def side(mode, i):
            got = [open(f"{out}/{kind}-{mode}-{r}.busy").read().split()[i] for r in R]
            got = [int(x) for x in got if x != "-"]
            return med(got) if got else "-"
        print(f"  {'busy (server / client)':<29}{side('baseline', 0):>5}% / {side('baseline', 1)}%"
              f"   {side('engine', 0):>3}% / {side('engine', 1)}%")
    busy("closed")
    print("closed loop, warm store (100k users, a first pass fills it)")
    row("requests/s", [lg(f"warm-baseline-{r}")["rps"] for r in R], [lg(f"warm-engine-{r}")["rps"] for r in R])
    busy("warm")
    print("h2load (16 x 16, dry-run body)")
    row("requests/s", [h2(f"h2load-baseline-{r}")[0] for r in R], [h2(f"h2load-engine-{r}")[0] for r in R])
if not open_only:
    closed_rows()
# A run with failures does not measure what its row says: a server that
# fails fast looks fast.
warned = False
kinds = ("open",) if open_only else ("closed-", "warm-", "open")
for name in sorted(f for p in kinds for f in glob.glob(f"{out}/{p}*.json")):
    r = json.load(open(name))
    if r.get("errors"):
        warned = True
        print(f"  WARNING {os.path.basename(name)}: {r['errors']} errors")
for name in [] if open_only else sorted(glob.glob(f"{out}/h2load-*.txt")):
    m = re.search(r"(\d+) total, .*?(\d+) succeeded", open(name).read())
    if not m or m.group(1) != m.group(2):
        warned = True
        print(f"  WARNING {os.path.basename(name)}: not every h2load request succeeded")
if not warned:
    print("  every run: no errors" + ("" if open_only else ", every h2load request succeeded"))
for share in (4, 2):
    rate = lg(f"open{share}-baseline-1")["rate"]
    pacing = lg(f"open{share}-baseline-1").get("pacing")
    print(f"open loop at 1/{share} of the baseline peak ({rate:.0f}/s, {pacing} pacing)")
    for k in ("p50", "p99", "p999"):
        row(f"{k} us", [lg(f"open{share}-baseline-{r}")["latency_us"][k] for r in R],
            [lg(f"open{share}-engine-{r}")["latency_us"][k] for r in R])
    # Sends the client made over 1 ms after their due time (its own core was
    # busy or descheduled): timed from the due time, so the delay is in the
    # latency above, on either side.
    late = lambda mode: " ".join(str(lg(f"open{share}-{mode}-{r}")["late"]) for r in R)
    print(f"  {'late sends, each round':<29}{late('baseline'):>10}  {late('engine'):>10}")
PY
