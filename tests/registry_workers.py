"""Bodies for the registry's multi-process tests (spawned children import this module)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def race(cache_dir: str, out: str) -> None:
    from emloc_agents import MemoryRegistry
    from tests.conftest import make_skill

    reg = MemoryRegistry(model="tiny-llama", cache_dir=cache_dir)
    reg.add(make_skill(8))
    mem = reg.get("sentiment")
    Path(out).write_text(f"{reg.compressions} {mem.original_length}")


def compress_then_hang(cache_dir: str, marker: str) -> None:
    """Starts compressing, signals, then hangs inside the compression (to be killed with -9)."""
    from emloc_agents import MemoryRegistry
    from tests.conftest import make_skill

    reg = MemoryRegistry(model="tiny-llama", cache_dir=cache_dir, lock_expire=2.0)
    reg.add(make_skill(8))
    real = reg._compress

    def slow(skill):
        mem = real(skill)
        Path(marker).touch()
        time.sleep(600)
        return mem

    reg._compress = slow  # type: ignore[method-assign]
    reg.get("sentiment")


def load_without_forward(cache_dir: str, out: str) -> None:
    """A fresh process: the memory must come from disk with no forward pass at all."""
    from emloc_agents import MemoryRegistry
    from emloc_agents.engine.forward import backbone

    reg = MemoryRegistry(model="tiny-llama", cache_dir=cache_dir)

    def forbid(*args, **kwargs):
        raise AssertionError("a forward pass ran while loading a stored memory")

    backbone(reg.lm.model).register_forward_pre_hook(forbid)
    t0 = time.perf_counter()
    mem = reg.get("sentiment")
    Path(out).write_text(f"{reg.last_info['sentiment'].source} {mem.original_length} {time.perf_counter() - t0:.4f}")
