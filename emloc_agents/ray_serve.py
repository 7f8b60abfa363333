"""``emloc serve --ray``: the same OpenAI API as ``create_app``, scaled out on Ray Serve replicas.

Two deployments:

    OpenAIIngress  light (no model): reads which skill a request names and forwards the raw request
                   to an ``EMLoCModel`` replica through a deployment handle, with the skill as the
                   handle's ``multiplexed_model_id``; streams the reply back as it comes.
    EMLoCModel     N replicas, each one ``create_app`` over its own ``EMLoCChatModel``, all on one
                   shared store (Redis), so a skill is compressed once whichever replica asks first.

``SkillAffinityRouter`` (a Ray Serve ``RequestRouter``) sends every request for a skill to the same
replica (rendezvous hashing of the skill over the live replicas), so its memory stays warm there;
when that replica's queue is full, or it died, the request goes to another, which loads the memory
from the store. Ray is the ``ray`` extra and imported only here.
"""

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

# no ``from __future__ import annotations`` here: FastAPI reads the ingress route's annotations at run time
from .serve.app import MiB, create_app
from .serve.errors import APIError

if TYPE_CHECKING:
    from .chat_model import EMLoCChatModel

log = logging.getLogger(__name__)

_SKILL_ROUTE = re.compile(r"^/v1/skills/([^/]+)")
RETRIES = 3
"""How many times the ingress sends a request again when the replica answering it died before
its reply was complete (non-streamed replies; a stream already sent in part ends where it broke)."""


def skill_of_request(path: str, body: bytes) -> str:
    """The skill a request is about ("" for none): the ``skill`` field or ``model="<base>:<skill>"``
    of a chat request, the name in ``/v1/skills/{name}`` or in a skill posted to ``/v1/skills``. Only for routing: the replica's app checks
    the request properly (a malformed one is refused there, whichever replica gets it)."""
    match = _SKILL_ROUTE.match(path)
    if match:
        return match.group(1)
    route = path.rstrip("/")
    if route not in ("/v1/chat/completions", "/v1/skills") or not body:
        return ""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(data, dict):
        return ""
    if route == "/v1/skills":  # registering a skill: on the replica that will serve it
        return data["name"] if isinstance(data.get("name"), str) else ""
    if isinstance(data.get("skill"), str):
        return str(data["skill"])
    model = data.get("model")
    return model.rpartition(":")[2] if isinstance(model, str) and ":" in model else ""


def _rank(skill: str, replica_id: str) -> bytes:
    return hashlib.sha256(f"{skill}\0{replica_id}".encode()).digest()


class SkillAffinityRouter(RequestRouter):
    """Routes by skill (the request's ``multiplexed_model_id``): the live replica with the highest
    rendezvous hash of (skill, replica) first, then the others in that order. Ray Serve sends a
    request to the first rank that has room (``max_ongoing_requests``), so a skill stays on one
    replica until that one is full or gone; when a replica dies only its skills move. Requests that
    name no skill go to the least loaded of two replicas drawn at random, as Ray's default router."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        skill = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not candidate_replicas:
            return []
        if not skill:
            return [candidate_replicas]
        ordered = sorted(candidate_replicas, key=lambda r: _rank(skill, r.replica_id.unique_id), reverse=True)
        return [[r] for r in ordered]


def build_chat(model: str, store_url: str, *, namespace: str = "emloc", device: str = "auto",
               dtype: str = "auto", compression: str = "auto", **chat_fields: Any) -> "EMLoCChatModel":
    """An ``EMLoCChatModel`` on a ``MemoryRegistry`` over the Redis store at ``store_url``: what each
    replica builds for itself (the model is loaded in the replica, never shipped to it)."""
    from .chat_model import EMLoCChatModel
    from .config import EMLoCConfig
    from .registry import MemoryRegistry
    from .store import RedisStore

    registry = MemoryRegistry(model=model, store=RedisStore(url=store_url, namespace=namespace), device=device,
                              dtype=dtype, config=EMLoCConfig(compression=compression))  # type: ignore[arg-type]
    return EMLoCChatModel(registry=registry, **chat_fields)


async def _call_asgi(app: Any, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
    """Run one request through an ASGI app in this process and yield its ``send`` messages as they
    come (a stream's events arrive one by one). Closing the iterator tells the app the client left."""
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    left = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            yield message
        await task  # an exception inside the app surfaces here
    finally:
        left.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(task, timeout=10)


class EMLoCModel:
    """One replica: ``create_app`` over the chat model ``chat_factory`` builds, called in-process."""

    def __init__(self, chat_factory: Callable[[], "EMLoCChatModel"], app_options: dict[str, Any] | None = None,
                 warm: bool = False) -> None:
        self.chat = chat_factory()
        registry = self.chat.get_registry()
        registry.lm  # noqa: B018 - loaded now, not by the first request
        if warm:
            registry.warm()
        self.app = create_app(self.chat, **(app_options or {}))
        self.id = serve.get_replica_context().replica_id.unique_id.encode()  # the X-Emloc-Replica header

    async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> AsyncIterator[dict[str, Any]]:
        """The request through this replica's app: first ``{"status", "headers"}`` (with
        ``X-Emloc-Replica``, the replica's id, to see the routing), then ``{"body": bytes}`` pieces as
        the app sends them."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": headers, "client": ("ray-ingress", 0), "server": ("emloc", 80)}
        async for message in _call_asgi(self.app, scope, body):
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": [*message.get("headers", []), (b"x-emloc-replica", self.id)]}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield {"body": bytes(message["body"])}

    def compressions(self) -> int:
        """Memories this replica compressed (not loaded from the store): for checks and metrics."""
        return self.chat.get_registry().compressions


def _without_length(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() != "content-length"}


async def _bodies(replies: Any) -> AsyncIterator[bytes]:
    """A stream's pieces; a client that leaves cancels the request on the replica, whose app then
    stops the generation at its next token (as on a single host)."""
    try:
        async for part in replies:
            yield part["body"]
    finally:
        replies.cancel()  # a no-op once the stream is complete


ingress = FastAPI(title="emloc serve (Ray)")


@serve.ingress(ingress)  # at import, so each replica process builds the same routes
class OpenAIIngress:
    """Forwards every request to an ``EMLoCModel`` replica chosen by the request's skill."""

    def __init__(self, model: DeploymentHandle, max_body: int = 32 * MiB) -> None:
        self.model = model
        self.max_body = max_body  # the replicas' largest limit: past it, refused here, before it is read whole

    @ingress.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], response_model=None)
    async def forward(self, request: Request, path: str) -> Response:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body:
                err = APIError(413, f"request too large: over {self.max_body} bytes", code="request_too_large")
                return JSONResponse(err.body(), status_code=err.status)
        url_path = request.url.path
        skill = skill_of_request(url_path, bytes(body))
        headers = [(k.lower(), v) for k, v in request.headers.raw
                   if k.lower() not in (b"host", b"content-length", b"transfer-encoding")]
        headers.append((b"content-length", str(len(body)).encode()))
        handle = self.model.forward.options(stream=True, multiplexed_model_id=skill)
        args = (request.method, url_path, request.url.query.encode(), headers, bytes(body))
        for attempt in range(RETRIES + 1):
            replies: Any = handle.remote(*args)  # a DeploymentResponseGenerator (stream=True)
            try:
                head = await replies.__anext__()
                response_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head["headers"]}
                if response_headers.get("content-type", "").startswith("text/event-stream"):
                    return StreamingResponse(_bodies(replies), status_code=head["status"],
                                             headers=_without_length(response_headers))
                content = b"".join([part["body"] async for part in replies])
            except RayActorError:
                if attempt == RETRIES:
                    raise
                log.warning("the replica answering %s %s died; sending it again", request.method, url_path)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            return Response(content, status_code=head["status"], headers=_without_length(response_headers))
        raise AssertionError("unreachable")


def build_app(chat_factory: Callable[[], "EMLoCChatModel"], *, replicas: int = 2, app_options: dict[str, Any] | None = None,
              warm: bool = False, num_cpus: float = 1.0) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``): an ingress and ``replicas`` model
    replicas, each allowed ``max_queue + 1`` requests at a time (the rest wait in Ray's router, not in
    a 503)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    max_queue = int((app_options or {}).get("max_queue", 16))
    deployment: Any = serve.deployment  # typed by Ray for its decorator form only
    model = deployment(
        EMLoCModel, name="EMLoCModel", num_replicas=replicas, max_ongoing_requests=max_queue + 1,
        ray_actor_options={"num_cpus": num_cpus},
        request_router_config=RequestRouterConfig(request_router_class=SkillAffinityRouter),  # type: ignore[arg-type]
    ).bind(chat_factory, app_options, warm)
    front = deployment(OpenAIIngress, name="OpenAIIngress",
                       max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    options = app_options or {}
    return front.bind(model, max(options.get("max_request_bytes", 4 * MiB), options.get("max_skill_bytes", 32 * MiB)))


def chat_factory(model: str, store_url: str, **kwargs: Any) -> Callable[[], "EMLoCChatModel"]:
    """A picklable ``build_chat`` with its arguments, for ``build_app``."""
    return functools.partial(build_chat, model, store_url, **kwargs)
