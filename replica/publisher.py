"""The replica's KV event publisher: vLLM 0.33's ZMQ PUB + ROUTER protocol, plus kvfleet's load
reports, cache snapshots and cache digests (protocol/events.py, protocol/load.py and
protocol/digest.py describe the frames).

Like vLLM's `ZmqEventPublisher` (vllm/distributed/kv_events.py), one thread owns the sockets and
is fed by a queue, so the engine never blocks on the network. Unlike it, the thread sleeps in a
poll on the ROUTER socket and a wake-up pipe instead of a 100 ms queue timeout, so replay and
snapshot requests are answered at once.

How the engine calls it, between steps, on its own thread:

    publisher.publish(kv.take_events())            # one batch per step; [] publishes nothing
    if publisher.snapshot_requested():             # a subscriber joined late or lost track
        publisher.publish_snapshot(kv.snapshot_events())
    publisher.publish_load(report)                 # every ~100 ms-1 s
    if publisher.digest_due():                     # every digest_interval_s, or on request
        publisher.publish_digest(kv.digest_hashes(publisher.digest_limit), num_blocks, block_size)
    ...
    publisher.close()                              # on shutdown

Ordering: everything goes through one FIFO queue. A snapshot therefore covers exactly the KV
batches queued before it (it carries the seq of the last one), provided the engine drains
`take_events()` into `publish()` before taking the snapshot, as above. The engine should check
`snapshot_requested()` even while idle (at least every ~100 ms), or a requester waits for its
timeout.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import zmq

from protocol.curve import make_server as make_curve_server
from protocol.events import (
    BlockStored,
    EventBatch,
    KVEvent,
    encode_batch,
    encode_replay_reply,
    encode_seq,
    replay_end_frames,
)
from protocol.digest import (
    DEFAULT_DIGEST_TOPIC,
    DIGEST_REQUEST,
    FILTER_KINDS,
    BlockFilter,
    CacheDigest,
    encode_digest,
    max_blocks_for,
)
from protocol.load import (
    DEFAULT_LOAD_TOPIC,
    DEFAULT_SNAPSHOT_TOPIC,
    SNAPSHOT_REQUEST,
    LoadReport,
    Snapshot,
    encode_extras_message,
    encode_load,
    encode_snapshot,
)

log = logging.getLogger(__name__)

_SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclass(frozen=True, slots=True)
class PublisherConfig:
    """Defaults are vLLM's `KVEventsConfig` (vllm/config/kv_events.py) where vLLM has the knob."""

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None  # vLLM's examples use "tcp://*:5558"
    topic: bytes = b""
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # PUB send high-water mark (messages)
    max_queue_size: int = 100_000  # publish() blocks when this many items wait for the thread
    data_parallel_rank: int = 0  # written into every batch, as vLLM's publisher does
    load_topic: bytes = DEFAULT_LOAD_TOPIC
    snapshot_topic: bytes = DEFAULT_SNAPSHOT_TOPIC
    # Compact cache digests (protocol/digest.py): a filter of the cached block hashes, on PUB
    # every `digest_interval_s` (0: only when a subscriber asks on the ROUTER socket), at most
    # `digest_max_bytes` on the wire (a cache too large for it is digested most-kept first).
    digest_topic: bytes = DEFAULT_DIGEST_TOPIC
    digest_interval_s: float = 5.0
    digest_filter: str = "binary_fuse8"
    digest_max_bytes: int = 16 * 1024 * 1024
    # Also publish a load report as soon as requests join the engine's queue (at most one per
    # engine step: the loop takes its inbox between steps), not only every load-report interval:
    # balancers that do not count their own sends (--consistent-routing) then see every
    # instance's requests within a step instead of up to an interval later.
    load_report_on_arrival: bool = False
    # None: vLLM's heuristic (bind when the endpoint has a wildcard or is ipc/inproc, else
    # connect to e.g. a proxy). True/False force it; tests bind "tcp://127.0.0.1:0".
    bind: bool | None = None
    # Testing only: batches with these seqs are kept for replay but never sent on PUB, which
    # simulates a lost message.
    drop_seqs: frozenset[int] = field(default_factory=frozenset)
    # CURVE (protocol/curve.py): with a secret key (Z85) both sockets are CURVE servers, so a
    # subscriber that knows the public key talks to this process only. With a directory of
    # client public keys (`*.key` files), only those clients may connect (a ZAP handler).
    curve_secret_key: bytes | None = None
    curve_authorized_clients: str | None = None

    def __post_init__(self) -> None:
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None and not value.startswith(_SCHEMES):
                raise ValueError(f"{name} must start with one of {_SCHEMES}, got {value!r}")
        extras = ("load_topic", "snapshot_topic", "digest_topic")
        for name in ("topic", *extras):
            if not isinstance(getattr(self, name), bytes):
                raise ValueError(f"{name} must be bytes")
        if not all(getattr(self, name) for name in extras):
            raise ValueError("load_topic, snapshot_topic and digest_topic must be non-empty")
        if len({self.topic, self.load_topic, self.snapshot_topic, self.digest_topic}) != 4:
            raise ValueError("topic, load_topic, snapshot_topic and digest_topic must differ")
        if self.topic and any(getattr(self, name).startswith(self.topic) for name in extras):
            # A reader subscribed to the KV topic would receive them (ZMQ matches prefixes).
            raise ValueError("load_topic, snapshot_topic and digest_topic must not start with the KV topic")
        if self.digest_interval_s < 0:
            raise ValueError(f"digest_interval_s must be >= 0 (0: digests only on request), got {self.digest_interval_s}")
        if self.digest_filter not in FILTER_KINDS:
            raise ValueError(f"digest_filter must be one of {sorted(FILTER_KINDS)}, got {self.digest_filter!r}")
        if self.digest_max_bytes < 4096:
            raise ValueError(f"digest_max_bytes must be at least 4096, got {self.digest_max_bytes}")
        if self.buffer_steps < 1:
            raise ValueError(f"buffer_steps must be >= 1, got {self.buffer_steps}")
        if self.hwm < 0 or self.max_queue_size < 1:
            raise ValueError("hwm must be >= 0 and max_queue_size >= 1")
        if self.data_parallel_rank < 0:
            raise ValueError("data_parallel_rank must be >= 0")
        if self.curve_authorized_clients is not None and self.curve_secret_key is None:
            raise ValueError("curve_authorized_clients needs curve_secret_key")

    def binds(self) -> bool:
        if self.bind is not None:
            return self.bind
        e = self.endpoint
        return "*" in e or "::" in e or e.startswith(("ipc://", "inproc://"))


@dataclass(frozen=True, slots=True)
class PublisherEndpoints:
    """The addresses actually bound (port 0 resolved, from ZMQ_LAST_ENDPOINT)."""

    endpoint: str
    replay_endpoint: str | None


_STOP = object()


class KVEventPublisher:
    """Publishes KV event batches, load reports and snapshots; see the module docstring."""

    def __init__(self, config: PublisherConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.max_queue_size)
        # Wake-up channel for the thread's poll. Socket objects rather than raw pipe fds: a late
        # write after close() fails on the closed object instead of hitting a reused fd.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        # Random per process: a subscriber that sees it change knows the replica restarted.
        self.epoch = int.from_bytes(os.urandom(8), "big") >> 1
        self._snapshot_wanted = threading.Event()
        self._digest_wanted = threading.Event()
        # The first periodic digest goes out one interval after start (a subscriber that wants
        # one sooner asks); engine thread only.
        self._digest_last = time.monotonic()
        # Most blocks a digest may hold and stay within digest_max_bytes.
        self.digest_limit = max_blocks_for(config.digest_filter, config.digest_max_bytes)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._endpoints: PublisherEndpoints | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        # KV batches handed to publish() so far (written by the engine's thread): the seq of the
        # last one is this - 1 (seqs count from 0), whether or not the thread has sent it yet.
        self.kv_batches_queued = 0
        # Testing only (fault injection): until this time.monotonic(), nothing goes out on PUB
        # (KV batches are still numbered and kept for replay), as if the link were cut.
        self.mute_until = 0.0
        # Read by tests/metrics; written only by the thread.
        self.last_seq: int | None = None
        self.wakeups = 0  # times the thread's poll returned (an idle publisher: ~5 per second)
        self.snapshots_sent = 0
        self.replays_served = 0
        self.digests_sent = 0
        self.last_digest_bytes = 0
        self._authenticator = None
        if config.curve_authorized_clients is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._authenticator = ThreadAuthenticator(self._ctx)
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=config.curve_authorized_clients)
        self._thread = threading.Thread(target=self._run, name="kvfleet-kv-publisher", daemon=False)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._close_pipe()
            self._stop_authenticator()
            raise self._start_error

    # --- API (any thread) -----------------------------------------------------------------

    @property
    def endpoints(self) -> PublisherEndpoints:
        assert self._endpoints is not None
        return self._endpoints

    def publish(self, events: list[KVEvent]) -> None:
        """Queue one batch (seq = previous + 1, from 0). An empty list publishes nothing."""
        if events:
            self.kv_batches_queued += 1
            self._put(("kv", time.time(), tuple(events)))

    def publish_load(self, report: LoadReport) -> None:
        self._put(("load", report))

    def snapshot_requested(self) -> bool:
        """True while a subscriber waits for a snapshot that nobody has queued yet."""
        return self._snapshot_wanted.is_set()

    def publish_snapshot(self, events: list[BlockStored]) -> None:
        """Queue the whole cache (parents before children) for every pending requester."""
        self._snapshot_wanted.clear()
        self._put(("snapshot", time.time(), tuple(events)))

    def digest_due(self) -> bool:
        """True when a digest should be queued now: a subscriber asked for one, or the periodic
        interval has passed (engine thread, between steps)."""
        if self._digest_wanted.is_set():
            return True
        interval = self.config.digest_interval_s
        return interval > 0 and time.monotonic() - self._digest_last >= interval

    def publish_digest(self, hashes: list[int], num_blocks: int, block_size: int) -> None:
        """Queue a digest of `hashes` (the cache holds `num_blocks`; at most `digest_limit` are
        passed) for PUB and every pending requester. The filter is built on the publisher's
        thread; like a snapshot it is consistent with the KV batches queued before it."""
        self._digest_wanted.clear()
        self._digest_last = time.monotonic()
        self._put(("digest", time.time(), hashes, num_blocks, block_size))

    def sources_info(self) -> dict[str, Any]:
        """The body for `GET /kv_event_sources`.

        vLLM answers `{"sources": [{data_parallel_rank, endpoint, replay_endpoint, topic}]}`
        with the endpoints resolved at bind time (vllm/entrypoints/serve/kv_events/
        api_router.py; some versions send the bare list). The extra keys are kvfleet's and
        are ignored by vLLM-ecosystem readers.
        """
        ep = self.endpoints
        return {
            "sources": [
                {
                    "data_parallel_rank": self.config.data_parallel_rank,
                    "endpoint": ep.endpoint,
                    "replay_endpoint": ep.replay_endpoint,
                    "topic": self.config.topic.decode("utf-8", "replace"),
                    "format": "vllm-0.33",
                    "buffer_steps": self.config.buffer_steps,
                    "load_topic": self.config.load_topic.decode("utf-8", "replace"),
                    "snapshot_topic": self.config.snapshot_topic.decode("utf-8", "replace"),
                    "snapshots": ep.replay_endpoint is not None,
                    "digest_topic": self.config.digest_topic.decode("utf-8", "replace"),
                    "digest_filter": self.config.digest_filter,
                    "digest_interval_s": self.config.digest_interval_s,
                }
            ]
        }

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the thread and close the sockets (linger 0). Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():  # a stuck send; the thread closes the sockets when it ends
            log.warning("KV event publisher thread did not stop within %.1fs", timeout)
        else:
            self._close_pipe()
        self._stop_authenticator()

    def _stop_authenticator(self) -> None:
        auth, self._authenticator = self._authenticator, None
        if auth is not None:
            auth.stop()

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------

    def _put(self, item: Any) -> None:
        if self._closed:
            raise RuntimeError("publisher is closed")
        self._queue.put(item)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the buffer is full: a wake-up is pending anyway
        except OSError:
            pass  # closed during shutdown

    def _close_pipe(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        cfg = self.config
        pub = router = None
        try:
            pub = self._ctx.socket(zmq.PUB)
            pub.linger = 0
            pub.sndhwm = cfg.hwm
            if cfg.curve_secret_key is not None:
                make_curve_server(pub, cfg.curve_secret_key)
            if cfg.binds():
                pub.bind(cfg.endpoint)
                endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                pub.connect(cfg.endpoint)
                endpoint = cfg.endpoint
            replay_endpoint = None
            if cfg.replay_endpoint is not None:
                router = self._ctx.socket(zmq.ROUTER)
                router.linger = 0
                if cfg.curve_secret_key is not None:
                    make_curve_server(router, cfg.curve_secret_key)
                # A ROUTER silently drops what exceeds its HWM: room for a whole replay.
                router.sndhwm = max(1000, cfg.buffer_steps + 16)
                router.bind(cfg.replay_endpoint)
                replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._endpoints = PublisherEndpoints(endpoint, replay_endpoint)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor
            self._start_error = e
            for sock in (pub, router):
                if sock is not None:
                    sock.close(linger=0)
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve(pub, router)
        finally:
            pub.close(linger=0)
            if router is not None:
                router.close(linger=0)

    def _serve(self, pub: zmq.Socket, router: zmq.Socket | None) -> None:
        state = _ThreadState(self.config)
        poller = zmq.Poller()
        # By fd: pyzmq's Poller reports a plain socket by its file descriptor, whatever was
        # registered, and a wake byte left unread would make the loop spin on it.
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        if router is not None:
            poller.register(router, zmq.POLLIN)
        main = threading.main_thread()
        while True:
            ready = dict(poller.poll(200))
            self.wakeups += 1
            if wake_fd in ready:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if router is not None and router in ready:
                self._serve_router(router, state)
            if self._drain_queue(pub, router, state):
                return
            if not main.is_alive():
                # Interpreter shutdown without close(): flush and let it exit (non-daemon thread).
                self._drain_queue(pub, router, state)
                return

    def _drain_queue(self, pub: zmq.Socket, router: zmq.Socket | None, state: _ThreadState) -> bool:
        """Handle every queued item; True once the stop marker was reached."""
        cfg = self.config
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            try:
                kind = item[0]
                if kind == "kv":
                    seq = state.kv_seq
                    state.kv_seq += 1
                    payload = encode_batch(EventBatch(item[1], item[2], cfg.data_parallel_rank))
                    if seq not in cfg.drop_seqs and time.monotonic() >= self.mute_until:
                        pub.send_multipart([cfg.topic, encode_seq(seq), payload])
                    state.buffer.append((seq, payload))
                    self.last_seq = seq
                elif kind == "load":
                    report: LoadReport = item[1]
                    payload = encode_load(_with_epoch(report, self.epoch))
                    if time.monotonic() >= self.mute_until:
                        pub.send_multipart(encode_extras_message(cfg.load_topic, state.load_seq, payload))
                    state.load_seq += 1
                elif kind == "snapshot":
                    self._send_snapshot(router, state, item[1], item[2])
                elif kind == "digest":
                    self._send_digest(pub, router, state, *item[1:])
            except Exception:  # one bad item must not kill the publisher
                log.exception("KV event publisher: failed to send a %s message", item[0])

    def _send_snapshot(self, router: zmq.Socket | None, state: _ThreadState, ts: float, events: tuple) -> None:
        if router is None or not state.snapshot_waiters:
            return  # nobody asked (or asked and was already served): drop it
        kv_seq = state.kv_seq - 1 if state.kv_seq else None
        payload = encode_snapshot(Snapshot(ts=ts, kv_seq=kv_seq, events=events, epoch=self.epoch))
        frames = [b"", self.config.snapshot_topic, encode_seq(state.snapshot_seq), payload]
        state.snapshot_seq += 1
        for identity in state.snapshot_waiters:
            router.send_multipart([identity, *frames])
        state.snapshot_waiters.clear()
        self.snapshots_sent += 1
        self._snapshot_wanted.clear()

    def _send_digest(self, pub: zmq.Socket, router: zmq.Socket | None, state: _ThreadState, ts: float,
                     hashes: list[int], num_blocks: int, block_size: int) -> None:
        cfg = self.config
        kv_seq = state.kv_seq - 1 if state.kv_seq else None
        while True:  # the size estimate is an upper bound; shrink in the rare case it was not
            payload = encode_digest(CacheDigest(ts=ts, epoch=self.epoch, kv_seq=kv_seq, block_size=block_size,
                                                num_blocks=num_blocks,
                                                filter=BlockFilter.build(cfg.digest_filter, hashes, distinct=True)))
            if len(payload) <= cfg.digest_max_bytes or not hashes:
                break
            hashes = hashes[: len(hashes) * 9 // 10]
        seq = state.digest_seq
        state.digest_seq += 1
        if time.monotonic() >= self.mute_until:
            pub.send_multipart(encode_extras_message(cfg.digest_topic, seq, payload))
        if router is not None:
            frames = [b"", cfg.digest_topic, encode_seq(seq), payload]
            for identity in state.digest_waiters:
                router.send_multipart([identity, *frames])
        state.digest_waiters.clear()
        self.digests_sent += 1
        self.last_digest_bytes = len(payload)

    def _serve_router(self, router: zmq.Socket, state: _ThreadState) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] != b"":
                log.warning("KV event publisher: ignoring a malformed replay request (%d frames)", len(frames))
                continue
            identity, _, body = frames
            if body == SNAPSHOT_REQUEST:
                if identity not in state.snapshot_waiters:
                    state.snapshot_waiters.append(identity)
                self._snapshot_wanted.set()
                continue
            if body == DIGEST_REQUEST:
                if identity not in state.digest_waiters:
                    state.digest_waiters.append(identity)
                self._digest_wanted.set()
                continue
            start = int.from_bytes(body, "big")  # vLLM reads any length the same way
            self.replays_served += 1
            buf = state.buffer
            skip = max(0, start - buf[0][0]) if buf else 0  # seqs in the buffer are contiguous
            for seq, payload in islice(buf, skip, None):
                router.send_multipart([identity, *encode_replay_reply(self.config.topic, seq, payload)])
            router.send_multipart([identity, *replay_end_frames()])


class _ThreadState:
    """Counters and buffers touched only by the publisher thread."""

    __slots__ = ("kv_seq", "load_seq", "snapshot_seq", "digest_seq", "buffer", "snapshot_waiters", "digest_waiters")

    def __init__(self, config: PublisherConfig) -> None:
        self.kv_seq = 0  # next KV seq to assign
        self.load_seq = 0
        self.snapshot_seq = 0
        self.digest_seq = 0
        self.digest_waiters: list[bytes] = []
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.snapshot_waiters: list[bytes] = []


def _with_epoch(report: LoadReport, epoch: int) -> LoadReport:
    return report if report.epoch == epoch else replace(report, epoch=epoch)
