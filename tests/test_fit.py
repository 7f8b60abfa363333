"""The fitted method (engine/fit.py): kept slots whose logit biases and values are fitted so that the
memory answers the reference queries as the full context does. These tests pin the fit's exactness
where it can be exact, that it reproduces the full context's attention on the reference queries of every
tiny architecture far better than the tokens alone, and that a fitted memory keeps every guarantee a
memory has: the store round trip, decoding as plain transformers decodes its tensors, batched decoding."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.context import rank_context, share_memory
from emloc_agents.engine.decode import generate, score_continuations, stream_batch
from emloc_agents.engine.fit import (
    FitOptions,
    Fitted,
    QueryBank,
    Reference,
    attention_output,
    fit_head,
    fit_memory,
    reference_queries,
    references,
    seen,
)
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import TINY_ARCHS, tiny_model
from emloc_agents.store import DiskCacheStore, MemoryStore, RedisStore, dump_memory, load_memory

from .conftest import make_skill, redis_server


def _problem(t: int = 64, d: int = 8, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * 0.5, torch.randn(t, d, generator=g), torch.randn(t, d, generator=g))


def test_with_more_slots_than_queries_the_fit_reproduces_output_and_mass() -> None:
    """32 kept slots, 16 queries: the value fit has more unknowns than equations, so the kept slots
    reproduce the full context's output (and closely its mass) on those queries; the same slots
    without the fit are far off."""
    queries, keys, values = _problem()
    kept = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:32]
    want, want_mass = attention_output(queries, keys, values)
    bias, fitted = fit_head(Reference.of(queries, keys, values), keys, values, kept, ridge=1e-6, iterations=200)
    got, got_mass = attention_output(queries, keys[kept], fitted, bias)
    plain, plain_mass = attention_output(queries, keys[kept], values[kept])
    assert float((got - want).norm() / want.norm()) < 2e-3
    assert float((got_mass - want_mass).abs().mean()) < 0.05
    assert float((plain - want).norm() / want.norm()) > 0.3 and float((plain_mass - want_mass).abs().mean()) > 0.3
    assert float(bias.min()) >= math.log(1e-3) - 1e-5  # the weight floor


def test_the_joint_value_target_matches_the_attention_numerator() -> None:
    """``value_target="joint"`` fits ``share * w`` (unnormalised) to the output: with more slots than
    queries the numerator over the kept slots then equals the full context's (its mass times its
    output), which is what attention over memory and new tokens together reads."""
    queries, keys, values = _problem()
    kept = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:32]
    ref = Reference.of(queries, keys, values)
    bias, fitted = fit_head(ref, keys, values, kept, ridge=1e-6, iterations=200, value_target="joint")
    share = torch.exp(queries @ keys[kept].T - ref.log_mass[:, None]) * bias.exp()
    assert float((share @ fitted - ref.output).norm() / ref.output.norm()) < 2e-3
    memory_bias, _ = fit_head(ref, keys, values, kept, ridge=1e-6, iterations=200)
    torch.testing.assert_close(bias, memory_bias)  # the same mass fit


def test_every_slot_kept_fits_to_the_identity() -> None:
    """Keeping every token, the full context is its own best fit: biases 0, values unchanged."""
    queries, keys, values = _problem(t=12, n=40)
    bias, fitted = fit_head(Reference.of(queries, keys, values), keys, values, torch.arange(12), ridge=1e-6)
    torch.testing.assert_close(bias, torch.zeros(12), atol=1e-3, rtol=0)
    torch.testing.assert_close(fitted, values, atol=1e-3, rtol=1e-3)


def _reference(lm: LanguageModel, skill, share: float):
    """(references per (layer, KV head), kept memory, fitted memory)."""
    config = EMLoCConfig(compression="fitted")
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    recon, held = QueryBank(), QueryBank()
    ranked = rank_context(lm, skill, config, full, reconstruction_queries=recon, held_out_queries=held)
    refs = references(lm, full, reference_queries(lm, recon, held))
    kept = share_memory(lm, ranked, share)
    return refs, kept, fit_memory(full, kept, refs, FitOptions())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_fitted_memory_reproduces_the_full_attention_on_the_reference_queries(arch: str) -> None:
    """On every tiny architecture, per pruned layer and KV head, the fitted memory's attention output on
    the reference queries (each over the context it sees: a held-out row not its own demonstration) is
    within 20 % (relative error) of the full context's, and at most half the error of the same kept
    tokens unfitted; sliding-window layers are left alone (no bias), and every full-attention layer has
    held-out rows with a hidden span."""
    model, tok = tiny_model(arch, chat_template=False)
    lm = LanguageModel(model, tok, f"tiny-{arch}")
    refs, kept, fitted = _reference(lm, make_skill(10), 0.3)
    f = lm.facts
    checked = 0
    for layer in range(f.num_layers):
        if f.sliding[layer]:
            assert fitted.logit_bias is not None and fitted.logit_bias[layer] is None
            torch.testing.assert_close(fitted.values[layer], kept.values[layer])
            continue
        for h in range(f.num_kv_heads):
            ref = refs[layer, h]
            assert ref.hidden is not None and bool((ref.hidden[:, 1] > ref.hidden[:, 0]).any())
            valid = fitted.positions[layer][h] >= 0
            visible = seen(ref.hidden, fitted.positions[layer][h][valid])
            got, _ = attention_output(ref.queries, fitted.keys[layer][h][valid], fitted.values[layer][h][valid],
                                      fitted.logit_bias[layer][h][valid], visible)  # type: ignore[index]
            plain, _ = attention_output(ref.queries, kept.keys[layer][h][valid], kept.values[layer][h][valid],
                                        visible=visible)
            err, plain_err = (float((x - ref.output).norm() / ref.output.norm()) for x in (got, plain))
            assert err < 0.2 and err <= 0.5 * plain_err, (layer, h, err, plain_err)
            checked += 1
    assert checked


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def plain_llama() -> LanguageModel:
    model, tok = tiny_model("llama", chat_template=False)
    return LanguageModel(model, tok, "tiny-llama-plain")


@pytest.fixture(scope="module")
def fitted_memory(plain_llama):
    memory = compress(plain_llama, make_skill(10), EMLoCConfig(compression="fitted", keep_ratios=(0.3,), delta=math.inf))
    assert memory.logit_bias is not None and memory.kept_ratio < 0.5
    return memory


def test_the_fitted_method_runs_the_check_on_the_fitted_memory(plain_llama) -> None:
    """compression='fitted' keeps the share the JS check passes on the *fitted* memory, and its
    stats carry the fit's options in the certificate."""
    memory = compress(plain_llama, make_skill(10), EMLoCConfig(compression="fitted", keep_ratios=(0.3,), delta=math.inf))
    cert = memory.certificate
    assert cert is not None and cert["method"] == "fitted" and cert["options"]["queries"] == "both"
    assert not cert["whole_context"] and cert["kept_ratio"] == pytest.approx(memory.kept_ratio, abs=1e-4)
    trial = memory.stats["trials"][-1]
    assert cert["validation_js"] == min(t["js"] for t in memory.stats["trials"]) and "changed" in trial
    whole = compress(plain_llama, make_skill(10), EMLoCConfig(compression="fitted", keep_ratios=(0.3,), delta=0.0))
    assert whole.kept_ratio == 1.0 and whole.logit_bias is None and whole.certificate["whole_context"]
    assert "whole context is kept" in whole.describe()  # said plainly


def test_first_split_stops_at_the_first_split_within_delta(plain_llama) -> None:
    """``FitOptions(first_split=True)`` (``best_split``'s ``first``): at the share kept, the splits after
    the first one within delta are not fitted or checked; with every split failing, all are tried."""
    from emloc_agents.config import METHOD_NAMES
    from emloc_agents.engine.compress import METHODS, register_method

    register_method("fitted-first", Fitted(FitOptions(first_split=True)))
    try:
        shares = EMLoCConfig().reconstruction_shares
        passing = compress(plain_llama, make_skill(10),
                           EMLoCConfig(compression="fitted-first", keep_ratios=(0.3,), delta=math.inf))
        assert [t["reconstruction_share"] for t in passing.stats["trials"]] == [shares[0]]
        assert passing.certificate["options"]["first_split"] and passing.kept_ratio < 0.5
        failing = compress(plain_llama, make_skill(10),
                           EMLoCConfig(compression="fitted-first", keep_ratios=(0.3,), delta=0.0))
        assert len(failing.stats["trials"]) == len(shares) and failing.kept_ratio == 1.0
    finally:
        METHODS.pop("fitted-first")
        METHOD_NAMES.discard("fitted-first")


@pytest.mark.parametrize("kind", ["memory", "diskcache", "redis"])
def test_a_fitted_memory_round_trips_every_store(fitted_memory, kind, tmp_path, request) -> None:
    if kind == "memory":
        store = MemoryStore()
    elif kind == "diskcache":
        store = DiskCacheStore(str(tmp_path / "cache"))
    else:
        store = RedisStore(url=request.getfixturevalue("redis_url"), namespace="fit")
    store.mset([("m", dump_memory(fitted_memory))])
    back = load_memory(store.mget(["m"])[0])
    for a, b in zip(fitted_memory.logit_bias, back.logit_bias, strict=True):  # type: ignore[arg-type]
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(fitted_memory.values, back.values, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert back.stats["certificate"] == fitted_memory.certificate
    if hasattr(store, "close"):
        store.close()


def test_decoding_on_a_fitted_memory_is_plain_transformers_on_its_tensors(plain_llama, fitted_memory) -> None:
    """The memory's tensors placed by hand: each layer's kept keys/values in a transformers
    ``DynamicCache``, its biases (and padded slots) in that layer's 4-D float mask per head (given to
    the layer's attention by a pre-hook: layers keep different lengths), transformers' own eager
    attention, the prompt at the uncompressed positions. Greedy decoding on that equals the engine's."""
    from transformers import AutoModelForCausalLM, DynamicCache

    lm, memory = plain_llama, fitted_memory
    prompt, steps = [5, 9, 14, 3], 6
    want = generate(lm, prompt, memory, max_new_tokens=steps).token_ids
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(lm.model.config), attn_implementation="eager").eval()
    eager.load_state_dict(lm.model.state_dict())
    heads, group = lm.facts.num_kv_heads, lm.facts.num_heads // lm.facts.num_kv_heads
    masks: dict[int, torch.Tensor] = {}

    def own_mask(module, args, kwargs):
        kwargs["attention_mask"] = masks[module.layer_idx]
        return args, kwargs

    for layer in eager.model.layers:
        layer.self_attn.register_forward_pre_hook(own_mask, with_kwargs=True)
    ids, got = list(prompt), []
    for _ in range(steps):  # the whole prompt again each step: no cache state carried between steps
        cache, n = DynamicCache(), len(ids)
        causal = torch.full((n, n), float("-inf")).triu(1)
        for layer, (k, v) in enumerate(zip(memory.keys, memory.values, strict=True)):
            cache.update(k[None].float(), v[None].float(), layer)
            bias = memory.logit_bias[layer] if memory.logit_bias is not None else None
            prefix = torch.zeros(heads, k.shape[1]) if bias is None else bias.clone()
            prefix[memory.positions[layer] < 0] = float("-inf")
            prefix = prefix.repeat_interleave(group, 0)[:, None, :].expand(-1, n, -1)
            masks[layer] = torch.cat([prefix, causal[None].expand(heads * group, -1, -1)], dim=-1)[None]
        positions = memory.original_length + torch.arange(n)
        with torch.no_grad():
            logits = eager(input_ids=torch.tensor([ids]), position_ids=positions[None], cache=cache,
                           use_cache=True).logits
        got.append(int(logits[0, -1].argmax()))
        ids.append(got[-1])
    assert got == want


def test_batched_decoding_and_scoring_on_a_fitted_memory(plain_llama, fitted_memory) -> None:
    """A fitted memory decodes in a batch as each prompt does alone, and scores continuations on it."""
    prompts = [[5, 9, 14, 3], [7, 7, 2]]
    alone = [generate(plain_llama, p, fitted_memory, max_new_tokens=5).token_ids for p in prompts]
    done = {i: g for i, _, g in stream_batch(plain_llama, prompts, fitted_memory, [{"max_new_tokens": 5}] * 2)
            if g is not None}
    assert [done[i].token_ids for i in range(2)] == alone
    scores = score_continuations(plain_llama, [5, 9, 14, 3], [[7], [11, 4]], fitted_memory)
    assert all(math.isfinite(s) for s in scores)


def test_fitted_takes_no_chunk_loop_knob_or_merge() -> None:
    with pytest.raises(ValueError, match="chunk-wise loop"):
        EMLoCConfig(compression="fitted", demos_per_chunk=2)
    with pytest.raises(ValueError, match="merge_evicted"):
        EMLoCConfig(compression="fitted", merge_evicted=True)


def test_a_fitted_memory_keeps_its_biases_through_a_dtype_change(fitted_memory) -> None:
    half = fitted_memory.to(dtype=torch.bfloat16)
    assert half.logit_bias is not None
    assert dataclasses.replace(half, stats={}).layer_lengths == fitted_memory.layer_lengths
