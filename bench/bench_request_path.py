"""CPU per request of the balancer's own per-request steps, in process, without sockets.

Where `bench_balancer.py --parts throughput` gives the whole balancer's CPU per request (HTTP
framing, the upstream client and the log line included), this splits the pure-Python steps a
non-streaming completion goes through, so a change to one of them can be measured on a machine
too noisy for the end-to-end figure: each step is timed with `time.process_time` over
--requests calls, --rounds times, and the table gives the median round (and the spread).

Steps (one replica, as in the throughput benchmark: `precise_prefix`, no KV events, so the
approximate index is looked up and recorded; the answer reports 0 cached tokens, as
bench/fake_backend.py's does):

    parse          decode_json_body + parse_for_routing of the bench's short completion body
    prepare        Router.prepare: tokenize + hash
    route+finish   Router.route (usable replicas, look-ups, candidates, policy, booking) + finish
    usage          proxy.note_usage: the `usage` object read from the answer's tail, counted
    audit          DecisionAudit.record (the decision accounting histograms and counters)
    metrics        the proxy's other per-request series: attempt_metrics, requests, e2e, in-flight
    access line    Proxy._log_access: the request's access line, in the text format, to a file (the
                   balancer's stderr goes to a file in bench_balancer.py), as `kvfleet balancer` sets it up

    .venv/bin/python bench/bench_request_path.py [--requests 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's balancer/, not bench/balancer/

from bench.common import report  # noqa: E402

BODY = json.dumps({"model": "tiny", "max_tokens": 16, "prompt": "You are a helpful assistant. Summarise the "
                   "following in one line: the quick brown fox."}).encode()
ANSWER = json.dumps({"id": "cmpl-bench", "object": "text_completion", "created": 1, "model": "tiny",
                     "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length",
                                  "token_ids": [42]}],
                     "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9,
                               "prompt_tokens_details": {"cached_tokens": 0}}}, separators=(",", ":")).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000, help="calls of each step per round")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per step; the table gives the median round")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    if args.requests < 1 or args.rounds < 1:
        ap.error("--requests and --rounds must be at least 1")

    from balancer.app import Balancer
    from balancer.config import BalancerConfig, ReplicaSpec
    from balancer.proxy import _Outcome, attempt_metrics, note_usage
    from kvfleet import logs
    from protocol.openai_api import decode_json_body, parse_for_routing

    cfg = BalancerConfig(model="tiny", replicas=(ReplicaSpec(url="http://127.0.0.1:9"),), policy="precise_prefix")
    b = Balancer(cfg)
    log_file = tempfile.TemporaryFile("w")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("text", "info", stream=log_file)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(b.start())  # builds the router; its tasks never run while we time
    try:
        for r in b.registry:
            r.healthy = True  # never contacted
        router, audit, m = b.router, b.audit, b.metrics
        req = parse_for_routing(decode_json_body(BODY), "completion")
        prepared = router.prepare(req)
        ids = itertools.count()
        booking = router.route(prepared, "warm-up")
        booking.finish(1)
        rid = booking.replica_id

        outcome = _Outcome(replica=rid, status=200, ttft_s=0.00121, attempts=1, reported_cached=0)

        def route() -> None:
            router.route(prepared, f"q{next(ids)}").finish(1)

        def metrics() -> None:
            attempt_metrics(m, rid, booking.matched_tokens, booking.rr.prompt_tokens, 1e-5)
            m.series(m.inflight, rid).set(0)
            m.series(m.requests, rid, b.policy.name, "2xx").inc()
            m.e2e.observe(0.001)
            m.series(m.inflight, rid).set(0)

        steps = [
            ("parse", lambda: parse_for_routing(decode_json_body(BODY), "completion")),
            ("prepare", lambda: router.prepare(req)),
            ("route+finish", route),
            ("usage", lambda: note_usage(m, rid, ANSWER)),
            ("audit", lambda: audit.record("q", "/v1/completions", booking, 200, 0)),
            ("metrics", metrics),
            ("access line", lambda: b.proxy._log_access(f"kvf-bench-{next(ids)}", "/v1/completions", req, 8, outcome,
                                                        0.00123)),
        ]
        rows, total = [], 0.0
        for name, step in steps:
            for _ in range(min(2000, args.requests)):
                step()  # warm
            rounds = []
            for _ in range(args.rounds):
                t = time.process_time()
                for _ in range(args.requests):
                    step()
                rounds.append((time.process_time() - t) / args.requests * 1e6)
            med = statistics.median(rounds)
            total += med
            rows.append([name, round(med, 2), f"{min(rounds):.2f}-{max(rounds):.2f}"])
        rows.append(["sum of the steps", round(total, 2), ""])
    finally:
        loop.run_until_complete(b.stop())
        loop.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        log_file.close()
    report(f"Balancer per-request steps, CPU us per request, in process (median of {args.rounds} rounds of "
           f"{args.requests})", ["step", "CPU us / request", "rounds min-max"], rows, out=args.out,
           extra={"requests": args.requests, "rounds": args.rounds})


if __name__ == "__main__":
    main()
