"""The one hook into a transformers model: an attention function and a layer wrapper, both inert
unless a forward runs inside ``active(cache)``.

``instrument(model)`` registers the ``"emloc"`` attention implementation and its mask function, and
wraps each decoder layer once. Inside ``active(cache)`` (a context variable, so
threads never see each other's state):

* attention masks come from the cache, per layer, from that layer's own key length and the original
  positions (memory lengths differ per layer after pruning; sliding windows act on positions);
* an observer may see each layer's post-RoPE queries and keys (importance scores without eager);
* layers below ``cache.start_layer`` are skipped and layer ``start_layer`` receives a saved hidden
  state (partial re-forwards during the pruning search);
* the hidden state entering each layer can be recorded (the teacher pass).
Outside ``active`` the model is untouched for its other users: transformers builds its usual SDPA mask
(causal, sliding window, padding from the caller's ``attention_mask``) through the ``"emloc"`` mask
function, and the attention function is transformers' own SDPA with the caller's arguments. Inside
``active`` the mask function builds nothing (the cache's per-layer mask replaces it).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .cache import MemoryCache

ATTN_IMPLEMENTATION = "emloc"
_ACTIVE: contextvars.ContextVar[MemoryCache | None] = contextvars.ContextVar("emloc_active", default=None)


def _emloc_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cache = _ACTIVE.get()
    if cache is None:  # an ordinary caller: exactly transformers' SDPA, with the mask it built
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("sliding_window", None)
    kwargs.pop("is_causal", None)
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    mask = cache.attention_mask(layer, query.shape[2], key.shape[2])
    if mask is not None and mask.is_floating_point():  # a memory with logit biases: SDPA adds it
        mask = mask.to(query.dtype)
    if query.shape[2] == 1 and cache.observer is None and key.shape[1] < query.shape[1] and not kwargs.get("softcap"):
        return _decoding_step(query, key, value, mask, kwargs.get("scaling")), None
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):  # per KV head -> per query head
        mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    if cache.observer is not None:
        assert mask is not None  # a cache with an observer always builds its mask
        cache.observer(module, layer, query, key, mask)
    # no mask: a decoding step or a plain causal prefill (``MemoryCache.attention_mask``)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=mask is None, **kwargs)


def _decoding_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float | None) -> torch.Tensor:
    """One new token's attention under grouped-query attention: each KV head's query heads go in as
    rows of one SDPA call on that head's keys, so keys are neither repeated per query head nor left to
    SDPA's ``enable_gqa``, which on the CPU took 1.7x as long over 14k keys (4.3 against 2.6 ms a layer
    for Qwen2-0.5B's 14 heads on 2). The cache's mask (float masks already in the query's dtype), per KV head
    or shared, broadcasts over the rows."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    out = F.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, d), key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, 1, value.shape[-1]).transpose(1, 2).contiguous()


def _emloc_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask transformers builds for ``"emloc"``: SDPA's (padding, causal, window) for ordinary
    callers; none inside ``active``, where the attention function takes the cache's mask."""
    if _ACTIVE.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def _gate(layer: torch.nn.Module, index: int, forward: Any) -> Any:
    """A decoder layer's forward that can be skipped, fed a saved state, or have its input recorded."""

    def gated_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = _ACTIVE.get()
        if cache is not None:
            if index < cache.start_layer:
                return hidden_states  # skipped; layer start_layer receives cache.start_hidden
            if index == cache.start_layer and cache.start_hidden is not None:
                hidden_states = cache.start_hidden
            if cache.record_hidden is not None:
                cache.record_hidden[index] = hidden_states
        return forward(hidden_states, *args, **kwargs)

    gated_forward.__emloc_gate__ = True  # type: ignore[attr-defined]
    return gated_forward


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer list of a causal LM or of a VLM's language model."""
    base = model
    for attr in ("model", "language_model"):
        if hasattr(base, attr) and not hasattr(base, "layers"):
            base = getattr(base, attr)
    if hasattr(base, "language_model") and not hasattr(base, "layers"):
        base = cast(torch.nn.Module, base.language_model)
    if hasattr(base, "text_model") and not hasattr(base, "layers"):  # Idefics3 / SmolVLM
        base = cast(torch.nn.Module, base.text_model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layers found (model.model.layers)")
    return layers


def instrument(model: torch.nn.Module) -> None:
    """Install the hook once (idempotent). The model keeps working for callers outside ``active``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _emloc_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _emloc_mask)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if not getattr(layer.forward, "__emloc_gate__", False):
            layer.forward = _gate(layer, i, layer.forward)
    pretrained = cast("PreTrainedModel", model)
    if getattr(model.config, "vision_config", None) is not None:  # VLM: the vision tower keeps its own
        pretrained.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION, "vision_config": "sdpa"})
    else:
        pretrained.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextlib.contextmanager
def active(cache: MemoryCache) -> Iterator[MemoryCache]:
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
