#!/usr/bin/env bash
# Two builds of the engine against each other over gRPC, alternating: the
# A/B every change to the hot path is judged by (BENCHMARKS.md, "Session 25").
#
#   bash scripts/bench-ab.sh ROUNDS OLD_BINARY NEW_BINARY
#
# Each run starts a fresh server from one binary on core 0 and drives it
# with that binary's loadgen (4 connections x 16 streams) from core 1 for
# SECS seconds (default 8) after 1 s of warm-up, then stops it. Rounds
# alternate the binaries. Unset, a run is a fresh store of 1M users; WARM=1
# fills a store of 100k users with a first pass and measures a second.
# Prints "round binary requests/s server-RSS".
#
# Keep each binary: cp target/release/riskgate /tmp/riskgate-old, build the
# change, and compare /tmp/riskgate-old with target/release/riskgate.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="$1"; A="$2"; B="$3"
SECS="${SECS:-8}"
PORT="${PORT:-50096}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for round in $(seq "$ROUNDS"); do
  for bin in "$A" "$B"; do
    taskset -c 0 "$bin" serve --listen "127.0.0.1:$PORT" --no-watch > "$OUT/server.log" 2>&1 &
    server=$!
    for _ in $(seq 50); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
    users=(--users 1000000)
    if [ -n "${WARM:-}" ]; then
      taskset -c 1 "$bin" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" --users 100000 \
        --population warm --seed 2 --connections 4 --streams 16 > /dev/null 2>&1
      users=(--users 100000 --population warm --seed 3)
    fi
    taskset -c 1 "$bin" loadgen --addr "127.0.0.1:$PORT" --duration "${SECS}s" --warmup 1s \
      --json-out "$OUT/run.json" --connections 4 --streams 16 "${users[@]}" > "$OUT/loadgen.log" 2>&1 || { cat "$OUT/loadgen.log" >&2; exit 1; }
    rps=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['rps']))" "$OUT/run.json")
    rss=$(awk '/RssAnon/ {printf "%.0fMiB", $2/1024}' "/proc/$server/status")
    kill "$server"; wait "$server" 2>/dev/null || true
    echo "$round $bin $rps $rss"
  done
done
