"""LangChain messages -> the turns a chat template reads: text and images per message, roles merged,
earlier tool calls and results written the way the model's format expects (``to_turns`` for plain
templates, ``to_template_messages`` for templates that render tools themselves)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, SystemMessage, ToolMessage

from .images import ImagePolicy, UnsupportedContentError, image_of_block

__all__ = ["STRICT_IMAGES", "content_parts", "to_template_messages", "to_turns", "with_system"]

STRICT_IMAGES = ImagePolicy()
"""Messages' images when no local directory is allowed: base64 and data: URLs only."""
_SKIPPED_BLOCKS = {"tool_use", "tool_call", "tool_call_chunk", "thinking", "reasoning", "redacted_thinking",
                   "server_tool_call", "server_tool_result", "invalid_tool_call"}
_REFUSED_BLOCKS = {"audio", "input_audio", "file", "video", "document", "pdf", "input_file"}


def content_parts(message: BaseMessage, images: ImagePolicy = STRICT_IMAGES) -> tuple[str, list[Any]]:
    """The text of a message and its images (PIL, read under ``images``: no local files unless it
    allows their directory). Audio, PDF and other file blocks raise."""
    content = message.content
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    found: list[Any] = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind in ("image", "image_url"):
            found.append(image_of_block(block, images))
        elif kind in _SKIPPED_BLOCKS:
            continue  # tool calls are rendered from message.tool_calls; reasoning is not replayed
        elif kind in _REFUSED_BLOCKS:
            raise UnsupportedContentError(f"content blocks of type {kind!r} are not supported (text and images only)")
        else:
            raise UnsupportedContentError(f"unsupported content block type {kind!r} (text and images only)")
    return "".join(texts), found


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ChatMessage) and message.role in ("system", "assistant", "user"):
        return message.role
    return "user"  # human, tool results (small chat templates have no tool role), others


def _call_text(call: Mapping[str, Any]) -> str:
    return json.dumps({"name": call["name"], "arguments": call.get("args", {})}, ensure_ascii=False)


def to_turns(messages: Sequence[BaseMessage], images: ImagePolicy = STRICT_IMAGES) -> list[dict[str, Any]]:
    """LangChain messages -> ``{"role", "content", "images"}`` turns, merging consecutive same-role
    messages (images read under ``images``). Tool calls of AI messages are written as the JSON the
    model is asked to produce."""
    turns: list[dict[str, Any]] = []
    for m in messages:
        role = _role(m)
        text, pictures = content_parts(m, images)
        if isinstance(m, AIMessage) and m.tool_calls:
            text = "\n".join([text] * bool(text) + [_call_text(c) for c in m.tool_calls])
        if isinstance(m, ToolMessage):
            status = " (error)" if getattr(m, "status", "success") == "error" else ""
            text = f"Tool result{status} ({m.name or m.tool_call_id}): {text}"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = "\n".join(t for t in (turns[-1]["content"], text) if t)
            turns[-1]["images"].extend(pictures)
        else:
            turns.append({"role": role, "content": text, "images": pictures})
    if not turns:
        raise ValueError("no messages to answer")
    return turns


def to_template_messages(messages: Sequence[BaseMessage], images: ImagePolicy = STRICT_IMAGES) -> list[dict[str, Any]]:
    """LangChain messages as a tool-aware chat template reads them (``ToolFormat.native``): assistant
    turns keep their ``tool_calls`` and tool results keep the tool role, so the model sees earlier
    calls and results in the format it was trained on. Consecutive plain messages of one role merge."""
    out: list[dict[str, Any]] = []
    for m in messages:
        text, pictures = content_parts(m, images)
        if pictures:
            raise UnsupportedContentError("images cannot be sent with tools to this model's chat template")
        if isinstance(m, ToolMessage):
            out.append({"role": "tool", "content": text, "name": m.name or ""})
        elif isinstance(m, AIMessage) and m.tool_calls:
            out.append({"role": "assistant", "content": text, "tool_calls": [
                {"type": "function", "id": c.get("id"), "function": {"name": c["name"], "arguments": c.get("args", {})}}
                for c in m.tool_calls]})
        elif out and out[-1]["role"] == _role(m) and "tool_calls" not in out[-1] and out[-1]["role"] != "tool":
            out[-1]["content"] = "\n".join(t for t in (out[-1]["content"], text) if t)
        else:
            out.append({"role": _role(m), "content": text})
    if not out:
        raise ValueError("no messages to answer")
    return out


def with_system(turns: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    turns = [dict(t) for t in turns]
    if turns[0]["role"] == "system":
        turns[0]["content"] = (turns[0]["content"] + "\n\n" + text).strip()
    else:
        turns.insert(0, {"role": "system", "content": text, "images": []})
    return turns
