"""balancer/proxy.py's `tail_usage`: the `usage` object at the end of a replica's answer (a JSON
body, or the usage chunk of an SSE stream), read without parsing the rest of the body."""

from __future__ import annotations

import json

from balancer.proxy import tail_usage

USAGE = {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11, "prompt_tokens_details": {"cached_tokens": 4}}


def _body(**extra) -> bytes:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "m",
                       "choices": [{"index": 0, "text": " a {b} \"usage\": {}", "finish_reason": "length"}],
                       **extra}).encode()


def test_usage_of_a_body_and_of_a_stream():
    assert tail_usage(_body(usage=USAGE)) == USAGE
    compact = json.dumps({"choices": [], "usage": USAGE}, separators=(",", ":")).encode()
    assert tail_usage(bytearray(compact)) == USAGE
    chunk = json.dumps({"id": "cmpl-1", "choices": [], "usage": USAGE}).encode()
    stream = b"data: " + _body() + b"\n\ndata: " + chunk + b"\n\ndata: [DONE]\n\n"
    assert tail_usage(stream) == USAGE
    # a long body: only its tail is read, and the usage object is in it
    long = _body(choices=[{"index": 0, "text": "x" * 100_000}], usage=USAGE)
    assert tail_usage(long) == USAGE


def test_no_usable_usage_object_is_none():
    assert tail_usage(_body()) is None  # none at all
    assert tail_usage(_body(usage=None)) is None
    assert tail_usage(_body(usage=[1, 2])) is None
    assert tail_usage(b'{"usage": {"prompt_tokens": 8,') is None  # cut short
    assert tail_usage(b"") is None
    # the last "usage" is the answer's: a stream whose usage chunk is cut is not read from an earlier one
    assert tail_usage(_body(usage=USAGE)[:-5]) is None
