"""What a press hands back (a per-layer selection of chunk tokens) and the score pooling shared by the
presses and the replay's importance scores. Below both, so neither imports the other for it."""

from __future__ import annotations

import torch

Selection = list[torch.Tensor | None]
"""Per layer: ``None`` (keep the whole chunk) or ``(kv_heads, k)`` sorted chunk-local indices."""


def pool(scores: torch.Tensor, kernel: int, count_pad: bool = False) -> torch.Tensor:
    """Average pooling along the sequence (same length), as in SnapKV/EMLoC. ``count_pad``: the zero
    padding at the ends counts in the average (the reference's ``avg_pool1d`` default)."""
    if kernel <= 1:
        return scores.clone()
    return torch.nn.functional.avg_pool1d(
        scores[None].float(), kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=count_pad
    )[0][..., : scores.shape[-1]]
