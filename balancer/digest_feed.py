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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from balancer.digest_index import DigestIndex
from balancer.zmq_feed import ZmqFeed
from protocol.curve import CurveClientKeys
from protocol.digest import DEFAULT_DIGEST_TOPIC, DIGEST_REQUEST, decode_digest
from protocol.load import DEFAULT_LOAD_TOPIC, LoadReport, decode_load, is_extras_message

log = logging.getLogger(__name__)


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


class DigestFeed(ZmqFeed):
    """Feeds `index` from one replica; `start()` in a running loop, `await stop()` to end
    (balancer/zmq_feed.py: the task, its sockets and their clean-up)."""

    def __init__(self, config: DigestFeedConfig, index: DigestIndex,
                 on_load: Callable[[LoadReport], None] | None = None, *,
                 context: zmq.asyncio.Context | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config.replica_id, f"digests:{config.replica_id}", config.curve, on_load,
                         context=context, clock=clock)
        self.config = config
        self.index = index
        self.stats = DigestFeedStats()
        self._asked_at: float | None = None  # a request is pending since then

    async def _serve(self) -> None:
        cfg = self.config
        topics = (cfg.digest_topic,) if cfg.load_topic is None else (cfg.digest_topic, cfg.load_topic)
        sub = self._open(zmq.SUB, cfg.endpoint, subscribe=topics)
        dealer = None if cfg.replay_endpoint is None else self._open(zmq.DEALER, cfg.replay_endpoint)
        while True:
            if dealer is not None and self._should_ask():
                self._asked_at = self.clock()
                self.stats.requests += 1
                await dealer.send_multipart([b"", DIGEST_REQUEST])
            ready = dict(await self._poller.poll(self._poll_ms()))
            if sub in ready:
                await self._drain(sub, self._on_sub)
            if dealer is not None and dealer in ready:
                await self._drain(dealer, self._on_reply)

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
        if (extras := self._split_extras(frames)) is None:
            return
        topic, payload = extras
        if topic == self.config.digest_topic:
            self._on_digest(payload)
        elif topic == self.config.load_topic and self.on_load is not None:
            if (report := self._decode(decode_load, payload, "load report")) is not None:
                self._deliver_load(report)
        else:
            self.stats.foreign_messages += 1

    def _on_reply(self, frames: list[bytes]) -> None:
        if (reply := self._parse_reply(frames)) is None:
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

