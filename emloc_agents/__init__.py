"""emloc-agents: EMLoC compressed in-context-learning memories for transformers models, served as
LangChain chat models and agent skills.

Public API (stable): EMLoCChatModel, MemoryRegistry, Skill, Demonstration, EMLoCConfig,
CompressedMemory, load_model, compress.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import EMLoCConfig
from .skills import Demonstration, Skill, SkillError

__version__ = "0.2.0"

_LAZY = {
    "CompressedMemory": ("emloc_agents.engine.memory", "CompressedMemory"),
    "compress": ("emloc_agents.engine.compress", "compress"),
    "load_model": ("emloc_agents.models.loader", "load_model"),
    "LanguageModel": ("emloc_agents.models.lm", "LanguageModel"),
    "MemoryRegistry": ("emloc_agents.registry", "MemoryRegistry"),
    "EMLoCChatModel": ("emloc_agents.chat_model", "EMLoCChatModel"),
    "SkillRouter": ("emloc_agents.tools", "SkillRouter"),
}

if TYPE_CHECKING:
    from .chat_model import EMLoCChatModel
    from .engine.compress import compress
    from .engine.memory import CompressedMemory
    from .models.lm import LanguageModel
    from .models.loader import load_model
    from .registry import MemoryRegistry
    from .tools import SkillRouter


def __getattr__(name: str) -> Any:
    """Import heavy parts (torch, transformers, langchain) on first use."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emloc_agents' has no attribute {name!r}")


__all__ = [
    "CompressedMemory",
    "Demonstration",
    "EMLoCChatModel",
    "EMLoCConfig",
    "LanguageModel",
    "MemoryRegistry",
    "Skill",
    "SkillError",
    "SkillRouter",
    "__version__",
    "compress",
    "load_model",
]
