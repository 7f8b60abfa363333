"""On-disk format of a compressed memory: safetensors tensors + one JSON envelope in the metadata.

Why safetensors: loading must never execute code (no pickle, no ``torch.load``), and the file should
be readable by other tools. Tensors are ``k.{l}``, ``v.{l}``, ``p.{l}`` per layer, in the dtype they
have, and ``b.{l}`` (float32 logit biases, format version 2) for the layers listed in the envelope's
``biased_layers``; a memory without biases is written as version 1, byte for byte as before. The
safetensors ``metadata`` holds a single key ``"emloc"`` with a JSON envelope: format version, the caller's header (model fingerprint, config, skill hash ... passed through opaquely),
the memory's scalars, and a sha256 over the tensors so corruption is detected instead of silently
producing a wrong answer. Every failure to load raises ``MemoryFormatError``.

The store knows bytes, not the engine: ``dump_memory`` takes any object with a memory's fields (the
engine's ``CompressedMemory`` has them) and ``load_memory`` returns a plain ``MemoryRecord``, or
whatever ``factory`` builds from the same fields (the registry passes ``CompressedMemory``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MemoryFormatError",
    "MemoryLike",
    "MemoryRecord",
    "dump_memory",
    "load_memory",
    "read_info",
]

FORMAT_NAME = "emloc-memory"
FORMAT_VERSION = 1  # a memory without logit biases; one with them is version 2 (``b.{l}`` tensors)
READ_VERSIONS = (1, 2)
METADATA_KEY = "emloc"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_POSITION_DTYPES = (torch.int32, torch.int64)


class MemoryFormatError(ValueError):
    """The bytes are not a valid, intact emloc memory (truncated, foreign, corrupt, inconsistent)."""


class MemoryLike(Protocol):
    """What ``dump_memory`` reads: per-layer keys/values/positions and the memory's scalars."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    original_length: int
    sliding: list[bool]
    render_mode: str
    next_position: int | None
    header: dict[str, Any]
    stats: dict[str, Any]
    logit_bias: list[torch.Tensor | None] | None


@dataclass
class MemoryRecord:
    """A loaded memory file: the tensors and scalars, with no engine behaviour attached."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    original_length: int
    sliding: list[bool]
    render_mode: str = "plain"
    next_position: int | None = None
    header: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    logit_bias: list[torch.Tensor | None] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def layer_lengths(self) -> list[int]:
        return [int(k.shape[-2]) for k in self.keys]


T = TypeVar("T")


def _tensor_names(num_layers: int, biased: Sequence[int] = ()) -> list[str]:
    return ([f"{kind}.{layer}" for layer in range(num_layers) for kind in ("k", "v", "p")]
            + [f"b.{layer}" for layer in biased])


def _checksum(tensors: dict[str, torch.Tensor], num_layers: int, biased: Sequence[int] = ()) -> str:
    """sha256 over name, dtype, shape and raw bytes of every tensor, in layer order (biases last)."""
    h = hashlib.sha256()
    for name in _tensor_names(num_layers, biased):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _check_layer(layer: int, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, length: int | None) -> None:
    """Shape/dtype rules shared by dump (ValueError) and load (MemoryFormatError)."""
    if k.dim() < 2 or v.dim() != k.dim():
        raise ValueError(
            f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} must be >= 2-D alike"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"layer {layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} disagree")
    if not (k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"layer {layer}: keys/values must be floating point, got {k.dtype}/{v.dtype}")
    if p.dtype not in _POSITION_DTYPES:
        raise ValueError(f"layer {layer}: positions must be int32 or int64, got {p.dtype}")
    n = int(k.shape[-2])
    if length is not None and n != length:
        raise ValueError(f"layer {layer}: {n} tokens stored but header says {length}")
    if p.dim() < 1 or int(p.shape[-1]) != n:
        raise ValueError(f"layer {layer}: positions {tuple(p.shape)} do not cover {n} tokens")
    if p.dim() == k.dim() - 1 and p.shape != k.shape[:-1]:
        raise ValueError(f"layer {layer}: positions {tuple(p.shape)} do not match keys {tuple(k.shape)}")


def _check_bias(layer: int, b: torch.Tensor, k: torch.Tensor) -> None:
    """A layer's logit bias: one float per key slot and head, (kv_heads, slots) like the keys."""
    if not b.is_floating_point() or tuple(b.shape) != tuple(k.shape[:-1]):
        raise ValueError(f"layer {layer}: logit bias {b.dtype} {tuple(b.shape)} must be float, shaped like "
                         f"keys {tuple(k.shape[:-1])}")


def dump_memory(mem: MemoryLike, header: dict[str, Any] | None = None) -> bytes:
    """Serialise ``mem``; ``header`` (JSON-able) is merged over ``mem.header`` and stored verbatim."""
    n = len(mem.keys)
    if not (len(mem.values) == len(mem.positions) == len(mem.sliding) == n):
        raise ValueError("keys, values, positions and sliding must have one entry per layer")
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(n):
        k, v, p = mem.keys[layer], mem.values[layer], mem.positions[layer]
        _check_layer(layer, k, v, p, None)
        for kind, t in (("k", k), ("v", v), ("p", p)):
            # Own, contiguous CPU copies: safetensors refuses views and shared storage.
            tensors[f"{kind}.{layer}"] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    bias = getattr(mem, "logit_bias", None) or [None] * n
    if len(bias) != n:
        raise ValueError("logit_bias must have one entry (or None) per layer")
    biased = [layer for layer in range(n) if bias[layer] is not None]
    for layer in biased:
        b = bias[layer]
        assert b is not None
        _check_bias(layer, b, mem.keys[layer])
        tensors[f"b.{layer}"] = b.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
    envelope = {
        "format": FORMAT_NAME,
        "format_version": 2 if biased else FORMAT_VERSION,
        **({"biased_layers": biased} if biased else {}),
        "header": {**mem.header, **(header or {})},
        "num_layers": n,
        "layer_lengths": [int(k.shape[-2]) for k in mem.keys],
        "original_length": int(mem.original_length),
        "sliding": [bool(s) for s in mem.sliding],
        "render_mode": str(mem.render_mode),
        "next_position": None if mem.next_position is None else int(mem.next_position),
        "stats": dict(mem.stats),
        "created": time.time(),
        "checksum": {"algorithm": "sha256", "digest": _checksum(tensors, n, biased)},
    }
    try:
        text = json.dumps(envelope, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"memory header/stats must be JSON-serialisable: {exc}") from exc
    return st_save(tensors, metadata={METADATA_KEY: text})


def _fail(msg: str) -> MemoryFormatError:
    return MemoryFormatError(f"not a valid emloc memory: {msg}")


def _is_int(x: object) -> bool:
    return type(x) is int


def read_info(data: bytes) -> dict[str, Any]:
    """The JSON envelope (header, lengths, created, ...) without loading tensors: cheap inspection."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise _fail(f"{len(data)} bytes is too short")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or 8 + size > len(data):
        raise _fail("truncated or foreign bytes (bad safetensors header length)")
    try:
        st_header = json.loads(data[8 : 8 + size].decode("utf-8"))
        text = st_header["__metadata__"][METADATA_KEY]
        info = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise _fail(f"missing or unreadable emloc metadata ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise _fail("metadata is not an emloc memory envelope")
    version = info.get("format_version")
    if version not in READ_VERSIONS or not _is_int(version):
        raise _fail(f"unsupported format_version {version!r} (this build reads {READ_VERSIONS})")
    _check_envelope(info)
    return info


def _check_envelope(info: dict[str, Any]) -> None:
    n = info.get("num_layers")
    if type(n) is not int or n < 0:
        raise _fail(f"bad num_layers {n!r}")
    lengths, sliding = info.get("layer_lengths"), info.get("sliding")
    if not isinstance(lengths, list) or len(lengths) != n or not all(_is_int(x) and x >= 0 for x in lengths):
        raise _fail("layer_lengths must be one non-negative int per layer")
    if not isinstance(sliding, list) or len(sliding) != n or not all(type(s) is bool for s in sliding):
        raise _fail("sliding must be one bool per layer")
    if not _is_int(info.get("original_length")) or info["original_length"] < 0:
        raise _fail("bad original_length")
    nxt = info.get("next_position")
    if "next_position" not in info or (nxt is not None and not _is_int(nxt)):
        raise _fail("bad next_position")
    if not isinstance(info.get("render_mode"), str):
        raise _fail("bad render_mode")
    if not isinstance(info.get("header"), dict) or not isinstance(info.get("stats"), dict):
        raise _fail("header and stats must be objects")
    biased = info.get("biased_layers", [])
    if (not isinstance(biased, list) or not all(_is_int(x) and 0 <= x < n for x in biased)
            or biased != sorted(set(biased)) or bool(biased) != (info["format_version"] == 2)):
        raise _fail("biased_layers must be increasing layer indices, present in version 2 only")
    checksum = info.get("checksum")
    if (
        not isinstance(checksum, dict)
        or checksum.get("algorithm") != "sha256"
        or not isinstance(checksum.get("digest"), str)
    ):
        raise _fail("missing sha256 checksum")


@overload
def load_memory(data: bytes) -> MemoryRecord: ...
@overload
def load_memory(data: bytes, factory: Callable[..., T]) -> T: ...
def load_memory(data: bytes, factory: Callable[..., Any] = MemoryRecord) -> Any:
    """Parse and fully validate bytes from ``dump_memory``; any problem raises ``MemoryFormatError``.

    ``factory`` builds the result from the fields of ``MemoryRecord`` as keyword arguments (the
    registry passes the engine's ``CompressedMemory``)."""
    info = read_info(data)
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise _fail(f"safetensors payload unreadable ({exc})") from exc
    n, biased = info["num_layers"], info.get("biased_layers", [])
    expected = set(_tensor_names(n, biased))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise _fail(f"layer count mismatch (missing {missing[:6]}, unexpected {extra[:6]})")
    for layer in range(n):
        try:
            _check_layer(
                layer,
                tensors[f"k.{layer}"],
                tensors[f"v.{layer}"],
                tensors[f"p.{layer}"],
                info["layer_lengths"][layer],
            )
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    for layer in biased:
        try:
            _check_bias(layer, tensors[f"b.{layer}"], tensors[f"k.{layer}"])
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    if not hmac.compare_digest(_checksum(tensors, n, biased), info["checksum"]["digest"]):
        raise _fail("checksum mismatch (tensor bytes are corrupt)")
    return factory(
        keys=[tensors[f"k.{layer}"] for layer in range(n)],
        values=[tensors[f"v.{layer}"] for layer in range(n)],
        positions=[tensors[f"p.{layer}"] for layer in range(n)],
        original_length=info["original_length"],
        sliding=list(info["sliding"]),
        render_mode=info["render_mode"],
        next_position=info["next_position"],
        header=dict(info["header"]),
        stats=dict(info["stats"]),
        logit_bias=[tensors.get(f"b.{layer}") for layer in range(n)] if biased else None,
    )
