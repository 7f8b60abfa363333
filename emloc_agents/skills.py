"""Skills: an instruction plus demonstrations (text and optional images), and their content hash."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ImageLike = Any  # a path, raw bytes, or a PIL.Image.Image


class SkillError(ValueError):
    """A skill or demonstration that cannot be used."""


def image_bytes(image: ImageLike) -> bytes:
    """The bytes that identify an image (file bytes for paths/bytes, PNG encoding for PIL images)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | Path):
        path = Path(image).expanduser()
        if not path.is_file():
            raise SkillError(f"image file not found: {path}")
        return path.read_bytes()
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise SkillError("pillow is needed for image demonstrations") from e
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise SkillError(f"unsupported image type {type(image).__name__}; use a path, bytes or a PIL image")


def load_image(image: ImageLike) -> Any:
    """Open an image as RGB PIL, with a clear error for unreadable data."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    data = image_bytes(image)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise SkillError(f"cannot read image ({len(data)} bytes): {e}") from e
    return img.convert("RGB")


class Demonstration(BaseModel):
    """One worked example: the input (with optional images) and the answer the model should give."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    input: str
    output: str
    images: list[ImageLike] = Field(default_factory=list)

    @field_validator("output")
    @classmethod
    def _output_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a demonstration needs a non-empty output")
        return v


class Skill(BaseModel):
    """A named task adaptation: an instruction plus the demonstrations that teach it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
    instruction: str = ""
    demonstrations: list[Demonstration] = Field(default_factory=list)
    description: str = ""
    input_template: str = Field(default="", description=(
        "How a raw input is phrased like the demonstrations' inputs, with one {input} "
        "(e.g. 'Review: {input}\\nSentiment:'); skill tools apply it to what an agent passes."))
    labels: list[str] = Field(default_factory=list, description=(
        "The answers this skill gives when they come from a fixed set (a classifier's labels): "
        "answers on the skill are constrained to exactly one of them. Empty: free text."))

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, v: list[str]) -> list[str]:
        if any(not x.strip() or x != x.strip() or "\n" in x for x in v):
            raise ValueError("labels must be non-empty, one line, without leading or trailing blanks")
        if len(set(v)) != len(v):
            raise ValueError("labels must be distinct")
        return v

    @field_validator("input_template")
    @classmethod
    def _one_input_slot(cls, v: str) -> str:
        if v and v.count("{input}") != 1:
            raise ValueError("input_template must contain {input} exactly once (or be empty)")
        return v

    def format_input(self, text: str) -> str:
        """``text`` phrased like the demonstrations' inputs: the template applied, unless the text
        already starts like it (an agent may pass either the raw text or the phrased one)."""
        if not self.input_template:
            return text
        head = self.input_template.split("{input}")[0]
        if head and text.lstrip().startswith(head.strip()):
            return text
        return self.input_template.replace("{input}", text.strip())

    @property
    def has_images(self) -> bool:
        return any(d.images for d in self.demonstrations)

    def content_hash(self) -> str:
        """sha256 over instruction, demonstration text and image bytes (not name, description,
        input_template or labels: none of them changes the memory)."""
        h = hashlib.sha256()
        h.update(json.dumps({"instruction": self.instruction}).encode())
        for d in self.demonstrations:
            h.update(json.dumps({"input": d.input, "output": d.output, "n_images": len(d.images)}).encode())
            for img in d.images:
                h.update(hashlib.sha256(image_bytes(img)).digest())
        return h.hexdigest()

    def summary(self) -> str:
        return self.description or self.instruction or f"skill {self.name}"

    def tool_description(self, max_chars: int = 600) -> str:
        """What an agent reads to choose this skill as a tool: what it does (instruction and
        description), what it answers (the labels, when set) and one worked example."""
        parts = [self.instruction.strip() or self.summary()]
        if self.description and self.description.strip() != parts[0]:
            parts.append(self.description.strip())
        if self.labels:
            parts.append("Answers one of: " + ", ".join(self.labels) + ".")
        if self.demonstrations:
            d = self.demonstrations[0]
            example = " ".join(d.input.split())
            example = example if len(example) <= 160 else example[:157] + "..."
            parts.append(f"Example: {example!r} -> {d.output.strip()!r}.")
        return " ".join(parts)[:max_chars]

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Skill:
        """A skill from a JSON or YAML file ({name, instruction, demonstrations: [...]}) or a JSONL
        file (first line the header without demonstrations, then one demonstration per line).
        Image paths are relative to the file's folder."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise SkillError(f"skill file not found: {path}")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                try:
                    data = yaml.safe_load(path.read_text())
                except yaml.YAMLError as e:
                    raise SkillError(f"{path}: not valid YAML: {e}") from e
            elif path.suffix == ".jsonl":
                lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                if not lines:
                    raise SkillError(f"empty skill file: {path}")
                data = dict(lines[0])
                data["demonstrations"] = lines[1:]
            else:
                data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SkillError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise SkillError(f"{path}: expected a JSON object")
        data.setdefault("name", path.stem)
        demos = data.get("demonstrations", [])
        if not isinstance(demos, list) or not all(isinstance(d, dict) for d in demos):
            raise SkillError(f"{path}: 'demonstrations' must be a list of objects")
        for d in demos:
            images = d.get("images", [])
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise SkillError(f"{path}: a demonstration's 'images' must be a list of paths")
            d["images"] = [str((path.parent / p).resolve()) for p in images]
        try:
            return cls.model_validate(data)
        except ValueError as e:
            raise SkillError(f"{path}: {e}") from e

    @classmethod
    def from_dir(cls, folder: str | Path) -> list[Skill]:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise SkillError(f"not a folder: {folder}")
        files = sorted(
            p for p in folder.iterdir() if p.suffix in (".json", ".jsonl", ".yaml", ".yml") and p.name != "task.json"
        )
        if (folder / "task.json").is_file():  # tasks builds skills from tasks; skills does not import tasks
            raise SkillError(
                f"{folder} is a task folder (task.json), not a skill folder: "
                "use emloc_agents.tasks.Task.load(folder).skill(shots, seed)"
            )
        if not files:
            raise SkillError(f"no skill files (*.json, *.jsonl, *.yaml) in {folder}")
        return [cls.from_file(p) for p in files]
