"""What every per-replica ZMQ feed shares: one cancellable asyncio task, its sockets and poller.

The feeds (balancer/kv_subscriber.py: KV events; balancer/digest_feed.py: cache digests)
subclass `ZmqFeed` and write only `_serve`, the loop that reads their sockets. Here, once:

- lifecycle: `start()` in a running loop creates the task; `stop()` cancels it at once and
  returns the wait for its end, so a stopped feed never touches its index again;
- socket set-up: `_open` makes a socket with linger 0, the CURVE keys (protocol/curve.py)
  applied before it connects, its topics subscribed, and registers it with the poller;
- reconnect: `_reopen` replaces a socket with a fresh one made the same way (a reply to a
  request made on the old one can never arrive on the new one);
- clean-up: when the task ends, however it ends, every socket still open is closed;
- reading: `_drain` hands a ready socket's messages over, at most `MAX_READS_PER_WAKEUP` a
  wakeup, and the load reports both feeds may carry reach `on_load` through `_deliver_load`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import zmq
import zmq.asyncio

from protocol.curve import CurveClientKeys
from protocol.events import EventDecodeError, ReplayReply, parse_replay_reply
from protocol.load import LoadReport, split_extras_message

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_READS_PER_WAKEUP = 512  # then let the other socket and the other replicas' feeds run


class _Counts(Protocol):
    decode_errors: int


@dataclass(frozen=True, slots=True)
class _Recipe:  # how a socket was made, for `_reopen`
    kind: int
    endpoint: str
    rcvhwm: int | None
    subscribe: tuple[bytes, ...]


class ZmqFeed:
    """A feed from one replica: `start()` in a running loop, `await stop()` to end.

    Subclasses set `stats` (with a `decode_errors` counter) and write `_serve`."""

    stats: _Counts

    def __init__(self, replica_id: str, task_name: str, curve: CurveClientKeys | None,
                 on_load: Callable[[LoadReport], None] | None, *,
                 context: zmq.asyncio.Context | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.on_load = on_load
        self.clock = clock
        self._replica_id = replica_id
        self._task_name = task_name
        self._curve = curve
        self._ctx = context or zmq.asyncio.Context.instance()
        self._task: asyncio.Task[None] | None = None
        self._poller = zmq.asyncio.Poller()
        self._open_sockets: dict[zmq.asyncio.Socket, _Recipe] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self._task_name} already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._task_name)

    def stop(self) -> Coroutine[Any, Any, None]:
        """Cancel the task now; await the result to wait until its sockets are closed.

        The cancel is immediate (not when the returned coroutine first runs), so after
        `feed.stop()` the feed can no longer touch its index, even if the caller only schedules
        the wait (`asyncio.create_task(feed.stop())`). Idempotent.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return _wait_cancelled(task)

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:
            for sock in list(self._open_sockets):
                self._close(sock)

    async def _serve(self) -> None:
        """The feed's loop: open sockets with `_open`, poll `self._poller`, read."""
        raise NotImplementedError

    # --- sockets ------------------------------------------------------------------------------

    def _open(self, kind: int, endpoint: str, *, rcvhwm: int | None = None,
              subscribe: Iterable[bytes] = ()) -> zmq.asyncio.Socket:
        """A connected socket, registered with the poller; closed when the task ends."""
        recipe = _Recipe(kind, endpoint, rcvhwm, tuple(subscribe))
        sock = self._ctx.socket(kind)
        try:
            sock.linger = 0
            if rcvhwm is not None:
                sock.rcvhwm = rcvhwm
            if self._curve is not None:
                self._curve.apply(sock)
            sock.connect(endpoint)
            for topic in recipe.subscribe:
                sock.setsockopt(zmq.SUBSCRIBE, topic)
        except BaseException:
            sock.close(linger=0)
            raise
        self._poller.register(sock, zmq.POLLIN)
        self._open_sockets[sock] = recipe
        return sock

    def _reopen(self, sock: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
        """Close `sock` and return a fresh socket made as it was (the reconnect)."""
        r = self._open_sockets[sock]
        self._close(sock)
        return self._open(r.kind, r.endpoint, rcvhwm=r.rcvhwm, subscribe=r.subscribe)

    def _close(self, sock: zmq.asyncio.Socket | None) -> None:
        if sock is None or self._open_sockets.pop(sock, None) is None:
            return
        with contextlib.suppress(KeyError):
            self._poller.unregister(sock)
        sock.close(linger=0)

    # --- reading ------------------------------------------------------------------------------

    async def _drain(self, sock: zmq.asyncio.Socket, handle: Callable[[list[bytes]], None]) -> None:
        """Hand the messages waiting on `sock` to `handle`, until none is left, `handle` closed
        the socket, or MAX_READS_PER_WAKEUP were read (the poller wakes the loop again)."""
        for _ in range(MAX_READS_PER_WAKEUP):
            if sock.closed:
                return
            try:
                frames = await sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _split_extras(self, frames: list[bytes]) -> tuple[bytes, bytes] | None:
        """(topic, payload) of a 4-frame extras message (protocol/load.py), or None, counted,
        when its seq frame does not decode."""
        try:
            topic, _seq, payload = split_extras_message(frames)
        except EventDecodeError:
            self.stats.decode_errors += 1
            return None
        return topic, payload

    def _parse_reply(self, frames: list[bytes]) -> ReplayReply | None:
        """A DEALER's reply (protocol/events.py), or None, counted, when it does not parse."""
        try:
            return parse_replay_reply(frames)
        except EventDecodeError:
            self.stats.decode_errors += 1
            return None

    def _decode(self, decode: Callable[[bytes], T], payload: bytes, what: str) -> T | None:
        """`decode(payload)`, or None, counted and logged, when the payload does not decode."""
        try:
            return decode(payload)
        except EventDecodeError as e:
            self.stats.decode_errors += 1
            log.warning("replica %s: %s not decodable: %s", self._replica_id, what, e)
            return None

    def _deliver_load(self, report: LoadReport) -> None:
        """Pass a load report to `on_load`; a failing callback is logged, the feed goes on."""
        if self.on_load is None:
            return
        try:
            self.on_load(report)
        except Exception:
            log.exception("replica %s: on_load callback failed", self._replica_id)


async def _wait_cancelled(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await task
