"""A compression method is one module with one entry point, registered by name: a method defined here and
registered here is what ``compress`` runs for ``EMLoCConfig(compression=name)``, and what a
``MemoryRegistry`` with that config builds, keys and stores, with nothing in the engine changed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from emloc_agents import EMLoCConfig, MemoryRegistry, Skill, compress
from emloc_agents.config import METHOD_NAMES
from emloc_agents.engine import METHODS, CompressedMemory, register_method
from emloc_agents.engine.chunk_loop import prefill
from emloc_agents.engine.compress import method_name
from emloc_agents.engine.forward import ModelHandle
from emloc_agents.engine.presses import Press
from emloc_agents.engine.reconstruct import keep_tokens

from .conftest import make_skill

CALLS: list[str] = []


def recent_half(lm: ModelHandle, skill: Skill, config: EMLoCConfig, press: Press | None = None,
                progress: Callable[[int, int], None] | None = None) -> CompressedMemory:
    """A toy method: the unpruned context, each full-attention layer keeping its most recent half."""
    CALLS.append(skill.name)
    full = prefill(lm, skill, config.prompt_format, config.storage_dtype)
    n, heads = full.original_length, full.keys[0].shape[0]
    kept = {i: torch.arange(n // 2, n)[None].expand(heads, -1) for i in range(full.num_layers) if not full.sliding[i]}
    memory = keep_tokens(full, kept)
    memory.stats = {"press": "recent-half"}
    return memory


@pytest.fixture
def toy() -> Iterator[str]:
    register_method("recent-half", recent_half)
    CALLS.clear()
    yield "recent-half"
    METHODS.pop("recent-half")
    METHOD_NAMES.discard("recent-half")


def test_the_builtin_methods_are_registered() -> None:
    assert {"chunks", "context"} <= set(METHODS) and {"chunks", "context"} <= METHOD_NAMES
    with pytest.raises(ValueError, match="registered method"):
        EMLoCConfig(compression="recent-half")
    with pytest.raises(ValueError, match="not a method"):
        register_method("auto", recent_half)


def test_auto_resolves_once_to_one_method(tiny_llama) -> None:
    skill = make_skill(8)
    assert method_name(tiny_llama, skill, EMLoCConfig()) == "context"
    assert method_name(tiny_llama, skill, EMLoCConfig(demos_per_chunk=2)) == "chunks"  # a loop knob set
    assert method_name(tiny_llama, skill, EMLoCConfig(keep_ratios=(1.0,))) == "chunks"  # nothing pruned
    assert method_name(tiny_llama, skill, EMLoCConfig(compression="context"), press=Press()) == "chunks"
    with pytest.raises(ValueError, match="takes no press"):
        METHODS["context"](tiny_llama, skill, EMLoCConfig(), press=Press())


def test_a_registered_method_is_what_compress_runs(tiny_llama, toy: str) -> None:
    skill = make_skill(8)
    mem = compress(tiny_llama, skill, EMLoCConfig(compression=toy))
    assert CALLS == ["sentiment"] and mem.stats["press"] == "recent-half"
    n = mem.original_length
    assert all(bool((p == torch.arange(n // 2, n)).all()) for p in mem.positions)
    assert EMLoCConfig(compression=toy).fingerprint() != EMLoCConfig().fingerprint()


def test_a_registry_builds_keys_and_stores_a_registered_method(tmp_path: Path, tiny_llama, toy: str) -> None:
    config = EMLoCConfig(compression=toy)
    reg = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path, config=config)
    reg.add(make_skill(8))
    mem = reg.get("sentiment")
    assert CALLS == ["sentiment"] and reg.last_info["sentiment"].source == "compressed"
    assert reg.header(reg.skill("sentiment"))["config"]["compression"] == toy
    assert reg.key("sentiment") != MemoryRegistry(model=tiny_llama, cache_dir=tmp_path).key("sentiment")
    again = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path, config=config)
    loaded = again.get("sentiment")
    assert again.last_info["sentiment"].source == "store" and CALLS == ["sentiment"]
    assert all(torch.equal(a, b) for a, b in zip(mem.positions, loaded.positions, strict=True))


def test_the_bench_runs_a_registered_method(tmp_path: Path, toy: str) -> None:
    from emloc_agents.bench.methods import compression_method, order_methods
    from emloc_agents.bench.run import run_bench

    from .test_bench import make_task

    assert order_methods(["emloc-recent-half", "full-icl-cached"]) == ["full-icl-cached", "emloc-recent-half"]
    with pytest.raises(ValueError, match="emloc-NAME"):
        order_methods(["emloc-not-registered"])
    register_method("share", recent_half)  # the bench's own emloc-share keeps its meaning
    try:
        assert compression_method("emloc-share") is None and compression_method("emloc-recent-half") == toy
    finally:
        METHODS.pop("share")
        METHOD_NAMES.discard("share")
    rows = run_bench([make_task(tmp_path / "mini")], model="tiny-llama", methods=["full-icl-cached", "emloc-recent-half"],
                     shots=[4], seeds=[0], limit=4, out=tmp_path / "out", plots=False, progress=False)
    by = {r["method"]: r for r in rows}
    assert CALLS == ["mini"] and by["emloc-recent-half"]["agreement"] is not None
    assert 0.45 <= by["emloc-recent-half"]["kept_ratio"] <= 0.55
