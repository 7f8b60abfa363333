"""How a model writes tool calls: its own format when its chat template declares one, else plain JSON.

Two formats, chosen from the chat template (``tool_format``):

- ``hermes``: templates that render ``tools=`` and ask for ``<tool_call>{"name", "arguments"}</tool_call>``
  (Qwen2.5, Hermes and their fine-tunes). The prompt is the template's own: tools in its system turn,
  earlier calls as ``tool_calls`` of assistant turns, results in its tool role. Several tagged calls
  may follow one another in one turn. Small models also write calls as a ```json fence or a bare
  object: those are read from the text when they name a bound tool.
- ``json``: every other model: one bare ``{"name", "arguments"}`` object, tools described in the
  system text (``structured.describe_tools``).

Both are generated under a grammar (``structured``): under ``tool_choice="auto"`` the model chooses
text or calls at its first non-blank token, and a call's arguments always match the bound tool's
schema (hermes: the tagged calls; ``parse_reply`` reads the other wrappings from the text).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from . import structured as st

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
# the separators of the templates' ``tojson``: calls look like the ones the model was trained on
_HERMES_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 4  # a turn's calls stay within the JSON token budget even if a model never stops calling
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)
_HERMES_BLOCK = re.compile(
    re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|(?=" + re.escape(HERMES_OPEN) + r")|$)", re.S)


@dataclass(frozen=True)
class ToolFormat:
    """The tool-call format of one tokenizer's chat template."""

    name: Literal["json", "hermes"]

    @property
    def native(self) -> bool:
        """The chat template renders tools, calls and results itself."""
        return self.name == "hermes"

    def grammar(self, tools: Sequence[dict[str, Any]], required: bool, parallel: bool,
                max_string_chars: int | None, tokenizer: Any = None) -> str:
        """Calls to ``tools`` (one, or up to ``MAX_PARALLEL_CALLS`` when ``parallel``), or under ``auto``
        also free text. ``tokenizer``: where the tags are single added tokens (Qwen2.5), the grammar
        names those tokens; llguidance does not match them as the bytes of a string."""
        if self.name == "json":
            return st.tool_grammar(tools, required=required, max_string_chars=max_string_chars)
        schema = json.dumps({**st.bound_strings(st.tool_call_schema(tools), max_string_chars), "x-guidance": _HERMES_JSON})
        tagged = f'tagged ("\\n" tagged){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "tagged"
        lark = (f"start: {tagged}{'' if required else ' | TEXT'}\n"
                # the closing tag may be left out at the end of the turn: Qwen2.5-Coder-0.5B ends its turn
                # right after the JSON (P(<|im_end|>) is its top choice there); forcing the tag made it
                # go on and repeat the call until the limit
                f'tagged: {_tag(tokenizer, HERMES_OPEN)} "\\n" %json {schema} ("\\n" {_tag(tokenizer, HERMES_CLOSE)})?\n'
                # text may not start with "<" where the tag is text. Fenced or bare JSON stays text here
                # and is read by parse_reply when it names a bound tool: constraining those wrappings
                # too forced invented calls onto bound tools (false calls 4/9 against 1/9, same right
                # calls, docs/benchmarks.md)
                "TEXT: /[ \\t\\r\\n]*[^< \\t\\r\\n](.|\\n)*/\n")
        from llguidance import LLMatcher

        try:
            return LLMatcher.grammar_from_lark(lark)
        except Exception as e:  # noqa: BLE001 - llguidance raises plain ValueError/RuntimeError
            raise st.StructuredOutputError(f"cannot build the tool grammar: {e}") from e

    def no_call_grammar(self) -> str:
        """``tool_choice="none"`` on a model that writes calls as text too: a reply that cannot open a
        call ("<", "{" or a ```json fence), so it answers instead (after a tool result, Qwen2.5-Coder-0.5B
        repeats its call as JSON text at 98 % otherwise)."""
        from llguidance import LLMatcher

        return LLMatcher.grammar_from_lark(
            "start: TEXT\n"
            "TEXT: /[ \\t\\r\\n]*([^<{` \\t\\r\\n]|`[^`]|``[^`]|```[^j]|```j[^s]|```js[^o]|```jso[^n])(.|\\n)*/\n")

    def starts_call(self, text: str) -> bool:
        """Whether a reply beginning with ``text`` may be a call: it gets the calls' token budget
        (``json_max_tokens``) rather than the text's stops and ``max_tokens``. json: "{" (its grammar
        makes that a call); hermes: the tag, or a bare object or ```json fence (read by
        ``parse_reply``). Undecided prefixes count."""
        lead = text.lstrip()
        if self.name == "json":
            return lead.startswith("{")
        return lead.startswith(("<", "{", "```json")) or (lead != "" and "```json".startswith(lead))

    def may_hold_call(self, text: str) -> bool:
        """A reply that may carry calls and must be read whole before any of it is streamed: a call,
        or a text reply that opens with a code fence or a JSON object (``parse_reply``)."""
        return self.starts_call(text) or text.lstrip().startswith(("`", "{"))


def _tag(tokenizer: Any, tag: str) -> str:
    """A lark reference to ``tag``: its token (``<[id]>``) where the tokenizer has it as one added
    token, else the quoted string."""
    added: dict[str, int] = getattr(tokenizer, "get_added_vocab", dict)() if tokenizer is not None else {}
    return f"<[{added[tag]}]>" if tag in added else json.dumps(tag)


def tool_format(tokenizer: Any) -> ToolFormat:
    """``hermes`` when the chat template renders ``tools=`` and asks for ``<tool_call>`` tags, else ``json``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and HERMES_OPEN in template and st.template_takes_tools(tokenizer):
        return ToolFormat("hermes")
    return ToolFormat("json")


# ---- parsing ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    """A generated reply split into its text and its tool calls (LangChain dicts)."""

    content: str
    tool_calls: list[dict[str, Any]]
    invalid_tool_calls: list[dict[str, Any]]


_CALL_START = re.compile(r'^\{+\s*"name"\s*:')


def _loads_call(payload: str) -> Any:
    """JSON of a call as small models write it: as is; with the doubled braces of Qwen2.5's template
    example (``{{"name": ..., "arguments": {...}}}``); or with closing braces missing at the end."""
    candidates = [payload]
    if payload.startswith("{{"):
        inner = payload[1:]
        candidates.append(inner[:-1] if inner.endswith("}}") else inner)
    error: ValueError | None = None
    for text in candidates:
        missing = text.count("{") - text.count("}")
        for attempt in (text, text + "}" * missing) if 0 < missing <= 2 else (text,):
            try:
                return json.loads(attempt)
            except ValueError as e:
                error = error or e
    assert error is not None
    raise error


def _call_from(payload: str, names: Sequence[str] | None) -> tuple[dict[str, Any] | None, str | None]:
    """(call, error) from one JSON payload ``{"name", "arguments"}``; ``names``: only calls of these
    tools count (None: any name)."""
    try:
        data = _loads_call(payload)
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None, "a call is a JSON object with a string 'name'"
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        with contextlib.suppress(ValueError):
            args = json.loads(args)
    if not isinstance(args, dict):
        return None, "'arguments' must be an object"
    if names is not None and data["name"] not in names:
        return None, f"unknown tool {data['name']!r}; bound tools: {list(names)}"
    return {"type": "tool_call", "name": data["name"], "args": args, "id": st.new_call_id()}, None


def parse_reply(text: str, tool_names: Sequence[str], fmt: ToolFormat) -> Reply:
    """Split a reply into text and calls. Read, in this order: ``<tool_call>`` blocks (a block whose
    JSON is broken is an invalid call); the json format's bare call (its grammar forces a call when
    the reply opens with "{", so a broken one is an invalid call); else fenced JSON blocks and a
    whole reply that is one JSON object, when they name a bound tool (other JSON stays text: a
    coding model writes JSON too). Doubled braces and missing closing braces are read as calls
    (``_loads_call``); a reply that opens like a call (``{"name":``) but is none is an invalid call."""
    text = text.strip()
    if HERMES_OPEN in text:
        calls, invalid = [], []
        for block in _HERMES_BLOCK.finditer(text):
            call, error = _call_from(block.group(1).strip(), None)
            if call is not None:
                calls.append(call)
            else:
                invalid.append(_invalid(block.group(1).strip(), error))
        return Reply(_HERMES_BLOCK.sub("", text).strip(), calls, invalid)
    if text.startswith("{"):
        call, error = _call_from(text, None if fmt.name == "json" else tool_names)
        if call is not None:
            return Reply("", [call], [])
        if fmt.name == "json" or _meant_as_call(text):  # reported as a call, never content
            return Reply("", [], [_invalid(text, error)])
    calls = []
    kept = []  # fenced blocks that are not calls stay in the text
    for block in _FENCE.finditer(text):
        call, _ = _call_from(block.group(1).strip(), tool_names)
        if call is not None:
            calls.append(call)
        else:
            kept.append(block.group(0))
    if calls:
        return Reply(_FENCE.sub(lambda b: b.group(0) if b.group(0) in kept else "", text).strip(), calls, [])
    return Reply(text, [], [])


def _meant_as_call(text: str) -> bool:
    """A reply written as a call that is none: an object with arguments (an unknown tool, or the
    tool's name under another key, as in ``{"type": "sentiment", "arguments": ...}``), or text that
    opens like a call (``{"name":``) but is not JSON. Other JSON is text."""
    try:
        data = _loads_call(text)
    except ValueError:
        return bool(_CALL_START.match(text))
    return isinstance(data, dict) and ("arguments" in data or "parameters" in data)


def _invalid(args: str, error: str | None) -> dict[str, Any]:
    return {"type": "invalid_tool_call", "name": None, "args": args, "id": st.new_call_id(), "error": error}
