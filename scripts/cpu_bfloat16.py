"""bfloat16 on the CPU: what it does to the answers and to the time, against float32, in one process.

CPUs with native bfloat16 (AVX512-BF16, AMX) run bfloat16 matrix products faster and read half the
weight bytes per decoded token. Per task and demonstration seed, on the first ``--limit`` test items:
full ICL in float32 (the reference), full ICL in bfloat16, and the default memory (``EMLoCConfig()``)
made and answered in bfloat16, and in float32 unless ``--no-float32-memory``. Agreement is with float32
full ICL; the compression and one plain prefill are timed in both dtypes. One JSON line per case.

    python scripts/cpu_bfloat16.py --model smollm2-135m --task sst2 --task trec --seeds 0,1,2 \\
        --out results/cpu-bf16.jsonl
"""

from __future__ import annotations

import time

from _experiment import emit, parser

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.bench.metrics import fidelity
from emloc_agents.bench.run import machine_info, memory_labels
from emloc_agents.bench.scaling import demo_ids, full_prefill
from emloc_agents.tasks import Task


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--no-float32-memory", action="store_true", help="skip compressing in float32")
    args = ap.parse_args()
    if not args.task or not args.out:
        ap.error("--task and --out are required")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = {dt: load_model(args.model, dtype=dt, device="cpu") for dt in ("float32", "bfloat16")}
    for task_name in args.task:
        task = Task.load(task_name)
        items = task.test[: args.limit]
        gold = [ex.label for ex in items]
        for seed in (int(s) for s in args.seeds.split(",")):
            skill = task.skill(shots=args.shots, seed=seed)
            row: dict = {"model": args.model, "task": task_name, "shots": args.shots, "seed": seed, "n": len(items),
                         "machine": machine_info()}
            full_preds = {}
            for dt, lm in models.items():
                ids = demo_ids(lm, skill)
                full_prefill(lm, ids[:256])  # warm-up
                row[f"prefill_s_{dt}"] = min(full_prefill(lm, ids) for _ in range(2))
                full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,)))
                full_preds[dt] = memory_labels(lm, task, full, items)
            reference = full_preds["float32"]
            row["full_icl_bfloat16"] = fidelity(full_preds["bfloat16"], gold, reference)
            row["full_icl_float32_accuracy"] = fidelity(reference, gold, reference)["accuracy"]
            for dt, lm in models.items():
                if dt == "float32" and args.no_float32_memory:
                    continue
                t0 = time.perf_counter()
                memory = compress(lm, skill, EMLoCConfig())
                seconds = time.perf_counter() - t0
                preds = memory_labels(lm, task, memory, items)
                row[f"memory_{dt}"] = {
                    "compress_s": seconds, "compress_over_prefill": seconds / row[f"prefill_s_{dt}"],
                    "kept_ratio": memory.kept_ratio, "reconstruction_share": memory.stats.get("reconstruction_share"),
                    "trials": memory.stats.get("trials"), **fidelity(preds, gold, reference),
                    "agreement_with_own_full_icl": fidelity(preds, gold, full_preds[dt])["agreement"]}
            emit(args.out, row)


if __name__ == "__main__":
    main()
