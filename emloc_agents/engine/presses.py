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

from .selection import Selection, pool

if TYPE_CHECKING:
    from .chunks import ChunkContext

__all__ = ["EMLoCPress", "Press", "RandomPress", "Selection", "SnapKVPress", "StreamingLLMPress", "UniformPress",
           "budget", "pool", "topk_per_head"]


def topk_per_head(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (kv_heads, k) of the k best chunk tokens per head, in sequence order."""
    k = min(k, scores.shape[-1])
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


def budget(n: int, ratio: float, protected: int, rounding: str = "ceil") -> int:
    """Tokens to keep of ``n`` at share ``ratio``: ceil(r*n) or, as the reference, int(r*n); never
    fewer than the protected tokens."""
    share = math.ceil(ratio * n) if rounding == "ceil" else int(ratio * n)
    return min(n, max(share, protected))


@dataclass
class Press:
    """Base: keeps everything (``keep_ratios=(1.0,)``)."""

    needs_replay: ClassVar[bool] = False
    needs_window_scores: ClassVar[bool] = False
    needs_reconstruction: ClassVar[bool] = False
    name: ClassVar[str] = "full"

    def select(self, ctx: ChunkContext) -> Selection:
        return [None] * ctx.facts.num_layers


@dataclass
class EMLoCPress(Press):
    """Layer-wise adaptive pruning: from the top layer down, the smallest candidate share whose
    Jensen-Shannon divergence to the teacher (on the replayed answer tokens) stays within ``delta``.

    ``lookahead`` makes the sequential search cheaper without changing its decisions: most layers
    accept the smallest share, so the next ``lookahead`` layers are checked at once, as a batch of
    stacked trials (top layer pruned; top two; ...), in one re-forward that reads the weights once.
    The walk accepts trials until the first that fails and tries the larger shares on that layer
    only; trials after it assumed a decision that did not happen and are dropped."""

    keep_ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    delta: float = 0.005
    layer_group_size: int = 1
    batch_candidates: bool = True
    lookahead: int = 4
    budget_rounding: str = "ceil"
    needs_replay: ClassVar[bool] = True
    name: ClassVar[str] = "emloc"

    def select(self, ctx: ChunkContext) -> Selection:
        replay = ctx.replay
        assert replay is not None
        n_layers = ctx.facts.num_layers
        decided: Selection = [None] * n_layers
        prunable = [i for i in range(n_layers) if not ctx.facts.sliding[i]]
        size = self.layer_group_size
        groups = [prunable[max(0, j - size) : j] for j in range(len(prunable), 0, -size)]  # top-down
        def k_of(r: float) -> int:
            return budget(ctx.n, r, ctx.n_protected, self.budget_rounding)

        ratios = [r for r in self.keep_ratios if r < 1.0 and k_of(r) < ctx.n]
        if not ratios:
            for group in groups:
                for layer in group:
                    ctx.record(layer, 1.0, None)
            return decided
        picks = {r: [topk_per_head(replay.scores[layer], k_of(r)) for layer in range(n_layers)]
                 for r in ratios}

        def pruned(base: Selection, group: list[int], ratio: float) -> Selection:
            trial = list(base)
            for layer in group:
                trial[layer] = picks[ratio][layer]
            return trial

        ahead = self.lookahead if replay.batches else 1
        i = 0
        while i < len(groups):
            run, spec = groups[i : i + ahead], list[Selection]()
            for group in run:  # stacked trials: each adds one more group at the smallest share
                spec.append(pruned(spec[-1] if spec else decided, group, ratios[0]))
            failed = None
            for group, trial, js in zip(run, spec, replay.divergences(spec, run[-1][0]), strict=True):
                if js > self.delta:
                    failed = group
                    break
                decided = trial
                for layer in group:
                    ctx.record(layer, ratios[0], js)
            i += len(run) if failed is None else run.index(failed)
            if failed is None:
                continue
            chosen, chosen_js = 1.0, None
            trials = [pruned(decided, failed, r) for r in ratios[1:]]
            if self.batch_candidates and trials:
                results = replay.divergences(trials, failed[0])
            else:  # one at a time, stop at the first that passes
                results = (replay.divergence(t, start_layer=failed[0]) for t in trials)
            for ratio, trial, js in zip(ratios[1:], trials, results, strict=False):
                if js <= self.delta:
                    chosen, chosen_js, decided = ratio, js, trial
                    break
            for layer in failed:
                ctx.record(layer, chosen, chosen_js)
            i += 1
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
class KVzipPress(Press):
    """KVzip (Kim et al. 2025), query-agnostic: after each chunk the model repeats it, and each chunk
    token scores the most attention any reconstruction query pays it (engine/reconstruct.py); every
    layer keeps that share per head. Nothing is protected: answers survive only if they score.

    KVzip's scores under the memory's constraint of one length per layer. kvpress's ``KVzipPress``
    ranks every head's tokens together (per-head budgets) and is far more faithful: 0.93 against 0.28
    agreement with full ICL on SmolLM2 TREC-128 (docs/benchmarks.md, "KVzip as kvpress ships it")."""

    ratio: float = 0.2
    layer_budgets: bool = False
    sinks: int | None = None  # kvpress: 4 (the first tokens are always kept and the only memory the
    # reconstruction's softmax sees besides the chunk); None: every key, nothing kept by position
    needs_reconstruction: ClassVar[bool] = True
    name: ClassVar[str] = "kvzip"

    def select(self, ctx: ChunkContext) -> Selection:
        assert ctx.reconstruction_scores is not None
        scores = ctx.reconstruction_scores
        if self.sinks and ctx.offset < self.sinks:
            scores = [s.clone() for s in scores]
            for s in scores:
                s[:, : self.sinks - ctx.offset] = float("inf")
        k = budget(ctx.n, self.ratio, 0)
        layers = [i for i in range(ctx.facts.num_layers) if not ctx.facts.sliding[i]]
        ks = dict.fromkeys(layers, k)
        if self.layer_budgets and layers:
            ks = global_layer_budgets({i: scores[i] for i in layers}, k)
        return [topk_per_head(scores[i], ks[i]) if i in ks else None for i in range(ctx.facts.num_layers)]


def global_layer_budgets(scores: dict[int, torch.Tensor], k: int) -> dict[int, int]:
    """KVzip's non-uniform budget (``layerwise=False`` in kvpress), per layer: rank every (layer, head,
    token) score of the chunk together, keep as many as ``k`` per head and layer would, and give each
    layer its share of the winners, split evenly over its heads (a memory has one length per layer)."""
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    heads, n = next(iter(scores.values())).shape
    total = k * heads * len(scores)
    winners = torch.topk(flat, total).indices // (heads * n)
    counts = torch.bincount(winners, minlength=len(scores)).tolist()
    return {layer: max(1, min(n, round(c / heads))) for layer, c in zip(scores, counts, strict=True)}


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
            self._gen = torch.Generator(device=ctx.device).manual_seed(self.seed)
        k = budget(ctx.n, self.ratio, 0)
        out: Selection = []
        for i in range(ctx.facts.num_layers):
            if ctx.facts.sliding[i]:
                out.append(None)
                continue
            s = torch.rand(ctx.facts.num_kv_heads, ctx.n, generator=self._gen, device=self._gen.device)
            out.append(topk_per_head(s, k))
        return out
