"""The balancer overhead benchmark (`bench/bench_balancer.py` is its command line), one file per
part:

    rig.py          what is measured and how it is started: the fake backend, the kvfleet
                    balancer variants (VARIANTS: add a configuration there), the aiohttp bare
                    relay, nginx, sglang-router; prompts and request bodies
    tools.py        wrk, nginx (apt-get) and sglang-router (its own venv) found or installed
    measure.py      the load generators (loadclient.py in its own process, or wrk) and the CPU
                    accounting around each run (proxy, backend, client, other work per core)
    loadclient.py   the aiohttp load client: open loop (latency), closed loop, SSE streams
    bare_relay.py   the least an aiohttp proxy does: the floor for any proxy built on aiohttp

    latency.py      added latency at a fixed open-loop rate, short and 8k-token prompts
    throughput.py   max non-streaming req/s with the proxy on one core
    sse.py          relayed SSE chunks/s
    client_cost.py  CPU per request of the balancer's upstream client against aiohttp's
    decision.py     one routing decision (prepare, look-up, decide) over a 1M-block index
    profiling.py    where the balancer's CPU goes under load (py-spy, else cProfile)
    goals.py        the goals table over the parts run

Machine record and table printing: bench/common.py. Processes: harness/procs.py.
"""
