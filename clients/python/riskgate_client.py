#!/usr/bin/env python3
"""A small Python client for riskgate, the recharge risk engine.

How a platform uses riskgate: before it charges a top-up, it calls Evaluate
with a fresh request_id (its idempotency key), the user, the amount in fen
(1 yuan = 100 fen), the client IP and what it knows of the account. Then:

  * ACTION_ALLOW     -> charge.
  * ACTION_CHALLENGE -> ask for `challenge` (sms, captcha, real_name...) first,
                        then report CHALLENGE_PASSED / CHALLENGE_FAILED.
  * ACTION_BLOCK     -> do not charge; show the reasons' messages to the user.

On a timeout it retries Evaluate with the same request_id: the stored
decision comes back with replayed=True and nothing is counted twice. After
charging it calls ReportOutcome (SUCCEEDED, FAILED, later CHARGEBACK), and it
feeds logins through RecordEvent so rules can see them.

The stubs are generated from proto/riskgate/v1/riskgate.proto at run time
with grpcio-tools, so no generated code is kept in the repository.

    pip install -r clients/python/requirements.txt
    python3 clients/python/riskgate_client.py --addr 127.0.0.1:50051           # one example
    python3 clients/python/riskgate_client.py --addr 127.0.0.1:50051 --check   # self-test
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

import grpc
from google.protobuf import text_format

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def load_stubs(proto_root=PROTO_ROOT):
    """Compiles riskgate.proto into a temp dir and imports (pb2, pb2_grpc)."""
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="riskgate_stubs_")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "riskgate/v1/riskgate.proto"])
    if rc != 0:
        sys.exit(f"protoc failed ({rc}) on {proto_root}/riskgate/v1/riskgate.proto")
    sys.path.insert(0, out)
    try:
        from riskgate.v1 import riskgate_pb2, riskgate_pb2_grpc
    finally:
        sys.path.remove(out)
        shutil.rmtree(out, ignore_errors=True)  # the modules are loaded by now
    return riskgate_pb2, riskgate_pb2_grpc


pb, pb_grpc = load_stubs()


def recharge(amount_fen, verified=True, status=pb.ACCOUNT_STATUS_ACTIVE):
    """An EvaluateRequest for a phone-credit top-up, with fresh request, user and device ids."""
    return pb.EvaluateRequest(
        request_id=f"req-{uuid.uuid4()}", user_id=f"user-{uuid.uuid4().hex[:12]}",
        amount=amount_fen, currency="CNY", channel="app", product="phone_credit",
        target="13800138000", ip="192.0.2.10", device_id=f"dev-{uuid.uuid4().hex[:12]}",
        timestamp_ms=int(time.time() * 1000),
        account=pb.Account(real_name_verified=verified, status=status,
                           has_purchase_history=True))


def brief(message):
    return text_format.MessageToString(message, as_one_line=True)


def codes(decision):
    return [r.code for r in decision.reasons]


def show(decision):
    print(f"action:    {pb.Action.Name(decision.action)}")
    print(f"challenge: {decision.challenge or '-'}")
    print(f"score:     {decision.score}")
    print(f"replayed:  {decision.replayed}")
    print(f"ruleset:   {decision.ruleset_version}")
    for r in decision.reasons:
        print(f"reason:    {r.code}: {r.message}")
    for r in decision.shadow_reasons:
        print(f"shadow:    {r.code}: {r.message}")


def expect_error(call, code, details_prefix=""):
    """Runs call(); returns its grpc.RpcError, or raises if it did not fail that way."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()}"
        assert e.details().startswith(details_prefix), f"details {e.details()!r}"
        return e
    raise AssertionError(f"expected {code.name}, the call succeeded")


def run_checks(stub):
    """Assertions against a server running the shipped rule pack."""
    first = recharge(3000)
    checks = []

    def check(name):
        def register(fn):
            checks.append((name, fn))
        return register

    @check("plain 30-yuan recharge is allowed with no reasons")
    def _():
        d = stub.Evaluate(first, timeout=5)
        assert d.action == pb.ACTION_ALLOW and not d.reasons, f"got {brief(d)}"
        assert d.request_id == first.request_id and not d.replayed

    @check("unverified 5000-yuan recharge is blocked with REAL_NAME_REQUIRED")
    def _():
        d = stub.Evaluate(recharge(500000, verified=False), timeout=5)
        assert d.action == pb.ACTION_BLOCK and "REAL_NAME_REQUIRED" in codes(d), f"got {brief(d)}"

    @check("frozen account is blocked with ACCOUNT_FROZEN")
    def _():
        d = stub.Evaluate(recharge(3000, status=pb.ACCOUNT_STATUS_FROZEN), timeout=5)
        assert d.action == pb.ACTION_BLOCK and "ACCOUNT_FROZEN" in codes(d), f"got {brief(d)}"

    @check("a retried request_id is replayed with the same decision")
    def _():
        d = stub.Evaluate(first, timeout=5)
        assert d.replayed and d.action == pb.ACTION_ALLOW, f"got {brief(d)}"

    @check("same request_id with another amount fails with ALREADY_EXISTS")
    def _():
        changed = pb.EvaluateRequest.FromString(first.SerializeToString())
        changed.amount = 4000
        expect_error(lambda: stub.Evaluate(changed, timeout=5), grpc.StatusCode.ALREADY_EXISTS)

    @check("amount=0 fails with INVALID_ARGUMENT on amount")
    def _():
        expect_error(lambda: stub.Evaluate(recharge(0), timeout=5),
                     grpc.StatusCode.INVALID_ARGUMENT, "amount")

    @check("RecordEvent accepts a LOGIN_FAILED event")
    def _():
        r = stub.RecordEvent(pb.Event(
            event_id=f"evt-{uuid.uuid4()}", user_id=first.user_id,
            kind=pb.EVENT_KIND_LOGIN_FAILED, ip="192.0.2.10", device_id=first.device_id,
            timestamp_ms=int(time.time() * 1000)), timeout=5)
        assert not r.replayed, f"got {brief(r)}"

    @check("ReportOutcome SUCCEEDED for the first request")
    def _():
        r = stub.ReportOutcome(pb.Outcome(
            request_id=first.request_id, user_id=first.user_id,
            kind=pb.OUTCOME_KIND_SUCCEEDED, timestamp_ms=int(time.time() * 1000)), timeout=5)
        assert not r.replayed, f"got {brief(r)}"

    passed = failed = 0
    for name, fn in checks:
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # one failing check must not hide the others
            failed += 1
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else e
            print(f"FAIL {name}: {detail}")
    if failed:
        print(f"error: {failed} check(s) failed against this server", file=sys.stderr, flush=True)
    print(f"{passed} passed, {failed} failed")
    return failed == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", default="127.0.0.1:50051", help="riskgate host:port")
    ap.add_argument("--check", action="store_true", help="run assertions (shipped rule pack)")
    args = ap.parse_args()
    with grpc.insecure_channel(args.addr) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            sys.exit(f"error: no riskgate server reachable at {args.addr}")
        stub = pb_grpc.RiskEngineStub(channel)
        if args.check:
            sys.exit(0 if run_checks(stub) else 1)
        request = recharge(3000)
        print(f"Evaluate {request.request_id}: {request.amount / 100:.2f} yuan "
              f"{request.product} for {request.user_id} from {request.ip}")
        show(stub.Evaluate(request, timeout=5))


if __name__ == "__main__":
    main()
