"""The access log: one line per request, written in batches off the request's path.

Through `logging`, a line cost 30-45 µs of the balancer's CPU per request (a LogRecord, the
handler's lock, `%`-formatting twice, a `write` and a flush per line: docs/benchmarks.md,
"Hot-path review"). Here the line is what the handler's formatter (kvfleet/logs.py, text or
JSON) would make of that record — built by the formatter's `line`, from one f-string message —
and it goes into a buffer:

    write(message, fields) ─▶ buffer ─▶ one write + flush of every buffered line, when the buffer
        holds `max_bytes`, every `flush_s` (the task `start` runs), and at `stop` (nothing lost
        at shutdown; after `stop`, and before `start`, each line is written at once)

Lines on the same stream from other loggers are not delayed, so an access line may come after
a warning logged up to `flush_s` later. The off switch is the logger's level
(`--log-level warning`): `enabled` is False and the proxy builds no line.

Where the logger's records go anywhere else than to the one stream handler `kvfleet.logs.setup`
installs (a test's capture handler, a filter, a user's own logging configuration), each line is
a LogRecord as before (`logger.info(message, extra={"fields": fields})`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

ACCESS_LOGGER = "kvfleet.balancer.access"


def _stream_handler(logger: logging.Logger) -> logging.StreamHandler | None:
    """The one handler that `logger`'s INFO records reach, if it is a stream handler whose
    formatter has a `line` (kvfleet/logs.py's) and nothing filters on the way; else None."""
    handlers: list[logging.Handler] = []
    c: logging.Logger | None = logger
    while c is not None:
        if c.filters:
            return None
        handlers += c.handlers
        if not c.propagate:
            break
        c = c.parent
    if len(handlers) != 1:
        return None
    h = handlers[0]
    if not isinstance(h, logging.StreamHandler) or h.filters or h.level > logging.INFO \
            or not callable(getattr(h.formatter, "line", None)):
        return None
    return h


class AccessLog:
    def __init__(self, name: str = ACCESS_LOGGER, flush_s: float = 0.2, max_bytes: int = 1 << 16,
                 clock: Callable[[], float] = time.time) -> None:
        if not flush_s > 0 or max_bytes < 1:
            raise ValueError("flush_s must be > 0 and max_bytes >= 1")
        self.name = name
        self.logger = logging.getLogger(name)
        self.flush_s, self.max_bytes = flush_s, max_bytes
        self.clock = clock  # unix seconds: the line's time stamp
        self._handler: logging.StreamHandler | None = None  # bound by `start`; None: logging per line
        self._lines: list[str] = []
        self._size = 0
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        """Whether access lines are logged (the logger's level: INFO)."""
        return self.logger.isEnabledFor(logging.INFO)

    def start(self) -> None:
        """Bind to where the logger's records go now, and start the periodic flush."""
        self._handler = _stream_handler(self.logger)
        if self._handler is not None and self._task is None:
            self._task = asyncio.create_task(self._flush_periodically(), name="access-log")

    async def stop(self) -> None:
        """Stop the periodic flush and write every buffered line; later lines are written at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.flush()

    def write(self, message: str, fields: dict) -> None:
        """One access line: `message`, and `fields` (the JSON line's keys; the text line's
        `request_id`). The caller checks `enabled` first."""
        h = self._handler
        if h is None:
            self.logger.info(message, extra={"fields": fields})
            return
        line = h.formatter.line(self.clock(), "INFO", self.name, message, fields)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.max_bytes or self._task is None:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines to the handler's stream, in one write."""
        if not self._lines:
            return
        h = self._handler
        text = h.terminator.join(self._lines) + h.terminator
        self._lines.clear()
        self._size = 0
        h.acquire()  # as StreamHandler.emit: records from other threads do not interleave
        try:
            h.stream.write(text)
            h.stream.flush()
        except (OSError, ValueError):  # a closed or broken log stream never fails a request
            pass
        finally:
            h.release()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            self.flush()
