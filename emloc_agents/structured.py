"""Constrained decoding for tool calls and structured output, with llguidance.

A tool call is generated as one JSON object ``{"name": <tool>, "arguments": {...}}`` whose
``arguments`` follow that tool's JSON schema; structured output is generated straight from the
requested JSON schema. The grammar masks every token that cannot continue a valid document, so
even a 135M model produces parseable, schema-valid JSON.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import uuid
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from transformers import LogitsProcessor

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

_JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}  # compact JSON: no runaway whitespace on small models
_INT_BOUND = 10**15 - 1
_LLG_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LLG_LOCK = threading.Lock()
_TEMPLATE_TOOLS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


class StructuredOutputError(ValueError):
    """A schema or grammar that cannot be compiled, or output that cannot be constrained."""


def llg_tokenizer(tokenizer: Any) -> Any:
    """The llguidance view of a (fast) Hugging Face tokenizer, built once per tokenizer (~1 s)."""
    import llguidance.hf

    with _LLG_LOCK:
        tok = _LLG_TOKENIZERS.get(tokenizer)
        if tok is None:
            try:
                tok = llguidance.hf.from_tokenizer(tokenizer)
            except ValueError as e:
                raise StructuredOutputError(f"constrained decoding needs a fast tokenizer: {e}") from e
            _LLG_TOKENIZERS[tokenizer] = tok
        return tok


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks the logits to the tokens the grammar allows next. One instance per generation: it
    consumes the tokens appended since its last call (the first call sees the prompt only)."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher

        self.matcher = LLMatcher(llg_tokenizer(tokenizer), grammar)
        if self.matcher.is_error():
            raise StructuredOutputError(f"invalid grammar: {self.matcher.get_error()}")
        self._seen: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = int(input_ids.shape[1])
        if self._seen is None:
            self._seen = n
        elif n > self._seen:
            for t in input_ids[0, self._seen :].tolist():
                if not self.matcher.consume_token(int(t)):
                    raise StructuredOutputError(f"grammar rejected token {t}: {self.matcher.get_error()}")
            self._seen = n
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        vocab = scores.shape[-1]
        allowed = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
        m = min(vocab, len(bits))
        allowed[:m] = torch.from_numpy(bits[:m].astype(bool)).to(scores.device)
        if not bool(allowed.any()):
            raise StructuredOutputError(f"grammar allows no next token: {self.matcher.get_error()}")
        return cast(torch.FloatTensor, scores.masked_fill(~allowed, float("-inf")))


# ---- schemas and grammars ----------------------------------------------------------------------


def strip_titles(schema: Any) -> Any:
    """A copy of a JSON schema without "title" keys (shorter prompts; titles carry no constraint)."""
    if isinstance(schema, dict):
        return {k: strip_titles(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [strip_titles(v) for v in schema]
    return schema


def bound_strings(schema: Any, max_chars: int | None) -> Any:
    """A copy of a JSON schema made for generation: free strings (no maxLength/enum/const/pattern/
    format) get ``maxLength=max_chars`` and unbounded integers at most 15 digits (greedy small
    models otherwise repeat themselves until the token budget runs out; ``max_chars=None`` turns
    both bounds off), and objects with declared properties and no
    "additionalProperties" take no other keys."""
    if isinstance(schema, list):
        return [bound_strings(v, max_chars) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bound_strings(v, max_chars) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    types = out.get("type")
    if "properties" in out and "additionalProperties" not in out and (types in (None, "object")):
        out["additionalProperties"] = False  # the declared keys only, like OpenAI's strict mode
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    is_int = types == "integer" or (isinstance(types, list) and "integer" in types)
    if max_chars is not None and is_int and not any(k in out for k in ("enum", "const")):
        # integers likewise: at most 15 digits (a small model can repeat "1" forever)
        if not any(k in out for k in ("maximum", "exclusiveMaximum")):
            out["maximum"] = _INT_BOUND
        if not any(k in out for k in ("minimum", "exclusiveMinimum")):
            out["minimum"] = -_INT_BOUND
    if max_chars is not None and is_string and not any(k in out for k in ("maxLength", "enum", "const", "pattern", "format")):
        out["maxLength"] = max_chars
    return out


def _closed(params: dict[str, Any] | None) -> dict[str, Any]:
    """Tool arguments: an object; without an explicit "additionalProperties" no extra keys."""
    params = copy.deepcopy(params) if params else {}
    params.setdefault("type", "object")
    params.setdefault("properties", {})
    params.setdefault("additionalProperties", False)
    return strip_titles(params)


def tool_call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call ``{"name", "arguments"}`` to any of ``tools`` (OpenAI format)."""
    options = []
    for t in tools:
        fn = t["function"]
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": _closed(fn.get("parameters"))},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    return options[0] if len(options) == 1 else {"anyOf": options}


def json_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
    except Exception as e:  # noqa: BLE001 - llguidance raises plain ValueError/RuntimeError
        raise StructuredOutputError(f"unsupported JSON schema: {e}") from e


def tool_grammar(tools: Sequence[dict[str, Any]], required: bool, max_string_chars: int | None = None) -> str:
    """Either exactly one tool call (``required``) or, for ``auto``, one tool call or free text whose
    first non-blank character is not "{" (the model picks at its first non-blank token). Leading
    blanks are allowed before either: plain-rendered memories answer after a space, and a grammar
    that forbade it pushed models to odd first tokens."""
    from llguidance import LLMatcher

    schema = bound_strings(tool_call_schema(tools), max_string_chars)
    if required:
        return json_grammar(schema)
    options = json.dumps({**schema, "x-guidance": _JSON_DEFAULTS})
    lark = (f"start: call | BLANK call | TEXT\ncall: %json {options}\n"
            f"BLANK: /[ \\t\\r\\n]+/\nTEXT: /[ \\t\\r\\n]*[^{{ \\t\\r\\n](.|\\n)*/\n")
    try:
        return LLMatcher.grammar_from_lark(lark)
    except Exception as e:  # noqa: BLE001
        raise StructuredOutputError(f"cannot build the tool grammar: {e}") from e


def choice_grammar(options: Sequence[str]) -> str:
    """Exactly one of ``options`` (a skill's labels), after at most one blank: plain-rendered
    memories answer after a space. Once an option is complete only the end of the reply may follow
    (or the rest of a longer option that starts with it)."""
    from llguidance import LLMatcher

    if not options:
        raise StructuredOutputError("a choice needs at least one option")
    alternatives = " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
    try:
        return LLMatcher.grammar_from_lark(f'start: " "? ({alternatives})\n')
    except Exception as e:  # noqa: BLE001
        raise StructuredOutputError(f"cannot build the answer grammar: {e}") from e


# ---- prompts -------------------------------------------------------------------------------------


def _type_of(p: dict[str, Any]) -> str:
    if "type" in p:
        return p["type"] if isinstance(p["type"], str) else "|".join(p["type"])
    if "enum" in p:
        return "one of " + ", ".join(json.dumps(v) for v in p["enum"])
    for key in ("anyOf", "oneOf"):
        if key in p:
            return "|".join(_type_of(o) for o in p[key])
    return "any"


def describe_tools(tools: Sequence[dict[str, Any]], choice: str | None) -> str:
    """A concise system text for templates that ignore ``tools=``."""
    lines = ["You can call these tools:"]
    for t in tools:
        fn = t["function"]
        props = (fn.get("parameters") or {}).get("properties", {})
        args = ", ".join(f"{k}: {_type_of(v)}" for k, v in props.items())
        desc = (fn.get("description") or "").strip().splitlines()
        lines.append(f"- {fn['name']}({args})" + (f": {desc[0]}" if desc else ""))
    lines.append('To call a tool, reply with only a JSON object {"name": <tool name>, "arguments": {<argument>: <value>}}.')
    if choice == "required":
        lines.append("You must call a tool now.")
    elif choice not in (None, "auto"):
        lines.append(f"You must call the tool {choice} now.")
    return "\n".join(lines)


def describe_schema(schema: dict[str, Any]) -> str:
    return "Reply with only a JSON object that follows this JSON schema: " + json.dumps(
        strip_titles(schema), separators=(",", ":"), ensure_ascii=False
    )


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders ``tools=`` (SmolLM2's ChatML template ignores them)."""
    try:
        return _TEMPLATE_TOOLS[tokenizer]
    except (KeyError, TypeError):
        pass
    result = False
    if getattr(tokenizer, "chat_template", None):
        probe = [{"type": "function", "function": {"name": "zz_probe_tool", "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        msgs = [{"role": "user", "content": "hi"}]
        try:
            with_tools = tokenizer.apply_chat_template(msgs, tools=probe, tokenize=False, add_generation_prompt=True)
            result = "zz_probe_tool" in with_tools
        except Exception:  # noqa: BLE001 - a template that chokes on tools does not take them
            result = False
    with contextlib.suppress(TypeError):  # a tokenizer that cannot be weakly referenced
        _TEMPLATE_TOOLS[tokenizer] = result
    return result


# ---- parsing -------------------------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
