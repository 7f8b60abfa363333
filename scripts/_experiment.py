"""What the fidelity scripts share: their common arguments, the loop over tasks and demonstration seeds
with full ICL's predictions, and one JSON line per result."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.bench.metrics import fidelity, wilson_ci
from emloc_agents.bench.run import memory_labels
from emloc_agents.skills import Skill
from emloc_agents.tasks import Example, Task


def parser(doc: str | None, shares: str | None = None) -> argparse.ArgumentParser:
    """--model, --task (repeatable), --shots, --seeds, --limit, --out (and --shares when given a default)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", action="append")
    ap.add_argument("--shots", type=int, default=128)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--limit", type=int, default=300)
    if shares is not None:
        ap.add_argument("--shares", default=shares)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dtype", default="auto", help="the model's dtype (load_model's: auto, float32, bfloat16)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return ap


def model_for(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """A run's model, once ``--task`` and ``--out`` are checked, torch's threads set and ``--out``'s
    folder made."""
    if not args.task or not args.out:
        ap.error("--task and --out are required (or --table FILE)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return load_model(args.model, dtype=args.dtype)


@dataclass
class Case:
    """One task and demonstration seed: the skill, the first ``--limit`` test items, and full ICL's
    predictions on them (what agreement is measured against; None where none were made)."""

    lm: Any
    model: str
    task_name: str
    task: Task
    items: list[Example]
    shots: int
    seed: int
    skill: Skill
    full: list[str | None] | None

    def predict(self, memory: Any) -> list[str | None]:
        """The label each item gets on ``memory``."""
        return memory_labels(self.lm, self.task, memory, self.items)

    def fields(self) -> dict[str, Any]:
        """What names the case in a result line."""
        return {"model": self.model, "task": self.task_name, "shots": self.shots, "seed": self.seed,
                "n": len(self.items)}

    def row(self, preds: list[str | None], **fields: Any) -> dict[str, Any]:
        """One result: the case, ``fields``, and the predictions' accuracy and agreement with full ICL."""
        assert self.full is not None, "a case made without full ICL's predictions has no agreement"
        flips = Counter(f"{a}->{b}" for a, b in zip(self.full, preds, strict=True) if a != b)  # full ICL's -> the memory's
        return {**self.fields(), **fields, **fidelity(preds, [ex.label for ex in self.items], self.full),
                "flips": dict(flips.most_common())}


def cases(lm: Any, args: argparse.Namespace, full_icl: bool = True) -> Iterator[Case]:
    """Every ``--task`` × ``--seeds`` case of ``args``, full ICL's predictions made first (unless not
    ``full_icl``: for runs that read no predictions)."""
    for task_name in args.task:
        task = Task.load(task_name)
        items = task.test[: args.limit]
        for seed in (int(s) for s in args.seeds.split(",")):
            skill = task.skill(shots=args.shots, seed=seed)
            full = memory_labels(lm, task, compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,))), items) \
                if full_icl else None
            yield Case(lm, args.model, task_name, task, items, args.shots, seed, skill, full)


def emit(path: Path, row: dict) -> None:
    """Print ``row`` and append it to ``path`` as one JSON line."""
    print(json.dumps(row), flush=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def table(path: Path, by: str = "method") -> None:
    """Markdown tables of a results file: per task, method (or ``by``: another field) and share, accuracy and agreement pooled over
    seeds with 95 % Wilson intervals (per-seed values in brackets)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for model, task in sorted({(r["model"], r["task"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["task"]) == (model, task)]
        seeds = sorted({r["seed"] for r in sel})
        full = {r["seed"]: r["full_icl_accuracy"] for r in sel}
        print(f"\n**{model}, {task}, seeds {', '.join(map(str, seeds))}, n = {sel[0]['n']} per seed** "
              f"(full ICL accuracy {sum(full.values()) / len(full):.3f}: {' / '.join(f'{full[s]:.2f}' for s in seeds)})\n")
        print(f"| {by} | share | held-out JS | accuracy [95 %] (per seed) | agreement [95 %] (per seed) |")
        print("|---|---|---|---|---|")
        for share in sorted({r["share"] for r in sel}):
            methods = sorted({r[by] for r in sel}, key=lambda m: (not m.startswith("context"), m))
            for method in methods:
                got = sorted((r for r in sel if r["share"] == share and r[by] == method), key=lambda r: r["seed"])
                if not got:
                    continue
                n = sum(r["n"] for r in got)
                cells = []
                for key in ("accuracy", "agreement"):
                    k = round(sum(r[key] * r["n"] for r in got))
                    lo, hi = wilson_ci(k, n)
                    cells.append(f"{k / n:.3f} [{lo:.2f}, {hi:.2f}] ({' / '.join(f'{r[key]:.2f}' for r in got)})")
                js = " / ".join(f"{r['js']:.4f}" for r in got) if got[0]["js"] is not None else "–"
                print(f"| {method} | {share:.2f} | {js} | {cells[0]} | {cells[1]} |")
