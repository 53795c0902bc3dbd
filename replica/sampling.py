"""Token sampling for one step's batch: greedy, temperature, top-k, top-p, per-request seeds.

Random rows use the exponential-race trick (argmax of p / q with q ~ Exp(1)), which samples
from p exactly and lets each seeded request draw its noise from its own generator, so its
output does not depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from replica.request import Request

_NEG_INF = float("-inf")


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # logits: [N, V]; top_k: [N] int64 (V = disabled); top_p: [N] float (1 = disabled)
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    mask = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(mask, _NEG_INF).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cum_before = probs.cumsum(dim=-1) - probs
    mask |= cum_before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mask, _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter(1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, requests: list[Request], default_generator: torch.Generator) -> list[int]:
    """Pick one token per row. logits: [N, V] float32, row i belongs to requests[i]."""
    n, vocab = logits.shape
    logits = logits.float()
    # min_tokens: forbid EOS and stop tokens until enough tokens were produced.
    for i, req in enumerate(requests):
        p = req.params
        if p.min_tokens and req.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids)
            if req.eos_token_id is not None:
                banned.append(req.eos_token_id)
            if banned:
                logits[i, banned] = _NEG_INF
    greedy_rows = [i for i, r in enumerate(requests) if r.params.greedy]
    out = logits.argmax(dim=-1)
    if len(greedy_rows) < n:
        rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        sub = logits[rows]
        temps = torch.tensor([requests[i].params.temperature for i in rows], dtype=torch.float32)
        sub = sub / temps.unsqueeze(1)
        top_k = torch.tensor(
            [requests[i].params.top_k if requests[i].params.top_k > 0 else vocab for i in rows], dtype=torch.int64
        )
        top_p = torch.tensor([requests[i].params.top_p for i in rows], dtype=torch.float32)
        if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
            sub = _apply_top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(rows):
            req = requests[i]
            gen = default_generator
            if req.params.seed is not None:
                if req.generator is None:
                    req.generator = torch.Generator().manual_seed(req.params.seed)
                gen = req.generator
            noise[j].exponential_(generator=gen)
        out[rows] = (probs / noise).argmax(dim=-1)
    return out.tolist()
