"""One replica's KV event stream into the prefix index: the sockets and the asyncio task.

Works with kvfleet replicas (snapshots, load reports) and with plain vLLM / SGLang publishers
(protocol/events.py has the wire format). Torch-free; runs as one asyncio task per replica.

Sockets: SUB on the replica's PUB endpoint; a DEALER on its replay ROUTER, when it has one,
for replay (vLLM's protocol) and snapshot (kvfleet's) requests, one request at a time.

The task reads frames, decodes them, and feeds what they say to the replica's `KVSync`
(balancer/kv_sync.py: the live / replay / snapshot state machine, its diagram, and what
`exact` and `in_sync` mean); it performs the actions that come back against the sockets and
the prefix index. Frames it cannot hand over (undecodable, other topics) it counts in `stats`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio

from balancer.kv_sync import (
    Action,
    Apply,
    ClearReplica,
    KVSync,
    LoadSnapshot,
    RequestReplay,
    RequestSnapshot,
    ResetDealer,
    SubscriberStats,
    SyncConfig,
)
from balancer.prefix_index import PrefixIndex
from balancer.zmq_feed import ZmqFeed
from protocol.curve import CurveClientKeys
from protocol.digest import DEFAULT_DIGEST_TOPIC
from protocol.events import (
    EventDecodeError,
    decode_batch,
    decode_seq,
    encode_replay_request,
)
from protocol.load import (
    DEFAULT_LOAD_TOPIC,
    DEFAULT_SNAPSHOT_TOPIC,
    SNAPSHOT_REQUEST,
    LoadReport,
    decode_load,
    decode_snapshot,
    is_extras_message,
)

__all__ = ["ReplicaEventSubscriber", "SubscriberConfig", "SubscriberStats"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    replica_id: str
    endpoint: str  # the replica's PUB endpoint, e.g. tcp://10.0.0.1:5557
    replay_endpoint: str | None = None  # its ROUTER endpoint, e.g. tcp://10.0.0.1:5558
    topic: bytes = b""  # vLLM's default
    load_topic: bytes = DEFAULT_LOAD_TOPIC
    snapshot_topic: bytes = DEFAULT_SNAPSHOT_TOPIC
    # Cache digests (protocol/digest.py) reach this SUB too when the KV topic is empty; a digest
    # feed (balancer/digest_feed.py) reads them, here they are skipped without being counted.
    digest_topic: bytes = DEFAULT_DIGEST_TOPIC
    replay_timeout_s: float = 2.0
    snapshot_timeout_s: float = 10.0  # the engine answers between steps
    resync_interval_s: float = 1.0  # at most one index-triggered resync per interval
    max_held_batches: int = 100_000  # live batches held while a replay/snapshot is pending
    rcvhwm: int = 100_000
    curve: CurveClientKeys | None = None  # talk only to the holder of this server key (protocol/curve.py)

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("replica_id must be non-empty")
        for name in ("topic", "load_topic", "snapshot_topic"):
            if not isinstance(getattr(self, name), bytes):
                raise ValueError(f"{name} must be bytes")
        if self.snapshot_topic == self.topic:
            raise ValueError("snapshot_topic must differ from the KV topic")
        if self.rcvhwm < 0:
            raise ValueError("rcvhwm must be >= 0 (0: no limit on queued messages)")
        self.sync_config()  # validates the state machine's settings

    def sync_config(self) -> SyncConfig:
        return SyncConfig(
            has_replay=self.replay_endpoint is not None,
            replay_timeout_s=self.replay_timeout_s,
            snapshot_timeout_s=self.snapshot_timeout_s,
            resync_interval_s=self.resync_interval_s,
            max_held_batches=self.max_held_batches,
        )


class ReplicaEventSubscriber(ZmqFeed):
    """Feeds `index` from one replica; `start()` in a running loop, `await stop()` to end
    (balancer/zmq_feed.py: the task, its sockets and their clean-up)."""

    def __init__(
        self,
        config: SubscriberConfig,
        index: PrefixIndex,
        on_load: Callable[[LoadReport], None] | None = None,
        *,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config.replica_id, f"kv-events:{config.replica_id}", config.curve, on_load,
                         context=context, clock=clock)
        self.config = config
        self.index = index
        self._sync = KVSync(config.sync_config())
        self.stats: SubscriberStats = self._sync.stats
        self._dealer: zmq.asyncio.Socket | None = None

    # --- the sync state (balancer/kv_sync.py), read-only ---------------------------------------

    @property
    def last_seq(self) -> int | None:
        """Last KV seq applied; -1: none published yet; None: unknown."""
        return self._sync.last_seq

    @property
    def exact(self) -> bool:
        """The index holds exactly the replica's cache (as of last_seq)."""
        return self._sync.exact

    @property
    def in_sync(self) -> bool:
        return self._sync.in_sync

    @property
    def snapshot_supported(self) -> bool | None:
        return self._sync.snapshot_supported

    @property
    def epoch(self) -> int | None:
        return self._sync.epoch

    @property
    def _mode(self) -> str:  # "live", "replay" or "snapshot"
        return self._sync.mode

    # --- the loop -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        cfg = self.config
        topics = (cfg.topic,) if cfg.load_topic.startswith(cfg.topic) else (cfg.topic, cfg.load_topic)
        sub = self._open(zmq.SUB, cfg.endpoint, rcvhwm=cfg.rcvhwm, subscribe=topics)
        if cfg.replay_endpoint is not None:
            self._dealer = self._open(zmq.DEALER, cfg.replay_endpoint, rcvhwm=0)  # a replay may be buffer_steps long
        self._do(self._sync.start(self.clock()))
        while True:
            ready = dict(await self._poller.poll(self._poll_timeout_ms()))
            if sub in ready:
                await self._drain(sub, self._on_sub)
            if self._dealer is not None and self._dealer in ready:
                await self._drain(self._dealer, self._on_dealer)
            self._do(self._sync.on_time(self.clock()))

    def _poll_timeout_ms(self) -> int | None:
        wake_at = self._sync.wake_at
        if wake_at is None:
            return None
        return max(0, int((wake_at - self.clock()) * 1000) + 1)

    def _send(self, frames: list[bytes]) -> None:
        assert self._dealer is not None  # KVSync asks only when the replica has a replay endpoint
        fut = self._dealer.send_multipart(frames, flags=zmq.NOBLOCK)
        if fut.done() and fut.exception() is not None:
            log.warning("replica %s: request not sent: %s", self.config.replica_id, fut.exception())

    # --- performing the state machine's actions -----------------------------------------------

    def _do(self, actions: Sequence[Action]) -> None:
        rid = self.config.replica_id
        while actions:
            then: Sequence[Action] = ()
            for action in actions:
                match action:
                    case Apply(seq, payload):  # always the last action: `then` continues the list
                        then = self._apply(seq, payload)
                    case RequestReplay(start):
                        self._send(encode_replay_request(start))
                    case RequestSnapshot():
                        self._send([b"", SNAPSHOT_REQUEST])
                    case ResetDealer():  # a fresh DEALER: replies to an abandoned request can never arrive
                        if self._dealer is not None:
                            self._dealer = self._reopen(self._dealer)
                    case ClearReplica():
                        self.index.clear_replica(rid)
                    case LoadSnapshot(snapshot):
                        self.index.load_snapshot(rid, snapshot.events)
                        self.index.pop_resync_reason(rid)  # counted by the index; asking again would loop
            actions = then

    def _apply(self, seq: int, payload: bytes) -> Sequence[Action]:
        rid = self.config.replica_id
        try:
            batch = decode_batch(payload, on_unknown=self._on_unknown_event)
        except EventDecodeError as e:
            log.warning("replica %s: KV batch %d not decodable: %s", rid, seq, e)
            return self._sync.applied(seq, self.clock(), events=None)
        apply = self.index.apply
        for event in batch.events:
            apply(rid, event)
        flag = self.index.pop_resync_reason(rid)
        return self._sync.applied(seq, self.clock(), events=len(batch.events), flag=flag)

    def _on_unknown_event(self, tag: str) -> None:
        self.stats.unknown_events += 1

    # --- reading ------------------------------------------------------------------------------

    def _on_sub(self, frames: list[bytes]) -> None:
        if len(frames) == 3:
            if frames[0] != self.config.topic:
                self.stats.foreign_messages += 1
                return
            try:
                seq = decode_seq(frames[1])
            except EventDecodeError:
                self.stats.decode_errors += 1
                return
            self._do(self._sync.on_live_batch(seq, frames[2], self.clock()))
        elif is_extras_message(frames):
            self._on_extras(frames)
        else:
            self.stats.foreign_messages += 1

    def _on_extras(self, frames: list[bytes]) -> None:
        if (extras := self._split_extras(frames)) is None:
            return
        topic, payload = extras
        if topic == self.config.digest_topic:
            return
        if topic != self.config.load_topic:
            self.stats.foreign_messages += 1
            return
        if (report := self._decode(decode_load, payload, "load report")) is None:
            return
        self._do(self._sync.on_load_report(report.epoch, self.clock()))
        self._deliver_load(report)

    def _on_dealer(self, frames: list[bytes]) -> None:
        if (reply := self._parse_reply(frames)) is None:
            return
        now = self.clock()
        if reply.seq is None:  # end marker
            self._do(self._sync.on_replay_end(now))
        elif reply.topic == self.config.snapshot_topic:
            snapshot = None
            if self._sync.awaiting_snapshot:  # decode only then: a snapshot is the whole cache
                try:
                    snapshot = decode_snapshot(reply.payload)
                except EventDecodeError as e:
                    log.warning("replica %s: snapshot not decodable: %s", self.config.replica_id, e)
            self._do(self._sync.on_snapshot(snapshot, now))
        elif reply.topic is None or reply.topic == self.config.topic:
            self._do(self._sync.on_replay_batch(reply.seq, reply.payload, now))
        else:
            self.stats.stale_replies += 1

