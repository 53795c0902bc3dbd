"""One replica's cache digests into the digest index: the sockets and the asyncio task.

A SUB socket on the replica's PUB endpoint subscribed to its digest topic (and, where no event
subscriber follows the replica, to its load topic, so load reports still reach the registry),
and a DEALER on its ROUTER for digest requests (protocol/digest.py has the frames). The task
asks for a digest when it starts — a balancer that joins late routes from it at once instead of
waiting up to an interval — and again whenever the one it holds is older than `max_age_s` or a
request got no answer within `request_timeout_s`. A vLLM ROUTER answers a digest request with
its replay end marker: that publisher has no digests, and the feed stops asking.

Its own DEALER, not the event subscriber's: that one carries the replay / snapshot state machine
(balancer/kv_sync.py), and a vLLM end marker answering a digest request must never be read as
the end of a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from balancer.digest_index import DigestIndex
from protocol.curve import CurveClientKeys
from protocol.digest import DEFAULT_DIGEST_TOPIC, DIGEST_REQUEST, decode_digest
from protocol.events import EventDecodeError, parse_replay_reply
from protocol.load import DEFAULT_LOAD_TOPIC, LoadReport, decode_load, is_extras_message, split_extras_message

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DigestFeedConfig:
    replica_id: str
    endpoint: str  # the replica's PUB endpoint
    replay_endpoint: str | None = None  # its ROUTER (digest requests); None: periodic digests only
    digest_topic: bytes = DEFAULT_DIGEST_TOPIC
    load_topic: bytes | None = DEFAULT_LOAD_TOPIC  # None: another subscriber reads load reports
    max_age_s: float = 30.0
    request_timeout_s: float = 2.0
    curve: CurveClientKeys | None = None

    def __post_init__(self) -> None:
        if not self.replica_id or not self.digest_topic:
            raise ValueError("a digest feed needs a replica_id and a non-empty digest_topic")
        if self.max_age_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("max_age_s and request_timeout_s must be positive")


@dataclass(slots=True)
class DigestFeedStats:
    received: int = 0  # digests handed to the index (PUB or replies)
    requests: int = 0  # digest requests sent
    decode_errors: int = 0
    foreign_messages: int = 0
    supported: bool | None = None  # False: the ROUTER answered a request with an end marker (vLLM)


class DigestFeed:
    """Feeds `index` from one replica; `start()` in a running loop, `await stop()` to end."""

    def __init__(self, config: DigestFeedConfig, index: DigestIndex,
                 on_load: Callable[[LoadReport], None] | None = None, *,
                 context: zmq.asyncio.Context | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.index = index
        self.on_load = on_load
        self.clock = clock
        self.stats = DigestFeedStats()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._task: asyncio.Task[None] | None = None
        self._asked_at: float | None = None  # a request is pending since then

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("digest feed already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"digests:{self.config.replica_id}")

    def stop(self) -> Coroutine[Any, Any, None]:
        """Cancel now (the feed no longer touches the index); await to wait for the sockets."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return _wait_cancelled(task)

    async def _run(self) -> None:
        cfg = self.config
        sub = self._ctx.socket(zmq.SUB)
        dealer = None
        poller = zmq.asyncio.Poller()
        try:
            sub.linger = 0
            if cfg.curve is not None:
                cfg.curve.apply(sub)
            sub.connect(cfg.endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, cfg.digest_topic)
            if cfg.load_topic is not None:
                sub.setsockopt(zmq.SUBSCRIBE, cfg.load_topic)
            poller.register(sub, zmq.POLLIN)
            if cfg.replay_endpoint is not None:
                dealer = self._ctx.socket(zmq.DEALER)
                dealer.linger = 0
                if cfg.curve is not None:
                    cfg.curve.apply(dealer)
                dealer.connect(cfg.replay_endpoint)
                poller.register(dealer, zmq.POLLIN)
            while True:
                if dealer is not None and self._should_ask():
                    self._asked_at = self.clock()
                    self.stats.requests += 1
                    await dealer.send_multipart([b"", DIGEST_REQUEST])
                ready = dict(await poller.poll(self._poll_ms()))
                if sub in ready:
                    while (frames := await _recv(sub)) is not None:
                        self._on_sub(frames)
                if dealer is not None and dealer in ready:
                    while (frames := await _recv(dealer)) is not None:
                        self._on_reply(frames)
        finally:
            for sock in (sub, dealer):
                if sock is not None:
                    with contextlib.suppress(KeyError):
                        poller.unregister(sock)
                    sock.close(linger=0)

    def _should_ask(self) -> bool:
        if self.stats.supported is False:
            return False
        now = self.clock()
        if self._asked_at is not None:
            return now - self._asked_at >= self.config.request_timeout_s  # unanswered: ask again
        age = self.index.age_s(self.config.replica_id)
        return age is None or age >= self.config.max_age_s

    def _poll_ms(self) -> int:
        return int(min(self.config.request_timeout_s, self.config.max_age_s) * 1000 / 2) + 1

    def _on_sub(self, frames: list[bytes]) -> None:
        if not is_extras_message(frames):
            self.stats.foreign_messages += 1
            return
        try:
            topic, _seq, payload = split_extras_message(frames)
        except EventDecodeError:
            self.stats.decode_errors += 1
            return
        if topic == self.config.digest_topic:
            self._on_digest(payload)
        elif topic == self.config.load_topic and self.on_load is not None:
            if (report := self._decode(decode_load, payload, "load report")) is None:
                return
            try:
                self.on_load(report)
            except Exception:
                log.exception("replica %s: on_load callback failed", self.config.replica_id)
        else:
            self.stats.foreign_messages += 1

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            reply = parse_replay_reply(frames)
        except EventDecodeError:
            self.stats.decode_errors += 1
            return
        if reply.seq is None:  # an end marker: this ROUTER serves replays only (vLLM)
            self.stats.supported = False
            self._asked_at = None
            log.warning("replica %s answers digest requests with a replay end marker (a vLLM-style publisher): "
                        "its cache is known only from periodic digests, if it publishes any; for a replica "
                        "without digests use --index-source events or both", self.config.replica_id)
        elif reply.topic == self.config.digest_topic:
            self._on_digest(reply.payload)
        else:
            self.stats.foreign_messages += 1

    def _decode(self, decode: Callable[[bytes], T], payload: bytes, what: str) -> T | None:
        """`decode(payload)`, or None, counted and logged, when the payload does not decode."""
        try:
            return decode(payload)
        except EventDecodeError as e:
            self.stats.decode_errors += 1
            log.warning("replica %s: %s not decodable: %s", self.config.replica_id, what, e)
            return None

    def _on_digest(self, payload: bytes) -> None:
        if (digest := self._decode(decode_digest, payload, "cache digest")) is None:
            return
        if self.index.update(self.config.replica_id, digest, len(payload)):
            self.stats.received += 1
            self.stats.supported = True
            self._asked_at = None
        else:
            log.warning("replica %s: cache digest for block size %d, the balancer hashes %d-token blocks: "
                        "set --block-size to the replicas'", self.config.replica_id, digest.block_size,
                        self.index.block_size)


async def _recv(sock: zmq.asyncio.Socket) -> list[bytes] | None:
    try:
        return await sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None


async def _wait_cancelled(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await task
