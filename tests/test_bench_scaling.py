"""emloc bench --scaling on the tiny task and the tiny random-weight model, end to end (fast)."""

from __future__ import annotations

import csv
import dataclasses
import json
import mmap
import time

import pytest

from emloc_agents.bench.cli import bench_main
from emloc_agents.bench.methods import prepare
from emloc_agents.bench.rss import PeakRSS
from emloc_agents.bench.scaling import SCALING_FIELDS, demo_ids, full_kv_bytes
from emloc_agents.engine.facts import ModelFacts
from emloc_agents.tasks import Task

from .test_bench import make_task

SHOTS = (4, 12)  # the tiny pool holds 12


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    task = make_task(root / "mini")
    out = root / "out"
    argv = ["--scaling", "--task", str(task), "--model", "tiny-llama", "--shots", ",".join(map(str, SHOTS)),
            "--seeds", "0,1", "--out", str(out), "--compression", "chunks"]  # unpadded: bytes exact below
    assert bench_main(argv) == 0
    return task, out, json.loads((out / "scaling.json").read_text())


def test_files_and_fields(scaling_run):
    _, out, rows = scaling_run
    for name in ("scaling.json", "scaling.csv", "config.json", "rss_vs_tokens.png", "cold_vs_warm.png",
                 "disk_bytes_vs_tokens.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (out / "summary.json").exists()  # --scaling replaces the accuracy study
    assert [(r["shots"], r["seed"], r["model"], r["task"]) for r in rows] == [(s, 0, "tiny-llama", "mini") for s in SHOTS]
    for r in rows:
        assert set(SCALING_FIELDS) <= set(r), set(SCALING_FIELDS) - set(r)
        assert r["rss_method"] in ("vmhwm", "sampled")
        assert r["peak_rss_compress_mb"] >= 0 and r["peak_rss_full_prefill_mb"] >= 0 and r["baseline_rss_mb"] > 50
        assert 0 < r["compress_s"] <= r["cold_s"] and r["prefill_s"] > 0
        assert 0 < r["warm_s"] < r["cold_s"]  # a load from disk beats compressing
        assert r["compress_over_prefill"] == pytest.approx(r["compress_s"] / r["prefill_s"])
        assert r["decode_ms_memory"] > 0 and r["decode_ms_full_prefix"] > 0
    with (out / "scaling.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == SCALING_FIELDS
        assert [int(x["shots"]) for x in reader] == list(SHOTS)
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "scaling" and config["seed"] == 0 and config["machine"]["cpu_count"] and config["finished"]
    assert len(config["code"]["sources_sha256"]) == 16 and isinstance(config["code_changed_during_run"], bool)
    assert config["emloc_config"]["keep_ratios"] == [0.1, 0.2, 0.5]
    assert config["emloc_config"]["compression"] == "chunks" and {r["press"] for r in rows} == {"emloc"}


def test_the_default_compression_reaches_the_workers(tmp_path):
    """Without --compression the study measures the default (auto: whole-context ranking for text)."""
    task, out = make_task(tmp_path / "mini"), tmp_path / "out"
    argv = ["--scaling", "--task", str(task), "--model", "tiny-llama", "--shots", "12", "--out", str(out)]
    assert bench_main(argv) == 0
    (row,) = json.loads((out / "scaling.json").read_text())
    assert row["press"] == "context" and 0 < row["kept_ratio"] <= 1
    assert row["memory_kv_bytes"] >= 128 * round(row["memory_tokens"] * 4)  # heads padded to the longest
    assert json.loads((out / "config.json").read_text())["emloc_config"]["compression"] == "auto"


def test_tokens_and_bytes(scaling_run, tiny_llama):
    task_dir, _, rows = scaling_run
    task = Task.load(task_dir)
    f = tiny_llama.facts
    assert (f.num_layers, f.num_kv_heads, f.head_dim, f.windows) == (4, 2, 16, (None,) * 4)
    small, large = rows
    assert small["original_tokens"] < large["original_tokens"]
    for r in rows:
        skill = task.skill(r["shots"], 0)
        # the tokens measured are the ones full-icl prefills
        assert r["original_tokens"] == len(demo_ids(tiny_llama, skill)) == prepare(tiny_llama, "full-icl", skill).original_tokens
        # 4 layers x (K, V) x 2 kv heads x 16 dims x 2 bytes = 512 bytes per token
        assert r["full_kv_bytes"] == 512 * r["original_tokens"]
        assert r["memory_tokens"] == pytest.approx(r["kept_ratio"] * r["original_tokens"])
        # the stored K/V: fp16, kept tokens per layer
        assert r["memory_kv_bytes"] == 128 * round(r["memory_tokens"] * 4)
        assert r["disk_bytes"] > r["memory_kv_bytes"]  # + positions and the JSON header
    assert large["kept_ratio"] < 1.0  # EMLoC pruned ...
    assert large["memory_kv_bytes"] < large["full_kv_bytes"] and large["disk_bytes"] < large["full_kv_bytes"]


def test_full_kv_bytes_by_hand():
    facts = ModelFacts(model_type="gemma3_text", num_layers=3, num_kv_heads=1, num_heads=4, head_dim=256,
                       windows=(512, None, 512), max_positions=32768, final_softcap=None)
    per_layer_token = 2 * 1 * 256 * 2  # K and V, one head of 256, fp16
    assert full_kv_bytes(facts, 100) == 3 * 100 * per_layer_token
    assert full_kv_bytes(facts, 1000) == (511 + 1000 + 511) * per_layer_token  # sliding layers: window - 1
    assert full_kv_bytes(facts, 1000, bytes_per_value=4) == 2 * (511 + 1000 + 511) * per_layer_token


@pytest.mark.parametrize("exact", [True, False])
def test_peak_rss_sees_an_allocation(monkeypatch, exact):
    if not exact:
        monkeypatch.setattr("emloc_agents.bench.rss.hwm_tracks_frees", lambda: False)
    with PeakRSS() as idle:
        pass
    # A fresh mapping, not torch or malloc: an allocator may hand back pages that are already
    # resident (freed earlier in a long test process), and then RSS rightly does not grow.
    spike = mmap.mmap(-1, 64 * 2**20)
    with PeakRSS() as p:
        for offset in range(0, len(spike), mmap.PAGESIZE):
            spike[offset] = 1  # touched, so resident
        if not exact:
            time.sleep(0.05)  # the sampler needs the allocation to live for a few samples
        spike.close()  # unmapped; with the exact method the spike still counts: the high-water mark saw it
    if p.method != ("vmhwm" if exact else "sampled"):
        pytest.skip(f"this kernel's /proc does not support the method (got {p.method})")
    assert 60 <= p.delta_mb < 200
    assert idle.delta_mb < 20


def test_a_high_water_mark_that_forgets_frees_is_not_trusted(monkeypatch):
    """A kernel that accepts the reset but reports only the current RSS falls back to sampling."""
    from emloc_agents.bench import rss

    monkeypatch.setattr(rss, "hwm_bytes", rss.rss_bytes)
    assert rss.hwm_tracks_frees.__wrapped__() is False
    monkeypatch.setattr(rss, "hwm_tracks_frees", rss.hwm_tracks_frees.__wrapped__)
    with PeakRSS() as p:
        pass
    assert p.method == "sampled"


def test_context_too_long_exit_2(tmp_path, capsys, monkeypatch):
    from emloc_agents.models.loader import load_model

    lm = load_model("tiny-llama")  # the instance run_scaling gets (loaded once per process)
    monkeypatch.setattr(lm, "facts", dataclasses.replace(lm.facts, max_positions=100))
    task = make_task(tmp_path / "mini")
    code = bench_main(["--scaling", "--task", str(task), "--model", "tiny-llama", "--shots", "4,12",
                       "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "12 shots are" in err and "100 positions" in err and "4 shots" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # checked before any work


def test_too_many_shots_exit_2(tmp_path, capsys):
    task = make_task(tmp_path / "mini")
    assert bench_main(["--scaling", "--task", str(task), "--model", "tiny-llama", "--shots", "99",
                       "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "99 shots asked, pool has 12" in err and len(err.strip().splitlines()) == 1
