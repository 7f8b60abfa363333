"""Classification tasks in the shared data format: task.json, pool.jsonl, test.jsonl."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .skills import Demonstration, Skill, SkillError


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
    def load(cls, folder: str | Path) -> Task:
        folder = Path(folder).expanduser()
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
        )
