"""The pruning search's measurements for one chunk: replay its demonstrations after it, and tell how
far a candidate selection moves the model's answers from that teacher (Jensen-Shannon divergence).

The replayed demonstrations are packed into one sequence (each from the same position, seeing only
itself; ``MemoryCache`` segments), so the memory is never copied once per demonstration.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .cache import MemoryCache, join_valid
from .forward import ModelHandle, lm_logits, run
from .memory import PAD
from .selection import Selection, pool


def js_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) per row between two log-prob tensors (R, V)."""
    m_log = torch.logaddexp(p_log, q_log) - math.log(2.0)
    kl_pm = (p_log.exp() * (p_log - m_log)).sum(-1)
    kl_qm = (q_log.exp() * (q_log - m_log)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (1, H, n, D), idx (H, k) -> (1, H, k, D); a padded slot (idx -1) gets token 0's vector
    (never visible: its position is PAD)."""
    return torch.gather(t, 2, idx.clamp_min(0)[None, :, :, None].expand(1, -1, -1, t.shape[-1]))


def gather_positions(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """pos (n,) or (H, n), idx (H, k) -> (H, k) positions of the selected tokens, PAD where idx is -1."""
    pos = pos[None].expand(idx.shape[0], -1) if pos.dim() == 1 else pos
    return torch.gather(pos, 1, idx.clamp_min(0)).masked_fill(idx < 0, PAD)


def is_padded(idx: torch.Tensor | None) -> bool:
    """Whether a selection pads some heads (per-head budgets); reads one flag from the device."""
    return idx is not None and bool((idx < 0).any())


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=dim)


@dataclass
class Building:
    """The memory while it is being built: per layer keys/values (1, H, M, D), positions (H, M)
    (PAD in the spare slots of heads that keep fewer tokens; ``padded`` says which layers have any)."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    positions: list[torch.Tensor | None]
    padded: list[bool] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int) -> Building:
        return cls([None] * n, [None] * n, [None] * n, [False] * n)

    def valid(self, layer: int) -> torch.Tensor | None:
        """(H, M) slots that hold a token, or None if all do."""
        p = self.positions[layer]
        return None if p is None or not self.padded[layer] else p >= 0

    def prefix(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        p = self.positions[layer]
        return self.keys[layer], self.values[layer], None if p is None else p[0]

    def length(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else int(k.shape[-2])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, padded: bool = False) -> None:
        self.padded[layer] = self.padded[layer] or padded
        self.keys[layer] = _cat(self.keys[layer], k, 2)
        self.values[layer] = _cat(self.values[layer], v, 2)
        self.positions[layer] = _cat(self.positions[layer], pos, 1)

    def keep_after(self, layer: int, position: int) -> None:
        """Drop the tokens at positions <= ``position`` (what a sliding window can no longer see)."""
        pos = self.positions[layer]
        assert pos is not None and not self.padded[layer]  # sliding layers are never pruned
        keep = pos[0] > position
        self.keys[layer] = self.keys[layer][:, :, keep]  # type: ignore[index]
        self.values[layer] = self.values[layer][:, :, keep]  # type: ignore[index]
        self.positions[layer] = pos[:, keep]


class TrialCache(MemoryCache):
    """Several candidate selections checked in one forward of the answer rows.

    The forward is one packed row: ``trials`` blocks of the answer rows of every replayed
    demonstration (``row_trial``, ``row_demo`` per query). Every block reads the same per-layer
    prefix (memory + whole chunk + packed replay); a row sees memory and chunk, the replay tokens of
    its own demonstration (``prefix_segments``: -1 shared, d = demonstration d, -2 never: the answer
    rows, recomputed here) and the new tokens of its own block and demonstration. ``keep[layer]``
    (trials, kv_heads, n) says which chunk tokens (prefix columns ``chunk_start[layer]`` ... + n)
    each trial keeps, per head: masking a key out of the softmax is the same as dropping it, so this
    equals gathering the kept tokens without a K/V copy per trial. The prefix K/V are views of
    per-layer buffers with room behind them, and new keys are written into that room: a check
    allocates no K/V at all."""

    def __init__(self, *args: Any, keep: list[torch.Tensor | None], chunk_start: list[int], n: int,
                 prefix_segments: list[torch.Tensor | None], row_trial: torch.Tensor, row_demo: torch.Tensor,
                 q_heads: int, buffers: list[tuple[torch.Tensor, torch.Tensor] | None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep, self.chunk_start, self.n, self.q_heads = keep, chunk_start, n, q_heads
        self.prefix_segments, self.row_trial, self.row_demo = prefix_segments, row_trial, row_demo
        self.buffers = buffers
        self.keep_new = False

    @cached_property
    def _same_block(self) -> torch.Tensor:
        """(Lq, Lq): a new row sees the new rows of its own trial and demonstration (every layer)."""
        return (self.row_trial[:, None] == self.row_trial[None, :]) & (self.row_demo[:, None] == self.row_demo[None, :])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.buffers[layer_idx]
        assert buf is not None and self.keys[layer_idx] is None  # one forward per check
        m, t = self.prefix_length(layer_idx), key_states.shape[-2]
        buf[0][:, :, m : m + t], buf[1][:, :, m : m + t] = key_states, value_states
        k, v = buf[0][:, :, : m + t], buf[1][:, :, : m + t]
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def attention_mask(self, layer_idx: int, q_len: int, k_len: int) -> torch.Tensor:
        mask = self.positional_mask(layer_idx, q_len, k_len)  # (1, 1, Lq, Lk): causal, windows
        pseg = self.prefix_segments[layer_idx]
        assert pseg is not None
        sees_prefix = (pseg[None, :] == -1) | (pseg[None, :] == self.row_demo[:, None])  # + its own replay
        mask = mask & torch.cat([sees_prefix, self._same_block], dim=1)
        keep = self.keep[layer_idx]
        if keep is None:
            return mask
        h = keep.shape[1]
        mask = mask.expand(1, h, q_len, k_len).clone()
        lo = self.chunk_start[layer_idx]
        mask[..., lo : lo + self.n] &= keep[self.row_trial].permute(1, 0, 2)[None]  # (1, H, Lq, n)
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
    ids: torch.Tensor  # (1, T): the chunk's demonstrations packed
    positions: torch.Tensor  # (1, T): each demonstration from the position after the chunk
    segments: torch.Tensor  # (1, T): which demonstration a token belongs to
    rows: torch.Tensor  # (1, T) bool: rows that predict an answer token
    teacher: torch.Tensor | None = None
    hidden_in: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: list[torch.Tensor] = field(default_factory=list)
    replay_k: list[torch.Tensor] = field(default_factory=list)
    replay_v: list[torch.Tensor] = field(default_factory=list)
    scope: str = "answers"
    forwards: float = 0.0  # replay-forward equivalents spent (partial forwards count by depth and rows)
    js_checks: int = 0
    check_forwards: int = 0  # re-forwards run by checks (each reads the weights once)
    embeds: torch.Tensor | None = None  # (1, T, H) VLM input embeddings of the replay
    rope: torch.Tensor | None = None  # (3, 1, T) M-RoPE ids of the replay (Qwen2-VL)
    _memo: dict[int, Any] = field(default_factory=dict, repr=False)
    _shared: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def batches(self) -> bool:
        """Whether several trials checked in one call cost about one check (answers scope)."""
        return self.scope != "exact"

    # ---- the teacher ---------------------------------------------------------------------------

    def run_teacher(self, kernel: int, protected: torch.Tensor, keys: str = "chunk", count_pad: bool = False) -> None:
        """``keys``: renormalise the answer rows' attention over the chunk (``"chunk"``) or over chunk +
        replay (``"chunk+replay"``, the reference) before summing; ``count_pad``: see ``pool``."""
        f = self.lm.facts
        cache = self.cache([None] * f.num_layers)
        cache.record_hidden = self.hidden_in
        raw: dict[int, torch.Tensor] = {}
        n = self.chunk_k[0].shape[-2]

        def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
            if f.sliding[layer]:
                return
            start = self.building.length(layer)
            norm_end = k.shape[-2] if keys == "chunk+replay" else None
            raw[layer] = chunk_attention(module, q, k, mask, self.rows, start, start + n, norm_end)

        cache.observer = observe
        cache.keep_new = True
        hidden = run(self.lm.model, cache, self.ids, self.positions, segments=self.segments,
                     inputs_embeds=self.embeds, rope_positions=self.rope)
        self.replay_k = [cache.chunk_kv(i)[0] for i in range(f.num_layers)]
        self.replay_v = [cache.chunk_kv(i)[1] for i in range(f.num_layers)]
        self.forwards += 1
        self.teacher = self._log_probs(hidden[self.rows])
        self.scores = []
        for layer in range(f.num_layers):
            if layer in raw:
                s = pool(raw[layer], kernel, count_pad)
                s[:, protected] = float("inf")
            else:
                s = torch.zeros(f.num_kv_heads, n, device=self.ids.device)
            self.scores.append(s)

    def _log_probs(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(lm_logits(self.lm.model, self.lm.facts, hidden_rows), dim=-1)

    # ---- checks --------------------------------------------------------------------------------

    def divergence(self, selection: Selection, start_layer: int) -> float:
        """Mean JS to the teacher at the answer rows with ``selection`` applied from ``start_layer`` up."""
        return next(iter(self.divergences([selection], start_layer)))

    def divergences(self, trials: list[Selection], start_layer: int) -> Iterator[float]:
        """JS of several candidate selections, in order (a caller may stop at the first failing
        trial). ``scope="answers"``: one batched re-forward of the answer rows of all trials;
        ``scope="exact"``: the whole replay re-run per trial, lazily (the reference)."""
        if self.scope == "exact":
            return (self._exact_divergence(t, start_layer) for t in trials)
        return iter(self.answer_trials(trials, start_layer).js(range(len(trials))))

    def _exact_divergence(self, selection: Selection, start_layer: int) -> float:
        f = self.lm.facts
        assert self.teacher is not None
        cache = self.cache(selection, start_layer)
        cache.start_hidden = self.hidden_in[start_layer]
        hidden = run(self.lm.model, cache, self.ids, self.positions, segments=self.segments,
                     rope_positions=self.rope)
        self.forwards += (f.num_layers - start_layer) / f.num_layers
        self.check_forwards += 1
        self.js_checks += 1
        return float(js_divergence(self.teacher, self._log_probs(hidden[self.rows])).mean())

    def answer_trials(self, trials: list[Selection], start_layer: int) -> TrialResults:
        """One batched re-forward of the answer rows of every trial (answers scope); their JS values
        are read from the result as needed (``TrialResults.js``)."""
        if self.scope == "exact":
            raise ValueError("answer_trials needs search_scope='answers'")
        f = self.lm.facts
        assert self.teacher is not None
        c = len(trials)
        idx, ids, pos, demo = self._answer_rows
        r = idx.shape[0]
        n = self.chunk_k[0].shape[-2]
        layers = range(start_layer, f.num_layers)
        prefixes = {i: self._shared_prefix(i, room=c * r) for i in layers}
        keep: list[torch.Tensor | None] = [None] * f.num_layers
        for i in layers:
            keep[i] = _keep_masks([t[i] for t in trials], f.num_kv_heads, n, self.ids.device)
        k, v, p, seg, buffers, valid = ([prefixes[i][j] if i in prefixes else None for i in range(f.num_layers)]
                                        for j in range(6))
        cache = TrialCache(k, v, p, f.windows, valid, keep=keep, n=n, prefix_segments=seg, q_heads=f.num_heads,
                           row_trial=torch.arange(c, device=ids.device).repeat_interleave(r), row_demo=demo.repeat(c),
                           chunk_start=[self.building.length(i) for i in range(f.num_layers)], buffers=buffers)
        cache.start_layer = start_layer
        cache.start_hidden = self.hidden_in[start_layer][:, idx].repeat(1, c, 1)
        rope = None if self.rope is None else self.rope[:, :, idx].repeat(1, 1, c)
        hidden = run(self.lm.model, cache, ids.repeat(1, c), pos.repeat(1, c), rope_positions=rope)
        self.forwards += r / self.ids.shape[1] * (f.num_layers - start_layer) / f.num_layers
        self.check_forwards += 1
        return TrialResults(self, hidden[0].view(c, r, -1))

    # ---- prefixes ------------------------------------------------------------------------------

    def cache(self, selection: Selection, start_layer: int = 0) -> MemoryCache:
        """Memory + (selected) chunk for layers >= start_layer (the teacher, exact-scope checks)."""
        f = self.lm.facts
        keys: list[torch.Tensor | None] = [None] * f.num_layers
        values: list[torch.Tensor | None] = [None] * f.num_layers
        pos: list[torch.Tensor | None] = [None] * f.num_layers
        valid: list[torch.Tensor | None] = [None] * f.num_layers
        for layer in range(start_layer, f.num_layers):
            keys[layer], values[layer], pos[layer], valid[layer] = self._layer_prefix(layer, selection[layer])
        cache = MemoryCache(keys, values, pos, f.windows, valid)
        cache.keep_new = False
        cache.start_layer = start_layer
        return cache

    def _layer_prefix(self, layer: int, idx: torch.Tensor | None) -> tuple[Any, Any, Any, Any]:
        """One layer's memory + selected chunk (keys, values, positions, valid slots or None),
        memoised per selection object: layers above the one being searched are already decided, so
        their tensors are built once, not once per check."""
        hit = self._memo.get(layer)  # one entry per layer bounds the memory to one cache's worth
        if hit is not None and hit[0] is idx:
            return hit[1]
        mk, mv, mp = self.building.prefix(layer)
        ck, cv, cp = self.chunk_k[layer], self.chunk_v[layer], self.chunk_pos
        chunk_valid = None
        if idx is not None:
            ck, cv, cp = gather_tokens(ck, idx), gather_tokens(cv, idx), self.chunk_pos[idx[0].clamp_min(0)]
            chunk_valid = idx >= 0 if is_padded(idx) else None
        valid = join_valid([(self.building.valid(layer), self.building.length(layer)), (chunk_valid, ck.shape[-2])])
        built = (_cat(mk, ck, 2), _cat(mv, cv, 2), _cat(mp, cp, 0), valid)
        self._memo[layer] = (idx, built)
        return built

    def _shared_prefix(self, layer: int, room: int) -> tuple[Any, ...]:
        """Memory + whole chunk + the teacher's packed replay K/V for one layer, with positions and
        segments (-1: memory and chunk; d: demonstration d; -2: answer rows, which checks recompute):
        what every answers-scope trial reads. Built once per chunk, into buffers with ``room`` free
        tokens behind the prefix for a check's new keys (regrown if a later check needs more)."""
        hit = self._shared.get(layer)
        if hit is None or hit[4][0].shape[-2] < hit[0].shape[-2] + room:
            if hit is None:
                k, v, p, valid = self._layer_prefix(layer, None)
                self._memo.pop(layer, None)  # checks read the buffers only
                valid = join_valid([(valid, k.shape[-2]), (None, self.replay_k[layer].shape[-2])])
                k, v = torch.cat([k, self.replay_k[layer]], dim=2), torch.cat([v, self.replay_v[layer]], dim=2)
                seg = self.segments[0].masked_fill(self.rows[0], -2)
                p = torch.cat([p, self.positions[0]])
                seg = torch.cat([torch.full((p.shape[0] - seg.shape[0],), -1, dtype=torch.long, device=seg.device), seg])
            else:
                k, v, p, seg, _, valid = hit
            m = k.shape[-2]
            bk = k.new_empty(*k.shape[:2], m + room, k.shape[-1])
            bv = v.new_empty(*v.shape[:2], m + room, v.shape[-1])
            bk[:, :, :m], bv[:, :, :m] = k, v
            hit = (bk[:, :, :m], bv[:, :, :m], p, seg, (bk, bv), valid)
            self._shared[layer] = hit
        return hit

    @cached_property
    def _answer_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the answer rows are in the packed replay, their ids (1, R), positions (1, R) and
        demonstrations (R,) (computed once per chunk, used by every check)."""
        idx = self.rows[0].nonzero().flatten()
        return idx, self.ids[:, idx], self.positions[:, idx], self.segments[0, idx]


@dataclass
class TrialResults:
    """The answer rows' last hidden states of a batch of trials; ``js`` applies the LM head to the
    trials asked for (one read of the head for all of them), so trials nobody looks at cost no
    vocabulary-sized work."""

    replay: Replay
    hidden: torch.Tensor  # (trials, rows, hidden)
    _js: dict[int, float] = field(default_factory=dict)

    def js(self, trials: Iterable[int]) -> list[float]:
        """Mean JS to the teacher of each trial in ``trials`` (computed once)."""
        trials = list(trials)
        todo = [j for j in dict.fromkeys(trials) if j not in self._js]
        if todo:
            teacher = self.replay.teacher
            assert teacher is not None
            rows = self.hidden.shape[1]
            students = self.replay._log_probs(self.hidden[todo].flatten(0, 1))
            values = js_divergence(teacher.repeat(len(todo), 1), students).view(len(todo), rows).mean(1)
            self._js.update(zip(todo, values.tolist(), strict=True))  # one device sync for all
            self.replay.js_checks += len(todo)
        return [self._js[j] for j in trials]


def _keep_masks(
    selections: list[torch.Tensor | None], heads: int, n: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """(trials, heads, n) chunk tokens each trial keeps at one layer, or None if all keep all. Trials
    share a layer's few candidate selections (the same tensors), so each is scattered once."""
    if all(s is None for s in selections):
        return None
    table = [torch.ones(heads, n, dtype=torch.bool, device=device)]  # row 0: keep all
    row_of: dict[int, int] = {}
    which = []
    for s in selections:
        if s is not None and id(s) not in row_of:
            row_of[id(s)] = len(table)
            slots = torch.zeros(heads, n + 1, dtype=torch.bool, device=device)  # column n: padded slots
            table.append(slots.scatter_(1, s.masked_fill(s < 0, n), True)[:, :n])
        which.append(0 if s is None else row_of[id(s)])
    return torch.stack(table)[torch.tensor(which, device=device)]


def chunk_attention(
    module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, lo: int, hi: int,
    norm_end: int | None = None,
) -> torch.Tensor:
    """Attention (renormalised over keys lo:norm_end, default lo:hi) that the selected query rows pay to
    keys lo:hi, summed over rows and over the query heads of each KV head -> (kv_heads, hi - lo).
    Recomputed for these rows only."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scaling = getattr(module, "scaling", d**-0.5)
    sel = rows.nonzero()  # (R, 2): batch, row
    qs = q[sel[:, 0], :, sel[:, 1]].float()  # (R, Hq, D)
    ks = k[sel[:, 0]].float()  # (R, Hkv, Lk, D)
    ks = ks.repeat_interleave(group, dim=1)
    logits = torch.einsum("rhd,rhkd->rhk", qs, ks) * scaling
    m = mask[sel[:, 0], :, sel[:, 1]]  # (R, 1 | Hq, Lk): per query head where slots are padded
    logits = logits.masked_fill(~m, float("-inf"))
    probs = torch.softmax(logits, dim=-1)[..., lo : hi if norm_end is None else norm_end]
    probs = (probs / probs.sum(-1, keepdim=True).clamp_min(1e-12))[..., : hi - lo]
    return probs.sum(0).view(hkv, group, hi - lo).sum(1)
