"""compression='context' at several shares, side by side with KVzip over the whole context and with
fewer whole demonstrations: per share the mean JS of the held-out answers (what the search reads),
accuracy, and agreement with full ICL.

``context`` is what the engine keeps at that share: the reconstruction share (``reconstruction_shares``)
whose held-out answers move least; ``--each-split`` adds every share it tried. The experiment behind
that mode's ``delta``, candidate shares and splits (docs/benchmarks.md, "What the default keeps").
Appends one JSON line per (task, seed, method, share) to ``--out``.

    python scripts/context_shares.py --model smollm2-135m --task trec --seeds 0,1,2 --limit 300 \\
        --shares 0.1,0.2 --kvzip --fewer-shots --out results/context-shares.jsonl
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _experiment import cases, emit, model_for, parser, table

from emloc_agents import EMLoCConfig, compress
from emloc_agents.bench.methods import fewer_shots
from emloc_agents.engine.context import keep_share, rank_context
from emloc_agents.engine.reconstruct import kvzip_memory


def kept_of_full(memory, full) -> float:
    """Kept share of the full context's demonstration tokens (fewer-shots memories hold fewer to begin with)."""
    return memory.kept_ratio * memory.original_length / full.original_length


def main() -> None:
    ap = parser(__doc__, shares="0.1,0.2")
    ap.add_argument("--table", type=Path, help="print the tables of a results file and stop")
    ap.add_argument("--each-split", action="store_true",
                    help="also every reconstruction share the engine tries, as methods context@SHARE")
    ap.add_argument("--kvzip", action="store_true", help="also KVzip over the whole context at each share")
    ap.add_argument("--fewer-shots", action="store_true",
                    help="also the first whole demonstrations that fit each share, uncompressed")
    ap.add_argument("--fewer-shots-only", action="store_true", help="only full ICL and fewer-shots (no ranking)")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    shares = [float(s) for s in args.shares.split(",")]
    lm = model_for(ap, args)
    config = EMLoCConfig(compression="context")
    for case in cases(lm, args):
        skill = case.skill
        t0 = time.perf_counter()
        unpruned = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
        ranked = None if args.fewer_shots_only else rank_context(lm, skill, config, unpruned)
        rank_s = time.perf_counter() - t0
        for share in shares:
            runs = []
            if ranked is not None:
                # the engine's choice at this share: the split whose held-out answers move least
                tried = {split: keep_share(lm, ranked, share, split) for split in config.reconstruction_shares}
                chosen = min(tried, key=lambda split: tried[split][1])
                runs.append(("context", *tried[chosen], chosen))
            if ranked is not None and args.each_split:
                runs += [(f"context@{split:g}", *tried[split], split) for split in tried]
            if ranked is not None and args.kvzip:
                # = kvzip_whole(lm, skill, share), reusing the ranking's reconstruction scores
                runs.append(("kvzip-whole", kvzip_memory(lm, ranked.full, ranked.reconstruction, share,
                                                         layer_budgets=True, head_budgets=True), None, None))
            if args.fewer_shots or args.fewer_shots_only:
                runs.append(("fewer-shots", compress(lm, fewer_shots(lm, skill, share),
                                                     EMLoCConfig(keep_ratios=(1.0,))), None, None))
            for method, memory, js, split in runs:
                preds = case.predict(memory.to(dtype=getattr(torch, config.storage_dtype)))
                emit(args.out, case.row(preds, method=method, share=share,
                                        kept_ratio=kept_of_full(memory, unpruned), js=js,
                                        reconstruction_share=split,
                                        rank_s=rank_s if method.startswith("context") else None))


if __name__ == "__main__":
    main()
