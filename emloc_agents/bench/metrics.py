"""Accuracy, Wilson interval and agreement on plain prediction lists."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(preds: Sequence[object], labels: Sequence[object]) -> float | None:
    """Share of ``preds`` equal to ``labels`` (None for no items)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not preds:
        return None
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(preds)


def wilson_ci(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval [lo, hi] for k successes out of n (95% by default; None if n == 0)."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside 0..{n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def agreement(a: Sequence[object], b: Sequence[object]) -> float | None:
    """Share of positions where the two prediction lists agree (None for no items)."""
    return accuracy(a, b)


def fidelity(preds: Sequence[object], labels: Sequence[object], full: Sequence[object]) -> dict[str, object]:
    """A memory's predictions against the gold ``labels`` and against full ICL's predictions ``full``:
    accuracy with its 95 % Wilson interval, full ICL's accuracy, and agreement (the fidelity measure)."""
    k = sum(p == y for p, y in zip(preds, labels, strict=True))
    return {"accuracy": accuracy(preds, labels), "accuracy_ci95": wilson_ci(k, len(labels)),
            "full_icl_accuracy": accuracy(full, labels), "agreement": agreement(preds, full)}
