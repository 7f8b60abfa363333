"""``emloc serve``: the OpenAI Chat Completions API over a registry of skills (FastAPI + uvicorn, the
``serve`` extra). It sits on top of the LangChain layer: requests become ``EMLoCChatModel`` calls.

    schema.py      the OpenAI request and response models
    convert.py     OpenAI messages and options <-> LangChain messages and call arguments
    app.py         create_app: the routes, errors, limits, the API key
    skills_api.py  skills as JSON (images as data: URLs)
    worker.py      the one model thread and its bounded queue
    runner.py      uvicorn in the foreground (run) or a background thread (BackgroundServer)
"""

from __future__ import annotations

from .app import create_app
from .runner import BackgroundServer, run

__all__ = ["BackgroundServer", "create_app", "run"]
