"""One forward of the model inside the engine's hook: what every part of the engine runs on.

``run`` feeds ids (or VLM input embeddings) at explicit positions onto a ``MemoryCache`` with the
hook active (runtime.py) and returns the last hidden states; ``lm_logits`` applies the LM head.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cache import MemoryCache
from .facts import ModelFacts
from .prompt import Renderer
from .runtime import active

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class ModelHandle(Protocol):
    """What the engine needs of a loaded model (``emloc_agents.models.LanguageModel`` is one)."""

    model: torch.nn.Module
    tokenizer: Any
    facts: ModelFacts

    @property
    def device(self) -> torch.device: ...

    def renderer(self, prompt_format: str = "auto") -> Renderer: ...



# SDPA kernels the engine's forwards may use on CUDA (None: torch's own choice). cuDNN's attention is
# left out: it builds an execution plan per new shape, and the engine's shapes rarely repeat (every
# packed replay, every trial's per-layer memory length). An H200 run (2026-11-28) showed trials
# costing far more than their one small forward (docs/benchmarks.md, "Cost of compression"); the A/B is
# ``python -m emloc_agents.bench.gpu --cudnn-attention``.
CUDA_ATTENTION_BACKENDS: list[SDPBackend] | None = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
]


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The SDPA kernels an engine forward on ``device`` may use (``CUDA_ATTENTION_BACKENDS``)."""
    if device.type != "cuda" or CUDA_ATTENTION_BACKENDS is None:
        return contextlib.nullcontext()
    return sdpa_kernel(CUDA_ATTENTION_BACKENDS)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done (stage timings in stats)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its LM head (returns normalised last hidden states)."""
    inner = getattr(model, "model", None)
    if inner is None:
        raise TypeError(f"{type(model).__name__} has no .model backbone")
    return getattr(inner, "language_model", None) or getattr(inner, "text_model", None) or inner  # VLMs


@torch.inference_mode()
def lm_logits(model: torch.nn.Module, facts: ModelFacts, hidden: torch.Tensor) -> torch.Tensor:
    logits = cast("PreTrainedModel", model).get_output_embeddings()(hidden).float()
    if facts.final_softcap:
        logits = torch.tanh(logits / facts.final_softcap) * facts.final_softcap
    return logits


def run(
    model: torch.nn.Module,
    cache: MemoryCache,
    ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    segments: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    rope_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward of ``ids`` (B, T) at ``positions`` on ``cache``; returns last hidden states.

    VLMs (engine/vision.py): ``inputs_embeds`` (B, T, H) replaces the token embeddings (image features
    merged), and ``rope_positions`` (3, B, T) are M-RoPE ids while ``positions`` stay the 1-D sequence
    order for the masks. Without ``rope_positions`` RoPE gets ``positions + cache.rope_delta`` (0 for
    1-D models); a forward with explicit ids sets the delta for the tokens that follow it.
    ``segments`` packs several sequences into one row (see ``MemoryCache.begin``)."""
    cache.begin(positions, segments)
    delta = getattr(cache, "rope_delta", 0)
    if rope_positions is None:
        rope_positions = positions + delta if delta else positions
    else:
        cache.rope_delta = int(rope_positions.max()) - int(positions.max())  # type: ignore[attr-defined]
    with active(cache), torch.inference_mode(), attention_backends(ids.device):
        out = backbone(model)(
            input_ids=None if inputs_embeds is not None else ids, inputs_embeds=inputs_embeds,
            position_ids=rope_positions, cache=cache, use_cache=True,
        )
    return out.last_hidden_state
