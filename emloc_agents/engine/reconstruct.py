"""KVzip's query-agnostic importance (Kim et al. 2025): after a chunk, ask the model to repeat it and
score every chunk token by the most attention any reconstruction query pays it.

A token the model needs to rebuild its context is a token any later question may need, so the
scores do not depend on the demonstrations' answers (unlike EMLoC's replay). Per chunk this costs one
extra forward of about the chunk's length, on memory + whole chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from .cache import MemoryCache, join_valid
from .decode import memory_cache
from .forward import ModelHandle, run
from .memory import CompressedMemory
from .presses import allocate
from .replay import Building, gather_positions, gather_tokens

QueryHook = Callable[[torch.nn.Module, int, torch.Tensor, "torch.Tensor | None"], None]
"""Receives a layer's post-RoPE query rows from a scoring forward: (module, layer, q (1, Hq, L, d), hidden),
``hidden`` (L, 2) the context span [start, end) each row does not see (a held-out demonstration's own),
or None where every row sees the whole context."""

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


ATTENTION_BLOCK = 1 << 24  # float32 probabilities materialised at once (64 MB): query rows go in blocks
CPU_ATTENTION_BLOCK = 1 << 20  # 4 MB on the CPU, where a block that stays in cache made the scores 1.2x
# faster (SmolLM2 TREC-128: reconstruction 41.6 -> 34.9 s, the same decisions; docs/benchmarks.md)


def max_attention(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, lo: int, hi: int,
                  hidden: torch.Tensor | None = None, block: int | None = None, trim: bool | None = None
                  ) -> torch.Tensor:
    """Largest attention probability that any query row (and query head of a KV group) pays each
    key in ``lo:hi`` -> (kv_heads, hi - lo). Recomputed in float32, as SDPA returns no probabilities,
    in blocks of query rows (each row's softmax is its own, so blocks change nothing but the peak
    memory and the speed; ``block`` elements at once, by default smaller on the CPU). ``hidden``
    (kv_heads, Lk) bool: keys left out of the softmax (KVzip normalises over sinks + chunk + repeat);
    keys no head sees are dropped before the product, not masked after it (for a span of a whole
    context: everything outside the span but its sinks). With ``trim`` (None: on the CPU, where it costs
    no device sync) each block of rows also leaves out the keys after the last one it sees: for the
    causal repeat rows a quarter of the work, the same numbers bit for bit."""
    _, hq, rows, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scaling = getattr(module, "scaling", d**-0.5)
    shown = None
    if hidden is not None:
        cols = ~hidden.all(0)  # keys some head sees; the scored keys are always computed
        cols[lo:hi] = True
        first = int(cols[:lo].sum())
        lo, hi = first, first + hi - lo
        idx = cols.nonzero().squeeze(1)
        k, mask, hidden = k[:, :, idx], mask[..., idx], hidden[:, idx]
        if bool(hidden.any()):  # a computed key is still hidden from some head
            shown = ~hidden.repeat_interleave(group, dim=0)[:, None, :]
    keys = k[0].float().repeat_interleave(group, dim=0)  # (Hq, Lk, d)
    visible = mask[0].expand(hq, -1, -1)  # (1 | Hq, Lq | 1, Lk): per query head where slots are padded
    if block is None:
        block = CPU_ATTENTION_BLOCK if q.device.type == "cpu" else ATTENTION_BLOCK
    step = max(1, block // (hq * keys.shape[1]))
    keys_t = keys.transpose(1, 2)  # (Hq, d, Lk)
    if trim is None:
        trim = q.device.type == "cpu"
    some_head = shown.any(0) if trim and shown is not None else None  # (1, Lk)
    best = None
    for r0 in range(0, rows, step):
        vis = visible[:, r0 : r0 + step] if visible.shape[1] == rows else visible
        upto = keys_t.shape[-1]
        if trim:  # keys after the last one a row of this block sees are left out of the product
            own = mask[0, :, r0 : r0 + step] if mask.shape[2] == rows else mask[0]  # not expanded over heads
            seen = own.any(1).any(0, keepdim=True)  # (1, Lk)
            if some_head is not None:
                seen = seen & some_head
            last = seen[0].nonzero()
            upto = max(hi, int(last[-1]) + 1 if len(last) else 0)
        logits = torch.bmm(q[0, :, r0 : r0 + step].float() * scaling, keys_t[:, :, :upto])
        vis = vis[..., :upto]
        if shown is not None:
            vis = vis & shown[..., :upto]
        probs = torch.softmax(logits.masked_fill_(~vis, float("-inf")), dim=-1)[..., lo:hi].amax(dim=1)  # (Hq, n)
        best = probs if best is None else torch.maximum(best, probs)
    assert best is not None, "no query rows"
    return best.view(hkv, group, hi - lo).amax(dim=1)


def reconstruction_scores(
    lm: ModelHandle, building: Building, chunk_k: Sequence[torch.Tensor], chunk_v: Sequence[torch.Tensor],
    chunk_pos: torch.Tensor, ids: Sequence[int], start: int, sinks: int | None = None,
) -> list[torch.Tensor]:
    """Per layer (kv_heads, n) scores of the chunk's tokens from one reconstruction forward of ``ids``
    (repeat prompt + the chunk's tokens) at positions ``start ...`` on memory + whole chunk.
    ``sinks``: the softmax sees only the memory's tokens at positions below it, the chunk and the
    repeat (kvpress's KVzipPress); None: every key. Sliding-window layers get zeros (never pruned)."""
    f = lm.facts
    n = int(chunk_pos.shape[0])
    keys, values, positions, valid = [], [], [], []
    for layer in range(f.num_layers):
        mk, mv, mp = building.prefix(layer)
        keys.append(chunk_k[layer] if mk is None else torch.cat([mk, chunk_k[layer]], 2))
        values.append(chunk_v[layer] if mv is None else torch.cat([mv, chunk_v[layer]], 2))
        positions.append(chunk_pos if mp is None else torch.cat([mp, chunk_pos]))
        valid.append(join_valid([(building.valid(layer), building.length(layer)), (None, n)]))
    cache = MemoryCache(keys, values, positions, f.windows, valid)
    cache.keep_new = False
    scores: dict[int, torch.Tensor] = {}

    def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        if not f.sliding[layer]:
            lo = building.length(layer)
            hidden = None
            if sinks is not None and lo:
                mp = building.positions[layer]  # (kv_heads, lo): each head kept its own tokens
                assert mp is not None
                hidden = torch.zeros(k.shape[1], k.shape[-2], dtype=torch.bool, device=k.device)
                hidden[:, :lo] = mp >= sinks
            scores[layer] = max_attention(module, q, k, mask, lo, lo + n, hidden)

    cache.observer = observe
    device = chunk_pos.device
    run(lm.model, cache, torch.tensor([list(ids)], device=device), (start + torch.arange(len(ids), device=device))[None])
    return [scores.get(i, torch.zeros(f.num_kv_heads, n, device=device)) for i in range(f.num_layers)]


CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


def whole_context_scores(
    lm: ModelHandle, memory: CompressedMemory, context_ids: Sequence[int], span: int = 2048, sinks: int = 4,
    encode: Callable[[str], list[int]] | None = None, on_queries: QueryHook | None = None,
) -> list[torch.Tensor]:
    """KVzip as kvpress runs it, on an unpruned memory of ``context_ids``: the model repeats the whole
    context in spans of ``span`` tokens (each span after a prompt that quotes the 8 tokens before it),
    every span's softmax sees only the first ``sinks`` tokens, the span and the repeat. Per layer
    (kv_heads, T) scores; the first ``sinks`` tokens score +inf (always kept). ``on_queries(module, layer,
    q, None)``: called with every full-attention layer's post-RoPE queries of each span's forward (the fitted
    method's reference queries, engine/fit.py)."""
    f = lm.facts
    total = memory.original_length
    assert len(context_ids) == total and all(
        n == total for n, sliding in zip(memory.layer_lengths, f.sliding, strict=True) if not sliding
    ), "needs the unpruned memory (sliding-window layers may keep their window only)"
    encode = encode or (lambda text: lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    out = [torch.zeros(f.num_kv_heads, total, device=lm.device) for _ in range(f.num_layers)]
    for lo in range(0, total, span):
        hi = min(total, lo + span)
        lead = encode(REPEAT_PROMPT) if lo == 0 else encode(CONTINUE_PROMPT) + list(context_ids[lo - 8 : lo]) + encode("\n")
        ids = lead + list(context_ids[lo:hi])
        cache, start = memory_cache(lm, memory)

        def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor,
                    lo: int = lo, hi: int = hi) -> None:
            if f.sliding[layer]:
                return
            if on_queries is not None:
                on_queries(module, layer, q, None)
            hidden = torch.zeros(k.shape[1], k.shape[-2], dtype=torch.bool, device=k.device)
            hidden[:, min(sinks, lo) : lo] = True
            hidden[:, hi:total] = True
            out[layer][:, lo:hi] = max_attention(module, q, k, mask, lo, hi, hidden)

        cache.observer = observe
        run(lm.model, cache, torch.tensor([ids], device=lm.device), (start + torch.arange(len(ids), device=lm.device))[None])
    for s in out:
        s[:, :sinks] = float("inf")
    return out


def kvzip_memory(lm: ModelHandle, memory: CompressedMemory, scores: list[torch.Tensor], ratio: float,
                 layer_budgets: bool = True, head_budgets: bool = False) -> CompressedMemory:
    """The unpruned ``memory`` keeping its best-scored share ``ratio`` of tokens: per layer and head
    (default), per layer ranked across its heads (``head_budgets``), or, with ``layer_budgets``, from
    one ranking across layers (and, with both, across layers and heads: kvpress's KVzipPress)."""
    f = lm.facts
    total = memory.original_length
    k = max(1, round(ratio * total))
    layers = {i: scores[i].to(memory.keys[i].device) for i in range(f.num_layers) if not f.sliding[i]}
    kept = allocate(layers, k, layer_budgets, head_budgets)
    return dataclasses.replace(keep_tokens(memory, kept), stats={**memory.stats, "press": "kvzip-whole"})


def keep_tokens(memory: CompressedMemory, kept: dict[int, torch.Tensor]) -> CompressedMemory:
    """``memory`` with layer ``i`` reduced to the (kv_heads, k) token indices ``kept[i]`` (-1: a padded
    slot); layers not in ``kept`` stay whole. ``memory`` has no logit biases (a merged memory is final)."""
    if memory.logit_bias is not None:
        raise ValueError("keep_tokens selects from a memory without logit biases (before merging)")
    keys, values, positions = [], [], []
    for i, (key, val, pos) in enumerate(zip(memory.keys, memory.values, memory.positions, strict=True)):
        if i in kept:
            idx = kept[i].to(key.device)
            key, val = gather_tokens(key[None], idx)[0], gather_tokens(val[None], idx)[0]
            pos = gather_positions(pos, idx.to(pos.device))
        keys.append(key.contiguous())
        values.append(val.contiguous())
        positions.append(pos.contiguous())
    return dataclasses.replace(memory, keys=keys, values=values, positions=positions)
