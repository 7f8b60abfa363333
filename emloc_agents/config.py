"""EMLoCConfig: every knob of the compression. The defaults are this library's choice (cheaper search,
instruction protected); ``EMLoCConfig.reference()`` gives the paper's exact settings. docs/design.md
lists each deviation and what it changes."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Every field is in exactly one of these two sets (tests/test_registry.py checks it), and its comment
# in EMLoCConfig says which. A field whose effect on the tensors is unclear counts as a tensor field.
TENSOR_FIELDS = frozenset({
    "compression", "reconstruction_shares", "merge_evicted", "demos_per_chunk", "keep_ratios", "delta",
    "pool_kernel", "layer_group_size", "search_scope", "protect_prefix", "budget_rounding", "importance_keys",
    "pool_count_pad", "storage_dtype", "prompt_format",
})
"""Fields that change a memory's tensors: the registry's key (and ``fingerprint``) hashes these alone
(with ``RETIRED_FIELDS``)."""
RETIRED_FIELDS: dict[str, Any] = {
    "probe": "self", "importance": "answers", "prefill_context": "memory", "head_budgets": False, "allocation": "layers",
}
"""Knobs of the chunk-wise loop measured no better than these defaults and removed (docs/design.md,
"Variants measured and dropped"). Every memory was built at these values, and the key still hashes them,
so a stored memory keeps its key. A config given one of them at this value (an old dump) still loads."""
MOVED_FIELDS: dict[str, Any] = {"dtype": "auto"}
"""Fields that moved to the model: ``dtype`` is ``MemoryRegistry(dtype=...)`` (``load_model``'s). The
registry keys a memory by the dtype as resolved on the model's device, as before; ``fingerprint`` hashes
the old default so it keeps its value. A config given ``dtype="auto"`` (an old dump) still loads."""
COST_FIELDS = frozenset({"batch_candidates", "lookahead"})
"""Fields that change only what compressing costs (time, re-forwards): a change reuses stored memories.
Under ``compression="auto"`` setting one away from its default still selects the chunk-wise loop, and
the key changes through the resolved mode."""

METHOD_NAMES: set[str] = {"chunks", "context", "fitted"}
"""Compression methods a config may name besides "auto" (``engine.compress.register_method`` adds one;
``engine.compress.METHODS`` maps each to its entry point)."""

WHOLE_CONTEXT = frozenset({"context", "fitted"})
"""Methods that rank the whole context at once (engine/context.py's search): they take no chunk-loop knob."""

# knobs of the chunk-wise loop alone: one away from its default asks for that loop (resolved_compression)
CHUNK_LOOP_KNOBS = frozenset({
    "demos_per_chunk", "pool_kernel", "layer_group_size", "search_scope", "batch_candidates", "lookahead",
    "budget_rounding", "importance_keys", "pool_count_pad",
})


class EMLoCConfig(BaseModel):
    """How a skill's demonstrations become a compressed memory.

    ``keep_ratios=(1.0,)`` disables pruning: the memory then holds the full context and any
    ``demos_per_chunk`` reproduces full in-context learning exactly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # tensors: which algorithm builds the memory (keyed as the mode it resolves to)
    compression: str = Field(
        "auto", description="'chunks': the paper's loop, each chunk prefilled on the memory of the chunks "
        "before and pruned layer by layer as it lands (compression needs only the memory's room). 'context': "
        "the whole context prefilled once, every (layer, head, token) ranked by KVzip's reconstruction and by "
        "leave-one-out replays of the demonstrations, the smallest of keep_ratios whose held-out answers stay "
        "within delta kept (engine/context.py; needs the full context's room; text models only). 'fitted': "
        "'context' with each kept slot's logit bias and value fitted so that the memory's attention matches the "
        "full context's on reference queries (engine/fit.py; the check reads the fitted memory). 'auto': "
        "'context' for text skills on text models (it answers far closer to full in-context learning, "
        "docs/benchmarks.md); 'chunks' for vision-language models, skills with images, and configs that "
        "change a knob of the chunk-wise loop from its default (CHUNK_LOOP_KNOBS). Any other name: a method "
        "registered with engine.compress.register_method.")
    # tensors: the ranking blends tried per keep ratio
    reconstruction_shares: tuple[float, ...] = Field(
        (0.3, 0.5, 0.7, 0.85, 1.0), min_length=1, description="compression='context': shares of the kept slots "
        "ranked by reconstruction (the rest ranked by the held-out answers; 1.0: reconstruction alone, KVzip), "
        "tried at each keep ratio; the one whose held-out answers move least (JS) is kept.")
    # tensors: folds evicted values into kept slots, adds logit biases
    merge_evicted: bool = Field(
        False, description="compression='context': fold each evicted token's value into the kept token of its "
        "head with the most similar key, weighted by the held-out answers' attention, and bias each kept slot's "
        "attention logit by the attention its group drew (engine/merge.py); the JS check reads the merged "
        "memory. Same size; one float per kept slot more (store format version 2).")
    # tensors: what each prefill chunk holds and is pruned as
    demos_per_chunk: int = Field(4, ge=1, description="Demonstrations per prefill chunk (reference: 4).")
    # tensors: the shares a layer may keep
    keep_ratios: tuple[float, ...] = Field(
        (0.1, 0.2, 0.5), description="Candidate shares of a chunk's tokens to keep per layer, tried in order."
    )
    # tensors: the bound that picks a share
    delta: float = Field(0.005, ge=0.0, description="Jensen-Shannon bound on the replayed answer tokens.")
    # tensors: smooths the scores that rank tokens
    pool_kernel: int = Field(5, ge=1, description="Average-pooling kernel over token importance.")
    # tensors: layers decided together take one share
    layer_group_size: int = Field(
        1, ge=1, description="Layers decided together (1 = the reference's layer-by-layer search)."
    )
    # tensors (unclear): 'answers' and 'exact' JS agree to ~1e-4, enough to flip a check at delta
    search_scope: Literal["answers", "exact"] = Field(
        "answers",
        description="JS checks re-run only the answer rows ('answers', cheap) or the whole replay ('exact', reference).",
    )
    # cost: batching the larger shares' checks keeps the one-by-one decisions
    batch_candidates: bool = Field(
        True, description="Check the larger keep ratios of a layer that failed the smallest one in one batched re-forward."
    )
    # cost: speculation depth keeps the layer-by-layer decisions (tests/test_engine.py)
    lookahead: int | None = Field(
        None, ge=1, description="Layers checked speculatively in one batched re-forward at the smallest keep ratio "
        "(same decisions as checking them one by one; 1 = no speculation). None: 4 on the CPU, where each extra "
        "trial row costs compute (8 took 25 % longer on SmolLM2 TREC-128), 8 on a GPU, where each re-forward "
        "costs kernel launches (8 halved the search on a 1.5B shape, H200).",
    )
    # tensors: whether the prefix can be pruned
    protect_prefix: bool = Field(True, description="Never prune the instruction/system prefix (reference: False, "
                                 "only answer spans are protected).")
    # tensors: tokens kept per share
    budget_rounding: Literal["ceil", "floor"] = Field(
        "ceil", description="Tokens kept at share r of n: ceil(r*n) (default) or int(r*n) (reference).")
    # tensors: what attention is renormalised over before ranking
    importance_keys: Literal["chunk", "chunk+replay"] = Field(
        "chunk", description="Keys the answer rows' attention is renormalised over before scoring chunk tokens: the "
        "chunk alone (default) or the chunk plus the replayed demonstration (reference).")
    # tensors: the pooled scores at a chunk's ends
    pool_count_pad: bool = Field(
        False, description="Average pooling counts the zero padding at the chunk's ends (reference: True).")
    # tensors: the stored K/V dtype
    storage_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the K/V tensors kept in the memory and on disk."
    )
    # tensors: how demonstrations become tokens
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="How demonstrations are rendered: 'plain' input/answer text, 'chat' turns through the chat "
        "template, 'auto' = plain for text models, chat for vision-language models.",
    )

    @classmethod
    def reference(cls, **overrides: object) -> EMLoCConfig:
        """The settings of the paper's reference code for in-context learning: exact search (the whole
        replay re-run per check, one candidate at a time, no lookahead), only answer spans protected,
        int(r*n) budgets, importance renormalised over chunk + replay, pooling that counts padding."""
        values: dict[str, object] = dict(
            demos_per_chunk=4, keep_ratios=(0.1, 0.2, 0.5), delta=0.005, pool_kernel=5, layer_group_size=1,
            search_scope="exact", batch_candidates=False, lookahead=1, protect_prefix=False,
            budget_rounding="floor", importance_keys="chunk+replay", pool_count_pad=True, compression="chunks",
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @model_validator(mode="before")
    @classmethod
    def _retired_at_their_value(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not (RETIRED_FIELDS.keys() | MOVED_FIELDS.keys()) & data.keys():
            return data
        if data.get("dtype", "auto") != "auto":
            raise ValueError("dtype is how the model is loaded, not a compression setting: "
                             "MemoryRegistry(model, dtype=...) or load_model(name, dtype=...)")
        for name, value in RETIRED_FIELDS.items():
            if name in data and data[name] != value:
                raise ValueError(f"{name} was removed: measured no better than {value!r} (docs/design.md, "
                                 "'Variants measured and dropped'); every memory is built at that value")
        return {k: v for k, v in data.items() if k not in RETIRED_FIELDS and k not in MOVED_FIELDS}

    @field_validator("compression")
    @classmethod
    def _method_known(cls, v: str) -> str:
        if v != "auto" and v not in METHOD_NAMES:
            raise ValueError(f"compression must be 'auto' or a registered method ({', '.join(sorted(METHOD_NAMES))}), "
                             f"got {v!r}")
        return v

    @field_validator("keep_ratios")
    @classmethod
    def _ratios_valid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("keep_ratios must name at least one ratio")
        if any(not (0.0 < r <= 1.0) for r in v):
            raise ValueError(f"keep_ratios must lie in (0, 1], got {v}")
        if list(v) != sorted(v):
            raise ValueError(f"keep_ratios must be increasing (smallest first), got {v}")
        return v

    @field_validator("reconstruction_shares")
    @classmethod
    def _shares_valid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (0.0 < r <= 1.0) for r in v):
            raise ValueError(f"reconstruction_shares must lie in (0, 1], got {v}")
        return v

    @property
    def chunk_knobs_changed(self) -> list[str]:
        """The knobs of the chunk-wise loop set away from their defaults (by value, so a config means
        the same after a round trip through JSON)."""
        fields = type(self).model_fields
        return sorted(k for k in CHUNK_LOOP_KNOBS if getattr(self, k) != fields[k].default)

    @model_validator(mode="after")
    def _context_has_no_chunk_knobs(self) -> EMLoCConfig:
        if self.compression in WHOLE_CONTEXT and (changed := self.chunk_knobs_changed):
            raise ValueError(f"knobs of the chunk-wise loop ({', '.join(changed)}) need compression='chunks'; "
                             f"compression={self.compression!r} ranks the whole context at once")
        if self.merge_evicted and self.compression not in ("auto", "context"):
            raise ValueError("merge_evicted needs compression='context' (or 'auto' on a text skill)")
        return self

    def resolved_compression(self, images: bool) -> str:
        """The mode ``compression`` means for a skill (``images``: the skill or the model is visual):
        "auto" is the whole-context ranking unless images or a chunk-loop knob changed ask for the loop."""
        if self.compression != "auto":
            return self.compression
        return "chunks" if images or self.chunk_knobs_changed else "context"

    @property
    def prunes(self) -> bool:
        return self.keep_ratios != (1.0,)

    def tensor_fields(self, images: bool | None = None) -> dict[str, Any]:
        """The fields that change the memory's tensors (``TENSOR_FIELDS``, and ``RETIRED_FIELDS`` and
        ``MOVED_FIELDS`` at their old defaults, so keys stay), as JSON values.
        ``compression`` is the mode it resolves to where that is known: with ``images`` given (the
        skill or the model is visual), or when a chunk-loop knob away from its default selects the
        loop, so "auto" and the mode it picks share one memory."""
        values = {**RETIRED_FIELDS, **MOVED_FIELDS, **self.model_dump(mode="json", include=set(TENSOR_FIELDS))}
        if images is not None or self.chunk_knobs_changed:
            values["compression"] = self.resolved_compression(bool(images))
        return values

    def fingerprint(self, images: bool | None = None) -> str:
        """Hash of every field that changes the memory's tensors (``tensor_fields``); cost-only fields
        (``COST_FIELDS``) leave it unchanged."""
        payload = json.dumps(self.tensor_fields(images), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
