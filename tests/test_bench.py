"""emloc bench on a tiny task folder and the tiny random-weight model (fast)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from emloc_agents.bench import SUMMARY_FIELDS, accuracy, agreement, compare, wilson_ci
from emloc_agents.bench.cli import bench_main
from emloc_agents.bench.methods import prepare
from emloc_agents.bench.metrics import fidelity
from emloc_agents.bench.run import match_label, memory_labels
from emloc_agents.tasks import Task

GOOD = ["great fun", "a joy to watch", "warm and witty", "moving and smart", "wonderful cast", "pure delight"]
BAD = ["dull and slow", "a tedious mess", "flat and lifeless", "boring plot", "awful script", "a waste of time"]


def make_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({
        "name": "mini", "description": "tiny sentiment", "instruction": "Classify the sentiment.",
        "input_template": "Review: {text}\nSentiment:", "labels": ["negative", "positive"],
    }))
    pool = [{"text": t, "label": "positive"} for t in GOOD] + [{"text": t, "label": "negative"} for t in BAD]
    (folder / "pool.jsonl").write_text("\n".join(json.dumps(r) for r in pool) + "\n")
    test = [{"text": "so much fun", "label": "positive"}, {"text": "slow and dull", "label": "negative"},
            {"text": "a smart joy", "label": "positive"}, {"text": "tedious waste", "label": "negative"}]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in test) + "\n")
    return folder


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    task = make_task(root / "mini")
    out = root / "out"
    argv = ["--task", str(task), "--model", "tiny-llama", "--methods", "zero-shot,full-icl,emloc,snapkv",
            "--shots", "4", "--limit", "4", "--out", str(out), "--compare"]
    assert bench_main(argv) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_outputs_and_fields(bench_run):
    out, rows = bench_run
    for name in ("summary.json", "summary.csv", "config.json", "items.jsonl", "accuracy_vs_kept_ratio.png",
                 "ttft_vs_tokens.png", "decode_vs_tokens.png"):
        assert (out / name).is_file(), name
    assert [r["method"] for r in rows] == ["zero-shot", "full-icl", "emloc", "snapkv"]
    for r in rows:
        assert set(SUMMARY_FIELDS) <= set(r), set(SUMMARY_FIELDS) - set(r)
        assert r["n"] == 4 and r["shots"] == 4 and r["seed"] == 0 and r["model"] == "tiny-llama"
        lo, hi = r["accuracy_ci95"]
        assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
        assert r["ttft_s"] > 0 and r["peak_rss_mb"] > 0
    by = {r["method"]: r for r in rows}
    assert by["full-icl"]["agreement"] == 1.0
    assert by["zero-shot"]["kept_ratio"] is None and by["zero-shot"]["disk_bytes"] is None
    assert by["full-icl"]["kept_ratio"] == 1.0 and by["full-icl"]["compress_s"] is None
    em, snap = by["emloc"], by["snapkv"]
    assert 0 < em["kept_ratio"] <= 1.0 and em["compress_s"] > 0 and em["disk_bytes"] > 0
    assert em["original_tokens"] == by["full-icl"]["original_tokens"]
    assert snap["ratio_source"] == "emloc" and snap["press_ratio"] == pytest.approx(em["kept_ratio"])
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 16 and {"task", "method", "shots", "seed", "index", "label", "prediction", "correct"} <= set(items[0])
    with (out / "summary.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "tiny-llama" and config["machine"]["cpu_count"] and config["machine"]["torch"]
    lines = compare(rows)
    assert any("full-icl ttft / emloc ttft" in x for x in lines)
    assert any("emloc kept ratio" in x for x in lines)


def test_scoring_matches_language_model(tiny_llama, tmp_path):
    """The bench's query rendering and label scoring equal LanguageModel.score on every path."""
    task = Task.load(make_task(tmp_path / "mini"))
    skill = task.skill(4, 0)
    text = task.format_input(task.test[0].text)
    full = prepare(tiny_llama, "full-icl", skill)
    cached = prepare(tiny_llama, "full-icl-cached", skill)
    for prep in (prepare(tiny_llama, "zero-shot", skill), cached):
        from emloc_agents.engine import score_continuations

        got = score_continuations(tiny_llama, prep.query_ids(tiny_llama, text, task.instruction),
                                  prep.label_ids(tiny_llama, text, task.instruction, task.labels), prep.memory)
        want = tiny_llama.score(text, task.labels, prep.memory, task.instruction)
        assert got == pytest.approx(want, abs=1e-5)
    # full-icl recomputes the same prompt the uncompressed memory holds: same tokens, same scores
    assert full.original_tokens == cached.memory.original_length
    full_ids = full.query_ids(tiny_llama, text, task.instruction)
    cached_ids = cached.query_ids(tiny_llama, text, task.instruction)
    assert len(full_ids) == cached.memory.original_length + len(cached_ids)
    assert full_ids[cached.memory.original_length :] == cached_ids
    from emloc_agents.engine import score_continuations

    got = score_continuations(tiny_llama, full_ids, full.label_ids(tiny_llama, text, task.instruction, task.labels), None)
    want = tiny_llama.score(text, task.labels, cached.memory, task.instruction)
    assert got == pytest.approx(want, abs=1e-4)


def test_memory_labels_are_the_language_models_argmax(tiny_llama, tmp_path):
    """What the fidelity scripts compare: per item, the label LanguageModel.score ranks first on the
    memory (and zero-shot without one)."""
    task = Task.load(make_task(tmp_path / "mini"))
    memory = prepare(tiny_llama, "full-icl-cached", task.skill(4, 0)).memory
    items = task.test[:6]
    for mem in (memory, None):
        want = []
        for ex in items:
            scores = tiny_llama.score(task.format_input(ex.text), task.labels, mem, task.instruction)
            want.append(task.labels[max(range(len(scores)), key=scores.__getitem__)])
        assert memory_labels(tiny_llama, task, mem, items) == want


def test_metrics_by_hand():
    assert accuracy(["a", "b", "a", "a"], ["a", "b", "b", "a"]) == 0.75
    assert accuracy([], []) is None
    with pytest.raises(ValueError):
        accuracy(["a"], [])
    lo, hi = wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_ci(0, 5)[0] == 0.0 and wilson_ci(5, 5)[1] == 1.0
    assert wilson_ci(0, 0) is None
    assert agreement(["x", "y", None], ["x", "z", None]) == pytest.approx(2 / 3)
    row = fidelity(["a", "b", "b", "a"], labels=["a", "b", "a", "a"], full=["a", "a", "a", "a"])
    assert row == {"accuracy": 0.75, "accuracy_ci95": wilson_ci(3, 4), "full_icl_accuracy": 0.75, "agreement": 0.5}
    assert match_label(" Positive, clearly", ["negative", "positive"]) == "positive"
    assert match_label("maybe", ["negative", "positive"]) is None


@pytest.mark.parametrize("argv_tail, needle", [
    (["--methods", "zero-shot,telepathy"], "unknown method"),
    (["--shots", "four"], "integers"),
    (["--shots", "99"], "shots"),
    (["--scoring", "vibes"], "scoring"),
])
def test_bad_input_exit_2(tmp_path, capsys, argv_tail, needle):
    task = make_task(tmp_path / "mini")
    code = bench_main(["--task", str(task), "--model", "tiny-llama", "--out", str(tmp_path / "o"), *argv_tail])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_task_folder_exit_2(tmp_path, capsys):
    assert bench_main(["--task", str(tmp_path / "nope"), "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert "task folder not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """Plotting from a notebook or GUI app must not switch the process's backend (no pyplot)."""
    import matplotlib

    from emloc_agents.bench.plots import make_plots

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        rows = [{"task": "t", "model": "m", "method": m, "shots": s, "accuracy": a, "kept_ratio": 0.2,
                 "original_tokens": 10 * s, "ttft_s": 0.1, "decode_tokens_per_s": 20.0}
                for m, s, a in [("emloc", 4, 0.5), ("emloc", 8, 0.7)]]
        made = make_plots(rows, tmp_path)
        assert {p.name for p in made} == {"accuracy_vs_kept_ratio.png", "accuracy_vs_shots.png",
                                          "ttft_vs_tokens.png", "decode_vs_tokens.png"}
        assert all(p.stat().st_size > 1000 for p in made)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_agreement_against_the_cached_full_icl(tmp_path):
    """Without ``full-icl``, agreement is read against ``full-icl-cached`` (identical by test)."""
    from emloc_agents.bench.run import run_bench

    task = make_task(tmp_path / "mini")
    rows = run_bench([task], model="tiny-llama", methods=["full-icl-cached", "emloc"], shots=[4], seeds=[0], limit=4,
                     out=tmp_path / "out", plots=False, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["full-icl-cached"]["agreement"] == 1.0
    assert by["emloc"]["agreement"] is not None and 0.0 <= by["emloc"]["agreement"] <= 1.0


def test_several_ratios_give_a_fidelity_curve(tmp_path):
    """``--ratio 0.2,0.5,1.0`` runs each fixed-ratio method once per ratio and plots agreement per task."""
    task = make_task(tmp_path / "mini")
    out = tmp_path / "out"
    argv = ["--task", str(task), "--model", "tiny-llama", "--methods", "full-icl-cached,kvzip,fewer-shots",
            "--shots", "4", "--limit", "4", "--ratio", "0.2,0.5,1.0", "--out", str(out)]
    assert bench_main(argv) == 0
    rows = json.loads((out / "summary.json").read_text())
    runs = [(r["method"], r["press_ratio"]) for r in rows]
    assert runs == [("full-icl-cached", None)] + [(m, r) for m in ("kvzip", "fewer-shots") for r in (0.2, 0.5, 1.0)]
    kvzip = [r for r in rows if r["method"] == "kvzip"]
    assert [r["kept_ratio"] for r in kvzip] == sorted(r["kept_ratio"] for r in kvzip)
    assert kvzip[-1]["kept_ratio"] == 1.0 and kvzip[-1]["agreement"] == 1.0  # keeping all is full ICL
    assert all(r["ratio_source"] == "--ratio" for r in rows[1:])
    assert (out / "fidelity_curve_mini.png").stat().st_size > 1000
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 4 * 7 and {i["press_ratio"] for i in items} == {None, 0.2, 0.5, 1.0}


def test_seed_table_pools_items_over_seeds(tmp_path, capsys):
    from emloc_agents.bench.tables import main, seed_table

    rows = [{"model": "m", "task": "t", "shots": 8, "seed": s, "n": 100, "method": m, "kept_ratio": kept,
             "accuracy": acc, "agreement": agr, "press_ratio": None, "ratio_source": None}
            for s, (acc, agr) in enumerate([(0.5, 0.8), (0.7, 0.9)])
            for m, kept in (("full-icl-cached", 1.0), ("emloc", 0.2))]
    rows[1]["agreement"], rows[3]["agreement"] = 0.8, 0.9
    rows[0]["agreement"] = rows[2]["agreement"] = 1.0
    table = seed_table(rows)
    assert "**m, t, 8 shots, seeds 0, 1, n = 100 per seed**" in table
    line = next(x for x in table.splitlines() if x.startswith("| emloc"))
    # 50 + 70 of 200 items right: 0.600, Wilson [0.53, 0.67]; agreement 80 + 90 of 200: 0.850
    assert line == "| emloc | 0.200 | 0.600 [0.53, 0.67] (0.50 / 0.70) | 0.850 [0.79, 0.89] (0.80 / 0.90) |"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(rows))
    assert main([str(tmp_path / "run")]) == 0
    assert line in capsys.readouterr().out
