"""The cookbook's committed notebooks match their source (cookbook/_build.py) and were executed cleanly.

Cheap checks (no kernel): executing them is ``pytest --nbmake cookbook/`` (CI).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

COOKBOOK = Path(__file__).resolve().parents[1] / "cookbook"


def _build_module():
    spec = importlib.util.spec_from_file_location("cookbook_build", COOKBOOK / "_build.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()
NAMES = list(BUILD.NOTEBOOKS)


def test_readme_lists_every_notebook() -> None:
    readme = (COOKBOOK / "README.md").read_text()
    for name in NAMES:
        assert f"{name}.ipynb" in readme


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_source(name: str) -> None:
    committed = nbformat.read(COOKBOOK / f"{name}.ipynb", as_version=4)
    built = BUILD.build(name)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"{name}.ipynb differs from cookbook/_build.py: run `python cookbook/_build.py --execute {name[:2]}`"
    )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_shape_and_outputs(name: str) -> None:
    nb = nbformat.read(COOKBOOK / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "What this notebook teaches" in nb.cells[0].source
    assert nb.cells[-1].cell_type == "markdown" and "Where to go next" in nb.cells[-1].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}: committed without executing every cell"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: committed with an error output: {errors[0].get('ename')}"
