"""The few-shot tool selector (``emloc_agents.middleware``): its skill, and what it changes in
``create_agent`` (the first step of a turn gets the chosen tool as a required call, or no tool; later
steps go through unchanged)."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from emloc_agents import EMLoCChatModel, MemoryRegistry
from emloc_agents.bench.agents import agent_tools, get_weather, multiply
from emloc_agents.middleware import (
    NO_TOOL,
    FewShotToolSelectorMiddleware,
    _turn_started,
    example_requests,
    tool_choice_skill,
)
from emloc_agents.skills import SkillError
from emloc_agents.tasks import Task

EXAMPLES = [("What is 3 times 4?", "multiply"), ("Weather in Rome?", "get_weather"), ("Hello!", None)]


def test_the_skill_names_a_tool_or_none() -> None:
    skill = tool_choice_skill(EXAMPLES, [multiply, get_weather])
    assert skill.labels == ["multiply", "get_weather", NO_TOOL]
    assert [d.output for d in skill.demonstrations] == ["multiply", "get_weather", NO_TOOL]
    assert "- multiply: Multiply two numbers." in skill.instruction
    assert skill.format_input("Weather in Oslo?") == "Request: Weather in Oslo?\nTool:"


def test_examples_of_absent_tools_are_left_out() -> None:
    skill = tool_choice_skill([*EXAMPLES, ("Say 'hi' in Spanish", "translate")], [multiply])
    assert [(d.input.split("\n")[0], d.output) for d in skill.demonstrations] == [
        ("Request: What is 3 times 4?", "multiply"), ("Request: Hello!", NO_TOOL)]
    assert skill.labels == ["multiply", NO_TOOL]
    with pytest.raises(SkillError, match="needs example requests"):
        tool_choice_skill(EXAMPLES, [])
    with pytest.raises(SkillError, match="needs example requests"):
        tool_choice_skill([("Hello!", None)], [multiply])


def test_the_package_examples_cover_the_study_tools_and_not_its_requests() -> None:
    from emloc_agents.bench.agents import SKILL_TASKS, load_requests

    examples = example_requests()
    assert {t for _, t in examples} == {*SKILL_TASKS, "multiply", "get_weather", None}
    for which in ("study", "heldout", "heldout2"):
        requests = load_requests(which)
        assert not {r.lower() for r, _ in examples} & {r["request"].lower() for r in requests}
        skill_texts = [r["input"] for r in requests if r["tool"] in SKILL_TASKS]
        assert not [x for x in skill_texts if any(x in r for r, _ in examples)], which


def test_only_the_first_step_of_a_turn_is_selected() -> None:
    call = {"name": "multiply", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}
    assert _turn_started([HumanMessage("hi")]) == "hi"
    assert _turn_started([HumanMessage("2x3?"), AIMessage("", tool_calls=[call]),
                          ToolMessage("6", tool_call_id="c1")]) is None
    assert _turn_started([HumanMessage("a"), AIMessage("b"), HumanMessage("c")]) == "c"


@pytest.fixture
def hermes_chat(tmp_path):
    from emloc_agents.models.lm import LanguageModel
    from emloc_agents.models.tiny import tiny_model
    from tests.test_tool_format import HERMES_TEMPLATE

    model, tok = tiny_model("qwen2", seed=1)
    tok.chat_template = HERMES_TEMPLATE
    registry = MemoryRegistry(model=LanguageModel(model, tok, "tiny-hermes"), cache_dir=tmp_path)
    registry.add(Task.load("sst2").skill(4, 0, name="sentiment"))
    return EMLoCChatModel(registry=registry, max_tokens=8, json_max_tokens=48, json_max_string_chars=8)


@pytest.mark.parametrize("force", [True, False])
def test_create_agent_first_step_sees_only_the_chosen_tool(hermes_chat, force: bool) -> None:
    """Whatever the (random-weight) selector chooses, the first step follows it: a required call of
    that tool, or plain text when it chose none; the selector's memory is stored, not registered."""
    from langchain.agents import create_agent

    tools = agent_tools(hermes_chat.get_registry(), hermes_chat)
    examples = [*EXAMPLES, ("Is this review good? 'a fine film'", "sentiment")]
    selector = FewShotToolSelectorMiddleware(hermes_chat, examples, force_call=force)
    agent = create_agent(hermes_chat, tools=tools, middleware=[selector])
    seen = []
    for request in ("What is 6 times 7?", "Good morning!", "Is it raining in Lima?"):
        messages = agent.invoke({"messages": [("user", request)]}, {"recursion_limit": 6})["messages"]
        first = next(m for m in messages if isinstance(m, AIMessage))
        choice = selector.last_choice  # set at the turn's first step only
        seen.append(choice)
        names = [c["name"] for c in first.tool_calls] + [c.get("name") for c in first.invalid_tool_calls]
        if choice == NO_TOOL:
            assert names == [], first
        elif force:  # one call, of the chosen tool
            assert [c["name"] for c in first.tool_calls] == [choice], (choice, first)
        else:
            assert {c["name"] for c in first.tool_calls} <= {choice}, (choice, first)
    assert set(seen) <= {t.name for t in tools} | {NO_TOOL}
    assert hermes_chat.get_registry().names() == ["sentiment"]
    assert hermes_chat.get_registry().cached(selector.skill_for(tools))


def test_the_async_agent_selects_too(hermes_chat) -> None:
    import asyncio

    from langchain.agents import create_agent

    tools = agent_tools(hermes_chat.get_registry(), hermes_chat)
    selector = FewShotToolSelectorMiddleware(hermes_chat, [*EXAMPLES, ("Is 'a fine film' good?", "sentiment")])
    agent = create_agent(hermes_chat, tools=tools, middleware=[selector])
    state = asyncio.run(agent.ainvoke({"messages": [("user", "What is 6 times 7?")]}, {"recursion_limit": 6}))
    messages = state["messages"]
    first = next(m for m in messages if isinstance(m, AIMessage))
    assert selector.last_choice in {t.name for t in tools} | {NO_TOOL}
    assert [c["name"] for c in first.tool_calls] == ([] if selector.last_choice == NO_TOOL else [selector.last_choice])
