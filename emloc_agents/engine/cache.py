"""MemoryCache: a transformers ``Cache`` that puts a (compressed, per-layer) prefix in front of the
tokens of one forward or one generation, and builds each layer's mask from original positions.

The prefix tensors are only read, never written: the first ``update`` of a layer concatenates the
prefix with the new keys into a working tensor owned by this cache (copy-on-use), so any number of
queries and threads can share one ``CompressedMemory``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache

GROW_TOKENS = 256  # spare slots a cache adds when a later forward (a decoding step) outgrows it

Observer = Callable[[torch.nn.Module, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _join(prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``prefix`` (P, H, M, D) followed by ``new`` (B, H, T, D) along the sequence, where P divides B,
    in one copy: the prefix is broadcast over the batch and converted to the compute dtype (fp16
    memories) while it is written, never materialised converted or repeated first."""
    b, h, t, d = new.shape
    p, m = prefix.shape[0], prefix.shape[-2]
    if b % p:
        raise ValueError(f"prefix batch {p} does not divide the forward's batch {b}")
    out = new.new_empty(b, h, m + t, d)
    out[:, :, :m].view(b // p, p, h, m, d).copy_(prefix[None])  # copy_ converts dtype (fp16 memories)
    out[:, :, m:] = new
    return out


def join_valid(spans: Sequence[tuple[torch.Tensor | None, int]]) -> torch.Tensor | None:
    """The valid-slot mask of consecutive key spans, each ``(mask or None = all valid, length)``:
    (kv_heads, total) bool, or None when every span is fully valid."""
    masks = [m for m, _ in spans if m is not None]
    if not masks:
        return None
    heads, device = masks[0].shape[0], masks[0].device
    return torch.cat([m if m is not None else torch.ones(heads, n, dtype=torch.bool, device=device)
                      for m, n in spans], dim=1)


class MemoryCache(Cache):
    """Per-layer prefix K/V (batch 1 or B) + the new tokens of this cache's lifetime.

    Args:
        prefix_keys / prefix_values: per layer ``(1|B, kv_heads, M_l, head_dim)`` or None (empty).
        prefix_positions: per layer ``(M_l,)`` original positions, for the causal and sliding-window
            masks (for pruned full-attention layers any head's positions will do).
        windows: per layer sliding window (``None`` = full attention).
        prefix_valid: per layer None or ``(kv_heads, M_l)`` bool: the prefix slots that hold a token
            (per-head budgets pad the shorter heads); the others are never visible. ``(S, kv_heads,
            M_l)`` in packed forwards: what the rows of segment ``s`` may see (each packed sequence
            its own view of one shared prefix, e.g. a held-out demonstration hidden from its replay).
        prefix_bias: per layer None or ``(kv_heads, M_l)`` float: added to every attention logit on a
            prefix slot (``CompressedMemory.logit_bias``); the layer's mask is then a float mask.
    """

    def __init__(
        self,
        prefix_keys: Sequence[torch.Tensor | None],
        prefix_values: Sequence[torch.Tensor | None],
        prefix_positions: Sequence[torch.Tensor | None],
        windows: Sequence[int | None],
        prefix_valid: Sequence[torch.Tensor | None] | None = None,
        prefix_bias: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        super().__init__(layers=[])
        n = len(windows)
        self.prefix_bias = list(prefix_bias) if prefix_bias is not None else [None] * n
        self.prefix_valid = list(prefix_valid) if prefix_valid is not None else [None] * n
        self.prefix_keys = list(prefix_keys)
        self.prefix_values = list(prefix_values)
        self.prefix_positions = list(prefix_positions)
        self.windows = list(windows)
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self._room: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n  # keys/values + spare slots
        self.new_keys: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.new_values: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.new_positions: torch.Tensor | None = None  # (B, N) of all new tokens so far
        self.new_segments: torch.Tensor | None = None  # (B, N) packed sequences: a token sees its own only
        self.query_positions: torch.Tensor | None = None  # (B, Lq) of the running forward
        self.plain_causal = False  # the running forward is the first, of consecutive positions, unpacked
        self.query_segments: torch.Tensor | None = None
        # hooks used by the compression search (see runtime.py)
        self.observer: Observer | None = None
        self.start_layer = 0
        self.start_hidden: torch.Tensor | None = None
        self.record_hidden: dict[int, torch.Tensor] | None = None
        self.keep_new = True

    # ---- forward bookkeeping ---------------------------------------------------------------

    def begin(self, positions: torch.Tensor, segments: torch.Tensor | None = None) -> None:
        """Declare the positions (B, Lq) of the tokens the next forward appends. ``segments`` (B, Lq)
        packs several sequences into one row: new tokens then see only new tokens of their own
        segment (the replay of several demonstrations at the same positions, without a batch copy
        of the prefix per demonstration)."""
        self.query_positions, self.query_segments = positions, segments
        # the first forward of one unpacked run of consecutive positions: where no prefix is in front,
        # its mask is plain causal, which SDPA computes without a mask (half the work on the CPU)
        self.plain_causal = (self.new_positions is None and segments is None
                             and bool((positions.diff(dim=-1) == 1).all()))
        if self.new_positions is None:
            self.new_positions, self.new_segments = positions, segments
        else:
            if (segments is None) != (self.new_segments is None):
                raise ValueError("a cache's forwards must all be packed (segments) or all not")
            self.new_positions = torch.cat([self.new_positions, positions], dim=1)
            if segments is not None:
                self.new_segments = torch.cat([self.new_segments, segments], dim=1)  # type: ignore[list-item]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cur_k, cur_v = self.keys[layer_idx], self.values[layer_idx]
        if cur_k is None:
            pk, pv = self.prefix_keys[layer_idx], self.prefix_values[layer_idx]
            if pk is not None and pk.shape[-2] > 0:
                assert pv is not None
                cur_k, cur_v = _join(pk, key_states), _join(pv, value_states)
            else:
                cur_k, cur_v = key_states, value_states
        else:
            cur_k, cur_v = self._append(layer_idx, key_states, value_states)
        self.keys[layer_idx], self.values[layer_idx] = cur_k, cur_v
        if self.keep_new:
            self.new_keys[layer_idx].append(key_states)
            self.new_values[layer_idx].append(value_states)
        return cur_k, cur_v

    def _append(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values so far followed by the new ones, written into spare room after them (grown
        ``GROW_TOKENS`` slots at a time): a decoding step copies the cache once per ``GROW_TOKENS``
        steps instead of once per step (as ``torch.cat`` would, the whole memory every token)."""
        cur_k, cur_v = self.keys[layer_idx], self.values[layer_idx]
        assert cur_k is not None and cur_v is not None
        n, t = cur_k.shape[-2], key_states.shape[-2]
        room = self._room[layer_idx]
        if room is None or room[0].shape[-2] < n + t or room[0].data_ptr() != cur_k.data_ptr():
            b, h, _, _ = cur_k.shape
            room = (cur_k.new_empty(b, h, n + t + GROW_TOKENS, cur_k.shape[-1]),
                    cur_v.new_empty(b, h, n + t + GROW_TOKENS, cur_v.shape[-1]))
            room[0][:, :, :n], room[1][:, :, :n] = cur_k, cur_v
            self._room[layer_idx] = room
        room[0][:, :, n : n + t], room[1][:, :, n : n + t] = key_states, value_states
        return room[0][:, :, : n + t], room[1][:, :, : n + t]

    def prefix_length(self, layer_idx: int) -> int:
        pk = self.prefix_keys[layer_idx]
        return 0 if pk is None else int(pk.shape[-2])

    def attention_mask(self, layer_idx: int, q_len: int, k_len: int) -> torch.Tensor | None:
        """The mask of ``positional_mask``, or None where it is plain causal (the attention function
        then runs SDPA unmasked, causal when there is more than one query): one new token on a
        full-attention layer, nothing packed, nobody observing (each decoding step: keys never lie
        after the token being decoded), or the first forward of consecutive positions with no prefix
        on that layer (a prefill: each token sees the ones before it)."""
        if (self.observer is not None or self.new_segments is not None or self.windows[layer_idx]
                or self.prefix_valid[layer_idx] is not None or self.prefix_bias[layer_idx] is not None):
            return self.positional_mask(layer_idx, q_len, k_len)
        if q_len == 1 or (self.plain_causal and q_len == k_len and self.prefix_length(layer_idx) == 0):
            return None
        return self.positional_mask(layer_idx, q_len, k_len)

    def positional_mask(self, layer_idx: int, q_len: int, k_len: int) -> torch.Tensor:
        """The visibility mask (``visible``), as additive float logits where the layer's prefix has a
        ``prefix_bias`` (0 or the bias where visible, -inf where not)."""
        mask = self.visible(layer_idx, q_len, k_len)
        bias = self.prefix_bias[layer_idx]
        if bias is None:
            return mask
        m = self.prefix_length(layer_idx)
        out = torch.zeros(mask.shape[0], bias.shape[0], *mask.shape[2:], dtype=torch.float32, device=mask.device)
        out[..., :m] += bias.to(device=mask.device, dtype=torch.float32)[None, :, None, :]
        return out.masked_fill_(~mask, float("-inf"))

    def visible(self, layer_idx: int, q_len: int, k_len: int) -> torch.Tensor:
        """Boolean (B, 1, Lq, Lk) mask from original positions, prefix and new tokens alike: a key is
        visible if it is not after the query (and inside the window on sliding-window layers); packed
        new tokens see only their own segment. (B, kv_heads, Lq, Lk) where the prefix has padded
        slots (``prefix_valid``); the attention function widens it to the query heads."""
        assert self.query_positions is not None and self.new_positions is not None
        q_pos = self.query_positions[:, :, None]  # (B, Lq, 1)
        key_pos = self.new_positions[:, None, :]  # (B, 1, N)
        m = self.prefix_length(layer_idx)
        if m:
            ppos = self.prefix_positions[layer_idx]
            assert ppos is not None
            key_pos = torch.cat([ppos.to(q_pos.device)[None, None, :].expand(key_pos.shape[0], 1, m), key_pos], -1)
        mask = key_pos <= q_pos
        window = self.windows[layer_idx]
        if window:
            mask &= (q_pos - key_pos) < window
        if self.new_segments is not None:
            assert self.query_segments is not None
            mask[..., m:] &= self.new_segments[:, None, :] == self.query_segments[:, :, None]
        if mask.shape[-1] != k_len:
            raise RuntimeError(f"layer {layer_idx}: mask covers {mask.shape[-1]} keys, attention has {k_len}")
        valid = self.prefix_valid[layer_idx]
        if valid is None:
            return mask[:, None]
        heads = valid.shape[-2]
        out = mask[:, None].expand(-1, heads, -1, -1).clone()
        if valid.dim() == 3:  # per segment: (B, Lq, heads, M) -> (B, heads, Lq, M)
            if self.query_segments is None:
                raise ValueError("a per-segment prefix_valid needs a packed forward (segments)")
            out[..., :m] &= valid[self.query_segments].permute(0, 2, 1, 3)
        else:
            out[..., :m] &= valid.to(out.device)[None, :, None, :]
        return out

    # ---- what the model asks of a Cache -------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return self.prefix_length(layer_idx) if k is None else int(k.shape[-2])

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    @property
    def is_sliding(self) -> list[bool]:  # type: ignore[override]
        return [w is not None for w in self.windows]

    @property
    def is_linear(self) -> list[bool]:  # type: ignore[override]
        return [False] * len(self.windows)

    @property
    def is_dummy(self) -> list[bool]:  # type: ignore[override]
        return [False] * len(self.windows)

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return False

    def chunk_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All new keys/values this cache received for a layer (the chunk just prefilled)."""
        return torch.cat(self.new_keys[layer_idx], dim=-2), torch.cat(self.new_values[layer_idx], dim=-2)
