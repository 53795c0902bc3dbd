"""Fault injection under load for a local fleet: the engine of tests/test_faults.py,
tests/test_soak.py, bench/bench_faults.py and bench/bench_soak.py.

A `ChaosFleet` runs simulated replicas and a balancer as real subprocesses on loopback, each
restartable on the ports it first bound (so the balancer's view of it - URL, event endpoints -
stays valid across a restart). `run_scenario` sends open-loop load through the balancer
(`loadgen.client.run_load`), injects one fault while the load runs, and measures:

- every request's fate: completed; completed after a failover or a retry (the balancer's
  `kvfleet_failovers_total` / `kvfleet_retries_total`); errored *explicitly* (an HTTP error
  status, an in-band error event, or a refused connection - the client knows it was not
  served); or *lost* (a timeout, a stream cut without an error, anything else). Lost must be 0.
- index recovery: seconds from the fault's end until, for every replica, the balancer's
  `GET /admin/index` equals the replica's `GET /kv_cache_state` at the same KV-event seq with
  the subscriber in sync (sampled every 20 ms, under the continuing load);
- the balancer's VmRSS and open descriptors (/proc/PID) before and after.

Faults (`FAULTS`):
    kill9            SIGKILL a replica while streams run on it, restart it 1 s later
    sigstop          SIGSTOP a replica for `stop_s` (5 s), then SIGCONT
    cut_events       the replica's publisher sends nothing on PUB for `cut_s` (3 s), through
                     its test hook (POST /_test/mute_kv_events, KVFLEET_TEST_HOOKS=1): batches
                     are lost on the wire as on a cut link, while the replica keeps serving
    restart_balancer SIGTERM the balancer (in-flight requests finish), start a new process on
                     the same port: it rebuilds its index from the replicas' snapshots
    restart_replica  SIGTERM a replica (it drains), start it again on the same ports: its KV
                     seq starts over at 0 and the balancer resyncs
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from harness import procs
from harness.procs import fd_breakdown, proc_stats

SIM_ARGS = ("--engine", "sim", "--preset", "llama3-8b-h100", "--model", "tiny", "--num-blocks", "2048",
            "--max-model-len", "4096")
FAULTS = ("kill9", "sigstop", "cut_events", "restart_balancer", "restart_replica")
_PORT = re.compile(r":(\d+)$")


def _port(url: str) -> str:
    m = _PORT.search(url.rstrip("/"))
    assert m, url
    return m.group(1)


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def counter_total(metrics_text: str, name: str) -> float:
    """The sum of a counter's samples over all label sets."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Member:
    """One restartable process: the args of its first start, then its bound ports pinned."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: procs.Proc | None = None

    def start(self) -> procs.Proc:
        self.proc = procs.start(self.args, env=self.env)
        return self.proc

    def pin_ports(self) -> None:
        """Rewrite the args so that a restart binds the same ports as now."""
        p = self.proc
        assert p is not None
        args = list(self.args)

        def setv(flag: str, value: str) -> None:
            args[args.index(flag) + 1] = value

        setv("--port", _port(p.url))
        if p.events:
            setv("--kv-events-endpoint", p.events)
        if p.replay:
            setv("--kv-events-replay-endpoint", p.replay)
        self.args = args

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.popen.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None


class ChaosFleet:
    """`replicas` simulated replicas (KV events on, test hooks on) and a balancer in front."""

    def __init__(self, replicas: int = 2, replica_args: tuple[str, ...] = SIM_ARGS,
                 balancer_args: tuple[str, ...] = ("--policy", "precise_prefix")) -> None:
        env = {"KVFLEET_TEST_HOOKS": "1"}
        base = ["replica", "--host", "127.0.0.1", "--port", "0", *replica_args,
                "--kv-events-endpoint", "tcp://127.0.0.1:0", "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]
        self.replicas = [Member(list(base), env) for _ in range(replicas)]
        self.balancer = Member(["balancer", "--host", "127.0.0.1", "--port", "0", "--model", "tiny", *balancer_args])
        self.balancer_args = balancer_args

    def __enter__(self) -> "ChaosFleet":
        try:
            for m in self.replicas:
                m.start()
                m.pin_ports()
            for m in self.replicas:
                self.balancer.args += ["--replica", m.proc.replica_arg]
            self.balancer.start()
            self.balancer.pin_ports()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for m in [self.balancer, *self.replicas]:
            if m.proc is not None:
                if m.alive():
                    os.kill(m.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                m.proc.stop()

    @property
    def url(self) -> str:
        return self.balancer.proc.url

    # ------------------------------------------------------------------ observation
    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def consistency(self) -> dict[str, str]:
        """Per replica: "ok", or why the index and the replica's cache differ right now."""
        out = {}
        for m in self.replicas:
            rid = m.proc.url
            try:
                rep = get_json(rid + "/kv_cache_state")
                idx = get_json(self.url + "/admin/index?replica=" + urllib.request.quote(rid, safe=""))
            except (OSError, ValueError) as e:
                out[rid] = f"unreachable: {e}"
                continue
            if not idx["events_in_sync"]:
                out[rid] = "subscriber not in sync"
            elif rep["pending_events"]:
                out[rid] = "replica has unpublished events"
            elif idx["last_seq"] != rep["kv_seq"]:
                out[rid] = f"seq differs (index {idx['last_seq']}, replica {rep['kv_seq']})"
            elif idx["block_hashes"] != rep["block_hashes"]:
                a, b = set(idx["block_hashes"]), set(rep["block_hashes"])
                out[rid] = f"blocks differ at the same seq: {len(a - b)} extra, {len(b - a)} missing"
            else:
                out[rid] = "ok"
        return out

    def wait_consistent(self, timeout_s: float, poll_s: float = 0.02) -> float | None:
        """Seconds until every replica is "ok" (None: not within timeout_s)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if all(v == "ok" for v in self.consistency().values()):
                return time.monotonic() - t0
            time.sleep(poll_s)
        return None

    def balancer_fds(self, settle_s: float = 3.0) -> dict[str, int]:
        """The balancer's descriptors by kind (`fd_breakdown`), once client connections are
        closed (waits up to `settle_s` for them to go)."""
        upstream = {int(_port(m.proc.url)) for m in self.replicas}
        deadline = time.monotonic() + settle_s
        while True:
            fds = fd_breakdown(self.balancer.pid, int(_port(self.url)), upstream)
            if fds["client"] == 0 or time.monotonic() >= deadline:
                return fds
            time.sleep(0.1)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every replica is healthy with its breaker closed; a half-open breaker closes on a
        successful trial request, so short requests are sent meanwhile."""
        deadline = time.monotonic() + timeout_s
        n = 0
        while time.monotonic() < deadline:
            try:
                reps = get_json(self.url + "/admin/replicas")["replicas"]
                if all(r["healthy"] and r["breaker"] == "closed" for r in reps):
                    return
                if all(r["healthy"] and r["breaker"] != "open" for r in reps):
                    n += 1  # a new prompt each time: no cached prefix pins it to one replica
                    body = json.dumps({"model": "tiny", "prompt": f"warm up {n} {time.time()}", "max_tokens": 1})
                    req = urllib.request.Request(self.url + "/v1/completions", data=body.encode(),
                                                 headers={"Content-Type": "application/json"})
                    urllib.request.urlopen(req, timeout=10).read()
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the fleet did not become healthy")

    # ------------------------------------------------------------------ faults
    def victim_with_streams(self, wait_s: float = 10.0, poll_s: float = 0.005) -> Member:
        """The replica with the most in-flight requests at the balancer, waiting (up to `wait_s`) until
        one has any: a fault meant to hit running streams must not land in a lull between requests."""
        deadline = time.monotonic() + wait_s
        while True:
            reps = {r["id"]: r["inflight_requests"] for r in get_json(self.url + "/admin/replicas")["replicas"]}
            victim = max(self.replicas, key=lambda m: reps.get(m.proc.url, 0))
            if reps.get(victim.proc.url, 0) > 0 or time.monotonic() >= deadline:
                return victim
            time.sleep(poll_s)

    def restart(self, m: Member, graceful: bool) -> None:
        if graceful:
            m.proc.stop()
        else:
            os.kill(m.pid, signal.SIGKILL)
            m.proc.popen.wait()
        m.start()


@dataclass
class ScenarioResult:
    fault: str
    sent: int
    completed: int
    failovers: int  # streams continued on another replica (balancer counter)
    retries: int  # attempts retried before the first byte (balancer counter)
    errored: int  # explicit errors the client saw
    lost: int  # no answer, or a stream cut without an error
    errors: dict[str, int]  # by kind
    fault_s: float  # how long the fault lasted
    recovery_s: float | None  # fault end -> index consistent (None: not within the bound)
    consistent_after: dict[str, str]  # the final check, with the fleet idle
    rss_kb: tuple[int, int]  # balancer before, after
    fds: tuple[int, int]  # all of the balancer's descriptors, before and after
    fd_kinds: tuple[dict[str, int], dict[str, int]]  # by kind (fd_breakdown), before and after
    error_detail: list[str] = field(default_factory=list)  # one line per failed request

    def row(self) -> list[str]:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        k0, k1 = self.fd_kinds
        return [self.fault, str(self.sent), str(self.completed), str(self.failovers), str(self.retries),
                str(self.errored), str(self.lost), f"{self.fault_s:.1f}", rec,
                f"{self.rss_kb[0] / 1024:.1f}->{self.rss_kb[1] / 1024:.1f}", f"{self.fds[0]}->{self.fds[1]}",
                f"{k0['client']}/{k0['upstream']}/{k0['other']}->{k1['client']}/{k1['upstream']}/{k1['other']}"]


HEADER = ["fault", "sent", "completed", "failed over", "retried", "errored", "lost", "fault s", "recovery s",
          "balancer RSS MiB", "balancer fds", "fds client/upstream/other"]


def workload(duration_s: float, rate: float, seed: int, input_len: int = 384, output_len: int = 48):
    from loadgen.synthetic import LengthDist, SyntheticConfig, synthesize

    n = max(1, int(duration_s * rate))
    return synthesize(SyntheticConfig(num_requests=n, rate=rate, input_len=LengthDist("fixed", input_len),
                                      output_len=LengthDist("fixed", output_len), prefix_groups=4, prefix_len=256,
                                      seed=seed))


def classify(records) -> tuple[int, int, int, dict[str, int], list[str]]:
    """(completed, errored, lost, errors by kind, one line per failed request) of a run's records."""
    completed = errored = lost = 0
    kinds: dict[str, int] = {}
    detail = []
    for r in records:
        if r.success:
            completed += 1
            continue
        kind = r.error_kind or "none"
        # A refused or reset connection before any token is an explicit error; after tokens
        # arrived, a cut stream without an error event is a lost request.
        explicit = kind in ("http", "in_band") or (kind == "connection" and r.ttft_s is None)
        kinds[kind] = kinds.get(kind, 0) + 1
        if explicit:
            errored += 1
        else:
            lost += 1
        detail.append(f"#{r.index} {'explicit' if explicit else 'LOST'} {kind}: {r.error}")
    return completed, errored, lost, kinds, detail


def run_scenario(fleet: ChaosFleet, fault: str, duration_s: float = 8.0, rate: float = 8.0, fault_at_s: float = 2.5,
                 stop_s: float = 5.0, cut_s: float = 3.0, recovery_bound_s: float = 15.0, seed: int = 0,
                 log: Callable[[str], None] = lambda s: None) -> ScenarioResult:
    """Load the fleet for `duration_s`, inject `fault` at `fault_at_s`, measure (module docstring)."""
    from loadgen.client import LoadConfig, run_load_sync
    from loadgen.prompts import PromptConfig

    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
    fleet.wait_healthy()
    if fleet.wait_consistent(recovery_bound_s) is None:
        raise RuntimeError(f"the index is not consistent before the fault: {fleet.consistency()}")
    requests = workload(duration_s, rate, seed)
    cfg = LoadConfig(model="tiny", prompt=PromptConfig(seed=seed), request_timeout_s=60.0, progress=False)
    m0 = fleet.metrics()
    rss0, fds0 = proc_stats(fleet.balancer.pid)
    kinds0 = fleet.balancer_fds()
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(run=run_load_sync(fleet.url, requests, cfg)),
                              name="chaos-load")
    loader.start()
    time.sleep(fault_at_s)
    old_metrics = None
    t_fault = time.monotonic()
    log(f"{fault}: injecting")
    if fault == "kill9":
        victim = fleet.victim_with_streams()
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.popen.wait()
        time.sleep(1.0)
        victim.start()
    elif fault == "sigstop":
        victim = fleet.victim_with_streams()
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(stop_s)
        os.kill(victim.pid, signal.SIGCONT)
    elif fault == "cut_events":
        victim = fleet.replicas[0]
        req = urllib.request.Request(f"{victim.proc.url}/_test/mute_kv_events?seconds={cut_s}", data=b"",
                                     method="POST")
        urllib.request.urlopen(req, timeout=5).read()
        time.sleep(cut_s)
    elif fault == "restart_balancer":
        old_metrics = fleet.metrics()
        fleet.balancer.proc.stop()  # SIGTERM: stop accepting, let in-flight requests finish
        fleet.balancer.start()
    elif fault == "restart_replica":
        victim = fleet.victim_with_streams()
        victim.proc.stop()  # SIGTERM: the replica drains (new requests 503 -> retried elsewhere)
        victim.start()
    t_clear = time.monotonic()
    log(f"{fault}: cleared after {t_clear - t_fault:.1f} s; waiting for the index")
    recovery = fleet.wait_consistent(recovery_bound_s)
    loader.join(duration_s + 120)
    if loader.is_alive():
        raise RuntimeError("the load generator did not finish")
    run = result["run"]
    time.sleep(0.5)
    final = fleet.consistency()
    if any(v != "ok" for v in final.values()):  # idle now: give it the same bound, then report
        fleet.wait_consistent(recovery_bound_s)
        final = fleet.consistency()
    kinds1 = fleet.balancer_fds()
    rss1, fds1 = proc_stats(fleet.balancer.pid)
    m1 = fleet.metrics()
    failovers = counter_total(m1, "kvfleet_failovers_total")
    retries = counter_total(m1, "kvfleet_retries_total")
    if old_metrics is None:
        failovers -= counter_total(m0, "kvfleet_failovers_total")
        retries -= counter_total(m0, "kvfleet_retries_total")
    else:  # a new balancer process: its counters started at 0
        failovers += counter_total(old_metrics, "kvfleet_failovers_total") - counter_total(m0, "kvfleet_failovers_total")
        retries += counter_total(old_metrics, "kvfleet_retries_total") - counter_total(m0, "kvfleet_retries_total")
    completed, errored, lost, kinds, detail = classify(run.records)
    return ScenarioResult(fault=fault, sent=len(run.records), completed=completed, failovers=int(failovers),
                          retries=int(retries), errored=errored, lost=lost, errors=kinds,
                          fault_s=t_clear - t_fault, recovery_s=recovery, consistent_after=final,
                          rss_kb=(rss0, rss1), fds=(fds0, fds1), fd_kinds=(kinds0, kinds1),
                          error_detail=detail)



@dataclass
class SoakResult:
    duration_s: float
    rate: float
    sent: int
    completed: int
    errored: int
    lost: int
    errors_per_window: list[int]  # failed requests by scheduled-time window (spikes show here)
    rss_kb: list[tuple[float, int]]  # (seconds into the run, balancer VmRSS)
    fds: list[tuple[float, int]]  # (seconds into the run, all of the balancer's descriptors)
    fd_kinds: list[tuple[float, dict[str, int]]]  # the same by kind (fd_breakdown); the last once idle
    peak_concurrency: int  # most requests in flight at once (from the client's records)
    warm_s: float  # growth is measured from here (the first samples include warm-up)
    pool_idled_out: bool  # the last sample waited for idle keep-alive connections to expire
    replicas: int

    def _at(self, series: list[tuple[float, int]], t: float) -> int:
        return next((v for s, v in series if s >= t), series[-1][1])

    @property
    def rss_growth(self) -> float:
        """RSS at the end over RSS once warm, minus 1."""
        return self.rss_kb[-1][1] / self._at(self.rss_kb, self.warm_s) - 1.0

    def fd_kinds_at(self, t: float) -> dict[str, int]:
        return next((v for s, v in self.fd_kinds if s >= t), self.fd_kinds[-1][1])

    @property
    def fd_leaks(self) -> list[str]:
        """Why the descriptors look leaky (empty: they do not). Once idle, accepted client
        connections must be gone and other descriptors back to their warm count. Upstream
        keep-alive connections: after they idled out, no more than the health polls keep (two
        per replica); else no more than the peak concurrency can explain (one per request in
        flight at once, twice over for connections opened while others were being released)."""
        warm, end = self.fd_kinds_at(self.warm_s), self.fd_kinds[-1][1]
        out = []
        if end["client"]:
            out.append(f"{end['client']} client connections still open")
        if end["other"] > warm["other"] + 2:
            out.append(f"other descriptors grew {warm['other']} -> {end['other']}")
        bound = 2 * self.replicas if self.pool_idled_out else 2 * self.peak_concurrency + 8
        if end["upstream"] > bound:
            out.append(f"{end['upstream']} upstream connections (bound {bound})")
        return out


def measure_capacity(fleet: ChaosFleet, concurrency: int = 48, rounds: int = 4, seed: int = 0) -> float:
    """Completed requests/s of the fleet under closed-loop saturation (`concurrency` clients,
    `rounds` requests each) with the soak's workload."""
    from loadgen.client import LoadConfig, run_load_sync
    from loadgen.prompts import PromptConfig

    n = concurrency * rounds
    requests = workload(n / 100.0, 100.0, seed)  # arrival times are unused in a closed loop
    cfg = LoadConfig(model="tiny", prompt=PromptConfig(seed=seed), concurrency=concurrency, progress=False,
                     request_timeout_s=60.0)
    run = run_load_sync(fleet.url, requests, cfg)
    return sum(1 for r in run.records if r.success) / run.duration_s


def run_soak(fleet: ChaosFleet, duration_s: float, rate: float, windows: int = 10, sample_s: float = 1.0,
             seed: int = 1, idle_wait_s: float = 0.0, log: Callable[[str], None] = lambda s: None) -> SoakResult:
    """Open-loop load at `rate` for `duration_s`; sample the balancer's RSS and descriptors.
    With `idle_wait_s` (> the balancer's 30 s keep-alive), the last sample waits for the
    upstream connection pool to idle out."""
    from loadgen.client import LoadConfig, run_load_sync
    from loadgen.prompts import PromptConfig

    fleet.wait_healthy()
    requests = workload(duration_s, rate, seed)
    cfg = LoadConfig(model="tiny", prompt=PromptConfig(seed=seed), request_timeout_s=60.0, progress=False)
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(run=run_load_sync(fleet.url, requests, cfg)))
    rss, fds, kinds = [], [], []
    t0 = time.monotonic()
    loader.start()
    next_log = 0.0
    while loader.is_alive():
        t = time.monotonic() - t0
        r, f = proc_stats(fleet.balancer.pid)
        rss.append((t, r))
        fds.append((t, f))
        kinds.append((t, fleet.balancer_fds(settle_s=0)))
        if t >= next_log:
            log(f"soak: {t:.0f}/{duration_s:.0f} s, balancer RSS {r / 1024:.1f} MiB, {f} fds {kinds[-1][1]}")
            next_log += 60.0
        loader.join(sample_s)
    idle = fleet.balancer_fds(settle_s=5.0)  # the clients are gone: their connections must close
    idle_end = time.monotonic() + idle_wait_s
    while idle["upstream"] > 2 * len(fleet.replicas) and time.monotonic() < idle_end:
        time.sleep(1.0)
        idle = fleet.balancer_fds(settle_s=0)
    t = time.monotonic() - t0
    r, f = proc_stats(fleet.balancer.pid)
    rss.append((t, r))
    fds.append((t, f))
    kinds.append((t, idle))
    run = result["run"]
    spans = sorted(x for rec in run.records if rec.sent_s is not None
                   for x in ((rec.sent_s, 1), (rec.sent_s + (rec.e2el_s or 0.0), -1)))
    peak = level = 0
    for _, step in spans:
        level += step
        peak = max(peak, level)
    completed, errored, lost, _, _ = classify(run.records)
    per_window = [0] * windows
    for rec in run.records:
        if not rec.success:
            per_window[min(windows - 1, int(rec.scheduled_s / duration_s * windows))] += 1
    return SoakResult(duration_s=duration_s, rate=rate, sent=len(run.records), completed=completed, errored=errored,
                      lost=lost, errors_per_window=per_window, rss_kb=rss, fds=fds, fd_kinds=kinds,
                      peak_concurrency=peak, warm_s=min(60.0, duration_s * 0.2), pool_idled_out=idle_wait_s > 0,
                      replicas=len(fleet.replicas))
