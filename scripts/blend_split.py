"""How ``compression="context"`` should split its budget between its two signals: accuracy and agreement
with full ICL when reconstruction gets a share ``rho`` of the kept slots and the held-out answers the
rest (``rho`` = 0.5 is the plain max of ranks the engine ships; 1.0 is reconstruction alone, KVzip).

A token is kept when its top-fraction under reconstruction is within ``rho * s`` or under held-out
answers within ``(1 - rho) * s`` (for a threshold ``s`` that fills the share): the blend score is
``max(1 - t_rec / rho, 1 - t_held / (1 - rho))`` with ``t = 1 - rank``. Both signals are scored once
per task and seed; every (share, rho) reuses them. Each cell also records the mean JS of the held-out
answers of the 16 demonstrations the engine's check replays (``--validate``: left out of the scoring,
so the check reads demonstrations the ranking never saw). Appends one JSON line per cell to ``--out``.

    python scripts/blend_split.py --model smollm2-135m --task trec --seeds 0 --shares 0.1,0.2 \\
        --rhos 0.5,0.7,0.85 --out results/blend-split.jsonl
"""

from __future__ import annotations

import time

import torch
from _experiment import cases, emit, parser

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.engine.context import CHECK_PROBES, SINKS, demo_spans, held_out_answers, rank_blend
from emloc_agents.engine.reconstruct import kvzip_memory, whole_context_scores
from emloc_agents.engine.replay import js_divergence


def split_blend(rec: list[torch.Tensor], held: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """Per layer (kv_heads, T): the blend giving reconstruction a share ``rho`` of the kept slots."""
    t_rec = [1 - r for r in rank_blend(rec)]
    t_held = [1 - r for r in rank_blend(held)]
    if rho >= 1.0:
        return [-t for t in t_rec]
    return [torch.maximum(1 - a / rho, 1 - b / (1 - rho)) for a, b in zip(t_rec, t_held, strict=True)]


def main() -> None:
    ap = parser(__doc__, shares="0.1,0.2")
    ap.add_argument("--rhos", default="0.5,0.7,0.85,1.0")
    ap.add_argument("--validate", action="store_true",
                    help="leave the JS check's demonstrations out of the held-out scoring")
    args = ap.parse_args()
    if not args.task or not args.out:
        ap.error("--task and --out are required")
    lm = load_model(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases(lm, args):
        skill = case.skill
        t0 = time.perf_counter()
        full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
        renderer = lm.renderer("auto")
        rendered = renderer.render(skill.instruction, skill.demonstrations)
        rec = whole_context_scores(lm, full, rendered.ids, sinks=SINKS, encode=renderer.ids)
        spans = demo_spans(rendered.prefix, rendered.demos)
        n = len(spans)
        checked = sorted({round(i * (n - 1) / max(1, CHECK_PROBES - 1)) for i in range(min(n, CHECK_PROBES))})
        # --validate: the checked demonstrations are a validation set, left out of the scoring
        scoring = [j for j in range(n) if not (args.validate and j in checked)]
        probes = held_out_answers(lm, full, rendered.demos, spans, scoring, score=True, keep_log_probs=set(checked))
        held = probes.scores
        assert held is not None
        reference = held_out_answers(lm, full, rendered.demos, spans, checked, score=False,
                                     keep_log_probs=set(checked)).log_probs
        rank_s = time.perf_counter() - t0
        protected = min(full.original_length, max(SINKS, len(rendered.prefix)))
        for rho in (float(r) for r in args.rhos.split(",")):
            scores = split_blend(rec, held, rho)
            for s in scores:
                s[:, :protected] = float("inf")
            for share in (float(s) for s in args.shares.split(",")):
                memory = kvzip_memory(lm, full, scores, share, layer_budgets=True, head_budgets=True)
                got = held_out_answers(lm, memory, rendered.demos, spans, checked, score=False,
                                       keep_log_probs=set(checked)).log_probs
                js = float(torch.cat([js_divergence(reference[j], got[j]) for j in checked]).mean())
                preds = case.predict(memory.to(dtype=getattr(torch, EMLoCConfig().storage_dtype)))
                emit(args.out, case.row(preds, rho=rho, share=share, validate=args.validate, js=js,
                                        kept_ratio=memory.kept_ratio, rank_s=rank_s))


if __name__ == "__main__":
    main()
