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


def blend_importance(answers: torch.Tensor, reconstruction: torch.Tensor, protected: torch.Tensor, mode: str) -> torch.Tensor:
    """A layer's (kv_heads, n) ranking scores from the replay's answer attention and KVzip's
    reconstruction scores (``EMLoCConfig.importance``); protected tokens stay +inf. The summed mode adds
    each one's share of its head's total over the unprotected tokens, so neither scale dominates."""
    if mode == "answers":
        return answers

    def share(s: torch.Tensor) -> torch.Tensor:
        s = s.masked_fill(protected, 0.0).float()
        return s / s.sum(-1, keepdim=True).clamp_min(1e-12)

    out = share(reconstruction) if mode == "reconstruction" else share(answers) + share(reconstruction)
    return out.masked_fill(protected, float("inf"))
