"""run_bench: accuracy, fidelity and cost of each method on classification tasks.

For every task x shots x seed, the skill is ``Task.skill(shots, seed)``; each method is built once
(see ``methods.py``) and evaluated on the first ``limit`` test items in file order. Outputs in ``out``:

- ``items.jsonl``: one prediction per line (task, method, shots, seed, index, label, prediction, correct).
- ``summary.json`` / ``summary.csv``: one row per task/method/shots/seed (``SUMMARY_FIELDS``).
- ``config.json``: the arguments, the resolved model name and the machine.
- ``*.png``: plots (``plots.py``), when matplotlib is installed.

Measurement notes:
- ``ttft_s`` / ``decode_tokens_per_s``: greedy generation of ``TIMING_TOKENS`` tokens on the first
  ``timing_items`` items (after one warm-up call). For ``full-icl`` the whole prompt is prefilled
  per call, so its TTFT includes the demonstrations; memory methods prefill only the query.
- ``peak_rss_mb``: the process's peak resident set size (``ru_maxrss``) read after the method ran.
  It is monotone over the run (model weights + everything before), so only its growth from one
  row to the next says anything about a method; a clean per-method peak needs one process each.
- ``agreement``: share of items whose prediction equals full ICL's (``full-icl``, else
  ``full-icl-cached``: identical predictions, by test) for the same task/shots/seed
  (null when neither ran). ``zero-shot`` is evaluated once per task and reused across
  shots/seeds.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine import CompressedMemory, score_continuations
from ..tasks import Task, task_path
from .methods import EMLOC_METHODS, FIXED_RATIO_METHODS, Prepared, order_methods, prepare
from .metrics import accuracy, agreement, wilson_ci
from .plots import make_plots

SUMMARY_FIELDS = [
    "task", "model", "method", "shots", "seed", "scoring", "n", "accuracy", "accuracy_ci95",
    "kept_ratio", "original_tokens", "memory_tokens", "compress_s", "ttft_s", "decode_tokens_per_s",
    "peak_rss_mb", "disk_bytes", "agreement", "press_ratio", "ratio_source", "replay_forwards", "eval_s",
]
SCORINGS = ("loglik", "generate")
TIMING_TOKENS = 16


class BenchError(ValueError):
    """Bad benchmark input (missing task folder, unknown method, impossible shots ...)."""


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def machine_info() -> dict[str, Any]:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX512 with bf16: fast bfloat16 on the CPU
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # > cpu_count: timings contended
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def match_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a generation starts with (case-insensitive, longest label first), else None."""
    t = text.strip().lower()
    for label in sorted(labels, key=len, reverse=True):
        if t.startswith(label.strip().lower()):
            return label
    return None


def load_tasks(folders: Sequence[str | Path]) -> list[Task]:
    """Tasks by folder path or name (bundled, or in $EMLOC_DATA_DIR; see ``emloc_agents.tasks``)."""
    tasks = []
    for folder in folders:
        path = task_path(folder)  # UnknownTaskError (a SkillError) for an unknown name
        if not path.is_dir():
            raise BenchError(f"task folder not found: {path}")
        task = Task.load(path)  # SkillError (a ValueError) for a folder without task.json
        if not task.test:
            raise BenchError(f"task {task.name}: no test items in {path / 'test.jsonl'}")
        if len(task.labels) < 2:
            raise BenchError(f"task {task.name}: needs at least two labels")
        tasks.append(task)
    return tasks


def _predict(lm, task: Task, prep: Prepared, text: Any, scoring: str) -> tuple[str | None, Any]:
    query = task.format_input(text)
    ids = prep.query_ids(lm, query, task.instruction)
    label_ids = prep.label_ids(lm, query, task.instruction, task.labels)
    if scoring == "loglik":
        scores = score_continuations(lm, ids, label_ids, prep.memory)
        return task.labels[max(range(len(scores)), key=scores.__getitem__)], scores
    gen = lm.generate_ids(ids, prep.memory, max_new_tokens=max(len(x) for x in label_ids) + 2)
    return match_label(gen.text, task.labels), gen.text


def memory_labels(lm, task: Task, memory: CompressedMemory | None, items: Sequence[Any]) -> list[str | None]:
    """The label each item gets by label log-likelihood on ``memory`` (None: zero-shot): what the
    fidelity scripts compare between memories, item by item."""
    prep = Prepared("memory", memory=memory)
    return [_predict(lm, task, prep, ex.text, "loglik")[0] for ex in items]


def _timing(lm, task: Task, prep: Prepared, items: Sequence[Any]) -> tuple[float | None, float | None]:
    """Mean TTFT and decode tokens/s of greedy generation on ``items``."""
    ttfts, tokens, decode_s = [], 0, 0.0
    for ex in items:
        ids = prep.query_ids(lm, task.format_input(ex.text), task.instruction)
        g = lm.generate_ids(ids, prep.memory, max_new_tokens=TIMING_TOKENS)
        ttfts.append(g.ttft_s)
        tokens += len(g.token_ids) - (1 if g.finish_reason == "length" else 0)  # forwards after the first
        decode_s += g.decode_s
    ttft = sum(ttfts) / len(ttfts) if ttfts else None
    rate = tokens / decode_s if tokens > 0 and decode_s > 0 else None
    return ttft, rate


def _evaluate(lm, task: Task, prep: Prepared, items: Sequence[Any], scoring: str, desc: str, progress: bool):
    from tqdm.auto import tqdm

    preds, extras = [], []
    t0 = time.perf_counter()
    for ex in tqdm(items, desc=desc, disable=not progress, leave=False, file=sys.stderr):
        p, extra = _predict(lm, task, prep, ex.text, scoring)
        preds.append(p)
        extras.append(extra)
    return preds, extras, time.perf_counter() - t0


def write_summary(rows: list[dict], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    with (out / "summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else ("" if v is None else v) for k, v in r.items()})


def run_bench(
    tasks: Sequence[str | Path],
    model: Any = "default",
    methods: Sequence[str] = ("zero-shot", "full-icl", "emloc"),
    shots: Sequence[int] = (16,),
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    out: str | Path = "results/bench",
    ratio: float | Sequence[float] | None = None,
    scoring: str = "loglik",
    *,
    timing_items: int = 3,
    progress: bool = True,
    plots: bool = True,
    device: str = "auto",
) -> list[dict]:
    """Run the benchmark (see module docstring) and return the summary rows.

    ``model`` is a name for ``load_model`` (or a loaded ``LanguageModel``). ``ratio`` fixes the
    ratio of the fixed-ratio presses; several ratios run each of them once per ratio (a fidelity
    curve); None matches EMLoC's kept ratio when emloc ran (else 0.2).
    """
    ratios: list[float | None] = [None] if ratio is None else [ratio] if isinstance(ratio, int | float) else list(ratio)
    try:
        methods = order_methods(methods)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if not methods:
        raise BenchError("no methods given")
    if scoring not in SCORINGS:
        raise BenchError(f"unknown scoring {scoring!r}; choose loglik or generate")
    if not shots or any(s < 1 for s in shots):
        raise BenchError("shots must be positive integers")
    if not seeds:
        raise BenchError("no seeds given")
    if limit is not None and limit < 1:
        raise BenchError("limit must be a positive integer")
    if not ratios:
        raise BenchError("no ratio given")
    for r in ratios:
        if r is not None and not 0.0 < r <= 1.0:
            raise BenchError(f"ratio must lie in (0, 1], got {r}")
    tasks = [task_path(t) for t in tasks]  # names -> folders (recorded in config.json)
    loaded = load_tasks(tasks)
    for task in loaded:
        if max(shots) > len(task.pool):
            raise BenchError(f"task {task.name}: {max(shots)} shots asked, pool has {len(task.pool)}")

    from ..models.loader import load_model, resolve_device

    try:
        resolve_device(device)
    except ValueError as e:
        raise BenchError(str(e)) from None
    lm = load_model(model, device=device)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tasks": [str(Path(t).expanduser().resolve()) for t in tasks], "model": str(getattr(model, "name", model)),
        "resolved_model": lm.name, "device": str(lm.device), "methods": methods, "shots": list(shots), "seeds": list(seeds), "limit": limit,
        "out": str(out), "ratio": ratios if len(ratios) > 1 else ratios[0], "scoring": scoring, "timing_items": timing_items,
        "timing_tokens": TIMING_TOKENS, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for _ in range(3):  # first forwards are slower (allocator, kernels); keep them out of the numbers
        lm.generate_ids(lm.renderer("auto").query("warm up", on_memory=False), None, max_new_tokens=2)

    rows: list[dict] = []
    with (out / "items.jsonl").open("w") as items_fh:
        for task in loaded:
            items = task.test[:limit] if limit else task.test
            labels = [ex.label for ex in items]
            zero_shot: tuple | None = None  # (preds, extras, eval_s, ttft, rate) reused across shots/seeds
            for n_shots in shots:
                for seed in seeds:
                    skill = task.skill(n_shots, seed)
                    group: dict[tuple[str, float | None], tuple[dict, list]] = {}
                    emloc_ratio = None
                    runs = [(m, r) for m in methods for r in (ratios if m in FIXED_RATIO_METHODS else [None])]
                    for method, ratio_run in runs:
                        prep = prepare(lm, method, skill, seed=seed, ratio=ratio_run, emloc_ratio=emloc_ratio)
                        if method in EMLOC_METHODS and emloc_ratio is None:
                            emloc_ratio = prep.kept_ratio
                        if method == "zero-shot" and zero_shot is not None:
                            preds, extras, eval_s, ttft, rate = zero_shot
                        else:
                            desc = f"{task.name} {method} {n_shots}-shot seed {seed}" + (
                                f" ratio {ratio_run}" if ratio_run is not None else "")
                            preds, extras, eval_s = _evaluate(lm, task, prep, items, scoring, desc, progress)
                            ttft, rate = _timing(lm, task, prep, items[:timing_items])
                            if method == "zero-shot":
                                zero_shot = (preds, extras, eval_s, ttft, rate)
                        k = sum(p == y for p, y in zip(preds, labels, strict=True))
                        row = {
                            "task": task.name, "model": lm.name, "method": method, "shots": n_shots, "seed": seed,
                            "scoring": scoring, "n": len(items), "accuracy": accuracy(preds, labels),
                            "accuracy_ci95": wilson_ci(k, len(items)), "kept_ratio": prep.kept_ratio,
                            "original_tokens": prep.original_tokens, "memory_tokens": prep.memory_tokens,
                            "compress_s": prep.compress_s, "ttft_s": ttft, "decode_tokens_per_s": rate,
                            "peak_rss_mb": peak_rss_mb(), "disk_bytes": prep.disk_bytes, "agreement": None,
                            "press_ratio": prep.press_ratio, "ratio_source": prep.ratio_source, "replay_forwards": prep.replay_forwards,
                            "eval_s": eval_s,
                        }
                        group[method, ratio_run] = (row, preds)
                        for i, (ex, p, extra) in enumerate(zip(items, preds, extras, strict=True)):
                            rec = {"task": task.name, "method": method, "shots": n_shots, "seed": seed,
                                   "press_ratio": prep.press_ratio, "index": i,
                                   "label": ex.label, "prediction": p, "correct": p == ex.label,
                                   "scores" if scoring == "loglik" else "output": extra}
                            items_fh.write(json.dumps(rec) + "\n")
                        items_fh.flush()
                        del prep
                    exact = next(((m, None) for m in ("full-icl", "full-icl-cached") if (m, None) in group), None)
                    if exact is not None:  # the two are identical by test: either is the reference
                        reference = group[exact][1]
                        for row, preds in group.values():
                            row["agreement"] = agreement(preds, reference)
                    rows.extend(row for row, _ in group.values())
                    write_summary(rows, out)  # partial results survive an interrupted run
    finish_run(config, rows, out, make_plots if plots else None)
    return rows


def finish_run(config: dict[str, Any], rows: list[dict], out: Path,
               plot: Callable[[list[dict], Path], Any] | None) -> None:
    """Stamp the end of a run (time, load) into ``config.json`` and draw its plots, if matplotlib
    is installed (plots.py imports it only when drawing)."""
    config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    config["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if plot is not None:
        try:
            plot(rows, out)
        except ImportError:
            print("emloc bench: matplotlib not installed; skipping plots", file=sys.stderr)
