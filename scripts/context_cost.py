"""What a whole-context compression (by default ``compression="auto"``: the whole-context ranking for
text; ``--compression fitted``: the fitted memory, its fit timed apart) costs,
stage by stage, against one plain prefill of the same demonstrations (a transformers forward of the
whole text) and against the chunk-wise loop, in one process so the three share the machine's load.

    python scripts/context_cost.py --model smollm2-135m --task trec --task agnews --shots 128 \\
        --out results/context-cost.json

``--fit-options '{"first_split": true}'`` times the fitted method with other ``FitOptions`` (registered
as ``fitted-options``); ``--keep-ratios 0.1,0.2,0.3,0.5`` with other shares to try.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.bench.scaling import demo_ids, full_prefill
from emloc_agents.engine.compress import register_method
from emloc_agents.engine.fit import FitOptions, Fitted
from emloc_agents.tasks import Task

STAGES = ("prefill_s", "reconstruct_s", "held_out_s", "check_s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", action="append", required=True)
    ap.add_argument("--shots", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-chunks", action="store_true", help="leave the chunk-wise loop out")
    ap.add_argument("--compression", default="auto", help="the whole-context method timed (auto, context, fitted)")
    ap.add_argument("--fit-options", type=json.loads, help="FitOptions of the fitted method, as JSON")
    ap.add_argument("--keep-ratios", help="the keep ratios tried, comma-separated (default: EMLoCConfig's)")
    args = ap.parse_args()
    if args.fit_options is not None:
        register_method("fitted-options", Fitted(FitOptions(**args.fit_options)))
        args.compression = "fitted-options"
    extra = {"keep_ratios": tuple(float(r) for r in args.keep_ratios.split(","))} if args.keep_ratios else {}
    lm = load_model(args.model)
    rows = []
    for name in args.task:
        skill = Task.load(name).skill(args.shots, args.seed)
        ids = demo_ids(lm, skill)
        full_prefill(lm, ids[:256])  # warm-up
        prefill = min(full_prefill(lm, ids) for _ in range(2))
        t0 = time.perf_counter()
        mem = compress(lm, skill, EMLoCConfig(compression=args.compression, **extra))
        context_s = time.perf_counter() - t0
        chunks, chunks_s = None, float("nan")
        if not args.no_chunks:
            t0 = time.perf_counter()
            chunks = compress(lm, skill, EMLoCConfig(compression="chunks"))
            chunks_s = time.perf_counter() - t0
        row = {"model": lm.name, "task": name, "compression": args.compression, "fit_options": args.fit_options,
               "keep_ratios": list(EMLoCConfig(**extra).keep_ratios), "shots": args.shots, "tokens": len(ids), "prefill_s": prefill,
               "context_s": context_s, "context_over_prefill": context_s / prefill, "kept_ratio": mem.kept_ratio,
               "trials": mem.stats["trials"], **{f"context_{k}": mem.stats[k] for k in STAGES},
               **{f"context_{k.removesuffix('_s')}_over_prefill": mem.stats[k] / prefill for k in STAGES},
               "fit_s": mem.stats.get("fit_s"), "fit_over_prefill": mem.stats.get("fit_s", float("nan")) / prefill,
               "chunks_s": chunks_s, "chunks_over_prefill": chunks_s / prefill, "chunks_kept_ratio": chunks.kept_ratio if chunks else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
