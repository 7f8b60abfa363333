"""Markdown tables over demonstration seeds from one or more bench runs' ``summary.json``.

Per task and method: the mean kept share, accuracy and agreement with full ICL over seeds, each with
a 95 % Wilson interval on the items pooled over seeds (n = seeds x items), and the per-seed values,
so a reader sees both the interval and how much the demonstration sample moves the number.

    python -m emloc_agents.bench.tables docs/bench/smollm2-128shot [more run folders]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from statistics import mean

from .metrics import wilson_ci


def _pooled(rows: Sequence[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "–"
    n = sum(r["n"] for r in rows if r.get(key) is not None)
    k = round(sum(v * r["n"] for v, r in zip(vals, (r for r in rows if r.get(key) is not None), strict=True)))
    lo, hi = wilson_ci(k, n) or (0.0, 0.0)
    seeds = " / ".join(f"{v:.2f}" for v in vals)
    return f"{k / n:.3f} [{lo:.2f}, {hi:.2f}] ({seeds})"


def seed_table(rows: Sequence[dict]) -> str:
    """One markdown table per (model, task, shots): a line per method, in run order."""
    out: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["shots"]), []).append(r)
    for (model, task, shots), group in groups.items():
        seeds = sorted({r["seed"] for r in group})
        n = sorted({r["n"] for r in group})
        out.append(f"**{model}, {task}, {shots} shots, seeds {', '.join(map(str, seeds))}, "
                   f"n = {'/'.join(map(str, n))} per seed**\n")
        out.append("| method | kept | accuracy [95 %] (per seed) | agreement with full ICL [95 %] (per seed) |")
        out.append("|---|---|---|---|")
        methods: dict[tuple, list[dict]] = {}
        for r in group:
            methods.setdefault((r["method"], r.get("press_ratio") if r.get("ratio_source") == "--ratio" else None),
                               []).append(r)
        for (method, ratio), rs in methods.items():
            kept = [r["kept_ratio"] for r in rs if r.get("kept_ratio") is not None]
            name = method if ratio is None else f"{method} @ {ratio:g}"
            out.append(f"| {name} | {mean(kept):.3f} | {_pooled(rs, 'accuracy')} | {_pooled(rs, 'agreement')} |"
                       if kept else f"| {name} | – | {_pooled(rs, 'accuracy')} | {_pooled(rs, 'agreement')} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench output folders (each with summary.json)")
    args = ap.parse_args(argv)
    rows = [r for run in args.runs for r in json.loads((run / "summary.json").read_text())]
    print(seed_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
