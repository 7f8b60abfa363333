"""The LangChain model profile of an EMLoCChatModel: what ``create_agent`` and its middleware read to
choose how to drive a model (context size, tool calling, image inputs), known without loading it.

``tool_calling`` is True where the model's chat template has a tool-call format of its own (Qwen2.5's
``<tool_call>``): such a model decides by itself when to call. A model without one (SmolLM2, Gemma-3
270M) is False: it calls a tool when the call is forced (``tool_choice``, True on every model: calls are
decoded under a grammar) but does not call one unforced. ``structured_output`` is False: it tells
``create_agent(response_format=...)`` to ask for the schema as a forced tool call (its ToolStrategy),
which this model decodes under the schema's grammar; a native response format is not combined with
tools in one reply here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import ModelProfile

if TYPE_CHECKING:
    from .models.lm import LanguageModel

# context sizes of the embedded models (their configs' max_position_embeddings), so a profile
# needs no model load
EMBEDDED_CONTEXT = {
    "smollm2-135m": 8192,
    "gemma-3-270m": 32768,
    "qwen2.5-coder-0.5b": 32768,
    "qwen2.5-coder-1.5b": 32768,
}
# whether their chat templates have a tool-call format of their own (``tool_format(tokenizer).native``)
EMBEDDED_TOOL_CALLING = {
    "smollm2-135m": False,
    "gemma-3-270m": False,
    "qwen2.5-coder-0.5b": True,
    "qwen2.5-coder-1.5b": True,
}


def _profile(max_input_tokens: int | None, image_inputs: bool, tool_calling: bool | None) -> ModelProfile:
    profile = ModelProfile(
        open_weights=True,
        text_inputs=True,
        image_inputs=image_inputs,
        image_url_inputs=False,  # remote URLs are refused: no network access is assumed
        pdf_inputs=False,
        audio_inputs=False,
        video_inputs=False,
        text_outputs=True,
        tool_choice=True,
        structured_output=False,
        temperature=True,
    )
    if max_input_tokens:
        profile["max_input_tokens"] = max_input_tokens
    if tool_calling is not None:
        profile["tool_calling"] = tool_calling
    return profile


def profile_of_model(lm: LanguageModel) -> ModelProfile:
    """The profile of a loaded model: its positions, images for vision-language models, and tool
    calling where its chat template has a format for it."""
    from .tool_format import tool_format

    return _profile(lm.facts.max_positions, lm.is_vision, tool_format(lm.tokenizer).native)


def profile_of_name(name: str) -> ModelProfile:
    """The profile of a model by name without loading it: the embedded models' known sizes, or a
    local checkpoint folder's config.json and tokenizer; other names (hub ids) get the capabilities
    only, tool calling left unsaid."""
    import os

    from .models.loader import DEFAULT_MODEL

    if name == "default":
        name = os.environ.get("EMLOC_DEFAULT_MODEL", DEFAULT_MODEL)
    if name in EMBEDDED_CONTEXT:
        return _profile(EMBEDDED_CONTEXT[name], False, EMBEDDED_TOOL_CALLING[name])
    config_file = Path(name).expanduser() / "config.json"
    if config_file.is_file():
        try:
            config: dict[str, Any] = json.loads(config_file.read_text())
        except ValueError:
            config = {}
        text = config.get("text_config") or config
        positions = text.get("max_position_embeddings") if isinstance(text, dict) else None
        return _profile(positions if isinstance(positions, int) else None, "vision_config" in config,
                        _folder_tool_calling(config_file.parent))
    return _profile(None, False, None)


def _folder_tool_calling(folder: Path) -> bool | None:
    """Whether a checkpoint folder's chat template has a tool-call format (its tokenizer only is read;
    None when it has none that loads)."""
    from transformers import AutoTokenizer

    from .tool_format import tool_format

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - a folder without a usable tokenizer: unknown
        return None
    return tool_format(tokenizer).native
