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
    assert by_name["topic"].description == (
        "Classify the topic of the article. Classify a news article's topic. "
        "Example: 'Article: The central bank raised interest rates again. Topic:' -> 'business'.")
    assert by_name["sentiment"].description.startswith("Classify the sentiment. Example: 'Review: a dull")
    assert set(by_name["topic"].args) == {"input"}
    q = "Article: the match ended level\nTopic:"
    expected = chat.invoke(q, skill="topic").content
    assert by_name["topic"].invoke({"input": q}) == expected
    assert by_name["topic"].metadata == {"certificate": tiny_registry.certificate("topic")}
    assert asyncio.run(by_name["topic"].ainvoke({"input": q})) == expected
    assert by_name["sentiment"].invoke({"input": q}) == chat.invoke(q, skill="sentiment").content
    # made before its memory, a tool reads the certificate again after a call (a memory is made on first use)
    fresh = MemoryRegistry(model="tiny-llama", cache_dir=tiny_registry.cache_dir / "fresh")  # type: ignore[operator]
    fresh.add(topic_skill())
    tool = fresh.as_tools(EMLoCChatModel(registry=fresh, max_tokens=2))[0]
    assert tool.metadata == {"certificate": None}
    tool.invoke({"input": q})
    assert tool.metadata["certificate"]["method"] in ("context", "chunks")


def test_as_tools_needs_the_chat_model(tiny_registry: MemoryRegistry) -> None:
    with pytest.raises(TypeError, match=r"registry.as_tools\(EMLoCChatModel\(registry=registry\)\)"):
        tiny_registry.as_tools(None)
    tools = EMLoCChatModel(registry=tiny_registry, max_tokens=3).skill_tools()  # the same, from the chat
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


def test_a_labelled_skill_answers_exactly_one_label(tmp_path) -> None:
    """A random-weight model writes anything; on a skill with labels its reply is one of them, from
    the tool, from invoke and from a stream alike (the caller's stop still applies on top)."""
    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path)
    labelled = topic_skill().model_copy(update={"labels": ["business", "sports", "science and technology"]})
    reg.add(labelled)
    chat = EMLoCChatModel(registry=reg, max_tokens=16)
    tool = reg.as_tools(chat)[0]
    assert "Answers one of: business, sports, science and technology." in tool.description
    replies = {tool.invoke({"input": f"the match number {i} ended level"}) for i in range(8)}
    assert replies <= set(labelled.labels), replies
    msg = chat.invoke("Article: rain again\nTopic:", skill="topic")
    assert msg.content in labelled.labels and msg.response_metadata["finish_reason"] == "stop"
    assert "".join(str(c.content) for c in chat.stream("Article: rain again\nTopic:", skill="topic")) == msg.content
    free = chat.invoke("Article: rain again\nTopic:")  # zero-shot: no skill, no labels
    assert isinstance(free.content, str)


def test_skill_answers_stop_where_the_demonstrated_answers_end(tmp_path) -> None:
    from emloc_agents.engine.prompt import DEMO_SEPARATOR, answer_stops

    assert answer_stops("plain", ["positive", "negative"]) == ["\n"]
    assert answer_stops("chat", ["positive"]) == ["\n"]
    assert answer_stops("plain", ["line one\nline two", "x"]) == [DEMO_SEPARATOR]
    assert answer_stops("chat", ["line one\nline two"]) == []  # the end-of-turn token ends the answer

    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path)
    reg.add(topic_skill())
    chat = EMLoCChatModel(registry=reg, max_tokens=48)
    skill, memory = reg.skill("topic"), reg.get(reg.skill("topic"))
    assert chat._stops(None, skill, memory) == ["\n"]
    assert chat._stops(["END"], skill, memory) == ["END"]  # the caller's stop wins
    assert chat._stops([], skill, memory) == []  # ... an empty one turns the default off
    assert chat._stops(None, None, None) is None  # zero-shot: no default
    assert EMLoCChatModel(registry=reg, stop=["##"])._stops(None, skill, memory) == ["##"]
    reply = chat.invoke("Article: a quiet day\nTopic:", skill="topic")
    assert "\n" not in str(reply.content)


def test_bind_takes_stop(tiny_registry: MemoryRegistry) -> None:
    chat = EMLoCChatModel(registry=tiny_registry, max_tokens=12)
    q = "Article: the match ended level\nTopic:"
    bound = chat.bind(skill="topic", stop=["zzz-never"])
    assert bound.invoke(q).content == chat.invoke(q, skill="topic", stop=["zzz-never"]).content
    with pytest.raises(ValueError, match="stop must be"):
        chat.bind(stop=5)
    with pytest.raises(TypeError, match="skil"):
        chat.bind(skil="topic")
