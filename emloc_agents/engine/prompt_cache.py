"""Reuse a prompt's keys/values for the next prompt on the same memory that starts the same way.

An agent sends the whole conversation at every step: the system prompt, the tool descriptions and
the turns so far come back with a few new tokens at the end, and the requests of one agent share
their first few hundred tokens. After a prefill, the prompt's keys/values are kept as an extension
of the memory it ran on (a ``CompressedMemory`` whose last slots are the prompt's tokens); the next
prompt on that memory prefills only what follows the longest prefix it shares with a kept one. The
answer is the one a full prefill gives, up to float rounding (the split forward sums in another order).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import MemoryCache
from .memory import CompressedMemory


@dataclass(frozen=True)
class _Entry:
    memory: CompressedMemory | None  # what the prompt ran on
    prompt: tuple[int, ...]
    extended: CompressedMemory  # ``memory`` followed by the prompt's keys/values
    memory_lengths: tuple[int, ...]  # per layer, the slots of ``memory`` (the prompt's come after)


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """The keys/values of recent prompts, per memory, bounded by ``max_tokens`` prompt tokens in all
    (least recently used dropped first). Thread-safe; entries are never changed once kept.

    ``min_shared``: a kept prompt is reused from this many shared tokens on (below it the saving is
    smaller than the copy)."""

    def __init__(self, max_tokens: int = 16384, min_shared: int = 16) -> None:
        self.max_tokens = max_tokens
        self.min_shared = min_shared
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def lookup(self, memory: CompressedMemory | None, prompt_ids: Sequence[int]) -> tuple[CompressedMemory | None, int]:
        """(memory to run on, prompt tokens it already holds): the longest kept prefix of
        ``prompt_ids`` on ``memory``, leaving at least one token to prefill; else ``(memory, 0)``."""
        with self._lock:
            best, best_n, best_key = None, 0, None
            for key, entry in self._entries.items():
                if entry.memory is memory:
                    n = min(_shared(entry.prompt, prompt_ids), len(prompt_ids) - 1)
                    if n > best_n:
                        best, best_n, best_key = entry, n, key
            if best is None or best_n < self.min_shared:
                return memory, 0
            self._entries.move_to_end(best_key)  # type: ignore[arg-type]
        return _truncated(best, best_n), best_n

    def add(self, memory: CompressedMemory | None, prompt_ids: Sequence[int], cache: MemoryCache,
            sliding: Sequence[bool]) -> None:
        """Keep the prompt's keys/values from ``cache`` right after its prefill (``cache`` ran on
        ``memory`` or on an extension of it from ``lookup``: either way its slots are ``memory``'s
        followed by the whole prompt)."""
        if len(prompt_ids) > self.max_tokens:
            return
        start = 0 if memory is None else memory.original_length
        lengths = tuple(memory.layer_lengths) if memory is not None else (0,) * len(sliding)
        keys, values, positions, biases = [], [], [], []
        for layer, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
            assert k is not None and v is not None
            end = lengths[layer] + len(prompt_ids)
            keys.append(k[0, :, :end].clone())
            values.append(v[0, :, :end].clone())
            heads = k.shape[1]
            new = torch.arange(start, start + len(prompt_ids), device=k.device).expand(heads, -1)
            positions.append(new if memory is None else torch.cat([memory.positions[layer].to(k.device), new], 1))
            bias = None if memory is None or memory.logit_bias is None else memory.logit_bias[layer]
            biases.append(None if bias is None else torch.cat([bias, bias.new_zeros(bias.shape[0], len(prompt_ids))], 1))
        extended = CompressedMemory(
            keys=keys, values=values, positions=positions, original_length=start + len(prompt_ids),
            sliding=list(sliding), render_mode=memory.render_mode if memory is not None else "plain",
            logit_bias=biases if any(b is not None for b in biases) else None)
        with self._lock:
            self._entries[self._next] = _Entry(memory, tuple(prompt_ids), extended, lengths)
            self._next += 1
            while sum(len(e.prompt) for e in self._entries.values()) > self.max_tokens:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _truncated(entry: _Entry, n: int) -> CompressedMemory:
    """The entry's memory followed by the first ``n`` tokens of its prompt (views, no copy)."""
    ext = entry.extended
    ends = [m + n for m in entry.memory_lengths]
    return CompressedMemory(
        keys=[k[:, :e] for k, e in zip(ext.keys, ends, strict=True)],
        values=[v[:, :e] for v, e in zip(ext.values, ends, strict=True)],
        positions=[p[:, :e] for p, e in zip(ext.positions, ends, strict=True)],
        original_length=ext.original_length - len(entry.prompt) + n,
        sliding=ext.sliding, render_mode=ext.render_mode,
        logit_bias=None if ext.logit_bias is None else [
            None if b is None else b[:, :e] for b, e in zip(ext.logit_bias, ends, strict=True)])
