"""KVzip's query-agnostic importance (Kim et al. 2025): after a chunk, ask the model to repeat it and
score every chunk token by the most attention any reconstruction query pays it.

A token the model needs to rebuild its context is a token any later question may need, so the
scores do not depend on the demonstrations' answers (unlike EMLoC's replay). Per chunk this costs one
extra forward of about the chunk's length, on memory + whole chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import MemoryCache
from .forward import ModelHandle, run
from .replay import Building

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


def max_attention(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Largest attention probability that any query row (and query head of a KV group) pays each
    key in ``lo:hi`` -> (kv_heads, hi - lo). Recomputed in float32, as SDPA returns no probabilities."""
    _, hq, _, d = q.shape
    hkv = k.shape[1]
    scaling = getattr(module, "scaling", d**-0.5)
    logits = torch.einsum("hqd,hkd->hqk", q[0].float(), k[0].float().repeat_interleave(hq // hkv, dim=0)) * scaling
    logits = logits.masked_fill(~mask[0, :1].expand(hq, -1, -1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)[..., lo:hi]  # (Hq, Lq, n)
    return probs.amax(dim=1).view(hkv, hq // hkv, hi - lo).amax(dim=1)


def reconstruction_scores(
    lm: ModelHandle, building: Building, chunk_k: Sequence[torch.Tensor], chunk_v: Sequence[torch.Tensor],
    chunk_pos: torch.Tensor, ids: Sequence[int], start: int,
) -> list[torch.Tensor]:
    """Per layer (kv_heads, n) scores of the chunk's tokens from one reconstruction forward of ``ids``
    (repeat prompt + the chunk's tokens) at positions ``start ...`` on memory + whole chunk.
    Sliding-window layers get zeros (they are never pruned)."""
    f = lm.facts
    n = int(chunk_pos.shape[0])
    keys, values, positions = [], [], []
    for layer in range(f.num_layers):
        mk, mv, mp = building.prefix(layer)
        keys.append(chunk_k[layer] if mk is None else torch.cat([mk, chunk_k[layer]], 2))
        values.append(chunk_v[layer] if mv is None else torch.cat([mv, chunk_v[layer]], 2))
        positions.append(chunk_pos if mp is None else torch.cat([mp, chunk_pos]))
    cache = MemoryCache(keys, values, positions, f.windows)
    cache.keep_new = False
    scores: dict[int, torch.Tensor] = {}

    def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        if not f.sliding[layer]:
            lo = building.length(layer)
            scores[layer] = max_attention(module, q, k, mask, lo, lo + n)

    cache.observer = observe
    device = chunk_pos.device
    run(lm.model, cache, torch.tensor([list(ids)], device=device), (start + torch.arange(len(ids), device=device))[None])
    return [scores.get(i, torch.zeros(f.num_kv_heads, n, device=device)) for i in range(f.num_layers)]
