"""Replay a trace (or a synthetic workload) against an OpenAI-compatible server and measure it.

Open loop: every request leaves at its scheduled time whatever the server does; TTFT, ITL, TPOT
and E2E are measured from the stream as `vllm bench serve` defines them, plus the prefix-cache
hit rate, the serving replica (through the kvfleet balancer) and the generator's own schedule
lag. Writes LABEL.json (vLLM's result keys), LABEL.requests.jsonl, LABEL.md and PNG plots.

Trace formats: mooncake, azure, burstgpt, bailian (JSONL/CSV, detected from the content) and
sharegpt (JSON). Without --trace a synthetic workload is built from --num-requests, --rate,
--input-len, --output-len, --prefix-groups and --sessions. Examples:

    kvfleet loadgen --url http://127.0.0.1:8000 --trace loadgen/data/agentic_small.jsonl \\
        --scale-input 0.03125 --time-scale 0.5 --out results/loadgen --label rr
    kvfleet loadgen --url http://127.0.0.1:8000 --rate 4 --num-requests 200 \\
        --input-len lognormal:300:150 --output-len 32 --prefix-groups 4 --prefix-len 256 \\
        --goodput ttft:500 tpot:50
    kvfleet loadgen --url http://127.0.0.1:8000 --trace mooncake.jsonl --scale-input 0.03 \\
        --sweep-rates 1,2,4 --max-requests 300
    kvfleet loadgen generate --kind agentic --num-requests 500 --seed 1 --out agentic.jsonl
    kvfleet loadgen compare results/loadgen/rr.json results/loadgen/kv.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_D = "kvfleet loadgen"


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", default=None, help="trace file to replay (default: a synthetic workload)")
    g.add_argument("--format", default="auto",
                   choices=["auto", "mooncake", "azure", "burstgpt", "bailian", "sharegpt"], help="trace format")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (0.5 = twice as fast)")
    g.add_argument("--scale-input", type=float, default=1.0,
                   help="multiply prompt lengths and tokens per hash block, keeping prefix sharing "
                        "(e.g. 0.03125 turns Mooncake's 512-token blocks into 16)")
    g.add_argument("--max-requests", type=int, default=None, help="replay at most this many requests")
    g.add_argument("--duration", type=float, default=None, help="replay only requests arriving in the first N s")
    g.add_argument("--spread-ticks", type=float, nargs="?", const=3.0, default=None, metavar="SECONDS",
                   help="spread requests sharing a timestamp over a tick of this many s (Mooncake: ~3)")
    g.add_argument("--keep-failed", action="store_true", help="burstgpt: keep rows with 0 response tokens")
    g.add_argument("--tokenizer", default=None, help="sharegpt: tokenizer.json for lengths (default: bytes)")
    g.add_argument("--num-requests", type=int, default=100, help="synthetic: number of requests")
    g.add_argument("--rate", type=float, default=None,
                   help="synthetic/sharegpt: mean request rate (req/s); with a timed trace: retime it to this rate")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson)")
    g.add_argument("--input-len", default="128", help="synthetic: 128, uniform:64:256 or lognormal:MEAN:STD")
    g.add_argument("--output-len", default="64", help="synthetic: like --input-len")
    g.add_argument("--prefix-groups", type=int, default=0, help="synthetic: number of shared system prompts")
    g.add_argument("--prefix-len", type=int, default=0, help="synthetic: tokens per shared system prompt")
    g.add_argument("--sessions", type=int, default=0, help="synthetic: multi-turn sessions (0 = none)")
    g.add_argument("--think-time", type=float, default=5.0, help="synthetic: mean seconds between turns")
    g.add_argument("--sweep-rates", default=None, help="run once per rate, e.g. 1,2,4 (req/s)")


def _add_client(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("client")
    g.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--model", default="tiny", help="model name sent in each request")
    g.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--token-prompts", dest="token_prompts", action="store_true", default=True,
                      help="send prompts as token ids (default; kvfleet and vLLM accept them)")
    mode.add_argument("--text-prompts", dest="token_prompts", action="store_false",
                      help="send text prompts (printable ASCII, one byte-token per character)")
    g.add_argument("--prepend-bos", action="store_true", help="start token prompts with the byte tokenizer's BOS")
    g.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: keep this many requests in flight, ignoring arrival times")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds without a byte before a request fails")
    g.add_argument("--seed", type=int, default=0, help="seed for prompts, synthetic workloads and tick spreading")
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    g.add_argument("--session-user", action="store_true",
                   help="send each request's session id (generated chat/agentic traces, Bailian, BurstGPT, "
                        "ShareGPT) as the OpenAI `user` field: a balancer with --sessions keeps each session on its "
                        "replica")
    g.add_argument("--class-header", default=None, metavar="NAME",
                   help="send each request's class (its trace's tenant, or --class-mix's) in this header, e.g. "
                        "X-Kvfleet-Class for a balancer with --fairness; the report then has a table per class "
                        "(requests, shed 429s, goodput, TTFT)")
    g.add_argument("--class-mix", default=None, metavar="NAME=SHARE,...",
                   help="give each request a class drawn from these shares (seeded by --seed; a session keeps "
                        "one), e.g. interactive=0.2,batch=0.8; sent in --class-header (default X-Kvfleet-Class)")


def _add_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results")
    g.add_argument("--out", default="results/loadgen", help="folder for LABEL.json, LABEL.requests.jsonl, LABEL.md, PNGs")
    g.add_argument("--label", default="run", help="name of this run in file names and comparisons")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    g.add_argument("--metric-percentiles", default="50,90,99", help="percentiles to report")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _add_client(p)
    _add_workload(p)
    _add_output(p)
    sub = p.add_subparsers(dest="loadgen_action", metavar="{generate,compare}",
                           help="optional: `generate` writes a trace, `compare` tabulates results")
    gen = sub.add_parser("generate", help="write a generated trace: agentic, multi-turn chat or one hot prompt "
                                          "(Mooncake JSONL)",
                         description="Write one of kvfleet's generated workloads as Mooncake JSONL "
                                     "(equal hash id = equal 512-token block): agentic (tenants' shared system "
                                     "prompts, sessions of tool-call loops), chat (multi-turn sessions, each turn "
                                     "carrying the previous turns and answers), hot (single-turn requests, "
                                     "--hot-share of them on one shared system prompt). Example:\n"
                                     "  kvfleet loadgen generate --kind agentic --num-requests 500 --out agentic.jsonl")
    gen.add_argument("--kind", default="agentic", choices=["agentic", "chat", "hot"])
    gen.add_argument("--num-requests", type=int, default=300)
    gen.add_argument("--session-rate", type=float, default=0.5, help="new sessions per second")
    gen.add_argument("--tenants", type=int, default=4)
    gen.add_argument("--burstiness", type=float, default=1.0,
                     help="gamma shape of session arrivals: 1 = Poisson, < 1 = bursts")
    gen.add_argument("--hot-share", type=float, default=0.9,
                     help="--kind hot: share of requests on the hot prompt (the rest over the other tenants)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="output .jsonl path")
    cmp_ = sub.add_parser("compare", help="print results of several runs side by side (markdown)",
                          description="Print loadgen results side by side. Example:\n"
                                      "  kvfleet loadgen compare results/loadgen/a.json results/loadgen/b.json")
    cmp_.add_argument("results", nargs="+", help="LABEL.json files written by `kvfleet loadgen`")
    cmp_.add_argument("--plot", default=None, help="also write the runs' TTFT CDFs to this PNG")


def _err(msg: str) -> int:
    print(f"{_D}: {msg}", file=sys.stderr)
    return 2


def _run_generate(args: argparse.Namespace) -> int:
    from loadgen.generate import GenerateConfig, generate_file

    try:
        cfg = GenerateConfig(kind=args.kind, num_requests=args.num_requests, session_rate=args.session_rate,
                             tenants=args.tenants, burstiness=args.burstiness, hot_share=args.hot_share,
                             seed=args.seed)
    except ValueError as e:
        return _err(f"{e}; see `kvfleet loadgen generate --help`")
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    n = generate_file(out, cfg)
    print(f"wrote {n} requests to {out} (Mooncake JSONL, 512-token blocks); replay it with "
          f"`kvfleet loadgen --url URL --trace {out} --scale-input 0.03125`")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from loadgen.report import compare, load_summary

    try:
        summaries = [load_summary(p) for p in args.results]
    except (OSError, ValueError) as e:
        return _err(str(e))
    print(compare(summaries, [s.get("label") or Path(p).stem for s, p in zip(summaries, args.results)]), end="")
    if args.plot:
        from loadgen.plots import plot_compare_cdf

        print(f"wrote {plot_compare_cdf([Path(p) for p in args.results], summaries, Path(args.plot))}")
    return 0


def build_workload(args: argparse.Namespace):
    """The TraceRequests the arguments describe (raises ValueError/OSError with advice)."""
    from loadgen.synthetic import LengthDist, SyntheticConfig, retime, synthesize
    from loadgen.traces import TraceOptions, apply_options, load_trace

    if args.trace:
        opts = TraceOptions(time_scale=args.time_scale, scale_input=args.scale_input, max_requests=args.max_requests,
                            duration_s=args.duration, spread_ticks=args.spread_ticks, seed=args.seed,
                            keep_failed=args.keep_failed, rate=args.rate or 1.0, burstiness=args.burstiness,
                            tokenizer=args.tokenizer)
        reqs = load_trace(args.trace, args.format, opts)
        if not reqs:
            raise ValueError(f"{args.trace} gave no requests after filtering; loosen --duration/--max-requests")
        if args.rate and args.format != "sharegpt" and reqs[0].text is None:
            reqs = retime(reqs, args.rate)
        return reqs
    cfg = SyntheticConfig(num_requests=args.num_requests, rate=args.rate or 1.0, burstiness=args.burstiness,
                          input_len=LengthDist.parse(args.input_len), output_len=LengthDist.parse(args.output_len),
                          prefix_groups=args.prefix_groups, prefix_len=args.prefix_len, sessions=args.sessions,
                          think_time_s=args.think_time, seed=args.seed)
    reqs = synthesize(cfg)
    opts = TraceOptions(time_scale=args.time_scale, scale_input=args.scale_input, max_requests=args.max_requests,
                        duration_s=args.duration, seed=args.seed)
    return apply_options(reqs, opts)


def _probe(url: str) -> str | None:
    """None if the server answers at all, else what to do."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/").removesuffix("/v1/completions").removesuffix("/v1/chat/completions")
                               + "/v1/models", timeout=5).read()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        return (f"cannot reach {url} ({getattr(e, 'reason', e)}); start a server first, e.g. "
                "`kvfleet replica --port 8000 --model tiny`, or check --url")
    return None


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "loadgen_action", None)
    if action == "generate":
        return _run_generate(args)
    if action == "compare":
        return _run_compare(args)
    if not args.url:
        return _err("give --url of the server to load, e.g. --url http://127.0.0.1:8000 "
                    "(or use `kvfleet loadgen generate` / `kvfleet loadgen compare`)")
    from loadgen.client import LoadConfig, run_load_sync
    from loadgen.metrics import parse_goodput, parse_percentiles
    from loadgen.prompts import PromptConfig
    from loadgen.report import compare, safe_label, write_report

    try:
        goodput = parse_goodput(args.goodput)
        pcts = parse_percentiles(args.metric_percentiles)
        label = safe_label(args.label)
        rates = [float(r) for r in args.sweep_rates.split(",") if r.strip()] if args.sweep_rates else [None]
        cfg = LoadConfig(model=args.model, endpoint=args.endpoint,
                         token_prompts=args.token_prompts and args.endpoint == "completions",
                         prompt=PromptConfig(seed=args.seed, prepend_bos=args.prepend_bos),
                         concurrency=args.concurrency, request_timeout_s=args.request_timeout,
                         progress=False if args.no_progress else None, session_user=args.session_user,
                         class_header=args.class_header or ("X-Kvfleet-Class" if args.class_mix else None))
        base = build_workload(args)
        if args.class_mix:
            from loadgen.synthetic import assign_classes, parse_class_mix

            base = assign_classes(base, parse_class_mix(args.class_mix), args.seed)
    except FileNotFoundError as e:
        return _err(str(e))
    except ValueError as e:
        return _err(f"{e}; see `kvfleet loadgen --help`")
    problem = _probe(args.url)
    if problem:
        return _err(problem)
    from loadgen.synthetic import retime

    summaries = []
    for rate in rates:
        reqs = retime(base, rate) if rate else base
        run_label = f"{label}-r{rate:g}" if rate else label
        print(f"{_D}: {run_label}: {len(reqs)} requests over {reqs[-1].arrival_s:.1f} s to {args.url}", file=sys.stderr)
        result = run_load_sync(args.url, reqs, cfg)
        paths = write_report(result, args.out, run_label, pcts, goodput, plots=not args.no_plots)
        summary = json.loads(paths["json"].read_text())
        summaries.append(summary)
        print(paths["markdown"].read_text())
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        if summary["completed"] == 0:
            first = summary["errors"]["first"][:1]
            return _err(f"every request failed ({first[0] if first else 'no error recorded'}); check that the "
                        f"server at {args.url} serves model {args.model!r} and accepts "
                        f"{'token-id' if cfg.token_prompts else 'text'} prompts (try --text-prompts)")
    if len(summaries) > 1:
        print(compare(summaries))
    return 0
