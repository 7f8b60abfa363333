"""Benchmark methods: how each one turns a skill into what a query runs on.

- ``zero-shot``: no demonstrations; the query stands alone (with the instruction).
- ``full-icl``: no memory; every query is the full rendered prompt (instruction + demonstrations +
  query), prefilled from scratch each time. Accuracy and TTFT are both measured on this honest
  recompute path.
- ``full-icl-cached``: the uncompressed memory (``keep_ratios=(1.0,)``), prefilled once and reused.
- ``emloc``: ``EMLoCConfig()`` defaults (adaptive, JS-checked; ``compression="auto"``: the whole
  context ranked at once for text skills, the chunk-wise loop for images); ``emloc-context``:
  ``compression="context"``, the whole context ranked by reconstruction and leave-one-out replays,
  the share chosen by the JS check on held-out demonstrations (engine/context.py); ``emloc-chunks``:
  the paper's chunk-wise loop. ``emloc-NAME`` runs any compression method registered under NAME
  (``engine.compress.register_method``) at its defaults.
- ``emloc-share``: the default's whole-context ranking at a fixed share (the ``--ratio``; the split
  with the lowest held-out JS there, no δ check): the default's point on a fidelity curve. The
  ranking runs once per skill and serves every share (and ``kvzip-whole``, whose reconstruction
  scores it contains). ``emloc-share-merged``: the same with ``merge_evicted=True`` (evicted slots
  merged into kept ones, each with its group's attention as a logit bias; the split chosen by the
  biased memories' JS), so the curve shows what the knob buys at each share.
- ``uniform``, ``snapkv``, ``streaming-llm``, ``random``, ``kvzip``: fixed-ratio presses. Their ratio
  is the explicit ``ratio`` if given, else the kept ratio EMLoC reached for the same task/shots/seed
  earlier in the same run (the runner builds ``emloc`` before them), else ``DEFAULT_RATIO``.
  ``kvzip`` (Kim et al. 2025) scores tokens by reconstruction attention, query-agnostic;
  ``kvzip-heads`` ranks each layer's budget across its heads; ``kvzip-global`` ranks every layer, head
  and token of a chunk together and keeps 4 sink tokens, as kvpress's ``KVzipPress`` does;
  ``kvzip-whole`` is KVzip exactly as kvpress runs it: the whole context prefilled, repeated in spans,
  ranked together (the strongest baseline: 0.91 agreement at 20 % on SmolLM2 TREC-128, seed 0).
- ``fewer-shots``: the first whole demonstrations that fit the same token budget (the same ratio
  rule), kept uncompressed: what a user gets by simply passing fewer examples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from ..config import EMLoCConfig
from ..engine import CompressedMemory, Press, compress
from ..engine.compress import METHODS as COMPRESSION_METHODS
from ..engine.context import RankedContext, best_split, rank_context
from ..engine.prompt import Renderer
from ..models.lm import memory_context
from ..skills import Skill
from ..store.format import dump_memory
from .presses import KVzipPress, RandomPress, SnapKVPress, StreamingLLMPress, UniformPress, kvzip_whole

METHODS: tuple[str, ...] = (
    "zero-shot", "full-icl", "full-icl-cached", "emloc", "emloc-chunks", "emloc-context", "emloc-share",
    "emloc-share-merged", "uniform", "snapkv", "streaming-llm", "random", "kvzip", "kvzip-heads", "kvzip-global", "kvzip-whole", "fewer-shots",
)
EMLOC_METHODS = ("emloc", "emloc-chunks", "emloc-context")  # adaptive: the first one run sets the others' ratio
FIXED_RATIO_PRESSES: dict[str, Callable[..., Press]] = {
    "uniform": UniformPress, "snapkv": SnapKVPress, "streaming-llm": StreamingLLMPress, "random": RandomPress,
    "kvzip": KVzipPress, "kvzip-heads": partial(KVzipPress, head_budgets=True),
    "kvzip-global": partial(KVzipPress, layer_budgets=True, head_budgets=True, sinks=4),
}
FIXED_RATIO_METHODS = ("emloc-share", "emloc-share-merged", *FIXED_RATIO_PRESSES, "kvzip-whole", "fewer-shots")  # the methods a --ratio sets
DEFAULT_RATIO = 0.2


@dataclass
class Prepared:
    """One method built for one skill: what queries run on, and the build measurements."""

    method: str
    memory: CompressedMemory | None = None
    skill_text: str | None = None  # full-icl: rendered once; skill text + query is tokenized and prefilled per query
    original_tokens: int | None = None
    memory_tokens: float | None = None  # mean kept tokens per layer
    kept_ratio: float | None = None
    compress_s: float | None = None
    disk_bytes: int | None = None
    press_ratio: float | None = None
    ratio_source: str | None = None  # "--ratio", "emloc" or "default"
    replay_forwards: float | None = None  # compression cost in full-forward equivalents (replay presses)

    def renderer(self, lm) -> Renderer:
        return lm.renderer(self.memory.render_mode if self.memory is not None else "auto")

    def query_ids(self, lm, text: str, instruction: str) -> list[int]:
        """Token ids of one query, exactly as ``LanguageModel.score``/``generate`` would render them;
        full ICL: the whole text (instruction, demonstrations, query) tokenized once."""
        r = self.renderer(lm)
        if self.skill_text is not None:  # = Renderer.full_prompt, without re-rendering the skill per query
            return r.standalone(self.skill_text, r.query_text(text, instruction))
        return r.query(text, instruction=instruction, on_memory=self.memory is not None,
                       **memory_context(self.memory))

    def label_ids(self, lm, text: str, instruction: str, labels: Sequence[str]) -> list[list[int]]:
        """Continuation ids per label, read after the query text (same rule as ``LanguageModel.score``)."""
        r = self.renderer(lm)
        query = r.query_text(text, instruction, on_memory=self.memory is not None or self.skill_text is not None)
        return [r.label_ids(query, o) for o in labels]


def compression_method(method: str) -> str | None:
    """The engine's compression method that bench method ``emloc-NAME`` runs (``emloc-chunks``,
    ``emloc-context`` and any method registered in this process), else None. The bench's own names
    (``emloc-share``, ...) keep their meaning whatever is registered."""
    if method in METHODS and method not in EMLOC_METHODS:
        return None
    name = method.removeprefix("emloc-")
    return name if method.startswith("emloc-") and name in COMPRESSION_METHODS else None


def order_methods(methods: Sequence[str]) -> list[str]:
    """Canonical run order (emloc before the fixed-ratio presses that may reuse its ratio; registered
    compression methods last)."""
    unknown = [m for m in methods if m not in METHODS and compression_method(m) is None]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)} or emloc-NAME for a "
                         f"registered compression method ({', '.join(sorted(COMPRESSION_METHODS))})")
    return [m for m in METHODS if m in set(methods)] + list(dict.fromkeys(m for m in methods if m not in METHODS))


def _from_memory(method: str, mem: CompressedMemory) -> Prepared:
    return Prepared(
        method=method,
        memory=mem,
        original_tokens=mem.original_length,
        memory_tokens=mem.memory_tokens / mem.num_layers,
        kept_ratio=mem.kept_ratio,
        compress_s=float(mem.stats.get("compress_s", 0.0)),
        disk_bytes=len(dump_memory(mem)),
        replay_forwards=mem.stats.get("replay_forwards") if mem.stats.get("press") in ("emloc", "uniform") else None,
    )


def prepare(
    lm, method: str, skill: Skill, *, seed: int = 0, ratio: float | None = None, emloc_ratio: float | None = None
) -> Prepared:
    """Build ``method`` for ``skill`` on ``lm``."""
    if method == "zero-shot":
        return Prepared(method)
    if method == "full-icl":
        r = lm.renderer("auto")
        n = r.render(skill.instruction, skill.demonstrations).num_tokens
        return Prepared(method, skill_text=r.skill_text(skill.instruction, skill.demonstrations),
                        original_tokens=n, memory_tokens=float(n), kept_ratio=1.0)
    if method == "full-icl-cached":
        return _from_memory(method, compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,))))
    if method == "emloc":
        return _from_memory(method, compress(lm, skill, EMLoCConfig()))
    if (name := compression_method(method)) is not None:
        return _from_memory(method, compress(lm, skill, EMLoCConfig(compression=name)))
    if ratio is not None:
        r_used, source = ratio, "--ratio"
    elif emloc_ratio is not None:
        r_used, source = emloc_ratio, "emloc"
    else:
        r_used, source = DEFAULT_RATIO, "default"
    if method == "fewer-shots":
        prepared = _from_memory(method, compress(lm, fewer_shots(lm, skill, r_used), EMLoCConfig(keep_ratios=(1.0,))))
        full = lm.renderer("auto").render(skill.instruction, skill.demonstrations).num_tokens
        prepared.kept_ratio = prepared.original_tokens / full if prepared.original_tokens else None
        prepared.press_ratio, prepared.ratio_source = r_used, source
        return prepared
    if method in ("emloc-share", "emloc-share-merged"):
        config = EMLoCConfig(merge_evicted=method == "emloc-share-merged")
        ranked = ranked_context(lm, skill)
        t0 = time.perf_counter()
        memory, js, split, _ = best_split(lm, ranked, r_used, config.reconstruction_shares, config.merge_evicted)
        build_s = ranked.prefill_s + ranked.reconstruct_s + ranked.held_out_s + time.perf_counter() - t0
        memory = memory.to(dtype=getattr(torch, config.storage_dtype))
        memory.stats.update(press=method, js=js, reconstruction_share=split, compress_s=build_s)
        prepared = _from_memory(method, memory)
        prepared.press_ratio, prepared.ratio_source = r_used, source
        return prepared
    if method == "kvzip-whole":
        cached = _cached_ranking(lm, skill)
        if cached is not None:  # the same reconstruction scores, made once for this skill
            kept = kvzip_whole(lm, skill, cached.full, r_used, scores=(cached.reconstruction, cached.reconstruct_s))
        else:
            kept = kvzip_whole(lm, skill, compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32")),
                               r_used)
        prepared = _from_memory(method, kept)
        prepared.press_ratio, prepared.ratio_source = r_used, source
        return prepared
    if method in FIXED_RATIO_PRESSES:
        cls = FIXED_RATIO_PRESSES[method]
        press = cls(ratio=r_used, seed=seed) if cls is RandomPress else cls(ratio=r_used)
        prepared = _from_memory(method, compress(lm, skill, EMLoCConfig(), press=press))
        prepared.press_ratio, prepared.ratio_source = r_used, source
        return prepared
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


_RANKED: list[tuple[tuple, RankedContext]] = []  # the last skill ranked: [(key, ranking)]


def _ranking_key(lm, skill: Skill) -> tuple:
    return id(lm), lm.fingerprint(), skill.model_dump_json()


def _cached_ranking(lm, skill: Skill) -> RankedContext | None:
    return _RANKED[0][1] if _RANKED and _RANKED[0][0] == _ranking_key(lm, skill) else None


def ranked_context(lm, skill: Skill) -> RankedContext:
    """``skill``'s whole context ranked as the default ranks it (engine/context.py), kept until another
    skill is ranked: the bench prepares one skill's fixed-share methods one after another, so the
    ranking runs once per skill instead of once per share."""
    ranked = _cached_ranking(lm, skill)
    if ranked is None:
        full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
        ranked = rank_context(lm, skill, EMLoCConfig(), full)
        _RANKED[:] = [(_ranking_key(lm, skill), ranked)]
    return ranked


def fewer_shots(lm, skill: Skill, ratio: float) -> Skill:
    """The skill cut to its first whole demonstrations whose rendering fits ``ratio`` of the full
    rendering's tokens (at least one demonstration)."""
    r = lm.renderer("auto")
    full = r.render(skill.instruction, skill.demonstrations)
    budget = ratio * full.num_tokens
    used, k = len(full.prefix), 0
    for seg in full.demos:
        if k and used + len(seg) > budget:
            break
        used, k = used + len(seg), k + 1
    return skill.model_copy(update={"demonstrations": skill.demonstrations[:k]})
