"""The prompt cache: a prompt that starts like a recent one on the same memory prefills only the rest,
and every next-token distribution is the one a full prefill gives (float rounding aside)."""

from __future__ import annotations

import pytest
import torch

from emloc_agents import EMLoCChatModel, EMLoCConfig, MemoryRegistry, compress
from emloc_agents.engine.decode import stream_tokens
from emloc_agents.engine.prompt_cache import PromptCache
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import tiny_model

from .conftest import make_skill


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])  # full attention; sliding windows
def lm(request) -> LanguageModel:
    model, tok = tiny_model(request.param, chat_template=False)
    return LanguageModel(model, tok, f"tiny-{request.param}")


def _run(lm: LanguageModel, ids: list[int], memory, cache: PromptCache | None, steps: int = 6):
    seen: list[torch.Tensor] = []

    def record(input_ids, scores):
        seen.append(scores.clone())
        return scores

    *_, (_, gen) = stream_tokens(lm, ids, memory, max_new_tokens=steps, logits_processor=[record],
                                 prompt_cache=cache)
    assert gen is not None
    return gen, torch.cat(seen)


@pytest.mark.parametrize("on_memory", [None, "context", "fitted"])  # fitted: per-slot logit biases
def test_a_shared_prefix_is_prefilled_once_and_answers_as_a_full_prefill(lm, on_memory) -> None:
    memory = None if on_memory is None else compress(
        lm, make_skill(6), EMLoCConfig(compression=on_memory, keep_ratios=(0.5,), delta=1.0))
    assert on_memory != "fitted" or (memory is not None and memory.logit_bias is not None)
    first = list(range(5, 45))
    second = first[:30] + list(range(60, 72))  # shares 30 tokens, then differs
    cache = PromptCache(min_shared=8)
    _, _ = _run(lm, first, memory, cache)
    got, got_scores = _run(lm, second, memory, cache)
    want, want_scores = _run(lm, second, memory, None)
    assert got.stats["prompt_tokens_reused"] == 30 and want.stats["prompt_tokens_reused"] == 0
    assert got.token_ids == want.token_ids
    torch.testing.assert_close(got_scores, want_scores, atol=1e-4, rtol=1e-4)
    # the whole earlier prompt followed by more (an agent's next step): all but the new tokens reused
    longer = second + list(range(80, 90))
    again, again_scores = _run(lm, longer, memory, cache)
    assert again.stats["prompt_tokens_reused"] == len(second)
    torch.testing.assert_close(again_scores, _run(lm, longer, memory, None)[1], atol=1e-4, rtol=1e-4)


def test_a_prompt_is_reused_only_on_its_own_memory_and_within_bounds(lm) -> None:
    a = compress(lm, make_skill(6), EMLoCConfig(keep_ratios=(0.5,)))
    b = compress(lm, make_skill(8), EMLoCConfig(keep_ratios=(0.5,)))
    cache = PromptCache(max_tokens=90, min_shared=8)
    prompt = list(range(5, 45))
    _run(lm, prompt, a, cache)
    assert _run(lm, prompt, b, cache)[0].stats["prompt_tokens_reused"] == 0  # another skill's memory
    assert _run(lm, prompt, a, cache)[0].stats["prompt_tokens_reused"] == len(prompt) - 1  # one left to run
    assert _run(lm, list(range(5, 10)) + [99] * 20, a, cache)[0].stats["prompt_tokens_reused"] == 0  # < min_shared
    _run(lm, list(range(100, 140)), None, cache)  # 40 more tokens: the oldest entries go (90 at most)
    assert sum(len(e.prompt) for e in cache._entries.values()) <= 90


def test_the_chat_model_answers_the_same_with_and_without_the_prompt_cache() -> None:
    model, tok = tiny_model("llama")
    registry = MemoryRegistry(model=LanguageModel(model, tok, "tiny-llama"), cache_dir=None)
    cached = EMLoCChatModel(registry=registry, max_tokens=8)
    plain = EMLoCChatModel(registry=registry, max_tokens=8, cache_prompt=False)
    system = ("system", "You answer in one word. " * 8)
    for question in ("Which colour is the sky?", "Which colour is grass?"):
        assert cached.invoke([system, ("user", question)]).content == plain.invoke([system, ("user", question)]).content
    assert registry.loaded_model.prompt_cache._entries  # the cached model kept its prompts
