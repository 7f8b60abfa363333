"""The whole-context method (``EMLoCConfig(compression="context")``): prefill the demonstrations once,
as full in-context learning does, rank every (layer, head, token) of the context, keep the best share.

Two signals rank a token, each turned into ranks over the whole context:
- **reconstruction** (KVzip, Kim et al. 2025): the most attention any query pays it while the model
  repeats the context (``reconstruct.whole_context_scores``);
- **held-out answers** (EMLoC's replay, made leave-one-out): every demonstration is replayed after the
  context with its own span hidden, and the token scores the most attention the rows that predict the
  held-out answer pay it. A probe that saw its own demonstration would copy the label from it, which is
  how the chunk-wise self-replay passes memories that have lost the questions (docs/benchmarks.md).

The blend gives reconstruction a share of the kept slots and the held-out answers the rest
(``rank_blend``): a token either one ranks high enough is kept.

Both the share kept and the split are EMLoC's adaptive choice, made once for the whole context by the
answers of a validation set of demonstrations (``check_set``, never used for scoring): per keep ratio,
smallest first, the split of ``reconstruction_shares`` whose held-out answers move least (mean
Jensen-Shannon over the answer rows); the first ratio where that stays within ``delta`` is kept, the
whole context if none does. With ``merge_evicted`` each trial's evicted values are merged into the
kept tokens (engine/merge.py) before its check, so the check reads the memory that is kept.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..config import EMLoCConfig
from ..skills import Skill, SkillError
from .cache import MemoryCache
from .chunk_loop import answer_rows, prefill
from .forward import ModelHandle, clock, lm_logits, run
from .memory import CompressedMemory, certificate
from .merge import merge_evicted
from .presses import Press
from .prompt import Segment
from .reconstruct import QueryHook, kvzip_memory, max_attention, whole_context_scores
from .replay import js_divergence

__all__ = ["CHECK_GROUP", "CHECK_PROBES", "PACK_TOKENS", "SINKS", "HeldOut", "RankedContext", "best_split", "check", "check_set",
           "compress_context", "demo_spans", "held_out_answers", "held_out_cache", "keep_share", "packs", "rank_blend",
           "rank_context", "require_text", "search_shares", "share_memory", "validation_js", "Check"]

SINKS = 4  # the first tokens are always kept (kvpress's KVzip)
CHECK_PROBES = 16  # held-out demonstrations the JS check replays, spread evenly over the context
CHECK_GROUP = 4  # validation demonstrations per forward of a check that may stop early
PACK_TOKENS = 512  # replayed tokens per packed held-out forward (one demonstration per forward: 0)


Shape = Callable[[CompressedMemory], CompressedMemory]
"""What a method does to each selected memory before its check (the fitted method's fit)."""


def check_set(n: int) -> list[int]:
    """The demonstrations the JS check replays: ``CHECK_PROBES`` (at most a quarter of ``n``) spread
    evenly over the context. They are a validation set: the ranking never scores with them, so
    the check reads demonstrations whose attention chose nothing."""
    k = min(CHECK_PROBES, max(1, n // 4))
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def demo_spans(prefix: Segment, demos: Sequence[Segment]) -> list[tuple[int, int]]:
    """(start, end) context positions of each demonstration."""
    spans, start = [], len(prefix)
    for d in demos:
        spans.append((start, start + len(d)))
        start += len(d)
    return spans


def held_out_cache(lm: ModelHandle, memory: CompressedMemory, spans: Sequence[tuple[int, int]]) -> MemoryCache:
    """A cache reading ``memory`` for a packed forward of ``len(spans)`` segments: segment ``s`` sees
    every layer's memory with the tokens at positions ``spans[s]`` hidden."""
    lo = torch.tensor([a for a, _ in spans], device=memory.keys[0].device)[:, None, None]
    hi = torch.tensor([b for _, b in spans], device=memory.keys[0].device)[:, None, None]
    valid = [(p >= 0) & ((p < lo.to(p.device)) | (p >= hi.to(p.device))) for p in memory.positions]  # (S, H, M)
    # the same for every head (an unpruned context): one row that the attention broadcasts over the
    # heads, where a per-head mask makes SDPA ~1.7x dearer on the CPU
    valid = [v[:, :1] if v.shape[1] > 1 and bool((v == v[:, :1]).all()) else v for v in valid]
    cache = MemoryCache([k[None] for k in memory.keys], [v[None] for v in memory.values],
                        [p[0] for p in memory.positions], lm.facts.windows, valid, memory.logit_bias)
    cache.keep_new = False
    return cache


def packs(lengths: Sequence[int], which: Sequence[int], tokens: int) -> list[list[int]]:
    """``which`` cut into consecutive groups of about ``tokens`` replayed tokens (at least one each)."""
    groups: list[list[int]] = []
    used = tokens
    for j in which:
        if used + lengths[j] > tokens:
            groups.append([])
            used = 0
        groups[-1].append(j)
        used += lengths[j]
    return groups


@dataclasses.dataclass
class HeldOut:
    """What the leave-one-out replays found: per layer (kv_heads, T) attention scores (when scored) and
    per checked demonstration the log-probs of its answer rows."""

    scores: list[torch.Tensor] | None
    log_probs: dict[int, torch.Tensor]


def held_out_answers(lm: ModelHandle, memory: CompressedMemory, demos: Sequence[Segment],
                     spans: Sequence[tuple[int, int]], which: Sequence[int], score: bool,
                     keep_log_probs: set[int], pack_tokens: int = PACK_TOKENS,
                     score_every_row: bool = False, on_queries: QueryHook | None = None) -> HeldOut:
    """Replay demonstrations ``which`` after ``memory``, each with its own span hidden: packed into
    forwards of about ``pack_tokens`` tokens, every demonstration its own segment at the positions
    right after the context (the memory is read, never copied per demonstration). Scores are the
    attention of the rows that predict answer tokens, or with ``score_every_row`` of every row.
    ``on_queries(module, layer, q, hidden)`` (with ``score``): every full-attention layer's post-RoPE
    queries of the rows scored, with each row's hidden span of the context ((rows, 2) start, end)."""
    f, device, total = lm.facts, lm.device, memory.original_length
    if score and memory.logit_bias is not None:
        raise ValueError("attention scores are read on a memory without logit biases (the unpruned context)")
    scores = [torch.zeros(f.num_kv_heads, total, device=device) for _ in range(f.num_layers)] if score else None
    log_probs: dict[int, torch.Tensor] = {}
    which = [j for j in which if any(demos[j].answer[1:])]  # a demonstration with no answer rows scores nothing
    for group in packs([len(d) for d in demos], which, pack_tokens):
        rows = torch.cat([answer_rows(demos[j], device) for j in group])
        ids = torch.tensor([t for j in group for t in demos[j].ids], device=device)[None]
        positions = torch.cat([total + torch.arange(len(demos[j]), device=device) for j in group])[None]
        segments = torch.cat([torch.full((len(demos[j]),), s, device=device) for s, j in enumerate(group)])[None]
        cache = held_out_cache(lm, memory, [spans[j] for j in group])
        if scores is not None:
            own_span = torch.tensor([spans[j] for j in group for _ in range(len(demos[j]))], device=device)  # (L, 2)

            def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor,
                        rows: torch.Tensor = rows, own_span: torch.Tensor = own_span) -> None:
                if f.sliding[layer]:
                    return
                if not score_every_row:
                    q, mask = q[:, :, rows], (mask[:, :, rows] if mask.shape[2] > 1 else mask)
                if on_queries is not None:
                    on_queries(module, layer, q, own_span if score_every_row else own_span[rows])
                scores[layer] = torch.maximum(scores[layer], max_attention(module, q, k, mask, 0, total))  # type: ignore[index]

            cache.observer = observe
        hidden = run(lm.model, cache, ids, positions, segments=segments)[0]
        start = 0
        for j in group:
            if j in keep_log_probs:
                own = rows[start : start + len(demos[j])]
                log_probs[j] = torch.log_softmax(lm_logits(lm.model, f, hidden[start : start + len(demos[j])][own]), dim=-1)
            start += len(demos[j])
    return HeldOut(scores, log_probs)


def rank_blend(*families: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Per layer (kv_heads, T): each family's scores turned into ranks over every (layer, head, token),
    and blended so that family ``i`` fills a share ``weights[i]`` (normalised; default equal) of any
    top-k: a token scores ``max_i 1 - (1 - rank_i) / (n * w_i)``, with ranks scaled to (0, 1]. With
    equal weights that is the max of the ranks. (The families' scales differ by orders of magnitude; a
    sum of raw scores lets the larger one decide.)"""
    n = len(families)
    raw = list(weights) if weights is not None else [1.0] * n
    w = [x / sum(raw) for x in raw]
    shape = families[0][0].shape
    blended = None
    for fam, wi in zip(families, w, strict=True):
        if wi <= 0:
            continue
        flat = torch.cat([s.flatten().float() for s in fam])
        ranks = torch.empty_like(flat)
        ranks[flat.argsort()] = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device) / flat.numel()
        score = 1 - (1 - ranks) / (n * wi)
        blended = score if blended is None else torch.maximum(blended, score)
    assert blended is not None, "every weight is zero"
    return list(blended.view(len(families[0]), *shape).unbind(0))


@dataclasses.dataclass
class RankedContext:
    """A skill's unpruned context with every (layer, head, token) ranked, and the held-out answers of
    the demonstrations the JS check replays (``checked``) on the full context."""

    full: CompressedMemory
    demos: list[Segment]
    spans: list[tuple[int, int]]
    reference: dict[int, torch.Tensor]  # checked demonstration -> its answer rows' log-probs, full context
    reconstruction: list[torch.Tensor]  # per layer (kv_heads, T), KVzip's scores
    held_out: list[torch.Tensor]  # per layer (kv_heads, T), the held-out answers' attention
    protected: int  # the first tokens, kept in every head
    prefill_s: float
    reconstruct_s: float = 0.0
    held_out_s: float = 0.0

    @property
    def checked(self) -> list[int]:
        return sorted(self.reference)

    def segments(self) -> torch.Tensor:
        """(T,) each token's demonstration index, -1 outside every demonstration (the prefix)."""
        seg = torch.full((self.full.original_length,), -1, dtype=torch.long)
        for j, (lo, hi) in enumerate(self.spans):
            seg[lo:hi] = j
        return seg

    def scores(self, reconstruction_share: float) -> list[torch.Tensor]:
        """Per layer (kv_heads, T): the blend giving reconstruction ``reconstruction_share`` of the kept
        slots, +inf where protected."""
        blended = rank_blend(self.reconstruction, self.held_out,
                             weights=(reconstruction_share, 1.0 - reconstruction_share))
        for s in blended:
            s[:, : self.protected] = float("inf")
        return blended


def require_text(lm: ModelHandle, skill: Skill) -> None:
    """This mode repeats the context's token ids, which images are not: a clear error for a visual skill
    or model."""
    if skill.has_images or getattr(lm, "vision", None) is not None:
        raise SkillError("compression='context' supports text models and skills only; use compression='chunks'")


def rank_context(lm: ModelHandle, skill: Skill, config: EMLoCConfig, full: CompressedMemory,
                 progress: Callable[[int], None] | None = None, reconstruction_queries: Any = None,
                 held_out_queries: Any = None) -> RankedContext:
    """Score ``full`` (the skill's unpruned memory, float32) by reconstruction and by leave-one-out
    replays, and blend. ``reconstruction_queries`` / ``held_out_queries``: objects whose ``add(module,
    layer, q, hidden)`` receives the post-RoPE queries of those forwards (the fitted method's ``QueryBank``)."""
    require_text(lm, skill)
    prefill_s = float(full.stats.get("compress_s", 0.0))
    renderer = lm.renderer(config.prompt_format)
    rendered = renderer.render(skill.instruction, skill.demonstrations)
    if progress:
        progress(1)
    t0 = clock(lm.device)
    reconstruction = whole_context_scores(lm, full, rendered.ids, sinks=SINKS, encode=renderer.ids,
                                          on_queries=None if reconstruction_queries is None else reconstruction_queries.add)
    t1 = clock(lm.device)
    if progress:
        progress(2)
    spans = demo_spans(rendered.prefix, rendered.demos)
    checked = check_set(len(rendered.demos))
    scoring = [j for j in range(len(rendered.demos)) if j not in checked]
    probes = held_out_answers(lm, full, rendered.demos, spans, scoring, score=True, keep_log_probs=set(),
                              on_queries=None if held_out_queries is None else held_out_queries.add)
    reference = held_out_answers(lm, full, rendered.demos, spans, checked, score=False, keep_log_probs=set(checked))
    assert probes.scores is not None
    t2 = clock(lm.device)
    if progress:
        progress(3)
    protected = min(full.original_length, max(SINKS, len(rendered.prefix) if config.protect_prefix else 0))
    return RankedContext(full, rendered.demos, spans, reference.log_probs, reconstruction, probes.scores, protected,
                         prefill_s, reconstruct_s=t1 - t0, held_out_s=t2 - t1)


def keep_share(lm: ModelHandle, ranked: RankedContext, ratio: float, reconstruction_share: float = 0.5,
               merge: bool = False, attention_mass: bool = True, local: bool = False) -> tuple[CompressedMemory, float]:
    """The context keeping its best-ranked share ``ratio`` (with ``merge``, the evicted values merged into
    it, with their attention-mass biases unless ``attention_mass`` is off: engine/merge.py), and the mean
    JS of the checked held-out answers on it against the full context."""
    memory = share_memory(lm, ranked, ratio, reconstruction_share, merge, attention_mass, local)
    return memory, validation_js(lm, ranked, memory)


def share_memory(lm: ModelHandle, ranked: RankedContext, ratio: float, reconstruction_share: float = 0.5,
                 merge: bool = False, attention_mass: bool = True, local: bool = False) -> CompressedMemory:
    """``keep_share``'s memory, unchecked."""
    memory = kvzip_memory(lm, ranked.full, ranked.scores(reconstruction_share), ratio, layer_budgets=True,
                          head_budgets=True)
    if merge:
        memory = merge_evicted(ranked.full, memory, ranked.held_out, attention_mass=attention_mass,
                               segments=ranked.segments() if local else None)
    return memory


def validation_js(lm: ModelHandle, ranked: RankedContext, memory: CompressedMemory) -> float:
    """Mean JS of the checked (validation) demonstrations' answer rows on ``memory`` against the full
    context: what the check reads."""
    return check(lm, ranked, memory)[0]


class Check(NamedTuple):
    """What one check read: the mean JS of the validation answer rows, whether every validation
    demonstration was read (an early stop returns a lower bound), and of those read, how many had an
    answer row whose most likely token changed."""

    js: float
    complete: bool
    changed: int


def check(lm: ModelHandle, ranked: RankedContext, memory: CompressedMemory,
          stop_above: float = math.inf) -> Check:
    """``validation_js``, whether it is complete, and the validation answers it changed. With a finite
    ``stop_above`` the validation demonstrations are replayed ``CHECK_GROUP`` at a time and the check stops once the JS summed so far,
    over every row it reads, exceeds ``stop_above``: the mean is then certainly above it (JS is never
    negative), and that lower bound is returned, incomplete. A search that only needs to know whether
    a trial beats a bound decides as with the whole check, at a fraction of its forwards."""
    checked = ranked.checked
    rows = sum(int(ranked.reference[j].shape[0]) for j in checked)
    step = len(checked) if math.isinf(stop_above) else CHECK_GROUP
    order = _strided(checked, -(-len(checked) // step))
    found: dict[int, torch.Tensor] = {}
    summed = 0.0  # JS summed over the rows read so far
    changed = 0
    for i in range(0, len(order), step):
        group = order[i : i + step]
        got = held_out_answers(lm, memory, ranked.demos, ranked.spans, group, score=False, keep_log_probs=set(group))
        found.update({j: js_divergence(ranked.reference[j], got.log_probs[j]) for j in group})
        changed += sum(bool((ranked.reference[j].argmax(-1) != got.log_probs[j].argmax(-1)).any()) for j in group)
        summed += float(torch.cat([found[j] for j in group]).sum())
        if summed / rows > stop_above and len(found) < len(checked):
            return Check(summed / rows, False, changed)
    return Check(float(torch.cat([found[j] for j in checked]).mean()), True, changed)


def _strided(items: Sequence[int], stride: int) -> list[int]:
    """``items`` reordered as every ``stride``-th from the first, then from the second, ...: cut into
    ``stride`` consecutive groups, each group spreads over the context as the whole set does."""
    return [x for start in range(stride) for x in items[start::stride]]


def best_split(lm: ModelHandle, ranked: RankedContext, ratio: float, reconstruction_shares: Sequence[float],
               merge: bool = False, delta: float = math.inf, shape: Shape | None = None, first: bool = False,
               ) -> tuple[CompressedMemory, float, float, list[dict]]:
    """At keep ratio ``ratio``, the split whose checked held-out answers move least: (memory, its JS,
    the split, one trial record per split tried). A trial's check stops once its JS is certainly above
    both ``delta`` and the best JS so far (its record then holds that lower bound, ``"complete":
    False``): such a trial can neither pass ``delta`` nor be the best, so where a split passes
    ``delta`` (any split, with the default) the one kept is the one whole checks keep. ``shape``: what
    is done to each selected memory before its check (the fitted method fits it, engine/fit.py).
    ``first``: keep the first split that passes ``delta`` without trying the rest (the ratio the search
    keeps is the same; its memory is within ``delta`` but not always the lowest JS)."""
    best: tuple[CompressedMemory, float, float] | None = None
    trials = []
    for split in reconstruction_shares:
        memory = share_memory(lm, ranked, ratio, split, merge)
        if shape is not None:
            memory = shape(memory)
        js, complete, changed = check(lm, ranked, memory, min(delta, best[1]) if best is not None else delta)
        trials.append({"ratio": ratio, "reconstruction_share": split, "js": js, "complete": complete,
                       "changed": changed})
        if best is None or js < best[1]:
            best = memory, js, split
        if first and js <= delta:
            break
    assert best is not None, "no reconstruction share to try"
    return *best, trials


def compress_context(lm: ModelHandle, skill: Skill, config: EMLoCConfig, press: Press | None = None,
                     progress: Callable[[int, int], None] | None = None) -> CompressedMemory:
    """The method's entry point: ``skill`` compressed over its whole context (see module docstring),
    starting from its unpruned prefill (``chunk_loop.prefill``, float32). It takes no press: the
    dispatcher sends a press to the chunk-wise loop."""
    if press is not None:
        raise ValueError("compression='context' takes no press; a press runs the chunk-wise loop")
    require_text(lm, skill)  # before the prefill
    full = prefill(lm, skill, config.prompt_format)
    steps = 3 + len(config.keep_ratios)
    ranked = rank_context(lm, skill, config, full, None if progress is None else lambda step: progress(step, steps))
    return search_shares(lm, ranked, config, None, progress, method="context",
                         options={"merge_evicted": config.merge_evicted})


def search_shares(lm: ModelHandle, ranked: RankedContext, config: EMLoCConfig, shape: Shape | None,
                  progress: Callable[[int, int], None] | None, method: str, options: dict[str, Any],
                  first: bool = False) -> CompressedMemory:
    """EMLoC's adaptive choice over a ranked context: per keep ratio, smallest first, the best split
    (``best_split``, each selected memory passed through ``shape`` first; with ``first``, its first
    split within ``delta``); the first whose validation answers stay within ``delta`` is kept, else
    the whole context. The memory's stats carry the timings, every trial, and its ``certificate``
    (``memory.certificate``)."""
    t0 = time.perf_counter() - ranked.prefill_s - ranked.reconstruct_s - ranked.held_out_s
    steps = 3 + len(config.keep_ratios)
    chosen, chosen_split, passed, trials = ranked.full, None, None, []
    t_check = clock(lm.device)
    for step, ratio in enumerate(config.keep_ratios):
        if ratio >= 1.0:
            break
        memory, js, split, tried = best_split(lm, ranked, ratio, config.reconstruction_shares, config.merge_evicted,
                                              config.delta, shape, first)
        trials += tried
        if progress:
            progress(4 + step, steps)
        if js <= config.delta:
            chosen, chosen_split = memory, split
            passed = next(t for t in tried if t["reconstruction_share"] == split)
            break
    stats = {"press": method, "chunks": 1, "tokens": ranked.full.original_length, "probes": len(ranked.demos),
             "checked_probes": len(ranked.checked), "trials": trials, "reconstruction_share": chosen_split,
             "merged": config.merge_evicted and chosen_split is not None,
             "prefill_s": ranked.prefill_s,
             "reconstruct_s": ranked.reconstruct_s, "held_out_s": ranked.held_out_s,
             "check_s": clock(lm.device) - t_check, "compress_s": time.perf_counter() - t0}
    out = dataclasses.replace(chosen.to(dtype=getattr(torch, config.storage_dtype)), stats=stats)
    stats["certificate"] = certificate(out, method, options, config.delta, sorted({t["ratio"] for t in trials}),
                                       len(ranked.checked), passed)
    if progress:
        progress(steps, steps)
    return out

