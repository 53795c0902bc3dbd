"""kvfleet's load generator: trace readers, prompt materialization, arrival processes, the async
open-loop client, metrics, reports and plots.

Modules (each small, one job):
    traces     TraceRequest (shared with the simulator), readers for mooncake / azure / burstgpt /
               bailian / sharegpt, reshaping options
    prompts    hash ids -> deterministic token blocks (prefix structure preserved), text prompts
    arrivals   gamma arrivals (vllm bench serve)
    synthetic  length distributions, shared prefixes, sessions
    generate   kvfleet's own multi-tenant agentic traces (Mooncake JSONL); data/ ships one
    client     LoadConfig, run_load (open loop, or closed loop with concurrency), RequestRecord
    metrics    summarize(): vllm bench serve's result keys + cache hit rate, replicas, lag
    report     write_report(), compare(); plots: PNGs (Agg)
    fake_server  an SSE server with a known delay profile, for tests and benchmarks

Typical use from Python:

    from loadgen import LoadConfig, TraceOptions, load_trace, run_load, write_report
    reqs = load_trace("loadgen/data/agentic_small.jsonl", options=TraceOptions(scale_input=1 / 32))
    result = await run_load("http://127.0.0.1:8000", reqs, LoadConfig(model="tiny"))
    paths = write_report(result, "results/loadgen", "baseline")
"""

from loadgen.client import LoadConfig, RequestRecord, RunResult, run_load, run_load_sync
from loadgen.generate import BUNDLED, GenerateConfig, generate, generate_file
from loadgen.metrics import parse_goodput, summarize
from loadgen.prompts import PromptConfig
from loadgen.report import compare, write_report
from loadgen.arrivals import gamma_arrivals
from loadgen.synthetic import LengthDist, SyntheticConfig, retime, synthesize
from loadgen.traces import TraceOptions, TraceRequest, load_trace, write_mooncake

__all__ = [
    "BUNDLED", "GenerateConfig", "LengthDist", "LoadConfig", "PromptConfig", "RequestRecord", "RunResult",
    "SyntheticConfig", "TraceOptions", "TraceRequest", "compare", "gamma_arrivals", "generate", "generate_file",
    "load_trace", "parse_goodput", "retime", "run_load", "run_load_sync", "summarize", "synthesize",
    "write_mooncake", "write_report",
]
