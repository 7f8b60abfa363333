"""Image content blocks of chat messages -> PIL images, within the caller's limits.

A message is input from whoever wrote it (a user, a tool result, a retrieved page), so a path in it
must not make the process read whatever file it can: local paths and ``file://`` URLs are read only
inside directories the caller lists (``EMLoCChatModel.allowed_local_image_dirs``, empty by default),
as vLLM's ``--allowed-local-media-path`` does. Every image, whatever its source (base64, ``data:``
URL, file), is refused past ``max_bytes`` (bytes read, or decoded from base64) and past
``max_pixels`` (read from the image header before any pixel is decoded: a small file can expand to
gigabytes, PIL's "decompression bomb"). Remote URLs are refused: no network access is assumed.

Images in a skill's demonstrations are the developer's, not message input, and are read by
``skills.load_image`` without these rules.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImagePolicy",
    "UnsupportedContentError",
    "image_of_block",
]

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024**2
"""20 MiB: the largest image file (or decoded base64) a message may carry; OpenAI's limit too."""
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""50 megapixels (a 48 MP phone photo fits); below PIL's own 89 MP warning threshold."""


class UnsupportedContentError(ValueError):
    """A message content block this model cannot take (audio, files, remote URLs, bad images)."""


@dataclass(frozen=True)
class ImagePolicy:
    """What a message's images may be: local files only inside ``local_dirs`` (resolved, symlinks
    followed; empty: no local files), at most ``max_bytes`` bytes and ``max_pixels`` pixels each."""

    local_dirs: tuple[Path, ...] = ()
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def allowing(cls, dirs: Iterable[str | Path], max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImagePolicy:
        """A policy reading local images under ``dirs``; each must be an existing directory."""
        resolved = []
        for d in dirs:
            if not isinstance(d, str | Path) or not str(d).strip():  # "" would mean the working directory
                raise ValueError(f"allowed_local_image_dirs: {d!r} is not a directory path")
            path = Path(d).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"allowed_local_image_dirs: {str(d)!r} is not a directory")
            resolved.append(path)
        if max_bytes < 1 or max_pixels < 1:
            raise ValueError("max_image_bytes and max_image_pixels must be >= 1")
        return cls(tuple(resolved), max_bytes, max_pixels)


def _open(data: bytes, what: str, policy: ImagePolicy) -> Any:
    """Decode ``data``; its size is checked from the header before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    # SyntaxError, EOFError: what some of PIL's decoders raise for a malformed file
    unreadable = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)
    if len(data) > policy.max_bytes:
        raise UnsupportedContentError(f"{what} is {len(data)} bytes, over max_image_bytes={policy.max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own guard, for a max_pixels above it
        raise UnsupportedContentError(f"{what} is refused as a decompression bomb: {e}") from e
    except unreadable as e:
        raise UnsupportedContentError(f"{what} is not a readable image: {e}") from e
    width, height = img.size
    if width * height > policy.max_pixels:
        raise UnsupportedContentError(f"{what} is {width}x{height} = {width * height} pixels, over "
                                      f"max_image_pixels={policy.max_pixels}")
    try:
        img.load()
    except unreadable as e:
        raise UnsupportedContentError(f"{what} is not a readable image: {e}") from e
    return img


def _b64(data: Any, what: str, policy: ImagePolicy) -> bytes:
    """Base64 text -> bytes, refused before decoding when it would exceed ``max_bytes``."""
    if not isinstance(data, str | bytes):
        raise UnsupportedContentError(f"{what}: base64 image data must be a string, got {type(data).__name__}")
    if len(data) * 3 // 4 > policy.max_bytes + 3:
        raise UnsupportedContentError(f"{what} holds about {len(data) * 3 // 4} bytes, over "
                                      f"max_image_bytes={policy.max_bytes}")
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as e:
        raise UnsupportedContentError(f"{what}: invalid base64 image data") from e


def _read_local(url: str, policy: ImagePolicy) -> Any:
    """A local path or ``file://`` URL, read only inside ``policy.local_dirs``."""
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise UnsupportedContentError(f"file URL on another host {parsed.netloc!r}: {url[:200]}")
        raw = url2pathname(parsed.path)
    else:
        raw = url
    if not policy.local_dirs:
        raise UnsupportedContentError(
            f"image {url[:200]!r} is a local file; messages may name local files only inside the directories "
            "listed in EMLoCChatModel(allowed_local_image_dirs=[...]) (none by default); otherwise pass the "
            "image as base64 or a data: URL")
    path = Path(raw).expanduser().resolve()  # symlinks followed: a link out of the directories is refused
    if not any(path.is_relative_to(d) for d in policy.local_dirs):
        raise UnsupportedContentError(
            f"image {url[:200]!r} is outside the directories of allowed_local_image_dirs "
            f"({', '.join(map(str, policy.local_dirs))})")
    if not path.is_file():
        raise UnsupportedContentError(f"image not found: {url[:200]}")
    try:
        with path.open("rb") as f:
            data = f.read(policy.max_bytes + 1)  # never more than the limit is read
    except OSError as e:
        raise UnsupportedContentError(f"image {url[:200]!r} cannot be read: {e}") from e
    if len(data) > policy.max_bytes:
        raise UnsupportedContentError(f"image {url[:200]!r} is over max_image_bytes={policy.max_bytes}")
    return _open(data, str(path), policy)


def _image_from_url(url: str, policy: ImagePolicy) -> Any:
    """A data URL, or a local path or file:// URL the policy allows -> PIL image; remote URLs are refused."""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.startswith("data:image/"):
            raise UnsupportedContentError(f"unsupported data URL type {header[5:].split(';')[0]!r} (images only)")
        if ";base64" not in header:
            raise UnsupportedContentError("image data URLs must be base64-encoded")
        return _open(_b64(data, "image data URL", policy), "image data URL", policy)
    if url.startswith(("http://", "https://")):
        raise UnsupportedContentError(
            f"remote image URLs cannot be fetched (no network access): {url[:80]}; "
            "pass the image as base64 or a data: URL"
        )
    return _read_local(url, policy)


def image_of_block(block: Mapping[str, Any], policy: ImagePolicy) -> Any:
    """An ``image`` or ``image_url`` content block -> PIL image: LangChain's v1 standard block, its v0
    form (``source_type``), OpenAI's ``image_url`` and Anthropic's ``source``."""
    kind = block.get("type")
    if kind == "image_url":
        ref = block.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise UnsupportedContentError("image_url block without a url")
        return _image_from_url(url, policy)
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64":
            return _open(_b64(source.get("data", ""), "image block", policy), "image block", policy)
        if source.get("type") == "url":
            return _image_from_url(str(source.get("url", "")), policy)
    if block.get("base64") is not None:
        return _open(_b64(block["base64"], "image block", policy), "image block", policy)
    if block.get("source_type") == "base64" and block.get("data") is not None:
        return _open(_b64(block["data"], "image block", policy), "image block", policy)
    url = block.get("url") or block.get("path") or (block.get("data") if block.get("source_type") == "url" else None)
    if isinstance(url, str):
        return _image_from_url(url, policy)
    if block.get("file_id") or block.get("source_type") == "id":
        raise UnsupportedContentError("image file_id references cannot be resolved here; pass base64 or a data: URL")
    raise UnsupportedContentError("image block without base64 data, url or path")
