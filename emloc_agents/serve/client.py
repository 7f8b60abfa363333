"""Skills served by ``emloc serve``, as LangChain tools in another process.

The server describes every skill it serves (``GET /v1/skills/{name}``: the skill as JSON); each tool is
built from that description exactly as ``registry.as_tools(chat)`` builds it in process, and answers
through the server's Chat Completions API. The client needs ``langchain-openai`` (the ``client``
extra), not FastAPI: nothing of the server is imported here.
"""

from __future__ import annotations

import base64
import contextlib
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.tools import BaseTool

from ..registry import UnknownSkillError
from ..skills import Skill
from ..tools import skill_tool

if TYPE_CHECKING:
    import httpx


class SkillServerError(RuntimeError):
    """The skill server could not be reached or refused a request (its status and message included)."""


def _get(client: httpx.Client, base_url: str, path: str) -> Any:
    """``GET base_url + path`` as JSON; every failure as one ``SkillServerError`` that names the URL,
    and the server's own message when it sent one (OpenAI's error shape)."""
    import httpx

    url = f"{base_url}{path}"
    try:
        response = client.get(url)
    except httpx.HTTPError as e:  # refused, unresolvable, timed out
        raise SkillServerError(f"cannot reach the skill server at {url}: {e or type(e).__name__}") from e
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = " ".join(response.text.split())[:200]
        hint = ""
        if response.status_code == 401:
            hint = " (pass the server's key as api_key)"
        elif response.status_code == 404 and path == "/skills":
            hint = " (base_url is the server's /v1 URL, e.g. http://127.0.0.1:8000/v1, of an `emloc serve`)"
        raise SkillServerError(f"GET {url}: {response.status_code} {message}{hint}")
    try:
        return response.json()
    except ValueError as e:
        raise SkillServerError(f"GET {url}: the reply is not JSON; is this an `emloc serve` /v1 URL?") from e


def _image(url: Any) -> Any:
    """A served demonstration image (a ``data:`` URL) as its bytes, so the rebuilt skill is the served
    one (its content hash too); anything else is left as it came."""
    if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
        return base64.b64decode(url.split(";base64,", 1)[1])
    return url


def skill_of(body: dict[str, Any]) -> Skill:
    """The ``skill`` field of ``GET /v1/skills/{name}`` as a ``Skill`` (JSON only: nothing is unpickled)."""
    demos = [{**d, "images": [_image(u) for u in d.get("images") or []]} for d in body.get("demonstrations", [])]
    return Skill.model_validate({**body, "demonstrations": demos})


def served_skills(base_url: str, *, api_key: str | None = None, names: Sequence[str] | None = None,
                  timeout: float | None = None) -> list[tuple[Skill, str]]:
    """The skills served at ``base_url`` (or those of ``names``, in that order), each with the model id
    that answers on it (``<base>:<skill>``). A name the server does not serve is an
    ``UnknownSkillError`` (a ``KeyError``) that lists the served ones."""
    import httpx

    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=timeout if timeout is not None else 30.0) as client:
        listing = _get(client, base_url, "/skills")
        try:
            listed = {entry["id"]: entry["model"] for entry in listing["data"]}
        except (KeyError, TypeError) as e:
            raise SkillServerError(f"GET {base_url}/skills: not a list of skills; is this an `emloc serve` "
                                   "/v1 URL?") from e
        wanted = list(listed) if names is None else list(names)
        unknown = [n for n in wanted if n not in listed]
        if unknown:
            raise UnknownSkillError(f"skill(s) {', '.join(map(repr, unknown))} not served at {base_url}; "
                                    f"served skills: {', '.join(sorted(listed)) or 'none'}")
        return [(skill_of(_get(client, base_url, f"/skills/{name}")["skill"]), listed[name]) for name in wanted]



def served_certificate(base_url: str, name: str, *, api_key: str | None = None, timeout: float | None = None
                       ) -> dict[str, Any] | None:
    """The fidelity certificate of skill ``name``'s memory on the server (``GET /v1/skills/{name}``;
    ``CompressedMemory.certificate``), None while the skill is not compressed."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=timeout if timeout is not None else 30.0) as client:
        got = _get(client, base_url.rstrip("/"), f"/skills/{name}").get("certificate")
    return got if isinstance(got, dict) else None

def remote_skill_tools(base_url: str, *, api_key: str | None = None, names: Sequence[str] | None = None,
                       return_direct: bool = False, max_tokens: int | None = None,
                       timeout: float | None = None) -> list[BaseTool]:
    """One LangChain tool per skill served at ``base_url`` (the server's ``/v1`` URL, as
    ``ChatOpenAI(base_url=...)`` takes it), the same tools ``registry.as_tools(chat)`` makes on the
    server's side: same names, descriptions, arguments and phrasing of the input; under greedy
    decoding, the same answers. Each answers through ``ChatOpenAI`` on ``<base>:<skill>``.

    Args:
        api_key: the server's key (``emloc serve --api-key``); None when it has none. Only this key is
            ever sent: ``OPENAI_API_KEY`` is not read, so an OpenAI key never reaches another server.
        names: the skills to make tools of, in that order (default: every served skill).
        return_direct: LangChain's flag: an agent ends its turn on the skill's answer.
        max_tokens: the reply length (default: the server's).
        timeout: seconds per HTTP request (default: 30 for reading the skills, ``ChatOpenAI``'s for answers).
    """
    try:
        from langchain_openai import ChatOpenAI
    except ImportError as e:
        raise ImportError("remote_skill_tools needs langchain-openai: pip install 'emloc-agents[client]'") from e
    base_url = base_url.rstrip("/")
    tools = []

    known: dict[str, dict[str, Any] | None] = {}

    def read(name: str) -> dict[str, Any] | None:  # the server's certificate; the last one read if it is unreachable
        with contextlib.suppress(SkillServerError):
            known[name] = served_certificate(base_url, name, api_key=api_key, timeout=timeout)
        return known.get(name)

    for skill, model in served_skills(base_url, api_key=api_key, names=names, timeout=timeout):
        answer = ChatOpenAI(model=model, base_url=base_url, api_key=api_key or "none",
                            temperature=0, max_retries=0, max_tokens=max_tokens, timeout=timeout)
        tools.append(skill_tool(skill, answer, return_direct, certificate=functools.partial(read, skill.name)))
    return tools
