"""Variants of the default memory at one share, side by side with what the engine keeps: each ranks the
context once (``rank_context``) and changes one thing after it. Per variant the mean JS of the
validation demonstrations' answers (what the engine's check reads), accuracy and agreement with full ICL.

- ``default``: the choice of the engine with ``reconstruction_shares=(0.5, 0.7, 0.85)`` (before 0.3 and
  1.0 were added, 2026-11-28) at the share: the split with the lowest JS;
- ``wider-splits``: the same choice among more splits (``--splits``);
- ``layer-uniform``: every layer keeps the same number of tokens (ranked across its heads), instead of
  one ranking across layers and heads;
- ``answers-kept``: every demonstration's answer tokens kept in every head, the rest by the blend
  (label words as anchors, Wang et al. 2023);
- ``value-norm``: both signals' scores weighted by each token's value norm in its head before ranking
  (what a token adds to an output is its attention times its value; Guo et al. 2024, "Attention
  score is not all you need"), the default's splits;
- ``merge-values``: the ``wider-splits`` memory with the evicted values merged into the kept tokens
  (engine/merge.py without the logit biases), the split chosen before merging;
  ``merge-chosen``: the split chosen by those merged memories' JS;
- ``merge-mass-capped``: ``merge-values`` with a logit bias on each kept slot, log(its group's weight /
  its own), capped at log(group size) (``merge_evicted(attention_mass=True)``), so that a merged slot
  draws its group's attention; ``merge-capped-chosen``: the split chosen by those memories' JS, as
  ``EMLoCConfig(merge_evicted=True)`` chooses;
- ``merge-local-chosen``: ``merge-capped-chosen`` with each evicted token merged into the kept tokens
  of its own demonstration first (``merge_evicted(segments=...)``), against merges across demonstrations;
- ``every-row``: the held-out signal from the attention of every row of the replayed demonstrations
  (their questions too, as a test question reads the context), not only the rows predicting
  answers; the default's splits, lowest JS;
- ``prefill-attention``: the reconstruction signal replaced by one the prefill can compute without a
  forward of its own: the most attention any later token of the context pays a token (causal); the
  default's splits, lowest JS. ``prefill-cross``: the same from the tokens of later demonstrations only
  (a token's own demonstration left out, as the held-out replays leave it out);
- ``layer-cap``: the default's ranking, no layer keeping more than 40 % of its (head, token) slots (the
  rest goes to the next-ranked tokens of the other layers); the default's splits, lowest JS;
- ``merge-layer-cap``: ``layer-cap``'s memories with the evicted values merged and the attention-mass
  bias (``merge_evicted=True``'s merge), the split chosen by the merged memories' JS;
- ``gqa-mean``: both signals with a KV head's score the mean over its query heads instead of the max;
  the default's splits, lowest JS;
- ``each-split``: one row per split tried (the set (0.5, 0.7, 0.85) and ``--splits``; variant ``split=ρ``),
  so that any rule choosing among them by JS can be read off afterwards.

Appends one JSON line per (task, seed, share, variant) to ``--out``.

    python scripts/context_variants.py --model qwen2.5-coder-0.5b --task trec --seeds 0 --shares 0.2 \\
        --out results/context-variants.jsonl
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from _experiment import cases, emit, model_for, parser, table

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.context import (
    SINKS,
    RankedContext,
    held_out_answers,
    keep_share,
    rank_context,
    validation_js,
)
from emloc_agents.engine.decode import memory_cache
from emloc_agents.engine.forward import run
from emloc_agents.engine.memory import CompressedMemory
from emloc_agents.engine.merge import merge_evicted
from emloc_agents.engine.reconstruct import kvzip_memory


def answer_positions(ranked: RankedContext) -> torch.Tensor:
    """(T,) bool: the context positions of the demonstrations' answer tokens."""
    mask = torch.zeros(ranked.full.original_length, dtype=torch.bool)
    for demo, (start, _) in zip(ranked.demos, ranked.spans, strict=True):
        mask[start : start + len(demo)] = torch.tensor(demo.answer, dtype=torch.bool)
    return mask


LAYER_CAP = 0.4  # layer-cap: the most of a layer's (head, token) slots one layer may keep


def capped(scores: list[torch.Tensor], cap: float = LAYER_CAP) -> list[torch.Tensor]:
    """Per layer: every score below the layer's ``cap`` share best pushed under all others, so one
    ranking across layers keeps at most that share of any layer."""
    out = []
    for s in scores:
        s = s.clone()
        n = s.numel()
        if int(cap * n) < n:
            s[s <= s.flatten().kthvalue(n - int(cap * n)).values] = -1e9
        out.append(s)
    return out


def gqa_mean_ranking(lm, skill, config: EMLoCConfig, full: CompressedMemory) -> RankedContext:
    """``rank_context`` with each KV head scored by the mean of its query heads' scores (not the max)."""
    from emloc_agents.engine import context, reconstruct

    most = reconstruct.max_attention

    def mean_attention(module, q, k, mask, lo, hi, hidden=None, **kw):
        group = q.shape[1] // k.shape[1]
        per_query_head = most(module, q, k.repeat_interleave(group, 1), mask, lo, hi,
                              None if hidden is None else hidden.repeat_interleave(group, 0), **kw)
        return per_query_head.view(k.shape[1], group, -1).mean(1)

    reconstruct.max_attention = context.max_attention = mean_attention
    try:
        return rank_context(lm, skill, config, full)
    finally:
        reconstruct.max_attention = context.max_attention = most


def prefill_attention(lm, ranked: RankedContext, ids: Sequence[int], rows: int = 256
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer (kv_heads, T): the most attention any later token of one causal forward of the context
    pays each token (max over the KV head's query heads), and the same from the tokens of later
    demonstrations only. Sliding-window layers: zeros; the first ``SINKS`` tokens: +inf."""
    f, total = lm.facts, len(ids)
    segment = ranked.segments().to(lm.device)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(module, layer, q, k, mask) -> None:
        if f.sliding[layer]:
            return
        heads, group = q.shape[1], q.shape[1] // k.shape[1]
        keys = k[0].float().repeat_interleave(group, 0)
        every = torch.zeros(heads, total, device=q.device)
        later = torch.zeros(heads, total, device=q.device)
        for r0 in range(0, total, rows):
            r1 = min(total, r0 + rows)
            logits = torch.bmm(q[0, :, r0:r1].float() * getattr(module, "scaling", q.shape[-1] ** -0.5),
                               keys[:, :r1].transpose(1, 2))
            col, row = torch.arange(r1, device=q.device)[None], torch.arange(r0, r1, device=q.device)[:, None]
            probs = torch.softmax(logits.masked_fill_(col > row, float("-inf")), dim=-1)
            every[:, :r1] = torch.maximum(every[:, :r1], probs.amax(1))
            other = (segment[:r1][None] < segment[r0:r1][:, None]) & (segment[r0:r1][:, None] >= 0)
            later[:, :r1] = torch.maximum(later[:, :r1], probs.masked_fill(~other, 0).amax(1))
        found[layer] = (every.view(k.shape[1], group, total).amax(1), later.view(k.shape[1], group, total).amax(1))

    cache, _ = memory_cache(lm, None)
    cache.keep_new, cache.observer = False, observe
    run(lm.model, cache, torch.tensor([list(ids)], device=lm.device), torch.arange(total, device=lm.device)[None])
    zero = torch.zeros(f.num_kv_heads, total, device=lm.device)
    families = tuple([found[i][which].clone() if i in found else zero.clone() for i in range(f.num_layers)]
                     for which in (0, 1))
    for s in families[0] + families[1]:
        s[:, :SINKS] = float("inf")
    return families


def fingerprint(memory: CompressedMemory) -> str:
    """A digest of what a memory holds (kept positions, values, biases): two variants that kept the
    same memory share one prediction run."""
    digest = hashlib.sha1()
    for layer, (pos, v) in enumerate(zip(memory.positions, memory.values, strict=True)):
        digest.update(pos.cpu().numpy().tobytes())
        digest.update(v.float().cpu().numpy().tobytes())
        bias = memory.logit_bias[layer] if memory.logit_bias is not None else None
        digest.update(b"-" if bias is None else bias.float().cpu().numpy().tobytes())
    return digest.hexdigest()


VARIANTS = ("default", "wider-splits", "layer-uniform", "answers-kept")  # the others: when asked
BASE_SPLITS = (0.5, 0.7, 0.85)  # the engine's reconstruction_shares when these variants were compared


def variants(lm, ranked: RankedContext, share: float, splits: list[float],
             which: tuple[str, ...] = VARIANTS, ids: Sequence[int] = (), skill=None, reuse: dict | None = None
             ) -> dict[str, tuple[CompressedMemory, float, float]]:
    """name -> (memory, validation JS, reconstruction share); ``ids``: the context's token ids (the
    prefill variants); ``skill``: the skill (gqa-mean ranks it again); ``reuse``: one dict per context,
    shared across shares (the prefill's scores and gqa-mean's ranking are made once)."""
    reuse = {} if reuse is None else reuse
    def keep(split: float, layer_budgets: bool = True, protect: torch.Tensor | None = None, cap: bool = False,
             on: RankedContext = ranked, merge: bool = False):
        scores = on.scores(split)
        if cap:
            scores = capped(scores)
        if protect is not None:
            for s in scores:
                s[:, protect.to(s.device)] = float("inf")
        memory = kvzip_memory(lm, on.full, scores, share, layer_budgets=layer_budgets, head_budgets=True)
        if merge:
            memory = merge_evicted(on.full, memory, on.held_out, attention_mass=True)
        return memory, validation_js(lm, on, memory), split

    def value_weighted(splits: Sequence[float]):
        norms = [v.float().norm(dim=-1) for v in ranked.full.values]  # per layer (kv_heads, T)
        weighted = dataclasses.replace(ranked, reconstruction=[s * n for s, n in zip(ranked.reconstruction, norms, strict=True)],
                                       held_out=[s * n for s, n in zip(ranked.held_out, norms, strict=True)])
        return best([(*keep_share(lm, weighted, share, split), split) for split in splits])

    merges: dict[float, tuple[CompressedMemory, float, float]] = {}

    def merged(split: float):  # one merged memory per split (merge-values and merge-chosen may pick the same)
        if split not in merges:
            merges[split] = (*keep_share(lm, ranked, share, split, merge=True, attention_mass=False), split)
        return merges[split]

    def mass(split: float):  # merged, with the attention-mass bias
        return (*keep_share(lm, ranked, share, split, merge=True, attention_mass=True), split)

    def local(split: float):  # merged within each demonstration, with the bias
        return (*keep_share(lm, ranked, share, split, merge=True, attention_mass=True, local=True), split)

    def every_row():
        scoring = [j for j in range(len(ranked.demos)) if j not in ranked.reference]
        scores = held_out_answers(lm, ranked.full, ranked.demos, ranked.spans, scoring, score=True,
                                  keep_log_probs=set(), score_every_row=True).scores
        wide = dataclasses.replace(ranked, held_out=scores)
        return best([(*keep_share(lm, wide, share, s), s) for s in EMLoCConfig().reconstruction_shares])

    def prefill_signal(which: int):  # the reconstruction family replaced by a prefill's attention
        if "prefill" not in reuse:
            reuse["prefill"] = prefill_attention(lm, ranked, ids)
        swapped = dataclasses.replace(ranked, reconstruction=reuse["prefill"][which])
        return best([(*keep_share(lm, swapped, share, s), s) for s in EMLoCConfig().reconstruction_shares])

    def gqa_mean():
        if "gqa-mean" not in reuse:
            reuse["gqa-mean"] = gqa_mean_ranking(lm, skill, EMLoCConfig(compression="context"), ranked.full)
        return best([keep(s, on=reuse["gqa-mean"]) for s in EMLoCConfig().reconstruction_shares])

    def best(runs):
        return min(runs, key=lambda run: run[1])

    engine = BASE_SPLITS
    tried = {split: keep(split) for split in sorted(set(engine) | set(splits))}
    made = {
        "default": lambda: best([tried[s] for s in engine]),
        "wider-splits": lambda: best(list(tried.values())),
        "layer-uniform": lambda: best([keep(s, layer_budgets=False) for s in engine]),
        "answers-kept": lambda: best([keep(s, protect=answer_positions(ranked)) for s in engine]),
        "merge-values": lambda: merged(best(list(tried.values()))[2]),
        "merge-chosen": lambda: best([merged(s) for s in tried if s in EMLoCConfig().reconstruction_shares]),
        "value-norm": lambda: value_weighted(EMLoCConfig().reconstruction_shares),
        "every-row": every_row,
        "layer-cap": lambda: best([keep(s, cap=True) for s in EMLoCConfig().reconstruction_shares]),
        "merge-layer-cap": lambda: best([keep(s, cap=True, merge=True) for s in EMLoCConfig().reconstruction_shares]),
        "gqa-mean": gqa_mean,
        "prefill-attention": lambda: prefill_signal(0),
        "prefill-cross": lambda: prefill_signal(1),
        "merge-mass-capped": lambda: mass(best(list(tried.values()))[2]),
        "merge-capped-chosen": lambda: best([mass(s) for s in tried if s in EMLoCConfig().reconstruction_shares]),
        "merge-local-chosen": lambda: best([local(s) for s in tried if s in EMLoCConfig().reconstruction_shares]),
    }
    out = {name: made[name]() for name in which if name != "each-split"}
    if "each-split" in which:
        out.update({f"split={s:g}": run for s, run in tried.items()})
    return out


def main() -> None:
    ap = parser(__doc__, shares="0.2")
    ap.add_argument("--splits", default="0.3,1.0", help="the extra splits of wider-splits")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which variants (comma-separated)")
    ap.add_argument("--table", type=Path, help="print the tables of a results file and stop")
    args = ap.parse_args()
    if args.table:
        table(args.table, by="variant")
        return
    lm = model_for(ap, args)
    config = EMLoCConfig(compression="context")
    for case in cases(lm, args):
        skill = case.skill
        unpruned = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
        ranked = rank_context(lm, skill, config, unpruned)
        reuse: dict = {}
        ids = lm.renderer(config.prompt_format).render(skill.instruction, skill.demonstrations).ids
        for share in (float(s) for s in args.shares.split(",")):
            seen: dict[str, list] = {}
            for name, (memory, js, split) in variants(lm, ranked, share, [float(s) for s in args.splits.split(",")],
                                                    tuple(args.variants.split(",")), ids, skill, reuse).items():
                key = fingerprint(memory)
                if key not in seen:  # a variant that kept the same memory as another is not re-scored
                    seen[key] = case.predict(memory.to(dtype=getattr(torch, config.storage_dtype)))
                emit(args.out, case.row(seen[key], variant=name, share=share,
                                        kept_ratio=memory.kept_ratio, js=js, reconstruction_share=split))


if __name__ == "__main__":
    main()
