"""Shared fixtures: tiny random-weight models (fast) and the real PyPI models (slow)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emloc_agents import Demonstration, Skill
from emloc_agents.tasks import bundled_tasks_dir

BUNDLED_TASKS = ("sst2", "trec", "agnews", "rte", "trec50")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of the tasks bundled with the package. A missing task fails; it never skips.

    Tests load tasks by name (``Task.load("sst2")``); this is for the ones that need a folder path."""
    folder = bundled_tasks_dir()
    missing = [n for n in BUNDLED_TASKS if not (folder / n / "task.json").is_file()]
    assert not missing, f"bundled tasks missing from {folder}: {missing}"
    return folder


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


@pytest.fixture
def drop_model_after():
    """Forget a big model when the test ends (the loader and chat models keep one copy per process):
    the 1.5B holds 6.7 GB in float32, and the cookbook's kernels load their own copy later."""
    import gc

    names: list[str] = []
    yield names.append
    from emloc_agents import chat_model
    from emloc_agents.models import loader

    for name in names:
        for key in [k for k in loader._LOADED if k[0] == name]:
            loader._LOADED.pop(key)
        for key in [k for k in chat_model._REGISTRIES if k[0] == name]:
            chat_model._REGISTRIES.pop(key)
    gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(*args: str) -> Iterator[str]:
    """A real redis-server on a free local port, without persistence (``args`` are more server
    options); yields its URL. Skips the test where the binary or the client is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis")
    port = free_port()
    proc = subprocess.Popen([binary, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {proc.returncode}")
                time.sleep(0.025)
        else:
            pytest.fail("redis-server did not come up")
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
