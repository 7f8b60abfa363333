"""OpenAI messages and options -> LangChain messages and ``EMLoCChatModel`` call arguments, and the chat
model's replies -> OpenAI responses and stream chunks. The server reaches the model only through
these: it is a client of the LangChain layer."""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from .errors import APIError
from .schema import ChatCompletionRequest, Message, Usage

FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


def _content(m: Message, index: int) -> str | list[dict[str, Any]]:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    if m.role != "user" and any(p.type != "text" for p in m.content):
        raise APIError(400, f"messages[{index}]: only user messages may carry images", param=f"messages[{index}].content")
    return [p.model_dump(exclude_none=True) for p in m.content]


def _text(m: Message, index: int) -> str:
    content = _content(m, index)
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _arguments(raw: str, where: str) -> dict[str, Any]:
    try:
        args = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        raise APIError(400, f"{where}: arguments are not JSON: {e}", param=where) from e
    if not isinstance(args, dict):
        raise APIError(400, f"{where}: arguments must be a JSON object", param=where)
    return args


def to_langchain(messages: list[Message]) -> list[BaseMessage]:
    """OpenAI messages as LangChain messages; a tool message names its tool from the assistant call it
    answers (the chat templates show the tool's name)."""
    out: list[BaseMessage] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            out.append(SystemMessage(_text(m, i)))
        elif m.role == "user":
            out.append(HumanMessage(_content(m, i)))  # type: ignore[arg-type]
        elif m.role == "assistant":
            calls = []
            for j, c in enumerate(m.tool_calls or []):
                where = f"messages[{i}].tool_calls[{j}].function"
                calls.append({"name": c.function.name, "args": _arguments(c.function.arguments, where), "id": c.id,
                              "type": "tool_call"})
                call_names[c.id] = c.function.name
            out.append(AIMessage(content=_text(m, i), tool_calls=calls))
        else:  # tool
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}]: a tool message needs tool_call_id", param=f"messages[{i}].tool_call_id")
            out.append(ToolMessage(content=_text(m, i), tool_call_id=m.tool_call_id,
                                   name=m.name or call_names.get(m.tool_call_id)))
    return out


def call_arguments(req: ChatCompletionRequest) -> dict[str, Any]:
    """The request's decoding options as ``EMLoCChatModel`` call arguments (the skill is added by the
    caller); options left out keep the chat model's own defaults."""
    kw: dict[str, Any] = {}
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "stop"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.response_format is not None and req.response_format.type != "text":
        if req.tools:
            raise APIError(400, "response_format cannot be combined with tools", param="response_format")
        if req.response_format.type == "json_object":
            kw["response_format"] = {"type": "json_object"}
        else:
            spec = req.response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema",
                               param="response_format.json_schema")
            kw["response_format"] = {"type": "json_schema", "json_schema": {"name": spec.name, "schema": spec.schema_}}
    return kw


def tool_arguments(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """``bind_tools`` arguments (tools as OpenAI function specs, the choice, parallel calls), or None."""
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    choice: Any = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = choice.function.name
    specs: list[dict[str, Any]] = []
    for t in req.tools:
        function = t.function.model_dump(exclude_none=True)
        function.setdefault("parameters", {"type": "object", "properties": {}})
        specs.append({"type": "function", "function": function})
    names = [t.function.name for t in req.tools]
    if isinstance(choice, str) and choice not in ("auto", "none", "required") and choice not in names:
        raise APIError(400, f"tool_choice names {choice!r}, which is not one of the tools: {names}", param="tool_choice")
    kw: dict[str, Any] = {"tools": specs, "tool_choice": choice}
    if req.parallel_tool_calls is not None:
        kw["parallel_tool_calls"] = req.parallel_tool_calls
    return kw


def finish_reason(meta: dict[str, Any], has_calls: bool) -> str:
    if has_calls:
        return "tool_calls"
    reason = meta.get("finish_reason")
    return reason if reason in FINISH_REASONS else "stop"


def openai_tool_calls(message: AIMessage) -> list[dict[str, Any]]:
    return [{"id": c.get("id") or f"call_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
            for i, c in enumerate(message.tool_calls)]


def content_of(message: AIMessage) -> str:
    """The reply's text; a call the model wrote but nobody can read (``invalid_tool_calls``) comes back
    as the text it was, so the client sees what the model said."""
    text = message.content if isinstance(message.content, str) else "".join(
        b.get("text", "") if isinstance(b, dict) else str(b) for b in message.content)
    broken = [str(c.get("args") or "") for c in message.invalid_tool_calls]
    return "\n".join(t for t in [text, *broken] if t)


def usage_of(message: AIMessage) -> Usage:
    """OpenAI usage from LangChain's: the skill memory's tokens count as cached prompt tokens."""
    u = message.usage_metadata or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    cached = (u.get("input_token_details") or {}).get("cache_read", 0) or 0
    return Usage(prompt_tokens=u["input_tokens"], completion_tokens=u["output_tokens"], total_tokens=u["total_tokens"],
                 prompt_tokens_details={"cached_tokens": cached})  # type: ignore[arg-type]
