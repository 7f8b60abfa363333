"""Rendering: the tokens a memory holds and a query adds are the tokenization of the whole text.

Built independently of the renderer: the expected ids come from the tokenizer (or its chat
template) applied once to the full text, as plain transformers would feed the model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from emloc_agents import EMLoCConfig, compress
from emloc_agents.engine.decode import memory_cache
from emloc_agents.engine.forward import lm_logits, run
from emloc_agents.engine.presses import Press
from emloc_agents.engine.prompt import Renderer
from emloc_agents.models.lm import LanguageModel, memory_context
from emloc_agents.models.tiny import tiny_model, tiny_tokenizer

from .conftest import make_skill

QUERIES = ["Review: the quick fox\nSentiment:", "Review: 42 reasons\nSentiment:", "  Review: leading blanks\nSentiment:"]


def _whole_plain(tok, skill, query: str) -> list[int]:
    text = skill.instruction + "\n\n" + "".join(f"{d.input} {d.output}\n\n" for d in skill.demonstrations)
    ids = tok(text + query.lstrip(), add_special_tokens=True)["input_ids"]
    return list(ids)


def _whole_chat(tok, skill, query: str) -> list[int]:
    msgs = [{"role": "system", "content": skill.instruction}]
    for d in skill.demonstrations:
        msgs += [{"role": "user", "content": d.input}, {"role": "assistant", "content": d.output}]
    msgs.append({"role": "user", "content": query})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token
    ids = tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    return list(ids)


def _check_renderer(tok, mode: str) -> None:
    r = Renderer(tok, mode)  # type: ignore[arg-type]
    skill = make_skill(7)
    rendered = r.render(skill.instruction, skill.demonstrations)
    whole = _whole_plain if mode == "plain" else _whole_chat
    for query in QUERIES:
        expected = whole(tok, skill, query)
        on_memory = r.query(query, skill.instruction, on_memory=True, context=rendered.tail_text, context_ids=rendered.tail_ids)
        assert rendered.ids + on_memory == expected, (mode, query)
        assert r.full_prompt(skill.instruction, skill.demonstrations, query) == expected
    # answer flags cover exactly the answers
    for seg, d in zip(rendered.demos, skill.demonstrations, strict=True):
        answer = [t for t, a in zip(seg.ids, seg.answer, strict=True) if a]
        assert tok.decode(answer).strip() == d.output
    # label continuations are read after the query, as in the whole text
    query = QUERIES[0]
    qtext = r.query_text(query, skill.instruction)
    for label in ("positive", "negative"):
        whole_ids = whole(tok, skill, query)
        if mode == "plain":
            full = list(tok(skill.instruction + "\n\n" + "".join(f"{d.input} {d.output}\n\n" for d in skill.demonstrations)
                            + query + " " + label, add_special_tokens=True)["input_ids"])
        else:
            full = whole_ids + list(tok(label, add_special_tokens=False)["input_ids"])
        assert whole_ids + r.label_ids(qtext, label) == full


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_tiny_bpe_renders_the_whole_text(mode: str) -> None:
    _check_renderer(tiny_tokenizer(chat_template=True), mode)


@pytest.mark.slow
def test_smollm2_renders_the_whole_text() -> None:
    from emloc_agents import load_model

    tok = load_model("smollm2-135m").tokenizer
    _check_renderer(tok, "plain")
    _check_renderer(tok, "chat")


@pytest.mark.slow
def test_gemma3_renders_the_whole_text() -> None:
    from emloc_agents import load_model

    _check_renderer(load_model("gemma-3-270m").tokenizer, "plain")


def test_memory_holds_the_whole_text_tokens() -> None:
    model, tok = tiny_model("llama", chat_template=False)
    lm = LanguageModel(model, tok, "tiny-llama-plain")
    skill = make_skill(9)
    mem = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
    query = QUERIES[0]
    expected = _whole_plain(tok, skill, query)
    q = lm._prompt_ids(query, mem)
    assert mem.original_length + len(q) == len(expected)
    assert q == expected[mem.original_length :]
    assert memory_context(mem)["context_ids"] == expected[mem.original_length - len(mem.header["tail_ids"]) : mem.original_length]


@dataclass
class KeepEvery(Press):
    """Keeps every ``step``-th token of each chunk, the same tokens in every layer and head."""

    step: int = 3

    def select(self, ctx):
        idx = torch.arange(0, ctx.n, self.step)[None].expand(ctx.facts.num_kv_heads, -1)
        return [idx.clone() for _ in range(ctx.facts.num_layers)]


def test_query_on_pruned_memory_continues_at_the_uncompressed_length() -> None:
    """A pruned memory equals the kept tokens prefilled at their original positions; the query
    continues at ``original_length`` (not at the compressed length)."""
    model, tok = tiny_model("llama", chat_template=False)
    lm = LanguageModel(model, tok, "tiny-llama-plain")
    skill = make_skill(9)
    mem = compress(lm, skill, EMLoCConfig(storage_dtype="float32"), press=KeepEvery(3))
    assert max(mem.layer_lengths) < mem.original_length
    rendered = lm.renderer("plain").render(skill.instruction, skill.demonstrations)
    chunks = [rendered.prefix.ids + [t for d in rendered.demos[:4] for t in d.ids]]
    chunks += [[t for d in rendered.demos[i : i + 4] for t in d.ids] for i in range(4, 9, 4)]
    chunk_of = [c for c, ids in enumerate(chunks) for _ in ids]
    kept = [j % 3 == 0 for ids in chunks for j in range(len(ids))]
    n = len(chunk_of)
    assert n == mem.original_length and sum(kept) == mem.layer_lengths[0]
    q = lm._prompt_ids(QUERIES[0], mem)
    cache, start = memory_cache(lm, mem)
    assert start == mem.original_length
    got = lm_logits(lm.model, lm.facts, run(lm.model, cache, torch.tensor([q]), start + torch.arange(len(q))[None])[0])
    # reference: one plain forward of the whole text at positions 0..n+len(q)-1, where a token sees
    # the earlier tokens of its own chunk and only the kept tokens of earlier chunks (queries: of all)
    chunk_of += [len(chunks)] * len(q)
    kept += [True] * len(q)
    total = len(chunk_of)
    visible = torch.tensor([[j <= i and (chunk_of[j] == chunk_of[i] or kept[j]) for j in range(total)]
                            for i in range(total)])
    mask = torch.zeros(1, 1, total, total).masked_fill(~visible, torch.finfo(torch.float32).min)
    ids = torch.tensor([[t for c in chunks for t in c] + q])
    reference, _ = tiny_model("llama", chat_template=False)  # same seed, untouched by instrument()
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask, position_ids=torch.arange(total)[None]).logits[0, -len(q) :]
    torch.testing.assert_close(got, ref.float(), atol=1e-4, rtol=1e-4)
