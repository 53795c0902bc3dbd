"""Process-wide logging set-up for `kvfleet replica` and `kvfleet balancer`: `--log-format text`
(a human line) or `json` (one JSON object per line, for Loki, Elasticsearch, `jq`).

A JSON line has `ts` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, then whatever
the call passed in `extra=` — the access loggers (`kvfleet.balancer.access`,
`kvfleet.replica.access`) pass `request_id` and the request's numbers, so one request is followed
from the balancer to the replica by its `X-Request-Id`:

    {"ts": "2026-01-02T03:04:05.678Z", "level": "info", "logger": "kvfleet.balancer.access",
     "message": "/v1/completions unary replica=http://127.0.0.1:8001 status=200 ...",
     "request_id": "kvf-3f...", "replica": "http://127.0.0.1:8001", "policy": "precise_prefix",
     "status": 200, "ttft_s": 0.0123, "e2e_s": 0.2051, ...}

Logs go to stderr; stdout stays for the one "listening on" line that `kvfleet.procs` waits for.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = "fields"  # `extra={"fields": {...}}`: a line's structured fields, in one attribute (cheap)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class _Seconds:
    """`fmt` of a whole second through `convert` (time.gmtime / time.localtime), formatted once per
    second: formatting a time costs µs, and the access log writes a line per request."""

    __slots__ = ("fmt", "convert", "second", "text")

    def __init__(self, fmt: str, convert) -> None:
        self.fmt, self.convert, self.second, self.text = fmt, convert, -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.fmt, self.convert(second))
        return self.text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts, level, logger, message, then the record's
    `fields` (or, for other records, whatever `extra=` put on them)."""

    def __init__(self) -> None:
        super().__init__()
        self._encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self._seconds = _Seconds("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def _ts(self, created: float) -> str:
        return f"{self._seconds(created)}.{int((created - int(created)) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        extra = record.__dict__.get(FIELDS)
        if extra is None:
            extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelname, record.name, record.getMessage(), extra, exc)

    def line(self, created: float, levelname: str, name: str, message: str, fields: dict,
             exc: str | None = None) -> str:
        """The line `format` makes of a record with these attributes (`fields`: its `extra=`),
        without a LogRecord: balancer/access_log.py writes the access lines so."""
        out = {"ts": self._ts(created), "level": levelname.lower(), "logger": name, "message": message}
        for key, value in fields.items():
            if key not in out:
                out[key] = value
        if exc is not None:
            out["exc"] = exc
        return self._encode(out)


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with ` request_id=...` appended when the record carries one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._seconds = _Seconds(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging.Formatter's own (`default_time_format`, `default_msec_format`), per-second cached."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.default_msec_format % (self._seconds(record.created), record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record.__dict__.get(FIELDS)
        rid = fields.get("request_id") if fields is not None else getattr(record, "request_id", None)
        return line if rid is None else f"{line} request_id={rid}"

    def line(self, created: float, levelname: str, name: str, message: str, fields: dict) -> str:
        """The line `format` makes of a record with these attributes and `extra={"fields": fields}`,
        without a LogRecord (balancer/access_log.py): TEXT_FORMAT as one f-string, the time as
        `formatTime` writes it (LogRecord.msecs: whole milliseconds, truncated)."""
        asctime = self.default_msec_format % (self._seconds(created), int((created - int(created)) * 1000))
        rid = fields.get("request_id")
        line = f"{asctime} {levelname} {name}: {message}"
        return line if rid is None else f"{line} request_id={rid}"


def setup(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records at `level` and above to `stream` (stderr) in `fmt`.

    Replaces the root logger's handlers, so calling it twice does not print lines twice.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # What a record costs to make: no caller lookup, thread or process names (Python's logging
    # HOWTO, "Optimization"). Access lines are logged once per request on the event loop.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def add_arguments(p) -> None:
    """`--log-format` and `--log-level`, shared by the server commands."""
    p.add_argument("--log-format", choices=FORMATS, default="text",
                   help="text: human-readable lines; json: one JSON object per line (ts, level, logger, message, "
                        "request_id, ...) on stderr")
    p.add_argument("--log-level", choices=LEVELS, default="info",
                   help="least severe level logged (info includes one access line per request)")
