"""compare: the headline ratios of one run, one line each, per task/shots/seed."""

from __future__ import annotations

from collections.abc import Sequence


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(summary_rows: Sequence[dict]) -> list[str]:
    """Lines like ``sst2 16-shot seed 0: emloc ttft / zero-shot ttft = 1.21x``; missing inputs are skipped."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in summary_rows:
        groups.setdefault((r["task"], r["model"], r["shots"], r["seed"]), {})[r["method"]] = r
    lines: list[str] = []
    for (task, model, shots, seed), by in groups.items():
        head = f"{task} [{model}] {shots}-shot seed {seed}:"
        zs, full, cached, em = (by.get(m, {}) for m in ("zero-shot", "full-icl", "full-icl-cached", "emloc"))
        for name, value in (
            ("emloc ttft / zero-shot ttft", _ratio(em.get("ttft_s"), zs.get("ttft_s"))),
            ("full-icl ttft / emloc ttft", _ratio(full.get("ttft_s"), em.get("ttft_s"))),
            ("full-icl-cached ttft / emloc ttft", _ratio(cached.get("ttft_s"), em.get("ttft_s"))),
            ("emloc memory / full-icl-cached memory (disk)", _ratio(em.get("disk_bytes"), cached.get("disk_bytes"))),
        ):
            if value is not None:
                lines.append(f"{head} {name} = {value:.2f}x")
        if em:
            lines.append(
                f"{head} emloc kept ratio = {em['kept_ratio']:.3f} of {em['original_tokens']} tokens, "
                f"compress_s = {em['compress_s']:.2f}, disk = {em['disk_bytes'] / 1e6:.2f} MB"
            )
        for method, row in by.items():
            if row.get("accuracy") is None:
                continue
            agree = row.get("agreement")
            extra = f", agreement with full-icl {agree:.3f}" if agree is not None else ""
            lines.append(f"{head} {method} accuracy = {row['accuracy']:.3f} (n={row['n']}){extra}")
    return lines
