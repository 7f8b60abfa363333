"""EMLoC search variants side by side: kept share, accuracy and agreement with full ICL per config.

The experiment behind the search's defaults (docs/design.md, "Variants measured and dropped"). Each variant is
an ``EMLoCConfig`` built from overrides; full ICL (the unpruned memory, exact by test) is scored once
per task and seed and every variant's label predictions are compared with it on the same items.
Appends one JSON line per (task, seed, variant) to ``--out`` so an interrupted run keeps its rows.

    python scripts/search_variants.py --model smollm2-135m --task trec --seeds 0 --limit 300 \
        --variant default='{}' --variant kernel15='{"pool_kernel": 15}' --out results/variants.jsonl
"""

from __future__ import annotations

import json
import time

from _experiment import cases, emit, parser

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.bench.presses import KVzipPress
from emloc_agents.engine.reconstruct import kvzip_memory, whole_context_scores


def _whole_context_kvzip(lm, skill, ratio: float, layer_budgets: bool = True, span: int = 2048,
                        head_budgets: bool = False):
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    renderer = lm.renderer("auto")
    rendered = renderer.render(skill.instruction, skill.demonstrations)
    ids = rendered.ids
    scores = whole_context_scores(lm, full, ids, span=span, encode=renderer.ids)
    return kvzip_memory(lm, full, scores, ratio, layer_budgets, head_budgets)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--variant", action="append", required=True, help="name=JSON overrides of EMLoCConfig")
    args = ap.parse_args()
    if not args.task or not args.out:
        ap.error("--task and --out are required")
    variants: dict[str, tuple[EMLoCConfig, KVzipPress | None, dict | None]] = {}
    for v in args.variant:
        name, _, overrides = v.partition("=")
        fields = json.loads(overrides or "{}")
        kvzip = fields.pop("kvzip", None)  # {"ratio": r, "layer_budgets": bool}: the KVzip press instead
        whole = fields.pop("kvzip_whole", None)  # {"ratio": r, ...}: KVzip on the whole unpruned context
        variants[name] = (EMLoCConfig(**fields), None if kvzip is None else KVzipPress(**kvzip), whole)
    lm = load_model(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases(lm, args):
        skill = case.skill
        for name, (config, press, whole) in variants.items():
            t0 = time.perf_counter()
            if whole is not None:
                mem = _whole_context_kvzip(lm, skill, **whole)
            else:
                mem = compress(lm, skill, config, press=press)
            compress_s = time.perf_counter() - t0
            emit(args.out, case.row(
                case.predict(mem), variant=name,
                overrides=json.loads(config.model_dump_json(exclude_defaults=True)),
                press={"name": "kvzip-whole", **whole} if whole is not None
                else None if press is None else {"name": press.name, **vars(press)},
                kept_ratio=mem.kept_ratio, compress_s=compress_s,
            ))


if __name__ == "__main__":
    main()
