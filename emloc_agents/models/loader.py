"""load_model: a name, a checkpoint dir, a .gguf file or a hub id -> a ready LanguageModel.

Loaded models are shared per process (keyed by source and dtype), so many chat-model instances
and registries use one set of weights.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .lm import LanguageModel

DEFAULT_MODEL = "smollm2-135m"
_LOADED: dict[tuple[str, str], LanguageModel] = {}
_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    return Path(os.environ.get("EMLOC_CACHE_DIR", "~/.cache/emloc-agents")).expanduser()


def load_model(name: str = "default", dtype: str = "float32", cache_dir: str | Path | None = None) -> LanguageModel:
    """Load (once per process) ``"default"``, ``"gemma-3-270m"``, ``"smollm2-135m"``, ``"tiny-<arch>"``,
    a local checkpoint directory, a ``.gguf`` file, or a hub id already in the local HF cache."""
    if isinstance(name, LanguageModel):
        return name
    key = (str(name), dtype)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        lm = _load(str(name), dtype, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
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
        return LanguageModel(vlm, processor.tokenizer, name, weights_id=_weights_id(directory), processor=processor)
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    return LanguageModel(model, tok, name, weights_id=_weights_id(directory))


def _weights_id(directory: Path) -> str | None:
    """The GGUF hash recorded at conversion, or the safetensors files' sizes and names (cheap)."""
    marker = directory / "emloc_source.json"
    if marker.is_file():
        import json

        data = json.loads(marker.read_text())
        return str(data.get("sha256") or data)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    import hashlib

    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()
