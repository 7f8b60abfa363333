"""The hook is invisible to the model's other users: after ``instrument`` (and after compressing), the
model called directly with a left-padded batch and an attention mask, or through ``generate``, gives
what an untouched copy gives."""

from __future__ import annotations

import copy

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import TINY_ARCHS, tiny_model
from emloc_agents.models.tiny_vlm import tiny_vlm

from .conftest import make_skill

# two rows, the first left-padded by 3 (pad id 2); long enough to cross gemma3's window of 24
IDS = torch.tensor([[2, 2, 2] + list(range(5, 35)), list(range(40, 73))])
MASK = torch.tensor([[0, 0, 0] + [1] * 30, [1] * 33])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padded_batch_matches_an_untouched_copy(arch: str) -> None:
    model, tok = tiny_model(arch)
    untouched = copy.deepcopy(model)
    lm = LanguageModel(model, tok, f"tiny-{arch}")
    compress(lm, make_skill(4), EMLoCConfig())  # the hook has run inside ``active`` at least once
    with torch.no_grad():
        got = model(input_ids=IDS, attention_mask=MASK).logits
        want = untouched(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # no mask: plain causal (the batch rows are then independent, unpadded sequences)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, untouched(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_generate_with_left_padding_matches_an_untouched_copy() -> None:
    model, tok = tiny_model("llama")
    untouched = copy.deepcopy(model)
    LanguageModel(model, tok, "tiny-llama")
    kw = dict(attention_mask=MASK[:, -12:], max_new_tokens=5, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        got = model.generate(IDS[:, -12:], **kw)
        want = untouched.generate(IDS[:, -12:], **kw)
    assert torch.equal(got, want)


def test_vlm_text_batch_matches_an_untouched_copy() -> None:
    model, processor = tiny_vlm("qwen2_vl")
    untouched = copy.deepcopy(model)
    LanguageModel(model, processor.tokenizer, "tiny-qwen2-vl", processor=processor)
    with torch.no_grad():
        got = model(input_ids=IDS[:, :12] + 10, attention_mask=MASK[:, :12]).logits
        want = untouched(input_ids=IDS[:, :12] + 10, attention_mask=MASK[:, :12]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_kv_head", "float_bias"])
def test_decoding_step_equals_attention_on_repeated_keys(mask_kind: str) -> None:
    """A decoding step's query heads go in as rows of their KV head: the same output as SDPA on keys
    repeated per query head, with the cache's mask (none, shared, per KV head, or float logit biases)
    widened to the query heads."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from emloc_agents.engine.runtime import _decoding_step

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 2, 6, 2, 37, 16
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    heads = {"none": 0, "shared": 1, "per_kv_head": hkv, "float_bias": hkv}[mask_kind]
    mask = None if not heads else torch.rand(b, heads, 1, n, generator=g) > 0.3
    if mask is not None:
        mask[..., 0] = True  # every row sees a key
    if mask_kind == "float_bias":
        mask = torch.zeros(b, hkv, 1, n).masked_fill_(~mask, float("-inf")) + torch.randn(b, hkv, 1, n, generator=g)
    wide = None if mask is None else mask.repeat_interleave(hq // mask.shape[1], dim=1)
    want = sdpa(q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1), attn_mask=wide, scale=0.3)
    got = _decoding_step(q, k, v, mask, 0.3)
    assert got.shape == (b, 1, hq, d)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=0, atol=1e-6)


def test_a_plain_causal_prefill_runs_without_a_mask() -> None:
    """The first forward of consecutive positions with nothing in front is plain causal: the cache
    builds no mask (SDPA runs causal, as fast as transformers' own prefill) and the hidden states equal
    the masked forward's. Anything else keeps its mask: a prefix, a second forward, a gap in the
    positions, packed segments."""
    from emloc_agents.engine.cache import MemoryCache
    from emloc_agents.engine.forward import run

    model, tok = tiny_model("llama")
    lm = LanguageModel(model, tok, "tiny-llama")
    f = lm.facts
    ids = torch.arange(5, 25)[None]

    def fresh() -> MemoryCache:
        return MemoryCache([None] * f.num_layers, [None] * f.num_layers, [None] * f.num_layers, f.windows)

    cache = fresh()
    cache.begin(torch.arange(20)[None])
    assert cache.plain_causal and cache.attention_mask(0, 20, 20) is None
    d = f.head_dim
    prefixed = MemoryCache([torch.zeros(1, f.num_kv_heads, 3, d)] * f.num_layers,
                           [torch.zeros(1, f.num_kv_heads, 3, d)] * f.num_layers, [torch.arange(3)] * f.num_layers,
                           f.windows)
    prefixed.begin(3 + torch.arange(20)[None])  # a prefix in front of the queries: not plain causal
    assert prefixed.plain_causal and prefixed.attention_mask(0, 20, 23) is not None
    cache.begin(20 + torch.arange(3)[None])  # a second forward sees the first
    assert not cache.plain_causal and cache.attention_mask(0, 3, 23) is not None
    gap = fresh()
    gap.begin(torch.tensor([[0, 1, 2, 4]]))
    assert not gap.plain_causal and gap.attention_mask(0, 4, 4) is not None
    packed = fresh()
    packed.begin(torch.arange(4)[None], segments=torch.tensor([[0, 0, 1, 1]]))
    assert not packed.plain_causal and packed.attention_mask(0, 4, 4) is not None

    plain = run(lm.model, fresh(), ids, torch.arange(20)[None])
    masked_cache = fresh()
    masked_cache.attention_mask = masked_cache.positional_mask  # type: ignore[method-assign]
    masked = run(lm.model, masked_cache, ids, torch.arange(20)[None])
    torch.testing.assert_close(plain, masked, rtol=0, atol=1e-6)
