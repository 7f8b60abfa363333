"""``create_app``: the OpenAI Chat Completions API over an ``EMLoCChatModel`` and its registry.

The skill is chosen per request (``model="<base>:<skill>"`` or a ``skill`` body field). Every failure
is OpenAI's error shape with its status; generation and compression run on one model thread
(``ModelWorker``), behind a bounded queue, and chat requests that wait together are decoded as one
batch (``ChatBatcher``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from langchain_core.messages import AIMessage, AIMessageChunk
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..images import ImagePolicy
from .convert import (
    call_arguments,
    content_of,
    finish_reason,
    openai_tool_calls,
    to_langchain,
    tool_arguments,
    usage_of,
)
from .errors import APIError, from_exception, one_line
from .schema import UNSUPPORTED, ChatCompletion, ChatCompletionRequest, Choice, ResponseMessage
from .skills_api import skill_body, skill_from_body, skill_summary
from .worker import ChatBatcher, ModelWorker

if TYPE_CHECKING:
    from ..chat_model import EMLoCChatModel

log = logging.getLogger(__name__)

MiB = 1 << 20


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 past ``limit`` bytes (checked as it arrives, not only from the
    Content-Length header), 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request too large: {int(declared)} bytes (at most {limit})", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request too large: over {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, one_line(f"the request body is not valid JSON: {e}"), code="invalid_json") from e


_TYPE_TAGS = ("str", "int", "float", "bool", "dict", "list", "none")


def _field_path(loc: tuple[Any, ...]) -> list[str]:
    """A pydantic error location as the request's field path: without "body" and without the union
    members pydantic names (``str``, ``literal[...]``, ``NamedToolChoice``, a content part's tag, which
    repeats the field after it: ``image_url.image_url``), which are no fields."""
    out: list[str] = []
    for p in loc:
        if isinstance(p, int):
            out.append(str(p))
        elif p != "body" and "[" not in p and p not in _TYPE_TAGS and not p[:1].isupper() and out[-1:] != [p]:
            out.append(p)
    return out


def _validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """The most specific of the errors (the deepest field) as one 422."""
    errors = list(e.errors())
    err = max(errors, key=lambda x: len(_field_path(tuple(x.get("loc", ())))))  # first of the deepest
    where = ".".join(_field_path(tuple(err.get("loc", ()))))
    return APIError(422, one_line(f"{where or 'body'}: {err.get('msg', 'invalid')}"), param=where or None,
                    code="invalid_field")


def _neutral(value: Any, options: tuple[Any, ...]) -> bool:
    """``value`` is one of ``options``, of the same type (``0`` is not ``False``)."""
    return any(value is o or (type(value) is type(o) and value == o) for o in options)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    chat: EMLoCChatModel,
    *,
    api_key: str | None = None,
    max_request_bytes: int = 4 * MiB,
    max_skill_bytes: int = 32 * MiB,
    max_skill_demonstrations: int = 2048,
    max_queue: int = 16,
    max_tokens_limit: int = 4096,
    max_batch: int = 16,
) -> FastAPI:
    """An OpenAI-compatible app over ``chat``'s registry.

    Args:
        chat: answers every request; its registry holds the skills, its fields are the defaults of
            options a request leaves out.
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>``.
        max_request_bytes: the largest chat request body (413 past it).
        max_skill_bytes, max_skill_demonstrations: the largest skill a request may register (413).
        max_queue: requests that may wait for the model thread while one runs (503 past it).
        max_tokens_limit: the most tokens one reply may ask for (400 past it).
        max_batch: the most waiting chat requests answered together (``ChatBatcher``; 1: one at a time).
    """
    limits = {"max_request_bytes": max_request_bytes, "max_skill_bytes": max_skill_bytes,
              "max_skill_demonstrations": max_skill_demonstrations, "max_tokens_limit": max_tokens_limit,
              "max_batch": max_batch}
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key must not be empty (None: no key)")
    registry = chat.get_registry()
    base = chat.model_name_resolved
    worker = ModelWorker(max_queue)
    batcher = ChatBatcher(worker, chat, max_batch)
    images = ImagePolicy(max_bytes=chat.max_image_bytes, max_pixels=chat.max_image_pixels)  # as for messages
    background: dict[str, asyncio.Future[Any]] = {}  # skill -> its compression asked with wait=false, until done
    failures: dict[str, str] = {}  # skill -> why its last background compression failed
    created = int(time.time())

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()  # requests still waiting are dropped; the running one ends with the process

    app = FastAPI(title="emloc serve", description="OpenAI-compatible chat completions on EMLoC skill memories",
                  lifespan=lifespan)
    app.state.chat = chat
    app.state.worker = worker
    app.state.batcher = batcher
    auth = [Depends(check_key)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return await _api_error(request, APIError(e.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return await _api_error(request, from_exception(e))

    def _failed(e: BaseException, param: str | None = None) -> APIError:
        err = from_exception(e, param=param)
        if err.status >= 500:
            log.error("request failed", exc_info=e)
        return err

    # ---- models ----------------------------------------------------------------------------

    def _model_entry(model_id: str, skill: str | None = None) -> dict[str, Any]:
        entry = {"id": model_id, "object": "model", "created": created, "owned_by": "emloc-agents"}
        return entry | ({"skill": skill} if skill else {})

    def _skill_of_model(model: str) -> str | None:
        if model == base:
            return None
        head, sep, skill = model.rpartition(":")
        if not sep or head != base:
            raise APIError(404, f"unknown model {model!r}: this server serves {base!r} and {base}:<skill> "
                                "(GET /v1/models)", param="model", code="model_not_found")
        return skill

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, without the API key: for load balancers and start-up checks."""
        return {"status": "ok", "model": base, "pending": worker.pending, "batches": batcher.batches,
                "batched_requests": batcher.batched_requests, "largest_batch": batcher.largest_batch}

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        names = await run_in_threadpool(registry.names)
        return {"object": "list", "data": [_model_entry(base)] + [_model_entry(f"{base}:{n}", n) for n in names]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> dict[str, Any]:
        skill = _skill_of_model(model_id)
        if skill is not None and not await run_in_threadpool(registry.__contains__, skill):
            raise APIError(404, f"unknown model {model_id!r}: no skill {skill!r}", param="model", code="model_not_found")
        return _model_entry(model_id, skill)

    # ---- chat completions ------------------------------------------------------------------

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        data = await read_json(request, max_request_bytes)
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        for field, neutral in UNSUPPORTED.items():
            if field in data and not _neutral(data[field], neutral):
                raise APIError(400, f"{field}={one_line(json.dumps(data[field]), 80)} is not supported here",
                               param=field, code="unsupported_parameter")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from e
        skill = _skill_of_model(req.model)
        if req.skill is not None and skill is not None and req.skill != skill:
            raise APIError(400, f"model names skill {skill!r} but the skill field {req.skill!r}", param="skill")
        skill = req.skill if req.skill is not None else skill
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {max_tokens_limit}",
                           param="max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        messages = to_langchain(req.messages)
        kwargs = call_arguments(req) | {"skill": skill}
        tool_kw = tool_arguments(req)
        try:
            runnable: Any = chat.bind_tools(**tool_kw) if tool_kw else chat
        except Exception as e:  # noqa: BLE001 - a tool the chat model cannot take is the caller's error
            raise _failed(e, "tools") from e
        if tool_kw:
            kwargs |= runnable.kwargs  # the tools as bound (validated and normalised)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        skill_param = "skill" if req.skill is not None else "model"  # where an unknown skill was named
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(messages, kwargs, req.model, completion_id, include_usage, skill_param)
        # decoded as a stream and joined: a client that leaves, or the server stopping, ends the generation
        # at its next token
        chunks = batcher.stream(messages, kwargs)
        joined: AIMessageChunk | None = None
        try:
            async for chunk in chunks:
                joined = chunk if joined is None else joined + chunk
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed_request")
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
            raise _failed(e, skill_param if isinstance(e, KeyError) else None) from e
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        message = joined if joined is not None else AIMessageChunk(content="")
        calls = openai_tool_calls(message)
        text = content_of(message)
        body = ChatCompletion(
            id=completion_id, created=int(time.time()), model=req.model,
            choices=[Choice(message=ResponseMessage(content=text if text or not calls else None,
                                                    tool_calls=calls or None),  # type: ignore[arg-type]
                            finish_reason=finish_reason(message.response_metadata, bool(calls)))],
            usage=usage_of(message),
        )
        return JSONResponse(body.model_dump(exclude_none=False))

    async def _stream(messages: list[Any], kwargs: dict[str, Any], model: str, completion_id: str,
                      include_usage: bool, skill_param: str) -> StreamingResponse:
        chunks = batcher.stream(messages, kwargs)
        try:  # the first chunk comes after the prompt is read: a bad request still gets its status
            first: AIMessageChunk | None = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _failed(e, skill_param if isinstance(e, KeyError) else None) from e
        stamp = int(time.time())

        def frame(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            out = {"id": completion_id, "object": "chat.completion.chunk", "created": stamp, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return out | ({"usage": None} if include_usage else {})

        async def events() -> AsyncIterator[str]:
            yield _sse(frame({"role": "assistant", "content": ""}))
            sent_text = False
            calls = 0
            last: AIMessageChunk | None = None
            try:
                item = first
                while item is not None:
                    last = item if item.response_metadata.get("finish_reason") or item.usage_metadata else last
                    text = item.content if isinstance(item.content, str) else ""
                    broken = [str(c.get("args") or "") for c in item.tool_call_chunks if not c.get("name")]
                    text = "\n".join(t for t in [text, *broken] if t) if broken else text
                    if text:
                        yield _sse(frame({"content": ("\n" if broken and sent_text and not item.content else "") + text}))
                        sent_text = True
                    valid = [c for c in item.tool_call_chunks if c.get("name")]
                    if valid:
                        yield _sse(frame({"tool_calls": [
                            {"index": calls + i, "id": c.get("id") or f"call_{calls + i}", "type": "function",
                             "function": {"name": c["name"], "arguments": c.get("args") or "{}"}}
                            for i, c in enumerate(valid)]}))
                        calls += len(valid)
                    item = await anext(chunks, None)
            except Exception as e:  # noqa: BLE001 - the status is sent already: the error is an event
                err = _failed(e)
                yield _sse(err.body())
                yield _sse("[DONE]")
                return
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
            meta = last.response_metadata if last is not None else {}
            yield _sse(frame({}, finish_reason(meta, calls > 0)))
            if include_usage:
                usage = usage_of(AIMessage(content="", usage_metadata=last.usage_metadata if last is not None else None))
                yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": stamp, "model": model,
                            "choices": [], "usage": usage.model_dump()})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- skills ----------------------------------------------------------------------------

    async def _skill(name: str) -> Any:
        try:
            return await run_in_threadpool(registry.skill, name)
        except Exception as e:  # noqa: BLE001
            raise _failed(e, "name") from e

    @app.get("/v1/skills", dependencies=auth)
    async def list_skills() -> dict[str, Any]:
        busy, failed = set(background), dict(failures)  # read on the event loop, which writes them

        def summaries() -> list[dict[str, Any]]:
            return [skill_summary(registry, registry.skill(n), base, compressing=n in busy, error=failed.get(n))
                    for n in registry.names()]

        return {"object": "list", "data": await run_in_threadpool(summaries)}

    @app.get("/v1/skills/{name}", dependencies=auth)
    async def get_skill(name: str) -> dict[str, Any]:
        skill = await _skill(name)
        summary = await run_in_threadpool(lambda: skill_summary(registry, skill, base, compressing=name in background,
                                                                error=failures.get(name)))
        return summary | {"skill": skill_body(skill)}

    async def _put_skill(request: Request, name: str | None) -> JSONResponse:
        data = await read_json(request, max_skill_bytes)
        skill = skill_from_body(data, max_demonstrations=max_skill_demonstrations, images=images, name=name)
        try:
            existed = await run_in_threadpool(registry.__contains__, skill.name)
            await run_in_threadpool(registry.add, skill)
        except Exception as e:  # noqa: BLE001
            raise _failed(e, "demonstrations") from e
        failures.pop(skill.name, None)  # a failure of the skill it replaces
        summary = await run_in_threadpool(skill_summary, registry, skill, base)
        return JSONResponse(summary, status_code=200 if existed else 201)

    @app.post("/v1/skills", dependencies=auth, response_model=None)
    async def post_skill(request: Request) -> JSONResponse:
        """Register a skill, or replace the one of that name (201 when new, 200 when replaced)."""
        return await _put_skill(request, None)

    @app.put("/v1/skills", dependencies=auth, response_model=None)
    async def put_skill(request: Request) -> JSONResponse:
        return await _put_skill(request, None)

    @app.put("/v1/skills/{name}", dependencies=auth, response_model=None)
    async def put_named_skill(name: str, request: Request) -> JSONResponse:
        return await _put_skill(request, name)

    @app.delete("/v1/skills/{name}", dependencies=auth)
    async def delete_skill(name: str) -> dict[str, Any]:
        try:
            await run_in_threadpool(registry.remove, name)
        except Exception as e:  # noqa: BLE001
            raise _failed(e, "name") from e
        failures.pop(name, None)
        return {"id": name, "object": "skill", "deleted": True}

    def _in_background(name: str, skill: Any) -> None:
        future = worker.submit(lambda: registry.get_with_info(skill))  # a full queue refuses it now (503)
        background[name] = future
        failures.pop(name, None)

        def done(f: asyncio.Future[Any]) -> None:
            background.pop(name, None)
            error = None if f.cancelled() else f.exception()
            if error is not None:
                err = _failed(error)
                failures[name] = err.message
                log.warning("compressing skill %r failed: %s", name, err.message)

        future.add_done_callback(done)

    @app.post("/v1/skills/{name}/compress", dependencies=auth, response_model=None)
    async def compress_skill(name: str, wait: bool = True) -> dict[str, Any] | JSONResponse:
        """Compress the skill's memory now (it is compressed on first use otherwise). Answers when it
        is ready, with how it was obtained ("compressed" now, or "cached" already); with
        ``?wait=false``, at once (202), the skill's ``status`` saying "compressing" until it is done."""
        skill = await _skill(name)
        if not wait:
            if name not in background:
                _in_background(name, skill)
            return JSONResponse({"id": name, "object": "skill.memory", "status": "compressing"}, status_code=202)
        try:
            memory, info = await worker.run(lambda: registry.get_with_info(skill))
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _failed(e, "name") from e
        return {"id": name, "object": "skill.memory", "status": "compressed",
                "source": "compressed" if info.source == "compressed" else "cached",
                "seconds": round(info.seconds, 3), "original_tokens": memory.original_length,
                "memory_tokens": round(memory.memory_tokens / memory.num_layers),  # as usage's cached_tokens
                "kept_ratio": memory.kept_ratio}

    return app
