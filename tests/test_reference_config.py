"""EMLoCConfig.reference(): the paper's settings, each knob doing what it says."""

from __future__ import annotations

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.presses import budget
from emloc_agents.engine.replay import chunk_attention
from emloc_agents.engine.selection import pool

from .conftest import make_skill


def test_reference_settings() -> None:
    ref = EMLoCConfig.reference()
    assert (ref.search_scope, ref.lookahead, ref.batch_candidates, ref.protect_prefix) == ("exact", 1, False, False)
    assert (ref.budget_rounding, ref.importance_keys, ref.pool_count_pad) == ("floor", "chunk+replay", True)
    assert (ref.demos_per_chunk, ref.keep_ratios, ref.delta, ref.pool_kernel) == (4, (0.1, 0.2, 0.5), 0.005, 5)
    assert EMLoCConfig.reference(delta=0.01).delta == 0.01
    assert EMLoCConfig() != ref


# The registry keys memories by EMLoCConfig.fingerprint (through tensor_fields): these are the keys of the
# default and the reference as they were before the retired knobs were removed; they must never change.
PINNED_FINGERPRINTS = {
    "default": "dc159be524c92825", "default, text": "fc738a6f02eff6a2", "default, images": "4f26f827f1e050d8",
    "reference": "40ede413277fed1f", "chunks": "4f26f827f1e050d8", "context": "fc738a6f02eff6a2",
    "merge_evicted": "3c7b4eea9c68fa23", "demos_per_chunk=8": "7be4105ff6bf2a15",
}


def test_fingerprints_are_pinned() -> None:
    got = {
        "default": EMLoCConfig().fingerprint(), "default, text": EMLoCConfig().fingerprint(False),
        "default, images": EMLoCConfig().fingerprint(True), "reference": EMLoCConfig.reference().fingerprint(),
        "chunks": EMLoCConfig(compression="chunks").fingerprint(),
        "context": EMLoCConfig(compression="context").fingerprint(),
        "merge_evicted": EMLoCConfig(merge_evicted=True).fingerprint(),
        "demos_per_chunk=8": EMLoCConfig(demos_per_chunk=8).fingerprint(),
    }
    assert got == PINNED_FINGERPRINTS
    assert EMLoCConfig.reference().fingerprint(False) == EMLoCConfig.reference().fingerprint(True)


def test_retired_knobs_load_only_at_the_value_every_memory_has() -> None:
    from emloc_agents.config import RETIRED_FIELDS

    old_dump = {**EMLoCConfig().model_dump(mode="json"), **RETIRED_FIELDS}  # a config saved before they went
    assert EMLoCConfig.model_validate(old_dump) == EMLoCConfig()
    assert not RETIRED_FIELDS.keys() & EMLoCConfig.model_fields.keys()
    for name, value in {"probe": "next", "importance": "reconstruction", "prefill_context": "full",
                        "head_budgets": True, "allocation": "global"}.items():
        with pytest.raises(ValueError, match=f"{name} was removed"):
            EMLoCConfig(**{name: value})


def test_budget_rounding() -> None:
    assert budget(37, 0.1, 0) == 4 and budget(37, 0.1, 0, "floor") == 3
    assert budget(37, 0.1, 5, "floor") == 5  # never below the protected tokens


def test_pool_counting_padding_lowers_the_ends() -> None:
    s = torch.ones(1, 8)
    assert torch.allclose(pool(s, 5), s)
    counted = pool(s, 5, count_pad=True)
    assert counted[0, 0] == 3 / 5 and counted[0, 4] == 1.0


def test_importance_over_chunk_and_replay_is_not_renormalised_to_the_chunk() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 6, 4)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    rows = torch.zeros(1, 6, dtype=torch.bool)
    rows[0, 5] = True
    chunk_only = chunk_attention(torch.nn.Identity(), q, k, mask, rows, 1, 4)
    with_replay = chunk_attention(torch.nn.Identity(), q, k, mask, rows, 1, 4, norm_end=6)
    assert torch.allclose(chunk_only.sum(), torch.tensor(2.0))  # one row, two query heads, each sums to 1
    assert with_replay.sum() < 2.0 and torch.all(with_replay <= chunk_only + 1e-6)


def test_reference_config_compresses(tiny_llama) -> None:
    mem = compress(tiny_llama, make_skill(8), EMLoCConfig.reference(delta=0.05))
    assert 0 < mem.kept_ratio <= 1.0
    assert mem.stats["replay_forwards"] > 0
