"""Tasks by name (bundled with the package, or in $EMLOC_DATA_DIR) and by folder path (fast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from emloc_agents.bench.cli import bench_main
from emloc_agents.cli import main as emloc_main
from emloc_agents.skills import SkillError
from emloc_agents.tasks import Task, UnknownTaskError, available_tasks, bundled_tasks_dir, task_path

# The sizes of the data README's table (emloc_agents/data/tasks/README.md).
SIZES = {"sst2": (6920, 1821, 2), "trec": (5452, 500, 6), "agnews": (5600, 2000, 4), "rte": (2490, 277, 2),
         "trec50": (5452, 500, 50)}


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMLOC_DATA_DIR", raising=False)


def _mini_task(folder: Path, name: str = "mini") -> Path:
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(
        {"name": name, "instruction": "Say a or b.", "input_template": "X: {text}\nY:", "labels": ["a", "b"]}
    ))
    rows = [{"text": f"item {i}", "label": "ab"[i % 2]} for i in range(6)]
    (folder / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return folder


@pytest.mark.parametrize("name", sorted(SIZES))
def test_bundled_task_by_name(name: str) -> None:
    pool, test, classes = SIZES[name]
    task = Task.load(name)
    assert (task.name, len(task.pool), len(task.test), len(task.labels)) == (name, pool, test, classes)
    assert {e.label for e in task.test} <= set(task.labels)
    assert task_path(name) == bundled_tasks_dir() / name


def test_available_tasks_lists_the_bundled_ones() -> None:
    assert set(SIZES) <= set(available_tasks())
    assert (bundled_tasks_dir() / "README.md").is_file()  # the attribution ships with the data


def test_folder_path_still_loads(tmp_path: Path) -> None:
    folder = _mini_task(tmp_path / "mini")
    assert Task.load(folder).name == "mini"
    assert Task.load(str(folder)).pool[0].text == "item 0"
    copy = tmp_path / "copy"
    shutil.copytree(bundled_tasks_dir() / "trec", copy)
    assert len(Task.load(copy).test) == 500


def test_data_dir_override_is_searched_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mini_task(tmp_path / "sst2", name="my-sst2")  # shadows the bundled sst2
    _mini_task(tmp_path / "extra", name="extra")
    monkeypatch.setenv("EMLOC_DATA_DIR", str(tmp_path))
    assert Task.load("sst2").name == "my-sst2"
    assert Task.load("extra").name == "extra"
    assert len(Task.load("trec").test) == 500  # names not in the override still come from the package
    assert {"extra", "sst2", "trec", "agnews"} <= set(available_tasks())


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownTaskError, match=r"unknown task 'nosuchtask'.*agnews, rte, sst2, trec, trec50") as info:
        Task.load("nosuchtask")
    assert isinstance(info.value, SkillError) and isinstance(info.value, ValueError)


def test_missing_or_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(SkillError, match="task folder not found"):
        Task.load(tmp_path / "nope")
    with pytest.raises(SkillError, match="no task.json"):
        Task.load(tmp_path)


def test_bench_cli_unknown_task_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--task", "nosuchtask", "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unknown task 'nosuchtask'" in err and "sst2" in err
    assert emloc_main(["bench", "--task", "nosuchtask"]) != 0  # the same through `emloc bench`
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_task_files_are_package_data() -> None:
    """The wheel carries the tasks: every bundled file matches a package-data pattern in pyproject."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["emloc_agents"]
    package = root / "emloc_agents"
    files = [p.relative_to(package).as_posix() for p in (package / "data" / "tasks").rglob("*") if p.is_file()]
    assert len(files) == 1 + 3 * len(SIZES)
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files


def test_the_sentence_pair_and_many_label_tasks_render_whole() -> None:
    """rte fills its template from both texts of a pair; trec50's 50 label words are distinct, and a
    question keeps its fine label (the same question is coarse 'number' in trec)."""
    rte = Task.load("rte")
    item = rte.test[0]
    assert isinstance(item.text, dict) and set(item.text) == {"premise", "hypothesis"}
    shown = rte.format_input(item.text)
    assert shown == f"{item.text['premise']}\nQuestion: {item.text['hypothesis']} True or False?\nAnswer:"
    demo = rte.skill(4, 0).demonstrations[0]
    assert demo.output in ("True", "False") and "True or False?" in demo.input
    fine = Task.load("trec50")
    assert len(set(fine.labels)) == 50
    coarse = {e.text: e.label for e in Task.load("trec").test}
    first = fine.test[0]
    assert (coarse[first.text], first.label) == ("number", "distance")  # How far is it from Denver to Aspen ?
