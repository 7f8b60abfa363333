"""compression='context': the whole context ranked at once by KVzip's reconstruction and leave-one-out
replays of the demonstrations, the share chosen by the JS check on held-out demonstrations. These tests
pin that a held-out replay is what plain transformers compute with that demonstration masked out, the
rank blend keeps what either signal needs, the JS bracket holds, and the memory answers and stores."""

from __future__ import annotations

import math

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.chunk_loop import answer_rows
from emloc_agents.engine.context import (
    CHECK_GROUP,
    best_split,
    check_set,
    demo_spans,
    held_out_answers,
    held_out_cache,
    keep_share,
    packs,
    rank_blend,
    rank_context,
)
from emloc_agents.engine.decode import score_continuations
from emloc_agents.engine.memory import PAD
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import tiny_model
from emloc_agents.skills import SkillError
from emloc_agents.store.format import dump_memory, load_memory

from .conftest import make_skill
from .test_engine import DEVICES
from .test_prompt import QUERIES


def assert_same_memory(a, b, atol: float = 1e-4, min_shared: float = 0.95) -> None:
    """Two code paths' memories of one skill agree: per layer and head nearly the same kept tokens and,
    where both keep a token, its key, value and bias rows to ``atol``. Not bit for bit: the two paths
    batch their matmuls differently, and CPU kernels (AVX-512, AMX) round those differently, which may
    also flip a near-tie in the ranking."""
    for layer, (pa, pb) in enumerate(zip(a.positions, b.positions, strict=True)):
        for head in range(pa.shape[0]):
            rows_a = {int(p): i for i, p in enumerate(pa[head]) if p != PAD}
            rows_b = {int(p): i for i, p in enumerate(pb[head]) if p != PAD}
            shared = sorted(rows_a.keys() & rows_b.keys())
            assert len(shared) >= min_shared * max(len(rows_a), len(rows_b)), (layer, head)
            ia, ib = [rows_a[p] for p in shared], [rows_b[p] for p in shared]
            pairs = [(a.keys, b.keys), (a.values, b.values)]
            if a.logit_bias is not None and b.logit_bias is not None and a.logit_bias[layer] is not None:
                pairs.append((a.logit_bias, b.logit_bias))
            for xa, xb in pairs:
                torch.testing.assert_close(xa[layer][head][ia].float(), xb[layer][head][ib].float(),
                                           atol=atol, rtol=1e-3)


@pytest.fixture(scope="module")
def plain_llama() -> LanguageModel:
    model, tok = tiny_model("llama", chat_template=False)
    return LanguageModel(model, tok, "tiny-llama-plain")


def test_a_held_out_replay_is_the_whole_text_with_its_demonstration_masked(plain_llama) -> None:
    """Demonstration j replayed after the context with its own span hidden: the answer rows' log-probs
    equal one plain transformers forward of context + demonstration j whose replay rows cannot see
    the span (a 4-D mask), at the same positions."""
    lm, skill = plain_llama, make_skill(6)
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    rendered = lm.renderer("plain").render(skill.instruction, skill.demonstrations)
    spans = demo_spans(rendered.prefix, rendered.demos)
    assert spans[-1][1] == full.original_length == len(rendered.ids)
    j = 2
    # replayed packed with its neighbours (each its own segment, hiding its own span), as rank_context does
    got = held_out_answers(lm, full, rendered.demos, spans, [1, j, 3], score=False, keep_log_probs={j}).log_probs[j]
    demo = rendered.demos[j]
    total, m = full.original_length, len(demo)
    ids = torch.tensor([rendered.ids + demo.ids])
    visible = torch.ones(total + m, total + m, dtype=torch.bool).tril()
    lo, hi = spans[j]
    visible[total:, lo:hi] = False
    mask = torch.zeros(1, 1, total + m, total + m).masked_fill(~visible, torch.finfo(torch.float32).min)
    reference, _ = tiny_model("llama", chat_template=False)  # same seed, untouched by instrument()
    with torch.no_grad():
        logits = reference(ids, attention_mask=mask, position_ids=torch.arange(total + m)[None]).logits[0, total:]
    want = torch.log_softmax(logits[answer_rows(demo)].float(), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and the span matters: without hiding it the answer reads differently
    seen = torch.log_softmax(reference(ids, position_ids=torch.arange(total + m)[None]).logits[0, total:][answer_rows(demo)].float(), -1)
    assert not torch.allclose(got, seen, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_packed_held_out_replays_equal_one_demonstration_per_forward(arch: str, device: str) -> None:
    """Packing replays into shared forwards changes nothing: the same attention scores and log-probs as
    one forward per demonstration, on the unpruned context and on a pruned one (per-head slots)."""
    model, tok = tiny_model(arch)
    model.to(device)
    lm, skill = LanguageModel(model, tok, f"tiny-{arch}"), make_skill(8)
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    ranked = rank_context(lm, skill, EMLoCConfig(compression="context"), full)
    pruned, _ = keep_share(lm, ranked, 0.3)
    assert any(v is not None and not bool(v.all()) for v in pruned.valid_masks)  # heads keep different slots
    which = range(len(ranked.demos))
    for memory, score in ((full, True), (pruned, False)):  # scores are read on the full context only
        one, packed = (held_out_answers(lm, memory, ranked.demos, ranked.spans, which, score=score,
                                        keep_log_probs=set(which), pack_tokens=tokens) for tokens in (0, 10_000))
        for a, b in zip(one.scores or [], packed.scores or [], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert sorted(one.log_probs) == sorted(packed.log_probs) == list(which)
        for j in which:
            torch.testing.assert_close(one.log_probs[j], packed.log_probs[j], atol=1e-4, rtol=1e-4)


def test_every_row_scores_take_the_max_over_more_rows(plain_llama) -> None:
    """``score_every_row`` (scripts/context_variants.py's every-row variant): the questions' rows join
    the answers' in the max, so no score falls and some rise; the log-probs are the same."""
    lm, skill = plain_llama, make_skill(8)
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    ranked = rank_context(lm, skill, EMLoCConfig(compression="context"), full)
    which = [0, 2, 5]
    answers, every = (held_out_answers(lm, full, ranked.demos, ranked.spans, which, score=True, keep_log_probs={2},
                                       score_every_row=flag) for flag in (False, True))
    assert answers.scores is not None and every.scores is not None
    assert all(bool((e >= a - 1e-6).all()) for a, e in zip(answers.scores, every.scores, strict=True))
    assert any(bool((e > a + 1e-4).any()) for a, e in zip(answers.scores, every.scores, strict=True))
    torch.testing.assert_close(answers.log_probs[2], every.log_probs[2])


def test_held_out_views_hide_each_segments_span_per_head(plain_llama) -> None:
    """Segment s sees every slot except the tokens of its own span and padded slots, in each head's
    own slots; one row for all heads only where the heads hold the same tokens (the unpruned context)."""
    lm, skill = plain_llama, make_skill(8)
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    ranked = rank_context(lm, skill, EMLoCConfig(compression="context"), full)
    pruned, _ = keep_share(lm, ranked, 0.3)
    spans = [ranked.spans[1], ranked.spans[4]]
    for memory in (full, pruned):
        valid = held_out_cache(lm, memory, spans).prefix_valid
        for layer, pos in enumerate(memory.positions):  # (kv_heads, M), PAD where a head has no token
            want = torch.stack([(pos != PAD) & ((pos < a) | (pos >= b)) for a, b in spans])  # (S, kv_heads, M)
            got = valid[layer]
            assert got is not None
            heads_differ = not bool((want == want[:, :1]).all())
            assert got.shape[1] == (lm.facts.num_kv_heads if heads_differ else 1)
            assert torch.equal(got.expand_as(want), want)
    assert any(v.shape[1] > 1 for v in held_out_cache(lm, pruned, spans).prefix_valid)  # a real per-head case


def test_auto_is_the_whole_context_for_text_and_the_loop_otherwise(plain_llama) -> None:
    """The default, compression='auto': whole-context ranking for text skills; the chunk-wise loop for
    images, for configs that set a knob of the loop, and for the paper's reference settings."""
    assert EMLoCConfig().compression == "auto"
    assert EMLoCConfig(delta=0.1).resolved_compression(images=False) == "context"
    assert EMLoCConfig().resolved_compression(images=True) == "chunks"
    assert EMLoCConfig(pool_kernel=3).resolved_compression(images=False) == "chunks"
    assert EMLoCConfig().model_copy(update={"demos_per_chunk": 2}).resolved_compression(images=False) == "chunks"
    same = EMLoCConfig(pool_kernel=5, lookahead=None)  # loop knobs at their defaults: still the default
    assert same.resolved_compression(images=False) == "context" and same.fingerprint() == EMLoCConfig().fingerprint()
    assert EMLoCConfig.model_validate(EMLoCConfig().model_dump()).resolved_compression(images=False) == "context"
    assert EMLoCConfig.reference().resolved_compression(images=False) == "chunks"
    assert compress(plain_llama, make_skill(8)).stats["press"] == "context"
    assert compress(plain_llama, make_skill(8), EMLoCConfig(lookahead=2)).stats["press"] == "emloc"
    with pytest.raises(ValueError, match="need compression='chunks'"):
        EMLoCConfig(compression="context", lookahead=2)


def test_the_check_set_is_a_spread_validation_set() -> None:
    assert check_set(128) == [round(i * 127 / 15) for i in range(16)]
    assert check_set(8) == [0, 7] and check_set(1) == [0]  # at most a quarter of the demonstrations


def test_the_split_whose_held_out_answers_move_least_is_kept(plain_llama) -> None:
    """At a keep ratio the search keeps the reconstruction share with the lowest JS, not the first."""
    lm, skill = plain_llama, make_skill(12)
    config = EMLoCConfig(compression="context", delta=1.0, reconstruction_shares=(0.5, 0.7, 0.85, 1.0))
    mem = compress(lm, skill, config)
    trials = mem.stats["trials"]
    best = min(trials, key=lambda t: t["js"])
    assert len({t["js"] for t in trials}) == 4 and best is not trials[0]  # else the test shows nothing
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    want, js = keep_share(lm, rank_context(lm, skill, config, full), 0.1, best["reconstruction_share"])
    # the same split, its JS to float32 rounding (batched differently, the last digits move per CPU kernel)
    assert js == pytest.approx(best["js"], rel=1e-4) and mem.stats["reconstruction_share"] == best["reconstruction_share"]
    for a, b in zip(mem.keys, want.keys, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-3)


def test_a_check_that_stops_early_keeps_the_split_the_whole_checks_keep(plain_llama) -> None:
    """With a bound the check stops once its JS is certainly above it (the sum so far over all rows);
    the split kept is the one the whole checks keep among those within delta, a stopped trial records a
    lower bound above its bound, and a complete one its whole JS."""
    lm, skill = plain_llama, make_skill(40)
    config = EMLoCConfig(compression="context")
    ranked = rank_context(lm, skill, config, compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32")))
    assert len(ranked.checked) > CHECK_GROUP  # else no check can stop early
    shares = (0.3, 0.5, 0.7, 0.85, 1.0)
    whole = {s: keep_share(lm, ranked, 0.2, s)[1] for s in shares}
    low = sorted(whole.values())
    stopped = 0
    for delta in (0.0, (low[1] + low[2]) / 2, math.inf):
        _, js, split, trials = best_split(lm, ranked, 0.2, shares, delta=delta)
        within = {s: v for s, v in whole.items() if v <= delta}
        if within:
            assert split == min(within, key=within.__getitem__) and js == pytest.approx(whole[split], rel=1e-4)
        else:
            assert js > delta
        best = math.inf
        for t in trials:
            true = whole[t["reconstruction_share"]]
            if t["complete"]:
                assert t["js"] == pytest.approx(true, rel=1e-4)
            else:
                assert min(delta, best) < t["js"] <= true * (1 + 1e-4)
                stopped += 1
            best = min(best, t["js"])
    assert stopped >= len(shares)  # delta = 0 stops every trial after its first group


def test_packs_cut_replays_by_tokens() -> None:
    assert packs([5, 5, 5, 5], range(4), 10) == [[0, 1], [2, 3]]
    assert packs([5, 20, 5], range(3), 10) == [[0], [1], [2]]  # one too long for a pack goes alone
    assert packs([5, 5, 5], [0, 2], 0) == [[0], [2]]  # 0: one per forward


def test_rank_blend_weights_split_the_top_k() -> None:
    """Family i fills its weight's share of a top-k (disjoint favourites): 3 of the top 4 go to the
    family weighted 0.75; equal weights are the plain max of ranks."""
    n = 100
    a = [torch.arange(n, dtype=torch.float32)[None]]  # favours the last tokens
    b = [torch.arange(n, 0, -1, dtype=torch.float32)[None]]  # favours the first
    top = rank_blend(a, b, weights=(0.75, 0.25))[0][0].topk(40).indices
    assert (top >= 50).sum() == 30 and (top < 50).sum() == 10
    assert torch.equal(rank_blend(a, b, weights=(1, 1))[0], rank_blend(a, b)[0])
    assert torch.equal(rank_blend(a, b, weights=(1, 0))[0].argsort(), a[0].argsort())  # one family alone


def test_rank_blend_keeps_what_either_signal_ranks_high() -> None:
    a = [torch.tensor([[10.0, 0.0, 1.0, 2.0]]), torch.tensor([[3.0, 4.0, 5.0, 6.0]])]
    b = [torch.tensor([[0.0, 0.9, 0.1, 0.2]]), torch.tensor([[0.3, 0.4, 0.5, 0.0]])]
    out = rank_blend(a, b)
    flat = torch.cat([s.flatten() for s in out])
    assert flat.max() == 1.0 and flat.min() > 0
    assert out[0][0, 0] == 1.0 and out[0][0, 1] == 1.0  # each family's best is blended to the top
    assert out[0][0, 2] < out[1][0, 2]  # low in both stays low


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("delta, ratio", [(1.0, 0.1), (0.0, 1.0)])
def test_the_js_bracket_picks_the_share(arch: str, delta: float, ratio: float, device: str) -> None:
    """delta=1 takes the smallest share, delta=0 keeps the whole context (every share moves the
    held-out answers a little); sliding-window layers keep exactly their window."""
    model, tok = tiny_model(arch)
    model.to(device)
    lm = LanguageModel(model, tok, f"tiny-{arch}")
    skill = make_skill(10)
    mem = compress(lm, skill, EMLoCConfig(compression="context", delta=delta))
    trials = mem.stats["trials"]
    assert trials[0]["ratio"] == 0.1 and all(t["js"] > 0 for t in trials)
    splits = len(EMLoCConfig().reconstruction_shares)  # each ratio tries every split
    assert [t["ratio"] for t in trials] == [r for r in ((0.1,) if delta == 1.0 else (0.1, 0.2, 0.5)) for _ in range(splits)]
    assert [t["reconstruction_share"] for t in trials[:splits]] == list(EMLoCConfig().reconstruction_shares)
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    if ratio == 1.0:
        assert mem.kept_ratio == 1.0 and all(v is None for v in mem.valid_masks)
    else:
        assert mem.kept_ratio == pytest.approx(0.1, abs=0.01)
        assert any(v is not None for v in mem.valid_masks)  # heads keep different numbers
    for layer, sliding in enumerate(lm.facts.sliding):
        if sliding:
            assert torch.equal(mem.positions[layer], full.positions[layer])
    assert mem.keys[0].dtype == torch.float16  # storage_dtype


def test_the_memory_keeps_the_instruction_answers_and_stores(plain_llama) -> None:
    lm, skill = plain_llama, make_skill(8)
    config = EMLoCConfig(compression="context", keep_ratios=(0.2,), delta=1.0)
    mem = compress(lm, skill, config)
    prefix = len(lm.renderer("plain").render(skill.instruction, skill.demonstrations).prefix)
    for layer, p in enumerate(mem.positions):  # protect_prefix: every head keeps the instruction
        for h in range(p.shape[0]):
            kept = set(p[h][p[h] != PAD].tolist())
            assert set(range(prefix)) <= kept, (layer, h)
    no_prefix = compress(lm, skill, config.model_copy(update={"protect_prefix": False}))
    assert any(not set(range(prefix)) <= set(p[h].tolist()) for p in no_prefix.positions for h in range(p.shape[0]))
    back = load_memory(dump_memory(mem), type(mem))
    q = lm._prompt_ids(QUERIES[0], mem)
    scores = score_continuations(lm, q, [[5, 6], [7]], mem)
    assert all(math.isfinite(x) for x in scores)
    assert score_continuations(lm, q, [[5, 6], [7]], back) == pytest.approx(scores)
    assert EMLoCConfig(compression="context").fingerprint() != EMLoCConfig().fingerprint()


def test_context_compression_is_for_text() -> None:
    from emloc_agents.models.tiny_vlm import load_tiny_vlm

    lm = load_tiny_vlm()
    with pytest.raises(SkillError, match="text models"):
        compress(lm, make_skill(4), EMLoCConfig(compression="context"))
    from emloc_agents.bench.methods import prepare

    for method in ("emloc-share", "kvzip-whole"):  # the bench's whole-context methods too
        with pytest.raises(SkillError, match="text models"):
            prepare(lm, method, make_skill(4), ratio=0.3)


def test_bench_builds_the_whole_context_methods(plain_llama) -> None:
    from emloc_agents.bench.methods import prepare

    skill = make_skill(8)
    ctx = prepare(plain_llama, "emloc-context", skill)
    assert ctx.memory is not None and ctx.memory.stats["press"] == "context"
    whole = prepare(plain_llama, "kvzip-whole", skill, ratio=0.3)
    assert whole.memory is not None and whole.memory.stats["press"] == "kvzip-whole"
    assert whole.kept_ratio == pytest.approx(0.3, abs=0.01) and whole.press_ratio == 0.3


def test_bench_emloc_share_is_the_default_forced_to_a_share(plain_llama) -> None:
    """``emloc-share`` at a ratio is what ``compress`` keeps when that ratio is the only candidate and δ
    accepts anything; ranking once per skill changes nothing, and ``kvzip-whole`` read from that ranking
    is the memory it builds on its own."""
    from emloc_agents.bench import methods

    skill = make_skill(8)
    methods._RANKED.clear()
    alone = methods.prepare(plain_llama, "kvzip-whole", skill, ratio=0.3).memory
    shares = {r: methods.prepare(plain_llama, "emloc-share", skill, ratio=r) for r in (0.3, 0.5)}
    from_ranking = methods.prepare(plain_llama, "kvzip-whole", skill, ratio=0.3).memory
    for ratio, got in shares.items():
        forced = compress(plain_llama, skill, EMLoCConfig(compression="context", keep_ratios=(ratio,), delta=1.0))
        assert got.memory is not None and got.press_ratio == ratio and got.ratio_source == "--ratio"
        assert got.memory.stats["reconstruction_share"] == forced.stats["reconstruction_share"]
        assert got.kept_ratio == pytest.approx(forced.kept_ratio)
        assert_same_memory(got.memory, forced)
    assert alone is not None and from_ranking is not None
    assert_same_memory(alone, from_ranking)


def test_bench_emloc_share_merged_is_the_knob_forced_to_a_share(plain_llama) -> None:
    """``emloc-share-merged`` is ``compress`` with ``merge_evicted=True`` forced to the share: the
    same split, slots, values and biases, read from the ranking ``emloc-share`` already made."""
    from emloc_agents.bench import methods

    skill = make_skill(8)
    methods._RANKED.clear()
    plain = methods.prepare(plain_llama, "emloc-share", skill, ratio=0.3).memory
    got = methods.prepare(plain_llama, "emloc-share-merged", skill, ratio=0.3)
    forced = compress(plain_llama, skill, EMLoCConfig(compression="context", keep_ratios=(0.3,), delta=1.0,
                                                      merge_evicted=True))
    assert got.memory is not None and plain is not None and got.memory.stats["press"] == "emloc-share-merged"
    assert got.memory.logit_bias is not None and forced.logit_bias is not None
    assert got.memory.stats["reconstruction_share"] == forced.stats["reconstruction_share"]
    assert_same_memory(got.memory, forced)
    assert any(a.shape != b.shape or not torch.allclose(a, b, atol=1e-2)  # merging changed the values
               for a, b in zip(got.memory.values, plain.values, strict=True))
