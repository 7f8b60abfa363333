"""The fitted memory (engine/fit.py) beside the unfitted whole-context memory at one share, over the same
ranking: per variant the validation JS (what the engine's check reads), accuracy and agreement with full
ICL. Each variant tries every split of ``EMLoCConfig().reconstruction_shares`` and keeps the one with
the lowest validation JS, as the engine does.

- ``context``: the kept tokens as they are (``compression="context"``'s memory);
- ``fitted``: biases and values fitted on both query sets (``compression="fitted"``'s memory);
- ``fitted-held-out`` / ``fitted-reconstruction``: fitted on one query set only;
- ``fitted-bias``: the biases fitted, the values left as the model made them;
- ``fitted-ridge``: the value fit's ridge at 0.1 (against 1e-3);
- ``fitted-joint``: the values fitted on the attention numerator, memory and new tokens together
  (``FitOptions(value_target="joint")``), against the memory's own normalised output;
- ``fitted-own-visible``: a held-out row matched over the whole context, its own demonstration included
  (``FitOptions(hide_own=False)``; the fit before 2026-12-08 02:17, which docs/bench/fit/qwen-trec.jsonl
  measured).

Appends one JSON line per (task, seed, share, variant) to ``--out``. With ``--js-only``, no predictions
(no full ICL either): one line per (task, seed, share, variant) with every split's validation JS and
the fit's seconds, what the engine's check and its cost read.

    python scripts/fit_variants.py --model qwen2.5-coder-0.5b --task trec --seeds 0,1,2 --shares 0.1,0.2 \\
        --out docs/bench/fit/qwen-trec.jsonl
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from _experiment import cases, emit, model_for, parser, table

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.context import best_split, rank_context
from emloc_agents.engine.fit import FitOptions, QueryBank, fit_memory, reference_queries, references

VARIANTS = {
    "fitted": FitOptions(),
    "fitted-held-out": FitOptions(queries="held-out"),
    "fitted-reconstruction": FitOptions(queries="reconstruction"),
    "fitted-bias": FitOptions(fit_values=False),
    "fitted-ridge": FitOptions(ridge=0.1),
    "fitted-own-visible": FitOptions(hide_own=False),
    "fitted-joint": FitOptions(value_target="joint"),
}


def main() -> None:
    ap = parser(__doc__, shares="0.1,0.2")
    ap.add_argument("--variants", default="context," + ",".join(VARIANTS), help="which variants (comma-separated)")
    ap.add_argument("--table", type=Path, help="print the tables of a results file and stop")
    ap.add_argument("--js-only", action="store_true", help="validation JS and fit seconds per split, no predictions")
    args = ap.parse_args()
    if args.table:
        table(args.table, by="variant")
        return
    lm = model_for(ap, args)
    config = EMLoCConfig(compression="fitted")
    which = args.variants.split(",")
    most = FitOptions().max_queries
    for case in cases(lm, args, full_icl=not args.js_only):
        full = compress(lm, case.skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
        recon = QueryBank(max(1, math.ceil(full.original_length / most)))
        held = QueryBank()
        ranked = rank_context(lm, case.skill, config, full, reconstruction_queries=recon, held_out_queries=held)
        banks = {"both": (recon, held), "reconstruction": (recon,), "held-out": (held,)}
        refs = {(name, hide): references(lm, full, reference_queries(lm, *got, most=most), hide)
                for name, got in banks.items() for hide in (True, False)
                if any((VARIANTS[v].queries, VARIANTS[v].hide_own) == (name, hide) for v in which if v in VARIANTS)}
        for share in (float(s) for s in args.shares.split(",")):
            for name in which:
                shape = None
                fit_s = [0.0]
                if name != "context":
                    opts = VARIANTS[name]

                    def shape(memory, opts=opts, ranked=ranked, refs=refs, fit_s=fit_s):
                        t = time.perf_counter()
                        fitted = fit_memory(ranked.full, memory, refs[opts.queries, opts.hide_own], opts)
                        fit_s[0] += time.perf_counter() - t
                        return fitted

                memory, js, split, tried = best_split(lm, ranked, share, config.reconstruction_shares, shape=shape)
                if args.js_only:
                    emit(args.out, {**case.fields(), "variant": name, "share": share, "js": js,
                                    "reconstruction_share": split, "fit_s": fit_s[0],
                                    "splits": {t["reconstruction_share"]: t["js"] for t in tried}})
                    continue
                preds = case.predict(memory.to(dtype=getattr(torch, config.storage_dtype)))
                emit(args.out, case.row(preds, variant=name, share=share, kept_ratio=memory.kept_ratio, js=js,
                                        reconstruction_share=split))


if __name__ == "__main__":
    main()
