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
