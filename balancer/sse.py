"""Server-sent events as the OpenAI API streams them, and what a broken stream left behind.

The proxy relays complete events only (up to a blank line), so a client never sees half an
event even when its replica dies mid-stream. On failover `read_progress` recovers what the
client already has: the response id, creation time, the text and token ids generated so far.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]"


@dataclass
class StreamProgress:
    id: str | None = None
    created: int | None = None
    object: str | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    has_token_ids: bool = True  # every chunk carried token_ids (else text-only continuation)
    finished: bool = False
    done: bool = False
    text_state: Any = None  # set by the proxy on failover: turns token ids into text deltas


def split_events(buf: bytearray) -> bytes:
    """Remove and return the complete events at the front of buf (b"" if none)."""
    cut = buf.rfind(b"\n\n")
    if cut < 0:
        return b""
    out = bytes(buf[: cut + 2])
    del buf[: cut + 2]
    return out


def event_data(events: bytes) -> Iterator[bytes]:
    """The `data:` payload of each complete event in `events` (other lines skipped)."""
    for raw in events.split(b"\n\n"):
        line = raw.strip()
        if line.startswith(b"data:"):
            yield line[5:].strip()


def read_progress(relayed: bytes) -> StreamProgress:
    p = StreamProgress()
    for data in event_data(relayed):
        if data == b"[DONE]":
            p.done = True
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        p.id = p.id or chunk.get("id")
        p.created = p.created or chunk.get("created")
        p.object = p.object or chunk.get("object")
        for choice in chunk.get("choices") or []:
            if "delta" in choice:
                p.text.append(choice["delta"].get("content") or "")
            else:
                p.text.append(choice.get("text") or "")
            ids = choice.get("token_ids")
            if ids is None:
                if choice.get("delta", {}).get("content") or choice.get("text"):
                    p.has_token_ids = False
            else:
                p.token_ids.extend(ids)
            if choice.get("finish_reason"):
                p.finished = True
    return p


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
