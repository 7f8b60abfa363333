"""PNG plots from summary rows. A plot without data is skipped.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot): nothing global such as the
process's backend or pyplot's figure list is touched, so calling the benchmark from a notebook or
a GUI app leaves its plotting alone."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    return fig, fig.subplots()


def _title(rows: Sequence[dict], what: str) -> str:
    tasks = sorted({r["task"] for r in rows})
    models = sorted({r["model"] for r in rows})
    return f"{what} ({', '.join(models)}; {', '.join(tasks)})"


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, save and close one figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def accuracy_vs_kept_ratio(rows: Sequence[dict], path: Path) -> Path | None:
    pts = [r for r in rows if r.get("accuracy") is not None and r.get("kept_ratio") is not None]
    if not pts:
        return None
    fig, ax = _figure()
    for method in dict.fromkeys(r["method"] for r in pts):
        sel = [r for r in pts if r["method"] == method]
        ax.scatter([r["kept_ratio"] for r in sel], [r["accuracy"] for r in sel], label=method)
    zero = [r["accuracy"] for r in rows if r["method"] == "zero-shot" and r.get("accuracy") is not None]
    for i, acc in enumerate(zero):  # zero-shot keeps nothing: reference lines
        ax.axhline(acc, color="grey", linestyle="--", linewidth=0.8, label="zero-shot" if i == 0 else None)
    return _save(fig, ax, path, "kept ratio (share of demonstration tokens)", "accuracy",
                 _title(rows, "accuracy vs kept ratio"))


def fidelity_curves(rows: Sequence[dict], out: Path) -> list[Path]:
    """Per task: agreement with full ICL against kept ratio, one line per method (its mean over seeds
    at each ratio it ran), for runs where a method ran at several ratios (``--ratio 0.05,0.1,...``)."""
    made = []
    for task in dict.fromkeys(r["task"] for r in rows):
        pts = [r for r in rows if r["task"] == task and r.get("agreement") is not None
               and r.get("kept_ratio") is not None and r["method"] not in ("full-icl", "full-icl-cached")]
        if len({r.get("press_ratio") for r in pts if r.get("ratio_source") == "--ratio"}) < 3:
            continue
        fig, ax = _figure()
        for method in dict.fromkeys(r["method"] for r in pts):
            by_ratio: dict[object, list[dict]] = defaultdict(list)
            for r in pts:  # a method without --ratio (emloc) is one point: its mean over seeds
                if r["method"] == method:
                    by_ratio[r.get("press_ratio") if r.get("ratio_source") == "--ratio" else None].append(r)
            line = sorted((mean(r["kept_ratio"] for r in g), mean(r["agreement"] for r in g)) for g in by_ratio.values())
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=method)
        ax.set_ylim(0, 1.02)
        made.append(_save(fig, ax, out / f"fidelity_curve_{task}.png", "kept ratio (share of demonstration tokens)",
                          "agreement with full ICL", _title([r for r in rows if r["task"] == task],
                                                            "fidelity curve")))
    return made


def accuracy_vs_shots(rows: Sequence[dict], path: Path) -> Path | None:
    pts = [r for r in rows if r.get("accuracy") is not None]
    if len({r["shots"] for r in pts}) < 2:
        return None
    by: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in pts:  # mean over tasks and seeds
        by[(r["method"], r["shots"])].append(r["accuracy"])
    fig, ax = _figure()
    for method in dict.fromkeys(r["method"] for r in pts):
        xs = sorted(s for m, s in by if m == method)
        ax.plot(xs, [mean(by[(method, s)]) for s in xs], marker="o", label=method)
    ax.set_xscale("log", base=2)
    return _save(fig, ax, path, "shots", "accuracy (mean over tasks, seeds)", _title(rows, "accuracy vs shots"))


LATENCY_METHODS = ("full-icl", "full-icl-cached", "emloc")


def per_method_vs_tokens(
    rows: Sequence[dict], path: Path, field: str, ylabel: str, what: str, value: Callable[[float], float] = float,
) -> Path | None:
    """``field`` of the full-context methods and EMLoC over the uncompressed demonstration tokens."""
    pts = [r for r in rows if r["method"] in LATENCY_METHODS and r.get(field) and r.get("original_tokens")]
    if not pts:
        return None
    fig, ax = _figure()
    for method in LATENCY_METHODS:
        sel = sorted((r for r in pts if r["method"] == method), key=lambda r: r["original_tokens"])
        if sel:
            ax.plot([r["original_tokens"] for r in sel], [value(r[field]) for r in sel], marker="o", label=method)
    return _save(fig, ax, path, "demonstration tokens (uncompressed)", ylabel, _title(rows, what))


def ttft_vs_tokens(rows: Sequence[dict], path: Path) -> Path | None:
    return per_method_vs_tokens(rows, path, "ttft_s", "time to first token (s)", "TTFT vs context")


def decode_vs_tokens(rows: Sequence[dict], path: Path) -> Path | None:
    return per_method_vs_tokens(rows, path, "decode_tokens_per_s", "decode time per token (ms)",
                                "per-token decode vs context", lambda rate: 1000.0 / rate)


def lines_vs_tokens(
    rows: Sequence[dict], path: Path, series: Sequence[tuple[str, str]], ylabel: str, what: str,
    scale: float = 1.0, logy: bool = False,
) -> Path | None:
    """One line per (field, label) of ``series`` and model/task, over the uncompressed tokens."""
    groups = list(dict.fromkeys((r["model"], r["task"]) for r in rows if r.get("original_tokens")))
    lines = []
    for field, label in series:
        for model, task in groups:
            sel = sorted((r for r in rows if (r["model"], r["task"]) == (model, task) and r.get(field) is not None
                          and r.get("original_tokens")), key=lambda r: r["original_tokens"])
            if sel:
                name = label if len(groups) == 1 else f"{label} ({model}, {task})"
                lines.append((name, [r["original_tokens"] for r in sel], [r[field] * scale for r in sel]))
    if not lines:
        return None
    fig, ax = _figure()
    for name, xs, ys in lines:
        ax.plot(xs, ys, marker="o", label=name)
    if logy:
        ax.set_yscale("log")
    return _save(fig, ax, path, "demonstration tokens (uncompressed)", ylabel, _title(rows, what))


def make_scaling_plots(rows: Sequence[dict], out: str | Path) -> list[Path]:
    """The scaling study's plots (bench/scaling.py) that have data; returns the files written."""
    out = Path(out)
    made = [
        lines_vs_tokens(rows, out / "rss_vs_tokens.png",
                        [("peak_rss_compress_mb", "EMLoC compression (chunk-wise)"),
                         ("peak_rss_full_prefill_mb", "one full prefill")],
                        "peak RSS above the loaded model (MB)", "peak memory vs context"),
        lines_vs_tokens(rows, out / "cold_vs_warm.png",
                        [("cold_s", "cold get (compress + store)"), ("warm_s", "warm get (load from disk)")],
                        "seconds (log scale)", "cold compression vs warm load", logy=True),
        lines_vs_tokens(rows, out / "disk_bytes_vs_tokens.png",
                        [("disk_bytes", "memory on disk"), ("full_kv_bytes", "full fp16 KV")],
                        "MB", "memory size vs full KV", scale=1e-6),
    ]
    return [p for p in made if p is not None]


def make_plots(rows: Sequence[dict], out: str | Path) -> list[Path]:
    """Write the plots that have data into ``out``; returns the files written."""
    out = Path(out)
    made = [
        accuracy_vs_kept_ratio(rows, out / "accuracy_vs_kept_ratio.png"),
        accuracy_vs_shots(rows, out / "accuracy_vs_shots.png"),
        ttft_vs_tokens(rows, out / "ttft_vs_tokens.png"),
        decode_vs_tokens(rows, out / "decode_vs_tokens.png"),
    ]
    return [p for p in made if p is not None] + fidelity_curves(rows, out)
