"""Prefill/decode disaggregation on a kvfleet replica: a prompt's KV, block by block, over ZMQ.

The request flow is vLLM's disaggregated-serving proxy pattern (vLLM's
`tests/v1/kv_connector/nixl_integration/toy_proxy_server.py` and NixlConnector's
`request_finished`), so a proxy written for vLLM P/D drives kvfleet replicas and the other way round:

1. proxy → prefill replica: the request with `max_tokens: 1`, `stream: false` and
   `kv_transfer_params: {"do_remote_decode": true}`. The replica computes the prompt, keeps the
   blocks referenced (`KVCacheManager.keep_on_free`, vLLM's "delay_free_blocks") and answers with
   `kv_transfer_params`: `do_remote_prefill: true, do_remote_decode: false, remote_engine_id,
   remote_request_id, remote_block_ids` (the prompt's full blocks, as NixlConnector sends them),
   `remote_host, remote_port` (this module's ROUTER socket), `remote_block_size`, and kvfleet's
   `remote_kv_layout` (dtype and block shape) and `remote_block_hashes` (the blocks' chain hashes,
   design §3): a decode replica installs blocks only under a prompt of its own that hashes the
   same, so KV of another model, tokenizer or prompt is never used.
2. proxy → decode replica: the original request with those `kv_transfer_params`. `KVReceiver.prepare`
   pulls the blocks its own prefix cache lacks, checks each block's checksum as it arrives and,
   between two engine steps, installs them as cached blocks of its pool just before the request
   enters the scheduler, which then finds the prompt's full blocks as a prefix hit and computes
   only the rest (at least the last token, whose logits give the first output token: the decode
   side of NixlConnector does the same). So the decode replica continues exactly where a single
   replica would be after the same prompt's full blocks.

The decode replica pulls (as NixlConnector's decode side reads the prefill's blocks): it alone
knows which leading blocks its own prefix cache already holds, so only the rest travels, and it
pulls once it is ready to run the request.

Wire (a DEALER on the decode replica, one per pull, to the prefill replica's ROUTER):

    pull  = [b"kvfleet.kv/1", request id, first block wanted (u32 BE), layout]
    reply = [b"BLK", block index (u32 BE), xxh3_64 of the payload (u64 BE), payload]  per block, in order
            then [b"END", blocks sent (u32 BE)]  or  [b"ERR", reason]

    payload = one block of every layer, keys then values, C order:
              [num_layers, 2, block_size, num_kv_heads, head_dim] in the cache's dtype

Overlap: each pull is its own task on the prefill replica's event loop and each block its own
message, so blocks are read from the cache (16 per gather) and sent while the engine thread goes
on stepping other requests, and the decode replica checks block i while block i+1 is on the wire;
neither engine waits for a transfer (the decode request enters its scheduler once its blocks are
in). What does not overlap: a request's own prefill and its transfer (vLLM's protocol hands the
KV over after the prefill leg has answered, so no block leaves before the prompt is computed).

Faults never give a wrong answer: a bad checksum, a gap, a short block, a timeout (the prefill
replica died or hangs), an ERR, a layout mismatch: the decode replica installs only the verified
blocks before the fault and computes the rest of the prompt itself (`vllm:nixl_num_failed_transfers`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash
import zmq
import zmq.asyncio
from aiohttp import web

from protocol.hashing import hash_blocks
from protocol.openai_api import APIError
from replica.config import KVTransferConfig

log = logging.getLogger("kvfleet.replica.kv_transfer")

MAGIC = b"kvfleet.kv/1"
TEST_HOOKS_ENV = "KVFLEET_TEST_HOOKS"


def cache_layout(caches) -> str:
    """The block layout a payload has: dtype and [layers, 2, block_size, kv heads, head dim]."""
    k = caches[0][0]
    _, bs, heads, dim = k.shape
    return f"{str(k.dtype).removeprefix('torch.')}:{len(caches)}x2x{bs}x{heads}x{dim}"


def read_blocks(caches, block_ids: list[int]) -> memoryview:
    """The payloads of `block_ids`, one after the other (the payload layout above), in one buffer:
    one gather per layer for all of them, not one per block."""
    import torch

    idx = torch.tensor(block_ids, dtype=torch.int64, device=caches[0][0].device)
    data = torch.stack([torch.stack((k.index_select(0, idx), v.index_select(0, idx)), dim=1) for k, v in caches],
                       dim=1)  # [n, layers, 2, block_size, kv heads, head dim]
    return memoryview(data.cpu().contiguous().numpy()).cast("B")


def write_blocks(caches, block_ids: list[int], payloads: list[bytes]) -> None:
    """Copy the payloads into blocks `block_ids` of every layer (the inverse of `read_blocks`)."""
    import torch

    k0 = caches[0][0]
    data = torch.frombuffer(bytearray(b"".join(payloads)), dtype=k0.dtype).view(len(block_ids), len(caches), 2,
                                                                                 *k0.shape[1:])
    idx = torch.tensor(block_ids, dtype=torch.int64, device=k0.device)
    for layer, (k, v) in enumerate(caches):
        k.index_copy_(0, idx, data[:, layer, 0].to(k.device))
        v.index_copy_(0, idx, data[:, layer, 1].to(v.device))


READ_CHUNK = 16  # blocks read from the cache at once: one gather each, then sent block by block


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


@dataclass
class _Parked:
    """A finished prefill's held blocks, waiting for its decode replica's pull."""

    block_ids: list[int]
    deadline: float


@dataclass
class Faults:
    """Test hooks (KVFLEET_TEST_HOOKS=1, `POST /_test/kv_transfer`): the next `corrupt` transfers
    flip a byte of their second block after its checksum was taken; the next `stall` transfers
    send their first block and then hang until the process ends (a prefill replica that dies or
    freezes in the middle of a hand-over). `stalled` counts the transfers hanging now."""

    corrupt: int = 0
    stall: int = 0
    stalled: int = 0


class _Side:
    """What both sides of a hand-over hold: the config, the engine's service and caches, metrics."""

    def __init__(self, cfg: KVTransferConfig, service, metrics) -> None:
        self.cfg = cfg
        self.service = service
        self.metrics = metrics
        self.caches = service.engine.executor.kv_caches  # [(k, v)] per layer, [blocks, bs, Hkv, D]
        self.layout = cache_layout(self.caches)


class KVSender(_Side):
    """The prefill side: holds finished prefills' blocks and serves pulls on a ZMQ ROUTER."""

    def __init__(self, cfg: KVTransferConfig, service, metrics) -> None:
        super().__init__(cfg, service, metrics)
        self.engine_id = uuid.uuid4().hex  # NixlConnector's remote_engine_id: this process
        self.port = cfg.port
        self.faults = Faults()
        self._parked: dict[str, _Parked] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._serve_task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None
        self._closing = False

    @property
    def endpoint(self) -> str:
        return _endpoint(self.cfg.host, self.port)

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        if self.cfg.port:
            self._sock.bind(_endpoint(self.cfg.host, self.cfg.port))
        else:
            self.port = self._sock.bind_to_random_port(_endpoint(self.cfg.host, 0).rsplit(":", 1)[0])
        self._serve_task = asyncio.create_task(self._serve(), name="kv-transfer-serve")
        self._sweep_task = asyncio.create_task(self._sweep(), name="kv-transfer-sweep")

    async def stop(self) -> None:
        # No more releases: the engine stops next, and an inbox op arriving while its loop is
        # being cancelled can swallow that cancellation (Python 3.11's wait_for race).
        self._closing = True
        tasks = [t for t in (self._serve_task, self._sweep_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()

    # ------------------------------------------------------------- the engine's side
    def keep(self, request_id: str) -> Callable[..., None]:
        """The request's `before_add`: its blocks are held when it finishes. The hold ends when
        a decode replica has pulled them or `keep_s` after the prefill (or after this call, for
        a prefill that never finishes: the client left), whichever comes first."""
        kv = self.service.engine.kv
        self._parked[request_id] = _Parked([], time.monotonic() + self.cfg.keep_s)
        return lambda *_: kv.keep_on_free(request_id)

    def park(self, request_id: str, num_prompt_tokens: int) -> dict[str, Any]:
        """The finished prefill's `kv_transfer_params` (NixlConnector's `request_finished` keys):
        its full prompt blocks, held for `keep_s` or until pulled."""
        kv = self.service.engine.kv
        held = kv.kept_blocks(request_id) or []
        full = []  # the prompt's full blocks, up to the first one not in the prefix cache
        for block_id, block_hash in held[: num_prompt_tokens // kv.block_size]:
            if block_hash is None:
                break
            full.append((block_id, block_hash))
        if full:
            self._parked[request_id] = _Parked([b for b, _ in full], time.monotonic() + self.cfg.keep_s)
        else:  # nothing worth sending (a prompt shorter than a block, or the hold expired)
            self._release(request_id)
        # `remote_block_hashes` (kvfleet's): the blocks' chain hashes (design §3), so a decode
        # replica installs them only under a prompt that hashes the same (same model, same tokens).
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_request_id": request_id, "remote_block_ids": [b for b, _ in full],
                "remote_block_hashes": [f"{h:016x}" for _, h in full], "remote_host": self.cfg.host,
                "remote_port": self.port, "remote_block_size": kv.block_size, "remote_kv_layout": self.layout}

    def _release(self, request_id: str) -> None:
        self._parked.pop(request_id, None)
        if self._closing:
            return
        kv = self.service.engine.kv
        task = asyncio.ensure_future(self.service.between_steps(lambda: kv.release_kept(request_id)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.keep_s))
            now = time.monotonic()
            for rid in [r for r, p in self._parked.items() if p.deadline <= now]:
                log.info("the KV of prefill %s expired before a decode replica pulled it", rid)
                self.metrics.kv_expired.inc()
                self._release(rid)

    # ------------------------------------------------------------- the socket
    async def _serve(self) -> None:
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 5 or frames[1] != MAGIC or len(frames[3]) != 4:
                await sock.send_multipart([frames[0], b"ERR", b"not a kvfleet.kv/1 pull"])
                continue
            ident, rid = frames[0], frames[2].decode("utf-8", "replace")
            task = asyncio.create_task(self._send(ident, rid, int.from_bytes(frames[3], "big"), frames[4].decode()),
                                       name=f"kv-transfer {rid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, ident: bytes, rid: str, start: int, layout: str) -> None:
        sock = self._sock
        parked = self._parked.get(rid)
        if parked is None or not parked.block_ids:
            await sock.send_multipart([ident, b"ERR", f"no kept KV for request {rid} (expired or unknown)".encode()])
            return
        if layout != self.layout:
            await sock.send_multipart([ident, b"ERR", f"layout {layout} != this replica's {self.layout}".encode()])
            return
        faults = self.faults
        corrupt = faults.corrupt > 0
        stall = faults.stall > 0
        faults.corrupt -= corrupt
        faults.stall -= stall
        try:
            sent = 0
            ids = parked.block_ids
            for first in range(start, len(ids), READ_CHUNK):
                chunk = read_blocks(self.caches, ids[first : first + READ_CHUNK])
                size = len(chunk) // len(ids[first : first + READ_CHUNK])
                for j in range(len(chunk) // size):
                    i = first + j
                    payload = chunk[j * size : (j + 1) * size]
                    digest = xxhash.xxh3_64_intdigest(payload)
                    if corrupt and i == start + 1:
                        payload = bytes([payload[0] ^ 0xFF]) + bytes(payload[1:])
                    await sock.send_multipart([ident, b"BLK", _u32(i), digest.to_bytes(8, "big"), payload],
                                              copy=False)
                    sent += 1
                    if stall:
                        faults.stalled += 1
                        await asyncio.Event().wait()  # until the process ends (or stop() cancels it)
            await sock.send_multipart([ident, b"END", _u32(sent)])
        finally:
            self._release(rid)


@dataclass
class Pulled:
    """What a pull brought: verified payloads of blocks start, start+1, ... and why it stopped
    early (None: every block asked for arrived intact)."""

    start: int
    payloads: list[bytes] = field(default_factory=list)
    fault: str | None = None
    nbytes: int = 0


class KVReceiver(_Side):
    """The decode side: pulls a prefill's blocks and installs them before its request runs."""

    def __init__(self, cfg: KVTransferConfig, service, metrics) -> None:
        super().__init__(cfg, service, metrics)
        k = self.caches[0][0]
        self.block_nbytes = 2 * len(self.caches) * k[0].numel() * k.element_size()
        self._ctx = zmq.asyncio.Context()

    def close(self) -> None:
        self._ctx.destroy(linger=0)

    async def prepare(self, params: dict, prompt_ids: list[int], lora=None) -> Callable[..., bool] | None:
        """For a request with `do_remote_prefill`: pull what the local prefix cache lacks and
        return the `before_add` that admits the request with it (`admit`; None: nothing to
        hand over, the request computes its prompt itself). `APIError(400)` for malformed
        parameters, 403 for a `remote_host` that is not one of this replica's peers (a prompt
        this replica's whole cache cannot hold was refused before: `replica.server`)."""
        host, port, rid, remote_ids, bs = _remote(params)
        if not self.cfg.allows_peer(host):
            raise APIError(403, f"kv_transfer_params.remote_host {host!r} is not a KV-transfer peer of this replica, "
                                f"so it does not pull from it; start the replica with --kv-transfer-peers naming the "
                                f"prefill replicas' hosts or networks (loopback and --kv-transfer-host "
                                f"{self.cfg.host} are allowed)", "kv_transfer_params")
        kv = self.service.engine.kv
        if bs != kv.block_size:
            log.warning("kv_transfer_params from a replica with block size %d (this one: %d): computing the prompt",
                        bs, kv.block_size)
            return None
        layout = params.get("remote_kv_layout")
        if layout is not None and layout != self.layout:
            log.warning("kv_transfer_params with KV layout %s (this replica: %s): computing the prompt", layout,
                        self.layout)
            return None
        # The blocks a prefix hit may cover: all full blocks but one token (the last position's
        # logits must come out of the model), and no more than the prefill replica holds.
        wanted = min(len(remote_ids), max(len(prompt_ids) - 1, 0) // bs)
        if wanted == 0 or not kv.enable_caching:
            return None
        root = kv.hash_root if lora is None else lora.root
        hashes = hash_blocks(prompt_ids[: wanted * bs], bs, root)
        wanted = _agreeing(hashes, params.get("remote_block_hashes"))
        if wanted == 0:
            log.warning("the prefill's blocks hash differently from this prompt's (another model or tokenizer?): "
                        "computing the prompt")
            return None
        have = await self.service.between_steps(lambda: kv.cached_prefix_tokens(prompt_ids, lora) // bs)
        if have >= wanted:
            return None  # this replica holds the prefix already
        t0 = time.perf_counter()
        pulled = await self._pull(host, port, rid, have, wanted)
        m = self.metrics
        if pulled.fault is None:
            m.kv_xfer_time.observe(time.perf_counter() - t0)
            m.kv_xfer_bytes.observe(pulled.nbytes)
        else:
            m.kv_xfer_failed.inc()
            m.kv_recomputed_blocks.inc(wanted - have - len(pulled.payloads))
            log.warning("KV transfer of %s from %s:%s failed after %d of %d blocks (%s): computing the rest here",
                        rid, host, port, len(pulled.payloads), wanted - have, pulled.fault)
        if not pulled.payloads:
            return None
        return lambda request_id, ids, sampling: admit(self.service.engine, request_id, ids, sampling, pulled)

    async def _pull(self, host: str, port: int, rid: str, start: int, end: int) -> Pulled:
        out = Pulled(start)
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        timeout_ms = int(self.cfg.timeout_s * 1000)
        try:
            sock.connect(_endpoint(host, port))
            await sock.send_multipart([MAGIC, rid.encode(), _u32(start), self.layout.encode()])
            while True:
                if not await sock.poll(timeout_ms, zmq.POLLIN):
                    out.fault = f"no block for {self.cfg.timeout_s:g} s (the prefill replica is gone or stuck)"
                    return out
                frames = await sock.recv_multipart()
                kind = frames[0]
                if kind == b"END":
                    if start + len(out.payloads) < end:
                        out.fault = f"the prefill replica sent only {len(out.payloads)} blocks"
                    return out
                if kind == b"ERR":
                    out.fault = frames[1].decode("utf-8", "replace") if len(frames) > 1 else "error"
                    return out
                if kind != b"BLK" or len(frames) != 4:
                    out.fault = "malformed message"
                    return out
                index = int.from_bytes(frames[1], "big")
                payload = frames[3]
                if index != start + len(out.payloads) or len(payload) != self.block_nbytes:
                    out.fault = f"block {index} out of order or short"
                    return out
                if xxhash.xxh3_64_intdigest(payload) != int.from_bytes(frames[2], "big"):
                    out.fault = f"checksum mismatch in block {index}"
                    return out
                if index < end:
                    out.payloads.append(payload)
                    out.nbytes += len(payload)
                if start + len(out.payloads) >= end:
                    return out  # the rest (if any) is not needed; the socket closes
        finally:
            sock.close(0)


def _remote(params: dict) -> tuple[str, int, str, list, int]:
    host, port, rid = params.get("remote_host"), params.get("remote_port"), params.get("remote_request_id")
    ids, bs = params.get("remote_block_ids"), params.get("remote_block_size")
    if not (isinstance(host, str) and host and isinstance(port, int) and 0 < port < 65536 and isinstance(rid, str)
            and isinstance(ids, list) and isinstance(bs, int) and bs > 0):
        raise APIError(400, "kv_transfer_params with do_remote_prefill need remote_host, remote_port, "
                            "remote_request_id, remote_block_ids and remote_block_size, as a prefill replica's "
                            "response gives them; send the prefill's kv_transfer_params unchanged",
                       "kv_transfer_params")
    return host, port, rid, ids, bs


def _agreeing(hashes: list[int], remote) -> int:
    """How many leading blocks hash the same here and on the prefill replica (none when it sent
    no hashes: KV of unknown tokens is never installed)."""
    if not isinstance(remote, list):
        return 0
    n = 0
    for mine, theirs in zip(hashes, remote):
        if not isinstance(theirs, str) or theirs != f"{mine:016x}":
            break
        n += 1
    return n


def admit(engine, request_id: str, prompt_ids: list[int], sampling, pulled: Pulled) -> bool:
    """Admit the request with the pulled KV (`LLMEngine.add_prefilled`, the one entry of a
    handed-over request, the simulator's too): its blocks after the local prefix hit are taken
    and the pulled payloads written into them; it computes only the rest of the prompt. Runs
    between steps. False (nothing changed; the engine adds the request as usual and it computes
    the blocks itself) when the local cache changed so that the pulled run no longer joins its
    prefix, when it already holds all of it, or when no blocks or running slot are free now."""
    kv = engine.kv
    bs = kv.block_size
    end = pulled.start + len(pulled.payloads)
    first = kv.cached_prefix_tokens(prompt_ids, engine.lora_tags.get(sampling.lora_name)) // bs
    if not pulled.start <= first < end:
        return False
    executor = engine.executor
    payloads = pulled.payloads[first - pulled.start:]

    def fill(at: int, block_ids: list[int]) -> None:
        # Copies queued by the same allocation (a reused block's spill into the host tier, a tier
        # hit's load) run first: a spilled block must be read out before its payload lands.
        store = getattr(executor, "tier_store", None)
        if store is not None:
            store.apply(kv.take_transfers())
        write_blocks(executor.kv_caches, block_ids, payloads[at - first:])

    return engine.add_prefilled(request_id, prompt_ids, [], sampling, end * bs, fill) is not None


def add_routes(app: web.Application, sender: KVSender | None) -> None:
    """`POST /_test/kv_transfer?fault=corrupt|stall` arms a fault for the next transfer and
    `GET /_test/kv_transfer` says how many hang now; only with KVFLEET_TEST_HOOKS=1."""
    if sender is None or os.environ.get(TEST_HOOKS_ENV) != "1":
        return

    async def arm(request: web.Request) -> web.Response:
        fault = request.query.get("fault")
        if fault not in ("corrupt", "stall"):
            raise APIError(400, "fault must be corrupt or stall", "fault")
        setattr(sender.faults, fault, getattr(sender.faults, fault) + 1)
        return web.json_response(vars(sender.faults))

    async def state(request: web.Request) -> web.Response:
        return web.json_response(vars(sender.faults))

    app.router.add_post("/_test/kv_transfer", arm)
    app.router.add_get("/_test/kv_transfer", state)
