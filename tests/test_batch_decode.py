"""stream_batch: several replies on one memory decoded in one packed forward per step end exactly as
each would alone (tiny random-weight models of every architecture; a real model in the serving bench)."""

from __future__ import annotations

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.decode import stream_batch, stream_tokens
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import TINY_ARCHS, tiny_model

from .conftest import make_skill

QUERIES = ["Review: the quick fox\nSentiment:", "Review: dull\nSentiment:",
           "Review: a warm heart, a great film, far too long and slow\nSentiment:", "Question: What city?\nType:"]


def _alone(lm, prompt, memory, **options):
    *_, (_, result) = stream_tokens(lm, prompt, memory, **options)
    return result


def _together(lm, prompts, memory, options, cancelled=None):
    deltas: dict[int, str] = {}
    results = {}
    for i, delta, result in stream_batch(lm, prompts, memory, options, cancelled):
        deltas[i] = deltas.get(i, "") + delta
        if result is not None:
            assert i not in results, "one result per reply"
            results[i] = result
    return deltas, results


@pytest.fixture(scope="module", params=TINY_ARCHS)
def lm_and_memory(request):
    model, tok = tiny_model(request.param)
    lm = LanguageModel(model, tok, f"tiny-{request.param}")
    memory = compress(lm, make_skill(8), EMLoCConfig())  # the default: pruned per layer, padded heads
    return lm, memory


@pytest.mark.parametrize("on_memory", [True, False])
def test_replies_decoded_together_equal_replies_decoded_alone(lm_and_memory, on_memory: bool) -> None:
    lm, memory = lm_and_memory
    memory = memory if on_memory else None
    prompts = [lm._prompt_ids(q, memory) for q in QUERIES]
    options = [dict(max_new_tokens=n) for n in (6, 3, 9, 1)]  # replies that end at different steps
    deltas, results = _together(lm, prompts, memory, options)
    for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
        alone = _alone(lm, prompt, memory, **opts)
        assert results[i].token_ids == alone.token_ids, f"reply {i}"
        assert results[i].text == alone.text and results[i].finish_reason == alone.finish_reason
        assert alone.text.startswith(deltas.get(i, ""))  # the deltas spell the reply (held-back bytes come at the end)
        assert results[i].prompt_tokens == len(prompt) and results[i].stats["batch_size"] == len(prompts)


def test_each_reply_keeps_its_own_stops_sampling_and_constraints(lm_and_memory) -> None:
    lm, memory = lm_and_memory
    prompts = [lm._prompt_ids(q, memory) for q in QUERIES[:3]]
    free = _alone(lm, prompts[0], memory, max_new_tokens=8)
    stop = free.text[2:4] if len(free.text) >= 4 else free.text[-1:]  # a stop the free reply reaches
    banned = free.token_ids[0]

    def ban(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # a constraint on one reply only
        scores = scores.clone()
        scores[:, banned] = float("-inf")
        return scores

    options = [dict(max_new_tokens=8, stop=[stop]), dict(max_new_tokens=8, temperature=0.9, seed=3),
               dict(max_new_tokens=8, logits_processor=[ban])]
    _, results = _together(lm, [prompts[0], prompts[1], prompts[0]], memory, options)
    for i, prompt in enumerate([prompts[0], prompts[1], prompts[0]]):
        alone = _alone(lm, prompt, memory, **options[i])
        assert results[i].token_ids == alone.token_ids and results[i].text == alone.text, f"reply {i}"
    assert results[0].finish_reason == "stop" and stop not in results[0].text
    assert results[2].token_ids[0] != banned


def test_a_cancelled_reply_is_dropped_and_the_others_go_on(lm_and_memory) -> None:
    lm, memory = lm_and_memory
    prompts = [lm._prompt_ids(q, memory) for q in QUERIES[:3]]
    steps: dict[int, int] = {}

    def cancelled(i: int) -> bool:
        steps[i] = steps.get(i, 0) + 1
        return i == 1 and steps[i] > 2  # reply 1 goes after two tokens

    options = [dict(max_new_tokens=6)] * 3
    deltas, results = _together(lm, prompts, memory, options, cancelled)
    assert sorted(results) == [0, 2]
    for i in (0, 2):
        assert results[i].token_ids == _alone(lm, prompts[i], memory, **options[i]).token_ids


def test_bad_batches_are_refused(lm_and_memory) -> None:
    lm, memory = lm_and_memory
    prompt = lm._prompt_ids(QUERIES[0], memory)
    assert list(stream_batch(lm, [], memory)) == []
    with pytest.raises(ValueError, match="2 prompts but 1 option sets"):
        list(stream_batch(lm, [prompt, prompt], memory, [{}]))
    with pytest.raises(ValueError, match="empty prompt"):
        list(stream_batch(lm, [prompt, []], memory))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        list(stream_batch(lm, [prompt], memory, [dict(max_new_tokens=0)]))
