"""Classification tasks in the task format: a folder with task.json, pool.jsonl, test.jsonl.

A task is addressed by a folder path or by name. Names are looked up in ``$EMLOC_DATA_DIR`` first
(optional: a folder of task folders), then among the tasks bundled with the package
(``emloc_agents/data/tasks``: sst2, trec, agnews, and the sentence-pair rte and 50-label trec50;
see its README for sources and terms).

This module builds skills from tasks; ``skills`` does not import it (no import cycle).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .skills import Demonstration, Skill, SkillError

DATA_DIR_ENV = "EMLOC_DATA_DIR"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class UnknownTaskError(SkillError):
    """A task name that is neither bundled, nor in ``$EMLOC_DATA_DIR``, nor a folder."""


def bundled_tasks_dir() -> Path:
    """The folder of the tasks that ship with the package."""
    return Path(str(resources.files("emloc_agents") / "data" / "tasks"))


def _task_names(folder: Path | None) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "task.json").is_file())


def _override_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def available_tasks() -> list[str]:
    """Names that ``Task.load`` accepts: the bundled tasks plus any in ``$EMLOC_DATA_DIR``."""
    return sorted(set(_task_names(bundled_tasks_dir())) | set(_task_names(_override_dir())))


def task_path(task: str | Path) -> Path:
    """The folder of a task given by name or path.

    A ``Path``, or a string with a path separator or a leading ``~``/``.``, is a folder (returned
    as is, existing or not). A plain name is looked up in ``$EMLOC_DATA_DIR``, then among the
    bundled tasks; failing both, an existing folder of that name in the working directory is used.
    An unknown name raises ``UnknownTaskError`` listing the names known.
    """
    if isinstance(task, Path):
        return task.expanduser()
    text = str(task)
    if not _NAME.fullmatch(text):
        return Path(text).expanduser()
    for root in (_override_dir(), bundled_tasks_dir()):
        if root is not None and (root / text / "task.json").is_file():
            return root / text
    if Path(text).is_dir():
        return Path(text)
    where = f" (nor in ${DATA_DIR_ENV}={_override_dir()})" if _override_dir() else ""
    raise UnknownTaskError(
        f"unknown task {text!r}{where}; available tasks: {', '.join(available_tasks()) or 'none'} "
        "(or give a task folder path)"
    )


@dataclass(frozen=True)
class Example:
    text: Any
    label: str


@dataclass
class Task:
    name: str
    description: str
    instruction: str
    input_template: str
    labels: list[str]
    pool: list[Example]
    test: list[Example]

    @classmethod
    def load(cls, task: str | Path) -> Task:
        """A task by name (``"sst2"``, ``"trec"``, ``"agnews"``, or one in ``$EMLOC_DATA_DIR``) or
        by folder path. Raises ``UnknownTaskError`` / ``SkillError`` (both ``ValueError``)."""
        folder = task_path(task)
        if not folder.is_dir():
            raise SkillError(f"task folder not found: {folder}")
        meta_path = folder / "task.json"
        if not meta_path.is_file():
            raise SkillError(f"{folder} is not a task folder (no task.json)")
        meta = json.loads(meta_path.read_text())
        missing = {"instruction", "input_template", "labels"} - set(meta)
        if missing:
            raise SkillError(f"{meta_path}: missing fields {sorted(missing)}")

        def read(name: str) -> list[Example]:
            p = folder / name
            if not p.is_file():
                return []
            rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            return [Example(text=r["text"], label=str(r["label"])) for r in rows]

        return cls(
            name=meta.get("name", folder.name),
            description=meta.get("description", ""),
            instruction=meta["instruction"],
            input_template=meta["input_template"],
            labels=[str(x) for x in meta["labels"]],
            pool=read("pool.jsonl"),
            test=read("test.jsonl"),
        )

    def format_input(self, text: Any) -> str:
        if isinstance(text, dict):
            return self.input_template.format(**text)
        return self.input_template.format(text=text)

    def sample_demos(self, shots: int, seed: int) -> list[Example]:
        if shots > len(self.pool):
            raise SkillError(f"task {self.name}: {shots} shots asked, pool has {len(self.pool)}")
        rng = random.Random(seed)
        return rng.sample(self.pool, shots)

    def skill(self, shots: int, seed: int = 0, name: str | None = None) -> Skill:
        demos = [Demonstration(input=self.format_input(e.text), output=e.label) for e in self.sample_demos(shots, seed)]
        return Skill(
            name=name or f"{self.name}",
            instruction=self.instruction,
            description=self.description or self.instruction,
            demonstrations=demos,
            # single-text tasks: skill tools phrase an agent's raw text like the demonstrations
            input_template=self.input_template.replace("{text}", "{input}") if self.input_template.count("{text}") == 1
            and self.input_template.count("{") == 1 else "",
            labels=list(self.labels),
        )
