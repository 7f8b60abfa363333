"""EMLoCChatModel on a tiny random model: skills per call, usage, streaming, async/threads, content
blocks and their errors, stop strings, constrained tool calls and structured output."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import ConfigurableField
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field, ValidationError
from typing_extensions import TypedDict

from emloc_agents import Demonstration, MemoryRegistry, Skill
from emloc_agents.chat_model import EMLoCChatModel
from emloc_agents.images import ImagePolicy, UnsupportedContentError
from emloc_agents.messages import to_turns
from emloc_agents.registry import UnknownSkillError
from tests.conftest import make_skill


def topic_skill() -> Skill:
    demos = [
        Demonstration(input="Article: The bank raised interest rates.\nTopic:", output="business"),
        Demonstration(input="Article: The striker scored twice in the final.\nTopic:", output="sports"),
        Demonstration(input="Article: A new chip doubles battery life.\nTopic:", output="tech"),
        Demonstration(input="Article: Stocks fell after the earnings report.\nTopic:", output="business"),
        Demonstration(input="Article: The team won the league title.\nTopic:", output="sports"),
    ]
    return Skill(name="topic", instruction="Classify the topic.", demonstrations=demos)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> MemoryRegistry:
    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path_factory.mktemp("chat"))
    reg.add(make_skill(name="sentiment"))
    reg.add(topic_skill())
    return reg


@pytest.fixture
def chat(registry: MemoryRegistry) -> EMLoCChatModel:
    return EMLoCChatModel(registry=registry, max_tokens=8)


def png_bytes(color: str = "red") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


# ---- construction ------------------------------------------------------------------------------


def test_construction_is_lazy_and_backends_are_shared(tmp_path) -> None:
    from emloc_agents import chat_model as cm

    t0 = time.perf_counter()
    a = EMLoCChatModel(model="tiny-llama", cache_dir=str(tmp_path), max_tokens=4)
    b = EMLoCChatModel(model="tiny-llama", cache_dir=str(tmp_path), temperature=0.5)
    assert time.perf_counter() - t0 < 0.5
    assert ("tiny-llama", str(tmp_path), "auto") not in cm._REGISTRIES  # nothing loaded yet
    a.invoke("hi")
    assert a.get_registry() is b.get_registry()
    assert a.get_registry().lm is b.get_registry().lm


# ---- skills per call ---------------------------------------------------------------------------


def test_skill_switch_changes_memory(chat: EMLoCChatModel, registry: MemoryRegistry) -> None:
    q = "Review: a slow film\nSentiment:"
    r_sent = chat.invoke(q, skill="sentiment")
    r_topic = chat.invoke(q, skill="topic")
    r_zero = chat.invoke(q)
    ms, mt = r_sent.response_metadata, r_topic.response_metadata
    assert ms["skill"] == "sentiment" and mt["skill"] == "topic" and r_zero.response_metadata["skill"] is None
    assert ms["memory_tokens"] > 0 and mt["memory_tokens"] > 0 and ms["memory_tokens"] != mt["memory_tokens"]
    assert r_zero.response_metadata["memory_tokens"] == 0
    assert r_zero.usage_metadata["input_token_details"]["cache_read"] == 0
    for m in (ms, mt):
        assert 0 < m["kept_ratio"] <= 1 and m["original_tokens"] >= m["memory_tokens"]
        assert m["model_name"] == "tiny-llama" and m["finish_reason"] in ("stop", "length")
    # the answer distribution depends on the memory: log-probs of the labels differ
    lm = registry.lm
    opts = ["positive", "negative"]
    s1 = lm.score(q, opts, registry.get("sentiment"))
    s2 = lm.score(q, opts, registry.get("topic"))
    assert s1 != pytest.approx(s2, abs=1e-4)
    # and the chat's own greedy continuations follow the memory deterministically
    assert chat.invoke(q, skill="sentiment").content == r_sent.content


def test_skill_via_field_bind_and_configurable(chat: EMLoCChatModel, registry: MemoryRegistry) -> None:
    q = "Article: rates rose\nTopic:"
    expected = chat.invoke(q, skill="topic")
    declared = EMLoCChatModel(registry=registry, max_tokens=8, skill="topic").invoke(q)
    bound = chat.bind(skill="topic").invoke(q)
    configurable = chat.configurable_fields(skill=ConfigurableField(id="skill"))
    conf = configurable.with_config(configurable={"skill": "topic"}).invoke(q)
    for r in (declared, bound, conf):
        assert r.response_metadata["skill"] == "topic"
        assert r.content == expected.content
    assert configurable.invoke(q).response_metadata["skill"] is None


def test_unknown_skill_lists_registered(chat: EMLoCChatModel) -> None:
    with pytest.raises(UnknownSkillError, match=r"unknown skill 'nope'.*sentiment.*topic"):
        chat.invoke("hi", skill="nope")


def test_usage_cache_creation_then_read(tmp_path) -> None:
    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path)
    reg.add(make_skill(n=5, name="fresh"))
    chat = EMLoCChatModel(registry=reg, skill="fresh", max_tokens=4)
    first = chat.invoke("Review: fine\nSentiment:").usage_metadata
    second = chat.invoke("Review: fine\nSentiment:").usage_metadata
    mem = reg.get("fresh")
    assert first["input_token_details"]["cache_creation"] == mem.original_length > 0
    assert second["input_token_details"]["cache_creation"] == 0
    for u in (first, second):
        read = u["input_token_details"]["cache_read"]
        assert read == round(mem.memory_tokens / mem.num_layers) > 0
        assert u["input_tokens"] >= read + u["input_token_details"]["cache_creation"]
        assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]


def test_usage_comes_from_the_calls_own_result_under_concurrency(tmp_path, monkeypatch) -> None:
    """Threads on two skills: exactly one call per skill reports cache_creation (its own compression),
    with that skill's length; registry.info(), shared by all threads, must not be what usage reads."""
    import threading

    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path)
    reg.add(make_skill(n=5, name="a"))
    reg.add(topic_skill().model_copy(update={"name": "b"}))
    shared_info = reg.info

    def late_info(skill):  # widen the window in which another thread's get() overwrites last_info
        time.sleep(0.3)
        return shared_info(skill)

    monkeypatch.setattr(reg, "info", late_info)
    chat = EMLoCChatModel(registry=reg, max_tokens=2)
    calls = ["a", "b"] * 4
    start = threading.Barrier(len(calls))

    def call(skill: str) -> tuple[str, int]:
        start.wait()
        usage = chat.invoke("Review: fine\nSentiment:", skill=skill).usage_metadata
        return skill, usage["input_token_details"]["cache_creation"]

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(call, calls))
    assert reg.compressions == 2
    for name in ("a", "b"):
        created = sorted(c for s, c in results if s == name)
        assert created == [0, 0, 0, reg.get(name).original_length], (name, results)


def test_unknown_call_argument_is_a_type_error(chat: EMLoCChatModel) -> None:
    q = "Article: rates rose\nTopic:"
    with pytest.raises(TypeError, match=r"'skil'.*accepted: stop, skill, model"):
        chat.invoke(q, skil="topic")
    with pytest.raises(TypeError, match=r"'skil'.*accepted: stop, skill"):
        chat.bind(skil="topic").invoke(q)
    with pytest.raises(TypeError, match="'skil'"):
        list(chat.stream(q, skil="topic"))
    with pytest.raises(TypeError, match="'skil'"):
        asyncio.run(chat.ainvoke(q, skil="topic"))
    # the accepted ones (and LangChain's own) still work
    assert chat.bind(skill="topic", max_tokens=2).invoke(q, stop=["\n"]).response_metadata["skill"] == "topic"
    assert chat.invoke(q, stream=True, temperature=0.0, seed=1).content is not None


def test_model_override_per_call(chat: EMLoCChatModel) -> None:
    r = chat.invoke("hi", model="tiny-qwen2")
    assert r.response_metadata["model_name"] == "tiny-qwen2"
    assert chat._get_ls_params(model="tiny-qwen2")["ls_model_name"] == "tiny-qwen2"
    assert chat._get_ls_params()["ls_model_name"] == "tiny-llama"


# ---- streaming, async, concurrency -------------------------------------------------------------


def test_stream_matches_invoke_and_ends_with_last_chunk(chat: EMLoCChatModel) -> None:
    q = "Review: warm and fun\nSentiment:"
    full = chat.invoke(q, skill="sentiment")
    chunks = list(chat.stream(q, skill="sentiment"))
    assert chunks[-1].chunk_position == "last"
    assert all(c.chunk_position != "last" for c in chunks[:-1])
    assert [c for c in chunks if c.usage_metadata] == [chunks[-1]]
    assert "".join(str(c.content) for c in chunks) == full.content
    agg = chunks[0]
    for c in chunks[1:]:
        agg = agg + c
    assert agg.response_metadata["skill"] == "sentiment"
    assert agg.usage_metadata["input_token_details"]["cache_read"] > 0


def test_streaming_field_and_astream(registry: MemoryRegistry) -> None:
    plain = EMLoCChatModel(registry=registry, max_tokens=8)
    streaming = EMLoCChatModel(registry=registry, max_tokens=8, streaming=True)
    q = "Review: dull\nSentiment:"
    expected = plain.invoke(q, skill="sentiment")
    got = streaming.invoke(q, skill="sentiment")
    assert got.content == expected.content and got.usage_metadata == expected.usage_metadata

    async def collect() -> list:
        return [c async for c in plain.astream(q, skill="sentiment")]

    chunks = asyncio.run(collect())
    assert chunks[-1].chunk_position == "last"
    assert "".join(str(c.content) for c in chunks) == expected.content
    assert asyncio.run(streaming.ainvoke(q, skill="sentiment")).content == expected.content


def test_concurrent_calls_match_sequential(chat: EMLoCChatModel) -> None:
    calls = [("Review: great\nSentiment:", "sentiment"), ("Article: goal!\nTopic:", "topic"),
             ("Review: boring\nSentiment:", None), ("Article: chips\nTopic:", "topic")] * 2
    sequential = [chat.invoke(q, skill=s).content for q, s in calls]

    async def gathered() -> list[str]:
        rs = await asyncio.gather(*(chat.ainvoke(q, skill=s) for q, s in calls))
        return [r.content for r in rs]

    assert asyncio.run(gathered()) == sequential
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda c: chat.invoke(c[0], skill=c[1]).content, calls))
    assert threaded == sequential

    async def astreamed() -> list[str]:
        async def one(q: str, s: str | None) -> str:
            return "".join([str(c.content) async for c in chat.astream(q, skill=s)])

        return list(await asyncio.gather(*(one(q, s) for q, s in calls)))

    assert asyncio.run(astreamed()) == sequential


def test_async_does_not_block_event_loop(registry: MemoryRegistry) -> None:
    chat = EMLoCChatModel(registry=registry, max_tokens=48)

    async def main() -> int:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        await chat.ainvoke("Review: long\nSentiment:", skill="sentiment", stop=["\x00"])
        async for _ in chat.astream("Review: long\nSentiment:", skill="sentiment"):
            pass
        stop.set()
        await t
        return ticks

    assert asyncio.run(main()) > 5


# ---- stop strings ------------------------------------------------------------------------------


def test_stop_string_spanning_tokens(chat: EMLoCChatModel, registry: MemoryRegistry) -> None:
    q = "Review: a great film\nSentiment:"
    free = chat.invoke(q, skill="sentiment", max_tokens=24)
    tok = registry.lm.tokenizer
    ids = tok(free.content, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    # a boundary k where the token before and after each contribute >= 1 character
    k = next(i for i in range(1, len(pieces) - 1)
             if len(pieces[i - 1]) >= 1 and len(pieces[i]) - len(pieces[i - 1]) >= 1
             and len(pieces[i + 1]) > len(pieces[i]))
    boundary = len(pieces[k])
    stop = free.content[boundary - 1 : boundary + 1]  # last char of one token + first of the next
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) >= 1
    expected = free.content[: free.content.find(stop)]
    r = chat.invoke(q, skill="sentiment", max_tokens=24, stop=[stop])
    assert r.content == expected
    assert r.response_metadata["finish_reason"] == "stop"
    streamed = "".join(str(c.content) for c in chat.stream(q, skill="sentiment", max_tokens=24, stop=[stop]))
    assert streamed == expected
    declared = EMLoCChatModel(registry=registry, skill="sentiment", max_tokens=24, stop=[stop]).invoke(q)
    assert declared.content == expected


def test_text_reply_limits_under_the_auto_tools_grammar() -> None:
    """A text reply keeps the caller's stop strings and max_tokens; a call is left to its grammar."""
    from emloc_agents.chat_model import _text_reply_limits
    from emloc_agents.tool_format import ToolFormat

    limits = _text_reply_limits(["\n\n"], max_tokens=4, fmt=ToolFormat("json"))
    assert limits("  ", 9) is None  # undecided: only blanks so far
    assert limits(' {"name": "add", "arguments": {"a": 1,\n\n', 99) is None  # a call: the grammar ends it
    assert limits(" It is three.\n\nAlso", 3) == (len(" It is three."), "stop")
    assert limits(" It is", 3) is None
    assert limits(" It is three", 4) == (len(" It is three"), "length")


def test_finish_when_ends_decoding(registry: MemoryRegistry) -> None:
    lm = registry.lm
    ids = lm.encode_conversation([{"role": "user", "content": "Say something."}])
    free = lm.generate_ids(ids, None, max_new_tokens=6)
    assert len(free.token_ids) == 6
    cut = lm.generate_ids(ids, None, max_new_tokens=6,
                          finish_when=lambda text, n: (len(text), "length") if n >= 2 else None)
    assert cut.token_ids == free.token_ids[:2] and cut.finish_reason == "length"
    assert free.text.startswith(cut.text)


# ---- messages and content blocks ---------------------------------------------------------------


def test_to_turns_roles_merge_and_names() -> None:
    turns = to_turns([
        SystemMessage("sys a"), SystemMessage("sys b"),
        HumanMessage("hello", name="example_user"), HumanMessage("again"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("3", tool_call_id="c1", name="add"),
    ])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"] == "sys a\nsys b" and turns[1]["content"] == "hello\nagain"
    assert json.loads(turns[2]["content"]) == {"name": "add", "arguments": {"a": 1}}
    assert "Tool result (add): 3" in turns[3]["content"]
    with pytest.raises(ValueError, match="no messages"):
        to_turns([])


def test_image_blocks_become_pil_images(tmp_path) -> None:
    data = png_bytes()
    b64 = base64.b64encode(data).decode()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    blocks = [
        {"type": "text", "text": "Describe:"},
        {"type": "image", "base64": b64, "mime_type": "image/png"},  # LangChain v1
        {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},  # v0
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},  # OpenAI
        {"type": "image_url", "image_url": f"data:image/png;base64,{b64}"},
        {"type": "image", "url": f"data:image/png;base64,{b64}"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},  # Anthropic
        {"type": "image", "url": str(path)},  # local path, in an allowed directory
        {"type": "image_url", "image_url": {"url": f"file://{path}"}},
    ]
    allowed = ImagePolicy.allowing([tmp_path])
    turns = to_turns([HumanMessage(content=blocks), HumanMessage(content=[{"type": "image", "path": str(path)}])], allowed)
    assert len(turns) == 1 and turns[0]["content"] == "Describe:"
    assert len(turns[0]["images"]) == 9
    assert all(im.size == (8, 8) for im in turns[0]["images"])
    assert len(to_turns([HumanMessage(content=blocks[:7])])[0]["images"]) == 6  # base64 and data: URLs need no option


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds a few bytes of them (decoding it fails)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_local_images_are_read_only_inside_allowed_directories(tmp_path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "in.png").write_bytes(png_bytes())
    (outside / "out.png").write_bytes(png_bytes())
    (allowed / "link.png").symlink_to(outside / "out.png")
    policy = ImagePolicy.allowing([allowed])

    def read(url: str, images: ImagePolicy = policy) -> list:
        return to_turns([HumanMessage(content=[{"type": "image", "url": url}])], images)[0]["images"]

    assert read(str(allowed / "in.png"))[0].size == (8, 8)
    assert read(f"file://{allowed / 'in.png'}")[0].size == (8, 8)
    assert read(f"file://localhost{allowed / 'in.png'}")[0].size == (8, 8)
    for url in (str(allowed / "in.png"), f"file://{allowed / 'in.png'}", "/etc/passwd", "relative.png"):
        with pytest.raises(UnsupportedContentError, match=r"allowed_local_image_dirs=\[\.\.\.\]"):
            read(url, ImagePolicy())  # the default: no local files at all
    for url in (str(outside / "out.png"), str(allowed / ".." / "outside" / "out.png"), str(allowed / "link.png"),
                "/etc/passwd", f"file://{outside / 'out.png'}"):
        with pytest.raises(UnsupportedContentError, match="outside the directories of allowed_local_image_dirs"):
            read(url)
    with pytest.raises(UnsupportedContentError, match="image not found"):
        read(str(allowed / "missing.png"))
    with pytest.raises(UnsupportedContentError, match="another host"):
        read(f"file://evil.example{allowed / 'in.png'}")


def test_allowed_local_image_dirs_on_the_chat_model(registry: MemoryRegistry, tmp_path) -> None:
    (tmp_path / "in.png").write_bytes(png_bytes())
    msg = HumanMessage(content=[{"type": "text", "text": "what is this"}, {"type": "image", "path": str(tmp_path / "in.png")}])
    with pytest.raises(UnsupportedContentError, match="allowed_local_image_dirs"):
        EMLoCChatModel(registry=registry, max_tokens=2).invoke([msg])
    with pytest.raises(ValueError, match="text-only"):  # read, then refused by the text model
        EMLoCChatModel(registry=registry, max_tokens=2, allowed_local_image_dirs=[str(tmp_path)]).invoke([msg])
    for bad in (["/no/such/dir"], [str(tmp_path / "in.png")], [""]):
        with pytest.raises(ValidationError, match="allowed_local_image_dirs"):
            EMLoCChatModel(registry=registry, allowed_local_image_dirs=bad)


def test_images_past_the_size_limits_are_refused_before_decoding(registry: MemoryRegistry, tmp_path) -> None:
    data = png_bytes()
    (tmp_path / "in.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    small = ImagePolicy.allowing([tmp_path], max_bytes=len(data) - 1)
    for block in ({"type": "image", "base64": b64}, {"type": "image", "url": f"data:image/png;base64,{b64}"},
                  {"type": "image", "path": str(tmp_path / "in.png")}):
        with pytest.raises(UnsupportedContentError, match="max_image_bytes"):
            to_turns([HumanMessage(content=[block])], small)
    assert to_turns([HumanMessage(content=[{"type": "image", "base64": b64}])],
                    ImagePolicy(max_bytes=len(data)))[0]["images"]
    with pytest.raises(UnsupportedContentError, match="max_image_bytes"):  # refused before decoding the base64
        to_turns([HumanMessage(content=[{"type": "image", "base64": "A" * 4000}])], ImagePolicy(max_bytes=100))
    with pytest.raises(UnsupportedContentError, match="max_image_pixels=63"):
        to_turns([HumanMessage(content=[{"type": "image", "base64": b64}])], ImagePolicy(max_pixels=63))
    # 81 megapixels claimed in a tiny file: refused from its header (decoding would fail: "not readable")
    header_only = {"type": "image", "base64": base64.b64encode(png_header(9000, 9000)).decode(), "mime_type": "image/png"}
    with pytest.raises(UnsupportedContentError, match="9000x9000 = 81000000 pixels, over max_image_pixels"):
        EMLoCChatModel(registry=registry, max_tokens=2).invoke([HumanMessage(content=[header_only])])
    bomb = {"type": "image", "base64": base64.b64encode(png_header(100_000, 100_000)).decode(), "mime_type": "image/png"}
    with pytest.raises(UnsupportedContentError, match="decompression bomb"):
        EMLoCChatModel(registry=registry, max_tokens=2, max_image_pixels=10**12).invoke([HumanMessage(content=[bomb])])
    with pytest.raises(ValidationError):
        EMLoCChatModel(registry=registry, max_image_bytes=0)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}, "'audio' are not supported"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "'audio' are not supported"),
        ({"type": "file", "base64": "AAAA", "mime_type": "application/pdf"}, "'file' are not supported"),
        ({"type": "image", "url": "https://example.com/cat.png"}, "remote image URLs cannot be fetched"),
        ({"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}, "remote image URLs"),
        ({"type": "image", "file_id": "file-123"}, "file_id"),
        ({"type": "image", "base64": base64.b64encode(b"not an image").decode(), "mime_type": "image/png"},
         "not a readable image"),
        ({"type": "image", "url": "/no/such/image.png"}, "allowed_local_image_dirs"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "allowed_local_image_dirs"),
        ({"type": "image_url", "image_url": {"url": "data:application/pdf;base64,AAAA"}}, "images only"),
        ({"type": "hologram"}, "unsupported content block type 'hologram'"),
    ],
)
def test_unsupported_blocks_raise_clearly(chat: EMLoCChatModel, block: dict, match: str) -> None:
    msg = HumanMessage(content=[{"type": "text", "text": "look"}, block])
    with pytest.raises(UnsupportedContentError, match=match):
        chat.invoke([msg])


def test_image_to_text_model_raises(chat: EMLoCChatModel) -> None:
    b64 = base64.b64encode(png_bytes()).decode()
    msg = HumanMessage(content=[{"type": "text", "text": "what is this"},
                                {"type": "image", "base64": b64, "mime_type": "image/png"}])
    with pytest.raises(ValueError, match="text-only"):
        chat.invoke([msg])
    with pytest.raises(ValueError, match="text-only"):
        chat.invoke([msg], skill="sentiment")


def test_ai_content_blocks_tool_use_and_thinking_are_skipped(chat: EMLoCChatModel) -> None:
    msgs = [
        HumanMessage([{"type": "text", "text": "Hello"}]),
        AIMessage([{"type": "thinking", "thinking": "hm", "signature": "x"}, {"type": "text", "text": "Hi"},
                   {"type": "tool_use", "id": "t", "name": "f", "input": {}}]),
        HumanMessage("Well, thanks."),
    ]
    assert to_turns(msgs)[1]["content"] == "Hi"
    assert isinstance(chat.invoke(msgs), AIMessage)


# ---- tools (constrained decoding) ---------------------------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def get_weather(location: str) -> str:
    """Get the weather for a location."""
    return "sunny"


@pytest.fixture
def jchat(registry: MemoryRegistry) -> EMLoCChatModel:
    # a random-weight model: only the grammar makes its output valid; keep strings short
    return EMLoCChatModel(registry=registry, max_tokens=8, json_max_tokens=160, json_max_string_chars=12)


@pytest.mark.parametrize("choice", ["any", "required", True, "add"])
def test_forced_tool_call_is_valid(jchat: EMLoCChatModel, choice) -> None:
    r = jchat.bind_tools([add, get_weather], tool_choice=choice).invoke("What is 1 + 2?")
    assert r.content == "" and len(r.tool_calls) == 1, r
    call = r.tool_calls[0]
    assert call["type"] == "tool_call" and call["id"].startswith("call_")
    if choice == "add":
        assert call["name"] == "add"
    if call["name"] == "add":
        assert set(call["args"]) == {"a", "b"} and all(isinstance(v, int) for v in call["args"].values())
    else:
        assert set(call["args"]) == {"location"} and isinstance(call["args"]["location"], str)
    assert r.response_metadata["finish_reason"] == "tool_calls"
    assert any(b["type"] == "tool_call" for b in r.content_blocks)


def test_tool_call_streams_as_one_call(jchat: EMLoCChatModel) -> None:
    bound = jchat.bind_tools([add], tool_choice="add")
    chunks = list(bound.stream("What is 1 + 2?", skill="sentiment"))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert chunks[-1].chunk_position == "last"
    assert len(full.tool_calls) == 1 and full.tool_calls[0]["name"] == "add"
    assert full.tool_calls[0]["args"] == bound.invoke("What is 1 + 2?", skill="sentiment").tool_calls[0]["args"]
    assert full.response_metadata["skill"] == "sentiment"


def test_tool_choice_none_and_auto(jchat: EMLoCChatModel) -> None:
    none = jchat.bind_tools([add], tool_choice="none").invoke("What is 1 + 2?")
    assert none.tool_calls == [] and none.content == jchat.invoke("What is 1 + 2?").content
    auto = jchat.bind_tools([add]).invoke("What is 1 + 2?")
    assert isinstance(auto, AIMessage)
    # auto: either text that does not start a JSON object, or one valid call
    assert auto.tool_calls or not str(auto.content).lstrip().startswith("{")
    assert not auto.invalid_tool_calls


@pytest.mark.parametrize(("text", "complete"), [
    ('{"name":"add","arguments":{"a":1,"b":2}}', True),
    ('\n{"name":"add","arguments":{"a":1,"b":2}}', True),  # blanks may lead a call ...
    (" Three.", True),  # ... or an answer (plain-rendered memories answer after a space)
    ("\n\nIt is {3}.", True),
    (" {not a call", None),  # a "{" after the blanks must be a call
    ("  ", False),  # blanks alone are not an answer
])
def test_auto_grammar_allows_leading_blanks(registry: MemoryRegistry, text: str, complete: bool | None) -> None:
    from llguidance import LLMatcher

    from emloc_agents import structured as st

    tools = [convert_to_openai_tool(add)]
    tok = registry.lm.tokenizer
    matcher = LLMatcher(st.llg_tokenizer(tok), st.tool_grammar(tools, required=False))
    consumed = all(matcher.consume_token(t) for t in tok(text, add_special_tokens=False)["input_ids"])
    if complete is None:
        assert not consumed
    else:
        assert consumed and matcher.is_accepting() == complete


@pytest.mark.parametrize(("mode", "text"), [
    ("tools", '\n {"name": "add", "arguments": {"a": 1, "b": 2}}'),
    ("tools", "  Three."),
    ("text", " Three."),  # a plain-rendered memory answers after a space, like its demonstrations
])
def test_message_drops_leading_blanks(jchat: EMLoCChatModel, mode: str, text: str) -> None:
    from emloc_agents.chat_model import PreparedCall
    from emloc_agents.engine.decode import Generation
    from emloc_agents.tool_format import ToolFormat

    p = PreparedCall(lm=jchat.get_registry().lm, ids=[1, 2, 3], memory=None, skill=None, created=0, gen={},
                     mode=mode, model_name="m", text_stops=[], format=ToolFormat("json"), tool_names=["add"])
    msg = jchat._message(p, Generation(text, [1, 2], 3, "stop", 0.0, 0.0))
    if "{" in text:
        assert msg.content == "" and msg.tool_calls[0]["args"] == {"a": 1, "b": 2}
    else:
        assert msg.content == "Three." and not msg.tool_calls


def test_bad_tool_choice(jchat: EMLoCChatModel) -> None:
    with pytest.raises(ValueError, match="tool_choice 'multiply'"):
        jchat.bind_tools([add], tool_choice="multiply")


def test_tool_history_round_trip(jchat: EMLoCChatModel) -> None:
    bound = jchat.bind_tools([add], tool_choice="any")
    first = bound.invoke([HumanMessage("What is 1 + 2?")])
    result = ToolMessage("3", tool_call_id=first.tool_calls[0]["id"], name="add")
    follow = jchat.bind_tools([add], tool_choice="none").invoke([HumanMessage("What is 1 + 2?"), first, result])
    assert isinstance(follow.content, str) and not follow.tool_calls


def test_template_tools_path(registry: MemoryRegistry) -> None:
    """A chat template that renders tools= gets them (zero-shot); others get a system description."""
    from emloc_agents import structured as st

    tok = registry.lm.tokenizer
    assert not st.template_takes_tools(tok)
    text = st.describe_tools([{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                                                "parameters": {"properties": {"a": {"type": "integer"}}}}}],
                             "required")
    assert "add(a: integer): Add two integers." in text and "must call a tool" in text


# ---- structured output ------------------------------------------------------------------------


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the name")
    mood: str = Field(description="the mood", json_schema_extra={"enum": ["happy", "sad"]})
    adult: bool


class PersonDict(TypedDict):
    """A person."""

    name: Annotated[str, ..., "the name"]
    adult: Annotated[bool, ..., "adult or not"]


PERSON_SCHEMA = {"title": "Person", "description": "A person.", "type": "object",
                 "properties": {"name": {"type": "string"}, "adult": {"type": "boolean"}},
                 "required": ["name", "adult"]}


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
@pytest.mark.parametrize("schema", [Person, PersonDict, PERSON_SCHEMA], ids=["pydantic", "typeddict", "jsonschema"])
def test_structured_output(jchat: EMLoCChatModel, schema, method: str) -> None:
    out = jchat.with_structured_output(schema, method=method).invoke("Describe Ann, a happy adult.")
    if schema is Person:
        assert isinstance(out, Person) and out.mood in ("happy", "sad") and len(out.name) <= 12
    else:
        assert isinstance(out, dict) and set(out) == {"name", "adult"} and isinstance(out["adult"], bool)


def test_structured_output_include_raw_and_stream(jchat: EMLoCChatModel) -> None:
    declared = EMLoCChatModel(**{**jchat.model_dump(), "registry": jchat.registry, "skill": "sentiment"})
    out = declared.with_structured_output(Person, include_raw=True).invoke("Describe Ann.")
    assert isinstance(out["parsed"], Person) and out["parsing_error"] is None
    assert isinstance(out["raw"], AIMessage) and out["raw"].response_metadata["skill"] == "sentiment"
    streamed = list(jchat.with_structured_output(PERSON_SCHEMA).stream("Describe Ann."))
    assert streamed and set(streamed[-1]) == {"name", "adult"}


def test_structured_output_bad_method(jchat: EMLoCChatModel) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        jchat.with_structured_output(Person, method="xml")


def test_profile_is_known_without_loading_the_model(tmp_path) -> None:
    """create_agent and its middleware read ``profile`` (context size, tools, images)."""
    from emloc_agents.profile import EMBEDDED_CONTEXT

    chat = EMLoCChatModel(model="qwen2.5-coder-0.5b", cache_dir=str(tmp_path))
    assert chat.profile is not None and chat.profile["max_input_tokens"] == EMBEDDED_CONTEXT["qwen2.5-coder-0.5b"]
    assert chat.profile["tool_calling"] and chat.profile["tool_choice"] and not chat.profile["image_inputs"]
    assert chat.profile["structured_output"] is False  # create_agent(response_format=...) forces a call
    for name in ("smollm2-135m", "default"):  # no tool-call format of its own: calls only when forced
        small = EMLoCChatModel(model=name, cache_dir=str(tmp_path)).profile
        assert small is not None and small["tool_calling"] is False and small["tool_choice"]
    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path)
    lazy = EMLoCChatModel(registry=reg)
    assert reg.loaded_model is None and lazy.profile is not None and "tool_calling" not in lazy.profile
    assert reg.lm.facts.max_positions  # once loaded, the profile reads the model itself
    loaded = EMLoCChatModel(registry=reg).profile
    assert loaded is not None and loaded["max_input_tokens"] == reg.lm.facts.max_positions
    vlm = MemoryRegistry(model="tiny-qwen2-vl", cache_dir=tmp_path)
    assert vlm.lm.is_vision
    vision = EMLoCChatModel(registry=vlm).profile
    assert vision is not None and vision["image_inputs"]
    assert EMLoCChatModel(profile={"max_input_tokens": 7}).profile == {"max_input_tokens": 7}  # a given one wins


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_the_profile_says_which_models_have_a_tool_call_format(name: str) -> None:
    """The profile known without a load is what each embedded model's own chat template says, read
    from its checkpoint folder as for any local model."""
    import importlib.util

    from emloc_agents.models.sources import EMBEDDED, resolve_model_dir
    from emloc_agents.profile import EMBEDDED_TOOL_CALLING, profile_of_name

    if name in EMBEDDED and importlib.util.find_spec(EMBEDDED[name].module) is None:
        pytest.skip(f"{name} is not installed ({EMBEDDED[name].pip_command})")
    folder = resolve_model_dir(name, progress=False)
    assert profile_of_name(str(folder)).get("tool_calling") is EMBEDDED_TOOL_CALLING[name]
    assert profile_of_name(name).get("tool_calling") is EMBEDDED_TOOL_CALLING[name]


def test_stream_together_gives_each_call_its_own_reply_and_error(registry: MemoryRegistry) -> None:
    """Calls on one skill decode as one batch, a zero-shot call beside them alone; each reply is the one
    ``invoke`` gives, and a call that cannot be prepared fails alone, when its iterator is read."""
    from emloc_agents.registry import UnknownSkillError

    registry.warm()  # usage then counts no compression, batched or alone
    chat = EMLoCChatModel(registry=registry, max_tokens=6, cache_prompt=False)
    calls = [("Review: dull\nSentiment:", {"skill": "sentiment"}),
             ("Review: a warm heart\nSentiment:", {"skill": "sentiment", "max_tokens": 2}),
             ("Article: rates rise\nTopic:", {"skill": "nope"}),
             ("Say hi", {"stop": ["i"]})]
    streams = chat.stream_together([text for text, _ in calls], [kw for _, kw in calls])
    with pytest.raises(UnknownSkillError, match="nope"):
        next(streams[2])
    replies = {}
    for i in (3, 1, 0):  # any order: reading one advances the batch and keeps the others' chunks
        joined = None
        for chunk in streams[i]:
            joined = chunk if joined is None else joined + chunk
        replies[i] = joined
    for i in (0, 1, 3):
        text, kw = calls[i]
        alone = chat.invoke(text, **kw)
        assert replies[i].content == alone.content, i
        assert replies[i].usage_metadata == alone.usage_metadata
    with pytest.raises(ValueError, match="2 inputs but 1 option sets"):
        chat.stream_together(["a", "b"], [{}])


REVIEWS = ["Review: dull\nSentiment:", "Review: a warm heart\nSentiment:", "Review: fine\nSentiment:",
           "Review: never again\nSentiment:"]


class RunRecorder(BaseCallbackHandler):
    """What LangChain's callbacks see of each run: its start (with tags) and its end or error."""

    def __init__(self) -> None:
        self.starts: dict[Any, list[str]] = {}
        self.ends: dict[Any, str] = {}
        self.errors: dict[Any, BaseException] = {}

    def on_chat_model_start(self, serialized, messages, *, run_id, tags=None, **kwargs) -> None:
        self.starts[run_id] = list(tags or [])

    def on_llm_end(self, response, *, run_id, **kwargs) -> None:
        self.ends[run_id] = response.generations[0][0].message.content

    def on_llm_error(self, error, *, run_id, **kwargs) -> None:
        self.errors[run_id] = error


def test_batch_decodes_one_packed_batch_per_skill_with_callbacks(registry: MemoryRegistry) -> None:
    """``batch`` answers as one ``invoke`` per input does, from one packed decode (forwards counted on
    the model), and each input is a run of its own for the callbacks."""
    registry.warm()
    chat = EMLoCChatModel(registry=registry, max_tokens=4, cache_prompt=False)
    alone = [chat.invoke(x, skill="sentiment") for x in REVIEWS]
    forwards = []
    hook = registry.lm.model.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))
    recorder = RunRecorder()
    try:
        together = chat.batch(REVIEWS, [{"callbacks": [recorder], "tags": [f"input-{i}"]} for i in range(4)],
                              skill="sentiment")
    finally:
        hook.remove()
    assert [m.content for m in together] == [m.content for m in alone]
    assert [m.usage_metadata for m in together] == [m.usage_metadata for m in alone]
    assert all(isinstance(m, AIMessage) and m.id and m.id.startswith("lc_run-") for m in together)
    assert 0 < len(forwards) <= 4  # one prefill and one step per later token, for all four (alone: 16)
    assert sorted(recorder.starts.values()) == [[f"input-{i}"] for i in range(4)]
    assert sorted(recorder.ends.values()) == sorted(m.content for m in together) and not recorder.errors


def test_batch_returns_or_raises_each_inputs_own_error(registry: MemoryRegistry) -> None:
    chat = EMLoCChatModel(registry=registry, max_tokens=3, cache_prompt=False)
    too_long = "word " * (registry.lm.facts.max_positions + 10)
    recorder = RunRecorder()
    out = chat.batch([REVIEWS[0], too_long, REVIEWS[1]], {"callbacks": [recorder]}, return_exceptions=True,
                     skill="sentiment")
    assert isinstance(out[1], ValueError)
    assert [m.content for m in (out[0], out[2])] == [chat.invoke(x, skill="sentiment").content
                                                    for x in (REVIEWS[0], REVIEWS[1])]
    assert len(recorder.errors) == 1 and len(recorder.ends) == 2
    with pytest.raises(ValueError):
        chat.batch([REVIEWS[0], too_long], skill="sentiment")
    assert chat.batch([]) == []


def test_abatch_is_batch_off_the_event_loop(registry: MemoryRegistry) -> None:
    chat = EMLoCChatModel(registry=registry, max_tokens=3, cache_prompt=False)
    bound = chat.bind(skill="sentiment")
    together = asyncio.run(bound.abatch(REVIEWS[:3]))
    assert [m.content for m in together] == [m.content for m in bound.batch(REVIEWS[:3])]


# ---- token counts ------------------------------------------------------------------------------


def test_token_counts_use_the_models_own_tokenizer(chat: EMLoCChatModel, registry: MemoryRegistry) -> None:
    text = "Hello there, how are you?"
    ids = registry.lm.tokenizer.encode(text, add_special_tokens=False)
    assert chat.get_token_ids(text) == list(ids)
    assert chat.get_num_tokens(text) == len(ids) > 0


def test_message_token_count_is_the_prompt_a_call_sends(chat: EMLoCChatModel) -> None:
    msgs = [SystemMessage("Answer briefly."), HumanMessage("Review: a joy to watch\nSentiment:")]
    reply = chat.invoke(msgs, max_tokens=1)
    assert reply.usage_metadata is not None
    assert chat.get_num_tokens_from_messages(msgs) == reply.usage_metadata["input_tokens"]


def test_trim_messages_counts_with_the_chat_model(chat: EMLoCChatModel) -> None:
    from langchain_core.messages import trim_messages

    msgs = [SystemMessage("Answer briefly."), HumanMessage("Tell me about the film. " * 20), AIMessage("It is good."),
            HumanMessage("And the music?")]
    # trim_messages counts the system message apart from the rest: each count has its template's frame
    budget = chat.get_num_tokens_from_messages(msgs[:1]) + chat.get_num_tokens_from_messages(msgs[2:])
    assert chat.get_num_tokens_from_messages(msgs) > budget
    kept = trim_messages(msgs, max_tokens=budget, token_counter=chat, strategy="last", include_system=True)
    assert kept == [msgs[0], *msgs[2:]]


def test_summarization_middleware_counts_with_the_chat_model(chat: EMLoCChatModel) -> None:
    from langchain.agents import create_agent
    from langchain.agents.middleware import SummarizationMiddleware

    history: list[BaseMessage] = []
    for i in range(6):
        history += [HumanMessage(f"Question {i}: tell me about the film. " * 8), AIMessage(f"Answer {i}: it is good.")]
    history.append(HumanMessage("And the music?"))
    total = chat.get_num_tokens_from_messages(history)
    middleware = SummarizationMiddleware(model=chat, trigger=("tokens", total // 2), keep=("messages", 3),
                                         token_counter=chat.get_num_tokens_from_messages)
    out = create_agent(chat, tools=[], middleware=[middleware]).invoke({"messages": history})["messages"]
    assert out[0].content.startswith("Here is a summary")
    assert [m.content for m in out[1:4]] == [m.content for m in history[-3:]]
    assert chat.get_num_tokens_from_messages(out[:4]) < total // 2
