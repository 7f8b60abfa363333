"""Engine: exactness of chunk-wise prefill at keep ratio 1.0 per architecture, and pruning invariants."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch

from emloc_agents import EMLoCConfig, SkillError, compress
from emloc_agents.bench.presses import RandomPress, SnapKVPress, StreamingLLMPress, UniformPress
from emloc_agents.engine import UnsupportedModelError, js_divergence
from emloc_agents.engine.decode import memory_cache
from emloc_agents.engine.forward import lm_logits, run
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import TINY_ARCHS, tiny_model

from .conftest import make_skill

FULL = dict(keep_ratios=(1.0,), storage_dtype="float32")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA GPU: the exactness check runs on the CPU only")),
]


def _query_logits(lm, memory, query: str) -> tuple[torch.Tensor, list[int]]:
    ids = lm._prompt_ids(query, memory)
    cache, start = memory_cache(lm, memory)
    hidden = run(lm.model, cache, torch.tensor([ids], device=lm.device),
                 start + torch.arange(len(ids), device=lm.device)[None])
    return lm_logits(lm.model, lm.facts, hidden[0]), ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_keep_all_reproduces_full_context(arch: str, chat: bool, device: str) -> None:
    model, tok = tiny_model(arch, chat_template=chat)
    model.to(device)
    reference = copy.deepcopy(model)  # untouched SDPA model, full prefix in one forward
    lm = LanguageModel(model, tok, f"tiny-{arch}")
    skill = make_skill(9)
    query = "Review: the quick fox\nSentiment:"
    r = lm.renderer()
    whole = r.full_prompt(skill.instruction, skill.demonstrations, query)  # the whole text, tokenized once
    full_prefix = r.render(skill.instruction, skill.demonstrations).ids
    answers = []
    for per_chunk in (1, 4, 100):
        mem = compress(lm, skill, EMLoCConfig(demos_per_chunk=per_chunk, **FULL))
        assert mem.original_length == len(full_prefix)
        logits, q = _query_logits(lm, mem, query)
        assert full_prefix + q == whole
        with torch.no_grad():
            ref = reference(torch.tensor([full_prefix + q], device=device)).logits[0, -len(q) :]
        torch.testing.assert_close(logits, ref.float(), atol=1e-4, rtol=1e-4)
        answers.append(lm.generate(query, mem, max_new_tokens=5))
    with torch.no_grad():
        ref_ids = reference.generate(
            torch.tensor([full_prefix + q], device=device), max_new_tokens=5, do_sample=False, eos_token_id=None,
            pad_token_id=2,
        )[0, len(full_prefix) + len(q) :]
    expected = tok.decode(ref_ids, skip_special_tokens=True)
    assert answers == [expected] * 3


@pytest.mark.parametrize("grow", [1, 3, 256])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_decoding_into_spare_room_is_plain_decoding(arch: str, grow: int, monkeypatch) -> None:
    """Decoding steps write into spare slots after the cache (grown ``GROW_TOKENS`` at a time) instead
    of concatenating: the same tokens and the same last-step logits as transformers' own greedy
    ``generate`` on the whole text, however often the room has to grow."""
    from emloc_agents.engine import cache as cache_module
    from emloc_agents.engine.decode import stream_tokens

    monkeypatch.setattr(cache_module, "GROW_TOKENS", grow)
    model, tok = tiny_model(arch)
    reference = copy.deepcopy(model)
    lm = LanguageModel(model, tok, f"tiny-{arch}")
    skill = make_skill(6)
    mem = compress(lm, skill, EMLoCConfig(**FULL))
    prefix = lm.renderer().render(skill.instruction, skill.demonstrations).ids
    query = lm._prompt_ids("Review: the quick fox\nSentiment:", mem)
    steps = 12
    *_, (_, result) = stream_tokens(lm, query, mem, max_new_tokens=steps)
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prefix + query]), max_new_tokens=steps, do_sample=False,
                                 eos_token_id=None, pad_token_id=2, output_logits=True, return_dict_in_generate=True)
    want = ref.sequences[0, len(prefix) + len(query):].tolist()
    assert result is not None and result.token_ids == want[: len(result.token_ids)]
    assert len(result.token_ids) == steps or result.finish_reason == "stop"
    cache, start = memory_cache(lm, mem)  # the last step's logits, replayed through the room
    ids = query + result.token_ids[:-1]
    for i in range(len(ids)):  # one token a forward: every step appends to the room
        hidden = run(lm.model, cache, torch.tensor([[ids[i]]]), torch.tensor([[start + i]]))
    torch.testing.assert_close(lm_logits(lm.model, lm.facts, hidden[0, -1]), ref.logits[len(result.token_ids) - 1][0].float(),
                               atol=1e-4, rtol=1e-4)


def test_sliding_window_layers_keep_only_their_window() -> None:
    model, tok = tiny_model("gemma3_text")
    lm = LanguageModel(model, tok, "tiny-gemma")
    mem = compress(lm, make_skill(9), EMLoCConfig(**FULL))
    window = lm.facts.windows[0]
    for length, sliding in zip(mem.layer_lengths, mem.sliding, strict=True):
        assert length == (window - 1 if sliding else mem.original_length)


def test_pruning_invariants(tiny_llama) -> None:
    mem = compress(tiny_llama, make_skill(12), EMLoCConfig(compression="chunks", delta=0.05))
    assert mem.original_length > 0
    assert all(0 < n <= mem.original_length for n in mem.layer_lengths)
    assert 0 < mem.kept_ratio < 1
    for layer, (k, v, p) in enumerate(zip(mem.keys, mem.values, mem.positions, strict=True)):
        assert k.shape == v.shape and p.shape == k.shape[:2], layer
        assert bool((p[:, 1:] > p[:, :-1]).all()), "kept positions are increasing per head"
        assert int(p.max()) < mem.original_length
    decisions = [d for chunk in mem.stats["decisions"] for d in chunk]
    assert decisions, "the search recorded its decisions"
    for d in decisions:  # the JS bound holds for every accepted (pruned) layer
        if d["ratio"] < 1.0:
            assert d["js"] <= 0.05


def test_kept_tokens_are_top_scoring(tiny_llama) -> None:
    """Uniform press keeps, per head, exactly the top-k of EMLoC's importance scores."""
    from emloc_agents.engine.presses import topk_per_head

    seen = {}
    press = UniformPress(0.3)
    orig = press.select

    def spy(ctx):
        sel = orig(ctx)
        seen["scores"], seen["sel"] = ctx.replay.scores, sel
        return sel

    press.select = spy  # type: ignore[method-assign]
    compress(tiny_llama, make_skill(4), EMLoCConfig(demos_per_chunk=4), press=press)
    for scores, idx in zip(seen["scores"], seen["sel"], strict=True):
        k = idx.shape[-1]
        assert torch.equal(idx, topk_per_head(scores, k))
        worst_kept = torch.gather(scores, 1, idx).min(dim=1).values
        mask = torch.ones_like(scores, dtype=torch.bool).scatter(1, idx, False)
        dropped_best = scores.masked_fill(~mask, float("-inf")).max(dim=1).values
        assert bool((worst_kept >= dropped_best).all())


def test_hooks_are_inert_outside_compression(tiny_llama) -> None:
    """After compressing, the instrumented model still matches an uninstrumented copy."""
    compress(tiny_llama, make_skill(4), EMLoCConfig())
    fresh, _ = tiny_model("llama")
    ids = torch.tensor([[0, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama.model(ids).logits, fresh(ids).logits)


def test_query_does_not_change_memory(tiny_llama) -> None:
    mem = compress(tiny_llama, make_skill(8), EMLoCConfig())
    before = [k.clone() for k in mem.keys] + [v.clone() for v in mem.values]
    outs: list[str] = []

    def ask() -> None:
        outs.append(tiny_llama.generate("Review: fine\nSentiment:", mem, max_new_tokens=4))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = [k for k in mem.keys] + [v for v in mem.values]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert len(set(outs)) == 1 and len(outs) == 4


@pytest.mark.parametrize("press", [SnapKVPress(0.2), StreamingLLMPress(0.2), RandomPress(0.2), UniformPress(0.2)])
def test_fixed_ratio_baselines(tiny_llama, press) -> None:
    skill = make_skill(8)
    mem = compress(tiny_llama, skill, EMLoCConfig(), press=press)
    assert 0.15 <= mem.kept_ratio <= 0.35
    # the memory answers, and from what it kept: its scores are not the unpruned memory's
    full = compress(tiny_llama, skill, EMLoCConfig(keep_ratios=(1.0,)))
    q, options = "Review: ok\nSentiment:", ["positive", "negative"]
    pruned_scores = tiny_llama.score(q, options, mem)
    assert all(math.isfinite(x) for x in pruned_scores) and pruned_scores != tiny_llama.score(q, options, full)


def test_js_divergence_properties() -> None:
    p = torch.log_softmax(torch.randn(3, 50), -1)
    q = torch.log_softmax(torch.randn(3, 50), -1)
    assert torch.allclose(js_divergence(p, p), torch.zeros(3), atol=1e-6)
    assert torch.allclose(js_divergence(p, q), js_divergence(q, p))
    assert bool((js_divergence(p, q) <= torch.log(torch.tensor(2.0)) + 1e-6).all())


def test_bad_input(tiny_llama) -> None:
    from emloc_agents import Demonstration, Skill

    with pytest.raises(SkillError, match="no demonstrations"):
        compress(tiny_llama, Skill(name="empty"), EMLoCConfig())
    long = Skill(name="long", demonstrations=[Demonstration(input="word " * 3000, output="x")])
    with pytest.raises(SkillError, match="exceed"):
        compress(tiny_llama, long, EMLoCConfig())
    with pytest.raises(ValueError, match="keep_ratios"):
        EMLoCConfig(keep_ratios=(0.5, 0.1))


def test_unsupported_architecture_is_named() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    with pytest.raises(UnsupportedModelError, match="supported: llama"):
        LanguageModel(AutoModelForCausalLM.from_config(cfg), None, "gpt2")


@pytest.mark.parametrize("scope", ["exact", "answers"])
def test_partial_reforward_without_pruning_matches_teacher(tiny_llama, scope: str) -> None:
    """Re-running from any layer with nothing pruned reproduces the teacher (JS ~ 0), for the full
    replay and for the answer-rows-only replay."""
    from emloc_agents.engine.presses import Press

    seen: list[float] = []

    class Probe(Press):
        needs_replay = True

        def select(self, ctx):
            n = ctx.facts.num_layers
            for start in range(n):
                seen.append(ctx.replay.divergence([None] * n, start_layer=start))
            return [None] * n

    compress(tiny_llama, make_skill(6), EMLoCConfig(search_scope=scope), press=Probe())
    assert seen and max(seen) < 1e-6


def test_batched_candidates_match_one_by_one(tiny_llama) -> None:
    """The batched JS of several candidates equals checking them one at a time."""
    from emloc_agents.engine.presses import Press, topk_per_head

    pairs: list[tuple[float, float]] = []

    class Probe(Press):
        needs_replay = True

        def select(self, ctx):
            n = ctx.facts.num_layers
            r = ctx.replay
            trials = []
            for k in (5, 12, 30):
                trial: list = [None] * n
                trial[n - 1] = topk_per_head(r.scores[n - 1], k)
                trial[n - 2] = topk_per_head(r.scores[n - 2], k + 3)
                trials.append(trial)
            batched = r.divergences(trials, n - 2)
            single = [r.divergence(t, n - 2) for t in trials]
            pairs.extend(zip(batched, single, strict=True))
            return [None] * n

    compress(tiny_llama, make_skill(6), EMLoCConfig(), press=Probe())
    assert pairs
    for a, b in pairs:
        assert a == pytest.approx(b, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_trials_equal_dropping_the_tokens(tiny_llama, device: str) -> None:
    """An answers-scope check masks the pruned chunk tokens out of one shared prefix; that must equal
    re-running on a chunk from which those tokens were physically removed (GQA heads included)."""
    if device != "cpu":
        model, tok = tiny_model("llama")
        tiny_llama = LanguageModel(model.to(device), tok, "tiny-llama")
    from emloc_agents.engine.presses import Press, topk_per_head
    from emloc_agents.engine.replay import Replay, gather_tokens

    pairs: list[tuple[float, float]] = []

    class Probe(Press):
        needs_replay = True

        def select(self, ctx):
            r, n_layers = ctx.replay, ctx.facts.num_layers
            k = max(ctx.n_protected, ctx.n // 3)
            sel = [topk_per_head(r.scores[i], k) for i in range(n_layers)]
            dropped = Replay(
                r.lm, r.building, [gather_tokens(r.chunk_k[i], sel[i]) for i in range(n_layers)],
                [gather_tokens(r.chunk_v[i], sel[i]) for i in range(n_layers)], r.chunk_pos[sel[0][0]],
                r.ids, r.positions, r.segments, r.rows,
            )
            dropped.teacher, dropped.hidden_in = r.teacher, r.hidden_in
            dropped.replay_k, dropped.replay_v = r.replay_k, r.replay_v
            for start in (0, n_layers - 1):
                pairs.append((r.divergence(sel, start), dropped.divergence([None] * n_layers, start)))
            return [None] * n_layers

    compress(tiny_llama, make_skill(8), EMLoCConfig(), press=Probe())
    assert pairs and any(a > 1e-4 for a, _ in pairs)  # the selection does change the answers
    for masked, physical in pairs:
        assert masked == pytest.approx(physical, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_lookahead_keeps_the_sequential_decisions(arch: str, device: str) -> None:
    """Speculating several layers per re-forward must not change what the layer-by-layer search keeps."""
    model, tok = tiny_model(arch)
    model.to(device)
    lm = LanguageModel(model, tok, f"tiny-{arch}")
    skill = make_skill(12)
    probe = compress(lm, skill, EMLoCConfig(compression="chunks", delta=1.0))  # every layer passes at 10 %: its JS values
    js = sorted(d["js"] for chunk in probe.stats["decisions"] for d in chunk if d["js"] is not None)
    delta = js[len(js) // 2]  # about half the checks fail at the smallest share
    plain = EMLoCConfig(lookahead=1, batch_candidates=False, delta=delta, storage_dtype="float32")
    runs = {la: compress(lm, skill, plain.model_copy(update={"lookahead": la, "batch_candidates": True}))
            for la in (1, 3, 8)}
    base = compress(lm, skill, plain)  # one layer, one candidate per re-forward
    calls = [r.stats["check_forwards"] for r in (runs[8], runs[3], runs[1], base)]
    assert calls[0] <= calls[1] < calls[2] <= calls[3], calls  # speculation saves re-forwards
    ratios = {r["ratio"] for chunk in base.stats["decisions"] for r in chunk}
    assert len(ratios) > 1  # the search made different choices on different layers: a real test
    for mem in runs.values():
        assert [[d["ratio"] for d in c] for c in mem.stats["decisions"]] == [
            [d["ratio"] for d in c] for c in base.stats["decisions"]
        ]
        assert [k.shape for k in mem.keys] == [k.shape for k in base.keys]
        for a, b in zip(mem.keys, base.keys, strict=True):
            assert torch.equal(a, b)


def test_lookahead_defaults_by_device() -> None:
    """Unset, the speculation depth follows the device (cost only: the decisions do not depend on it)."""
    from emloc_agents.engine.chunk_loop import press_for
    from emloc_agents.engine.presses import default_lookahead

    assert EMLoCConfig().lookahead is None and press_for(EMLoCConfig()).lookahead is None
    assert default_lookahead("cpu") == 4 and default_lookahead(torch.device("cuda", 1)) == 8
    assert press_for(EMLoCConfig(lookahead=2)).lookahead == 2 and EMLoCConfig.reference().lookahead == 1


def test_packed_replay_equals_each_demonstration_alone(tiny_llama) -> None:
    """The replay packs a chunk's demonstrations into one sequence (segments); its teacher must
    equal replaying each demonstration on its own after the chunk."""
    from emloc_agents.engine.presses import Press

    checked: list[float] = []

    class Probe(Press):
        needs_replay = True

        def select(self, ctx):
            r, n_layers = ctx.replay, ctx.facts.num_layers
            rows_seen = 0
            for d in range(int(r.segments.max()) + 1):
                part = r.segments[0] == d
                hidden = run(r.lm.model, r.cache([None] * n_layers), r.ids[:, part], r.positions[:, part])
                alone = torch.log_softmax(lm_logits(r.lm.model, ctx.facts, hidden[0][r.rows[0, part]]), dim=-1)
                packed = r.teacher[rows_seen : rows_seen + alone.shape[0]]
                rows_seen += alone.shape[0]
                checked.append(float((alone - packed).abs().max()))
            assert rows_seen == r.teacher.shape[0]
            return [None] * n_layers

    compress(tiny_llama, make_skill(8), EMLoCConfig(), press=Probe())
    assert len(checked) == 8 and max(checked) < 1e-4


def test_a_chunk_replays_its_own_demonstrations(tiny_llama) -> None:
    """The replay after a chunk packs that chunk's demonstrations (the reference's probe)."""
    from emloc_agents.engine.chunk_loop import plan_chunks
    from emloc_agents.engine.presses import Press

    replayed: list[list[int]] = []

    class Spy(Press):
        needs_replay = True

        def select(self, ctx):
            replayed.append(ctx.replay.ids[0].tolist())
            return [None] * ctx.facts.num_layers

    skill = make_skill(12)
    compress(tiny_llama, skill, EMLoCConfig(demos_per_chunk=4), press=Spy())
    rendered = tiny_llama.renderer("auto").render(skill.instruction, skill.demonstrations)
    chunks = plan_chunks(rendered.prefix, rendered.demos, 4, True)
    assert len(replayed) == len(chunks) == 3
    assert replayed == [[t for d in c.demos for t in d.ids] for c in chunks]


def test_later_chunks_are_prefilled_on_the_pruned_memory(tiny_llama) -> None:
    """A chunk's keys are computed on the memory pruned so far: after pruning, later chunks' keys differ
    from full ICL's at the same positions."""
    from emloc_agents.bench.presses import UniformPress

    skill = make_skill(12)
    ref = compress(tiny_llama, skill, EMLoCConfig(keep_ratios=(1.0,), demos_per_chunk=4))
    mem = compress(tiny_llama, skill, EMLoCConfig(demos_per_chunk=4), press=UniformPress(0.3))
    assert mem.kept_ratio < 0.5
    same = []
    for k, rk, pos in zip(mem.keys, ref.keys, mem.positions, strict=True):
        gathered = torch.stack([rk[h, pos[h]] for h in range(k.shape[0])])
        same.append(torch.allclose(k.float(), gathered.float(), atol=2e-3))
    assert not all(same)
