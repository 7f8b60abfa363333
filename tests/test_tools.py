"""Skills as LangChain tools, and SkillRouter (few-shot skill routing with a threshold)."""

from __future__ import annotations

import asyncio

import pytest

from emloc_agents import Demonstration, EMLoCChatModel, MemoryRegistry, Skill
from emloc_agents.tools import SkillRouter
from tests.conftest import make_skill


def topic_skill() -> Skill:
    demos = [
        Demonstration(input="Article: The central bank raised interest rates again.\nTopic:", output="business"),
        Demonstration(input="Article: The striker scored twice in the cup final.\nTopic:", output="sports"),
        Demonstration(input="Article: Shares fell after the quarterly earnings report.\nTopic:", output="business"),
        Demonstration(input="Article: The team clinched the league title on Sunday.\nTopic:", output="sports"),
    ]
    return Skill(name="topic", instruction="Classify the topic of the article.", demonstrations=demos,
                 description="Classify a news article's topic.")


def _registry(model: str, path) -> MemoryRegistry:
    reg = MemoryRegistry(model=model, cache_dir=path)
    reg.add(make_skill(n=6, name="sentiment"))
    reg.add(topic_skill())
    return reg


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> MemoryRegistry:
    return _registry("tiny-llama", tmp_path_factory.mktemp("tools"))


def test_as_tools_one_per_skill(tiny_registry: MemoryRegistry) -> None:
    chat = EMLoCChatModel(registry=tiny_registry, max_tokens=6)
    tools = tiny_registry.as_tools(chat)
    assert sorted(t.name for t in tools) == ["sentiment", "topic"]
    by_name = {t.name: t for t in tools}
    assert by_name["topic"].description == "Classify a news article's topic."
    assert by_name["sentiment"].description == "Classify the sentiment."
    assert set(by_name["topic"].args) == {"input"}
    q = "Article: the match ended level\nTopic:"
    expected = chat.invoke(q, skill="topic").content
    assert by_name["topic"].invoke({"input": q}) == expected
    assert asyncio.run(by_name["topic"].ainvoke({"input": q})) == expected
    assert by_name["sentiment"].invoke({"input": q}) == chat.invoke(q, skill="sentiment").content


def test_as_tools_default_chat(tiny_registry: MemoryRegistry) -> None:
    tools = tiny_registry.as_tools()
    assert len(tools) == 2 and all(isinstance(t.invoke({"input": "hi"}), str) for t in tools)


def test_router_threshold_falls_back_to_zero_shot(tiny_registry: MemoryRegistry) -> None:
    router = SkillRouter(tiny_registry, threshold=1.01)  # cosine similarity never exceeds 1
    out = router.invoke("Review: fine\nSentiment:")
    assert out["skill"] is None and out["score"] is None
    assert set(out["scores"]) == {"sentiment", "topic"}
    chat = EMLoCChatModel(registry=tiny_registry, max_tokens=4)
    answer = router.answer_with(chat).invoke("Review: fine\nSentiment:")
    assert answer.response_metadata["skill"] is None
    assert answer.content == chat.invoke("Review: fine\nSentiment:").content
    # with no threshold the best skill is always chosen, and the chain answers on it
    routed = SkillRouter(tiny_registry, threshold=-1.0).invoke({"input": "Review: fine\nSentiment:"})
    assert routed["skill"] in ("sentiment", "topic") and routed["score"] == max(routed["scores"].values())


@pytest.mark.slow
def test_router_picks_the_right_skill_on_real_model(tmp_path) -> None:
    reg = _registry("smollm2-135m", tmp_path)
    router = SkillRouter(reg, threshold=0.0, top_k=3)
    cases = {
        "Review: an absolutely wonderful, moving film\nSentiment:": "sentiment",
        "Review: a tedious movie with wooden acting\nSentiment:": "sentiment",
        "Article: The bank cut its growth forecast for next year.\nTopic:": "topic",
        "Article: The goalkeeper saved a penalty in extra time.\nTopic:": "topic",
    }
    for text, skill in cases.items():
        assert router.invoke(text)["skill"] == skill, (text, router.scores(text))
    chat = EMLoCChatModel(registry=reg, max_tokens=4)
    answer = router.answer_with(chat).invoke("Article: The striker signed a new contract.\nTopic:")
    assert answer.response_metadata["skill"] == "topic"
    assert SkillRouter(reg, threshold=1.01).invoke("hello there")["skill"] is None


def test_skill_tools_phrase_raw_input_like_the_demonstrations(tiny_registry: MemoryRegistry) -> None:
    from emloc_agents.tasks import Task

    skill = Skill(name="s", input_template="Review: {input}\nSentiment:")
    assert skill.format_input(" a joyful film ") == "Review: a joyful film\nSentiment:"
    assert skill.format_input("Review: a joyful film\nSentiment:") == "Review: a joyful film\nSentiment:"
    assert Skill(name="s").format_input("raw") == "raw"
    with pytest.raises(ValueError, match="exactly once"):
        Skill(name="s", input_template="Review: {input} {input}")
    assert Task.load("trec").skill(2).input_template == "Question: {input}\nAnswer type:"
    # the tool sends the phrased text: the same answer as asking the skill with the phrased text
    chat = EMLoCChatModel(registry=tiny_registry, max_tokens=3)
    tiny_registry.add(Skill(name="phrased", input_template="Review: {input}\nSentiment:",
                            demonstrations=tiny_registry.skill("sentiment").demonstrations))
    tool = {t.name: t for t in tiny_registry.as_tools(chat)}["phrased"]
    expected = chat.invoke("Review: a joyful film\nSentiment:", skill="phrased").content
    assert tool.invoke({"input": "a joyful film"}) == expected
