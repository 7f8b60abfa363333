"""Per-head budgets: a layer's share ranked across its KV heads, so heads keep different numbers of
tokens. The memory pads the shorter heads with never-visible slots (position PAD); these tests pin
that such a memory answers exactly like the kept tokens seen through a per-head mask by plain
transformers, survives the store, counts only real tokens, and that the search stays decision-exact."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine import CompressedMemory
from emloc_agents.engine.decode import generate, memory_cache, score_continuations
from emloc_agents.engine.forward import lm_logits, run
from emloc_agents.engine.memory import PAD
from emloc_agents.engine.presses import Press, topk_across_heads
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import tiny_model
from emloc_agents.store.format import dump_memory, load_memory

from .conftest import make_skill
from .test_prompt import QUERIES


def test_topk_across_heads_ranks_the_layer_as_one() -> None:
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.0], [0.0, 0.1, 5.0, 0.2, 0.3], [1.0, 1.1, 1.2, 1.3, 1.4]])
    idx = topk_across_heads(scores, 2)  # 6 of the 15 tokens: head 0 takes 4, head 1 one, head 2 one
    assert idx.tolist() == [[0, 1, 2, 3], [2, -1, -1, -1], [4, -1, -1, -1]]
    protected = scores.clone()
    protected[:, 0] = float("inf")  # protected tokens survive in every head
    assert (topk_across_heads(protected, 2)[:, 0] == 0).all()
    assert topk_across_heads(scores, 9).shape == (3, 5)  # never more than the chunk


@dataclass
class KeepPerHead(Press):
    """Head j keeps every (2 + j)-th token of each chunk: heads keep different numbers of tokens."""

    def select(self, ctx):
        h = ctx.facts.num_kv_heads
        rows = [torch.arange(0, ctx.n, 2 + j) for j in range(h)]
        idx = torch.full((h, max(len(r) for r in rows)), -1, dtype=torch.long)
        for j, r in enumerate(rows):
            idx[j, : len(r)] = r
        return [idx.clone() for _ in range(ctx.facts.num_layers)]


@pytest.fixture(scope="module")
def plain_llama() -> LanguageModel:
    model, tok = tiny_model("llama", chat_template=False)
    return LanguageModel(model, tok, "tiny-llama-plain")


@pytest.fixture(scope="module")
def padded(plain_llama) -> CompressedMemory:
    return compress(plain_llama, make_skill(9), EMLoCConfig(storage_dtype="float32"), press=KeepPerHead())


def test_padded_memory_equals_a_per_head_mask_in_plain_transformers(plain_llama, padded) -> None:
    lm, mem = plain_llama, padded
    h = lm.facts.num_kv_heads
    assert h > 1 and all(v is not None for v in mem.valid_masks)
    rendered = lm.renderer("plain").render("Classify the sentiment.", make_skill(9).demonstrations)
    chunks = [rendered.prefix.ids + [t for d in rendered.demos[:4] for t in d.ids]]
    chunks += [[t for d in rendered.demos[i : i + 4] for t in d.ids] for i in range(4, 9, 4)]
    chunk_of = [c for c, ids in enumerate(chunks) for _ in ids]
    local = [j for ids in chunks for j in range(len(ids))]
    assert len(chunk_of) == mem.original_length
    kept = [[j % (2 + head) == 0 for j in local] for head in range(h)]
    assert mem.kept_lengths[0] == pytest.approx(sum(sum(k) for k in kept) / h)
    assert mem.kept_ratio == pytest.approx(mem.kept_lengths[0] / mem.original_length)
    q = lm._prompt_ids(QUERIES[0], mem)
    cache, start = memory_cache(lm, mem)
    got = lm_logits(lm.model, lm.facts, run(lm.model, cache, torch.tensor([q]), start + torch.arange(len(q))[None])[0])
    # reference: one plain forward of the whole text; a token sees the earlier tokens of its own chunk
    # and, per KV head, only that head's kept tokens of earlier chunks (queries: of all chunks)
    chunk_of += [len(chunks)] * len(q)
    total = len(chunk_of)
    heads = []
    for head in range(h):
        keep = kept[head] + [True] * len(q)
        heads.append([[j <= i and (chunk_of[j] == chunk_of[i] or keep[j]) for j in range(total)] for i in range(total)])
    visible = torch.tensor(heads).repeat_interleave(lm.facts.num_heads // h, dim=0)[None]  # (1, Hq, T, T)
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    ids = torch.tensor([[t for c in chunks for t in c] + q])
    reference, _ = tiny_model("llama", chat_template=False)  # same seed, untouched by instrument()
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask, position_ids=torch.arange(total)[None]).logits[0, -len(q) :]
    torch.testing.assert_close(got, ref.float(), atol=1e-4, rtol=1e-4)


def test_padded_memory_survives_the_store_and_decodes(plain_llama, padded) -> None:
    back = load_memory(dump_memory(padded), CompressedMemory)
    assert all(torch.equal(a, b) for a, b in zip(back.positions, padded.positions, strict=True))
    assert (back.positions[0] == PAD).any() and back.kept_ratio == pytest.approx(padded.kept_ratio)
    assert padded.kept_ratio < max(padded.layer_lengths) / padded.original_length  # slots are not tokens
    q = plain_llama._prompt_ids(QUERIES[1], padded)
    one = generate(plain_llama, q, padded, max_new_tokens=4)
    assert generate(plain_llama, q, back, max_new_tokens=4).token_ids == one.token_ids
    # multi-token continuations fork the cache (prefix + prompt): padding must carry over
    scores = score_continuations(plain_llama, q, [[5, 6, 7], [8]], padded)
    assert scores == pytest.approx(score_continuations(plain_llama, q, [[5, 6, 7], [8]], back))


def test_kvzip_ranked_across_layers_and_heads_keeps_the_global_budget(plain_llama) -> None:
    """kvpress's KVzip ranks every (layer, head, token) together; the memory keeps exactly that many
    tokens, padded per head, and answers."""
    from emloc_agents.engine.reconstruct import kvzip_memory

    lm = plain_llama
    skill = make_skill(6)
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    torch.manual_seed(0)
    scores = [torch.rand(lm.facts.num_kv_heads, full.original_length) for _ in range(lm.facts.num_layers)]
    mem = kvzip_memory(lm, full, scores, 0.25, layer_budgets=True, head_budgets=True)
    k = round(0.25 * full.original_length)
    kept = sum(int((p >= 0).sum()) for p in mem.positions)
    assert kept == k * lm.facts.num_kv_heads * lm.facts.num_layers
    assert any(v is not None for v in mem.valid_masks) and len(set(mem.kept_lengths)) > 1
    best = torch.cat([s.flatten() for s in scores]).topk(kept).values.min()
    for s, p in zip(scores, mem.positions, strict=True):  # every kept token scores at least the cut
        for h in range(p.shape[0]):
            assert (s[h, p[h][p[h] >= 0]] >= best).all()
    q = lm._prompt_ids(QUERIES[0], mem)
    assert all(math.isfinite(x) for x in score_continuations(lm, q, [[5, 6], [7]], mem))


def test_rank_all_heads_keeps_the_global_winners() -> None:
    from emloc_agents.engine.presses import rank_all_heads

    scores = {0: torch.tensor([[5.0, 0.1, 0.2], [4.0, 0.3, 0.4]]), 3: torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.6, 6.0]])}
    ranked = rank_all_heads(scores, 1)  # 4 winners of 12: 6, 5, 4, 3
    assert ranked[0].tolist() == [[0], [0]] and ranked[3].tolist() == [[0], [2]]
    ranked = rank_all_heads(scores, 2)  # 8 winners: 6, 5, 4, 3, 2, 1, 0.6, 0.5
    assert ranked[0].tolist() == [[0], [0]]
    assert ranked[3].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_bench_builds_the_per_head_methods(plain_llama) -> None:
    from emloc_agents.bench.methods import prepare

    skill = make_skill(8)
    for method in ("kvzip-heads", "kvzip-global"):
        prep = prepare(plain_llama, method, skill, ratio=0.3)
        assert prep.memory is not None and any(v is not None for v in prep.memory.valid_masks), method
        assert prep.kept_ratio == pytest.approx(0.3, abs=0.05) and prep.press_ratio == 0.3
    glob = prepare(plain_llama, "kvzip-global", skill, ratio=0.3).memory
    assert glob is not None and len({round(x, 3) for x in glob.kept_lengths}) > 1  # layers differ
