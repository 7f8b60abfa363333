"""Devices: load_model/registry/CLI device options, and a guard that every tensor the engine makes is
made on the model's device (checked on the CPU: a factory call in engine code without ``device=``
is a tensor that lands on the CPU when the model runs on a GPU)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import emloc_agents
from emloc_agents import EMLoCConfig, MemoryRegistry, compress
from emloc_agents.bench.presses import KVzipPress, RandomPress, SnapKVPress, StreamingLLMPress, UniformPress
from emloc_agents.engine.decode import generate, score_continuations
from emloc_agents.models import loader
from emloc_agents.models.lm import LanguageModel
from emloc_agents.models.tiny import tiny_model
from emloc_agents.store import MemoryStore

from .conftest import make_skill

PACKAGE = Path(emloc_agents.__file__).parent
GUARDED = (PACKAGE / "engine", PACKAGE / "tools.py")  # code that makes tensors for the model
FACTORIES = ("tensor", "as_tensor", "arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint",
             "randperm", "linspace", "Generator")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class StrayTensors:
    """Wraps torch's tensor factories; records each call made from guarded code without ``device=``
    or with a device other than ``expected``."""

    def __init__(self, expected: torch.device) -> None:
        self.expected = torch.device(expected)
        self.strays: list[str] = []

    def wrap(self, name: str, fn):
        def factory(*args, **kwargs):
            frame = sys._getframe(1)
            where = Path(frame.f_code.co_filename)
            if any(where == g or g in where.parents for g in GUARDED):
                device = kwargs.get("device")
                if device is None or not _same_device(torch.device(device), self.expected):
                    self.strays.append(f"torch.{name} at {where.relative_to(PACKAGE)}:{frame.f_lineno} "
                                       f"(device={device!r})")
            return fn(*args, **kwargs)

        return factory


@pytest.fixture
def stray_tensors(monkeypatch) -> Iterator[StrayTensors]:
    guard = StrayTensors(torch.device("cpu"))
    for name in FACTORIES:
        monkeypatch.setattr(torch, name, guard.wrap(name, getattr(torch, name)))
    yield guard


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    model, tok = tiny_model("llama")
    return LanguageModel(model, tok, "tiny-llama")


PRESSES = {
    "emloc-answers": lambda: None,  # the default EMLoCPress from the config (answers-scope search)
    "emloc-exact": lambda: None,  # the paper's reference search (exact scope, one candidate at a time)
    "uniform": lambda: UniformPress(0.3),
    "snapkv": lambda: SnapKVPress(0.3),
    "streaming-llm": lambda: StreamingLLMPress(0.3),
    "random": lambda: RandomPress(0.3),
    "kvzip": lambda: KVzipPress(0.3),
    "context": lambda: None,  # compression="context" (engine/context.py)
}


@pytest.mark.parametrize("press", list(PRESSES))
def test_engine_makes_its_tensors_on_the_model_device(lm, stray_tensors, press: str) -> None:
    config = EMLoCConfig(delta=0.5, demos_per_chunk=2)
    if press == "emloc-exact":
        config = EMLoCConfig.reference().model_copy(update={"delta": 0.5, "demos_per_chunk": 2})
    if press == "context":
        config = config.model_copy(update={"compression": "context"})
    mem = compress(lm, make_skill(6), config, press=PRESSES[press]())
    ids = lm.tokenizer("Review: a fine film\nSentiment:", add_special_tokens=False)["input_ids"]
    generate(lm, ids, mem, max_new_tokens=3, temperature=0.8, top_p=0.9, seed=1)
    score_continuations(lm, ids, [[5, 6, 7], [8]], mem)
    assert not stray_tensors.strays, "tensors made off the model's device:\n" + "\n".join(stray_tensors.strays)


def test_the_guard_sees_a_stray(stray_tensors) -> None:
    from emloc_agents.engine import replay

    replay._keep_masks([None, torch.tensor([[0]], device="cpu")], 1, 2)  # device given: fine
    assert not stray_tensors.strays
    exec(compile("torch.zeros(2)", str(PACKAGE / "engine" / "replay.py"), "exec"), {"torch": torch})
    assert len(stray_tensors.strays) == 1 and "engine/replay.py" in stray_tensors.strays[0]


# ---- options --------------------------------------------------------------------------------------


def test_resolve_device_and_dtype(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader.resolve_device("auto") == torch.device("cpu")
    assert loader.resolve_device("cpu") == torch.device("cpu")
    assert loader.resolve_dtype("auto", "cpu") == "float32"
    assert loader.resolve_dtype("auto", "cuda") == "bfloat16"
    assert loader.resolve_dtype("float16", "cpu") == "float16"
    for bad in ("gpu", "cuda:x", "tpu", "", 3):
        with pytest.raises(ValueError, match="device"):
            loader.resolve_device(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not available"):
        loader.resolve_device("cuda")
    with pytest.raises(ValueError, match="not available"):
        loader.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="dtype"):
        loader.resolve_dtype("float64", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loader.resolve_device("auto") == torch.device("cuda")
    assert loader.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="2 CUDA"):
        loader.resolve_device("cuda:2")


def test_load_model_device_options() -> None:
    a = loader.load_model("tiny-llama", device="cpu")
    assert a.device == torch.device("cpu") and a.dtype == torch.float32
    assert loader.load_model("tiny-llama", device="cpu", dtype="float32") is a
    assert loader.load_model("tiny-llama") is (a if not torch.cuda.is_available() else loader.load_model("tiny-llama"))
    assert ("tiny-llama", "cpu", "float32") in loader._LOADED
    with pytest.raises(ValueError, match="unknown device"):
        loader.load_model("tiny-llama", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            loader.load_model("tiny-llama", device="cuda")


def test_registry_device_and_memories_moved_once(lm) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        MemoryRegistry("tiny-llama", device="gpu")
    reg = MemoryRegistry(lm, store=MemoryStore(), config=EMLoCConfig(delta=0.5))
    skill = reg.add(make_skill(4))
    mem = reg.get(skill)
    assert all(t.device == lm.device for t in (*mem.keys, *mem.values, *mem.positions))
    assert reg.get(skill) is mem  # from RAM: no copy per call
    assert mem.to(device=lm.device) is mem
    fresh = MemoryRegistry(lm, store=reg.store, config=reg.config)
    assert fresh.get(skill.name).keys[0].device == lm.device  # the store's bytes load to the CPU, then move
    assert fresh.info(skill.name).source == "store"


def test_cli_device_option(tmp_path, capsys) -> None:
    from emloc_agents.cli import build_parser, main

    assert build_parser().parse_args(["--device", "cpu", "skills", "ls"]).device == "cpu"
    assert build_parser().parse_args(["skills", "ls"]).device == "auto"
    code = main(["--model", "tiny-llama", "--cache-dir", str(tmp_path), "--device", "gpu", "skills", "ls"])
    assert code != 0 and "unknown device" in capsys.readouterr().err


def test_engine_forwards_on_cuda_leave_cudnn_attention_out() -> None:
    """cuDNN's SDPA plans a kernel per new shape, and the engine's shapes rarely repeat: inside an
    engine forward on CUDA only flash, memory-efficient and math kernels are allowed; on the CPU,
    and outside, torch's own choice stands."""
    from emloc_agents.engine import forward

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with forward.attention_backends(torch.device("cuda", 0)):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with forward.attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_model_spread_over_devices_is_refused_clearly() -> None:
    """device_map can put a model's layers on several devices; the engine keeps each memory on one, so
    such a model is refused by name instead of failing inside a forward."""
    model, tok = tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    with pytest.raises(ValueError, match=r"spread over 0, 1 \(device_map\).*one device"):
        LanguageModel(model, tok, "tiny-split")
    model.hf_device_map = {"": 0}  # accelerate's map of a model on one device
    LanguageModel(model, tok, "tiny-one")


def test_dtype_option_of_registry_chat_model_and_cli(tmp_path) -> None:
    """``dtype="auto"`` (the default) loads float32 on the CPU and keys memories as float32 did, so
    memories stored before the option stay valid; bfloat16 loads a bfloat16 model under another key.
    The chat model and the CLI pass the option to the registry they make."""
    from emloc_agents.chat_model import EMLoCChatModel
    from emloc_agents.cli import _registry, build_parser

    skill = make_skill(4)
    auto = MemoryRegistry("tiny-llama", store=MemoryStore())
    assert auto.dtype == "auto" and auto.lm.dtype == torch.float32
    assert auto.key(skill) == MemoryRegistry("tiny-llama", store=MemoryStore(), dtype="float32").key(skill)
    half = MemoryRegistry("tiny-llama", store=MemoryStore(), dtype="bfloat16")
    assert half.lm.dtype == torch.bfloat16 and half.key(skill) != auto.key(skill)
    with pytest.raises(ValueError, match="dtype"):
        MemoryRegistry("tiny-llama", store=MemoryStore(), dtype="float64")
    # the compression config holds no model option; an old dump with the default still loads
    assert EMLoCConfig.model_validate({"dtype": "auto"}) == EMLoCConfig()
    with pytest.raises(ValueError, match=r"MemoryRegistry\(model, dtype=...\)"):
        EMLoCConfig.model_validate({"dtype": "bfloat16"})
    chat = EMLoCChatModel(model="tiny-llama", cache_dir=str(tmp_path), dtype="bfloat16")
    assert chat.get_registry().lm.dtype == torch.bfloat16
    assert EMLoCChatModel(model="tiny-llama", cache_dir=str(tmp_path)).get_registry().lm.dtype == torch.float32
    args = build_parser().parse_args(["--model", "tiny-llama", "--cache-dir", str(tmp_path), "--dtype", "bfloat16",
                                      "skills", "ls"])
    assert _registry(args, progress=False).dtype == "bfloat16"
    assert build_parser().parse_args(["skills", "ls"]).dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dtype", "float64", "skills", "ls"])
