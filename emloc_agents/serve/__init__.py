"""``emloc serve``: the OpenAI Chat Completions API over a registry of skills (FastAPI + uvicorn, the
``serve`` extra). It sits on top of the LangChain layer: requests become ``EMLoCChatModel`` calls.

    schema.py      the OpenAI request and response models
    convert.py     OpenAI messages and options <-> LangChain messages and call arguments
    app.py         create_app: the routes, errors, limits, the API key
    skills_api.py  skills as JSON (images as data: URLs)
    worker.py      the one model thread and its bounded queue
    runner.py      uvicorn in the foreground (run) or a background thread (BackgroundServer)
    client.py      remote_skill_tools: the served skills as LangChain tools in another process

``create_app`` is imported on first use, so a client (``remote_skill_tools``) needs no FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import remote_skill_tools
from .runner import BackgroundServer, run

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["BackgroundServer", "create_app", "remote_skill_tools", "run"]


def __getattr__(name: str) -> Any:
    """``create_app`` on first use: the app needs FastAPI (the ``serve`` extra), a client does not."""
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
