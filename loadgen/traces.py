"""Trace records and readers: one `TraceRequest` type for the load generator and the simulator.

Formats (facts from each release; design §7):

- mooncake  JSONL  `timestamp` (ms from start), `input_length`, `output_length`, `hash_ids` (one
            id per 512-token block, equal id = equal content). kvcache-ai/Mooncake FAST25-release/traces.
            kvfleet's generated traces add optional `session_id`, `turn`, `tenant` and
            `hash_block_tokens` keys that other Mooncake readers ignore.
- azure     CSV    `TIMESTAMP` (`2023-11-16 18:17:03.9799600`), `ContextTokens`, `GeneratedTokens`.
            Azure/AzurePublicDataset AzureLLMInferenceTrace_{code,conv}.csv (2023 and 2024).
- burstgpt  CSV    `Timestamp` (s), [`Session ID`, `Elapsed time`,] `Model`, `Request tokens`,
            `Response tokens`, `Total tokens`, `Log Type`. HPMLL/BurstGPT README: rows whose
            `Response tokens` is 0 are failed requests (the `*_without_fails_*` files drop them);
            they are skipped unless `keep_failed`.
- bailian   JSONL  `chat_id`, `parent_chat_id` (-1 for a root), `timestamp` (s), `input_length`,
            `output_length`, `type`, `turn`, `hash_ids` (16-token blocks). alibaba-edu
            qwen-bailian-usagetraces-anon. A request's session is the root of its parent chain.
- sharegpt  JSON   `[{"id", "conversations": [{"from": "human"|"gpt", "value"}]}]`. No timestamps:
            arrivals come from a rate (arrivals.gamma_arrivals). As `vllm bench serve` does, a
            conversation gives one request (first human turn -> next gpt turn) and pairs with
            fewer than 4 prompt or output tokens are skipped; `sharegpt_all_turns` makes one
            request per human turn instead, whose text is the whole history.

Every reader rebases arrivals so the first request arrives at 0 s, and raises ValueError naming
the file and line of anything malformed.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from loadgen.arrivals import gamma_arrivals

FORMATS = ("mooncake", "azure", "burstgpt", "bailian", "sharegpt")

MOONCAKE_BLOCK_TOKENS = 512  # Mooncake FAST'25 trace release: one hash id per 512 tokens
BAILIAN_BLOCK_TOKENS = 16  # qwen-bailian-usagetraces-anon: *_blksz_16.jsonl


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # seconds from trace start
    input_length: int  # prompt tokens
    output_length: int  # tokens to generate
    hash_ids: tuple[int, ...] | None = None  # prefix-block ids (equal id = equal content), None = no prefix info
    hash_block_tokens: int = 512  # tokens per hash id (Mooncake 512, Bailian 16)
    session_id: str | None = None
    turn: int = 0
    tenant: str | None = None
    text: str | None = None  # ShareGPT: the actual prompt text


@dataclass(frozen=True)
class TraceOptions:
    """How to read and reshape a trace. Applied in this order: spread ticks, time scale,
    duration, max requests, scale input.

    time_scale: multiplies every arrival time (0.5 replays twice as fast, 2 half as fast).
    scale_input: multiplies prompt lengths and tokens per hash block alike, so the prefix
        structure (which blocks are shared) stays exactly the trace's (see `scale_input`).
    spread_ticks: Mooncake-style traces arrive in ticks (~3 s): requests that share one timestamp
        are spread uniformly (seeded) over the tick of this many seconds, or up to the next
        timestamp when that comes sooner. None keeps the timestamps as they are.
    """

    time_scale: float = 1.0
    scale_input: float = 1.0
    max_requests: int | None = None
    duration_s: float | None = None
    spread_ticks: float | None = None
    seed: int = 0
    keep_failed: bool = False  # burstgpt: keep rows with 0 response tokens
    rate: float = 1.0  # sharegpt: mean arrival rate (req/s) of the generated arrivals
    burstiness: float = 1.0  # sharegpt: gamma shape of the inter-arrivals (1 = Poisson)
    tokenizer: str | None = None  # sharegpt: None/"byte" = byte tokenizer, else a tokenizer.json path
    sharegpt_all_turns: bool = False

    def __post_init__(self) -> None:
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a positive number, got {self.time_scale}")
        if not (self.scale_input > 0 and math.isfinite(self.scale_input)):
            raise ValueError(f"scale_input must be a positive number, got {self.scale_input}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {self.max_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        if self.spread_ticks is not None and not self.spread_ticks > 0:
            raise ValueError(f"spread_ticks must be a positive tick length in seconds, got {self.spread_ticks}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")


# ----------------------------------------------------------------------------- detection


def detect_format(path: str | Path) -> str:
    """Guess a trace's format from its first record (not its name)."""
    p = Path(path)
    with open(p, encoding="utf-8-sig") as f:
        head = f.read(64 * 1024)
    stripped = head.lstrip()
    if not stripped:
        raise ValueError(f"{p}: the file is empty; give a trace with at least one request")
    if stripped[0] == "[":
        return "sharegpt"
    if stripped[0] == "{":
        first = stripped.split("\n", 1)[0]
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:
            rec = {}
        if isinstance(rec, dict):
            if "chat_id" in rec or "parent_chat_id" in rec:
                return "bailian"
            if "input_length" in rec and "timestamp" in rec:
                return "mooncake"
            if "conversations" in rec:
                return "sharegpt"
        raise ValueError(f"{p}:1: a JSON line that is neither Mooncake (timestamp, input_length, ...) nor "
                         f"Bailian (chat_id, parent_chat_id, ...); pass --format explicitly if it is one of {FORMATS}")
    header = [h.strip() for h in stripped.split("\n", 1)[0].split(",")]
    if "ContextTokens" in header and "GeneratedTokens" in header:
        return "azure"
    if "Request tokens" in header and "Response tokens" in header:
        return "burstgpt"
    raise ValueError(f"{p}:1: cannot tell the trace format from the header {header[:8]}; "
                     f"pass --format (one of {', '.join(FORMATS)})")


# ----------------------------------------------------------------------------- readers


def _int_field(rec: dict, key: str, where: str, minimum: int = 0) -> int:
    v = rec.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def _num_field(rec: dict, key: str, where: str) -> float:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: '{key}' must be a number, got {v!r}")
    return float(v)


def _hash_ids(rec: dict, where: str) -> tuple[int, ...]:
    ids = rec.get("hash_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{where}: 'hash_ids' must be a list of integers")
    return tuple(ids)


def _json_lines(path: Path) -> Iterable[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(rec).__name__}")
            yield where, rec


def read_mooncake(path: str | Path) -> list[TraceRequest]:
    out = []
    for where, rec in _json_lines(Path(path)):
        block = rec.get("hash_block_tokens", MOONCAKE_BLOCK_TOKENS)
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"{where}: 'hash_block_tokens' must be a positive integer, got {block!r}")
        session = rec.get("session_id")
        tenant = rec.get("tenant")
        out.append(TraceRequest(
            arrival_s=_num_field(rec, "timestamp", where) / 1000.0,
            input_length=_int_field(rec, "input_length", where, 1),
            output_length=_int_field(rec, "output_length", where, 0),
            hash_ids=_hash_ids(rec, where) if "hash_ids" in rec else None,
            hash_block_tokens=block,
            session_id=None if session is None else str(session),
            turn=int(rec.get("turn", 0) or 0),
            tenant=None if tenant is None else str(tenant),
        ))
    return out


def read_bailian(path: str | Path) -> list[TraceRequest]:
    rows = []
    parent: dict[int, int] = {}
    for where, rec in _json_lines(Path(path)):
        chat = _int_field(rec, "chat_id", where, -(2**63))
        par = _int_field(rec, "parent_chat_id", where, -(2**63))
        parent[chat] = par
        rows.append((where, rec, chat))
    roots: dict[int, int] = {}

    def root_of(chat: int) -> int:
        """Follow parent links to the root; a parent outside this file counts as the root."""
        path, cur = [], chat
        while cur not in roots:
            par = parent.get(cur)
            if par is None or par == -1 or cur in path:
                roots[cur] = cur
                break
            path.append(cur)
            cur = par
        for c in path:
            roots[c] = roots[cur]
        return roots[cur]

    out = []
    for where, rec, chat in rows:
        root = root_of(chat)
        out.append(TraceRequest(
            arrival_s=_num_field(rec, "timestamp", where),
            input_length=_int_field(rec, "input_length", where, 1),
            output_length=_int_field(rec, "output_length", where, 0),
            hash_ids=_hash_ids(rec, where),
            hash_block_tokens=BAILIAN_BLOCK_TOKENS,
            session_id=str(root),
            turn=int(rec.get("turn", 0) or 0),
            tenant=str(rec["type"]) if rec.get("type") is not None else None,
        ))
    return out


def _csv_rows(path: Path, required: Sequence[str]) -> Iterable[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in fields]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing}; the header has {fields}")
        reader.fieldnames = fields
        for n, row in enumerate(reader, 2):
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            yield f"{path}:{n}", row


def _csv_int(row: dict, key: str, where: str) -> int:
    raw = (row.get(key) or "").strip()
    try:
        v = int(float(raw))
    except ValueError:
        raise ValueError(f"{where}: column '{key}' must be an integer, got {raw!r}") from None
    if v < 0:
        raise ValueError(f"{where}: column '{key}' must not be negative, got {v}")
    return v


_AZURE_EPOCH = datetime(2000, 1, 1)


def _azure_time(raw: str, where: str) -> float:
    """`2023-11-16 18:17:03.9799600` (7 fractional digits, more than datetime parses) -> seconds."""
    s = raw.strip()
    main, _, frac = s.partition(".")
    try:
        base = datetime.strptime(main, "%Y-%m-%d %H:%M:%S")
        f = float("0." + frac) if frac else 0.0
    except ValueError:
        raise ValueError(f"{where}: TIMESTAMP must look like 2023-11-16 18:17:03.9799600, got {raw!r}") from None
    return (base - _AZURE_EPOCH).total_seconds() + f  # naive times: only differences matter


def read_azure(path: str | Path) -> list[TraceRequest]:
    out = []
    for where, row in _csv_rows(Path(path), ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        inp = _csv_int(row, "ContextTokens", where)
        if inp < 1:
            raise ValueError(f"{where}: ContextTokens must be at least 1")
        out.append(TraceRequest(arrival_s=_azure_time(row["TIMESTAMP"], where), input_length=inp,
                                output_length=_csv_int(row, "GeneratedTokens", where), hash_ids=None))
    return out


def read_burstgpt(path: str | Path, keep_failed: bool = False) -> list[TraceRequest]:
    out = []
    for where, row in _csv_rows(Path(path), ("Timestamp", "Request tokens", "Response tokens")):
        raw = (row.get("Timestamp") or "").strip()
        try:
            ts = float(raw)
        except ValueError:
            raise ValueError(f"{where}: Timestamp must be seconds, got {raw!r}") from None
        inp, outp = _csv_int(row, "Request tokens", where), _csv_int(row, "Response tokens", where)
        if (outp == 0 and not keep_failed) or inp == 0:
            continue  # a failed request (BurstGPT README: failures have 0 response tokens)
        session = (row.get("Session ID") or "").strip() or None
        out.append(TraceRequest(arrival_s=ts, input_length=inp, output_length=outp, hash_ids=None,
                                session_id=session, tenant=(row.get("Model") or "").strip() or None))
    return out


def read_sharegpt(path: str | Path, options: TraceOptions | None = None) -> list[TraceRequest]:
    from protocol.tokenizer import load_tokenizer

    o = options or TraceOptions()
    p = Path(path)
    try:
        with open(p, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{p}:1: a ShareGPT file is a JSON list of conversations, got {type(data).__name__}")
    tok = load_tokenizer(o.tokenizer)

    def count(text: str) -> int:
        return len(tok.encode(text, add_bos=False))

    # vLLM benchmarks/datasets.py is_valid_sequence: prompts and outputs under 4 tokens are skipped
    min_len = 4
    pending = []  # (text, input_len, output_len, session, turn)
    for i, conv in enumerate(data):
        if not isinstance(conv, dict) or not isinstance(conv.get("conversations"), list):
            raise ValueError(f"{p}: conversation #{i} has no 'conversations' list")
        msgs = conv["conversations"]
        sid = str(conv.get("id", i))
        history: list[str] = []
        turn = 0
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("value"), str):
                raise ValueError(f"{p}: conversation #{i} ({sid}) message #{j} needs a string 'value'")
            if m.get("from") == "human" and j + 1 < len(msgs) and msgs[j + 1].get("from") == "gpt":
                prompt = "\n".join([*history, m["value"]]) if o.sharegpt_all_turns else m["value"]
                answer = msgs[j + 1].get("value")
                if not isinstance(answer, str):
                    raise ValueError(f"{p}: conversation #{i} ({sid}) message #{j + 1} needs a string 'value'")
                n_in, n_out = count(prompt), count(answer)
                if n_in >= min_len and n_out >= min_len:
                    pending.append((prompt, n_in, n_out, sid, turn))
                turn += 1
                if not o.sharegpt_all_turns:
                    break
            history.append(m["value"])
    if not pending:
        return []
    arrivals = gamma_arrivals(len(pending), o.rate, o.burstiness, np.random.default_rng(o.seed))
    return [TraceRequest(arrival_s=float(t), input_length=n_in, output_length=n_out, hash_ids=None,
                         session_id=sid, turn=turn, text=text)
            for t, (text, n_in, n_out, sid, turn) in zip(arrivals, pending)]


# ----------------------------------------------------------------------------- reshaping


def scale_input(req: TraceRequest, factor: float) -> TraceRequest:
    """Shrink (or grow) a request's prompt, keeping its prefix structure: each hash block gets
    `round(hash_block_tokens * factor)` tokens (at least 1) and the prompt keeps its number of
    blocks, with the last (partial) block scaled in proportion. Requests without hash ids just
    get `round(input_length * factor)` tokens (at least 1)."""
    if factor == 1.0:
        return req
    if not req.hash_ids:
        return replace(req, input_length=max(1, round(req.input_length * factor)))
    bt = req.hash_block_tokens
    nb = len(req.hash_ids)
    new_bt = max(1, round(bt * factor))
    if nb != math.ceil(req.input_length / bt):  # the trace breaks its own invariant: scale the length only
        return replace(req, input_length=max(1, round(req.input_length * factor)), hash_block_tokens=new_bt)
    last = req.input_length - (nb - 1) * bt  # 1..bt tokens in the last block
    new_last = min(new_bt, max(1, round(last * new_bt / bt)))
    return replace(req, input_length=(nb - 1) * new_bt + new_last, hash_block_tokens=new_bt)


def spread_ticks(requests: Sequence[TraceRequest], tick_s: float, seed: int = 0) -> list[TraceRequest]:
    """Requests that share an arrival time are spread uniformly over [t, t + tick) (or up to the
    next distinct arrival time, when sooner), in sorted random order; the result stays sorted."""
    rng = np.random.default_rng(seed)
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    out: list[TraceRequest] = []
    i = 0
    while i < len(reqs):
        j = i
        while j < len(reqs) and reqs[j].arrival_s == reqs[i].arrival_s:
            j += 1
        t = reqs[i].arrival_s
        width = tick_s if j == len(reqs) else min(tick_s, reqs[j].arrival_s - t)
        offsets = np.sort(rng.uniform(0.0, width, size=j - i))
        out.extend(replace(r, arrival_s=t + float(d)) for r, d in zip(reqs[i:j], offsets))
        i = j
    return out


def apply_options(requests: Sequence[TraceRequest], o: TraceOptions) -> list[TraceRequest]:
    """Rebase to 0, then the TraceOptions steps in their documented order."""
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    if not reqs:
        return []
    t0 = reqs[0].arrival_s
    if t0 != 0:
        reqs = [replace(r, arrival_s=r.arrival_s - t0) for r in reqs]
    if o.spread_ticks is not None:
        reqs = spread_ticks(reqs, o.spread_ticks, o.seed)
    if o.time_scale != 1.0:
        reqs = [replace(r, arrival_s=r.arrival_s * o.time_scale) for r in reqs]
    if o.duration_s is not None:
        reqs = [r for r in reqs if r.arrival_s < o.duration_s]
    if o.max_requests is not None:
        reqs = reqs[: o.max_requests]
    if o.scale_input != 1.0:
        reqs = [scale_input(r, o.scale_input) for r in reqs]
    return reqs


def load_trace(path: str | Path, fmt: str = "auto", options: TraceOptions | None = None) -> list[TraceRequest]:
    """Read a trace file into TraceRequests sorted by arrival, first arrival at 0 s."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no trace file at {p}; give a path to a trace, or make one with "
                                f"`kvfleet loadgen generate --out {p.name or 'trace.jsonl'}`")
    o = options or TraceOptions()
    kind = detect_format(p) if fmt == "auto" else fmt
    if kind == "mooncake":
        reqs = read_mooncake(p)
    elif kind == "bailian":
        reqs = read_bailian(p)
    elif kind == "azure":
        reqs = read_azure(p)
    elif kind == "burstgpt":
        reqs = read_burstgpt(p, o.keep_failed)
    elif kind == "sharegpt":
        reqs = read_sharegpt(p, o)
    else:
        raise ValueError(f"unknown trace format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    return apply_options(reqs, o)


def write_mooncake(path: str | Path, requests: Iterable[TraceRequest]) -> int:
    """Write requests as Mooncake JSONL (timestamp in integer ms). kvfleet's extras (session_id,
    turn, tenant, and hash_block_tokens when it is not 512) are extra keys other readers ignore.
    Returns the number of lines written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            rec: dict = {"timestamp": int(round(r.arrival_s * 1000)), "input_length": r.input_length,
                         "output_length": r.output_length, "hash_ids": list(r.hash_ids or ())}
            if r.hash_block_tokens != MOONCAKE_BLOCK_TOKENS:
                rec["hash_block_tokens"] = r.hash_block_tokens
            if r.session_id is not None:
                rec["session_id"] = r.session_id
                rec["turn"] = r.turn
            if r.tenant is not None:
                rec["tenant"] = r.tenant
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    return n
