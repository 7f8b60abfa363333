"""The baselines the benchmark compares EMLoC with. Each fixed-ratio one is a press on the engine's
chunk-wise loop (``compress(lm, skill, press=...)``), as in kvpress; the loop measures what a press asks
for through the base ``Press``'s hooks (``needs_replay``, ``needs_window_scores`` with
``observation_window``, ``needs_reconstruction`` with ``reconstruction_sinks``). ``kvzip_whole`` is KVzip
on the whole unpruned context, as kvpress runs it.

The product engine keeps only what the product uses (``engine/presses.py``: the base press and EMLoC's
search); the engine never imports this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import EMLoCConfig
from ..engine.context import SINKS, require_text
from ..engine.forward import ModelHandle
from ..engine.memory import CompressedMemory
from ..engine.presses import Press, allocate, budget, select_top, topk_per_head
from ..engine.reconstruct import kvzip_memory, whole_context_scores
from ..engine.selection import Selection, pool
from ..skills import Skill

if TYPE_CHECKING:
    from ..engine.chunks import ChunkContext

__all__ = ["KVzipPress", "RandomPress", "SnapKVPress", "StreamingLLMPress", "UniformPress", "kvzip_whole"]


def per_global_layer(ctx: ChunkContext, pick: Callable[[int], torch.Tensor]) -> Selection:
    """``pick(layer)`` for each full-attention layer, in layer order; ``None`` for sliding-window layers
    (they keep only their window)."""
    return [None if ctx.facts.sliding[i] else pick(i) for i in range(ctx.facts.num_layers)]


@dataclass
class UniformPress(Press):
    """EMLoC's importance scores at one fixed share for every layer (no JS check)."""

    ratio: float = 0.2
    head_budgets: bool = False
    needs_replay: ClassVar[bool] = True
    name: ClassVar[str] = "uniform"

    def select(self, ctx: ChunkContext) -> Selection:
        assert ctx.replay is not None
        replay, k = ctx.replay, budget(ctx.n, self.ratio, ctx.n_protected)
        return per_global_layer(ctx, lambda i: select_top(replay.scores[i], k, self.head_budgets))


@dataclass
class SnapKVPress(Press):
    """SnapKV-style: attention of the chunk's last ``window`` tokens, pooled; the window is kept."""

    ratio: float = 0.2
    window: int = 32
    kernel: int = 5
    needs_window_scores: ClassVar[bool] = True
    name: ClassVar[str] = "snapkv"

    @property
    def observation_window(self) -> int:
        return self.window

    def select(self, ctx: ChunkContext) -> Selection:
        window_scores, k = ctx.window_scores, budget(ctx.n, self.ratio, 0)
        assert window_scores is not None

        def pick(i: int) -> torch.Tensor:
            s = pool(window_scores[i], self.kernel)
            s[:, max(0, ctx.n - self.window) :] = float("inf")  # the observation window is kept
            return topk_per_head(s, k)

        return per_global_layer(ctx, pick)


@dataclass
class KVzipPress(Press):
    """KVzip (Kim et al. 2025), query-agnostic: after each chunk the model repeats it, and each chunk
    token scores the most attention any reconstruction query pays it (engine/reconstruct.py); every
    layer keeps that share per head. Nothing is protected: answers survive only if they score.

    By default every head keeps the same share (one length per head). kvpress's ``KVzipPress`` ranks
    every head's tokens together (per-head budgets, ``head_budgets=True`` here) and was far more
    faithful: 0.93 against 0.28 agreement with full ICL on SmolLM2 TREC-128 (docs/benchmarks.md,
    "The chunk-wise loop")."""

    ratio: float = 0.2
    layer_budgets: bool = False
    head_budgets: bool = False  # budgets ranked across heads; with layer_budgets, across layers and heads (kvpress)
    sinks: int | None = None  # kvpress: 4 (the first tokens are always kept and the only memory the
    # reconstruction's softmax sees besides the chunk); None: every key, nothing kept by position
    needs_reconstruction: ClassVar[bool] = True
    name: ClassVar[str] = "kvzip"

    @property
    def reconstruction_sinks(self) -> int | None:
        return self.sinks

    def select(self, ctx: ChunkContext) -> Selection:
        assert ctx.reconstruction_scores is not None
        scores = ctx.reconstruction_scores
        if self.sinks and ctx.offset < self.sinks:
            scores = [s.clone() for s in scores]
            for s in scores:
                s[:, : self.sinks - ctx.offset] = float("inf")
        layers = {i: scores[i] for i in range(ctx.facts.num_layers) if not ctx.facts.sliding[i]}
        kept = allocate(layers, budget(ctx.n, self.ratio, 0), self.layer_budgets, self.head_budgets)
        return [kept.get(i) for i in range(ctx.facts.num_layers)]


@dataclass
class StreamingLLMPress(Press):
    """StreamingLLM: the first ``sinks`` tokens plus the most recent ones, over the whole prefix."""

    ratio: float = 0.2
    sinks: int = 4
    name: ClassVar[str] = "streaming-llm"

    def select(self, ctx: ChunkContext) -> Selection:
        total_budget = max(self.sinks, math.ceil(self.ratio * ctx.total_length))
        recent_from = ctx.total_length - (total_budget - self.sinks)
        pos = ctx.offset + torch.arange(ctx.n, device=ctx.device)
        keep = (pos < self.sinks) | (pos >= recent_from)
        idx = keep.nonzero().flatten()
        sel = idx[None].expand(ctx.facts.num_kv_heads, -1).contiguous()
        return per_global_layer(ctx, lambda _: sel)


@dataclass
class RandomPress(Press):
    """Random tokens at a fixed share (a floor every scoring method must beat)."""

    ratio: float = 0.2
    seed: int = 0
    name: ClassVar[str] = "random"
    _gen: torch.Generator | None = field(default=None, repr=False)

    def select(self, ctx: ChunkContext) -> Selection:
        if self._gen is None:
            self._gen = torch.Generator(device=ctx.device).manual_seed(self.seed)
        gen, k = self._gen, budget(ctx.n, self.ratio, 0)
        return per_global_layer(ctx, lambda _: topk_per_head(
            torch.rand(ctx.facts.num_kv_heads, ctx.n, generator=gen, device=gen.device), k))


def kvzip_whole(lm: ModelHandle, skill: Skill, full: CompressedMemory, ratio: float,
                config: EMLoCConfig | None = None,
                scores: tuple[list[torch.Tensor], float] | None = None) -> CompressedMemory:
    """KVzip exactly as kvpress runs it (the bench's ``kvzip-whole``) on ``full``, the skill's unpruned
    memory: the context repeated in spans, every layer, head and token ranked together by
    reconstruction alone, ``ratio`` kept, 4 sinks. ``scores``: (those reconstruction scores, the
    seconds they took), already made on ``full`` (a ``RankedContext`` holds them)."""
    require_text(lm, skill)
    config = config or EMLoCConfig()
    t0 = time.perf_counter()
    if scores is None:
        renderer = lm.renderer(config.prompt_format)
        ids = renderer.render(skill.instruction, skill.demonstrations).ids
        scores = whole_context_scores(lm, full, ids, sinks=SINKS, encode=renderer.ids), 0.0
    kept = kvzip_memory(lm, full, scores[0], ratio, layer_budgets=True, head_budgets=True)
    kept.stats.update(press="kvzip-whole",
                      compress_s=full.stats.get("compress_s", 0.0) + scores[1] + time.perf_counter() - t0)
    return kept.to(dtype=getattr(torch, config.storage_dtype))
