"""Tool calls in the model's own format (``tool_format``): a Hermes-style chat template (the
structure of Qwen2.5's, written here) on a tiny random model, so only the grammar and the
template decide what is generated and parsed. The real Qwen2.5-Coder runs in the slow tests."""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from emloc_agents import EMLoCChatModel, MemoryRegistry
from emloc_agents.messages import to_template_messages
from emloc_agents.tool_format import ToolFormat, parse_reply, tool_format

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{%- endif %}"
    "# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "For each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant{% if message.content %}\n{{ message.content }}{% endif %}"
    "{%- for tc in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def get_weather(location: str) -> str:
    """Get the weather for a location."""
    return "sunny"


@pytest.fixture(scope="module")
def hermes_chat() -> EMLoCChatModel:
    from emloc_agents.models.lm import LanguageModel
    from emloc_agents.models.tiny import tiny_model

    model, tok = tiny_model("qwen2", seed=1)
    tok.chat_template = HERMES_TEMPLATE
    registry = MemoryRegistry(model=LanguageModel(model, tok, "tiny-hermes"), cache_dir=tempfile.mkdtemp())
    return EMLoCChatModel(registry=registry, max_tokens=8, json_max_tokens=400, json_max_string_chars=8)


def _accepts(tokenizer: Any, grammar: str, text: str) -> tuple[bool, bool]:
    """(every token consumed, the grammar accepts the text as complete)."""
    from llguidance import LLMatcher

    from emloc_agents import structured as st

    matcher = LLMatcher(st.llg_tokenizer(tokenizer), grammar)
    consumed = all(matcher.consume_token(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    return consumed, consumed and matcher.is_accepting()


def test_format_comes_from_the_chat_template(hermes_chat: EMLoCChatModel, tiny_llama) -> None:
    assert tool_format(hermes_chat.get_registry().lm.tokenizer) == ToolFormat("hermes")
    assert tool_format(tiny_llama.tokenizer) == ToolFormat("json")  # ChatML without tools


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@pytest.mark.parametrize(("text", "required", "parallel", "ok"), [
    (CALL, False, True, True),
    (CALL + "\n" + CALL, False, True, True),  # several calls in one turn ...
    (CALL + "\n" + CALL, False, False, False),  # ... unless parallel_tool_calls=False
    ("\n".join([CALL] * 5), False, True, False),  # at most MAX_PARALLEL_CALLS
    (CALL.removesuffix("\n</tool_call>"), False, True, True),  # the closing tag may end the turn unwritten
    (CALL.removesuffix("</tool_call>") + CALL, False, True, True),  # ... also between calls
    ('```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```', False, True, True),  # fences: text, parsed after
    ('```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```', True, True, False),  # a forced call is tagged
    ("It is three.", False, True, True),  # auto: text ...
    ("It is three.", True, True, False),  # ... but not when a call is required
    ('<tool_call>\n{"name": "add", "arguments": {"a": "one", "b": 2}}\n</tool_call>', False, True, False),  # schema
    ('<tool_call>\n{"name": "sub", "arguments": {}}\n</tool_call>', False, True, False),  # unbound tool
    ('<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>', False, True, False),  # the template's separators
])
def test_hermes_grammar(hermes_chat: EMLoCChatModel, text: str, required: bool, parallel: bool, ok: bool) -> None:
    tok = hermes_chat.get_registry().lm.tokenizer
    grammar = ToolFormat("hermes").grammar([convert_to_openai_tool(add)], required=required, parallel=parallel,
                                           max_string_chars=None)
    assert _accepts(tok, grammar, text)[1] == ok


NAMES = ["add", "get_weather"]


def test_parse_hermes_blocks() -> None:
    two = parse_reply(CALL + "\n" + CALL.replace('"a": 1', '"a": 5'), NAMES, ToolFormat("hermes"))
    assert [c["args"] for c in two.tool_calls] == [{"a": 1, "b": 2}, {"a": 5, "b": 2}] and two.content == ""
    assert len({c["id"] for c in two.tool_calls}) == 2
    broken = parse_reply('Let me check.\n<tool_call>\n{"name": "add", "argu', NAMES, ToolFormat("hermes"))
    assert broken.content == "Let me check." and not broken.tool_calls
    assert broken.invalid_tool_calls[0]["args"].startswith('{"name": "add"')
    unclosed = parse_reply(CALL.removesuffix("</tool_call>") + CALL.removesuffix("</tool_call>"), NAMES, ToolFormat("hermes"))
    assert [c["name"] for c in unclosed.tool_calls] == ["add", "add"] and not unclosed.invalid_tool_calls


def test_parse_wrappings_small_models_emit() -> None:
    hermes = ToolFormat("hermes")
    fenced = '```json\n{"name": "get_weather", "arguments": {"location": "Oslo"}}\n```'
    r = parse_reply(fenced, NAMES, hermes)
    assert r.tool_calls[0]["name"] == "get_weather" and r.tool_calls[0]["args"] == {"location": "Oslo"} and r.content == ""
    params = parse_reply('{"name": "add", "parameters": {"a": 1, "b": 2}}', NAMES, hermes)
    assert params.tool_calls[0]["args"] == {"a": 1, "b": 2}
    code = 'Here is JSON:\n```json\n{"name": "Ann", "age": 3}\n```'  # JSON that names no bound tool stays text
    assert parse_reply(code, NAMES, hermes).content == code and not parse_reply(code, NAMES, hermes).tool_calls
    data = '{"name": "Ann", "age": 3}'  # a whole reply of JSON data stays text
    assert parse_reply(data, NAMES, hermes).content == data
    # a call of a tool that is not bound: reported as an invalid call, never content
    unbound = parse_reply('{"name": "cat joke", "arguments": {}}', NAMES, hermes)
    assert unbound.content == "" and not unbound.tool_calls
    assert "unknown tool 'cat joke'" in unbound.invalid_tool_calls[0]["error"]
    # the tool's name under another key: still written as a call, so an invalid call
    renamed = parse_reply('{"type": "add", "arguments": {"a": 1}}', NAMES, hermes)
    assert renamed.content == "" and not renamed.tool_calls and renamed.invalid_tool_calls
    assert parse_reply('{"type": "description"}', NAMES, hermes).content == '{"type": "description"}'
    # the json format's grammar forces a call after "{": a broken one is an invalid call, not text
    assert parse_reply('{"name": "add", "argu', NAMES, ToolFormat("json")).invalid_tool_calls


def test_parse_calls_written_as_template_examples_and_cut_short() -> None:
    hermes = ToolFormat("hermes")
    # Qwen2.5's template shows its call example in doubled braces; models copy them
    doubled = parse_reply('{{"name": "get_weather", "arguments": {"location": "Oslo"}}}', NAMES, hermes)
    assert doubled.tool_calls[0]["name"] == "get_weather" and doubled.tool_calls[0]["args"] == {"location": "Oslo"}
    assert doubled.content == ""
    cut = parse_reply('{"name": "add", "arguments": {"a": 1, "b": 2}', NAMES, hermes)  # the last brace left out
    assert cut.tool_calls[0]["args"] == {"a": 1, "b": 2}
    broken = parse_reply('{"name": "add", "arguments": {"a": 1,, }', NAMES, hermes)
    assert broken.content == "" and not broken.tool_calls
    assert broken.invalid_tool_calls[0]["args"].startswith('{"name": "add"')
    assert broken.invalid_tool_calls[0]["error"].startswith("not JSON")


def test_template_messages_keep_calls_and_tool_role(hermes_chat: EMLoCChatModel) -> None:
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}
    msgs = [SystemMessage("Be brief."), HumanMessage("What is 1 + 2?"), HumanMessage("Use the tool."),
            AIMessage("", tool_calls=[call]), ToolMessage("3", tool_call_id="call_1", name="add")]
    out = to_template_messages(msgs)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[1]["content"] == "What is 1 + 2?\nUse the tool."
    assert out[2]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}
    tools = [convert_to_openai_tool(add)]
    text = hermes_chat.get_registry().lm.tokenizer.apply_chat_template(out, tools=tools, tokenize=False,
                                                                        add_generation_prompt=True)
    assert CALL in text and "<tool_response>\n3\n</tool_response>" in text and "Be brief." in text


@pytest.mark.parametrize("parallel", [None, False])
def test_forced_calls_in_the_native_format(hermes_chat: EMLoCChatModel, parallel: bool | None) -> None:
    """A random-weight model: only the grammar makes its calls valid, in the template's format."""
    bound = hermes_chat.bind_tools([add, get_weather], tool_choice="any", parallel_tool_calls=parallel)
    r = bound.invoke("What is 1 + 2?")
    assert r.tool_calls and not r.invalid_tool_calls and r.response_metadata["finish_reason"] == "tool_calls"
    if parallel is False:
        assert len(r.tool_calls) == 1
    for c in r.tool_calls:
        schema = {"add": {"a", "b"}, "get_weather": {"location"}}[c["name"]]
        assert set(c["args"]) == schema
    streamed = None
    for chunk in bound.stream("What is 1 + 2?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in r.tool_calls]
    prompt = hermes_chat._prepare([HumanMessage("What is 1 + 2?")], None,
                                  {"tools": [convert_to_openai_tool(add)], "tool_choice": "any"})
    assert "<tools>" in hermes_chat.get_registry().lm.tokenizer.decode(prompt.ids)


def test_bad_parallel_argument(hermes_chat: EMLoCChatModel) -> None:
    with pytest.raises(ValueError, match="parallel_tool_calls"):
        hermes_chat.bind_tools([add], parallel_tool_calls="yes").invoke("hi")


def test_json_calls_round_trip_through_the_template(hermes_chat: EMLoCChatModel) -> None:
    """A call and its result go back to the model as the template writes them (not as user text)."""
    bound = hermes_chat.bind_tools([add], tool_choice="add")
    first = bound.invoke([HumanMessage("What is 1 + 2?")])
    result = ToolMessage(json.dumps(3), tool_call_id=first.tool_calls[0]["id"], name="add")
    p = hermes_chat._prepare([HumanMessage("What is 1 + 2?"), first, result], None,
                             {"tools": [convert_to_openai_tool(add)], "tool_choice": "auto"})
    text = hermes_chat.get_registry().lm.tokenizer.decode(p.ids)
    assert "<tool_response>\n3\n</tool_response>" in text and '"name": "add"' in text


def test_tool_call_bench_scoring() -> None:
    from emloc_agents.bench.tool_calls import args_match, load_requests

    assert args_match({"a": 12, "b": 7}, {"a": 7.0, "b": 12}, unordered=["a", "b"])
    assert not args_match({"a": 12, "b": 7}, {"a": 7, "b": 7}, unordered=["a", "b"])
    assert args_match({"location": ["san francisco"]}, {"location": "San Francisco, CA"})
    assert not args_match({"location": ["san francisco"]}, {"location": "Oslo"})
    assert not args_match({"minutes": 10}, {"minutes": "ten"}) and not args_match({"minutes": 10}, {})
    requests = load_requests()
    assert sum(bool(r["tool"]) for r in requests) >= 12 and sum(not r["tool"] for r in requests) >= 8


def test_tool_call_bench_runs(hermes_chat: EMLoCChatModel) -> None:
    from emloc_agents.bench.tool_calls import evaluate, load_requests, markdown

    requests = [r for r in load_requests() if r["tool"]][:2] + [r for r in load_requests() if not r["tool"]][:1]
    short = EMLoCChatModel(registry=hermes_chat.get_registry(), max_tokens=4, json_max_tokens=60, json_max_string_chars=8)
    res = evaluate(short, requests)
    assert (res["need_tool"], res["need_none"], len(res["replies"])) == (2, 1, 3)
    assert res["right_args"] <= res["right_tool"] <= res["calls"] <= 2 and res["forced_right_tool"] <= 2
    tools = {"get_weather", "multiply", "convert_currency", "set_timer"}
    assert all(r["forced_call"] is None or r["forced_call"]["name"] in tools for r in res["replies"][:2])
    assert "| tiny |" in markdown({"tiny": res})


def test_hermes_tags_as_added_tokens() -> None:
    """Qwen2.5 has <tool_call> and </tool_call> as single added tokens, which llguidance does not
    match as the bytes of a quoted string: the grammar names the tokens (a string literal here
    rejected the model's own tag token, seen on the real model)."""
    from emloc_agents.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    ids = tok(CALL, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<tool_call>")
    tools = [convert_to_openai_tool(add)]
    for required in (True, False):
        grammar = ToolFormat("hermes").grammar(tools, required=required, parallel=True, max_string_chars=None, tokenizer=tok)
        assert "<[" in grammar and _accepts(tok, grammar, CALL) == (True, True)


def test_demo_agent_loop_runs_on_a_native_format(hermes_chat: EMLoCChatModel, tiny_llama, capsys, tmp_path) -> None:
    from emloc_agents.cli import AGENT_REQUESTS, _agent_demo, demo_skills

    reg = hermes_chat.get_registry()
    for s in demo_skills():
        reg.add(s)
    _agent_demo(reg)
    out = capsys.readouterr().out
    assert out.count("user: ") == len(AGENT_REQUESTS) and out.count("assistant: ") >= 1
    _agent_demo(MemoryRegistry(model=tiny_llama, cache_dir=tmp_path))  # no format of its own: said, not run
    assert "skipped" in capsys.readouterr().out


def test_call_looking_text_gets_the_call_budget() -> None:
    """Under auto, a hermes reply that opens like a call (tag, bare object, ```json fence) is not cut
    at the text's max_tokens (it would never parse); other text keeps the caller's limits."""
    from emloc_agents.chat_model import _text_reply_limits

    limits = _text_reply_limits(["\n\n"], max_tokens=4, fmt=ToolFormat("hermes"))
    for lead in ("``", "```json\n{\"name\": \"add\",\n\n", "{\"name\":", "<tool_call>\n{"):
        assert limits(lead, 99) is None, lead
    assert limits("```python\nprint(1)", 4) == (len("```python\nprint(1)"), "length")
    assert limits("It is three.\n\nAlso", 2) == (len("It is three."), "stop")


def test_tool_choice_none_keeps_the_native_form_and_rules_out_calls(hermes_chat: EMLoCChatModel) -> None:
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}
    msgs = [HumanMessage("What is 1 + 2?"), AIMessage("", tool_calls=[call]), ToolMessage("3", tool_call_id="call_1")]
    bound = hermes_chat.bind_tools([add], tool_choice="none")
    p = hermes_chat._prepare(msgs, None, dict(bound.kwargs))
    text = hermes_chat.get_registry().lm.tokenizer.decode(p.ids)
    assert "<tool_response>\n3\n</tool_response>" in text and "<tools>" in text and p.mode == "text"
    grammar = ToolFormat("hermes").no_call_grammar()
    tok = hermes_chat.get_registry().lm.tokenizer
    for reply, ok in [("It is 3.", True), ('{"name": "add"}', False), ("<tool_call>", False),
                      ("```json\n{}", False), ("```python\nprint(3)\n```", True)]:
        assert _accepts(tok, grammar, reply)[1] == ok, reply
    r = bound.invoke(msgs)
    assert not r.tool_calls and not str(r.content).lstrip().startswith(("{", "<"))


def test_a_call_already_answered_in_the_conversation_counts_as_a_repeat(hermes_chat: EMLoCChatModel) -> None:
    """Under tool_choice="auto" a reply whose calls were all made and answered before is a repeat (the
    model is then asked to answer instead); a new call, or one without a result yet, is not."""
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}
    msgs = [HumanMessage("What is 1 + 2?"), AIMessage("", tool_calls=[call]), ToolMessage("3", tool_call_id="call_1")]
    p = hermes_chat._prepare(msgs, None, dict(hermes_chat.bind_tools([add]).kwargs))
    assert p.choice == "auto" and p.answered == {("add", '{"a": 1, "b": 2}')}

    def reply(*calls: dict[str, Any]) -> AIMessage:
        return AIMessage("", tool_calls=[{"name": "add", "args": a, "id": f"c{i}"} for i, a in enumerate(calls)])

    assert p.repeats(reply({"b": 2, "a": 1}))  # the same arguments in another order
    assert not p.repeats(reply({"a": 1, "b": 3})) and not p.repeats(reply({"a": 1, "b": 2}, {"a": 5, "b": 5}))
    assert not p.repeats(AIMessage("3"))
    unanswered = hermes_chat._prepare(msgs[:2], None, dict(hermes_chat.bind_tools([add]).kwargs))
    assert not unanswered.repeats(reply({"a": 1, "b": 2}))
    forced = hermes_chat._prepare(msgs, None, dict(hermes_chat.bind_tools([add], tool_choice="add").kwargs))
    assert not forced.repeats(reply({"a": 1, "b": 2}))  # a forced call is the caller's choice
