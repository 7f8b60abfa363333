"""The chunk-wise method (``compression="chunks"``, the paper's loop): prefill onto the compressed memory
of earlier chunks, pruning each chunk as it lands.

The loop (EMLoC, Ma et al. 2025): render demonstrations -> chunks of ``demos_per_chunk`` -> for each
chunk: prefill it on top of the memory (original positions), let a press choose the tokens each
layer keeps, append them to the memory. Earlier memory is never pruned again; sliding-window
layers keep only the window that any later token can still see.

The press says what it needs measured (``Press.needs_replay``, ``needs_window_scores``,
``needs_reconstruction``, ``observation_window``, ``reconstruction_sinks``); the loop never asks which
press it holds. ``compress_chunks`` is the method's entry point (``engine/compress.py`` registers it);
``prefill`` is the same loop with nothing pruned: the unpruned context other methods start from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import EMLoCConfig
from ..skills import Skill, SkillError
from .cache import MemoryCache
from .chunks import ChunkContext
from .facts import ModelFacts
from .forward import ModelHandle, clock, run
from .memory import CompressedMemory, certificate
from .presses import EMLoCPress, Press
from .prompt import Segment
from .reconstruct import REPEAT_PROMPT, reconstruction_scores
from .replay import Building, Replay, chunk_attention, gather_positions, gather_tokens, is_padded

PREFILL_TOKENS = 16384  # at most about this many tokens per forward when the whole context is prefilled:
# up to it one forward, plain causal with no mask, as fast as a transformers prefill (2k-token forwards
# with masks took 1.3x as long on the CPU)


class ContextTooLongError(SkillError):
    """The demonstrations do not fit in the model's positions."""


@dataclass(frozen=True)
class LoopOptions:
    """What the loop reads besides the press: how demonstrations become chunks and how a replay scores
    them (the chunk-wise fields of ``EMLoCConfig``; ``of`` takes them from one)."""

    demos_per_chunk: int = 4
    protect_prefix: bool = True
    prompt_format: str = "auto"
    storage_dtype: str = "float16"
    search_scope: str = "answers"
    pool_kernel: int = 5
    importance_keys: str = "chunk"
    pool_count_pad: bool = False

    @classmethod
    def of(cls, config: EMLoCConfig) -> LoopOptions:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


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


def answer_rows(demo: Segment, device: torch.device | str = "cpu") -> torch.Tensor:
    """(len,) bool: the rows that predict an answer token (row j predicts token j + 1)."""
    return torch.tensor(demo.answer[1:] + [False], dtype=torch.bool, device=device)


def prefill_chunk(prefix: Segment, demos: Sequence[Segment]) -> int:
    """Demonstrations per forward for an unpruned prefill: about ``PREFILL_TOKENS`` tokens each (few large
    forwards; unpruned, the chunk loop equals one prefill)."""
    tokens = len(prefix) + sum(len(d) for d in demos)
    return max(1, PREFILL_TOKENS * len(demos) // max(1, tokens))


def _replay_pack(demos: list[Segment], start: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The demonstrations packed into one row (1, T), each from position ``start``; per token its
    demonstration index, and the rows that predict an answer token (row j predicts token j+1);
    all on ``device`` (the model's)."""
    ids = torch.tensor([[t for d in demos for t in d.ids]], dtype=torch.long, device=device)
    positions = torch.tensor([[start + j for d in demos for j in range(len(d))]], dtype=torch.long, device=device)
    segments = torch.tensor([[i for i, d in enumerate(demos) for _ in range(len(d))]], dtype=torch.long, device=device)
    rows = torch.cat([answer_rows(d, device) for d in demos])[None]
    return ids, positions, segments, rows


def _window_observer(facts: ModelFacts, window: int, store: dict[int, torch.Tensor], start_of: Callable[[int], int]):
    def observe(module: torch.nn.Module, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        if facts.sliding[layer]:
            return
        t = q.shape[2]
        rows = torch.zeros(q.shape[0], t, dtype=torch.bool, device=q.device)
        rows[:, max(0, t - window) :] = True
        lo = start_of(layer)
        store[layer] = chunk_attention(module, q, k, mask, rows, lo, lo + t)

    return observe


def press_for(config: EMLoCConfig) -> Press:
    """The press ``config`` asks for: EMLoC's search, or keep everything where nothing is pruned."""
    if not config.prunes:
        return Press()
    return EMLoCPress(config.keep_ratios, config.delta, config.layer_group_size, config.batch_candidates,
                      config.lookahead, config.budget_rounding)


def compress_chunks(lm: ModelHandle, skill: Skill, config: EMLoCConfig, press: Press | None = None,
                    progress: Callable[[int, int], None] | None = None) -> CompressedMemory:
    """The method's entry point: ``skill`` compressed chunk by chunk by ``press`` (by default the one
    ``config`` asks for, ``press_for``)."""
    return run_chunks(lm, skill, press or press_for(config), LoopOptions.of(config), progress)


def prefill(lm: ModelHandle, skill: Skill, prompt_format: str = "auto", storage_dtype: str = "float32"
            ) -> CompressedMemory:
    """The skill's whole context, nothing pruned (the loop with the keep-everything press, in forwards of
    about ``PREFILL_TOKENS`` tokens: equal to one prefill, tested)."""
    rendered = lm.renderer(prompt_format).render(skill.instruction, skill.demonstrations)
    options = LoopOptions(demos_per_chunk=prefill_chunk(rendered.prefix, rendered.demos),
                          prompt_format=prompt_format, storage_dtype=storage_dtype)
    return run_chunks(lm, skill, Press(), options)


def run_chunks(lm: ModelHandle, skill: Skill, press: Press, options: LoopOptions,
               progress: Callable[[int, int], None] | None = None) -> CompressedMemory:
    """The loop (see module docstring)."""
    if not skill.demonstrations:
        raise SkillError(f"skill {skill.name!r} has no demonstrations to compress")
    vision = getattr(lm, "vision", None)  # VisionAdapter for VLMs (engine/vision.py)
    if skill.has_images and vision is None:
        raise SkillError(f"skill {skill.name!r} has images but {lm.facts.model_type} is a text-only model")
    f = lm.facts
    renderer = lm.renderer(options.prompt_format)
    rendered = renderer.render(skill.instruction, skill.demonstrations)
    chunks = plan_chunks(rendered.prefix, rendered.demos, options.demos_per_chunk, options.protect_prefix)
    total = sum(len(c.ids) for c in chunks)
    if f.max_positions and total >= f.max_positions:
        raise ContextTooLongError(
            f"skill {skill.name!r}: {total} demonstration tokens exceed the model's {f.max_positions} positions"
        )
    device = lm.device
    building = Building.empty(f.num_layers)  # the memory: each chunk is prefilled, replayed and scored on it
    offset = 0
    rope_next = 0  # next free RoPE index (differs from offset for M-RoPE VLMs)
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"chunks": len(chunks), "replay_forwards": 0.0, "check_forwards": 0, "js_checks": 0,
                             "decisions": []}
    prefill_s = 0.0
    for ci, chunk in enumerate(chunks):
        n = len(chunk.ids)
        pos = (offset + torch.arange(n, device=device))[None]
        mem_k, mem_v, mem_p = zip(*(building.prefix(i) for i in range(f.num_layers)), strict=True)
        cache = MemoryCache(mem_k, mem_v, mem_p, f.windows, [building.valid(i) for i in range(f.num_layers)])
        window_scores: dict[int, torch.Tensor] = {}
        if press.needs_window_scores:
            cache.observer = _window_observer(f, press.observation_window, window_scores, building.length)
        tp = clock(device)
        embeds = rope = None
        rope_end = rope_next + n
        if vision is not None:
            embeds, rope, rope_end = vision.segments_inputs(chunk.parts, rope_next)
        run(lm.model, cache, torch.tensor([chunk.ids], device=device), pos, inputs_embeds=embeds, rope_positions=rope)
        prefill_s += clock(device) - tp
        chunk_k, chunk_v = zip(*(cache.chunk_kv(i) for i in range(f.num_layers)), strict=True)
        del cache
        chunk_pos = pos[0]
        protected = torch.tensor(chunk.protected, dtype=torch.bool, device=device)
        replay = None
        if press.needs_replay and chunk.demos:
            ids, rpos, segments, rows = _replay_pack(chunk.demos, offset + n, device)
            replay = Replay(lm, building, list(chunk_k), list(chunk_v), chunk_pos, ids, rpos, segments, rows,
                            scope=options.search_scope)
            if vision is not None:
                replay.embeds, replay.rope = vision.packed_inputs(chunk.demos, rope_end)
            replay.run_teacher(options.pool_kernel, protected, options.importance_keys, options.pool_count_pad)
        ctx = ChunkContext(
            f, n, int(protected.sum()), offset, total, replay,
            [window_scores.get(i, torch.zeros(f.num_kv_heads, n, device=device)) for i in range(f.num_layers)]
            if press.needs_window_scores else None,
            device=device,
        )
        if press.needs_reconstruction:
            repeat = renderer.ids(REPEAT_PROMPT) + [t for t in chunk.ids if t not in renderer.bos]
            ctx.reconstruction_scores = reconstruction_scores(lm, building, chunk_k, chunk_v, chunk_pos, repeat, offset + n,
                                                             sinks=press.reconstruction_sinks)
        selection = press.select(ctx)
        for layer in range(f.num_layers):
            ck, cv, cp = chunk_k[layer], chunk_v[layer], chunk_pos[None].expand(f.num_kv_heads, -1)
            idx = selection[layer]
            if idx is not None:
                ck, cv, cp = gather_tokens(ck, idx), gather_tokens(cv, idx), gather_positions(cp, idx)
            building.append(layer, ck, cv, cp, padded=is_padded(idx))
            window = f.windows[layer]
            if window:  # later tokens (positions >= offset + n) only see positions > offset + n - window
                building.keep_after(layer, offset + n - window)
        if replay is not None:
            stats["replay_forwards"] += replay.forwards
            stats["js_checks"] += replay.js_checks
            stats["check_forwards"] += replay.check_forwards
        stats["decisions"].append(ctx.decisions)
        offset += n
        rope_next = rope_end
        if progress:
            progress(ci + 1, len(chunks))
    dtype = getattr(torch, options.storage_dtype)
    stats.update(compress_s=time.perf_counter() - t0, prefill_s=prefill_s, press=press.name)
    memory = CompressedMemory(
        keys=[k[0].to(dtype).contiguous() for k in building.keys],  # type: ignore[index]
        values=[v[0].to(dtype).contiguous() for v in building.values],  # type: ignore[index]
        positions=[p.contiguous() for p in building.positions],  # type: ignore[union-attr]
        original_length=offset,
        sliding=list(f.sliding),
        render_mode=renderer.mode,
        next_position=rope_next if vision is not None and vision.mrope else None,
        header={"skill": skill.name, "instruction": skill.instruction,
                "tail_text": rendered.tail_text, "tail_ids": rendered.tail_ids},
        stats=stats,
    )
    # EMLoC's press checks each layer of each chunk on the chunk's own demonstrations (no held-out
    # validation set to report); other presses keep a fixed share unchecked (delta None)
    stats["certificate"] = certificate(memory, "chunks", {"press": press.name}, getattr(press, "delta", None),
                                       list(getattr(press, "keep_ratios", ())))
    return memory
