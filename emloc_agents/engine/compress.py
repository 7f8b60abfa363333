"""Chunk-wise prefill onto the compressed memory of earlier chunks, pruning each chunk as it lands.

The loop (EMLoC, Ma et al. 2025): render demonstrations -> chunks of ``demos_per_chunk`` -> for each
chunk: prefill it on top of the memory (original positions), let a press choose the tokens each
layer keeps, append them to the memory. Earlier memory is never pruned again; sliding-window
layers keep only the window that any later token can still see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from ..config import EMLoCConfig
from ..skills import Skill, SkillError
from .cache import MemoryCache
from .facts import ModelFacts
from .memory import CompressedMemory
from .presses import EMLoCPress, Press, Selection, pool
from .prompt import Renderer, Segment
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


class ContextTooLongError(SkillError):
    """The demonstrations do not fit in the model's positions."""


# ---- model plumbing -------------------------------------------------------------------------


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
    valid: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    rope_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward of ``ids`` (B, T) at ``positions`` on ``cache``; returns last hidden states.

    VLMs (engine/vision.py): ``inputs_embeds`` (B, T, H) replaces the token embeddings (image features
    merged), and ``rope_positions`` (3, B, T) are M-RoPE ids while ``positions`` stay the 1-D sequence
    order for the masks. Without ``rope_positions`` RoPE gets ``positions + cache.rope_delta`` (0 for
    1-D models); a forward with explicit ids sets the delta for the tokens that follow it."""
    cache.begin(positions, valid)
    delta = getattr(cache, "rope_delta", 0)
    if rope_positions is None:
        rope_positions = positions + delta if delta else positions
    else:
        cache.rope_delta = int(rope_positions.max()) - int(positions.max())  # type: ignore[attr-defined]
    with active(cache), torch.inference_mode():
        out = backbone(model)(
            input_ids=None if inputs_embeds is not None else ids, inputs_embeds=inputs_embeds,
            position_ids=rope_positions, cache=cache, use_cache=True,
        )
    return out.last_hidden_state


# ---- the memory while it is being built ----------------------------------------------------


@dataclass
class _Building:
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    positions: list[torch.Tensor | None]  # (H, M)

    @classmethod
    def empty(cls, n: int) -> _Building:
        return cls([None] * n, [None] * n, [None] * n)

    def prefix(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        p = self.positions[layer]
        return self.keys[layer], self.values[layer], None if p is None else p[0]

    def length(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else int(k.shape[-2])


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (1, H, n, D), idx (H, k) -> (1, H, k, D)."""
    return torch.gather(t, 2, idx[None, :, :, None].expand(1, -1, -1, t.shape[-1]))


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=dim)


# ---- replay: teacher pass, importance, JS of a candidate -------------------------------------


def js_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) per row between two log-prob tensors (R, V)."""
    m_log = torch.logaddexp(p_log, q_log) - math.log(2.0)
    kl_pm = (p_log.exp() * (p_log - m_log)).sum(-1)
    kl_qm = (q_log.exp() * (q_log - m_log)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


@dataclass
class Replay:
    """The chunk's demonstrations replayed after it: teacher log-probs at the rows that predict
    answer tokens, the hidden state entering every layer, and per-layer importance of chunk tokens."""

    lm: ModelHandle
    building: _Building
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
    _memo: dict[int, Any] = field(default_factory=dict, repr=False)
    forwards: float = 0.0  # replay-forward equivalents spent (partial forwards count by depth)
    js_checks: int = 0
    embeds: torch.Tensor | None = None  # (B, T, H) VLM input embeddings of the replay
    rope: torch.Tensor | None = None  # (3, B, T) M-RoPE ids of the replay (Qwen2-VL)

    def _rope_rows(self, gather_idx: torch.Tensor) -> torch.Tensor | None:
        if self.rope is None:
            return None
        return torch.gather(self.rope, 2, gather_idx[None].expand(3, -1, -1))

    def cache(self, selection: Selection, start_layer: int = 0, with_replay: bool = False) -> MemoryCache:
        """Memory + (selected) chunk for layers >= start_layer; optionally the teacher's replay K/V
        too, with the answer rows hidden (they are recomputed as the new tokens)."""
        return self._search_cache(start_layer, lambda layer: self._layer_prefix(layer, selection[layer], with_replay))

    def _search_cache(self, start_layer: int, prefix_of: Callable[[int], tuple[Any, Any, Any, Any]]) -> MemoryCache:
        """A cache holding ``prefix_of(layer)`` (keys, values, positions, validity) for the layers a
        partial re-forward from ``start_layer`` runs; the layers below are skipped."""
        f = self.lm.facts
        keys: list[torch.Tensor | None] = [None] * f.num_layers
        values: list[torch.Tensor | None] = [None] * f.num_layers
        pos: list[torch.Tensor | None] = [None] * f.num_layers
        valid: list[torch.Tensor | None] = [None] * f.num_layers
        for layer in range(start_layer, f.num_layers):
            keys[layer], values[layer], pos[layer], valid[layer] = prefix_of(layer)
        cache = MemoryCache(keys, values, pos, f.windows, prefix_valid=valid)
        cache.keep_new = False
        cache.start_layer = start_layer
        return cache

    def _layer_prefix(self, layer: int, idx: torch.Tensor | None, with_replay: bool) -> tuple[Any, Any, Any, Any]:
        """One layer's prefix tensors, memoised per selection object: layers above the one being
        searched are already decided, so their tensors are built once, not once per check."""
        hit = self._memo.get(layer)  # one entry per layer bounds the memory to one cache's worth
        if hit is not None and hit[0] is idx and hit[1] == with_replay:
            return hit[2]
        built = self._make_prefix(layer, idx, with_replay)
        self._memo[layer] = (idx, with_replay, built)
        return built

    def _make_prefix(self, layer: int, idx: torch.Tensor | None, with_replay: bool) -> tuple[Any, Any, Any, Any]:
        b = self.ids.shape[0]
        mk, mv, mp = self.building.prefix(layer)
        ck, cv, cp = self.chunk_k[layer], self.chunk_v[layer], self.chunk_pos
        if idx is not None:
            ck, cv, cp = _gather(ck, idx), _gather(cv, idx), self.chunk_pos[idx[0]]
        k, v, p = _cat(mk, ck, 2), _cat(mv, cv, 2), _cat(mp, cp, 0)
        ok = None
        if with_replay:
            k = torch.cat([k.expand(b, -1, -1, -1), self.replay_k[layer]], dim=2)
            v = torch.cat([v.expand(b, -1, -1, -1), self.replay_v[layer]], dim=2)
            ok = torch.cat([torch.ones(b, p.shape[0], dtype=torch.bool), self.valid & ~self.rows], dim=1)
            p = torch.cat([p[None].expand(b, -1), self.positions], dim=1)
        return k, v, p, ok

    def _layer_prefix_padded(self, layer: int, idx: torch.Tensor | None, width: int) -> tuple[Any, Any, Any, Any]:
        """Like ``_layer_prefix(with_replay=True)`` with the chunk part padded to ``width`` tokens."""
        # the unpruned prefix is shared by every trial (memoised); pruned ones are built per trial
        k, v, p, ok = self._layer_prefix(layer, idx, True) if idx is None else self._make_prefix(layer, idx, True)
        n_sel = self.chunk_k[layer].shape[-2] if idx is None else idx.shape[-1]
        if n_sel == width:
            return k, v, p, ok
        b, h, _, d = k.shape
        m = self.building.length(layer)
        pad = width - n_sel
        split = m + n_sel
        zk = k.new_zeros(b, h, pad, d)
        k = torch.cat([k[:, :, :split], zk, k[:, :, split:]], dim=2)
        v = torch.cat([v[:, :, :split], zk, v[:, :, split:]], dim=2)
        p = torch.cat([p[:, :split], p.new_zeros(b, pad), p[:, split:]], dim=1)
        ok = torch.cat([ok[:, :split], ok.new_zeros(b, pad), ok[:, split:]], dim=1)
        return k, v, p, ok

    def divergences(self, trials: list[Selection], start_layer: int) -> list[float]:
        """JS of several candidate selections at once: with ``scope="answers"`` they run as one
        batch (the re-forward of a few rows is bound by reading the weights, so candidates are
        almost free); with ``scope="exact"`` one after the other."""
        if self.scope == "exact":
            return [self.divergence(t, start_layer) for t in trials]
        return self._answer_divergences(trials, start_layer)

    def _answer_divergences(self, trials: list[Selection], start_layer: int) -> list[float]:
        """``scope="answers"``: re-run only the answer rows of each trial (trials batched)."""
        f = self.lm.facts
        assert self.teacher is not None
        c = len(trials)

        def prefix_of(layer: int) -> tuple[Any, Any, Any, Any]:
            idxs = [t[layer] for t in trials]
            if all(i is idxs[0] for i in idxs):
                k, v, p, ok = self._layer_prefix(layer, idxs[0], True)
                return k.repeat(c, 1, 1, 1), v.repeat(c, 1, 1, 1), p.repeat(c, 1), ok.repeat(c, 1)
            width = max(self.chunk_k[layer].shape[-2] if i is None else i.shape[-1] for i in idxs)
            parts = [self._layer_prefix_padded(layer, i, width) for i in idxs]
            return tuple(torch.cat([x[j] for x in parts]) for j in range(4))  # type: ignore[return-value]

        cache = self._search_cache(start_layer, prefix_of)
        ids, rpos, rvalid, gather_idx = self._answer_rows
        h = self.hidden_in[start_layer]
        cache.start_hidden = torch.gather(h, 1, gather_idx[..., None].expand(-1, -1, h.shape[-1])).repeat(c, 1, 1)
        rope = self._rope_rows(gather_idx)
        hidden = run(self.lm.model, cache, ids.repeat(c, 1), rpos.repeat(c, 1), rvalid.repeat(c, 1),
                     rope_positions=None if rope is None else rope.repeat(1, c, 1))
        b = ids.shape[0]
        out = []
        for i in range(c):
            hs = hidden[i * b : (i + 1) * b][rvalid]
            student = torch.log_softmax(lm_logits(self.lm.model, f, hs), dim=-1)
            out.append(float(js_divergence(self.teacher, student).mean()))
        share = float(rvalid.sum()) / float(self.valid.sum())
        self.forwards += share * (f.num_layers - start_layer) / f.num_layers
        self.js_checks += c
        return out

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(self.lm.model, self.lm.facts, hidden[self.rows])
        return torch.log_softmax(logits, dim=-1)

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
        self.teacher = self.log_probs(hidden)
        self.scores = []
        for layer in range(f.num_layers):
            if layer in raw:
                s = pool(raw[layer], kernel)
                s[:, protected] = float("inf")
            else:
                s = torch.zeros(f.num_kv_heads, n)
            self.scores.append(s)

    def divergence(self, selection: Selection, start_layer: int) -> float:
        """Mean JS to the teacher at the answer rows with ``selection`` applied from ``start_layer`` up.

        ``scope="exact"`` re-runs the whole replay from the saved hidden state (the reference);
        ``scope="answers"`` re-runs only the answer rows, reading the other replay rows' K/V from
        the teacher pass: ~T/|answers| times cheaper, and it measures the pruning's effect on the
        tokens that produce the answers directly."""
        if self.scope != "exact":
            return self._answer_divergences([selection], start_layer)[0]
        f = self.lm.facts
        assert self.teacher is not None
        cache = self.cache(selection, start_layer)
        cache.start_hidden = self.hidden_in[start_layer]
        hidden = run(self.lm.model, cache, self.ids, self.positions, self.valid, rope_positions=self.rope)
        self.forwards += (f.num_layers - start_layer) / f.num_layers
        self.js_checks += 1
        return float(js_divergence(self.teacher, self.log_probs(hidden)).mean())

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


# ---- chunks --------------------------------------------------------------------------------


@dataclass
class Chunk:
    ids: list[int]
    protected: list[bool]
    demos: list[Segment]
    parts: list[Segment] = field(default_factory=list)  # prefix (first chunk) + demos, for VLM embeddings


def plan_chunks(prefix: Segment, demos: list[Segment], per_chunk: int, protect_prefix: bool) -> list[Chunk]:
    chunks: list[Chunk] = []
    for start in range(0, max(len(demos), 1), per_chunk):
        group = demos[start : start + per_chunk]
        ids: list[int] = []
        protected: list[bool] = []
        if start == 0:
            ids += prefix.ids
            protected += [protect_prefix] * len(prefix.ids)
        for d in group:
            ids += d.ids
            protected += d.answer
        chunks.append(Chunk(ids, protected, group, ([prefix] if start == 0 else []) + group))
    return chunks


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

    def record(self, layer: int, ratio: float, js: float | None) -> None:
        self.decisions.append({"layer": layer, "ratio": ratio, "js": js})


def _replay_batch(demos: list[Segment], start: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    t = max(len(d) for d in demos)
    b = len(demos)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    valid = torch.zeros(b, t, dtype=torch.bool)
    rows = torch.zeros(b, t, dtype=torch.bool)
    for i, d in enumerate(demos):
        ids[i, : len(d)] = torch.tensor(d.ids)
        valid[i, : len(d)] = True
        ans = torch.tensor(d.answer)
        rows[i, : len(d) - 1] = ans[1:]  # row j predicts token j+1
    positions = (start + torch.arange(t))[None].expand(b, -1).contiguous()
    return ids, positions, valid, rows


def _window_observer(facts: ModelFacts, window: int, store: dict[int, torch.Tensor], start_of: Callable[[int], int]):
    def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        if facts.sliding[layer]:
            return
        t = q.shape[2]
        rows = torch.zeros(q.shape[0], t, dtype=torch.bool)
        rows[:, max(0, t - window) :] = True
        lo = start_of(layer)
        store[layer] = chunk_attention(module, q, k, mask, rows, lo, lo + t)

    return observe


def press_for(config: EMLoCConfig) -> Press:
    if not config.prunes:
        return Press()
    return EMLoCPress(config.keep_ratios, config.delta, config.layer_group_size, config.batch_candidates)


def compress(
    lm: ModelHandle,
    skill: Skill,
    config: EMLoCConfig | None = None,
    press: Press | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CompressedMemory:
    """Compress ``skill``'s demonstrations into a memory for ``lm`` (see module docstring)."""
    config = config or EMLoCConfig()
    press = press or press_for(config)
    if not skill.demonstrations:
        raise SkillError(f"skill {skill.name!r} has no demonstrations to compress")
    vision = getattr(lm, "vision", None)  # VisionAdapter for VLMs (engine/vision.py)
    if skill.has_images and vision is None:
        raise SkillError(f"skill {skill.name!r} has images but {lm.facts.model_type} is a text-only model")
    f = lm.facts
    renderer = lm.renderer(config.prompt_format)
    prefix = renderer.prefix(skill.instruction)
    demos = [renderer.demo(d.input, d.output, skill.instruction, **({"images": d.images} if d.images else {}))
             for d in skill.demonstrations]
    chunks = plan_chunks(prefix, demos, config.demos_per_chunk, config.protect_prefix)
    total = sum(len(c.ids) for c in chunks)
    if f.max_positions and total >= f.max_positions:
        raise ContextTooLongError(
            f"skill {skill.name!r}: {total} demonstration tokens exceed the model's {f.max_positions} positions"
        )
    device = lm.device
    building = _Building.empty(f.num_layers)
    offset = 0
    rope_next = 0  # next free RoPE index (differs from offset for M-RoPE VLMs)
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"chunks": len(chunks), "replay_forwards": 0.0, "js_checks": 0, "decisions": []}
    prefill_s = 0.0
    pad_id = getattr(lm.tokenizer, "pad_token_id", None) or 0
    for ci, chunk in enumerate(chunks):
        n = len(chunk.ids)
        pos = (offset + torch.arange(n, device=device))[None]
        mem_k, mem_v, mem_p = zip(*(building.prefix(i) for i in range(f.num_layers)), strict=True)
        cache = MemoryCache(mem_k, mem_v, mem_p, f.windows)
        window_scores: dict[int, torch.Tensor] = {}
        if press.needs_window_scores:
            cache.observer = _window_observer(f, getattr(press, "window", 32), window_scores, building.length)
        tp = time.perf_counter()
        embeds = rope = None
        rope_end = rope_next + n
        if vision is not None:
            embeds, rope, rope_end = vision.segments_inputs(chunk.parts, rope_next)
        run(lm.model, cache, torch.tensor([chunk.ids], device=device), pos, inputs_embeds=embeds, rope_positions=rope)
        prefill_s += time.perf_counter() - tp
        chunk_k, chunk_v = zip(*(cache.chunk_kv(i) for i in range(f.num_layers)), strict=True)
        del cache
        chunk_pos = pos[0]
        protected = torch.tensor(chunk.protected, dtype=torch.bool)
        replay = None
        if press.needs_replay and chunk.demos:
            ids, rpos, valid, rows = _replay_batch(chunk.demos, offset + n, pad_id)
            replay = Replay(lm, building, list(chunk_k), list(chunk_v), chunk_pos, ids, rpos, valid, rows,
                            scope=config.search_scope)
            if vision is not None:
                replay.embeds, replay.rope = vision.batch_inputs(chunk.demos, ids.shape[1], rope_end)
            replay.run_teacher(config.pool_kernel, protected)
        ctx = ChunkContext(
            f, n, int(protected.sum()), offset, total, replay,
            [window_scores.get(i, torch.zeros(f.num_kv_heads, n)) for i in range(f.num_layers)]
            if press.needs_window_scores else None,
        )
        selection = press.select(ctx)
        for layer in range(f.num_layers):
            ck, cv, cp = chunk_k[layer], chunk_v[layer], chunk_pos[None].expand(f.num_kv_heads, -1)
            idx = selection[layer]
            if idx is not None:
                ck, cv, cp = _gather(ck, idx), _gather(cv, idx), torch.gather(cp, 1, idx)
            building.keys[layer] = _cat(building.keys[layer], ck, 2)
            building.values[layer] = _cat(building.values[layer], cv, 2)
            building.positions[layer] = _cat(building.positions[layer], cp, 1)
            window = f.windows[layer]
            if window:  # later tokens (positions >= offset + n) only see positions > offset + n - window
                keep = building.positions[layer][0] > offset + n - window  # type: ignore[index]
                building.keys[layer] = building.keys[layer][:, :, keep]  # type: ignore[index]
                building.values[layer] = building.values[layer][:, :, keep]  # type: ignore[index]
                building.positions[layer] = building.positions[layer][:, keep]  # type: ignore[index]
        if replay is not None:
            stats["replay_forwards"] += replay.forwards
            stats["js_checks"] += replay.js_checks
        stats["decisions"].append(ctx.decisions)
        offset += n
        rope_next = rope_end
        if progress:
            progress(ci + 1, len(chunks))
    dtype = getattr(torch, config.storage_dtype)
    stats.update(compress_s=time.perf_counter() - t0, prefill_s=prefill_s, press=press.name)
    return CompressedMemory(
        keys=[k[0].to(dtype).contiguous() for k in building.keys],  # type: ignore[index]
        values=[v[0].to(dtype).contiguous() for v in building.values],  # type: ignore[index]
        positions=[p.contiguous() for p in building.positions],  # type: ignore[union-attr]
        original_length=offset,
        sliding=list(f.sliding),
        render_mode=renderer.mode,
        next_position=rope_next if vision is not None and vision.mrope else None,
        header={"skill": skill.name, "instruction": skill.instruction},
        stats=stats,
    )
