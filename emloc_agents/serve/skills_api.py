"""Skills over HTTP: a skill as JSON in and out, its images only as ``data:`` URLs, so a request can
never make the server read a file."""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..images import ImagePolicy, UnsupportedContentError, image_of_block
from ..skills import Skill, image_bytes
from .errors import APIError, one_line

if TYPE_CHECKING:
    from ..registry import MemoryRegistry

_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def data_url(data: bytes) -> str:
    """Image bytes as a ``data:`` URL, its type read from the magic bytes."""
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None:
        mime = "image/webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _decode_data_url(url: Any, where: str, policy: ImagePolicy) -> bytes:
    """A demonstration's image: a base64 ``data:`` URL, opened under the chat model's image limits
    (bytes, and pixels read from the header before decoding) before the registry decodes it."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise APIError(400, f"{where}: images must be base64 data: URLs (data:image/png;base64,...); "
                            "the server reads no files and fetches no URLs", param=where)
    try:
        image_of_block({"type": "image_url", "image_url": {"url": url}}, policy)
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except UnsupportedContentError as e:
        raise APIError(400, one_line(f"{where}: {e}"), param=where) from e
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: not valid base64: {e}", param=where) from e


def skill_from_body(data: Any, *, max_demonstrations: int, images: ImagePolicy, name: str | None = None) -> Skill:
    """A skill from a request body: 400 for a body of the wrong shape or an image that is not a data
    URL within ``images``' limits, 413 past ``max_demonstrations``, 422 for fields the ``Skill`` model
    refuses."""
    if not isinstance(data, dict):
        raise APIError(400, "a skill must be a JSON object {name, instruction, demonstrations: [...]}")
    data = dict(data)
    if name is not None and data.setdefault("name", name) != name:
        raise APIError(400, f"the body names skill {data['name']!r} but the path {name!r}", param="name")
    demos = data.get("demonstrations", [])
    if not isinstance(demos, list):
        raise APIError(422, "demonstrations: must be a list of objects", param="demonstrations")
    if len(demos) > max_demonstrations:
        raise APIError(413, f"skill too large: {len(demos)} demonstrations (at most {max_demonstrations})",
                       param="demonstrations", code="skill_too_large")
    converted = []
    for i, d in enumerate(demos):
        if not isinstance(d, dict):
            raise APIError(422, f"demonstrations[{i}]: must be an object {{input, output, images}}",
                           param=f"demonstrations[{i}]")
        urls = d.get("images") or []
        if not isinstance(urls, list):
            raise APIError(422, f"demonstrations[{i}].images: must be a list of data: URLs",
                           param=f"demonstrations[{i}].images")
        converted.append({**d, "images": [_decode_data_url(u, f"demonstrations[{i}].images[{j}]", images)
                                          for j, u in enumerate(urls)]})
    data["demonstrations"] = converted
    try:
        return Skill.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(422, one_line(f"{where}: {err['msg']}"), param=where or None, code="invalid_skill") from e


def skill_body(skill: Skill) -> dict[str, Any]:
    """The skill as JSON, images as data URLs: what ``PUT /v1/skills`` takes back."""
    data = skill.model_dump(exclude={"demonstrations"})
    data["demonstrations"] = [{"input": d.input, "output": d.output,
                               "images": [data_url(image_bytes(i)) for i in d.images]} for d in skill.demonstrations]
    return data


def skill_summary(registry: MemoryRegistry, skill: Skill, base: str, *, compressing: bool = False,
                  error: str | None = None) -> dict[str, Any]:
    """One line of ``GET /v1/skills``: what the skill is and where its memory stands: ``compressing``
    (queued or running), ``failed`` (the last compression asked for in the background, with its
    ``error``), ``compressed`` (in the registry's store) or ``not_compressed``."""
    if compressing:
        status: dict[str, Any] = {"status": "compressing"}
    elif error is not None:
        status = {"status": "failed", "error": error}
    else:
        certificate = registry.certificate(skill)
        status = {"status": "compressed" if certificate is not None or registry.cached(skill) else "not_compressed"}
        if certificate is not None:
            status["certificate"] = certificate  # what the memory's check measured (CompressedMemory.certificate)
    return {
        "id": skill.name,
        "object": "skill",
        "model": f"{base}:{skill.name}",
        "description": skill.summary(),
        "demonstrations": len(skill.demonstrations),
        "labels": skill.labels,
        "input_template": skill.input_template,
    } | status
