"""Building `Features` from what the balancer, the simulator or a trace has.

- `from_routing_request(rr, ...)`: the balancer / a policy (balancer.policies.base.RoutingRequest:
  prompt_tokens, block_hashes (16-token blocks), max_tokens; tenant / model / turn / n-grams
  passed in by the caller when it knows them).
- `from_trace_request(req)`: a trace row. Traces give prefix-block ids (Mooncake: one per
  512-token block; Bailian: 16), not hashes: they are chained like the balancer's hashes,
  h_i = xxh3_64(h_{i-1} as 8 bytes LE ‖ id_i as 8 bytes LE), from a fixed root, so equal first-d
  ids give equal h_{d-1}. A trace without ids gives no block hashes (no prefix information).
- `hash_ngrams(text)`: hashed word bigrams of a prompt's text, for the regressor.

Everything is a pure function; hashes are xxh3 (no PYTHONHASHSEED).
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from predictors.base import Features

_U64 = (1 << 64) - 1
TRACE_ROOT = xxhash.xxh3_64_intdigest(b"kvfleet-trace-hash-ids")


def chain_ids(ids: Sequence[int], root: int = TRACE_ROOT) -> tuple[int, ...]:
    """Chained 64-bit hashes of a sequence of block ids (negative ids are taken mod 2**64)."""
    digest = xxhash.xxh3_64_intdigest
    out = []
    h = root
    for i in ids:
        h = digest(h.to_bytes(8, "little") + (i & _U64).to_bytes(8, "little"))
        out.append(h)
    return tuple(out)


def from_trace_request(req, model: str | None = None) -> Features:
    """Features of a loadgen.traces.TraceRequest (max_tokens unknown: traces do not record it)."""
    return Features(
        prompt_tokens=req.input_length,
        block_hashes=chain_ids(req.hash_ids) if req.hash_ids else (),
        max_tokens=None,
        tenant=req.tenant,
        model=model,
        turn=req.turn,
    )


def from_routing_request(rr, tenant: str | None = None, model: str | None = None, turn: int = 0,
                         text_ngrams: tuple[int, ...] = ()) -> Features:
    """Features of a balancer RoutingRequest (or anything with prompt_tokens, block_hashes and
    max_tokens). Pass the same tenant / model / turn when observing as when predicting."""
    return Features(prompt_tokens=rr.prompt_tokens, block_hashes=tuple(rr.block_hashes), max_tokens=rr.max_tokens,
                    tenant=tenant, model=model, turn=turn, text_ngrams=text_ngrams)


def hash_ngrams(text: str | None, n: int = 2, limit: int = 64) -> tuple[int, ...]:
    """xxh3 hashes of the word n-grams among the first `limit` words of text (lower-cased)."""
    if not text:
        return ()
    words = text.lower().split()[:limit]
    digest = xxhash.xxh3_64_intdigest
    if len(words) < n:
        return (digest(" ".join(words).encode()),) if words else ()
    return tuple(digest(" ".join(words[i:i + n]).encode()) for i in range(len(words) - n + 1))
