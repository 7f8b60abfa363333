"""What the check could read, side by side: per keep share, split and merge setting, three statistics of
the validation demonstrations' held-out answers on the memory against the full context, and the
agreement with full ICL of every memory some statistic would choose.

- ``js``: the engine's, mean Jensen-Shannon over every answer row, the whole vocabulary;
- ``js_first``: the same at the row predicting the answer's first token only (where a label is chosen);
- ``js_label``: at that row, the distribution over the skill's labels' first tokens, renormalised: the
  answer the task is scored on, blind to the rest of the vocabulary;
- ``label_flips``: validation demonstrations whose most likely label first token differs.

Per merge setting, a statistic chooses at each share the split where it is lowest; which share the
check keeps follows offline from a bound (``--table``). Appends one JSON line per (task, seed, share,
split, merge) to ``--out``; rows of chosen memories carry accuracy and agreement.

    python scripts/context_checks.py --model smollm2-135m --task sst2 --seeds 0,1,2 --shares 0.1,0.2 \\
        --out results/context-checks.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _experiment import cases, emit, model_for, parser

from emloc_agents import EMLoCConfig, compress
from emloc_agents.bench.metrics import wilson_ci
from emloc_agents.engine.context import RankedContext, held_out_answers, rank_context, share_memory
from emloc_agents.engine.replay import js_divergence

STATS = ("js", "js_first", "js_label")


def label_tokens(lm, config: EMLoCConfig, skill) -> torch.Tensor:
    """The distinct first tokens of the skill's labels as read after a demonstration's input."""
    if not skill.labels:
        raise SystemExit(f"skill {skill.name!r} has no labels: the label-set JS needs them")
    renderer = lm.renderer(config.prompt_format)
    query = skill.demonstrations[0].input
    return torch.tensor(sorted({renderer.label_ids(query, label)[0] for label in skill.labels}))


def statistics(lm, ranked: RankedContext, memory, labels: torch.Tensor) -> dict[str, float]:
    """The check's candidate statistics of ``memory`` on the validation demonstrations."""
    checked = ranked.checked
    got = held_out_answers(lm, memory, ranked.demos, ranked.spans, checked, score=False, keep_log_probs=set(checked))
    rows, first, label, flips = [], [], [], 0
    for j in checked:
        ref, new = ranked.reference[j], got.log_probs[j]
        rows.append(js_divergence(ref, new))
        first.append(float(js_divergence(ref[:1], new[:1])))
        ref_l, new_l = (torch.log_softmax(x[0, labels.to(x.device)], -1) for x in (ref, new))
        label.append(float(js_divergence(ref_l[None], new_l[None])))
        flips += int(ref_l.argmax() != new_l.argmax())
    return {"js": float(torch.cat(rows).mean()), "js_first": sum(first) / len(first),
            "js_label": sum(label) / len(label), "label_flips": flips}


def main() -> None:
    ap = parser(__doc__, shares="0.1,0.2")
    ap.add_argument("--merge", default="0,1", help="merge settings to try (0: off, 1: merge_evicted)")
    ap.add_argument("--table", type=Path, help="print what each statistic and bound would keep, and stop")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    lm = model_for(ap, args)
    config = EMLoCConfig(compression="context")
    merges = [bool(int(m)) for m in args.merge.split(",")]
    for case in cases(lm, args):
        unpruned = compress(lm, case.skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
        ranked = rank_context(lm, case.skill, config, unpruned)
        labels = label_tokens(lm, config, case.skill)
        for share in (float(s) for s in args.shares.split(",")):
            found = []
            for merge in merges:
                for split in config.reconstruction_shares:
                    memory = share_memory(lm, ranked, share, split, merge)
                    found.append((merge, split, memory, statistics(lm, ranked, memory, labels)))
            chosen = {min((f for f in found if f[0] == merge), key=lambda f: f[3][stat])[:2]
                      for stat in STATS for merge in merges}
            for merge, split, memory, stats in found:
                fields = dict(share=share, reconstruction_share=split, merged=merge, kept_ratio=memory.kept_ratio,
                              **stats)
                if (merge, split) in chosen:
                    emit(args.out, case.row(case.predict(memory.to(dtype=getattr(torch, config.storage_dtype))),
                                            **fields))
                else:
                    emit(args.out, {**case.fields(), **fields})


def table(path: Path, delta: float = EMLoCConfig().delta) -> None:
    """Per model, task, merge setting and statistic: the split each seed's statistic chooses at each
    share, its value and agreement; then the smallest share where it is within ``delta`` ("above": none
    of the shares tried)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for model, task in sorted({(r["model"], r["task"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["task"]) == (model, task)]
        seeds = sorted({r["seed"] for r in sel})
        print(f"\n**{model}, {task}, seeds {', '.join(map(str, seeds))}**\n")
        print("| merge | statistic | share | per seed: split, value, agreement (accuracy) | pooled agreement [95 %] |")
        print("|---|---|---|---|---|")
        for merge in sorted({r["merged"] for r in sel}):
            for stat in STATS:
                for share in sorted({r["share"] for r in sel}):
                    cells, k, n = [], 0, 0
                    for seed in seeds:
                        got = [r for r in sel if (r["seed"], r["share"], r["merged"]) == (seed, share, merge)]
                        if len(got) < len(EMLoCConfig().reconstruction_shares):
                            continue  # a case still running
                        best = min(got, key=lambda r: r[stat])
                        cells.append(f"{best['reconstruction_share']:g}, {best[stat]:.4f}, "
                                     f"{best['agreement']:.3f} ({best['accuracy']:.3f})")
                        k += round(best["agreement"] * best["n"])
                        n += best["n"]
                    if not n:
                        continue
                    lo, hi = wilson_ci(k, n)
                    print(f"| {int(merge)} | {stat} | {share:g} | {' / '.join(cells)} | {k / n:.3f} [{lo:.2f}, {hi:.2f}] |")
        full = {r["seed"]: round(r["full_icl_accuracy"], 3) for r in sel if "full_icl_accuracy" in r}
        print(f"\nfull ICL accuracy per seed: {full}")
        for merge in sorted({r["merged"] for r in sel}):
            for stat in STATS:
                kept = []
                for seed in seeds:
                    lowest = [min((r for r in sel if (r["seed"], r["share"], r["merged"]) == (seed, share, merge)),
                                  key=lambda r: r[stat], default=None) for share in sorted({r["share"] for r in sel})]
                    passed = [r for r in lowest if r is not None and r[stat] <= delta]
                    kept.append(f"{passed[0]['share']:g}" if passed else "above")
                print(f"- merge {int(merge)}, {stat} <= {delta:g}: keeps {' / '.join(kept)}")


if __name__ == "__main__":
    main()
