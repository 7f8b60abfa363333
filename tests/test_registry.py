"""MemoryRegistry: persistence, keys, corruption, concurrency across processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from emloc_agents import Demonstration, EMLoCConfig, MemoryRegistry, Skill
from emloc_agents.config import COST_FIELDS, TENSOR_FIELDS
from emloc_agents.registry import UnknownSkillError
from emloc_agents.store import MemoryStore

from . import registry_workers
from .conftest import make_skill


@pytest.fixture
def registry(tmp_path: Path, tiny_llama) -> MemoryRegistry:
    reg = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    reg.add(make_skill(8))
    return reg


def test_lazy_compress_then_ram_then_store(registry: MemoryRegistry, tmp_path: Path, tiny_llama) -> None:
    assert not registry.cached("sentiment")
    mem = registry.get("sentiment")
    assert registry.last_info["sentiment"].source == "compressed"
    assert registry.get("sentiment") is mem
    assert registry.last_info["sentiment"].source == "ram"
    other = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    again = other.get("sentiment")
    assert other.last_info["sentiment"].source == "store" and other.compressions == 0
    assert again.layer_lengths == mem.layer_lengths
    assert other.names() == ["sentiment"]


def test_the_certificate_is_stored_with_the_memory_and_read_without_it(registry: MemoryRegistry, tmp_path: Path,
                                                                        tiny_llama) -> None:
    """Every memory carries what its check measured; another process reads it from the store's
    envelope (no tensors loaded, nothing compressed), and a skill not compressed has none."""
    assert registry.certificate("sentiment") is None
    mem = registry.get("sentiment")
    cert = mem.certificate
    assert cert is not None and cert["method"] == "context" and cert["kept_ratio"] == pytest.approx(mem.kept_ratio, abs=1e-4)
    assert cert["validation_demonstrations"] >= 1 and cert["whole_context"] == (mem.kept_ratio == 1.0)
    other = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    assert other.certificate("sentiment") == cert and other.compressions == 0 and not other._ram
    assert mem.fidelity() in mem.describe()


def test_unknown_skill_lists_registered(registry: MemoryRegistry) -> None:
    with pytest.raises(UnknownSkillError, match="registered skills: sentiment"):
        registry.get("nope")


def test_ram_lru_is_bounded(tmp_path: Path, tiny_llama) -> None:
    reg = MemoryRegistry(model=tiny_llama, store=MemoryStore(), max_ram_memories=2)
    for i in range(3):
        reg.add(make_skill(4 + i, name=f"s{i}"))
        reg.get(f"s{i}")
    assert len(reg._ram) == 2
    reg.get("s0")
    assert reg.last_info["s0"].source == "store"


def _image(color: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_key_changes_with_what_determines_the_tensors(registry: MemoryRegistry, tmp_path: Path, tiny_llama) -> None:
    base = make_skill(8)
    key = registry.key(base)
    changed_text = base.model_copy(update={"demonstrations": [*base.demonstrations[:-1], Demonstration(input="x", output="y")]})
    assert registry.key(changed_text) != key
    assert registry.key(base.model_copy(update={"instruction": "Other."})) != key
    assert registry.key(base.model_copy(update={"description": "only words"})) == key
    other_config = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path, config=EMLoCConfig(delta=0.01))
    assert other_config.key(base) != key
    other_model = MemoryRegistry(model="tiny-qwen2", cache_dir=tmp_path)
    assert other_model.key(base) != key
    red = Skill(name="img", demonstrations=[Demonstration(input="a", output="b", images=[_image("red")])])
    blue = Skill(name="img", demonstrations=[Demonstration(input="a", output="b", images=[_image("blue")])])
    assert red.content_hash() != blue.content_hash()


def test_every_config_field_is_a_tensor_field_or_a_cost_field() -> None:
    """A new EMLoCConfig field must be put in one of the two sets: the key depends on it."""
    assert set(EMLoCConfig.model_fields) == TENSOR_FIELDS | COST_FIELDS
    assert not TENSOR_FIELDS & COST_FIELDS


@contextmanager
def no_forward_pass(lm):
    """Any forward pass of ``lm`` while inside raises (so nothing is compressed)."""
    from emloc_agents.engine.forward import backbone

    def forbid(*args, **kwargs):
        raise AssertionError("a forward pass ran")

    handle = backbone(lm.model).register_forward_pre_hook(forbid)
    try:
        yield
    finally:
        handle.remove()


def test_a_cost_only_knob_reuses_the_memory_and_a_tensor_field_recompresses(tmp_path: Path, tiny_llama) -> None:
    base = EMLoCConfig(compression="chunks", lookahead=1, batch_candidates=False)
    first = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path, config=base)
    first.add(make_skill(8))
    mem = first.get("sentiment")
    for cost in ({"lookahead": 8}, {"lookahead": None, "batch_candidates": True}):
        again = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path, config=base.model_copy(update=cost))
        assert again.key("sentiment") == first.key("sentiment")
        with no_forward_pass(tiny_llama):
            reused = again.get("sentiment")
        assert again.last_info["sentiment"].source == "store" and again.compressions == 0
        assert reused.layer_lengths == mem.layer_lengths
    for tensors in ({"keep_ratios": (0.2, 0.5)}, {"delta": 0.05}):
        other = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path, config=base.model_copy(update=tensors))
        assert other.key("sentiment") != first.key("sentiment")
        other.get("sentiment")
        assert other.last_info["sentiment"].source == "compressed" and other.compressions == 1


def test_auto_keys_as_the_mode_it_resolves_to(tmp_path: Path, tiny_llama) -> None:
    """"auto" compresses a text skill as "context": one memory for both. Setting a loop knob under "auto"
    selects the chunk-wise loop, which does change the tensors: a new key."""
    def key(**fields):
        return MemoryRegistry(model=tiny_llama, store=MemoryStore(), config=EMLoCConfig(**fields)).key(make_skill(8))

    assert key() == key(compression="context") != key(compression="chunks")
    assert key(lookahead=2) == key(compression="chunks") == key(compression="chunks", lookahead=2)
    fingerprint = EMLoCConfig.fingerprint
    assert fingerprint(EMLoCConfig(lookahead=2)) == fingerprint(EMLoCConfig(compression="chunks", lookahead=3))
    assert fingerprint(EMLoCConfig(lookahead=2)) != fingerprint(EMLoCConfig())  # the loop, not the whole context


def test_a_memory_keyed_the_old_way_is_rebuilt_cleanly(registry: MemoryRegistry, tmp_path: Path, tiny_llama, caplog) -> None:
    """Memories stored before the key left out cost-only fields: under their old key they are never
    read; one found under the current key (its header carries the whole config) is refused, deleted
    and rebuilt, with no error for the caller."""
    from emloc_agents.store import dump_memory

    mem = registry.get("sentiment")
    header = registry.header(registry.skill("sentiment"))
    old = header | {"config": {**registry.config.model_dump(mode="json"), "dtype": header["config"]["dtype"]}}
    registry.store.mset([(registry._key_of(old), dump_memory(mem, old))])  # an old entry, old key
    fresh = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    fresh.get("sentiment")
    assert fresh.last_info["sentiment"].source == "store"  # the current memory, not the old one
    registry.store.mset([(registry.key("sentiment"), dump_memory(mem, old))])  # old header, current key
    fresh = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    again = fresh.get("sentiment")
    assert fresh.last_info["sentiment"].source == "compressed" and again.layer_lengths == mem.layer_lengths
    assert any("belongs to another model/config/skill" in r.message for r in caplog.records)
    assert MemoryRegistry(model=tiny_llama, cache_dir=tmp_path).get_with_info("sentiment")[1].source == "store"


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_corrupt_entry_is_rebuilt_not_served(registry: MemoryRegistry, tmp_path: Path, tiny_llama, damage: str, caplog) -> None:
    good = registry.get("sentiment")
    key = registry.key("sentiment")
    raw = registry.store.mget([key])[0]
    assert raw is not None
    bad = {"truncate": raw[: len(raw) // 2], "flip": raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:], "foreign": b"\x00" * 64}[damage]
    registry.store.mset([(key, bad)])
    fresh = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    mem = fresh.get("sentiment")
    assert fresh.last_info["sentiment"].source == "compressed"
    assert mem.layer_lengths == good.layer_lengths
    assert any("corrupt" in r.message for r in caplog.records)


def test_entry_for_another_model_is_not_served(registry: MemoryRegistry, tmp_path: Path, tiny_llama) -> None:
    other = MemoryRegistry(model="tiny-qwen2", cache_dir=tmp_path)
    other.add(make_skill(8))
    other.get("sentiment")
    # plant the other model's memory under this registry's key: the header check refuses it
    registry.store.mset([(registry.key("sentiment"), other.store.mget([other.key("sentiment")])[0])])
    fresh = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path)
    fresh.get("sentiment")
    assert fresh.last_info["sentiment"].source == "compressed"


def test_export_import_roundtrip(registry: MemoryRegistry, tmp_path: Path, tiny_llama) -> None:
    mem = registry.get("sentiment")
    path = registry.export("sentiment", tmp_path / "sentiment.emloc")
    target = MemoryRegistry(model=tiny_llama, store=MemoryStore())
    skill = target.import_file(path)
    assert skill.name == "sentiment"
    assert target.get("sentiment").layer_lengths == mem.layer_lengths
    assert target.last_info["sentiment"].source == "store"
    wrong = MemoryRegistry(model="tiny-qwen2", store=MemoryStore())
    with pytest.raises(ValueError, match="made for model"):
        wrong.import_file(path)


def test_remove(registry: MemoryRegistry) -> None:
    registry.get("sentiment")
    registry.remove("sentiment")
    assert registry.names() == []
    with pytest.raises(UnknownSkillError):
        registry.get("sentiment")


def test_a_skill_changed_through_another_registry_on_the_store_is_seen_at_once(tmp_path: Path, tiny_llama) -> None:
    """Two registries on one store (two processes, two Ray replicas): a skill one of them replaces or
    removes is what the other serves next, not the copy it read before; a skill added with
    ``persist=False`` stays its own registry's."""
    store = MemoryStore()
    a = MemoryRegistry(model=tiny_llama, store=store, cache_dir=tmp_path)
    b = MemoryRegistry(model=tiny_llama, store=store, cache_dir=tmp_path)
    a.add(make_skill(4, "sentiment"))
    assert b.skill("sentiment") == make_skill(4, "sentiment")
    before = b.get("sentiment")
    a.add(make_skill(6, "sentiment"))  # replaced through the other registry
    assert b.skill("sentiment") == make_skill(6, "sentiment")
    assert b.get("sentiment").original_length > before.original_length  # the new skill's memory
    b.add(make_skill(3, "mine"), persist=False)
    assert b.names() == ["mine", "sentiment"] and a.names() == ["sentiment"]
    a.remove("sentiment")
    with pytest.raises(UnknownSkillError, match="registered skills: mine"):
        b.skill("sentiment")
    assert b.names() == ["mine"] and b.skill("mine") == make_skill(3, "mine")


# ---- across processes ------------------------------------------------------------------------


def _spawn(target, *args) -> mp.Process:
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def test_restart_loads_without_forward_pass(tmp_path: Path) -> None:
    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path)
    reg.add(make_skill(8))
    mem = reg.get("sentiment")
    out = tmp_path / "out.txt"
    p = _spawn(registry_workers.load_without_forward, str(tmp_path), str(out))
    p.join(120)
    assert p.exitcode == 0
    source, length, _seconds = out.read_text().split()
    assert source == "store" and int(length) == mem.original_length


def test_four_processes_compress_once(tmp_path: Path) -> None:
    outs = [tmp_path / f"out{i}.txt" for i in range(4)]
    procs = [_spawn(registry_workers.race, str(tmp_path), str(o)) for o in outs]
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    results = [o.read_text().split() for o in outs]
    assert sum(int(c) for c, _ in results) == 1
    assert len({n for _, n in results}) == 1


def test_kill_during_compression_leaves_no_entry(tmp_path: Path) -> None:
    marker = tmp_path / "compressing"
    p = _spawn(registry_workers.compress_then_hang, str(tmp_path), str(marker))
    deadline = time.time() + 120
    while not marker.exists():
        assert time.time() < deadline and p.is_alive(), "child never reached compression"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    reg = MemoryRegistry(model="tiny-llama", cache_dir=tmp_path, lock_expire=2.0)
    assert reg.names() == ["sentiment"]
    assert not reg.cached("sentiment"), "a killed compression left an entry"
    t0 = time.time()
    reg.get("sentiment")
    assert reg.last_info["sentiment"].source == "compressed"
    assert time.time() - t0 < 60  # waited at most for the dead holder's lock to expire


def test_a_merged_memory_keeps_its_logit_biases_through_the_store_and_export(tmp_path: Path, tiny_llama) -> None:
    config = EMLoCConfig(keep_ratios=(0.3,), delta=1.0, merge_evicted=True)
    reg = MemoryRegistry(model=tiny_llama, cache_dir=tmp_path / "a", config=config)
    reg.add(make_skill(8))
    mem = reg.get("sentiment")
    assert mem.logit_bias is not None and any(b is not None for b in mem.logit_bias)
    for other in (MemoryRegistry(model=tiny_llama, cache_dir=tmp_path / "a", config=config),
                  MemoryRegistry(model=tiny_llama, store=MemoryStore(), config=config)):
        if other.store is not reg.store and not other.names():
            other.import_file(reg.export("sentiment", tmp_path / "sentiment.emloc"))
        again = other.get("sentiment")
        assert other.last_info["sentiment"].source == "store"
        assert again.logit_bias is not None
        for a, b in zip(mem.logit_bias, again.logit_bias, strict=True):
            assert (a is None and b is None) or torch.equal(a.cpu(), b.cpu())
