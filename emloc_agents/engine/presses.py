"""Presses decide which of a chunk's tokens each layer keeps. One small class per method, as in
kvpress: EMLoC's adaptive JS-checked search, and the fixed-ratio baselines the benchmark compares.

A press returns, per layer, either ``None`` (keep the whole chunk) or a ``(kv_heads, k)`` tensor of
sorted chunk-local indices. Sliding-window layers are never pruned (they only keep their window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .compress import ChunkContext

Selection = list[torch.Tensor | None]


def topk_per_head(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (kv_heads, k) of the k best chunk tokens per head, in sequence order."""
    k = min(k, scores.shape[-1])
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


def budget(n: int, ratio: float, protected: int) -> int:
    return min(n, max(math.ceil(ratio * n), protected))


@dataclass
class Press:
    """Base: keeps everything (``keep_ratios=(1.0,)``)."""

    needs_replay: ClassVar[bool] = False
    needs_window_scores: ClassVar[bool] = False
    name: ClassVar[str] = "full"

    def select(self, ctx: ChunkContext) -> Selection:
        return [None] * ctx.facts.num_layers


@dataclass
class EMLoCPress(Press):
    """Layer-wise adaptive pruning: from the top layer down, the smallest candidate share whose
    Jensen-Shannon divergence to the teacher (on the replayed answer tokens) stays within ``delta``."""

    keep_ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    delta: float = 0.005
    layer_group_size: int = 1
    batch_candidates: bool = False
    needs_replay: ClassVar[bool] = True
    name: ClassVar[str] = "emloc"

    def select(self, ctx: ChunkContext) -> Selection:
        replay = ctx.replay
        assert replay is not None
        n_layers = ctx.facts.num_layers
        decided: Selection = [None] * n_layers
        prunable = [i for i in range(n_layers) if not ctx.facts.sliding[i]]
        groups = [prunable[max(0, j - self.layer_group_size) : j] for j in range(len(prunable), 0, -self.layer_group_size)]
        for group in groups:  # top-down
            ratios = [r for r in self.keep_ratios if r < 1.0 and budget(ctx.n, r, ctx.n_protected) < ctx.n]
            trials = []
            for ratio in ratios:
                trial = list(decided)
                k = budget(ctx.n, ratio, ctx.n_protected)
                for layer in group:
                    trial[layer] = topk_per_head(replay.scores[layer], k)
                trials.append(trial)
            chosen, chosen_js = 1.0, None
            if not self.batch_candidates:  # one candidate at a time, stop at the first that passes
                for ratio, trial in zip(ratios, trials, strict=True):
                    js = replay.divergence(trial, start_layer=group[0])
                    if js <= self.delta:
                        chosen, chosen_js, decided = ratio, js, trial
                        break
            elif trials:
                for ratio, trial, js in zip(ratios, trials, replay.divergences(trials, group[0]), strict=True):
                    if js <= self.delta:
                        chosen, chosen_js, decided = ratio, js, trial
                        break
            for layer in group:
                ctx.record(layer, chosen, chosen_js)
        return decided


@dataclass
class UniformPress(Press):
    """EMLoC's importance scores at one fixed share for every layer (no JS check)."""

    ratio: float = 0.2
    needs_replay: ClassVar[bool] = True
    name: ClassVar[str] = "uniform"

    def select(self, ctx: ChunkContext) -> Selection:
        assert ctx.replay is not None
        k = budget(ctx.n, self.ratio, ctx.n_protected)
        return [
            None if ctx.facts.sliding[i] else topk_per_head(ctx.replay.scores[i], k)
            for i in range(ctx.facts.num_layers)
        ]


@dataclass
class SnapKVPress(Press):
    """SnapKV-style: attention of the chunk's last ``window`` tokens, pooled; the window is kept."""

    ratio: float = 0.2
    window: int = 32
    kernel: int = 5
    needs_window_scores: ClassVar[bool] = True
    name: ClassVar[str] = "snapkv"

    def select(self, ctx: ChunkContext) -> Selection:
        assert ctx.window_scores is not None
        k = budget(ctx.n, self.ratio, 0)
        out: Selection = []
        for i in range(ctx.facts.num_layers):
            if ctx.facts.sliding[i]:
                out.append(None)
                continue
            s = pool(ctx.window_scores[i], self.kernel)
            s[:, max(0, ctx.n - self.window) :] = float("inf")
            out.append(topk_per_head(s, k))
        return out


@dataclass
class StreamingLLMPress(Press):
    """StreamingLLM: the first ``sinks`` tokens plus the most recent ones, over the whole prefix."""

    ratio: float = 0.2
    sinks: int = 4
    name: ClassVar[str] = "streaming-llm"

    def select(self, ctx: ChunkContext) -> Selection:
        total_budget = max(self.sinks, math.ceil(self.ratio * ctx.total_length))
        recent_from = ctx.total_length - (total_budget - self.sinks)
        pos = ctx.offset + torch.arange(ctx.n)
        keep = (pos < self.sinks) | (pos >= recent_from)
        idx = keep.nonzero().flatten()
        sel = idx[None].expand(ctx.facts.num_kv_heads, -1).contiguous()
        return [None if ctx.facts.sliding[i] else sel for i in range(ctx.facts.num_layers)]


@dataclass
class RandomPress(Press):
    """Random tokens at a fixed share (a floor every scoring method must beat)."""

    ratio: float = 0.2
    seed: int = 0
    name: ClassVar[str] = "random"
    _gen: torch.Generator | None = field(default=None, repr=False)

    def select(self, ctx: ChunkContext) -> Selection:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        k = budget(ctx.n, self.ratio, 0)
        out: Selection = []
        for i in range(ctx.facts.num_layers):
            if ctx.facts.sliding[i]:
                out.append(None)
                continue
            s = torch.rand(ctx.facts.num_kv_heads, ctx.n, generator=self._gen)
            out.append(topk_per_head(s, k))
        return out


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the sequence (same length), as in SnapKV/EMLoC."""
    if kernel <= 1:
        return scores.clone()
    return torch.nn.functional.avg_pool1d(
        scores[None].float(), kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=False
    )[0][..., : scores.shape[-1]]
