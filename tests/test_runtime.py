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
