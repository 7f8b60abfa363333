"""Evicted values merged into the kept tokens (``EMLoCConfig(merge_evicted=True)``, opt-in): once a
share of the context is selected, each evicted token's value is folded into the kept token of its head
whose key is most like its own, weighted by how much attention each got from the held-out answers.

Eviction drops what an evicted token would have added to an output; a query that would have looked at
it looks, through a similar key, at its nearest kept neighbour instead, which now carries a share of
its value (KV merging in the spirit of CaM, Zhang et al. 2024). Keys, positions and sizes are
unchanged, so the memory's format, cost and decoding are too. A kept token that much attention
chose (a label word, a sink) barely moves: its own weight dominates the mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .memory import CompressedMemory

WEIGHT_FLOOR = 1e-6  # a token no held-out answer attended still counts a little (no empty means)


def merge_evicted(full: CompressedMemory, kept: CompressedMemory, weights: Sequence[torch.Tensor],
                  attention_mass: bool = False, segments: torch.Tensor | None = None) -> CompressedMemory:
    """``kept`` (tokens of ``full``, the unpruned memory) with the values of the tokens it evicted
    merged into its own: per layer and KV head, each evicted token joins the kept token whose key has
    the highest cosine similarity to its own, and every kept value becomes the ``weights``-weighted
    mean (per layer ``(kv_heads, T)``, e.g. the held-out answers' attention) of itself and the tokens
    that joined it. Layers kept whole are returned as they are.

    With ``attention_mass`` each kept slot also gets a logit bias (``CompressedMemory.logit_bias``) of
    log(its group's weight / its own weight), so that a query shaped like the held-out answers gives
    the slot the attention its whole group drew (proportional attention, as in token merging), capped
    at log(group size): the group's attention were each member scored like the kept key. Without the
    cap a kept token the answers hardly attended (one reconstruction chose) but whose group they did
    gets a bias large enough to draw every query (measured: docs/design.md, "Variants measured and dropped").

    ``segments`` (T,) ids (a demonstration's index, say): an evicted token joins only kept tokens of
    its own segment, the nearest of all where its segment kept none in that head (measured worse than
    merging across demonstrations on SmolLM2 SST-2: docs/design.md, "Variants measured and dropped")."""
    values: list[torch.Tensor] = []
    biases: list[torch.Tensor | None] = []
    for layer, (k, v, pos) in enumerate(zip(kept.keys, kept.values, kept.positions, strict=True)):
        fk, fv = full.keys[layer], full.values[layer]
        if k.shape[-2] == fk.shape[-2]:  # nothing evicted (the unpruned share, a sliding-window layer)
            values.append(v)
            biases.append(None)  # no merged slot: nothing to bias
            continue
        weight = weights[layer].to(device=v.device, dtype=torch.float32) + WEIGHT_FLOOR
        out = v.float().clone()
        seg = None if segments is None else segments.to(v.device)  # once per layer, not per head
        bias = torch.zeros(k.shape[:2], dtype=torch.float32, device=v.device) if attention_mass else None
        for h in range(k.shape[0]):
            slots = (pos[h] >= 0).nonzero().squeeze(1)
            held = pos[h, slots].long()
            evicted = torch.ones(fk.shape[-2], dtype=torch.bool, device=v.device)
            evicted[held] = False
            if not bool(evicted.any()):
                continue
            sim = (torch.nn.functional.normalize(fk[h, evicted].float(), dim=-1)
                   @ torch.nn.functional.normalize(k[h, slots].float(), dim=-1).T)
            if seg is not None:
                same = seg[evicted][:, None] == seg[held][None, :]
                local = sim.masked_fill(~same, float("-inf"))
                nearest = torch.where(same.any(dim=1), local.argmax(dim=1), sim.argmax(dim=1))
            else:
                nearest = sim.argmax(dim=1)
            total = weight[h, held].clone().index_add_(0, nearest, weight[h, evicted])
            summed = (weight[h, held, None] * out[h, slots]).index_add_(
                0, nearest, weight[h, evicted, None] * fv[h, evicted].float())
            out[h, slots] = summed / total[:, None]
            if bias is not None:
                size = torch.ones_like(total).index_add_(0, nearest, torch.ones_like(nearest, dtype=total.dtype))
                bias[h, slots] = torch.minimum(total / weight[h, held], size).log()
        values.append(out.to(v.dtype))
        biases.append(bias)
    return dataclasses.replace(kept, values=values, logit_bias=biases if attention_mass else None)
