"""One replica's KV-event sync state: which batches to apply, when to replay, when to resync.

Pure and synchronous: no sockets, no clock, no index. The subscriber (balancer/kv_subscriber.py)
reads the wire, tells a `KVSync` what arrived and what time it is, and performs the actions
it answers with: apply a batch to the index, ask for a replay or a snapshot, drop or rebuild
the replica's entries, abandon a request in flight. The same inputs always give the same
actions, so the state machine is tested without ZMQ (tests/test_kv_sync.py).

States (`mode`):

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
              and ask again later with a doubling back-off (at most 60 s); the same for a
              re-learning replay (below) that goes unanswered

A resync asks for a snapshot. A publisher without snapshots (vLLM answers the request with its
replay end marker at once) is instead re-learned: drop the replica's entries and replay from seq
0, which rebuilds the exact state while the publisher's replay buffer still reaches back to its
first batch (vLLM keeps 10,000) and a useful subset after that. Without a replay endpoint the
subscriber can only drop the replica's entries and learn from live traffic.

The subscriber starts with a snapshot request too (`start`): it may have joined late. `exact`
says whether the index holds exactly the replica's cache (after a snapshot, or having seen every
batch from seq 0); `in_sync` adds that no repair is in flight. A kvfleet replica restarted while
idle is noticed at its next load report (new epoch), so replicas should send them periodically.
The index flags a replica whose events it could not apply (unknown parent, over capacity); in an
exact state that triggers a resync, at most once per `resync_interval_s` (a resync asked for
sooner, or while a repair is in flight, waits: `wake_at`). Nothing is dropped silently: every
path above increments a counter in `stats`.

The protocol with the caller: every `on_*` method returns the actions to perform, in order. An
`Apply` is always the last action of a list; the caller applies that batch and reports the
outcome with `applied()`, whose actions continue the list (the outcome decides what comes next:
a batch the index flags may stop the rest for a resync). Until then no other input is taken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from protocol.load import Snapshot

# A snapshot request that goes unanswered is retried after snapshot_timeout_s, then twice as
# long each time, up to this: a replica that is down costs one request a minute.
MAX_SNAPSHOT_BACKOFF_S = 60.0

Mode = Literal["live", "replay", "snapshot"]


@dataclass(frozen=True, slots=True)
class SyncConfig:
    has_replay: bool  # the replica has a replay ROUTER (replay and snapshot requests)
    replay_timeout_s: float = 2.0
    snapshot_timeout_s: float = 10.0  # the engine answers between steps
    resync_interval_s: float = 1.0  # at most one index-triggered resync per interval
    max_held_batches: int = 100_000  # live batches held while a replay/snapshot is pending

    def __post_init__(self) -> None:
        for name in ("replay_timeout_s", "snapshot_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (seconds to wait for the replica's answer)")
        if self.resync_interval_s < 0:
            raise ValueError("resync_interval_s must be >= 0 (0: resync whenever the index asks)")
        if self.max_held_batches < 1:
            raise ValueError("max_held_batches must be >= 1 (batches held while a repair is in flight)")


@dataclass(slots=True)
class SubscriberStats:
    """Cumulative counters (exported as Prometheus metrics by the balancer). The subscriber
    counts what it cannot hand to the state machine (undecodable frames, other topics)."""

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


# --- actions: what the caller does, in the order given ------------------------------------------


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply KV batch `seq` to the index, then report it with `KVSync.applied`."""

    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class RequestReplay:
    """Ask the replay ROUTER for every buffered batch from `start` on."""

    start: int


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    """Ask the replay ROUTER for a snapshot."""


@dataclass(frozen=True, slots=True)
class ResetDealer:
    """Abandon the request in flight: a fresh DEALER, so its replies can never arrive."""


@dataclass(frozen=True, slots=True)
class ClearReplica:
    """Drop every entry the index holds for the replica."""


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """Rebuild the replica's entries from `snapshot` (and clear the index's resync flag for it:
    what the snapshot could not load is counted by the index; asking again would loop)."""

    snapshot: Snapshot


Action = Apply | RequestReplay | RequestSnapshot | ResetDealer | ClearReplica | LoadSnapshot

_NOTHING: tuple[Action, ...] = ()


class KVSync:
    """The sync state of one replica's event stream; see the module docstring.

    Public state, read-only for callers: `mode`, `last_seq` (last KV seq applied; -1: none
    published yet; None: unknown), `exact`, `in_sync`, `snapshot_supported` (None: not known
    yet), `epoch` (the publisher's, from its load reports and snapshots), `wake_at`, `stats`.
    """

    def __init__(self, config: SyncConfig, stats: SubscriberStats | None = None) -> None:
        self.config = config
        self.stats = SubscriberStats() if stats is None else stats
        self.mode: Mode = "live"
        self.last_seq: int | None = None
        self.exact = False  # the index holds exactly the replica's cache (as of last_seq)
        self.snapshot_supported: bool | None = None
        self.epoch: int | None = None
        self._live_high: int | None = None  # highest seq seen on the SUB stream
        self._held: dict[int, bytes] = {}  # live batches waiting for a repair to end
        self._draining: deque[tuple[int, bytes]] = deque()  # held batches being applied, by seq
        self._replayed: dict[int, bytes] = {}
        self._replay_queue: deque[tuple[int, bytes]] | None = None  # an ended replay, being applied
        self._replay_from = 0
        self._replay_learn = False
        self._deadline: float | None = None  # of the replay / snapshot request in flight
        self._pending_resync: str | None = None
        self._next_resync_at = float("-inf")
        self._snapshot_backoff = 0.0
        self._tick: float | None = None  # on_time's now, until its due resync is checked
        self._applying: int | None = None  # the seq of the Apply awaiting `applied`
        self._out: list[Action] = []

    @property
    def in_sync(self) -> bool:
        return self.mode == "live" and self.exact

    @property
    def awaiting_snapshot(self) -> bool:
        """A snapshot reply would be used now (else it is stale: the caller need not decode it)."""
        return self.mode == "snapshot"

    @property
    def wake_at(self) -> float | None:
        """When `on_time` has work: the request's deadline or a waiting resync; None: never."""
        due = [] if self._deadline is None else [self._deadline]
        if self._pending_resync is not None and self.mode == "live":  # else it waits for live
            due.append(self._next_resync_at)
        return min(due) if due else None

    # --- inputs -------------------------------------------------------------------------------

    def start(self, now: float) -> Sequence[Action]:
        """The subscriber's sockets are up: ask for a snapshot (it may have joined late)."""
        self._check_idle()
        if self.config.has_replay:
            self._resync("startup", now)
        return self._settle(now)

    def on_live_batch(self, seq: int, payload: bytes, now: float) -> Sequence[Action]:
        """A KV batch read from the SUB stream."""
        self._check_idle()
        if self._live_high is not None and seq <= self._live_high:
            # One PUB->SUB connection never reorders or repeats: a new process is talking.
            self._on_restart("restart", now)
        if self._live_high is None or seq > self._live_high:
            self._live_high = seq
        if self.mode != "live":
            self._hold(seq, payload)
            return self._settle(now)
        last = self.last_seq
        if last is None or seq == last + 1:
            self._apply(seq, payload)
        elif seq <= last:
            self.stats.duplicates += 1  # applied already, from a replay that ran ahead
        else:
            self.stats.gaps += 1
            self._hold(seq, payload)
            self._start_replay(last + 1, now)
        return self._settle(now)

    def applied(self, seq: int, now: float, *, events: int | None, flag: str | None = None) -> Sequence[Action]:
        """The outcome of `Apply(seq)`: `events` applied (None: the payload could not be decoded,
        its events are lost) and the index's resync reason for the replica after it, if any."""
        if self._applying != seq:
            raise RuntimeError(f"applied({seq}) but the batch awaiting its outcome is {self._applying}: "
                               "report each Apply once, before any other input")
        self._applying = None
        whole_history = self.last_seq is None and seq == 0  # we see the publisher's every batch
        self.last_seq = seq
        if events is None:
            self.stats.decode_errors += 1
            if self.exact:
                self._request_resync("decode_error", now)
            return self._settle(now)
        if whole_history:
            self.exact = True
        self.stats.batches += 1
        self.stats.events += events
        if flag is not None and self.exact:
            self._request_resync(flag, now)
        return self._settle(now)

    def on_replay_batch(self, seq: int, payload: bytes, now: float) -> Sequence[Action]:
        """A KV batch read from the DEALER (an answer to `RequestReplay`)."""
        self._check_idle()
        if self.mode == "replay":
            self._replayed[seq] = payload
        else:
            self.stats.stale_replies += 1
        return self._settle(now)

    def on_replay_end(self, now: float) -> Sequence[Action]:
        """The replay end marker read from the DEALER."""
        self._check_idle()
        if self.mode == "replay":
            self._finish_replay(now)
        elif self.mode == "snapshot":
            # vLLM's ROUTER read our request as a replay past its buffer: no snapshots here.
            self.snapshot_supported = False
            self._learn_from_replay(now)
        else:
            self.stats.stale_replies += 1
        return self._settle(now)

    def on_snapshot(self, snapshot: Snapshot | None, now: float) -> Sequence[Action]:
        """A snapshot reply read from the DEALER; None: it could not be decoded."""
        self._check_idle()
        if self.mode != "snapshot":
            self.stats.stale_replies += 1  # a snapshot we no longer wait for
        elif snapshot is None:
            self.stats.decode_errors += 1
            self._learn_from_replay(now)
        else:
            self.snapshot_supported = True
            self._snapshot_backoff = 0.0
            self.stats.snapshots += 1
            if snapshot.epoch:
                self.epoch = snapshot.epoch
            self._out.append(LoadSnapshot(snapshot))
            self.last_seq = -1 if snapshot.kv_seq is None else snapshot.kv_seq
            self.exact = True
            self._enter_live()
        return self._settle(now)

    def on_load_report(self, epoch: int, now: float) -> Sequence[Action]:
        """A load report's epoch (0: the publisher has none)."""
        self._check_idle()
        self.stats.load_reports += 1
        if epoch:
            if self.epoch is not None and epoch != self.epoch:
                self._on_restart("epoch_changed", now)
            self.epoch = epoch
        return self._settle(now)

    def on_time(self, now: float) -> Sequence[Action]:
        """Called after every wakeup: a request past its deadline times out, then a waiting
        resync whose time has come runs (once the timeout's batches are applied)."""
        self._check_idle()
        if self._deadline is not None and now >= self._deadline:
            self._on_timeout(now)
        self._tick = now
        return self._settle(now)

    # --- internals ----------------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self._applying is not None:
            raise RuntimeError(f"batch {self._applying} awaits its outcome: call applied() first")

    def _apply(self, seq: int, payload: bytes) -> None:
        self._applying = seq
        self._out.append(Apply(seq, payload))

    def _settle(self, now: float) -> Sequence[Action]:
        """Run the queued work up to the next Apply (or to the end) and hand the actions over."""
        while self._applying is None:
            if self._replay_queue is not None:
                self._step_replayed()
            elif self._draining or (self.mode == "live" and self._held):
                self._step_held(now)
            elif self._tick is not None:
                if self._pending_resync is not None and self.mode == "live" and self._tick >= self._next_resync_at:
                    self._resync(self._pending_resync, self._tick)
                self._tick = None
            else:
                break
        if not self._out:
            return _NOTHING
        out, self._out = self._out, []
        return out

    def _hold(self, seq: int, payload: bytes) -> None:
        if len(self._held) >= self.config.max_held_batches:
            self.stats.held_overflows += 1  # the hole it leaves is found and repaired later
            return
        self._held[seq] = payload

    def _enter_live(self) -> None:
        """Back to live; `_settle` then applies the held batches in seq order."""
        self.mode = "live"
        self._deadline = None

    def _step_held(self, now: float) -> None:
        """One held batch, in seq order: skip it, apply it, or find a hole and ask for a replay."""
        if self.mode != "live":  # an applied batch asked for a resync: the rest waits, held
            self._held.update(self._draining)
            self._draining.clear()
            return
        if self._held:
            self._draining = deque(sorted([*self._draining, *self._held.items()]))
            self._held.clear()
        seq, payload = self._draining[0]
        last = self.last_seq
        if last is not None and seq <= last:
            self._draining.popleft()  # covered by the snapshot / replay
        elif last is None or seq == last + 1:
            self._draining.popleft()
            self._apply(seq, payload)
        else:
            self.stats.gaps += 1
            self._held.update(self._draining)
            self._draining.clear()
            self._start_replay(last + 1, now)

    def _step_replayed(self) -> None:
        """One batch of an ended replay, in seq order; after the last (or a hole), live."""
        queue = self._replay_queue
        assert queue is not None
        if not queue:
            self._replay_queue = None
            self._enter_live()  # a hole: the held batches' drain asks again for it
            return
        seq, payload = queue.popleft()
        last = self.last_seq
        if self._replay_learn:
            # Learning: take whatever the buffer still has. Exact if it reaches back to seq 0.
            if last is not None and seq != last + 1:
                self.stats.gaps += 1  # a hole inside the replay: carry on, inexact
                self.exact = False
            self._apply(seq, payload)
        elif last is not None and seq <= last:
            pass
        elif last is not None and seq != last + 1:
            queue.clear()
        else:
            self._apply(seq, payload)

    def _start_replay(self, start: int, now: float, learn: bool = False) -> None:
        if not self.config.has_replay:
            self._resync("gap_no_replay", now)
            return
        self.stats.replays += 1
        self.mode = "replay"
        self._replay_from = start
        self._replay_learn = learn
        self._replayed.clear()
        self._deadline = now + self.config.replay_timeout_s
        self._out.append(RequestReplay(start))

    def _finish_replay(self, now: float) -> None:
        replayed = self._replayed
        self._replayed = {}
        if self._replay_learn:
            self.exact = False
            self._snapshot_backoff = 0.0  # answered: a later unanswered request starts over
            if not replayed:
                # An empty buffer: the publisher had published nothing when it answered (vLLM and
                # kvfleet buffer every batch, the latest buffer_steps of them), so the cleared
                # index is exact as of "none yet"; a live batch held past a lost one is a gap.
                self.last_seq = -1
                self.exact = True
        elif self._replay_from not in replayed and self._replay_from not in self._held:
            self.stats.replay_failures += 1  # the buffer rolled past the batch we need
            self._resync("replay_incomplete", now)
            return
        self._replay_queue = deque(sorted(replayed.items()))

    def _on_timeout(self, now: float) -> None:
        mode = self.mode
        self._deadline = None
        self._out.append(ResetDealer())
        if mode == "replay" and not self._replay_learn:
            self.stats.replay_failures += 1
            self._resync("replay_timeout", now)
            return
        # No answer to a snapshot or a re-learning replay (replica down or busy, or no
        # snapshots and no ROUTER to say so): keep what the index has, learn from live traffic,
        # and ask again later, backing off.
        if mode == "replay":
            self.stats.replay_failures += 1
            timeout, reason = self.config.replay_timeout_s, "replay_retry"
        else:
            self.stats.snapshot_timeouts += 1
            timeout, reason = self.config.snapshot_timeout_s, "snapshot_retry"
        self.last_seq = None
        self.exact = False
        self._snapshot_backoff = min(max(self._snapshot_backoff * 2, timeout), MAX_SNAPSHOT_BACKOFF_S)
        self._pending_resync = self._pending_resync or reason
        self._next_resync_at = now + self._snapshot_backoff
        self._enter_live()

    def _request_resync(self, reason: str, now: float) -> None:
        if now >= self._next_resync_at and self.mode == "live":
            self._resync(reason, now)
        else:
            self._pending_resync = self._pending_resync or reason

    def _resync(self, reason: str, now: float) -> None:
        self.stats.resyncs[reason] = self.stats.resyncs.get(reason, 0) + 1
        self._pending_resync = None
        self._next_resync_at = now + max(self.config.resync_interval_s, self._snapshot_backoff)
        if not self.config.has_replay:
            self._out.append(ClearReplica())
            self.last_seq = None
            self.exact = False
            self._enter_live()
        elif self.snapshot_supported is False:
            self._learn_from_replay(now)
        else:
            self.mode = "snapshot"
            self._deadline = now + self.config.snapshot_timeout_s
            self._out.append(RequestSnapshot())

    def _learn_from_replay(self, now: float) -> None:
        self._out.append(ClearReplica())
        self.last_seq = None
        self.exact = False
        self._start_replay(0, now, learn=True)

    def _on_restart(self, reason: str, now: float) -> None:
        """The publisher is a new process: everything we know about the replica is void."""
        self._held.clear()
        self._replayed.clear()
        self._live_high = None
        self._out.append(ClearReplica())
        self.last_seq = None
        self.exact = False
        self.epoch = None
        if self.mode != "live":
            self._out.append(ResetDealer())
        self.mode = "live"
        self._deadline = None
        self._resync(reason, now)
