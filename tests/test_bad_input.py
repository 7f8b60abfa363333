"""Bad input at scale (property-based, hypothesis): generated bad skills and demonstrations, chat messages
and content blocks, call arguments, configs, memory files and CLI arguments are thrown at the public
surface. Every one must end in a documented exception with a clear message (or, where the input is
merely odd, a normal answer): never another exception, a hang, or a stored entry changed or lost.

Tiny random model, deterministic (``derandomize=True``), no example database; about 1,900 inputs.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import string
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import ValidationError

from emloc_agents import EMLoCConfig, MemoryRegistry, Skill, SkillError
from emloc_agents.chat_model import EMLoCChatModel
from emloc_agents.images import UnsupportedContentError
from emloc_agents.registry import UnknownSkillError
from emloc_agents.store import DiskCacheStore, MemoryFormatError, load_memory, read_info

from .conftest import make_skill

RAN: Counter[str] = Counter()
BUDGET = {"skills": 400, "configs": 250, "chat": 450, "memory_bytes": 300, "imports": 200, "stored": 40, "cli": 300}


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(BaseException):
    """An input took longer than any bad input should (a BaseException: nothing may swallow it)."""


@contextlib.contextmanager
def no_hang(seconds: float = 30.0) -> Iterator[None]:
    def boom(*_: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def documented(fn: Callable[[], Any], errors: tuple[type[BaseException], ...], may_succeed: bool = False) -> Any:
    """Run ``fn``: it raises one of ``errors`` with a clear message, or (``may_succeed``) returns."""
    with no_hang():
        try:
            result = fn()
        except errors as e:
            msg = str(e).strip()
            assert msg and len(msg) < 5000 and "Traceback" not in msg, f"unclear message: {msg[:300]!r}"
            return e
    assert may_succeed, f"bad input accepted: {result!r}"[:500]
    return result


def _png(color: str = "red") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` pixels in a few bytes (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---- shared fixtures: one tiny model, a store holding one good skill and its memory --------------------


class World(dict):
    """The module's shared state (a short repr: hypothesis prints the arguments of a failing case)."""

    def __repr__(self) -> str:
        return "<world: tiny-llama registry with skill 'good'>"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llama) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    store = DiskCacheStore(root / "store")
    config = EMLoCConfig(keep_ratios=(1.0,))
    reg = MemoryRegistry(model=tiny_llama, store=store, config=config)
    good = reg.add(make_skill(4, name="good"))
    reg.get("good")
    exported = _fixed_time(reg.export("good", root / "good.emloc").read_bytes())
    chat = EMLoCChatModel(registry=reg, max_tokens=1)
    return World(root=root, store=store, reg=reg, good=good, chat=chat, file=exported, snapshot=snapshot(store))


def _fixed_time(data: bytes) -> bytes:
    """The exported file without its creation time and timings, so the generated corruptions are the same every run."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    info = read_info(data)
    info["created"], info["stats"] = 0.0, {}  # (stats hold timings)
    return st_save(st_load(data), metadata={"emloc": json.dumps(info, sort_keys=True)})


def snapshot(store: DiskCacheStore) -> dict[str, bytes | None]:
    keys = sorted(store.yield_keys())
    return dict(zip(keys, store.mget(keys), strict=True))


def assert_store_intact(world: World) -> None:
    now = snapshot(world["store"])
    assert now == world["snapshot"], f"store changed: {sorted(set(now) ^ set(world['snapshot']))}"
    assert world["reg"].skill("good") == world["good"]


# ---- skills and demonstrations -------------------------------------------------------------------------

junk = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.binary(max_size=8),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
bad_names = st.one_of(
    junk,
    st.sampled_from(["", " ", "../good", "a/b", "x" * 65, "ünï", "-lead", "good\n", "a b", ".hidden"]),
    st.text(min_size=1, max_size=70).filter(lambda s: not s.isascii() or not s.replace("_", "").isalnum()),
)
bad_images = st.one_of(
    st.integers(), st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    st.binary(max_size=64),  # not an image
    st.builds(lambda b: _png()[: max(1, len(b) % 60)], st.binary(max_size=60)),  # a truncated PNG
    st.sampled_from(["/no/such/image.png", "", "~/nope.jpg", "/"]),
)
good_demo = st.fixed_dictionaries({"input": st.text(max_size=20), "output": st.text(min_size=1, max_size=8).filter(str.strip)})
bad_demo = st.one_of(
    junk,
    st.fixed_dictionaries({"input": st.text(max_size=10)}),  # no output
    st.fixed_dictionaries({"input": st.text(max_size=10), "output": st.sampled_from(["", " ", "\n\t"])}),
    st.fixed_dictionaries({"input": junk, "output": st.text(min_size=1, max_size=4)}),
    st.fixed_dictionaries({"input": st.text(max_size=10), "output": st.just("x"),
                           "images": st.lists(bad_images, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"input": st.text(max_size=10), "output": st.just("x"), "images": junk.filter(lambda v: not isinstance(v, list))}),
)


@st.composite
def bad_skill_data(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "good", "instruction": draw(st.text(max_size=20)),
                            "demonstrations": draw(st.lists(good_demo, max_size=2))}
    flaw = draw(st.sampled_from(["name", "demo", "demos", "instruction", "extra_demo_field"]))
    if flaw == "name":
        data["name"] = draw(bad_names)
    elif flaw == "demo":
        data["demonstrations"] = [*data["demonstrations"], draw(bad_demo)]
    elif flaw == "demos":
        data["demonstrations"] = draw(junk.filter(lambda v: not isinstance(v, list) or v))
    elif flaw == "instruction":
        data["instruction"] = draw(junk.filter(lambda v: not isinstance(v, str)))
        data["demonstrations"].append({"input": "x", "output": "y", "images": [draw(bad_images)]})
    else:
        data["demonstrations"] = [{"input": "x", "output": "y", "images": [draw(bad_images)]}]
    return data


SKILL_ERRORS = (ValidationError, SkillError)


def _file_shaped(data: dict[str, Any]) -> bool:
    """Skill files whose demonstrations are objects with lists of image paths (other shapes: see the
    xfail below, a bug of Skill.from_file)."""
    demos = data.get("demonstrations")
    return isinstance(demos, list) and all(
        isinstance(d, dict) and isinstance(d.get("images", []), list) and all(isinstance(p, str | bytes) for p in d.get("images", []))
        for d in demos
    )


def _to_json(data: dict[str, Any]) -> str:
    try:
        return json.dumps(data, default=lambda o: base64.b64encode(o).decode() if isinstance(o, bytes) else str(o),
                          allow_nan=False)
    except ValueError:  # NaN and friends: the file is garbage then
        return "{not json"


def yaml_reads_a_good_skill(text: str) -> bool:
    try:
        Skill.model_validate(yaml.safe_load(text))
    except Exception:
        return False
    return True


@_settings(BUDGET["skills"])
@given(data=bad_skill_data(), as_file=st.sampled_from([None, ".json", ".jsonl", ".yaml"]))
def test_bad_skills_and_demonstrations(world: World, data: dict[str, Any], as_file: str | None) -> None:
    RAN["skills"] += 1
    reg: MemoryRegistry = world["reg"]

    def build_and_add() -> Skill:
        if as_file is None or not _file_shaped(data):
            skill = Skill.model_validate(data)
        else:
            path = world["root"] / f"bad{as_file}"
            text = _to_json(data)
            if as_file == ".jsonl" and text.startswith("{"):
                head = {k: v for k, v in data.items() if k != "demonstrations"}
                text = "\n".join([_to_json(head), *(_to_json(d) for d in data["demonstrations"])])
            # YAML reads some JSON numbers as text (PyYAML: 1e-12 has no dot, so it is the string
            # "1e-12"), which makes a valid name: that file is a good skill, not a bad one.
            assume(not (as_file == ".yaml" and yaml_reads_a_good_skill(text)))
            path.write_text(text)
            skill = Skill.from_file(path)
        return reg.add(skill)

    documented(build_and_add, SKILL_ERRORS)
    assert_store_intact(world)


def test_registry_add_refuses_what_is_not_a_skill(world: World) -> None:
    for thing in (None, {"name": "good"}, "good", 3):
        documented(lambda thing=thing: world["reg"].add(thing), (TypeError,))
    assert_store_intact(world)


@pytest.mark.parametrize("text", ['{"name": "x", "demonstrations": [[1, 2]]}', '{"name": "x", "demonstrations": 5}',
                                  '{"name": "x", "demonstrations": [{"input": "a", "output": "b", "images": 3}]}',
                                  '{"name": "x"}\n[1, 2]'], ids=["list-demo", "int-demos", "int-images", "jsonl-list"])
def test_skill_files_of_the_wrong_shape(tmp_path: Path, text: str) -> None:
    path = tmp_path / ("s.jsonl" if "\n" in text else "s.json")
    path.write_text(text)
    with pytest.raises(SkillError):
        Skill.from_file(path)


# ---- configs --------------------------------------------------------------------------------------------

bad_config = st.one_of(
    # a whole float >= 1 is a valid int in pydantic's lax mode (2.0 -> 2), so it is no bad input
    st.fixed_dictionaries({"demos_per_chunk": st.one_of(st.integers(max_value=0), junk.filter(
        lambda v: not isinstance(v, int) and not (isinstance(v, float) and v.is_integer() and v >= 1)))}),
    st.fixed_dictionaries({"keep_ratios": st.one_of(
        st.just(()), st.lists(st.floats(allow_nan=True), min_size=1, max_size=3).filter(
            lambda v: any(not (0 < r <= 1) for r in v) or v != sorted(v)),
        junk.filter(lambda v: not isinstance(v, list | tuple)))}),
    st.fixed_dictionaries({"delta": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.text(max_size=3))}),
    st.fixed_dictionaries({"pool_kernel": st.integers(max_value=0)}),
    st.fixed_dictionaries({"lookahead": st.integers(max_value=0)}),
    st.fixed_dictionaries({"search_scope": st.text(max_size=8).filter(lambda s: s not in ("answers", "exact"))}),
    st.fixed_dictionaries({"dtype": st.text(max_size=8).filter(lambda s: s != "auto")}),  # a model option now
    st.fixed_dictionaries({"storage_dtype": st.sampled_from(["int8", "float64", "", "fp16"])}),
    st.fixed_dictionaries({"prompt_format": st.text(max_size=6).filter(lambda s: s not in ("auto", "chat", "plain"))}),
    st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in EMLoCConfig.model_fields), junk, min_size=1, max_size=2),
)
def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# pydantic reads "0" or " 1" as a number for a numeric field (its lax mode, documented): not bad input
not_a_number = st.text(min_size=1, max_size=3).filter(lambda t: not _numeric(t))
bad_chat_params = st.one_of(
    st.fixed_dictionaries({"max_tokens": st.integers(max_value=0)}),
    st.fixed_dictionaries({"json_max_tokens": st.integers(max_value=0)}),
    st.fixed_dictionaries({"temperature": st.one_of(st.floats(max_value=-1e-6), st.just(float("nan")), not_a_number)}),
    st.fixed_dictionaries({"top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), st.just(float("nan")))}),
    st.fixed_dictionaries({"stop": junk.filter(lambda v: v is not None and not isinstance(v, list | str))}),
    st.fixed_dictionaries({"skill": st.integers()}),
    st.fixed_dictionaries({"allowed_local_image_dirs": st.one_of(
        st.lists(st.sampled_from(["/no/such/dir", __file__, "", " "]), min_size=1, max_size=2),
        junk.filter(lambda v: not isinstance(v, list)))}),
    st.fixed_dictionaries({"max_image_bytes": st.one_of(st.integers(max_value=0), not_a_number)}),
    st.fixed_dictionaries({"max_image_pixels": st.one_of(st.integers(max_value=0), st.none())}),
)


@_settings(BUDGET["configs"])
@given(cfg=bad_config, chat_params=bad_chat_params, which=st.sampled_from(["config", "registry", "chat"]))
def test_bad_configs(world: World, cfg: dict[str, Any], chat_params: dict[str, Any], which: str) -> None:
    RAN["configs"] += 1
    if which == "config":
        documented(lambda: EMLoCConfig(**cfg), (ValidationError,))
    elif which == "registry":
        bad = cfg if len(cfg) != 1 or "demos_per_chunk" not in cfg else EMLoCConfig.model_construct(**cfg).__dict__
        documented(lambda: MemoryRegistry(model=world["reg"].lm, store=world["store"], config=bad), (ValidationError,))
        documented(lambda: MemoryRegistry(model=world["reg"].lm, store=world["store"], config=[cfg]), (TypeError,))
    else:
        documented(lambda: EMLoCChatModel(registry=world["reg"], **chat_params), (ValidationError,))
    assert_store_intact(world)


# ---- chat messages, content blocks and call arguments -----------------------------------------------------

b64 = st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
broken_image_blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("image"), "base64": st.one_of(b64, st.text(max_size=12), st.integers(), st.none())}),
    st.fixed_dictionaries({"type": st.just("image"), "source_type": st.just("base64"), "data": st.one_of(b64, st.integers())}),
    st.fixed_dictionaries({"type": st.just("image"), "source": st.fixed_dictionaries(
        {"type": st.sampled_from(["base64", "url", "file", 3]), "data": b64, "url": st.text(max_size=10)})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": st.one_of(
            b64.map(lambda d: "data:image/png;base64," + d), b64.map(lambda d: "data:text/plain;base64," + d),
            st.just("data:image/png,rawnotbase64"), st.sampled_from(["http://x/y.png", "https://a.b/c.jpg"]),
            st.text(max_size=15).map(lambda p: "/no/such/" + p), st.integers(), st.none())}),
        st.text(max_size=10), st.none(), st.integers())}),
    st.fixed_dictionaries({"type": st.just("image"), "url": st.one_of(st.text(max_size=20), st.just("file:///no/such.png"))}),
    st.fixed_dictionaries({"type": st.just("image"), "file_id": st.text(min_size=1, max_size=8)}),
    st.fixed_dictionaries({"type": st.just("image")}),
    st.just({"type": "image", "base64": base64.b64encode(_png()[:30]).decode()}),  # truncated PNG
    # local files (real ones among them) with no directory allowed; images too large to decode
    st.sampled_from([__file__, "file://" + __file__, "/etc/passwd", "file:///etc/hostname", "~/.bashrc", "."]).flatmap(
        lambda p: st.sampled_from([{"type": "image", "path": p}, {"type": "image_url", "image_url": {"url": p}}])),
    st.sampled_from([(9000, 9000), (100_000, 100_000), (2**31 - 1, 1)]).map(
        lambda wh: {"type": "image", "base64": base64.b64encode(_png_header(*wh)).decode(), "mime_type": "image/png"}),
)
refused_blocks = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["audio", "input_audio", "file", "video", "document", "pdf", "input_file"]),
                           "base64": b64}),
    st.fixed_dictionaries({"type": st.text(max_size=10).filter(lambda t: t not in (
        "text", "image", "image_url", "tool_use", "tool_call", "tool_call_chunk", "thinking", "reasoning",
        "redacted_thinking", "server_tool_call", "server_tool_result", "invalid_tool_call"))}),
    st.fixed_dictionaries({"type": st.one_of(st.none(), st.integers())}),
    st.fixed_dictionaries({"text": st.text(max_size=5)}),  # no type
)
oversized = st.integers(min_value=1, max_value=3).map(lambda k: "token soup " * (4000 * k))


@st.composite
def bad_messages(draw: st.DrawFn) -> list[BaseMessage]:
    kind = draw(st.sampled_from(["broken_image", "refused", "oversized", "empty_list", "empty_text"]))
    text = HumanMessage(content=draw(st.text(max_size=20)))
    if kind == "broken_image":
        return [text, HumanMessage(content=[{"type": "text", "text": "see"}, draw(broken_image_blocks)])]
    if kind == "refused":
        return [SystemMessage(content="sys"), HumanMessage(content=["hi", draw(refused_blocks)])]
    if kind == "oversized":
        return [draw(st.sampled_from([HumanMessage, SystemMessage]))(content=draw(oversized))]
    if kind == "empty_list":
        return []
    # empty or blank text in assorted roles: odd but answerable
    blank = draw(st.sampled_from(["", " ", "\n", [], [{"type": "text", "text": ""}]]))
    cls = draw(st.sampled_from([HumanMessage, SystemMessage, AIMessage]))
    extra = [ToolMessage(content=blank, tool_call_id="t1")] if draw(st.booleans()) else []
    return [cls(content=blank), *extra]


bad_call_args = st.one_of(
    st.fixed_dictionaries({"skill": st.text(max_size=8).filter(lambda s: s not in ("good", ""))}),
    st.fixed_dictionaries({"max_tokens": st.one_of(st.integers(max_value=0), st.text(min_size=1, max_size=3), st.none())}),
    st.fixed_dictionaries({"temperature": st.one_of(st.floats(max_value=-1e-6), st.text(min_size=1, max_size=3), st.just(float("nan")))}),
    st.fixed_dictionaries({"top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.001, allow_infinity=False))}),
    st.fixed_dictionaries({"tool_choice": st.text(min_size=1, max_size=5).filter(lambda s: s not in ("auto", "any", "none", "required")),
                           "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])}),
    st.fixed_dictionaries({"tools": st.one_of(st.just([{"no": "function"}]), st.lists(st.integers(), min_size=1, max_size=2))}),
    st.fixed_dictionaries({"response_format": st.one_of(st.integers(), st.just({"type": "json_schema", "json_schema": 5}))}),
    st.dictionaries(st.sampled_from(["skil", "max_token", "temp", "stop_sequences", "foo"]), st.integers(), min_size=1, max_size=2),
)
CHAT_ERRORS = (UnsupportedContentError, ValueError, TypeError, UnknownSkillError)


@_settings(BUDGET["chat"])
@given(messages=bad_messages(), call=st.one_of(st.none(), bad_call_args), how=st.sampled_from(["invoke", "stream"]))
def test_bad_chat_input(world: World, messages: list[BaseMessage], call: dict[str, Any] | None, how: str) -> None:
    RAN["chat"] += 1
    chat: EMLoCChatModel = world["chat"]
    is_odd_only = call is None and messages and not any(
        isinstance(m.content, str) and len(m.content) > 1000 for m in messages
    ) and all(not isinstance(m.content, list) or all(isinstance(b, dict) and b.get("type") == "text" for b in m.content)
              for m in messages)
    kwargs = call or {}
    if how == "invoke":
        out = documented(lambda: chat.invoke(messages, skill="good", **kwargs) if "skill" not in kwargs
                         else chat.invoke(messages, **kwargs), CHAT_ERRORS, may_succeed=bool(is_odd_only))
    else:
        out = documented(lambda: list(chat.stream(messages, **kwargs)), CHAT_ERRORS, may_succeed=bool(is_odd_only))
    if not isinstance(out, BaseException):
        assert out is not None
    assert_store_intact(world)


# ---- memory files: the store's format, the registry's import, corrupt entries in the store ----------------


@st.composite
def corrupted(draw: st.DrawFn, good: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "spliced", "header"]))
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncated":
        return good[: draw(st.integers(min_value=0, max_value=len(good) - 1))]
    if kind == "flipped":
        data = bytearray(good)
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            i = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[i] ^= draw(st.integers(min_value=1, max_value=255))
        return bytes(data)
    if kind == "spliced":
        i = draw(st.integers(min_value=0, max_value=len(good)))
        return good[:i] + draw(st.binary(min_size=1, max_size=64)) + good[i:]
    # a well-formed safetensors file whose envelope is edited
    import struct

    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    env = json.loads(header["__metadata__"]["emloc"])
    field = draw(st.sampled_from(["num_layers", "layer_lengths", "sliding", "original_length", "format_version",
                                  "checksum", "header", "skill_json", "format", "next_position", "render_mode"]))
    value = draw(junk)
    if field == "skill_json":
        env["header"]["skill_json"] = draw(st.one_of(junk, st.text(max_size=30), st.just('{"name": "good"}'),
                                                   st.just('{"name": "x", "demonstrations": [{"input": 1}]}')))
    else:
        env[field] = value
    header["__metadata__"]["emloc"] = json.dumps(env, default=str)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + good[8 + n :]


def _data(world: World) -> st.SearchStrategy[bytes]:
    return corrupted(world["file"])


@_settings(BUDGET["memory_bytes"])
@given(data=st.data())
def test_corrupt_memory_bytes(world: World, data: st.DataObject) -> None:
    RAN["memory_bytes"] += 1
    raw = data.draw(_data(world))
    if raw == world["file"]:
        return
    out = documented(lambda: load_memory(raw), (MemoryFormatError,), may_succeed=True)
    if not isinstance(out, BaseException):  # a change that keeps the file valid (a timestamp digit, ...)
        assert read_info(raw)["checksum"] == read_info(world["file"])["checksum"]


@_settings(BUDGET["imports"])
@given(data=st.data())
def test_corrupt_memory_files_into_registry_import(world: World, data: st.DataObject) -> None:
    RAN["imports"] += 1
    raw = data.draw(_data(world))
    path: Path = world["root"] / "import.emloc"
    path.write_bytes(raw)
    out = documented(lambda: world["reg"].import_file(path), (MemoryFormatError, SkillError), may_succeed=True)
    if isinstance(out, BaseException):
        assert_store_intact(world)
    else:  # still a valid export (e.g. only the creation time changed): the same skill and memory
        assert out == world["good"]
        restore(world)


def restore(world: World) -> None:
    store = world["store"]
    store.mdelete([k for k in store.yield_keys() if k not in world["snapshot"]])
    store.mset(list(world["snapshot"].items()))


@_settings(BUDGET["stored"])
@given(data=st.data())
def test_corrupt_entries_in_the_store_are_rebuilt(world: World, data: st.DataObject) -> None:
    """A damaged memory in the store is logged, dropped and rebuilt; the good skill itself is untouched."""
    RAN["stored"] += 1
    reg: MemoryRegistry = world["reg"]
    key = reg.key("good")
    raw = data.draw(_data(world))
    world["store"].mset([(key, raw)])
    fresh = MemoryRegistry(model=reg.lm, store=world["store"], config=reg.config)
    with no_hang():
        mem = fresh.get("good")
    assert mem.original_length == reg.get("good").original_length
    assert fresh.skill("good") == world["good"]
    restore(world)


# ---- CLI arguments ------------------------------------------------------------------------------------------

words = st.text(alphabet=string.ascii_letters + string.digits + "-_./ ", max_size=12)
bad_models = st.sampled_from(["tiny-nope", "/no/such/model", "not/a/hub/id/x", "./missing.gguf", "tiny-llama"])


@st.composite
def bad_argv(draw: st.DrawFn, root: Path) -> list[str]:
    base = ["--cache-dir", str(root / "cli-cache")]
    if draw(st.booleans()):
        base = ["--model", draw(bad_models), *base]
    cmd = draw(st.sampled_from(["none", "unknown", "compress", "chat", "skills", "bench", "flags"]))
    if cmd == "none":
        return base
    if cmd == "unknown":
        return [*base, draw(words.filter(lambda w: w not in ("demo", "compress", "chat", "skills", "bench")))]
    if cmd == "flags":
        return [*base, draw(st.sampled_from(["--nope", "-x", "--model"]))]
    if cmd == "compress":
        target = draw(st.sampled_from(["missing", "garbage", "emptydir"]))
        path = root / f"cli-{target}"
        if target == "garbage":
            path = path.with_suffix(".json")
            path.write_bytes(draw(st.binary(max_size=40)))
        elif target == "emptydir":
            path.mkdir(exist_ok=True)
        return [*base, "compress", str(path)]
    if cmd == "chat":
        opts = draw(st.sampled_from([["--skill", "nope"], ["--max-tokens", "-3"], ["--max-tokens", "x"],
                                     ["--max-tokens", "0"], ["--skill"]]))
        return [*base, "chat", "hello", *opts]
    if cmd == "skills":
        action = draw(st.sampled_from([["info", "nope"], ["rm", "nope"], ["export", "nope", str(root / "x.emloc")],
                                       ["import", str(root / "cli-missing.emloc")], ["import", str(root / "cli-bad.emloc")],
                                       ["frobnicate"], [], ["info"]]))
        (root / "cli-bad.emloc").write_bytes(draw(st.binary(max_size=64)))
        return [*base, "skills", *action]
    # bench: always an unknown task or a malformed option
    opts = draw(st.lists(st.sampled_from([["--shots", "x,1"], ["--methods", "nope"], ["--limit", "many"],
                                          ["--scoring", "vibes"], ["--seeds", ""], ["--ratio", "lots"]]),
                         max_size=2))
    task = draw(st.sampled_from([["--task", "no-such-task"], ["--task", str(root / "no-task-dir")], []]))
    return ["bench", *task, *[x for o in opts for x in o], "--model", "tiny-llama", "--out", str(root / "bench-out")]


@_settings(BUDGET["cli"])
@given(data=st.data())
def test_bad_cli_arguments(world: World, data: st.DataObject, monkeypatch_stdin: None) -> None:
    from emloc_agents.cli import main

    RAN["cli"] += 1
    argv = data.draw(bad_argv(world["root"]))
    err = io.StringIO()
    with no_hang(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage + one error line, exit 2
            code = e.code
    text = err.getvalue()
    assert code not in (0, None), f"{argv} exited 0"
    assert "Traceback" not in text and "error" in text.lower(), (argv, text[-500:])
    assert_store_intact(world)


@pytest.fixture(scope="module")
def monkeypatch_stdin() -> Iterator[None]:
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO("")
    yield
    sys.stdin = old


def test_at_least_a_thousand_bad_inputs() -> None:
    assert sum(BUDGET.values()) >= 1000
    if set(RAN) != set(BUDGET):
        pytest.skip("counts only when the whole file runs")
    assert sum(RAN.values()) >= 1000, RAN
    print(f"bad inputs per surface: {dict(RAN)}, total {sum(RAN.values())}")
