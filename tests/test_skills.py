"""Skills: loading from JSON, JSONL, YAML and from a task (emloc_agents.tasks); content hash; bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from emloc_agents import Skill, SkillError
from emloc_agents.skills import load_image
from emloc_agents.tasks import Task, bundled_tasks_dir


def _write_image(path: Path, color: str) -> None:
    Image.new("RGB", (4, 4), color).save(path)


def test_json_jsonl_yaml_folder(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png", "red")
    demo = {"input": "Q: x", "output": "y", "images": ["a.png"]}
    (tmp_path / "one.json").write_text(json.dumps({"name": "one", "instruction": "Do.", "demonstrations": [demo]}))
    (tmp_path / "two.jsonl").write_text(json.dumps({"name": "two", "instruction": "Do."}) + "\n" + json.dumps(demo) + "\n")
    (tmp_path / "three.yaml").write_text(
        "name: three\ninstruction: Do.\ndemonstrations:\n  - input: 'Q: x'\n    output: y\n    images: [a.png]\n"
    )
    skills = {s.name: s for s in Skill.from_dir(tmp_path)}
    assert set(skills) == {"one", "two", "three"}
    hashes = {s.content_hash() for s in skills.values()}
    assert len(hashes) == 1  # same content, whatever the file format
    _write_image(tmp_path / "a.png", "blue")  # the hash follows the image bytes, not the path
    assert Skill.from_file(tmp_path / "one.json").content_hash() not in hashes


def test_task_skill() -> None:
    task = Task.load("sst2")
    skill = task.skill(shots=8, seed=1)
    assert len(skill.demonstrations) == 8
    assert skill.demonstrations[0].input.startswith("Review:")
    assert task.skill(shots=8, seed=1).content_hash() == skill.content_hash()
    assert task.skill(shots=8, seed=2).content_hash() != skill.content_hash()


def test_task_folder_is_not_a_skill_folder() -> None:
    with pytest.raises(SkillError, match="task folder"):
        Skill.from_dir(bundled_tasks_dir() / "sst2")


def test_skills_does_not_import_tasks() -> None:
    """tasks builds skills from tasks; the reverse import would be a cycle."""
    source = (Path(__file__).resolve().parents[1] / "emloc_agents" / "skills.py").read_text()
    assert "tasks" not in {line.split()[1].lstrip(".") for line in source.splitlines()
                           if line.strip().startswith(("import ", "from "))}


@pytest.mark.parametrize(
    "name, text, message",
    [("bad.json", "{not json", "not valid JSON"), ("bad.yaml", "a: [", "not valid YAML"), ("empty.jsonl", "", "empty")],
)
def test_bad_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(SkillError, match=message):
        Skill.from_file(tmp_path / name)


def test_missing_image_and_corrupt_image(tmp_path: Path) -> None:
    with pytest.raises(SkillError, match="not found"):
        Skill(name="s", demonstrations=[{"input": "a", "output": "b", "images": [str(tmp_path / "no.png")]}]).content_hash()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(SkillError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
