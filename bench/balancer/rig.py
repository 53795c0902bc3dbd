"""The rig: one fake backend (bench/fake_backend.py, answers at once) and every proxy under test in
front of it, the proxies pinned to the proxy core, the backend to the load core.

VARIANTS lists the kvfleet balancer configurations measured side by side; a new one (say, with
API keys and a rate limit on) is one more entry: its flags, and the headers every client request
must carry to be served.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.balancer import tools
from harness import procs

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
BENCH_KEY = "kvfleet-bench-key"


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase + "    ") for _ in range(n))


SHORT_PROMPT = "You are a helpful assistant. Summarise the following in one line: the quick brown fox."
LONG_PROMPT = text(8191, 1)  # + BOS = 8,192 tokens with the balancer's byte tokenizer


def body(prompt: str, stream: bool = False, max_tokens: int = 16) -> bytes:
    b = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


@dataclass(frozen=True)
class Variant:
    """One kvfleet balancer configuration in the comparison."""

    name: str  # the row label
    key: str  # its name for --skip
    flags: tuple[str, ...]  # `kvfleet balancer` flags besides --port, --model and --replica
    note: str = ""  # the notes column
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request of every client (e.g. an API key)
    goal: bool = False  # in the goals table

    def __post_init__(self) -> None:
        if not self.name.startswith("kvfleet"):
            raise ValueError(f"variant {self.name!r}: names start with 'kvfleet' (the tables group them so)")


VARIANTS = (
    # The default (an access log line per request, at INFO) and the same without access logs.
    Variant("kvfleet precise_prefix", "precise_prefix", ("--policy", "precise_prefix"), goal=True),
    Variant("kvfleet round_robin", "round_robin", ("--policy", "round_robin"), goal=True),
    Variant("kvfleet precise_prefix, no access log", "no-access-log",
            ("--policy", "precise_prefix", "--log-level", "warning"), note="--log-level warning"),
    Variant("kvfleet precise_prefix, aiohttp front", "aiohttp-front", ("--policy", "precise_prefix", "--no-fast-path"),
            note="--no-fast-path"),
    # The guard on (issue #16): every request's API key checked and counted against a per-key
    # rate limit high enough never to refuse one (a token bucket of 10^6 requests, refilled at 10^6/s).
    Variant("kvfleet precise_prefix, guard on", "guard",
            ("--policy", "precise_prefix", "--api-key", BENCH_KEY, "--rate-limit", "1000000"),
            note="--api-key + --rate-limit 1e6", headers=(("Authorization", f"Bearer {BENCH_KEY}"),), goal=True),
)
OTHERS = ("bare", "nginx", "sglang-router")  # the other targets' --skip names
SKIPPABLE = tuple(v.key for v in VARIANTS) + OTHERS


@dataclass
class Target:
    name: str
    url: str | None  # None: not available
    proc: procs.Proc | None = None
    note: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # every request to it carries these

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def start_backend(stack: contextlib.ExitStack, core: int | None) -> procs.Proc:
    backend = procs.launch([sys.executable, str(ROOT / "bench" / "fake_backend.py"), "--port", "0", "--model", MODEL],
                           name="fake backend", core=core, timeout=60, stderr=subprocess.STDOUT)
    stack.callback(backend.stop)
    return backend


def start_targets(args, stack: contextlib.ExitStack, burl: str, found: dict, skip: set[str]) -> list[Target]:
    """Every proxy in front of the backend at burl, pinned to the proxy core; stopped by stack.
    found: the tools (tools.ensure_debian_tools)."""
    targets = [Target("direct", burl, note="rig ceiling: client + backend on one core")]
    for v in VARIANTS:
        if v.key in skip:
            continue
        # Its log goes to a file, as a deployment would keep it: a reader of a pipe that falls
        # behind would block the writer.
        log_file = Path(tempfile.mkdtemp(prefix="kvfleet-bench-")) / "balancer.log"
        proc = procs.start(["balancer", "--port", "0", "--model", MODEL, "--replica", burl, *v.flags],
                           timeout=60, stderr=log_file, core=args.proxy_core)
        stack.callback(proc.stop)
        targets.append(Target(v.name, proc.url, proc, note=v.note, headers=dict(v.headers)))
    if "bare" not in skip:
        proc = procs.launch([sys.executable, "-m", "bench.balancer.bare_relay", burl], name="aiohttp bare relay",
                            core=args.proxy_core, cwd=str(ROOT), timeout=60, stderr=subprocess.STDOUT)
        stack.callback(proc.stop)
        targets.append(Target("aiohttp bare relay", proc.url, proc, note="reference: aiohttp pass-through, no routing"))
    if "nginx" not in skip:
        if found["nginx"] is None:
            targets.append(Target("nginx", None, note="n/a (nginx not installed)"))
        else:
            ndir = Path(tempfile.mkdtemp(prefix="kvfleet-nginx-"))
            stack.callback(shutil.rmtree, ndir, True)
            port = procs.free_port()
            conf = ndir / "nginx.conf"
            conf.write_text(tools.NGINX_CONF.format(dir=ndir, port=port, backend=burl.removeprefix("http://")))
            proc = procs.launch([found["nginx"], "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(conf),
                                 "-g", "daemon off;"], name="nginx", ready=None, core=args.proxy_core,
                                stderr=subprocess.STDOUT)
            stack.callback(proc.stop)
            targets.append(Target("nginx", f"http://127.0.0.1:{port}", proc, note=tools.nginx_version(found["nginx"])))
    if "sglang-router" not in skip:
        py, ver = tools.ensure_sglang_router(not args.no_install)
        if py is None:
            targets.append(Target("sglang-router", None, note=f"n/a ({ver})"))
        else:
            port = procs.free_port()
            proc = procs.launch([py, "-m", "sglang_router.launch_router", "--worker-urls", burl, "--host", "127.0.0.1",
                                 "--port", str(port), "--policy", "round_robin", "--log-level", "warn"],
                                name="sglang-router", ready=None, core=args.proxy_core, stderr=subprocess.STDOUT,
                                env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
            stack.callback(proc.stop)
            targets.append(Target("sglang-router", f"http://127.0.0.1:{port}", proc, note=f"sglang-router {ver}"))
    for t in targets:
        if t.url is not None and t.proc is not None:
            try:
                procs.wait_serving(t.url, t.proc, model=MODEL, headers=t.headers)
            except RuntimeError as e:
                t.note, t.url = f"n/a (did not start: {str(e)[:120]})", None
    return targets
