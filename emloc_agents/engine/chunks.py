"""ChunkContext: what a press sees of one chunk. Its own module so that ``compress`` (which builds it)
and ``presses`` (which read it) both import it, instead of each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .facts import ModelFacts
    from .replay import Replay


@dataclass
class ChunkContext:
    """What a press sees for one chunk."""

    facts: ModelFacts
    n: int
    n_protected: int
    offset: int
    total_length: int
    replay: Replay | None
    window_scores: list[torch.Tensor] | None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    reconstruction_scores: list[torch.Tensor] | None = None  # KVzip's (engine/reconstruct.py)
    device: torch.device | str = "cpu"  # the model's: where a press makes its own tensors

    def record(self, layer: int, ratio: float, js: float | None) -> None:
        self.decisions.append({"layer": layer, "ratio": ratio, "js": js})
