"""``compress``: a skill's demonstrations into a memory, by the compression method its config names.

A method is one module with one entry point (``Method``): ``"chunks"``, the paper's chunk-wise loop
(engine/chunk_loop.py), ``"context"``, the whole context ranked at once (engine/context.py), and
``"fitted"``, that ranking with each kept slot's bias and value fitted to the full context's attention
(engine/fit.py).
``METHODS`` maps each name to its entry point; ``compress`` resolves ``compression="auto"`` once and
calls one entry point, which never comes back here. A new method is one module and one
``register_method`` call; ``EMLoCConfig(compression=name)`` then names it, and a ``MemoryRegistry``
keys its memories by that name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..config import METHOD_NAMES, WHOLE_CONTEXT, EMLoCConfig
from ..skills import Skill
from .chunk_loop import ContextTooLongError, compress_chunks
from .context import compress_context
from .fit import Fitted
from .forward import ModelHandle
from .memory import CompressedMemory
from .presses import Press

__all__ = ["METHODS", "ContextTooLongError", "Method", "compress", "method_name", "register_method"]


class Method(Protocol):
    """A compression method's entry point. ``press``: a press the caller chose (only the chunk-wise loop
    takes one); ``progress(done, total)``: called as the method advances."""

    def __call__(self, lm: ModelHandle, skill: Skill, config: EMLoCConfig, press: Press | None = None,
                 progress: Callable[[int, int], None] | None = None) -> CompressedMemory: ...


METHODS: dict[str, Method] = {"chunks": compress_chunks, "context": compress_context, "fitted": Fitted()}
"""Compression method name -> its entry point (``register_method`` adds one)."""


def register_method(name: str, method: Method) -> None:
    """Make ``method`` the entry point of ``EMLoCConfig(compression=name)`` (replacing any method of that
    name). The name is part of the memory's registry key, so memories of different methods never mix."""
    if name == "auto":
        raise ValueError("'auto' is not a method: it resolves to 'context' or 'chunks'")
    METHODS[name] = method
    METHOD_NAMES.add(name)


def method_name(lm: ModelHandle, skill: Skill, config: EMLoCConfig, press: Press | None = None) -> str:
    """The method ``compress`` runs: the config's ``compression`` as resolved for this skill and model
    (``EMLoCConfig.resolved_compression``), except that a press always runs the chunk-wise loop (a press
    chooses each chunk's tokens) and so does the whole-context ranking with nothing to prune (its
    unpruned context is the loop's, which equals one prefill)."""
    name = config.resolved_compression(skill.has_images or getattr(lm, "vision", None) is not None)
    if press is not None or (name in WHOLE_CONTEXT and not config.prunes):
        return "chunks"
    return name


def compress(
    lm: ModelHandle,
    skill: Skill,
    config: EMLoCConfig | None = None,
    press: Press | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CompressedMemory:
    """Compress ``skill``'s demonstrations into a memory for ``lm`` by the method ``config`` names
    (``method_name``)."""
    config = config or EMLoCConfig()
    name = method_name(lm, skill, config, press)
    if name not in METHODS:
        raise ValueError(f"no compression method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name](lm, skill, config, press=press, progress=progress)
