"""load_model: names, tiny models, local checkpoint directories (text and vision-language)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emloc_agents import load_model
from emloc_agents.models.tiny import tiny_model
from emloc_agents.models.tiny_vlm import tiny_vlm


def test_tiny_names_and_sharing() -> None:
    assert load_model("tiny-llama") is load_model("tiny-llama")
    assert load_model("tiny-qwen2-vl").is_vision
    assert not load_model("tiny-qwen2").is_vision


def test_local_checkpoint_dir(tmp_path: Path) -> None:
    model, tok = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)
    assert lm.fingerprint() == load_model(str(tmp_path)).fingerprint()


def test_local_vlm_checkpoint_dir(tmp_path: Path) -> None:
    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.is_vision and lm.processor is not None


def test_missing_path_is_a_clear_error() -> None:
    from emloc_agents.models.sources import ModelSourceError

    with pytest.raises(ModelSourceError):
        load_model("/no/such/model/dir")


def _checkpoint(path: Path) -> Path:
    """A tiny llama checkpoint whose safetensors file is several MiB (wide MLPs)."""
    from transformers import AutoModelForCausalLM

    from emloc_agents.models.tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    config = tiny_config("llama", len(tok))
    config.intermediate_size = 1024
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path / "model.safetensors"


def _change_after_first_mib(weights: Path) -> None:
    """Flip one byte of the last tensor's data, beyond the first MiB; size stays the same."""
    import json
    import os
    import struct

    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    offset = 8 + n + end - 2  # a high byte of the last float of the last tensor
    assert offset > 1 << 20 and len(data) > 2 << 20
    data[offset] ^= 0x01
    weights.write_bytes(bytes(data))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_checkpoints_differing_after_the_first_mib_get_two_fingerprints_and_two_memories(tmp_path: Path) -> None:
    import shutil

    from emloc_agents import EMLoCConfig, MemoryRegistry
    from emloc_agents.models import loader
    from emloc_agents.store import MemoryStore
    from tests.conftest import make_skill

    cache = tmp_path / "cache"
    weights = _checkpoint(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _change_after_first_mib(tmp_path / "b" / "model.safetensors")
    a, b = (tmp_path / d / "model.safetensors" for d in "ab")
    assert a.read_bytes()[: 1 << 20] == b.read_bytes()[: 1 << 20] and a.stat().st_size == b.stat().st_size
    assert loader._weights_id(tmp_path / "a", cache) != loader._weights_id(tmp_path / "b", cache)
    lm_a = load_model(str(tmp_path / "a"), cache_dir=cache)
    lm_b = load_model(str(tmp_path / "b"), cache_dir=cache)
    assert lm_a.fingerprint() != lm_b.fingerprint()

    # the same directory overwritten in place: a new load sees new weights, a new fingerprint, a new memory
    store, skill, config = MemoryStore(), make_skill(4), EMLoCConfig(keep_ratios=(1.0,))
    before = MemoryRegistry(model=lm_a, store=store, config=config)
    before.add(skill)
    before.get(skill.name)
    _change_after_first_mib(weights)
    loader._LOADED.pop((str(tmp_path / "a"), "cpu", "float32"))
    lm_new = load_model(str(tmp_path / "a"), cache_dir=cache)
    assert lm_new.name == lm_a.name and lm_new.fingerprint() not in (lm_a.fingerprint(), lm_b.fingerprint())
    after = MemoryRegistry(model=lm_new, store=store, config=config)
    assert after.key(skill) != before.key(skill)
    after.get(skill.name)
    assert after.compressions == 1  # not served the old checkpoint's memory
    assert len(list(store.yield_keys(prefix="memory:"))) == 2
