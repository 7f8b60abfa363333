"""CompressedMemory: the per-layer K/V prefix a skill's demonstrations compress into."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

PAD = -1  # the position of a spare slot (a head that keeps fewer tokens than its layer's longest)


def certificate(memory: CompressedMemory, method: str, options: dict[str, Any], delta: float | None,
                shares_tried: list[float], validation: int = 0, trial: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The fields of ``CompressedMemory.certificate`` for ``memory``, as a method stores them in its
    stats: ``trial`` is the record of the check that passed (its ``js`` and ``changed``) over
    ``validation`` held-out demonstrations, None where no held-out check chose the memory (the whole
    context kept, or the chunk-wise loop); ``delta`` None (or infinite) for a share kept unchecked."""
    return {
        "method": method, "options": dict(options), "kept_ratio": round(memory.kept_ratio, 4),
        "whole_context": memory.kept_ratio >= 1.0,
        "delta": None if delta is None or math.isinf(delta) else delta,
        "validation_demonstrations": validation,
        "validation_js": None if not validation else (0.0 if trial is None else trial["js"]),
        "validation_changed": None if not validation else (0 if trial is None else trial["changed"]),
        "shares_tried": shares_tried,
    }


@dataclass
class CompressedMemory:
    """Per-layer keys/values (stored after RoPE) with the original positions of the kept tokens.

    ``keys[l]`` and ``values[l]`` have shape ``(kv_heads, layer_lengths[l], head_dim)``; every KV head
    of a layer has the same number of slots but may keep different tokens, so ``positions[l]`` is
    ``(kv_heads, layer_lengths[l])``. Heads that keep fewer tokens than the layer's longest (per-head
    budgets) fill their spare slots with position ``PAD`` (-1): never visible to a query
    (``valid_masks``). ``logit_bias`` (optional, per layer ``(kv_heads, slots)``) is added to every
    query's attention logit on a slot: a kept token that stands for several merged ones
    (engine/merge.py) draws the attention they drew together. A query continues at
    ``original_length`` (the uncompressed length), never at the compressed one. The memory is never
    mutated by a query.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    original_length: int
    sliding: list[bool]
    render_mode: str = "plain"
    next_position: int | None = None  # first free RoPE index (differs from original_length for M-RoPE)
    header: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    logit_bias: list[torch.Tensor | None] | None = None  # per layer None or (kv_heads, slots) float32
    _valid: list[torch.Tensor | None] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def layer_lengths(self) -> list[int]:
        return [int(k.shape[-2]) for k in self.keys]

    @property
    def valid_masks(self) -> list[torch.Tensor | None]:
        """Per layer None (every slot holds a token) or ``(kv_heads, slots)`` bool: which slots do
        (computed once per memory object: a query reads it on every layer)."""
        if self._valid is None:
            self._valid = [None if not bool((p < 0).any()) else p >= 0 for p in self.positions]
        return self._valid

    @property
    def kept_lengths(self) -> list[float]:
        """Tokens each layer keeps, averaged over its KV heads (its slots, less any padding)."""
        return [float(n) if v is None else float(v.sum()) / v.shape[0]
                for n, v in zip(self.layer_lengths, self.valid_masks, strict=True)]

    @property
    def memory_tokens(self) -> float:
        """Tokens kept (per head, averaged over heads), summed over layers (what a query attends to,
        divided by layers)."""
        return sum(self.kept_lengths)

    @property
    def kept_ratio(self) -> float:
        """Share of the demonstration tokens kept, averaged over the layers that can be pruned
        (full-attention layers; sliding-window layers only ever keep their window)."""
        if self.original_length == 0:
            return 1.0
        full = [n for n, s in zip(self.kept_lengths, self.sliding, strict=True) if not s]
        lengths = full or self.kept_lengths
        return sum(lengths) / (len(lengths) * self.original_length)

    @property
    def storage_ratio(self) -> float:
        """Share of the full KV cache held, over all layers (sliding layers included)."""
        if self.original_length == 0:
            return 1.0
        return sum(self.layer_lengths) / (self.num_layers * self.original_length)

    @property
    def position_offset(self) -> int:
        return self.next_position if self.next_position is not None else self.original_length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> CompressedMemory:
        """A copy with keys/values in ``dtype`` and every tensor on ``device`` (None: unchanged); the
        same object when nothing changes (moving a memory to its model's device costs one copy, once)."""
        tensors = (*self.keys, *self.values, *self.positions, *(b for b in self.logit_bias or () if b is not None))
        same_dtype = dtype is None or all(t.dtype == dtype for t in (*self.keys, *self.values))
        same_device = device is None or all(t.device == torch.device(device) for t in tensors)
        if same_dtype and same_device:
            return self
        return CompressedMemory(
            keys=[k.to(device=device, dtype=dtype) for k in self.keys],
            values=[v.to(device=device, dtype=dtype) for v in self.values],
            positions=[p.to(device=device) for p in self.positions],
            original_length=self.original_length,
            sliding=self.sliding,
            render_mode=self.render_mode,
            next_position=self.next_position,
            header=dict(self.header),
            stats=dict(self.stats),
            logit_bias=None if self.logit_bias is None
            else [None if b is None else b.to(device=device) for b in self.logit_bias],
        )

    @property
    def certificate(self) -> dict[str, Any] | None:
        """What the compression's check measured, stored with the memory (None for a memory made before
        memories carried one): ``method`` and its ``options``, ``kept_ratio``, ``whole_context`` (no
        share passed the check, so the memory is the full context and answers exactly as full
        in-context learning), ``delta``, ``validation_demonstrations`` (held-out demonstrations the
        check replayed; 0 for the chunk-wise loop, which checks each chunk on its own demonstrations),
        ``validation_js`` (their answer rows' mean Jensen-Shannon divergence against the full context)
        and ``validation_changed`` (how many of them changed their most likely answer token)."""
        got = self.stats.get("certificate")
        return dict(got) if isinstance(got, dict) else None

    def fidelity(self) -> str:
        """The certificate in one line, for people."""
        c = self.certificate
        if c is None:
            return "no fidelity certificate (made before memories carried one)"
        head = f"method {c['method']}"
        if c["delta"] is None:
            return f"{head}: a fixed share, unchecked"
        if c["whole_context"]:
            return (f"{head}: no share of {c['shares_tried']} stayed within delta {c['delta']:g}, so the whole "
                    "context is kept (answers as full in-context learning does)")
        if not c["validation_demonstrations"]:
            return f"{head}: every layer of every chunk within delta {c['delta']:g} on the chunk's own demonstrations"
        return (f"{head}: {c['validation_demonstrations']} held-out validation demonstrations, answer JS "
                f"{c['validation_js']:.4f} (delta {c['delta']:g}), {c['validation_changed']} of them changed "
                "their answer")

    def describe(self) -> str:
        lens = self.layer_lengths
        return (
            f"{self.original_length} demonstration tokens -> kept {self.kept_ratio:.1%} "
            f"(per layer min {min(lens)}, median {sorted(lens)[len(lens) // 2]}, max {max(lens)}; "
            f"{self.nbytes() / 1e6:.1f} MB); {self.fidelity()}"
        )
