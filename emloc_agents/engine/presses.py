"""Presses decide which of a chunk's tokens each layer keeps in the chunk-wise loop, one small class per
method as in kvpress: the base ``Press`` (keep everything; its hooks say what a press needs measured)
and EMLoC's adaptive JS-checked search. The baselines the benchmark compares live in
``emloc_agents/bench/presses.py``; the budget helpers below serve both.

A press returns, per layer, either ``None`` (keep the whole chunk) or a ``(kv_heads, k)`` tensor of
sorted chunk-local indices; with per-head budgets a head that keeps fewer tokens than the layer's
most pads its row with -1 (``topk_across_heads``). Sliding-window layers are never pruned (they
only keep their window).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .selection import Selection

if TYPE_CHECKING:
    from .chunks import ChunkContext

__all__ = ["EMLoCPress", "Press", "Selection", "allocate", "budget", "default_lookahead", "global_layer_budgets",
           "padded_indices", "rank_all_heads", "select_top", "topk_across_heads", "topk_per_head"]


def default_lookahead(device: torch.device | str) -> int:
    """Speculation depth where ``lookahead`` is None: 8 on CUDA (re-forwards are launch-bound there,
    extra trial rows nearly free), 4 elsewhere (rows cost compute). Decisions do not depend on it."""
    return 8 if torch.device(device).type == "cuda" else 4


def topk_across_heads(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``heads * k`` best chunk tokens of a layer ranked across its heads (kvpress's per-head
    budgets: a head whose attention is spread keeps more than a focused one) -> (heads, k_max) indices
    in sequence order per head, -1 in the spare slots of heads that keep fewer than the most."""
    h, n = scores.shape
    chosen = torch.zeros(h * n, dtype=torch.bool, device=scores.device)
    chosen[torch.topk(scores.flatten(), h * min(k, n)).indices] = True
    return padded_indices(chosen.view(h, n))


def padded_indices(chosen: torch.Tensor) -> torch.Tensor:
    """(heads, n) bool -> (heads, k_max) indices of the chosen tokens per head in sequence order, -1
    in the spare slots of heads that chose fewer than the most."""
    h, n = chosen.shape
    k_max = int(chosen.sum(1).max())
    order = torch.arange(n, device=chosen.device).expand(h, n)
    idx = torch.where(chosen, order, order + n).sort(dim=1).values[:, :k_max]  # chosen first, in order
    return idx.masked_fill(idx >= n, -1)


def select_top(scores: torch.Tensor, k: int, across_heads: bool) -> torch.Tensor:
    """k tokens per head (``topk_per_head``) or heads * k for the layer (``topk_across_heads``)."""
    return topk_across_heads(scores, k) if across_heads else topk_per_head(scores, k)


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

    @property
    def observation_window(self) -> int:
        """With ``needs_window_scores``: how many of a chunk's last rows the window scores read."""
        return 32

    @property
    def reconstruction_sinks(self) -> int | None:
        """With ``needs_reconstruction``: the first tokens of the memory the reconstruction's softmax sees
        besides the chunk (None: every key)."""
        return None

    def select(self, ctx: ChunkContext) -> Selection:
        return [None] * ctx.facts.num_layers


@dataclass
class EMLoCPress(Press):
    """Layer-wise adaptive pruning: from the top layer down, the smallest candidate share whose
    Jensen-Shannon divergence to the teacher (on the replayed answer tokens) stays within ``delta``.

    ``lookahead`` makes the sequential search cheaper without changing its decisions: most layers
    accept the smallest share, so the next ``lookahead`` layers are checked at once, as a batch of
    stacked trials (top layer pruned; top two; ...), in one re-forward that reads the weights once.
    The walk accepts trials until the first that fails. That layer's larger shares are checked in
    the next re-forward together with the speculation below each of its possible outcomes (0.2,
    0.5, the whole chunk), so a failure costs one re-forward instead of two; the walk keeps the
    stack under the share that passed. Trials that assumed a decision that did not happen are dropped."""

    keep_ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    delta: float = 0.005
    layer_group_size: int = 1
    batch_candidates: bool = True
    lookahead: int | None = None  # None: by device (EMLoCConfig.lookahead)
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

        def stack(base: Selection, run: list[list[int]]) -> list[Selection]:
            """Stacked trials on ``base``: each adds one more group at the smallest share."""
            out: list[Selection] = []
            for group in run:
                out.append(pruned(out[-1] if out else base, group, ratios[0]))
            return out

        def accept(run: list[list[int]], spec: list[Selection], results: Iterator[float]) -> int:
            """Walk stacked trials until the first that fails; how many groups passed."""
            nonlocal decided
            for passed, (group, trial, js) in enumerate(zip(run, spec, results, strict=False)):
                if js > self.delta:
                    return passed
                decided = trial
                for layer in group:
                    ctx.record(layer, ratios[0], js)
            return len(run)

        ahead = self.lookahead or default_lookahead(ctx.device)
        ahead = ahead if replay.batches else 1
        # a group that failed the smallest share: its larger shares are checked in the same re-forward
        # as the speculation below each possible outcome (share 0.2, 0.5, or the whole chunk)
        merge = ahead > 1 and self.batch_candidates
        i = 0
        while i < len(groups):
            run = groups[i : i + ahead]
            spec = stack(decided, run)
            passed = accept(run, spec, replay.divergences(spec, run[-1][0]))
            i += passed
            while passed < len(run) and i < len(groups):  # groups[i] failed the smallest share
                failed = groups[i]
                alts = [pruned(decided, failed, r) for r in ratios[1:]]
                below = groups[i + 1 : i + ahead] if merge else []
                stacks = [stack(base, below) for base in [*alts, decided]]  # under 0.2, 0.5, whole
                trials = alts + [t for s in stacks for t in s]
                if below:  # one re-forward; the JS of the stack under the share that passes is read later
                    checked = replay.answer_trials(trials, below[-1][0])
                    results: Iterator[float] = iter(checked.js(range(len(alts))))
                elif self.batch_candidates and alts:  # answers scope: one batch; exact scope: lazily, in order
                    results = replay.divergences(alts, failed[0])
                else:  # one at a time, stop at the first that passes
                    results = (replay.divergence(t, start_layer=failed[0]) for t in alts)
                chosen, chosen_js, pick = 1.0, None, len(alts)
                for j, (ratio, trial, js) in enumerate(zip(ratios[1:], alts, results, strict=False)):
                    if js <= self.delta:
                        chosen, chosen_js, decided, pick = ratio, js, trial, j
                        break
                for layer in failed:
                    ctx.record(layer, chosen, chosen_js)
                i += 1
                if not below:
                    break
                first = len(alts) + pick * len(below)
                run = below
                passed = accept(run, stacks[pick], iter(checked.js(range(first, first + len(below)))))
                i += passed
        return decided


def allocate(scores: dict[int, torch.Tensor], k: int, layer_budgets: bool, head_budgets: bool) -> dict[int, torch.Tensor]:
    """Per layer the kept token indices of a budget of ``k`` per head and layer: ``k`` for every head;
    the layer's ``heads * k`` ranked across its heads (``head_budgets``); the layers' shares from one
    ranking across layers (``layer_budgets``); or, with both, every layer, head and token ranked
    together (kvpress's KVzipPress)."""
    if not scores:
        return {}
    if layer_budgets and head_budgets:
        return rank_all_heads(scores, k)
    ks = global_layer_budgets(scores, k) if layer_budgets else dict.fromkeys(scores, k)
    return {i: select_top(s, ks[i], head_budgets) for i, s in scores.items()}


def rank_all_heads(scores: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    """One ranking of every (layer, head, token) score (kvpress's KVzipPress): keep as many winners as
    ``k`` per head and layer would -> per layer (heads, k_max) indices, -1-padded (``padded_indices``)."""
    layers = list(scores)
    heads, n = scores[layers[0]].shape
    flat = torch.cat([scores[i].flatten().float() for i in layers])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, min(flat.numel(), k * heads * len(layers))).indices] = True
    return {i: padded_indices(m) for i, m in zip(layers, keep.view(len(layers), heads, n).unbind(0), strict=True)}


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
