"""Store layer: memory file format, the byte-store contract on every backend, locks, pickle safety."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import pathlib
import signal
import threading
import time
import uuid

import diskcache
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from emloc_agents.engine.memory import CompressedMemory
from emloc_agents.store import (
    FORMAT_VERSION,
    DiskCacheStore,
    MemoryFormatError,
    MemoryStore,
    RedisStore,
    StoreLockTimeout,
    UnsafeEntryError,
    dump_memory,
    load_memory,
    read_info,
)
from emloc_agents.store.base import new_token
from tests.conftest import redis_server
from tests.test_store_workers import (
    compress_once,
    enter_after,
    hold_and_log,
    hold_lock_forever,
    hold_past_expiry,
    open_store,
)

# --------------------------------------------------------------------------------------------------
# helpers


def make_memory(
    dtype: torch.dtype = torch.float16,
    lengths: tuple[int, ...] = (7, 3, 12, 0),
    heads: int = 2,
    head_dim: int = 4,
    pos_dtype: torch.dtype = torch.int64,
) -> CompressedMemory:
    g = torch.Generator().manual_seed(0)
    keys, values, positions = [], [], []
    for n in lengths:
        keys.append(torch.randn(heads, n, head_dim, generator=g).to(dtype))
        values.append(torch.randn(heads, n, head_dim, generator=g).to(dtype))
        positions.append(
            torch.sort(torch.randperm(20, generator=g)[:n].repeat(heads, 1), dim=-1).values.to(pos_dtype)
        )
    return CompressedMemory(
        keys=keys,
        values=values,
        positions=positions,
        original_length=20,
        sliding=[i % 2 == 1 for i in range(len(lengths))],
        render_mode="chat",
        next_position=23,
        header={"from_mem": 1},
        stats={"seconds": 1.5, "ratio": 0.25},
    )


def assert_same(a: CompressedMemory, b: CompressedMemory) -> None:
    assert a.num_layers == b.num_layers
    for xs, ys in ((a.keys, b.keys), (a.values, b.values), (a.positions, b.positions)):
        for x, y in zip(xs, ys, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)
    assert (a.original_length, a.sliding, a.render_mode, a.next_position, a.stats) == (
        b.original_length,
        b.sliding,
        b.render_mode,
        b.next_position,
        b.stats,
    )


def rebuild(data: bytes, edit_info=None, edit_tensors=None) -> bytes:
    """Re-save a dumped memory with its envelope and/or tensors edited (to forge damaged files)."""
    info = read_info(data)
    tensors = st_load(data)
    if edit_info:
        edit_info(info)
    if edit_tensors:
        edit_tensors(tensors)
    return st_save(tensors, metadata={"emloc": json.dumps(info)})


# --------------------------------------------------------------------------------------------------
# format


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_round_trip_exact(dtype, pos_dtype):
    mem = make_memory(dtype, pos_dtype=pos_dtype)
    data = dump_memory(mem, {"model": "fp:abc", "config": {"ratio": 0.25}, "skill": "h" * 64})
    back = load_memory(data)
    assert_same(mem, back)
    assert back.header == {"from_mem": 1, "model": "fp:abc", "config": {"ratio": 0.25}, "skill": "h" * 64}
    assert back.layer_lengths == [7, 3, 12, 0]


def test_round_trip_views_and_shared_tensors():
    base = torch.randn(2, 4, 5).to(torch.bfloat16)
    k = base.transpose(1, 2)  # (2, 5, 4), non-contiguous view
    mem = CompressedMemory(
        keys=[k, k], values=[k, base.transpose(1, 2)[:, :, :3]], positions=[torch.arange(5).repeat(2, 1)] * 2,
        original_length=5, sliding=[False, False], next_position=None,
    )  # fmt: skip
    back = load_memory(dump_memory(mem, {}))
    assert_same(mem, back)
    assert back.keys[0].is_contiguous() and back.next_position is None


def test_read_info_envelope():
    info = read_info(dump_memory(make_memory(), {"model": "m"}))
    assert info["format_version"] == FORMAT_VERSION == 1
    assert info["header"]["model"] == "m" and info["layer_lengths"] == [7, 3, 12, 0]
    assert abs(info["created"] - time.time()) < 60
    assert len(info["checksum"]["digest"]) == 64


def biased_memory() -> CompressedMemory:
    """make_memory with logit biases on layers 0 and 2 (merged memories, engine/merge.py)."""
    mem = make_memory()
    mem.logit_bias = [torch.randn(2, 7), None, torch.randn(2, 12), None]
    return mem


def test_logit_bias_round_trip_and_version():
    mem = biased_memory()
    data = dump_memory(mem, {})
    info = read_info(data)
    assert info["format_version"] == 2 and info["biased_layers"] == [0, 2]
    back = load_memory(data, CompressedMemory)
    assert_same(mem, back)
    assert back.logit_bias is not None and back.logit_bias[1] is None and back.logit_bias[3] is None
    assert torch.equal(back.logit_bias[0], mem.logit_bias[0]) and torch.equal(back.logit_bias[2], mem.logit_bias[2])
    plain = make_memory()  # no biases: version 1, the same bytes as before biases existed
    assert read_info(dump_memory(plain, {}))["format_version"] == 1 and load_memory(dump_memory(plain, {})).logit_bias is None


def test_logit_bias_damage_raises_memory_format_error():
    data = dump_memory(biased_memory(), {})

    def flip(tensors):
        tensors["b.2"] = tensors["b.2"].clone()
        tensors["b.2"][0, 0] += 1.0

    with pytest.raises(MemoryFormatError, match="checksum"):
        load_memory(rebuild(data, edit_tensors=flip))
    with pytest.raises(MemoryFormatError, match="unexpected"):
        load_memory(rebuild(data, edit_info=lambda info: info.update(biased_layers=[0])))
    with pytest.raises(MemoryFormatError, match="biased_layers"):
        load_memory(rebuild(data, edit_info=lambda info: info.update(format_version=1)))
    with pytest.raises(MemoryFormatError, match="logit bias"):
        load_memory(rebuild(data, edit_tensors=lambda t: t.update({"b.0": t["b.0"][:, :3].contiguous()})))
    mem = biased_memory()
    mem.logit_bias = [torch.zeros(2, 5), None, None, None]  # layer 0 holds 7 slots
    with pytest.raises(ValueError, match="logit bias"):
        dump_memory(mem, {})


def test_dump_refuses_bad_memories():
    mem = make_memory()
    with pytest.raises(ValueError, match="JSON"):
        dump_memory(mem, {"x": object()})
    mem.positions[0] = mem.positions[0].float()
    with pytest.raises(ValueError, match="int32 or int64"):
        dump_memory(mem, {})
    mem = make_memory()
    mem.sliding = mem.sliding[:-1]
    with pytest.raises(ValueError, match="one entry per layer"):
        dump_memory(mem, {})
    mem = make_memory()
    mem.values[1] = mem.values[1][:, :-1]
    with pytest.raises(ValueError, match="disagree"):
        dump_memory(mem, {})


def _pickled_tensor() -> bytes:
    buf = io.BytesIO()
    torch.save({"k": torch.zeros(2)}, buf)
    return buf.getvalue()


GOOD = dump_memory(make_memory(), {"model": "m"})


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(GOOD[:5], id="truncated-5"),
        pytest.param(GOOD[:100], id="truncated-header"),
        pytest.param(GOOD[: len(GOOD) // 2], id="truncated-half"),
        pytest.param(GOOD[:-1], id="truncated-1"),
        pytest.param(_flip(GOOD, len(GOOD) - 3), id="flipped-data-byte"),
        pytest.param(_flip(GOOD, 12), id="flipped-header-byte"),
        pytest.param(os.urandom(4096), id="random"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 200, id="zip"),
        pytest.param(b"\xff" * 8 + b"{}", id="huge-header-length"),
        pytest.param(_pickled_tensor(), id="torch-save-pickle"),
        pytest.param(st_save({"a": torch.zeros(2)}), id="plain-safetensors"),
        pytest.param(st_save({"a": torch.zeros(2)}, metadata={"emloc": "{not json"}), id="bad-json"),
        pytest.param(st_save({"a": torch.zeros(2)}, metadata={"emloc": "[1, 2]"}), id="json-not-object"),
        pytest.param("a string", id="not-bytes"),
    ],
)
def test_corrupt_bytes_raise_memory_format_error(data):
    with pytest.raises(MemoryFormatError):
        load_memory(data)


def test_flipped_tensor_byte_is_a_checksum_mismatch():
    with pytest.raises(MemoryFormatError, match="checksum"):
        load_memory(_flip(GOOD, len(GOOD) - 3))


def _set(key, value):
    return lambda info: info.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit_info", "edit_tensors", "match"),
    [
        (_set("format_version", 3), None, "format_version"),
        (_set("format_version", 2), None, "biased_layers"),
        (_set("format_version", True), None, "format_version"),
        (_set("format", "other"), None, "envelope"),
        (_set("num_layers", 5), None, "layer_lengths"),
        (lambda i: i.update(num_layers=5, layer_lengths=[1] * 5, sliding=[False] * 5), None, "layer count"),
        (None, lambda t: t.pop("p.3"), "layer count"),
        (_set("layer_lengths", [7, 3, 11, 0]), None, "header says"),
        (_set("sliding", [0, 1, 0, 1]), None, "sliding"),
        (_set("original_length", -1), None, "original_length"),
        (_set("checksum", None), None, "checksum"),
        (None, lambda t: t.__setitem__("v.0", t["v.0"][:, :-1].contiguous()), "disagree"),
        (None, lambda t: t.__setitem__("p.0", t["p.0"][:, :-1].contiguous()), "positions"),
        (None, lambda t: t.__setitem__("p.0", t["p.0"].float()), "int32 or int64"),
        (None, lambda t: t.__setitem__("k.1", t["k.1"] + 1), "checksum"),
    ],
)
def test_inconsistent_files_raise_memory_format_error(edit_info, edit_tensors, match):
    with pytest.raises(MemoryFormatError, match=match):
        load_memory(rebuild(GOOD, edit_info, edit_tensors))


def test_memory_format_error_is_value_error():
    assert issubclass(MemoryFormatError, ValueError)


# --------------------------------------------------------------------------------------------------
# redis-server fixture


@pytest.fixture(scope="session")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture(params=["memory", "diskcache", "redis"])
def store_kind(request):
    return request.param


@pytest.fixture
def store_where(store_kind, tmp_path, request):
    if store_kind == "memory":
        return None
    if store_kind == "diskcache":
        return str(tmp_path / "cache")
    return request.getfixturevalue("redis_url") + "#t" + uuid.uuid4().hex[:8]


@pytest.fixture
def store(store_kind, store_where):
    s = MemoryStore() if store_kind == "memory" else open_store(store_kind, store_where)
    yield s
    if hasattr(s, "close"):
        s.close()


# --------------------------------------------------------------------------------------------------
# store contract (every backend)


def test_contract_get_set_delete(store):
    assert store.mget(["a", "b"]) == [None, None]
    store.mset([("a", b"1"), ("b", b""), ("c", GOOD)])
    assert store.mget(["a", "b", "c", "zz"]) == [b"1", b"", GOOD, None]
    store.mset([("a", b"2")])
    assert store.mget(["a"]) == [b"2"]
    store.mdelete(["a", "missing"])
    assert store.mget(["a", "b"]) == [None, b""]
    assert store.mget([]) == []
    store.mdelete([])


def test_contract_yield_keys_with_prefix(store):
    keys = ["skill/a", "skill/b", "skill/*[x]?", "other/c", "skillx"]
    store.mset([(k, k.encode()) for k in keys])
    with store.lock("skill/locked", timeout=1):
        assert sorted(store.yield_keys()) == sorted(keys)
        assert sorted(store.yield_keys(prefix="skill/")) == ["skill/*[x]?", "skill/a", "skill/b"]
        assert sorted(store.yield_keys(prefix="skill/*")) == ["skill/*[x]?"]
        assert list(store.yield_keys(prefix="nothing")) == []


def test_contract_refuses_wrong_types(store):
    with pytest.raises(TypeError):
        store.mset([("a", "text")])
    with pytest.raises(TypeError):
        store.mset([(1, b"x")])
    with pytest.raises(TypeError):
        store.mget([b"a"])
    assert store.mget(["a"]) == [None]


async def _async_round_trip(store):
    await store.amset([("x", b"y")])
    got = await store.amget(["x"])
    keys = [k async for k in store.ayield_keys(prefix="x")]
    await store.amdelete(["x"])
    return got, keys, await store.amget(["x"])


def test_contract_async_defaults(store):
    import asyncio

    assert asyncio.run(_async_round_trip(store)) == ([b"y"], ["x"], [None])


def test_lock_exclusive_across_threads(store):
    active, peak, done = [0], [0], []
    guard = threading.Lock()

    def work(i):
        with store.lock("job", expire=30, timeout=30):
            with guard:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with guard:
                active[0] -= 1
            done.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(done) == list(range(8)) and peak[0] == 1


def test_lock_timeout_and_independent_keys(store):
    with store.lock("k", expire=30):
        t0 = time.monotonic()
        with pytest.raises(StoreLockTimeout), store.lock("k", timeout=0.2):
            pass
        assert time.monotonic() - t0 < 5
        with store.lock("other", timeout=1):  # a different key is not blocked
            pass
    with store.lock("k", timeout=1):  # released on exit
        pass


def test_lock_expires_and_late_release_does_not_free_new_holder(store, caplog):
    first = store.lock("k", expire=0.3, renew=False)  # a holder that stopped renewing
    first.__enter__()
    t0 = time.monotonic()
    second = store.lock("k", expire=30, timeout=5)
    second.__enter__()  # waits for the expiry
    assert 0.1 < time.monotonic() - t0 < 5
    with caplog.at_level(logging.WARNING, logger="emloc_agents.store.base"):
        first.__exit__(None, None, None)
    assert "expired" in caplog.text
    with pytest.raises(StoreLockTimeout), store.lock("k", timeout=0.2):  # the second holder still owns it
        pass
    second.__exit__(None, None, None)
    with store.lock("k", timeout=1):
        pass


def _heartbeats() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lock-heartbeat")]


def test_lock_is_renewed_while_held_and_the_renewal_stops_on_release(store):
    with store.lock("k", expire=0.3):
        time.sleep(1.0)  # three expiries
        with pytest.raises(StoreLockTimeout), store.lock("k", timeout=0.2):
            pass
        assert len(_heartbeats()) == 1
    assert _heartbeats() == []
    with store.lock("k", timeout=1):  # released on exit
        pass
    with pytest.raises(RuntimeError), store.lock("k", expire=0.3):  # an error in the body releases too
        raise RuntimeError
    assert _heartbeats() == []
    with store.lock("k", timeout=1):
        pass


def test_extend_renews_only_the_owners_unexpired_lock(store):
    mine, theirs = new_token(), new_token()
    assert store._try_acquire("k", mine, 0.3)
    assert not store._extend("k", theirs, 5)
    assert store._extend("k", mine, 5)
    time.sleep(0.5)  # past the first expiry: the renewal holds
    assert not store._try_acquire("k", theirs, 5)
    assert store._release("k", mine)
    assert not store._extend("k", mine, 5)  # released: nothing to renew
    assert store._try_acquire("k", theirs, 0.2)
    time.sleep(0.4)
    assert not store._extend("k", theirs, 5)  # expired: lost, not revived
    assert store._try_acquire("k", mine, 5)
    assert store._release("k", mine)


def test_lock_rejects_bad_arguments(store):
    with pytest.raises(ValueError), store.lock("k", expire=0):
        pass
    with pytest.raises(TypeError), store.lock(3):
        pass


# --------------------------------------------------------------------------------------------------
# cross-process locks (diskcache and redis)


CROSS_PROCESS = pytest.mark.parametrize("store_kind", ["diskcache", "redis"])  # MemoryStore is process-local


@CROSS_PROCESS
def test_cross_process_compress_once(store_kind, store_where, tmp_path):
    kind, where = store_kind, store_where
    counter = tmp_path / "counter.txt"
    keys = ["a", "b", "c"]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=compress_once, args=(kind, where, str(counter), keys[i:] + keys[:i]))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lines = counter.read_text().split()[::2]
    assert sorted(lines) == keys  # each key compressed exactly once
    store = open_store(kind, where)
    assert store.mget(keys) == [b"memory:" + k.encode() for k in keys]
    store.close()


@CROSS_PROCESS
def test_work_longer_than_the_expiry_is_not_entered_twice(store_kind, store_where, tmp_path):
    """A 3-second "compression" under a 1-second lock: the heartbeat keeps it, so a second process
    waiting for the same lock enters only after the first has finished and released it."""
    log, trying = tmp_path / "log.txt", tmp_path / "trying"
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=hold_past_expiry, args=(store_kind, store_where, str(log), str(trying), 3.0))
    first.start()
    try:
        deadline = time.monotonic() + 60
        while not log.exists():
            assert first.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        second = ctx.Process(target=enter_after, args=(store_kind, store_where, str(log), str(trying)))
        second.start()
        second.join(120)
        first.join(60)
        assert (first.exitcode, second.exitcode) == (0, 0)
        assert log.read_text().split("\n")[:-1] == ["first in", "first out", "second in"]
    finally:
        for p in mp.active_children():
            p.kill()


@CROSS_PROCESS
def test_a_stalled_holder_that_lost_its_lock_says_so_and_frees_nothing(store_kind, store_where, tmp_path):
    """A holder frozen past its expiry (SIGSTOP) loses the lock to another process; when it resumes,
    its heartbeat finds the lock gone and logs it, and its release does not free the new holder."""
    log, ready = tmp_path / "log.txt", tmp_path / "ready"
    proc = mp.get_context("spawn").Process(target=hold_and_log, args=(store_kind, store_where, str(log), str(ready), 2.0))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)
        store = open_store(store_kind, store_where)
        with store.lock("stalled", expire=30, timeout=10):  # taken once the frozen holder's lock expires
            os.kill(proc.pid, signal.SIGCONT)
            proc.join(60)
            assert proc.exitcode == 0
            with pytest.raises(StoreLockTimeout), store.lock("stalled", timeout=0.2):  # still ours
                pass
        store.close()
        text = log.read_text()
        assert "was lost while held" in text and "expired before release" in text
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.join(10)


@CROSS_PROCESS
def test_lock_survives_kill_9_of_holder(store_kind, store_where, tmp_path):
    kind, where = store_kind, store_where
    ready = tmp_path / "ready"
    proc = mp.get_context("spawn").Process(target=hold_lock_forever, args=(kind, where, str(ready)))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        store = open_store(kind, where)
        with pytest.raises(StoreLockTimeout), store.lock("held", timeout=0.1):
            pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        t0 = time.monotonic()
        with store.lock("held", timeout=5):
            pass
        assert time.monotonic() - t0 < 5
        store.close()
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)


# --------------------------------------------------------------------------------------------------
# diskcache specifics: pickle safety, eviction


class _Touch:
    """Unpickling this runs ``Path.touch(marker)``: stands in for arbitrary code execution."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))

    def __hash__(self):
        return 1

    def __eq__(self, other):
        return isinstance(other, _Touch)


def test_pickled_value_is_refused_deleted_and_never_executed(tmp_path, caplog):
    directory, marker = tmp_path / "cache", tmp_path / "pwned"
    with diskcache.Cache(str(directory)) as plain:
        plain.set("skill/evil", _Touch(marker))  # not bytes -> stored pickled
        plain.set("skill/big-evil", [_Touch(marker)] + [b"x" * 100_000])  # pickled into a .val file
        plain.set("skill/text", "a str value")  # MODE_TEXT/raw str: not bytes either
        plain.set("skill/good", b"fine")
    assert not marker.exists()
    with DiskCacheStore(directory) as store, caplog.at_level(logging.WARNING):
        got = store.mget(["skill/evil", "skill/big-evil", "skill/text", "skill/good"])
        assert got == [None, None, None, b"fine"]
        assert not marker.exists()
        assert caplog.text.count("unsafe cache entry") == 3
        assert sorted(store.yield_keys()) == ["skill/good"]
        assert store.mget(["skill/evil"]) == [None]
    with diskcache.Cache(str(directory)) as plain:  # the entries are really gone
        assert "skill/evil" not in plain and "skill/big-evil" not in plain and "skill/text" not in plain
    assert not marker.exists()


def test_pickled_key_is_never_unpickled(tmp_path):
    directory, marker = tmp_path / "cache", tmp_path / "pwned"
    with diskcache.Cache(str(directory)) as plain:
        plain.set(_Touch(marker), b"value under a pickled key")
        plain.set("ok", b"1")
    with DiskCacheStore(directory) as store:
        assert list(store.yield_keys()) == ["ok"]
        assert store.mget(["ok"]) == [b"1"]
        store.mset([(f"k{i}", b"v") for i in range(5)])
        store.mdelete(["ok"])
    assert not marker.exists()


def test_safe_disk_refuses_to_write_pickles(tmp_path):
    with DiskCacheStore(tmp_path / "cache") as store:
        with pytest.raises(UnsafeEntryError):
            store._cache.set("k", {"not": "bytes"})
        with pytest.raises(UnsafeEntryError):
            store._cache.set(("tuple", "key"), b"v")
        assert list(store.yield_keys()) == []


def test_diskcache_size_limit_evicts_least_recently_used_one_at_a_time(tmp_path):
    blob = os.urandom(50_000)
    with DiskCacheStore(tmp_path / "cache", size_limit=400_000) as store:
        for i in range(30):
            store.mset([(f"k{i}", blob)])
            assert store.mget([f"k{i}"]) == [blob]  # what was just written always survives
            assert store.mget(["k0"]) == [blob]  # k0 is read all the time, so it is never the LRU
            assert store.volume() <= 400_000
        kept = set(store.yield_keys())
        assert "k0" in kept and "k29" in kept and "k1" not in kept
        assert 5 <= len(kept) <= 8  # roughly size_limit / 50 kB, not wiped in a batch
        store.mset([("huge", os.urandom(500_000))])  # larger than the limit alone: kept until next mset
        assert store.mget(["huge"]) != [None] and set(store.yield_keys()) == {"huge"}
        store.mset([("small", b"x")])
        assert set(store.yield_keys()) == {"small"}


# --------------------------------------------------------------------------------------------------
# redis specifics


def test_redis_ttl_and_namespace_isolation(redis_url):
    short = RedisStore(url=redis_url, namespace="ttl-" + uuid.uuid4().hex[:8], ttl=0.3)
    other = RedisStore(url=redis_url, namespace="other-" + uuid.uuid4().hex[:8])
    short.mset([("a", b"1")])
    assert short.mget(["a"]) == [b"1"] and other.mget(["a"]) == [None]
    assert list(other.yield_keys()) == []
    time.sleep(0.6)
    assert short.mget(["a"]) == [None]
    short.close()
    other.close()


def test_redis_lock_is_redis_py_lock(redis_url):
    """The store's lock is redis-py's Lock on the namespaced key: a redis-py Lock held elsewhere excludes
    it, and the store's holder is visible to (and not freeable by) a redis-py Lock with another token."""
    ns = "lk-" + uuid.uuid4().hex[:8]
    store = RedisStore(url=redis_url, namespace=ns)
    other = store.client.lock(f"{ns}:l:job", timeout=5)
    assert other.acquire(blocking=False)
    with pytest.raises(StoreLockTimeout), store.lock("job", timeout=0.2):
        pass
    other.release()
    with store.lock("job", expire=5):
        assert store.client.lock(f"{ns}:l:job").locked()
        assert not store.client.lock(f"{ns}:l:job", timeout=5).acquire(blocking=False)
    assert not store.client.lock(f"{ns}:l:job").locked()
    store.close()


def test_redis_refuses_decoding_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(client)
    client.close()


def test_redis_missing_package_has_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"emloc-agents\[redis\]"):
        RedisStore(url="redis://127.0.0.1:1/0")
