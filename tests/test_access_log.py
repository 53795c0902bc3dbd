"""The balancer's access log (balancer/access_log.py): each line is what `logging` with
kvfleet's formatters wrote for it (text and JSON), lines are written in batches, and none is
lost when the balancer stops (a real balancer in this process in front of a real server in a
subprocess, loadgen.fake_server)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import pytest

from balancer.access_log import ACCESS_LOGGER, AccessLog
from harness.fleet import balancer
from kvfleet import logs
from tests.test_front import backend

FIELDS = {"request_id": "kvf-1", "path": "/v1/completions", "stream": False, "replica": "http://127.0.0.1:1",
          "policy": "precise_prefix", "status": 200, "ttft_s": 0.0012, "e2e_s": 0.0013, "attempts": 1,
          "prompt_tokens": 8, "predicted_cached_tokens": 0, "reported_cached_tokens": None, "failovers": 0}
MESSAGE = "/v1/completions unary replica=http://127.0.0.1:1 status=200 ttft=0.0012s e2e=0.0013s attempts=1"


@pytest.fixture
def log_to():
    """`logs.setup(fmt, "info", stream)` for the test, the root logger restored after it."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def setup(fmt: str, level: str = "info") -> io.StringIO:
        buf = io.StringIO()
        logs.setup(fmt, level, stream=buf)
        return buf

    yield setup
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", logs.FORMATS)
@pytest.mark.parametrize("created", [1767323045.678901, 1767323045.0, 1767323045.9999])
def test_a_line_is_what_logging_writes_for_the_record(fmt, created):
    formatter = logs.JsonFormatter() if fmt == "json" else logs.TextFormatter()
    record = logging.getLogger(ACCESS_LOGGER).makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, MESSAGE, (), None,
                                                         extra={"fields": FIELDS})
    record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0  # as LogRecord sets them
    assert formatter.line(created, "INFO", ACCESS_LOGGER, MESSAGE, FIELDS) == formatter.format(record)


def test_lines_are_buffered_and_every_one_is_written_at_stop(log_to):
    buf = log_to("json")

    async def main():
        access = AccessLog(flush_s=3600, max_bytes=1 << 20, clock=lambda: 1767323045.5)
        access.start()
        for i in range(3):
            access.write(f"line {i}", {"request_id": f"r-{i}"})
        assert buf.getvalue() == "", "buffered, not written per line"
        await access.stop()
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert [(x["message"], x["request_id"], x["logger"]) for x in lines] == [
            (f"line {i}", f"r-{i}", ACCESS_LOGGER) for i in range(3)]
        access.write("after stop", {"request_id": "r-3"})
        assert buf.getvalue().endswith('"request_id":"r-3"}\n'), "after stop a line is written at once"
    asyncio.run(main())


def test_a_full_buffer_and_the_flush_task_write_the_lines(log_to):
    buf = log_to("text")

    async def main():
        access = AccessLog(flush_s=3600, max_bytes=200)
        access.start()
        access.write("x" * 50, {})
        assert buf.getvalue() == ""
        access.write("y" * 200, {"request_id": "r-1"})  # past max_bytes: both lines go out
        text = buf.getvalue().splitlines()
        assert len(text) == 2 and text[0].endswith(f"INFO {ACCESS_LOGGER}: " + "x" * 50)
        assert text[1].endswith("y" * 200 + " request_id=r-1")
        await access.stop()

        access = AccessLog(flush_s=0.01)
        access.start()
        access.write("z", {})
        for _ in range(500):  # the periodic flush writes it without anything else happening
            await asyncio.sleep(0.01)
            if buf.getvalue().endswith(": z\n"):
                break
        assert buf.getvalue().endswith(": z\n")
        await access.stop()
    asyncio.run(main())


def test_other_logging_set_ups_get_log_records_and_the_level_turns_it_off(log_to, caplog):
    async def main():
        with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):  # a capture handler: not kvfleet's stream
            access = AccessLog()
            access.start()
            access.write("captured", {"request_id": "r-1"})
            await access.stop()
        assert [(r.getMessage(), r.fields["request_id"]) for r in caplog.records] == [("captured", "r-1")]
    asyncio.run(main())
    log_to("text", "warning")
    assert not AccessLog().enabled


def test_every_request_has_its_line_once_the_balancer_has_stopped(log_to):
    """A real balancer: 20 requests, then shutdown; every request's access line is out, as
    `logging` wrote it before (JSON, with its fields), the last ones written by the stop."""
    buf = log_to("json")

    async def main():
        with backend() as url:
            async with balancer([url]) as (base, b):
                async with aiohttp.ClientSession() as s:
                    for i in range(20):
                        async with s.post(base + "/v1/completions", json={"prompt": "hello", "max_tokens": 3},
                                          headers={"X-Request-Id": f"req-{i}"}) as r:
                            assert r.status == 200
                            await r.read()
                    async with s.post(base + "/v1/embeddings", json={"input": "hi"},
                                      headers={"X-Request-Id": "emb-1"}) as r:
                        await r.read()
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        access = {x["request_id"]: x for x in lines if x["logger"] == ACCESS_LOGGER}
        assert set(access) == {f"req-{i}" for i in range(20)} | {"emb-1"}
        first = access["req-0"]
        assert first["level"] == "info" and first["status"] == 200 and first["replica"] == url
        assert first["message"].startswith(f"/v1/completions unary replica={url} status=200 ttft=")
        assert first["attempts"] == 1 and first["prompt_tokens"] > 0 and first["policy"] == "precise_prefix"
        assert access["emb-1"]["message"].startswith(f"POST /v1/embeddings replica={url} status=")
    asyncio.run(main())
