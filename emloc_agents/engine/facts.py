"""What the engine must know about a transformers model: layers, heads, windows, output head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .runtime import decoder_layers

SUPPORTED_TEXT = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
SUPPORTED_VISION = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3")  # engine/vision.py
SUPPORTED = SUPPORTED_TEXT + SUPPORTED_VISION


class UnsupportedModelError(TypeError):
    """The model's architecture has no attention modules the engine can drive."""


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    max_positions: int | None
    final_softcap: float | None

    @property
    def sliding(self) -> list[bool]:
        return [w is not None for w in self.windows]


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_facts(model: torch.nn.Module) -> ModelFacts:
    cfg = text_config(model.config)
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED and getattr(model.config, "model_type", "?") not in SUPPORTED:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    layers = decoder_layers(model)
    attn = getattr(layers[0], "self_attn", None)
    if attn is None or not hasattr(attn, "layer_idx"):
        raise UnsupportedModelError(f"{type(model).__name__}: decoder layers have no self_attn with layer_idx")
    n = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types is not None:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types[:n])
    elif window and getattr(cfg, "use_sliding_window", True):
        windows = tuple([window] * n)
    else:
        windows = tuple([None] * n)
    heads = cfg.num_attention_heads
    return ModelFacts(
        model_type=model_type,
        num_layers=n,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        num_heads=heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        windows=windows,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
    )
