"""One request, several sequences: `n` samples of each prompt of a batch, and their logprobs.

A completions request may carry a batch of prompts and ask for `n` samples of each; a chat
request, `n` samples. Each (prompt i, sample j) is one engine request, the response's choice
`index = i * n + j` (vLLM's order). Sample j of a seeded request uses seed + j (vLLM's
`ParentRequest`), so the samples differ and each is reproducible.

One prefill per prompt: sample 0 is submitted first and the others once it has produced its
first token, when the prompt's full blocks are computed and in the prefix cache; they then
compute only the prompt's last partial block (tests/test_replica_server.py checks the cached
tokens).

Logprobs come in the two OpenAI shapes: the legacy completions one (`tokens`,
`token_logprobs`, `top_logprobs` as {token: logprob}, `text_offset`) and chat's
(`content`: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from replica.engine import RequestOutput
from replica.request import SamplingParams


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    sample: int  # j: which of the prompt's n samples
    prompt_ids: list[int]
    params: SamplingParams


def fan_out(prompts: list[list[int]], params: list[SamplingParams], n: int) -> list[Choice]:
    """The choices of a request: `n` per prompt, seeds spread as vLLM spreads them."""
    out = []
    for i, (ids, p) in enumerate(zip(prompts, params)):
        for j in range(n):
            child = p if j == 0 or p.seed is None else dataclasses.replace(p, seed=p.seed + j)
            out.append(Choice(i * n + j, j, ids, child))
    return out


async def merged(service, base_id: str, choices: list[Choice],
                 before_add=None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every choice's outputs as they come, tagged with its index; one prefill per prompt (the
    module docstring). Closing the iterator aborts the choices still running. `before_add`
    (one choice only: the KV hand-over's) goes to `EngineService.generate`."""
    if len(choices) == 1:
        # aclosing: closing this iterator closes the engine's stream now (which aborts the
        # request), not whenever the garbage collector finalizes it
        async with aclosing(service.generate(service.unique_id(base_id), choices[0].prompt_ids, choices[0].params,
                                             before_add)) as outs:
            async for out in outs:
                yield 0, out
        return
    if before_add is not None:
        raise ValueError("a KV hand-over serves one sequence; this request has several")
    queue: asyncio.Queue = asyncio.Queue()
    started: dict[int, asyncio.Event] = {}  # first choice of a prompt -> set once it has a token
    for c in choices:
        if c.sample == 0:
            started[c.index] = asyncio.Event()

    async def run(c: Choice) -> None:
        first = None if c.sample else started[c.index]
        if c.sample:
            await started[c.index - c.sample].wait()
        try:
            async with aclosing(service.generate(service.unique_id(f"{base_id}-{c.index}"), c.prompt_ids,
                                                 c.params)) as outs:
                async for out in outs:
                    await queue.put((c.index, out))
                    if first is not None and not first.is_set():
                        first.set()
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((c.index, e))
        finally:
            if first is not None:
                first.set()  # the others run even if this one failed
            await queue.put((c.index, None))

    tasks = [asyncio.create_task(run(c), name=f"choice {c.index}") for c in choices]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Logprobs:
    """Builds a choice's `logprobs` object, incrementally (a stream's chunks) or whole."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.offset: dict[int, int] = {}  # choice index -> characters so far (completions' text_offset)
        self._strings: dict[int, str] = {}

    def _token(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self.tokenizer.decode([token_id])
        return s

    def of(self, index: int, outs: list[RequestOutput], start_offset: int = 0) -> dict | None:
        """The logprobs of `outs` (one choice's outputs, in order); None if none were asked for."""
        entries = [(o.new_token_ids[-1], o.logprobs) for o in outs if o.logprobs is not None]
        if not entries:
            return None
        if self.chat:
            content = []
            for tok, (lp, top) in entries:
                s = self._token(tok)
                content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace")),
                                "top_logprobs": [{"token": self._token(t), "logprob": v,
                                                  "bytes": list(self._token(t).encode("utf-8", "replace"))}
                                                 for t, v in top]})
            return {"content": content}
        tokens, token_lps, tops, offsets = [], [], [], []
        at = self.offset.get(index, start_offset)
        for tok, (lp, top) in entries:
            s = self._token(tok)
            tokens.append(s)
            token_lps.append(lp)
            alts: dict[str, float] = {}
            for t, v in top:  # most likely first: two tokens that read the same keep the likelier
                alts.setdefault(self._token(t), v)
            alts.setdefault(s, lp)  # the sampled token is always among them (as vLLM does)
            tops.append(alts)
            offsets.append(at)
            at += len(s)
        self.offset[index] = at
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
