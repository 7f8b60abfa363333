"""Evicted values merged into kept tokens (engine/merge.py): each evicted token joins the kept token of
its head with the most similar key, and a kept value becomes the weighted mean of itself and the tokens
that joined it; keys, positions and padded slots never change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.context import held_out_answers, rank_context
from emloc_agents.engine.memory import PAD, CompressedMemory
from emloc_agents.engine.merge import WEIGHT_FLOOR, merge_evicted
from emloc_agents.engine.reconstruct import keep_tokens
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import tiny_model

from .conftest import make_skill


def _memory(layers: int = 2, heads: int = 2, tokens: int = 12, dim: int = 8, seed: int = 0) -> CompressedMemory:
    g = torch.Generator().manual_seed(seed)
    return CompressedMemory(
        keys=[torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)],
        values=[torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)],
        positions=[torch.arange(tokens).expand(heads, -1).clone() for _ in range(layers)],
        original_length=tokens, sliding=[False] * layers)


def _reference(full: CompressedMemory, kept: CompressedMemory, weights: list[torch.Tensor],
               segments: list[int] | None = None) -> list[torch.Tensor]:
    """The merge written out token by token (with ``segments``: among kept tokens of the same segment
    when there are any)."""
    out = []
    for layer, (k, v, pos) in enumerate(zip(kept.keys, kept.values, kept.positions, strict=True)):
        merged = v.clone()
        for h in range(k.shape[0]):
            held = [int(p) for p in pos[h] if p >= 0]
            w = weights[layer][h] + WEIGHT_FLOOR
            sums = {j: w[j] * full.values[layer][h, j] for j in held}
            totals = {j: float(w[j]) for j in held}
            for i in range(full.original_length):
                if i in held:
                    continue
                near = [j for j in held if segments is not None and segments[j] == segments[i]] or held
                sim = {j: float(torch.nn.functional.cosine_similarity(full.keys[layer][h, i], full.keys[layer][h, j], dim=0))
                       for j in near}
                j = max(sim, key=sim.__getitem__)
                sums[j] = sums[j] + w[i] * full.values[layer][h, i]
                totals[j] += float(w[i])
            for slot, p in enumerate(pos[h].tolist()):
                if p >= 0:
                    merged[h, slot] = sums[p] / totals[p]
        out.append(merged)
    return out


def test_merged_values_are_the_weighted_means_of_their_nearest_keys() -> None:
    full = _memory()
    # heads keep different tokens and numbers of tokens: head 1 of layer 0 has a padded slot
    kept_idx = {0: torch.tensor([[0, 3, 7, 10], [1, 4, 8, -1]]), 1: torch.tensor([[0, 2, 5, 11], [0, 6, 9, 11]])}
    kept = keep_tokens(full, kept_idx)
    assert int(kept.positions[0][1, 3]) == PAD
    weights = [torch.rand(2, 12, generator=torch.Generator().manual_seed(layer)) for layer in range(2)]
    got = merge_evicted(full, kept, weights)
    for a, b in zip(got.values, _reference(full, kept, weights), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(got.keys + got.positions, kept.keys + kept.positions, strict=True):
        assert a is b
    assert torch.equal(got.values[0][1, 3], kept.values[0][1, 3])  # a padded slot is never written


def test_a_segment_merges_into_its_own_kept_tokens_first() -> None:
    """With ``segments`` (a demonstration's index per token) an evicted token joins the nearest kept
    token of its own demonstration; a demonstration that kept nothing in a head joins the nearest of all."""
    full = _memory()
    kept = keep_tokens(full, {0: torch.tensor([[0, 3, 7, 10], [1, 4, 8, -1]]), 1: torch.tensor([[0, 2, 5, 11], [0, 6, 9, 11]])})
    weights = [torch.rand(2, 12, generator=torch.Generator().manual_seed(layer)) for layer in range(2)]
    segments = [-1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # layer 0, head 0 kept nothing of demonstration 2
    got = merge_evicted(full, kept, weights, segments=torch.tensor(segments))
    for a, b in zip(got.values, _reference(full, kept, weights, segments), strict=True):
        torch.testing.assert_close(a, b)
    anywhere = merge_evicted(full, kept, weights)
    assert any(not torch.allclose(a, b) for a, b in zip(got.values, anywhere.values, strict=True))


def test_a_heavily_attended_kept_token_barely_moves_and_a_whole_layer_is_untouched() -> None:
    full = _memory(layers=2)
    kept = keep_tokens(full, {0: torch.tensor([[0, 5], [2, 7]])})  # layer 1 kept whole
    weights = [torch.full((2, 12), 1e-3), torch.ones(2, 12)]
    weights[0][0, [0, 5]] = weights[0][1, [2, 7]] = 1e3  # each head's kept tokens
    got = merge_evicted(full, kept, weights)
    assert got.values[1] is kept.values[1]
    torch.testing.assert_close(got.values[0], kept.values[0], atol=1e-4, rtol=0)
    assert not torch.equal(got.values[0], kept.values[0])


@pytest.fixture(scope="module")
def plain_llama() -> LanguageModel:
    model, tok = tiny_model("llama", chat_template=False)
    return LanguageModel(model, tok, "tiny-llama-plain")


def test_merge_evicted_changes_values_only_and_the_check_reads_the_merged_memory(plain_llama) -> None:
    skill = make_skill(8)
    plain = compress(plain_llama, skill, EMLoCConfig(keep_ratios=(0.3,), delta=1.0))
    merged = compress(plain_llama, skill, EMLoCConfig(keep_ratios=(0.3,), delta=1.0, merge_evicted=True))
    assert merged.stats["merged"] and not plain.stats["merged"]
    assert merged.logit_bias is not None and plain.logit_bias is None
    assert [t["reconstruction_share"] for t in merged.stats["trials"]] == [t["reconstruction_share"] for t in plain.stats["trials"]]
    assert [t["js"] for t in merged.stats["trials"]] != [t["js"] for t in plain.stats["trials"]]
    chosen = merged.stats["reconstruction_share"]
    same_split = compress(plain_llama, skill, EMLoCConfig(keep_ratios=(0.3,), delta=1.0, reconstruction_shares=(chosen,)))
    for a, b in zip(merged.keys + merged.positions, same_split.keys + same_split.positions, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(merged.values, same_split.values, strict=True))
    assert dataclasses.replace(merged, stats={}).kept_ratio == pytest.approx(plain.kept_ratio, abs=0.02)


def test_merge_evicted_needs_the_whole_context_mode() -> None:
    with pytest.raises(ValueError, match="merge_evicted needs compression='context'"):
        EMLoCConfig(compression="chunks", merge_evicted=True)
    assert EMLoCConfig(merge_evicted=True).fingerprint() != EMLoCConfig().fingerprint()


def _duplicated(memory: CompressedMemory, slot: int) -> CompressedMemory:
    """``memory`` with slot ``slot`` of every layer and head stored twice (same key, value, position)."""
    def twice(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t[:, slot : slot + 1]], dim=1)

    return dataclasses.replace(memory, keys=[twice(k) for k in memory.keys], values=[twice(v) for v in memory.values],
                               positions=[twice(p) for p in memory.positions])


def test_a_logit_bias_of_log_2_is_the_slot_stored_twice(plain_llama) -> None:
    """What ``attention_mass`` relies on: a slot's bias b weighs it like e^b copies of itself, on every
    path a memory is read (one forward, a continuation's fork, each decoding step)."""
    from emloc_agents.engine.decode import generate, score_continuations

    full = compress(plain_llama, make_skill(4), EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    slot = 5
    bias = [torch.zeros(k.shape[:2]) for k in full.keys]
    for b in bias:
        b[:, slot] = torch.log(torch.tensor(2.0))
    biased = dataclasses.replace(full, logit_bias=bias)
    twice = _duplicated(full, slot)
    prompt, continuations = [5, 9, 14, 3], [[7], [11, 4, 6]]
    want = score_continuations(plain_llama, prompt, continuations, twice)
    assert score_continuations(plain_llama, prompt, continuations, biased) == pytest.approx(want, abs=1e-4)
    assert score_continuations(plain_llama, prompt, continuations, full) != pytest.approx(want, abs=1e-4)
    assert generate(plain_llama, prompt, biased, max_new_tokens=6).token_ids == \
        generate(plain_llama, prompt, twice, max_new_tokens=6).token_ids
    ranked = rank_context(plain_llama, make_skill(4), EMLoCConfig(compression="context"), full)
    segments = ranked.segments()  # each demonstration's tokens carry its index, the prefix -1
    assert segments.shape == (full.original_length,) and int(segments[0]) == -1
    for j, (lo, hi) in enumerate(ranked.spans):
        assert bool((segments[lo:hi] == j).all())
    with pytest.raises(ValueError, match="without logit biases"):  # scores read float masks as booleans
        held_out_answers(plain_llama, biased, ranked.demos, ranked.spans, [0], score=True, keep_log_probs=set())


def test_attention_mass_biases_each_kept_slot_by_its_groups_weight_capped_at_its_size() -> None:
    full = _memory(layers=2)
    kept = keep_tokens(full, {0: torch.tensor([[0, 5], [2, 7]])})  # layer 1 kept whole: no bias there
    weights = [torch.rand(2, 12, generator=torch.Generator().manual_seed(1)), torch.ones(2, 12)]
    weights[0][0, 0] = 1e-4  # head 0's first kept token: hardly attended, so its weight ratio passes the cap
    assert merge_evicted(full, kept, weights).logit_bias is None
    got = merge_evicted(full, kept, weights, attention_mass=True)
    assert got.logit_bias is not None and got.logit_bias[1] is None
    capped = 0
    for h in range(2):
        held = kept.positions[0][h]
        w = weights[0][h] + WEIGHT_FLOOR
        sim = torch.nn.functional.normalize(full.keys[0][h], dim=-1) @ torch.nn.functional.normalize(kept.keys[0][h], dim=-1).T
        group = sim.argmax(dim=1)
        group[held] = torch.arange(2)  # a kept token is in its own group
        for slot in range(2):
            ratio, size = float(w[group == slot].sum() / w[held[slot]]), int((group == slot).sum())
            capped += ratio > size
            assert float(got.logit_bias[0][h, slot]) == pytest.approx(float(torch.tensor(min(ratio, size)).log()), rel=1e-5)
    assert capped >= 1
    torch.testing.assert_close(got.values[0], merge_evicted(full, kept, weights).values[0])
    with pytest.raises(ValueError, match="logit bias"):
        keep_tokens(got, {0: torch.tensor([[0], [1]])})
