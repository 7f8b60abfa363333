"""The `emloc` CLI: each command end to end on a tiny model; user mistakes give one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emloc_agents.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def skill_dir(tmp_path: Path) -> Path:
    d = tmp_path / "skills"
    d.mkdir()
    demos = [{"input": f"Review: fine film {i}\nSentiment:", "output": "positive"} for i in range(5)]
    (d / "mood.json").write_text(json.dumps({"name": "mood", "instruction": "Say the mood.", "demonstrations": demos}))
    return d


def test_compress_ls_info_export_import_rm(capsys, tmp_path: Path, skill_dir: Path) -> None:
    base = ["--model", "tiny-llama", "--cache-dir", str(tmp_path / "cache")]
    code, out, _ = _run(capsys, *base, "compress", str(skill_dir))
    assert code == 0 and "mood:" in out and "kept" in out
    code, out, _ = _run(capsys, *base, "skills", "ls")
    assert code == 0 and out.startswith("mood\t5 demos")
    code, out, _ = _run(capsys, *base, "skills", "info", "mood")
    assert "compressed: yes" in out and "method " in out and ("validation" in out or "whole context" in out)
    f = tmp_path / "mood.emloc"
    assert _run(capsys, *base, "skills", "export", "mood", str(f))[0] == 0 and f.is_file()
    other = ["--model", "tiny-llama", "--cache-dir", str(tmp_path / "other")]
    code, out, _ = _run(capsys, *other, "skills", "import", str(f))
    assert code == 0 and "mood" in out
    code, out, _ = _run(capsys, *other, "chat", "--skill", "mood", "--max-tokens", "2", "Review: ok\nSentiment:")
    assert code == 0
    assert _run(capsys, *base, "skills", "rm", "mood")[0] == 0
    assert _run(capsys, *base, "skills", "ls")[1] == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["skills", "info", "nope"], "unknown skill 'nope'"),
        (["compress", "/no/such/dir"], "not found"),
        (["skills", "import", "/no/such/file.emloc"], "no such memory file"),
        (["chat", "--skill", "nope", "hi"], "unknown skill"),
    ],
)
def test_user_errors_are_one_line(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = _run(capsys, "--model", "tiny-llama", "--cache-dir", str(tmp_path), *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("emloc: error:") and message in err


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emloc_agents.cli", "--model", "someorg/not-here", "--cache-dir", str(tmp_path), "chat", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "gemma-3-270m" in proc.stderr and "smollm2-135m" in proc.stderr


def test_cli_model_default(monkeypatch) -> None:
    """The CLI runs on the library's default model (in the package) unless --model or EMLOC_DEFAULT_MODEL
    says otherwise."""
    import emloc_agents.cli as cli
    from emloc_agents.models.sources import DEFAULT_MODEL

    seen = []
    monkeypatch.setattr(cli, "cmd_chat", lambda args: seen.append(args.model) or 0)
    monkeypatch.delenv("EMLOC_DEFAULT_MODEL", raising=False)
    main(["chat", "hi"])
    monkeypatch.setenv("EMLOC_DEFAULT_MODEL", "qwen2.5-coder-0.5b")
    main(["chat", "hi"])
    main(["--model", "tiny-llama", "chat", "hi"])
    assert seen == [cli.CLI_MODEL, "qwen2.5-coder-0.5b", "tiny-llama"]
    assert cli.CLI_MODEL == DEFAULT_MODEL == "smollm2-135m"


def test_compression_option_reaches_the_registry(capsys, tmp_path: Path, skill_dir: Path) -> None:
    from emloc_agents import EMLoCConfig, MemoryRegistry

    base = ["--model", "tiny-llama", "--cache-dir", str(tmp_path / "cache"), "--compression", "chunks"]
    code, out, _ = _run(capsys, *base, "compress", str(skill_dir))
    assert code == 0 and "mood:" in out
    chunks = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path / "cache", config=EMLoCConfig(compression="chunks"))
    default = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path / "cache")
    assert chunks.cached("mood") and not default.cached("mood")  # a different config, a different memory
    assert chunks.get("mood").stats["press"] == "emloc"
    code, out, _ = _run(capsys, *base[:-2], "compress", str(skill_dir))  # the default: auto, the whole context
    assert code == 0 and default.cached("mood") and default.get("mood").stats["press"] == "context"


@pytest.mark.parametrize(("args", "message"), [
    (("serve", "--ray"), "--ray needs --store redis://"),
    (("serve", "--replicas", "2"), "--replicas needs --ray"),
    (("serve", "--store", "/tmp/nope"), "--store takes a Redis URL"),
])
def test_serve_scale_out_mistakes_are_one_line(capsys, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """``emloc serve --ray`` needs the store every replica shares; checked before anything starts."""
    code, _, err = _run(capsys, "--model", "tiny-llama", "--cache-dir", str(tmp_path), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
