"""The pruning search's measurements for one chunk: replay its demonstrations after it, and tell how
far a candidate selection moves the model's answers from that teacher (Jensen-Shannon divergence).

``Replay.run_teacher`` prefills the replay on memory + whole chunk once: teacher log-probs at the rows
that predict answer tokens, the hidden state entering every layer, the replay's K/V, and per-layer
importance of chunk tokens (the attention those answer rows pay them). A check then re-runs from a
layer up, either the whole replay (``scope="exact"``, the reference) or only the answer rows on the
teacher's K/V of the other replay rows (``scope="answers"``, default). Answers-scope trials do not
copy K/V per candidate: every trial reads one shared prefix (memory + whole chunk + replay) per layer,
a selection is a per-head mask over the chunk, and several trials run as blocks of one forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .cache import MemoryCache
from .forward import ModelHandle, lm_logits, run
from .presses import Selection, pool


def js_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) per row between two log-prob tensors (R, V)."""
    m_log = torch.logaddexp(p_log, q_log) - math.log(2.0)
    kl_pm = (p_log.exp() * (p_log - m_log)).sum(-1)
    kl_qm = (q_log.exp() * (q_log - m_log)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (1, H, n, D), idx (H, k) -> (1, H, k, D)."""
    return torch.gather(t, 2, idx[None, :, :, None].expand(1, -1, -1, t.shape[-1]))


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=dim)


@dataclass
class Building:
    """The memory while it is being built: per layer keys/values (1, H, M, D), positions (H, M)."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    positions: list[torch.Tensor | None]

    @classmethod
    def empty(cls, n: int) -> Building:
        return cls([None] * n, [None] * n, [None] * n)

    def prefix(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        p = self.positions[layer]
        return self.keys[layer], self.values[layer], None if p is None else p[0]

    def length(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else int(k.shape[-2])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.keys[layer] = _cat(self.keys[layer], k, 2)
        self.values[layer] = _cat(self.values[layer], v, 2)
        self.positions[layer] = _cat(self.positions[layer], pos, 1)

    def keep_after(self, layer: int, position: int) -> None:
        """Drop the tokens at positions <= ``position`` (what a sliding window can no longer see)."""
        pos = self.positions[layer]
        assert pos is not None
        keep = pos[0] > position
        self.keys[layer] = self.keys[layer][:, :, keep]  # type: ignore[index]
        self.values[layer] = self.values[layer][:, :, keep]  # type: ignore[index]
        self.positions[layer] = pos[:, keep]


class TrialCache(MemoryCache):
    """Several candidate selections checked in one forward of the answer rows.

    The forward's B sequences each hold ``trials`` blocks of ``rows`` answer rows (block j = trial j).
    Every block reads the same per-layer prefix; ``keep[layer]`` (trials, kv_heads, n) says which
    chunk tokens (prefix columns ``chunk_start[layer]`` ... + n) each trial keeps, per head, and a
    block never sees another block's new tokens. Masking a key out of the softmax is the same as
    dropping it, so this equals gathering the kept tokens, without a K/V copy per trial.
    New keys land in ``buffers`` (per layer, prefix already in place) instead of a fresh concat."""

    def __init__(self, *args: Any, keep: list[torch.Tensor | None], chunk_start: list[int], n: int, rows: int,
                 q_heads: int, buffers: dict[int, tuple[torch.Tensor, torch.Tensor]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep, self.chunk_start, self.n, self.rows, self.q_heads = keep, chunk_start, n, rows, q_heads
        self.buffers = buffers
        self.keep_new = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.prefix_keys[layer_idx], self.prefix_values[layer_idx]
        assert pk is not None and pv is not None and self.keys[layer_idx] is None  # one forward per check
        m, t = pk.shape[-2], key_states.shape[-2]
        buf = self.buffers.get(layer_idx)
        if buf is None or buf[0].shape[-2] < m + t:
            b, h, _, d = pk.shape
            buf = (pk.new_empty(b, h, m + t, d), pv.new_empty(b, h, m + t, d))
            buf[0][:, :, :m], buf[1][:, :, :m] = pk, pv
            self.buffers[layer_idx] = buf
        buf[0][:, :, m : m + t], buf[1][:, :, m : m + t] = key_states, value_states
        k, v = buf[0][:, :, : m + t], buf[1][:, :, : m + t]
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def attention_mask(self, layer_idx: int, q_len: int, k_len: int) -> torch.Tensor:
        mask = super().attention_mask(layer_idx, q_len, k_len)  # (B, 1, Lq, Lk): positions, windows, validity
        m = self.prefix_length(layer_idx)
        block = torch.arange(q_len) // self.rows
        own = torch.cat([torch.ones(q_len, m, dtype=torch.bool), block[:, None] == block[None, :]], dim=1)
        mask = mask & own
        keep = self.keep[layer_idx]
        if keep is None:
            return mask
        b, _, _, lk = mask.shape
        h = keep.shape[1]
        mask = mask.expand(b, h, q_len, lk).clone()
        lo = self.chunk_start[layer_idx]
        mask[..., lo : lo + self.n] &= keep[block].permute(1, 0, 2)[None]  # (1, H, Lq, n)
        return mask.repeat_interleave(self.q_heads // h, dim=1)


@dataclass
class Replay:
    """The chunk's demonstrations replayed after it: teacher log-probs at the rows that predict
    answer tokens, the hidden state entering every layer, and per-layer importance of chunk tokens."""

    lm: ModelHandle
    building: Building
    chunk_k: list[torch.Tensor]
    chunk_v: list[torch.Tensor]
    chunk_pos: torch.Tensor
    ids: torch.Tensor  # (B, T)
    positions: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor  # (B, T) bool: rows that predict an answer token
    teacher: torch.Tensor | None = None
    hidden_in: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: list[torch.Tensor] = field(default_factory=list)
    replay_k: list[torch.Tensor] = field(default_factory=list)
    replay_v: list[torch.Tensor] = field(default_factory=list)
    scope: str = "answers"
    forwards: float = 0.0  # replay-forward equivalents spent (partial forwards count by depth and rows)
    js_checks: int = 0
    embeds: torch.Tensor | None = None  # (B, T, H) VLM input embeddings of the replay
    rope: torch.Tensor | None = None  # (3, B, T) M-RoPE ids of the replay (Qwen2-VL)
    _memo: dict[int, Any] = field(default_factory=dict, repr=False)
    _shared: dict[int, Any] = field(default_factory=dict, repr=False)
    _buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def batches(self) -> bool:
        """Whether several trials checked in one call cost about one check (answers scope)."""
        return self.scope != "exact"

    # ---- the teacher ---------------------------------------------------------------------------

    def run_teacher(self, kernel: int, protected: torch.Tensor) -> None:
        f = self.lm.facts
        cache = self.cache([None] * f.num_layers)
        cache.record_hidden = self.hidden_in
        raw: dict[int, torch.Tensor] = {}
        n = self.chunk_k[0].shape[-2]

        def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
            if f.sliding[layer]:
                return
            start = self.building.length(layer)
            raw[layer] = chunk_attention(module, q, k, mask, self.rows, start, start + n)

        cache.observer = observe
        cache.keep_new = True
        hidden = run(self.lm.model, cache, self.ids, self.positions, self.valid,
                     inputs_embeds=self.embeds, rope_positions=self.rope)
        self.replay_k = [cache.chunk_kv(i)[0] for i in range(f.num_layers)]
        self.replay_v = [cache.chunk_kv(i)[1] for i in range(f.num_layers)]
        self.forwards += 1
        self.teacher = self._log_probs(hidden[self.rows])
        self.scores = []
        for layer in range(f.num_layers):
            if layer in raw:
                s = pool(raw[layer], kernel)
                s[:, protected] = float("inf")
            else:
                s = torch.zeros(f.num_kv_heads, n)
            self.scores.append(s)

    def _log_probs(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(lm_logits(self.lm.model, self.lm.facts, hidden_rows), dim=-1)

    # ---- checks --------------------------------------------------------------------------------

    def divergence(self, selection: Selection, start_layer: int) -> float:
        """Mean JS to the teacher at the answer rows with ``selection`` applied from ``start_layer`` up."""
        return next(iter(self.divergences([selection], start_layer)))

    def divergences(self, trials: list[Selection], start_layer: int) -> Iterator[float]:
        """JS of several candidate selections, lazily in order (a caller that stops at the first
        failing trial pays nothing more for the rest). ``scope="answers"``: one batched re-forward of
        the answer rows, then the LM head per consumed trial; ``scope="exact"``: the whole replay
        re-run per trial (the reference)."""
        if self.scope == "exact":
            return (self._exact_divergence(t, start_layer) for t in trials)
        return self._answer_divergences(trials, start_layer)

    def _exact_divergence(self, selection: Selection, start_layer: int) -> float:
        f = self.lm.facts
        assert self.teacher is not None
        cache = self.cache(selection, start_layer)
        cache.start_hidden = self.hidden_in[start_layer]
        hidden = run(self.lm.model, cache, self.ids, self.positions, self.valid, rope_positions=self.rope)
        self.forwards += (f.num_layers - start_layer) / f.num_layers
        self.js_checks += 1
        return float(js_divergence(self.teacher, self._log_probs(hidden[self.rows])).mean())

    def _answer_divergences(self, trials: list[Selection], start_layer: int) -> Iterator[float]:
        f = self.lm.facts
        assert self.teacher is not None
        c = len(trials)
        ids, rpos, rvalid, gather_idx = self._answer_rows
        b, r = ids.shape
        n = self.chunk_k[0].shape[-2]
        layers = range(start_layer, f.num_layers)
        prefixes = {i: self._shared_prefix(i) for i in layers}
        keep: list[torch.Tensor | None] = [None] * f.num_layers
        for i in layers:
            keep[i] = _keep_masks([t[i] for t in trials], f.num_kv_heads, n)
        k, v, p, ok = ([prefixes.get(i, (None,) * 4)[j] for i in range(f.num_layers)] for j in range(4))
        cache = TrialCache(k, v, p, f.windows, prefix_valid=ok, keep=keep, n=n, rows=r, q_heads=f.num_heads,
                           chunk_start=[self.building.length(i) for i in range(f.num_layers)],
                           buffers=self._buffers)
        cache.start_layer = start_layer
        h = self.hidden_in[start_layer]
        cache.start_hidden = torch.gather(h, 1, gather_idx[..., None].expand(-1, -1, h.shape[-1])).repeat(1, c, 1)
        rope = None if self.rope is None else torch.gather(self.rope, 2, gather_idx[None].expand(3, -1, -1))
        hidden = run(self.lm.model, cache, ids.repeat(1, c), rpos.repeat(1, c), rvalid.repeat(1, c),
                     rope_positions=None if rope is None else rope.repeat(1, 1, c))
        share = float(rvalid.sum()) / float(self.valid.sum())
        self.forwards += share * (f.num_layers - start_layer) / f.num_layers
        for j in range(c):
            student = self._log_probs(hidden[:, j * r : (j + 1) * r][rvalid])
            self.js_checks += 1
            yield float(js_divergence(self.teacher, student).mean())

    # ---- prefixes ------------------------------------------------------------------------------

    def cache(self, selection: Selection, start_layer: int = 0) -> MemoryCache:
        """Memory + (selected) chunk for layers >= start_layer (the teacher, exact-scope checks)."""
        f = self.lm.facts
        keys: list[torch.Tensor | None] = [None] * f.num_layers
        values: list[torch.Tensor | None] = [None] * f.num_layers
        pos: list[torch.Tensor | None] = [None] * f.num_layers
        for layer in range(start_layer, f.num_layers):
            keys[layer], values[layer], pos[layer] = self._layer_prefix(layer, selection[layer])
        cache = MemoryCache(keys, values, pos, f.windows)
        cache.keep_new = False
        cache.start_layer = start_layer
        return cache

    def _layer_prefix(self, layer: int, idx: torch.Tensor | None) -> tuple[Any, Any, Any]:
        """One layer's memory + selected chunk, memoised per selection object: layers above the one
        being searched are already decided, so their tensors are built once, not once per check."""
        hit = self._memo.get(layer)  # one entry per layer bounds the memory to one cache's worth
        if hit is not None and hit[0] is idx:
            return hit[1]
        mk, mv, mp = self.building.prefix(layer)
        ck, cv, cp = self.chunk_k[layer], self.chunk_v[layer], self.chunk_pos
        if idx is not None:
            ck, cv, cp = gather_tokens(ck, idx), gather_tokens(cv, idx), self.chunk_pos[idx[0]]
        built = (_cat(mk, ck, 2), _cat(mv, cv, 2), _cat(mp, cp, 0))
        self._memo[layer] = (idx, built)
        return built

    def _shared_prefix(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Memory + whole chunk + the teacher's replay K/V (answer rows hidden: checks recompute
        them) for one layer, batch B: what every answers-scope trial reads (built once per chunk)."""
        hit = self._shared.get(layer)
        if hit is None:
            b = self.ids.shape[0]
            k, v, p = self._layer_prefix(layer, None)
            hit = (
                torch.cat([k.expand(b, -1, -1, -1), self.replay_k[layer]], dim=2),
                torch.cat([v.expand(b, -1, -1, -1), self.replay_v[layer]], dim=2),
                torch.cat([p[None].expand(b, -1), self.positions], dim=1),
                torch.cat([torch.ones(b, p.shape[0], dtype=torch.bool), self.valid & ~self.rows], dim=1),
            )
            self._shared[layer] = hit
        return hit

    @cached_property
    def _answer_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The answer rows of each replayed demonstration, packed left (B, r) with their positions
        (computed once per chunk, used by every check)."""
        counts = self.rows.sum(1)
        r = int(counts.max())
        b = self.ids.shape[0]
        gather_idx = torch.zeros(b, r, dtype=torch.long)
        valid = torch.zeros(b, r, dtype=torch.bool)
        for i in range(b):
            idx = self.rows[i].nonzero().flatten()
            gather_idx[i, : len(idx)] = idx
            valid[i, : len(idx)] = True
        ids = torch.gather(self.ids, 1, gather_idx)
        pos = torch.gather(self.positions, 1, gather_idx)
        return ids, pos, valid, gather_idx


def _keep_masks(selections: list[torch.Tensor | None], heads: int, n: int) -> torch.Tensor | None:
    """(trials, heads, n) chunk tokens each trial keeps at one layer, or None if all keep all."""
    if all(s is None for s in selections):
        return None
    keep = torch.ones(len(selections), heads, n, dtype=torch.bool)
    for j, s in enumerate(selections):
        if s is not None:
            keep[j] = False
            keep[j].scatter_(1, s, True)
    return keep


def chunk_attention(
    module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Attention (renormalised over keys lo:hi) that the selected query rows pay, summed over rows and
    over the query heads of each KV head -> (kv_heads, hi - lo). Recomputed for these rows only."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scaling = getattr(module, "scaling", d**-0.5)
    sel = rows.nonzero()  # (R, 2): batch, row
    qs = q[sel[:, 0], :, sel[:, 1]].float()  # (R, Hq, D)
    ks = k[sel[:, 0]].float()  # (R, Hkv, Lk, D)
    ks = ks.repeat_interleave(group, dim=1)
    logits = torch.einsum("rhd,rhkd->rhk", qs, ks) * scaling
    m = mask[sel[:, 0], 0, sel[:, 1]]  # (R, Lk)
    logits = logits.masked_fill(~m[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)[..., lo:hi]
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    return probs.sum(0).view(hkv, group, hi - lo).sum(1)
