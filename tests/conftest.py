"""Shared fixtures: tiny random-weight models (fast) and the real PyPI models (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emloc_agents import Demonstration, Skill

DATA = Path(os.environ.get("EMLOC_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def make_skill(n: int = 9, name: str = "sentiment") -> Skill:
    demos = []
    for i in range(n):
        if i % 2:
            demos.append(Demonstration(input=f"Review: film {i} was great fun\nSentiment:", output="positive"))
        else:
            demos.append(Demonstration(input=f"Review: a dull slow movie {i}\nSentiment:", output="negative"))
    return Skill(name=name, instruction="Classify the sentiment.", demonstrations=demos)


@pytest.fixture
def skill() -> Skill:
    return make_skill()


@pytest.fixture(scope="session")
def tiny_llama():
    from emloc_agents.models.lm import LanguageModel
    from emloc_agents.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    return LanguageModel(model, tok, "tiny-llama")
