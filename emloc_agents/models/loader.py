"""load_model: a name, a checkpoint dir, a .gguf file or a hub id -> a ready LanguageModel.

Loaded models are shared per process (keyed by source, device and dtype), so many chat-model
instances and registries use one set of weights.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .lm import LanguageModel
from .sources import DEFAULT_MODEL

_LOADED: dict[tuple[str, str, str], LanguageModel] = {}
DTYPES = ("float32", "bfloat16", "float16")
_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    return Path(os.environ.get("EMLOC_CACHE_DIR", "~/.cache/emloc-agents")).expanduser()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA when present, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``
    as a ``torch.device``; a ValueError for anything else or for a device this machine lacks."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' is not available on this machine (no Apple-silicon GPU / MPS build)")
        return torch.device("mps")
    kind, _, index = name.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch sees no CUDA GPU on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> str:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; else one of ``DTYPES`` (a ValueError otherwise)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto' or one of {', '.join(DTYPES)}")
    return dtype


def load_model(
    name: str = "default",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    device: str | torch.device = "auto",
) -> LanguageModel:
    """Load (once per process) ``"default"`` (``$EMLOC_DEFAULT_MODEL``, else ``"smollm2-135m"``, which the
    package carries), ``"gemma-3-270m"`` (extra ``gemma``), ``"qwen2.5-coder-0.5b"`` (extra ``qwen``),
    ``"qwen2.5-coder-1.5b"`` (extra ``qwen-1.5b``), ``"tiny-<arch>"``, a local checkpoint directory,
    a ``.gguf`` file, or a hub id already in the local HF cache.

    ``device``: ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
    ``"mps"``. ``dtype``: ``"auto"`` (bfloat16 on CUDA, float32 elsewhere), ``"float32"``,
    ``"bfloat16"`` or ``"float16"``. One copy per (name, device, dtype)."""
    if isinstance(name, LanguageModel):
        return name
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    key = (str(name), str(dev), dtype)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        lm = _load(str(name), dtype, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
        if dev.type != "cpu":
            lm.model.to(dev)
        _LOADED[key] = lm
        return lm


def _load(name: str, dtype: str, cache_dir: Path) -> LanguageModel:
    torch_dtype = getattr(torch, dtype)
    if name == "default":
        name = os.environ.get("EMLOC_DEFAULT_MODEL", DEFAULT_MODEL)
    if name.startswith("tiny-"):
        from .tiny import tiny_model
        from .tiny_vlm import TINY_VLM_ARCHS, load_tiny_vlm

        arch = name.removeprefix("tiny-").replace("-", "_")
        if arch in TINY_VLM_ARCHS:
            return load_tiny_vlm(arch)
        model, tok = tiny_model(arch)
        return LanguageModel(model.to(torch_dtype), tok, name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .sources import resolve_model_dir

    directory = resolve_model_dir(name, cache_dir=cache_dir)
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "vision_config", None) is not None:  # a vision-language checkpoint
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(directory)
        vlm = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch_dtype)
        weights_id = _weights_id(directory, cache_dir)
        return LanguageModel(vlm, processor.tokenizer, name, weights_id=weights_id, processor=processor)
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    return LanguageModel(model, tok, name, weights_id=_weights_id(directory, cache_dir))


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def _weights_id(directory: Path, cache_dir: Path | None = None) -> str | None:
    """The GGUF hash recorded at conversion, or the sha256 of every weight file, whole (two checkpoints
    that differ anywhere get two ids). Each file's hash is cached by path, size and mtime, so only the
    first load of a checkpoint reads it."""
    import json

    from .sources import MARKER, file_sha256

    marker = directory / MARKER
    if marker.is_file():
        data = json.loads(marker.read_text())  # holds gguf_sha256 (the whole GGUF file's hash)
        return str(data.get("sha256") or data)  # unchanged form: existing memory keys stay valid
    files = sorted({f for pattern in WEIGHT_FILES for f in directory.glob(pattern) if f.is_file()})
    if not files:
        return None
    return "files:" + ";".join(f"{f.name}:{file_sha256(f, cache_dir)}" for f in files)
