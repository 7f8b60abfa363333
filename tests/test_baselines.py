"""The off-the-shelf baselines the memory must beat: KVzip's reconstruction scores and fewer whole
demonstrations at the same token budget."""

from __future__ import annotations

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.bench.methods import fewer_shots, prepare
from emloc_agents.bench.presses import KVzipPress
from emloc_agents.engine.cache import MemoryCache
from emloc_agents.engine.forward import run
from emloc_agents.engine.reconstruct import REPEAT_PROMPT, max_attention, reconstruction_scores
from emloc_agents.engine.replay import Building
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import tiny_model

from .conftest import make_skill


def test_reconstruction_scores_equal_eager_attention() -> None:
    """One chunk: the scores are the max eager attention probability that the repeat rows pay to
    each chunk token (over rows and the query heads of each KV head)."""
    model, tok = tiny_model("qwen2", chat_template=False)  # GQA: 4 query heads share 2 KV heads
    reference, _ = tiny_model("qwen2", chat_template=False)
    reference.set_attn_implementation("eager")
    lm = LanguageModel(model, tok, "tiny-qwen2")
    skill = make_skill(3)
    chunk = lm.renderer().render(skill.instruction, skill.demonstrations).ids
    n = len(chunk)
    cache_ids = torch.tensor([chunk])
    f = lm.facts
    cache = MemoryCache([None] * f.num_layers, [None] * f.num_layers, [None] * f.num_layers, f.windows)
    run(lm.model, cache, cache_ids, torch.arange(n)[None])
    ck, cv = zip(*(cache.chunk_kv(i) for i in range(f.num_layers)), strict=True)
    repeat = lm.renderer().ids(REPEAT_PROMPT) + chunk[1:]
    got = reconstruction_scores(lm, Building.empty(f.num_layers), ck, cv, torch.arange(n), repeat, n)
    with torch.no_grad():
        att = reference(torch.tensor([chunk + repeat]), output_attentions=True).attentions
    group = reference.config.num_attention_heads // f.num_kv_heads
    for layer in range(f.num_layers):
        a = att[layer][0, :, n:, :n]  # (Hq, repeat rows, chunk)
        want = a.amax(dim=1).view(f.num_kv_heads, group, n).amax(dim=1)
        torch.testing.assert_close(got[layer], want.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["random", "causal"])
@pytest.mark.parametrize("hiding", ["shared", "per-head", "none"])
@pytest.mark.parametrize("per_head_mask", [False, True])
def test_max_attention_in_row_blocks_is_the_plain_softmax(per_head_mask: bool, hiding: str, causal: bool) -> None:
    """Row blocks (a small ``block`` forces many) give exactly the max over rows of the plain softmax
    over the visible keys, with hidden keys left out (dropped before the product: the same numbers as
    masking them); the row dimension of the mask may broadcast. Causal rows (the queries are the last
    keys, as in a reconstruction forward) with ``trim`` leave the keys after a block's last row out of its
    product, scored keys included, which still score 0."""
    torch.manual_seed(0)
    hq, hkv, rows, lk, d = 4, 2, 7, 11, 8
    q, k = torch.randn(1, hq, rows, d), torch.randn(1, hkv, lk, d)
    mask = torch.rand(1, hq if per_head_mask else 1, rows, lk) > 0.2
    mask[..., 0] = True  # every row sees a key
    if causal:  # row r is key lk - rows + r: the scored keys 2:9 reach past the first rows' last key
        mask &= torch.arange(lk)[None, :] <= (lk - rows + torch.arange(rows))[:, None]
    hidden = torch.zeros(hkv, lk, dtype=torch.bool)
    hidden[:, 5:7] = hiding != "none"  # before and inside the scored keys 2:9
    hidden[:, 10] = hiding != "none"  # after them
    if hiding == "per-head":
        hidden[0, 1] = True  # one head hides a key the other sees
    module = torch.nn.Module()
    got = [max_attention(module, q, k, mask, 2, 9, None if hiding == "none" else hidden, block=b, trim=trim)
           for b in (1 << 30, hq * lk, 1) for trim in (False, True)]
    logits = torch.einsum("hqd,hkd->hqk", q[0], k[0].repeat_interleave(2, dim=0)) * d**-0.5
    visible = mask[0].expand(hq, -1, -1) & ~hidden.repeat_interleave(2, dim=0)[:, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)[..., 2:9]
    want = probs.amax(dim=1).view(hkv, 2, 7).amax(dim=1)
    for g in got:
        torch.testing.assert_close(g, want)
    assert max_attention(module, q[:, :, :1], k, mask[:, :, :1], 2, 9, block=1).shape == (hkv, 7)


def test_kvzip_press_keeps_its_share() -> None:
    model, tok = tiny_model("llama", chat_template=False)
    lm = LanguageModel(model, tok, "tiny-llama")
    mem = compress(lm, make_skill(12), EMLoCConfig(), press=KVzipPress(ratio=0.3))
    assert mem.kept_ratio == pytest.approx(0.3, abs=0.05)
    full = compress(lm, make_skill(12), EMLoCConfig(), press=KVzipPress(ratio=1.0))
    assert full.kept_ratio == 1.0


def test_fewer_shots_fills_the_budget_with_whole_demonstrations(tiny_llama) -> None:
    skill = make_skill(16)
    r = tiny_llama.renderer()
    full = r.render(skill.instruction, skill.demonstrations).num_tokens
    cut = fewer_shots(tiny_llama, skill, 0.3)
    k = len(cut.demonstrations)
    assert 1 <= k < 16 and cut.demonstrations == skill.demonstrations[:k]
    assert r.render(skill.instruction, cut.demonstrations).num_tokens <= 0.3 * full
    assert r.render(skill.instruction, skill.demonstrations[: k + 1]).num_tokens > 0.3 * full
    prep = prepare(tiny_llama, "fewer-shots", skill, ratio=0.3)
    assert prep.memory is not None and prep.memory.kept_ratio == 1.0
    assert prep.kept_ratio == pytest.approx(prep.memory.original_length / full)
    assert prep.kept_ratio <= 0.3


def test_global_layer_budgets_follow_the_scores() -> None:
    from emloc_agents.engine.presses import global_layer_budgets

    gen = torch.Generator().manual_seed(0)
    low, high = torch.rand(2, 50, generator=gen) * 0.1, 0.5 + torch.rand(2, 50, generator=gen)
    budgets = global_layer_budgets({0: low, 3: high, 5: low.flip(-1)}, k=10)
    assert budgets[3] == 30 and budgets[0] == budgets[5] == 1  # all winners sit in layer 3 (capped at n: 50)
    even = global_layer_budgets({0: high, 1: high.clone()}, k=10)
    assert even == {0: 10, 1: 10}


def test_kvzip_layer_budgets_keep_the_overall_share() -> None:
    lm = LanguageModel(*tiny_model("llama"), "tiny-llama")
    uniform = compress(lm, make_skill(8), EMLoCConfig(), press=KVzipPress(ratio=0.3))
    adaptive = compress(lm, make_skill(8), EMLoCConfig(), press=KVzipPress(ratio=0.3, layer_budgets=True))
    assert len(set(uniform.layer_lengths)) == 1 and len(set(adaptive.layer_lengths)) > 1
    assert abs(adaptive.kept_ratio - uniform.kept_ratio) < 0.05


@pytest.mark.parametrize("span", [16, 4096])
def test_whole_context_kvzip(span: int) -> None:
    """KVzip on the whole unpruned context (kvpress's algorithm): scores for every token, the sinks
    always kept, and a memory keeping the asked share whose kept keys are the full context's."""
    from emloc_agents.engine.reconstruct import kvzip_memory, whole_context_scores

    model, tok = tiny_model("llama", chat_template=False)
    lm = LanguageModel(model, tok, "tiny-llama")
    skill = make_skill(8)
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    rendered = lm.renderer("auto").render(skill.instruction, skill.demonstrations)
    ids = rendered.ids
    scores = whole_context_scores(lm, full, ids, span=span, sinks=4)
    assert len(scores) == lm.facts.num_layers
    for s in scores:
        assert s.shape == (lm.facts.num_kv_heads, len(ids)) and bool(s[:, :4].isinf().all())
        assert bool((s[:, 4:] > 0).all()) and bool((s[:, 4:] <= 1).all())  # every token was reconstructed
    mem = kvzip_memory(lm, full, scores, ratio=0.3)
    assert mem.kept_ratio == pytest.approx(0.3, abs=0.05)
    for k, fk, pos in zip(mem.keys, full.keys, mem.positions, strict=True):
        assert bool((pos[:, :4] == torch.arange(4)).all())  # sinks first, in order
        assert torch.equal(k, torch.stack([fk[h, pos[h]] for h in range(k.shape[0])]))
    assert kvzip_memory(lm, full, scores, ratio=1.0, layer_budgets=False).kept_ratio == 1.0
