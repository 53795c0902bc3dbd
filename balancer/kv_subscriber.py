"""One replica's KV event stream into the prefix index: subscribe, track seq, repair losses.

Works with kvfleet replicas (snapshots, load reports) and with plain vLLM / SGLang publishers
(protocol/events.py has the wire format). Torch-free; runs as one asyncio task per replica.

Sockets: SUB on the replica's PUB endpoint; a DEALER on its replay ROUTER, when it has one,
for replay (vLLM's protocol) and snapshot (kvfleet's) requests, one request at a time.

Sync state, per replica:

    live      batch seq == last + 1 ─▶ apply
              seq > last + 1 (gap)  ─▶ hold it, ask replay from last + 1          ─▶ replay
              the SUB stream's seq goes backwards, or a load report carries a new epoch:
                                      the publisher restarted ─▶ drop the replica's entries,
                                      resync
    replay    batches arrive on the DEALER, live ones are held; at the end marker: if the replay
              starts at the needed seq, apply it and the held batches in order ─▶ live; if it
              starts later (the buffer rolled past) or times out ─▶ resync
    snapshot  the publisher answers with its whole cache and the KV seq it covers: rebuild the
              replica's entries, apply held batches past that seq (a hole left ─▶ replay) ─▶ live;
              no answer within snapshot_timeout_s ─▶ live, inexact (learning from live batches),
              and ask again later with a doubling back-off (at most 60 s)

A resync asks for a snapshot. A publisher without snapshots (vLLM answers the request with its
replay end marker at once) is instead re-learned: drop the replica's entries and replay from seq
0, which rebuilds the exact state while the publisher's replay buffer still reaches back to its
first batch (vLLM keeps 10,000) and a useful subset after that. Without a replay endpoint the
subscriber can only drop the replica's entries and learn from live traffic.

The subscriber starts with a snapshot request too: it may have joined late. `exact` says
whether the index holds exactly the replica's cache (after a snapshot, or having seen every
batch from seq 0); `in_sync` adds that no repair is in flight. A kvfleet replica restarted
while idle is noticed at its next load report (new epoch), so replicas should send them
periodically. The index flags
a replica whose events it could not apply (unknown parent, over capacity); in an exact state
that triggers a resync, at most once per `resync_interval_s`. Nothing is dropped silently:
every path above increments a counter in `stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from balancer.prefix_index import PrefixIndex
from protocol.curve import CurveClientKeys
from protocol.events import (
    EventDecodeError,
    decode_batch,
    decode_seq,
    encode_replay_request,
    parse_replay_reply,
)
from protocol.load import (
    DEFAULT_LOAD_TOPIC,
    DEFAULT_SNAPSHOT_TOPIC,
    SNAPSHOT_REQUEST,
    LoadReport,
    Snapshot,
    decode_load,
    decode_snapshot,
    is_extras_message,
    split_extras_message,
)

log = logging.getLogger(__name__)

_MAX_READS_PER_WAKEUP = 512  # then let the other socket and the other replicas' tasks run


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    replica_id: str
    endpoint: str  # the replica's PUB endpoint, e.g. tcp://10.0.0.1:5557
    replay_endpoint: str | None = None  # its ROUTER endpoint, e.g. tcp://10.0.0.1:5558
    topic: bytes = b""  # vLLM's default
    load_topic: bytes = DEFAULT_LOAD_TOPIC
    snapshot_topic: bytes = DEFAULT_SNAPSHOT_TOPIC
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
        for name in ("replay_timeout_s", "snapshot_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.resync_interval_s < 0 or self.max_held_batches < 1 or self.rcvhwm < 0:
            raise ValueError("resync_interval_s and rcvhwm must be >= 0, max_held_batches >= 1")


@dataclass(slots=True)
class SubscriberStats:
    """Cumulative counters (exported as Prometheus metrics by the balancer)."""

    batches: int = 0  # KV batches applied
    events: int = 0  # events in them
    gaps: int = 0  # seq jumps seen on the live stream
    replays: int = 0  # replay requests sent
    replay_failures: int = 0  # replays that could not cover the gap (rolled buffer, timeout)
    snapshots: int = 0  # snapshots applied
    snapshot_timeouts: int = 0
    resyncs: dict[str, int] = field(default_factory=dict)  # by reason
    duplicates: int = 0  # live batches already applied from a replay
    decode_errors: int = 0  # payloads/frames that could not be decoded (events lost: counted)
    unknown_events: int = 0  # events of an unknown type, skipped
    load_reports: int = 0
    foreign_messages: int = 0  # other topics / layouts on the same socket, skipped
    stale_replies: int = 0  # replay/snapshot replies arriving when none was awaited
    held_overflows: int = 0  # live batches not held because max_held_batches was reached


class ReplicaEventSubscriber:
    """Feeds `index` from one replica; `start()` in a running loop, `await stop()` to end."""

    def __init__(
        self,
        config: SubscriberConfig,
        index: PrefixIndex,
        on_load: Callable[[LoadReport], None] | None = None,
        *,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.index = index
        self.on_load = on_load
        self.clock = clock
        self.stats = SubscriberStats()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._task: asyncio.Task[None] | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._poller = zmq.asyncio.Poller()
        # Sync state (see the module docstring).
        self._mode = "live"
        self.last_seq: int | None = None  # last KV seq applied; -1: none published yet; None: unknown
        self.exact = False  # the index holds exactly the replica's cache (as of last_seq)
        self.snapshot_supported: bool | None = None
        self.epoch: int | None = None
        self._live_high: int | None = None  # highest seq seen on the SUB stream
        self._held: dict[int, bytes] = {}
        self._replayed: dict[int, bytes] = {}
        self._replay_from = 0
        self._replay_learn = False
        self._deadline: float | None = None
        self._pending_resync: str | None = None
        self._next_resync_at = float("-inf")
        self._snapshot_backoff = 0.0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("subscriber already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events:{self.config.replica_id}")

    def stop(self) -> Coroutine[Any, Any, None]:
        """Cancel the task now; await the result to wait until its sockets are closed.

        The cancel is immediate (not when the returned coroutine first runs), so after
        `sub.stop()` the subscriber can no longer touch the index, even if the caller only
        schedules the wait (`asyncio.create_task(sub.stop())`). Idempotent.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return _wait_cancelled(task)

    @property
    def in_sync(self) -> bool:
        return self._mode == "live" and self.exact

    # --- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        cfg = self.config
        sub = self._ctx.socket(zmq.SUB)
        try:
            sub.linger = 0
            sub.rcvhwm = cfg.rcvhwm
            if cfg.curve is not None:
                cfg.curve.apply(sub)
            sub.connect(cfg.endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, cfg.topic)
            if not cfg.load_topic.startswith(cfg.topic):
                sub.setsockopt(zmq.SUBSCRIBE, cfg.load_topic)
            self._sub = sub
            self._poller.register(sub, zmq.POLLIN)
            if cfg.replay_endpoint is not None:
                self._open_dealer()
                self._resync("startup")
            while True:
                timeout = self._poll_timeout_ms()
                ready = dict(await self._poller.poll(timeout))
                if sub in ready:
                    await self._read_sub()
                if self._dealer is not None and self._dealer in ready:
                    await self._read_dealer()
                now = self.clock()
                if self._deadline is not None and now >= self._deadline:
                    self._on_timeout()
                if self._pending_resync is not None and self._mode == "live" and now >= self._next_resync_at:
                    self._resync(self._pending_resync)
        finally:
            self._close_dealer()
            with contextlib.suppress(KeyError):
                self._poller.unregister(sub)
            sub.close(linger=0)
            self._sub = None

    def _poll_timeout_ms(self) -> int | None:
        due = [] if self._deadline is None else [self._deadline]
        if self._pending_resync is not None and self._mode == "live":  # else it waits for live
            due.append(self._next_resync_at)
        if not due:
            return None
        return max(0, int((min(due) - self.clock()) * 1000) + 1)

    def _open_dealer(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.rcvhwm = 0  # a replay may be buffer_steps messages long
        if self.config.curve is not None:
            self.config.curve.apply(dealer)
        dealer.connect(self.config.replay_endpoint)  # type: ignore[arg-type]
        self._dealer = dealer
        self._poller.register(dealer, zmq.POLLIN)

    def _close_dealer(self) -> None:
        dealer, self._dealer = self._dealer, None
        if dealer is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(dealer)
            dealer.close(linger=0)

    def _reset_dealer(self) -> None:
        """A fresh DEALER: replies to an abandoned request can never arrive on it."""
        self._close_dealer()
        if self.config.replay_endpoint is not None:
            self._open_dealer()

    def _send(self, frames: list[bytes]) -> None:
        assert self._dealer is not None
        fut = self._dealer.send_multipart(frames, flags=zmq.NOBLOCK)
        if fut.done() and fut.exception() is not None:
            log.warning("replica %s: request not sent: %s", self.config.replica_id, fut.exception())

    async def _read_sub(self) -> None:
        assert self._sub is not None
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                frames = await self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 3:
                if frames[0] != self.config.topic:
                    self.stats.foreign_messages += 1
                    continue
                try:
                    seq = decode_seq(frames[1])
                except EventDecodeError:
                    self.stats.decode_errors += 1
                    continue
                self._on_live(seq, frames[2])
            elif is_extras_message(frames):
                self._on_extras(frames)
            else:
                self.stats.foreign_messages += 1

    async def _read_dealer(self) -> None:
        for _ in range(_MAX_READS_PER_WAKEUP):
            if self._dealer is None:
                return
            try:
                frames = await self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_dealer(frames)

    # --- live stream --------------------------------------------------------------------------

    def _on_live(self, seq: int, payload: bytes) -> None:
        if self._live_high is not None and seq <= self._live_high:
            # One PUB->SUB connection never reorders or repeats: a new process is talking.
            self._on_restart("restart")
        if self._live_high is None or seq > self._live_high:
            self._live_high = seq
        if self._mode != "live":
            self._hold(seq, payload)
            return
        last = self.last_seq
        if last is None or seq == last + 1:
            self._apply(seq, payload)
        elif seq <= last:
            self.stats.duplicates += 1  # applied already, from a replay that ran ahead
        else:
            self.stats.gaps += 1
            self._hold(seq, payload)
            self._start_replay(last + 1)

    def _hold(self, seq: int, payload: bytes) -> None:
        if len(self._held) >= self.config.max_held_batches:
            self.stats.held_overflows += 1  # the hole it leaves is found and repaired later
            return
        self._held[seq] = payload

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload, on_unknown=self._on_unknown_event)
        except EventDecodeError as e:
            self.stats.decode_errors += 1
            log.warning("replica %s: KV batch %d not decodable: %s", self.config.replica_id, seq, e)
            self.last_seq = seq
            if self.exact:
                self._request_resync("decode_error")
            return
        if self.last_seq is None and seq == 0:
            self.exact = True  # we see the publisher's whole history
        rid = self.config.replica_id
        apply = self.index.apply
        for event in batch.events:
            apply(rid, event)
        self.stats.batches += 1
        self.stats.events += len(batch.events)
        self.last_seq = seq
        reason = self.index.pop_resync_reason(rid)
        if reason is not None and self.exact:
            self._request_resync(reason)

    def _on_unknown_event(self, tag: str) -> None:
        self.stats.unknown_events += 1

    def _enter_live(self) -> None:
        """Back to live: apply held batches in seq order (a hole starts a new replay)."""
        self._mode = "live"
        self._deadline = None
        held = sorted(self._held.items())
        self._held.clear()
        for i, (seq, payload) in enumerate(held):
            if self._mode != "live":
                self._held.update(held[i:])
                return
            last = self.last_seq
            if last is not None and seq <= last:
                continue  # covered by the snapshot / replay
            if last is None or seq == last + 1:
                self._apply(seq, payload)
            else:
                self.stats.gaps += 1
                self._held.update(held[i:])
                self._start_replay(last + 1)
                return

    # --- extras -------------------------------------------------------------------------------

    def _on_extras(self, frames: list[bytes]) -> None:
        try:
            topic, _seq, payload = split_extras_message(frames)
            if topic != self.config.load_topic:
                self.stats.foreign_messages += 1
                return
            report = decode_load(payload)
        except EventDecodeError as e:
            self.stats.decode_errors += 1
            log.warning("replica %s: load report not decodable: %s", self.config.replica_id, e)
            return
        self.stats.load_reports += 1
        if report.epoch:
            if self.epoch is not None and report.epoch != self.epoch:
                self._on_restart("epoch_changed")
            self.epoch = report.epoch
        if self.on_load is not None:
            try:
                self.on_load(report)
            except Exception:
                log.exception("replica %s: on_load callback failed", self.config.replica_id)

    # --- replay and snapshot ------------------------------------------------------------------

    def _start_replay(self, start: int, learn: bool = False) -> None:
        if self.config.replay_endpoint is None:
            self._resync("gap_no_replay")
            return
        self.stats.replays += 1
        self._mode = "replay"
        self._replay_from = start
        self._replay_learn = learn
        self._replayed.clear()
        self._deadline = self.clock() + self.config.replay_timeout_s
        self._send(encode_replay_request(start))

    def _on_dealer(self, frames: list[bytes]) -> None:
        try:
            reply = parse_replay_reply(frames)
        except EventDecodeError:
            self.stats.decode_errors += 1
            return
        if reply.seq is None:  # end marker
            if self._mode == "replay":
                self._finish_replay()
            elif self._mode == "snapshot":
                # vLLM's ROUTER read our request as a replay past its buffer: no snapshots here.
                self.snapshot_supported = False
                self._learn_from_replay()
            else:
                self.stats.stale_replies += 1
            return
        if reply.topic == self.config.snapshot_topic:
            if self._mode != "snapshot":
                self.stats.stale_replies += 1  # a snapshot we no longer wait for
                return
            try:
                snapshot = decode_snapshot(reply.payload)
            except EventDecodeError as e:
                self.stats.decode_errors += 1
                log.warning("replica %s: snapshot not decodable: %s", self.config.replica_id, e)
                self._learn_from_replay()
                return
            self.snapshot_supported = True
            self._snapshot_backoff = 0.0
            self._apply_snapshot(snapshot)
            return
        if self._mode == "replay" and (reply.topic is None or reply.topic == self.config.topic):
            self._replayed[reply.seq] = reply.payload
        else:
            self.stats.stale_replies += 1

    def _finish_replay(self) -> None:
        replayed = self._replayed
        self._replayed = {}
        if self._replay_learn:
            # Learning: take whatever the buffer still has. Exact if it reaches back to seq 0.
            self.exact = False
            for seq, payload in sorted(replayed.items()):
                if self.last_seq is not None and seq != self.last_seq + 1:
                    self.stats.gaps += 1  # a hole inside the replay: carry on, inexact
                    self.exact = False
                self._apply(seq, payload)  # exact from here if this is seq 0
            self._enter_live()
            return
        start = self._replay_from
        if start not in replayed and start not in self._held:
            self.stats.replay_failures += 1
            self._resync("replay_incomplete")
            return
        for seq, payload in sorted(replayed.items()):
            last = self.last_seq
            if last is not None and seq <= last:
                continue
            if last is not None and seq != last + 1:
                break  # a hole: _enter_live will ask again for it
            self._apply(seq, payload)
            if self._mode != "replay":
                return  # the batch asked for a resync
        self._enter_live()

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        rid = self.config.replica_id
        self.stats.snapshots += 1
        if snapshot.epoch:
            self.epoch = snapshot.epoch
        self.index.load_snapshot(rid, snapshot.events)
        self.index.pop_resync_reason(rid)  # counted by the index; asking again would loop
        self.last_seq = -1 if snapshot.kv_seq is None else snapshot.kv_seq
        self.exact = True
        self._enter_live()

    def _on_timeout(self) -> None:
        mode = self._mode
        self._deadline = None
        self._reset_dealer()
        if mode == "replay":
            self.stats.replay_failures += 1
            if self._replay_learn:
                self._enter_live()  # learn from live traffic only
            else:
                self._resync("replay_timeout")
        elif mode == "snapshot":
            # No answer (replica down or busy, or no snapshots and no ROUTER to say so): keep
            # what the index has, learn from live traffic, and ask again later, backing off.
            self.stats.snapshot_timeouts += 1
            self.last_seq = None
            self.exact = False
            self._enter_live()
            self._snapshot_backoff = min(max(self._snapshot_backoff * 2, self.config.snapshot_timeout_s), 60.0)
            self._pending_resync = self._pending_resync or "snapshot_retry"
            self._next_resync_at = self.clock() + self._snapshot_backoff

    # --- resync -------------------------------------------------------------------------------

    def _request_resync(self, reason: str) -> None:
        if self.clock() >= self._next_resync_at and self._mode == "live":
            self._resync(reason)
        else:
            self._pending_resync = self._pending_resync or reason

    def _resync(self, reason: str) -> None:
        self.stats.resyncs[reason] = self.stats.resyncs.get(reason, 0) + 1
        self._pending_resync = None
        self._next_resync_at = self.clock() + max(self.config.resync_interval_s, self._snapshot_backoff)
        if self.config.replay_endpoint is None:
            self.index.clear_replica(self.config.replica_id)
            self.last_seq = None
            self.exact = False
            self._enter_live()
            return
        if self.snapshot_supported is False:
            self._learn_from_replay()
            return
        self._mode = "snapshot"
        self._deadline = self.clock() + self.config.snapshot_timeout_s
        self._send([b"", SNAPSHOT_REQUEST])

    def _learn_from_replay(self) -> None:
        self.index.clear_replica(self.config.replica_id)
        self.last_seq = None
        self.exact = False
        self._start_replay(0, learn=True)

    def _on_restart(self, reason: str) -> None:
        """The publisher is a new process: everything we know about the replica is void."""
        self._held.clear()
        self._replayed.clear()
        self._live_high = None
        self.index.clear_replica(self.config.replica_id)
        self.last_seq = None
        self.exact = False
        self.epoch = None
        if self._mode != "live":
            self._reset_dealer()
        self._mode = "live"
        self._deadline = None
        self._resync(reason)


async def _wait_cancelled(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await task
