"""``remote_skill_tools``: the skills of a real ``emloc serve`` (uvicorn on a free port, in a thread) as
LangChain tools, compared with the in-process tools of the same registry (``registry.as_tools(chat)``).
The model is the tiny random-weight Qwen2 with Qwen2.5's tool-call format, as in tests/test_serve.py,
without its prompt cache, so every answer can be compared with a direct call."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool

from emloc_agents import Demonstration, EMLoCChatModel, MemoryRegistry, Skill
from emloc_agents.registry import UnknownSkillError
from emloc_agents.serve import BackgroundServer, create_app, remote_skill_tools
from emloc_agents.serve.client import SkillServerError
from tests.conftest import free_port, make_skill
from tests.test_tool_format import HERMES_TEMPLATE

KEY = "client-key"
INPUTS = {"sentiment": "a warm and funny film", "topic": "the match ended in a draw"}


def _skills() -> list[Skill]:
    """Two small skills with templates (the tools phrase raw input with them) and, for one, labels."""
    sentiment = make_skill(9, "sentiment").model_copy(update={
        "labels": ["negative", "positive"], "input_template": "Review: {input}\nSentiment:"})
    topics = ["sports", "business", "science"]
    topic = Skill(name="topic", instruction="Name the topic of the headline.", input_template="Headline: {input}\nTopic:",
                  demonstrations=[Demonstration(input=f"Headline: story number {i} about {topics[i % 3]}\nTopic:",
                                                output=topics[i % 3]) for i in range(6)])
    return [sentiment, topic]


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> EMLoCChatModel:
    from emloc_agents.models.lm import LanguageModel
    from emloc_agents.models.tiny import tiny_model

    model, tok = tiny_model("qwen2", seed=1)
    tok.chat_template = HERMES_TEMPLATE
    registry = MemoryRegistry(model=LanguageModel(model, tok, "tiny-hermes"), cache_dir=tmp_path_factory.mktemp("client"))
    for skill in _skills():
        registry.add(skill)
    registry.warm()
    return EMLoCChatModel(registry=registry, max_tokens=8, json_max_tokens=400, json_max_string_chars=8,
                          cache_prompt=False)


@pytest.fixture(scope="module")
def url(chat: EMLoCChatModel) -> Iterator[str]:
    with BackgroundServer(create_app(chat, api_key=KEY)) as server:
        yield server.url + "/v1"


@pytest.fixture(scope="module")
def local(chat: EMLoCChatModel) -> dict[str, BaseTool]:
    return {t.name: t for t in chat.get_registry().as_tools(chat)}


def test_the_remote_tools_are_the_in_process_tools(url: str, local: dict[str, BaseTool]) -> None:
    remote = remote_skill_tools(url, api_key=KEY)
    assert [t.name for t in remote] == list(local) == ["sentiment", "topic"]
    for tool in remote:
        twin = local[tool.name]
        assert tool.description == twin.description and "Example:" in tool.description
        assert tool.args == twin.args and tool.tool_call_schema.model_json_schema() == twin.tool_call_schema.model_json_schema()
        assert tool.return_direct is False
        # the server's memories (warmed) carry their certificate, as the in-process tools' do
        assert tool.metadata == twin.metadata and tool.metadata["certificate"]["method"] in ("context", "chunks")


@pytest.mark.parametrize("name", ["sentiment", "topic"])
def test_a_remote_tool_answers_as_the_in_process_one(url: str, local: dict[str, BaseTool], name: str) -> None:
    (tool,) = remote_skill_tools(url, api_key=KEY, names=[name])
    answer = tool.invoke({"input": INPUTS[name]})
    assert isinstance(answer, str) and answer == local[name].invoke({"input": INPUTS[name]})
    if name == "sentiment":  # a labelled skill answers exactly one label, on the server too
        assert answer in ("negative", "positive")


def test_the_async_path_answers_the_same(url: str, local: dict[str, BaseTool]) -> None:
    tools = remote_skill_tools(url, api_key=KEY)

    async def both() -> list[str]:
        return list(await asyncio.gather(*(t.ainvoke({"input": INPUTS[t.name]}) for t in tools)))

    assert asyncio.run(both()) == [local[t.name].invoke({"input": INPUTS[t.name]}) for t in tools]


def test_names_choose_and_order_the_tools(url: str) -> None:
    assert [t.name for t in remote_skill_tools(url, api_key=KEY, names=["topic", "sentiment"])] == ["topic", "sentiment"]
    with pytest.raises(UnknownSkillError, match=r"'nope' not served at .*; served skills: sentiment, topic") as e:
        remote_skill_tools(url, api_key=KEY, names=["topic", "nope"])
    assert isinstance(e.value, KeyError)


def test_return_direct_and_max_tokens_are_passed_on(url: str, chat: EMLoCChatModel) -> None:
    tools = remote_skill_tools(url, api_key=KEY, return_direct=True, max_tokens=2)
    assert [t.return_direct for t in tools] == [True, True]
    topic = next(t for t in tools if t.name == "topic")
    phrased = chat.get_registry().skill("topic").format_input(INPUTS["topic"])
    assert topic.invoke({"input": INPUTS["topic"]}) == chat.invoke(phrased, skill="topic", max_tokens=2).content


def test_the_key_is_sent_and_a_wrong_one_is_a_clear_error(url: str) -> None:
    with pytest.raises(SkillServerError, match=r"GET .*/v1/skills: 401 incorrect API key \(pass the server's key"):
        remote_skill_tools(url, api_key="wrong")
    with pytest.raises(SkillServerError, match="401 missing API key"):
        remote_skill_tools(url)


def test_an_unreachable_server_or_a_wrong_url_is_a_clear_error(url: str) -> None:
    with pytest.raises(SkillServerError, match=r"cannot reach the skill server at http://127\.0\.0\.1:\d+/v1/skills"):
        remote_skill_tools(f"http://127.0.0.1:{free_port()}/v1", timeout=5)
    with pytest.raises(SkillServerError, match=r"404 .*base_url is the server's /v1 URL"):
        remote_skill_tools(url.removesuffix("/v1"), api_key=KEY)


def test_create_agent_calls_a_remote_skill(url: str, chat: EMLoCChatModel, local: dict[str, BaseTool]) -> None:
    """LangChain's agent on the in-process model, the few-shot selector forcing one call, the tools
    remote: the turn ends (return_direct) on the server's answer, the in-process tool's answer to the
    same call. The tiny model chooses at random but greedily, so the same requests choose the same."""
    from langchain.agents import create_agent

    from emloc_agents.middleware import NO_TOOL, FewShotToolSelectorMiddleware

    tools = remote_skill_tools(url, api_key=KEY, return_direct=True)
    examples = [("Is 'a fine film' good?", "sentiment"), ("Headline: rates rise again. Topic?", "topic"),
                ("Hello!", None)]
    selector = FewShotToolSelectorMiddleware(chat, examples)
    agent = create_agent(chat, tools=tools, middleware=[selector])
    called = []
    for request in ("Is 'a dull slow movie' good?", "Headline: a new comet was seen. Topic?"):
        messages = agent.invoke({"messages": [("user", request)]}, {"recursion_limit": 4})["messages"]
        if selector.last_choice == NO_TOOL:
            continue
        (call,) = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
        final = messages[-1]
        assert call["name"] == selector.last_choice and isinstance(final, ToolMessage), messages
        assert final.content == local[call["name"]].invoke(call["args"])
        called.append(call["name"])
    assert called, "the selector chose no tool for any request"


def test_a_client_needs_no_fastapi() -> None:
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "from emloc_agents.serve import remote_skill_tools, BackgroundServer\n"
            "import emloc_agents.serve.client\n"
            "assert 'fastapi' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
