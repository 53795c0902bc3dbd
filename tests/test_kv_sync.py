"""KVSync (balancer/kv_sync.py), the pure replay/resync state machine, without ZMQ: inputs are
what arrived and the time, outputs the actions a subscriber performs. A `Driver` performs them
as balancer/kv_subscriber.py does, on a model index that records which batch seqs it holds, so
each test asserts what the index ends up holding and what was asked of the replica."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.kv_sync import (
    MAX_SNAPSHOT_BACKOFF_S,
    Action,
    Apply,
    ClearReplica,
    KVSync,
    LoadSnapshot,
    RequestReplay,
    RequestSnapshot,
    ResetDealer,
    SyncConfig,
)
from protocol.load import Snapshot


def payload(seq: int) -> bytes:
    return b"batch-%d" % seq


def snapshot(kv_seq: int | None, epoch: int = 0) -> Snapshot:
    return Snapshot(ts=0.0, kv_seq=kv_seq, events=(), epoch=epoch)


@dataclass
class Driver:
    """Performs KVSync's actions the way the subscriber does. The index is modelled as the list
    of batch seqs it reflects: a snapshot of kv_seq k stands for batches 0..k."""

    sync: KVSync
    now: float = 0.0
    index: list[int] = field(default_factory=list)
    sent: list[Action] = field(default_factory=list)  # every non-Apply action, in order
    flags: dict[int, str] = field(default_factory=dict)  # seq -> resync reason the index raises

    def do(self, actions) -> list[Action]:
        """Perform `actions` and those that `applied` continues with; returns the non-Apply ones."""
        before = len(self.sent)
        while actions:
            then = ()
            for action in actions:
                match action:
                    case Apply(seq, data):
                        assert data == payload(seq)
                        self.index.append(seq)
                        then = self.sync.applied(seq, self.now, events=1, flag=self.flags.pop(seq, None))
                    case ClearReplica():
                        self.index.clear()
                        self.sent.append(action)
                    case LoadSnapshot(snap):
                        self.index = [] if snap.kv_seq is None else list(range(snap.kv_seq + 1))
                        self.sent.append(action)
                    case _:
                        self.sent.append(action)
            actions = then
        return self.sent[before:]

    # the inputs, at the driver's clock
    def start(self):
        return self.do(self.sync.start(self.now))

    def live(self, *seqs: int):
        out = []
        for seq in seqs:
            out += self.do(self.sync.on_live_batch(seq, payload(seq), self.now))
        return out

    def replay(self, *seqs: int, end: bool = True):
        out = []
        for seq in seqs:
            out += self.do(self.sync.on_replay_batch(seq, payload(seq), self.now))
        if end:
            out += self.do(self.sync.on_replay_end(self.now))
        return out

    def snap(self, kv_seq: int | None, epoch: int = 0):
        return self.do(self.sync.on_snapshot(snapshot(kv_seq, epoch), self.now))

    def at(self, now: float):
        self.now = now
        return self.do(self.sync.on_time(now))


def driver(has_replay: bool = True, **kw) -> Driver:
    return Driver(KVSync(SyncConfig(has_replay=has_replay, **kw)))


def synced(last: int, **kw) -> Driver:
    """A driver past its startup snapshot, exact as of batch `last`."""
    d = driver(**kw)
    assert d.start() == [RequestSnapshot()]
    d.snap(last)
    assert d.sync.in_sync and d.index == list(range(last + 1))
    return d


# --- in order ------------------------------------------------------------------------------------


def test_in_order_batches_are_applied_and_seeing_seq_0_makes_the_index_exact():
    d = driver(has_replay=False)
    assert d.start() == []  # nothing to ask a replica without a replay endpoint
    assert d.live(0, 1, 2) == []
    assert d.index == [0, 1, 2]
    assert d.sync.last_seq == 2 and d.sync.in_sync
    assert d.sync.stats.batches == 3 and d.sync.stats.events == 3


def test_joining_late_without_replay_learns_from_live_batches_inexact():
    d = driver(has_replay=False)
    d.live(7, 8)
    assert d.index == [7, 8]
    assert d.sync.last_seq == 8 and not d.sync.exact


def test_startup_snapshot_then_the_batches_after_it():
    d = driver()
    assert d.start() == [RequestSnapshot()]
    assert d.sync.mode == "snapshot" and not d.sync.in_sync
    d.live(5, 6)  # published while the snapshot is on its way: held
    assert d.index == []
    assert d.snap(5) == [LoadSnapshot(snapshot(5))]
    assert d.index == [0, 1, 2, 3, 4, 5, 6]  # 5 is covered by the snapshot, 6 applied after it
    assert d.sync.in_sync and d.sync.snapshot_supported is True
    d.live(7)
    assert d.index[-1] == 7


def test_snapshot_of_a_replica_that_has_published_nothing():
    d = driver()
    d.start()
    d.snap(None)
    assert d.sync.last_seq == -1 and d.sync.in_sync
    d.live(0)
    assert d.index == [0]


# --- gaps and replay -----------------------------------------------------------------------------


def test_a_gap_asks_for_a_replay_from_the_first_missing_batch():
    d = synced(2)
    assert d.live(5) == [RequestReplay(3)]
    assert d.sync.mode == "replay" and d.sync.stats.gaps == 1 and d.sync.stats.replays == 1
    assert d.index == [0, 1, 2]  # 5 is held, not applied past the hole


def test_replay_fills_the_gap_then_held_live_batches_follow_in_order():
    d = synced(2)
    d.live(5)
    d.live(6, 7)  # arrive during the replay: held
    assert d.index == [0, 1, 2]
    assert d.replay(4, 3, end=False) == []  # out of order: applied only at the end marker
    assert d.index == [0, 1, 2]
    assert d.replay() == []
    assert d.index == [0, 1, 2, 3, 4, 5, 6, 7]
    assert d.sync.in_sync and d.sync.last_seq == 7


def test_a_replay_that_runs_ahead_of_the_live_stream_makes_the_late_live_batches_duplicates():
    d = synced(2)
    d.live(5)
    d.replay(3, 4, 5, 6, 7)
    assert d.index == [0, 1, 2, 3, 4, 5, 6, 7]
    d.live(6, 7)  # already applied from the replay
    assert d.index == [0, 1, 2, 3, 4, 5, 6, 7]
    assert d.sync.stats.duplicates == 2
    d.live(8)
    assert d.index[-1] == 8 and d.sync.in_sync


def test_a_batch_repeated_within_a_replay_is_applied_once():
    d = synced(2)
    d.live(5)
    d.replay(3, 3, 4, 4, 5)
    assert d.index == [0, 1, 2, 3, 4, 5]


def test_a_replay_with_a_hole_applies_up_to_it_and_asks_again_for_the_hole():
    d = synced(2)
    d.live(7)
    assert d.replay(3, 5, 6) == [RequestReplay(4)]  # 3 applied, then the hole at 4
    assert d.index == [0, 1, 2, 3]
    d.replay(4, 5, 6)
    assert d.index == list(range(8)) and d.sync.in_sync


def test_a_replay_buffer_rolled_past_the_gap_falls_back_to_a_snapshot():
    d = synced(2)
    d.live(9)
    assert d.replay(6, 7, 8) == [RequestSnapshot()]  # 3..5 are gone from the buffer
    assert d.sync.stats.replay_failures == 1 and d.sync.stats.resyncs == {"startup": 1, "replay_incomplete": 1}
    d.live(10)
    d.snap(9)
    assert d.index == list(range(11)) and d.sync.in_sync


def test_a_gap_without_a_replay_endpoint_drops_the_replica_and_learns_from_live_traffic():
    d = driver(has_replay=False)
    d.live(0, 1)
    assert d.live(4) == [ClearReplica()]
    assert d.index == [4] and not d.sync.exact
    assert d.sync.stats.resyncs == {"gap_no_replay": 1}


def test_a_publisher_without_snapshots_is_relearned_by_a_replay_from_seq_0():
    # vLLM answers the snapshot request as a replay from a seq past its buffer: an end marker.
    d = driver()
    d.start()
    assert d.replay() == [ClearReplica(), RequestReplay(0)]
    assert d.sync.snapshot_supported is False
    d.live(4)  # held during the replay
    d.replay(0, 1, 2, 3)
    assert d.index == [0, 1, 2, 3, 4] and d.sync.in_sync
    # Later resyncs go straight to the replay.
    d.live(9)
    assert d.replay(6, 7, 8) == [ClearReplica(), RequestReplay(0)]
    d.replay(*range(10))
    assert d.index == list(range(10)) and d.sync.in_sync


def test_learning_from_a_buffer_that_no_longer_reaches_seq_0_is_inexact():
    d = driver()
    d.start()
    d.replay()  # no snapshots
    d.replay(3, 4, 5)
    assert d.index == [3, 4, 5]
    assert d.sync.mode == "live" and not d.sync.exact


# --- timeouts ------------------------------------------------------------------------------------


def test_a_replay_that_times_out_resets_the_dealer_and_asks_for_a_snapshot():
    d = synced(2, replay_timeout_s=2.0)
    d.now = 100.0
    d.live(5)
    assert d.sync.wake_at == 102.0
    assert d.at(101.9) == []
    assert d.at(102.0) == [ResetDealer(), RequestSnapshot()]
    assert d.sync.stats.replay_failures == 1 and d.sync.stats.resyncs["replay_timeout"] == 1
    # (The fresh DEALER never sees the abandoned replay's replies; batches that did come would
    # be stale. Its end marker would not: in snapshot mode that is vLLM saying "no snapshots".)
    assert d.replay(3, 4, end=False) == []
    assert d.sync.stats.stale_replies == 2
    d.snap(5)
    assert d.index == list(range(6)) and d.sync.in_sync


def test_an_unanswered_snapshot_is_asked_again_with_a_doubling_back_off():
    d = driver(snapshot_timeout_s=10.0, resync_interval_s=1.0)
    d.start()
    assert d.sync.wake_at == 10.0
    assert d.at(10.0) == [ResetDealer()]
    assert d.sync.mode == "live" and not d.sync.exact  # learning from live traffic meanwhile
    d.live(3, 4)
    assert d.index == [3, 4]
    waits = []
    for _ in range(5):
        due = d.sync.wake_at
        assert d.at(due) == [RequestSnapshot()]
        timeout = d.sync.wake_at
        assert d.at(timeout) == [ResetDealer()]
        waits.append(d.sync.wake_at - timeout)
    assert waits == [20.0, 40.0, MAX_SNAPSHOT_BACKOFF_S, MAX_SNAPSHOT_BACKOFF_S, MAX_SNAPSHOT_BACKOFF_S]
    assert d.sync.stats.snapshot_timeouts == 6
    d.at(d.sync.wake_at)
    d.snap(4)
    assert d.index == list(range(5)) and d.sync.in_sync
    assert d.sync.wake_at is None


def test_a_learning_replay_that_times_out_learns_from_live_traffic_and_asks_again_later():
    d = driver(replay_timeout_s=2.0, resync_interval_s=1.0)
    d.start()
    d.replay()  # no snapshots: ClearReplica, RequestReplay(0)
    assert d.at(2.0) == [ResetDealer()]
    assert d.sync.mode == "live" and not d.sync.exact
    d.live(6)
    assert d.index == [6]
    assert d.sync.wake_at == 4.0  # back-off from the replay timeout
    assert d.at(4.0) == [ClearReplica(), RequestReplay(0)]
    assert d.sync.stats.resyncs["replay_retry"] == 1
    d.replay(*range(7))
    assert d.index == list(range(7)) and d.sync.in_sync and d.sync.wake_at is None


def test_an_index_flag_resyncs_at_most_once_per_interval():
    d = synced(2, resync_interval_s=5.0)
    d.now = 10.0
    d.flags[3] = "unknown_parent"
    assert d.live(3) == [RequestSnapshot()]
    d.snap(3)
    d.now = 11.0
    d.flags[4] = "unknown_parent"
    assert d.live(4) == []  # too soon after the last resync: waits
    assert d.sync.wake_at == 15.0
    assert d.at(14.0) == []
    assert d.at(15.0) == [RequestSnapshot()]
    assert d.sync.stats.resyncs == {"startup": 1, "unknown_parent": 2}


def test_a_flag_on_an_inexact_index_asks_nothing():
    d = driver(has_replay=False)
    d.flags[5] = "unknown_parent"
    assert d.live(5) == []
    assert d.sync.stats.resyncs == {}


# --- restarts ------------------------------------------------------------------------------------


def test_a_live_seq_going_back_means_a_restart_the_replica_is_cleared_and_resynced():
    d = synced(2)
    d.live(3, 4)
    assert d.live(0) == [ClearReplica(), RequestSnapshot()]
    assert d.index == [] and not d.sync.exact and d.sync.stats.resyncs["restart"] == 1
    d.snap(0)
    assert d.index == [0] and d.sync.in_sync
    d.live(1)
    assert d.index == [0, 1]


def test_a_restart_without_replay_relearns_from_the_new_process_seq_0():
    d = driver(has_replay=False)
    d.live(0, 1, 2, 3)
    assert d.live(0) == [ClearReplica(), ClearReplica()]
    assert d.index == [0] and d.sync.in_sync


def test_a_restart_during_a_replay_abandons_it():
    d = synced(2)
    d.live(5)
    assert d.live(1) == [ClearReplica(), ResetDealer(), RequestSnapshot()]
    assert d.index == []
    d.snap(1)
    assert d.index == [0, 1] and d.sync.in_sync


def test_a_new_epoch_in_a_load_report_means_a_restart():
    d = driver()
    d.start()
    d.snap(4, epoch=111)
    assert d.do(d.sync.on_load_report(111, d.now)) == []
    assert d.do(d.sync.on_load_report(0, d.now)) == []  # a publisher without epochs says nothing
    assert d.do(d.sync.on_load_report(222, d.now)) == [ClearReplica(), RequestSnapshot()]
    assert d.sync.stats.resyncs["epoch_changed"] == 1 and d.sync.epoch == 222


# --- the calling protocol ------------------------------------------------------------------------


def test_the_outcome_of_an_apply_must_come_before_any_other_input():
    sync = KVSync(SyncConfig(has_replay=False))
    (apply,) = sync.on_live_batch(0, payload(0), 0.0)
    with pytest.raises(RuntimeError, match="applied"):
        sync.on_live_batch(1, payload(1), 0.0)
    with pytest.raises(RuntimeError, match="awaiting"):
        sync.applied(5, 0.0, events=1)
    assert sync.applied(0, 0.0, events=1) == ()


def test_an_undecodable_batch_on_an_exact_index_resyncs():
    d = synced(2)
    (apply,) = d.sync.on_live_batch(3, payload(3), 5.0)  # past the startup resync's interval
    assert d.do(d.sync.applied(3, 5.0, events=None)) == [RequestSnapshot()]
    assert d.sync.stats.decode_errors == 1


def test_bad_config_is_refused_with_what_to_set():
    with pytest.raises(ValueError, match="replay_timeout_s must be positive"):
        SyncConfig(has_replay=True, replay_timeout_s=0)
    with pytest.raises(ValueError, match="max_held_batches"):
        SyncConfig(has_replay=True, max_held_batches=0)


# --- property: a lossy live stream and a replay source that holds everything ---------------------


class Publisher:
    """A publisher's side of the wire: batches published in seq order onto a SUB stream that
    loses some (never reorders: one PUB->SUB connection is ordered), and a replay ROUTER that
    holds every batch and answers each request on one DEALER, in order, after some delay."""

    def __init__(self, snapshots: bool) -> None:
        self.snapshots = snapshots
        self.published = 0
        self.live: deque[int] = deque()  # in flight on the SUB stream
        self.replies: deque[tuple] = deque()  # in flight on the DEALER

    def publish(self, lost: bool) -> None:
        if not lost:
            self.live.append(self.published)
        self.published += 1

    def answer(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case ResetDealer():
                    self.replies.clear()
                case RequestReplay(start):
                    self.replies.extend(("batch", s) for s in range(start, self.published))
                    self.replies.append(("end",))
                case RequestSnapshot() if self.snapshots:
                    self.replies.append(("snapshot", self.published - 1 if self.published else None))
                case RequestSnapshot():
                    self.replies.append(("end",))  # vLLM: a replay request past its buffer


def deliver(d: Driver, pub: Publisher, op: str, arg: int) -> None:
    if op == "live" and pub.live:
        pub.answer(d.live(pub.live.popleft()))
    elif op in ("reply", "reply_again") and pub.replies:
        msg = pub.replies[0] if op == "reply_again" else pub.replies.popleft()
        if msg[0] == "batch":
            pub.answer(d.replay(msg[1], end=False))
        elif msg[0] == "end" and op == "reply":
            pub.answer(d.replay())
        elif msg[0] == "snapshot" and op == "reply":
            pub.answer(d.snap(msg[1]))
    elif op == "tick":
        pub.answer(d.at(d.now + arg / 4))


def check(d: Driver) -> None:
    """After every step: the index never holds a batch twice or out of order, and whenever the
    state machine says it is exact the index holds exactly batches 0..last_seq."""
    assert d.index == sorted(set(d.index))
    if d.sync.exact:
        assert d.index == list(range(d.sync.last_seq + 1))


OPS = st.lists(
    st.tuples(st.sampled_from(["publish", "publish_lost", "live", "reply", "reply_again", "tick"]),
              st.integers(0, 60)),  # tick: a quarter second per unit, past every timeout at the top
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, snapshots=st.booleans())
def test_lossy_stream_with_full_replay_source_converges_to_every_batch_in_order(ops, snapshots):
    d = driver(replay_timeout_s=2.0, snapshot_timeout_s=5.0, resync_interval_s=1.0)
    pub = Publisher(snapshots)
    pub.answer(d.start())
    check(d)
    for op, arg in ops:
        if op.startswith("publish"):
            pub.publish(lost=op == "publish_lost")
        else:
            deliver(d, pub, op, arg)
        check(d)
    # Then the network heals: one last batch arrives (so a trailing loss shows up as a gap),
    # every message in flight is delivered, and time passes for any retry that waits.
    pub.publish(lost=False)
    for _ in range(50):
        while pub.live or pub.replies:
            deliver(d, pub, "live" if pub.live else "reply", 0)
            check(d)
        if d.sync.wake_at is None:
            break
        pub.answer(d.at(max(d.now, d.sync.wake_at)))
        check(d)
    assert d.sync.in_sync
    assert d.index == list(range(pub.published))
