"""balancer/zmq_feed.py, the base of the KV event subscriber and the digest feed: one task that
stop() cancels at once, sockets set up and closed in one place, the reconnect, bounded reads,
and a failing on_load callback that never ends the feed. Real ZMQ sockets on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import pytest
import zmq
import zmq.asyncio

from balancer.zmq_feed import MAX_READS_PER_WAKEUP, ZmqFeed
from protocol.load import LoadReport


@dataclass
class _Stats:
    decode_errors: int = 0


class _EchoFeed(ZmqFeed):
    """Subscribes to b"t" on `endpoint` and records what it reads; b"reopen" reconnects,
    b"pause" holds the loop while a burst queues up, b"load" passes a report to on_load."""

    def __init__(self, endpoint: str, ctx: zmq.asyncio.Context, on_load=None) -> None:
        super().__init__("r0", "echo:r0", None, on_load, context=ctx)
        self.stats = _Stats()
        self.endpoint = endpoint
        self.got: list[bytes] = []
        self.per_drain: list[int] = []  # messages read at each wakeup
        self.sockets: list[zmq.asyncio.Socket] = []
        self.pause = self.slept = False

    async def _serve(self) -> None:
        self.sockets.append(self._open(zmq.SUB, self.endpoint, rcvhwm=2000, subscribe=[b"t"]))
        while True:
            if self.pause:
                self.pause, self.slept = False, True
                await asyncio.sleep(0.5)
            sub = self.sockets[-1]
            ready = dict(await self._poller.poll(50))
            if sub in ready:
                before = len(self.got)
                await self._drain(sub, self._on)
                self.per_drain.append(len(self.got) - before)

    def _on(self, frames: list[bytes]) -> None:
        self.got.append(frames[-1])
        if frames[-1] == b"reopen":  # _drain stops at the closed socket
            self.sockets.append(self._reopen(self.sockets[-1]))
        elif frames[-1] == b"pause":
            self.pause = True
        elif frames[-1] == b"load":
            self._deliver_load(LoadReport("r0", 0.0, 0, 0, 0, 0, 1, 1, 16, 0.0))


async def _until(cond, deadline: float) -> None:
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_lifecycle_reconnect_bounded_reads_and_a_failing_callback(caplog):
    async def main():
        ctx = zmq.asyncio.Context()
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.bind("tcp://127.0.0.1:0")
        calls = []

        def on_load(report):
            calls.append(report)
            raise RuntimeError("callback bug")

        feed = _EchoFeed(pub.getsockopt_string(zmq.LAST_ENDPOINT), ctx, on_load)
        deadline = time.monotonic() + 20
        feed.start()
        with pytest.raises(RuntimeError, match="already started"):
            feed.start()
        try:
            await _until(lambda: feed.sockets, deadline)
            while not feed.got:  # the slow joiner: publish until the feed reads one
                await pub.send_multipart([b"t", b"hello"])
                await asyncio.sleep(0.02)
            first = feed.sockets[0]
            assert first.rcvhwm == 2000
            await pub.send_multipart([b"t", b"reopen"])
            await _until(lambda: len(feed.sockets) == 2, deadline)
            assert first.closed and not feed.sockets[1].closed and feed.sockets[1].rcvhwm == 2000
            n = len(feed.got)
            while len(feed.got) == n:  # the fresh SUB joins late too; it keeps the subscription
                await pub.send_multipart([b"other", b"not subscribed"])
                await pub.send_multipart([b"t", b"again"])
                await asyncio.sleep(0.02)
            assert b"not subscribed" not in feed.got
            await pub.send_multipart([b"t", b"load"])
            await _until(lambda: calls, deadline)  # the callback raised; the feed reads on:
            # a burst queued while the loop sleeps: read MAX_READS_PER_WAKEUP a wakeup, all in the end
            await pub.send_multipart([b"t", b"pause"])
            await _until(lambda: feed.slept, deadline)
            n, burst = len(feed.got), MAX_READS_PER_WAKEUP + 10
            for i in range(burst):
                await pub.send_multipart([b"t", b"%d" % i])
            await _until(lambda: len(feed.got) == n + burst, deadline)
            assert max(feed.per_drain) == MAX_READS_PER_WAKEUP
        finally:
            waiting = feed.stop()
            assert feed._task is None  # cancelled already, before the wait runs
            await waiting
            await feed.stop()  # idempotent
        assert all(s.closed for s in feed.sockets) and not feed._open_sockets
        pub.close(linger=0)
        ctx.term()

    with caplog.at_level(logging.ERROR, logger="balancer.zmq_feed"):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert any("on_load callback failed" in r.getMessage() for r in caplog.records)
